"""What the benchmarks share: interleaved (ABAB) repetitions, min/median/max figures against a goal, the machine
and versions, the markdown table and the JSON file.

Not a benchmark itself: `python benchmarks/<name>.py` imports it from its own folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import platform
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypeVar

import lightning
import torch

RESULTS = Path(__file__).resolve().parent / "results"
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}
T = TypeVar("T")


def interleave(candidates: dict[str, Callable[[], T]], *, reps: int, rotate: bool = False) -> dict[str, list[T]]:
    """Runs every candidate once per repetition (a block), blocks back to back (A, B, C, A, B, C, ...).

    On a shared, noisy machine a slow minute then hits every candidate alike, so the per-block ratios stay
    meaningful where two separate blocks of runs (AAA... then BBB...) would compare two different minutes.
    ``rotate=True`` starts each block one candidate later (ABC, BCA, CAB, ...), so that no candidate always runs
    first after a set-up or always right after a particular other one: position effects (a cache warmed by the
    previous candidate, the allocator's state) average out over every group of ``len(candidates)`` blocks.
    """
    names = list(candidates)
    results: dict[str, list[T]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            results[name].append(candidates[name]())
    return results


def bootstrap_interval(
    values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (one paired ratio per interleaved block).

    Resamples the blocks with replacement ``resamples`` times and takes the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled medians. Blocks, not single steps, are the unit: steps within
    a block share the machine's state of that minute and are not independent. Seeded, so a report reproduces.
    """
    if len(values) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 blocks, got {len(values)}")
    return percentile_bootstrap(
        len(values), lambda picks: statistics.median(values[i] for i in picks),
        level=level, resamples=resamples, seed=seed,
    )  # fmt: skip


def percentile_bootstrap(
    n: int, statistic: Callable[[list[int]], float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``statistic`` over ``resamples`` draws of
    ``n`` block indices with replacement (seeded): the resampling both :func:`bootstrap_interval` and paired
    statistics of several candidates (the same blocks drawn for each) share."""
    import random

    rng = random.Random(seed)
    samples = sorted(statistic(rng.choices(range(n), k=n)) for _ in range(resamples))
    return samples[int(math.floor((1 - level) / 2 * (resamples - 1)))], samples[int(math.ceil((1 + level) / 2 * (resamples - 1)))]


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Per-repetition ratios: each candidate divided by the baseline measured right next to it."""
    return [a / b for a, b in zip(numerators, denominators)]


@dataclass
class Figure:
    """One reported figure: its values (one per repetition, or per rank/step for counts) and an optional goal.

    A goal ``(op, threshold)`` with op ``"<="`` or ``">="`` is judged on the median (timings are noisy), or on every
    value with ``every=True`` (e.g. one value per rank); ``"=="`` is for counts, which are behaviour, not timing, and
    must hold for every value.
    """

    name: str
    values: list[float]
    unit: str = ""
    goal: Optional[tuple[str, float]] = None
    note: str = ""
    every: bool = False
    #: 95 % bootstrap interval of the median (``bootstrap_interval``), for figures that are per-block ratios.
    interval: Optional[tuple[float, float]] = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"figure {self.name!r} has no values")
        if self.goal is not None and self.goal[0] not in _OPS:
            raise ValueError(f"figure {self.name!r}: goal operator must be one of {sorted(_OPS)}, got {self.goal[0]!r}")

    @property
    def _every(self) -> bool:
        return self.every or (self.goal is not None and self.goal[0] == "==")

    @property
    def met(self) -> Optional[bool]:
        if self.goal is None:
            return None
        op, threshold = self.goal
        if self._every:
            return all(_OPS[op](v, threshold) for v in self.values)
        return bool(_OPS[op](statistics.median(self.values), threshold))

    @property
    def resolved(self) -> Optional[bool]:
        """Whether the interval lies wholly on one side of the goal's threshold (None: no goal or no interval).

        ``met`` judges the median; ``resolved=False`` says the machine's noise is larger than the distance between
        the median and the goal, so "met" or "missed" is not established by this run.
        """
        if self.goal is None or self.interval is None or self._every:
            return None
        op, threshold = self.goal
        low, high = self.interval
        # "<=": met for certain when even the high end is within the goal, missed for certain when the low end is not.
        inside, outside = (high, low) if op == "<=" else (low, high)
        return bool(_OPS[op](inside, threshold)) if self.met else not _OPS[op](outside, threshold)

    def summary(self) -> dict:
        return {
            "unit": self.unit,
            "min": min(self.values),
            "median": statistics.median(self.values),
            "max": max(self.values),
            "values": list(self.values),
            "goal": None if self.goal is None else f"{self.goal[0]} {self.goal[1]:g}",
            "goal_applies_to": None if self.goal is None else ("every value" if self._every else "median"),
            "met": self.met,
            "interval_95": None if self.interval is None else list(self.interval),
            "resolved": self.resolved,
            "note": self.note,
        }


def machine() -> dict:
    """The machine and software the figures were measured on."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1m_at_end"] = os.getloadavg()[0]  # a busy machine shows here
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 0.01 else f"{value:.3g}"


def table(figures: Sequence[Figure]) -> str:
    lines = ["| figure | min | median | max | 95 % interval of the median | goal | met? |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        unit = f" ({f.unit})" if f.unit else ""
        goal = "" if f.goal is None else f"{f.goal[0]} {f.goal[1]:g}"
        met = {None: "", True: "yes", False: "**no**"}[f.met]
        if f.met is not None and f.resolved is False:
            met += " (not resolved)"
        values = [_fmt(v) for v in (min(f.values), statistics.median(f.values), max(f.values))]
        interval = "" if f.interval is None else f"{_fmt(f.interval[0])} – {_fmt(f.interval[1])}"
        lines.append(f"| {f.name}{unit} | {' | '.join(values)} | {interval} | {goal} | {met} |")
    return "\n".join(lines)


@dataclass
class Report:
    """A benchmark's result: printed as a markdown table, written as JSON."""

    name: str
    repetitions: int
    config: dict
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, *args, **kwargs) -> Figure:
        figure = Figure(*args, **kwargs)
        self.figures.append(figure)
        return figure

    def as_dict(self) -> dict:
        return {
            "benchmark": self.name,
            "command": " ".join(["python", f"benchmarks/{self.name}.py", *self.config.get("argv", [])]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "lightning": lightning.__version__},  # fmt: skip
            "repetitions": self.repetitions,
            "config": {k: v for k, v in self.config.items() if k != "argv"},
            "figures": {f.name: f.summary() for f in self.figures},
            "all_goals_met": all(f.met is not False for f in self.figures),
            "notes": self.notes,
            **self.extra,
        }

    def finish(self, out: Optional[Path]) -> dict:
        """Prints the table and notes, writes the JSON (to ``results/<name>.json`` unless ``out`` says otherwise)."""
        result = self.as_dict()
        versions = f"torch {torch.__version__}, lightning {lightning.__version__}"
        print(f"\n{self.name}: {self.repetitions} repetition(s), {result['date']}, {versions}, "
              f"{result['machine']['processor']}, {torch.get_num_threads()} threads")  # fmt: skip
        print(table(self.figures))
        for note in self.notes:
            print(f"- {note}")
        path = Path(out) if out is not None else RESULTS / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {path}", file=sys.stderr)
        return result


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silences Lightning's start-up chatter and the warnings a benchmark triggers on purpose, then restores both.

    The benchmarks start dozens of Trainers; their "GPU available" lines and the "few workers" / "small
    log interval" warnings would bury the table. Nothing here changes what is measured.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for message in (
            r".*does not have many workers.*",
            r".*number of training batches.*is smaller than the logging interval.*",
            r".*isinstance\(treespec, LeafSpec\).*",
            r".*You defined a `validation_step` but have no `val_dataloader`.*",
            r".*WeightAveraging callback with a model that overrides the configure_model.*",  # the recipes' FSDP2 hook
            r"GradientAccumulation: the model has .* BatchNorm layer.*",  # the digits ViT's conv stem, on purpose
        ):
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Runs with ``threads`` torch CPU threads (None: leave torch's choice), then restores the previous number.

    On a machine shared with other jobs, 2 OpenMP threads on 2 busy cores wait for each other at every parallel
    region: steps get several times slower and far noisier than with 1 thread.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def config_of(args, argv: Sequence[str]) -> dict:
    """The parsed arguments as JSON-friendly values, plus the command line that produced them."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    config["argv"] = list(argv)
    return config


def run_two_processes(worker: Callable[..., None], *args) -> None:
    """Starts ``worker(rank, port, *args)`` in 2 CPU processes that meet over gloo on 127.0.0.1.

    The processes are started here, not by Lightning's launcher, which would re-run the calling script (or test
    runner); each worker sets the environment Lightning reads (``set_distributed_env``) and Lightning launches nothing.
    They are forked from multiprocessing's forkserver, which imports torch and Lightning once per parent process: a
    pair starts in about 1 s instead of the 12 s two spawned interpreters take to import them on 2 cores. A worker
    sees what a spawned one would: the parent's environment as it is now (the server's is from when it started) and
    the platform's default start method for its own children (DataLoader workers), not the forkserver.
    """
    import multiprocessing
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    multiprocessing.set_forkserver_preload(["torch", "lightning.pytorch"])  # used when the server starts
    mp.start_processes(_as_spawned, args=(dict(os.environ), worker, port, *args), nprocs=2, join=True,
                       start_method="forkserver")  # fmt: skip


def _as_spawned(rank: int, environ: dict, worker: Callable[..., None], *args) -> None:
    import multiprocessing

    os.environ.clear()
    os.environ.update(environ)
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    worker(rank, *args)


def set_distributed_env(rank: int, port: int, world_size: int = 2) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip


def digits_vit_args() -> dict:
    """The ViT of ``recipes/configs/vit_digits.yaml`` (what ``python recipes/vit.py fit`` trains) as model arguments."""
    import yaml

    from lightning_recipes.recipes.common import CONFIG_DIR

    config = yaml.safe_load((CONFIG_DIR / "vit_digits.yaml").read_text())
    image_size = config["data"]["init_args"]["image_size"]
    return {**config["model"], "num_classes": 10, "in_channels": 1, "image_size": image_size}
