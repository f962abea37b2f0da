"""Compare training runs side by side: run a grid of recipe variants × seeds, or read existing TensorBoard logs.

    python recipes/compare.py run experiments/warmup_vit.yaml                         # runs the grid, then compares
    python recipes/compare.py run GRID.yaml --seeds 0 --variants warmup --dry-run     # print the commands only
    python recipes/compare.py logs runs/a runs/b --names a b --target-acc 0.95 --out runs/compare_ab
    python recipes/compare.py logs runs/gpt_a runs/gpt_b --metric val/bpb --mode min --target 2.5   # any metric

Both write ``<out>/compare.md`` (the table, the statistics table below, notes on every crashed / short / incomplete
run, the plots), ``<out>/compare.json`` (every run's figures and the statistics, as numbers) and PNG plots: the
metric (``--metric``, default val/acc) vs optimizer step and vs wall time, train loss, learning rate and gradient
norm, one line per variant (mean over seeds) with a min–max band. ``--mode`` says whether larger (``max``, the default) or smaller (``min``: losses, bits per byte) is
better: it picks each run's best value and when a run reaches ``--target``. ``--no-timing`` leaves the wall-clock
figures out (seconds to target, throughput, wall time and the time plot) when other jobs shared the machine.

A grid file (``experiments/*.yaml``) is::

    recipe: vit                  # vit | resnet | gpt: which recipe's CLI runs the variants
    config: vit_digits.yaml      # optional: a file in recipes/configs/ or a path; default the recipe's digits config
    seeds: [0, 1]
    target_acc: 0.95             # optional: steps and wall time to reach this val/acc
    # or, for any logged metric: metric: val/bpb, mode: min, target: 2.5
    base: {trainer: {max_epochs: 10}}          # optional: merged into the config of every variant
    variants:                    # name -> overrides merged into the config (plus optional recipe / config keys)
      warmup: {}
      no_warmup:
        trainer:
          callbacks:
            - {class_path: lightning_recipes.callbacks.LRSchedule, init_args: {warmup_fraction: 0.0}}

Merging: mappings merge key by key, other values (lists included) replace, except ``trainer.callbacks``: an
entry whose ``class_path`` is already in the list updates that callback's ``init_args``, ``remove: true``
drops it, and a new ``class_path`` is appended. Every run gets its own folder ``<out>/<variant>/seed_<s>``
with the exact ``config.yaml`` it ran, its console output ``log.txt``, ``run.json`` (exit code, wall time)
and TensorBoard events in ``tb/``. A grid that stops half-way is continued by running the command again:
finished runs (exit code 0) are kept, unless ``--rerun``.

Figures come from the TensorBoard event files, read with tensorboard's own ``EventAccumulator``. Throughput
and peak memory are logged by ``RunStats`` (Lightning's ``ThroughputMonitor`` plus peak memory), which the
grid adds to every run; add it to your own runs' callbacks to get those columns for ``compare.py logs``. Language
models log ``train/tokens_per_sec`` themselves: when every run has it, the throughput column is tokens/s.

Statistics: beside the table, every variant is compared with a baseline (the first variant, or --baseline NAME)
on the final value of --metric and, with a target, on the steps and the seconds to reach it. For each variant: the
runs counted (n), mean ± sample std (ddof 1); then the difference of the means (variant - baseline), Welch's t
(unequal variances), its Welch-Satterthwaite degrees of freedom, the two-sided p-value and the 95 % confidence
interval of the difference (Welch t interval), from scipy.stats. Runs that crashed (exit code not 0), diverged (a
NaN or infinite value) or have no value are left out of the test and counted beside n, never dropped silently.
The verdict follows one rule, in this order:
  "not testable: not every run reached <target>"  steps / seconds to target, unless every run of both reached it;
  "not testable: n = <k>"                         a variant has k < 2 runs counted;
  "not testable: no spread within either variant" every run of each variant has the same value (t undefined);
  "differs (p < 0.05)"                            p < 0.05;
  "no difference resolved with <n> seeds (p = <p>)"  otherwise: these seeds cannot tell, which is not evidence
                                                  of no effect.
Each comparison is tested on its own at 0.05, without correction for multiple comparisons: among many
comparisons of equal variants, about one in twenty reads "differs" by chance.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RECIPES = {"vit": "vit_digits.yaml", "resnet": "resnet_digits.yaml", "gpt": "gpt_stdlib.yaml"}
EVENTS = "events.out.tfevents."
# Tags plotted and tabulated. LRSchedule logs lr/<param group>; the first group (decay) is the headline LR.
VAL_ACC, VAL_LOSS, TRAIN_LOSS, GRAD_NORM = "val/acc", "val/loss", "train/loss", "grad_norm/total"
THROUGHPUT_TAGS = ("train/samples_per_sec", "train/device/samples_per_sec")  # global (world > 1), per device
TOKENS_PER_SEC = "train/tokens_per_sec"  # logged by the GPT recipe, all processes together
#: Substrings of metric names where smaller is better: asking for their maximum is almost surely a mistake.
LOWER_IS_BETTER = ("loss", "bpb", "perplexity", "error")
PEAK_MEMORY = "train/peak_memory_mb"
RUN_STATS = "lightning_recipes.recipes.compare.RunStats"


class RunStats(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (``train/samples_per_sec``, validation excluded) plus ``train/peak_memory_mb``.

    Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's peak resident set size on a
    CPU, maximum over ranks, logged at every epoch end. Throughput is a rolling mean over ``window_size``
    batches, so runs shorter than that log no throughput (the table then says which runs lack it).
    """

    def __init__(self, *, window_size: int = 20) -> None:
        if not isinstance(window_size, int) or window_size < 2:
            raise ValueError(f"`window_size` must be an integer >= 2 (batches per rolling mean), got {window_size!r}")
        super().__init__(batch_size_fn=extract_batch_size, window_size=window_size)
        # Lightning 2.6: ThroughputMonitor warns once unless the module defines `flops_per_batch`; we report no
        # FLOPs here (benchmarks/overhead.py measures model FLOPs utilisation), so skip that check.
        self._module_has_flops = False

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:  # ru_maxrss is in KiB on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        pl_module.log(PEAK_MEMORY, float(peak), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")


# ---------------------------------------------------------------------------------------------------- grid runs


def merge(config: dict[str, Any], overrides: dict[str, Any], path: str = "") -> dict[str, Any]:
    """``config`` updated with ``overrides`` (a new dict; see the module docstring for the rules)."""
    merged = copy.deepcopy(config)
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else key
        if where == "trainer.callbacks":
            merged[key] = _merge_callbacks(merged.get(key) or [], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value, where)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_callbacks(callbacks: list[dict[str, Any]], overrides: Any) -> list[dict[str, Any]]:
    if not isinstance(overrides, list) or not all(isinstance(c, dict) and "class_path" in c for c in overrides):
        raise ValueError(
            f"trainer.callbacks override {overrides!r} must be a list of mappings with a class_path (and init_args "
            "to change, or remove: true to drop the callback)."
        )
    merged = copy.deepcopy(callbacks)
    for override_ in overrides:
        unknown = set(override_) - {"class_path", "init_args", "remove"}
        if unknown:
            raise ValueError(f"callback override {override_!r}: unknown keys {sorted(unknown)}; use init_args or remove.")
        matches = [i for i, c in enumerate(merged) if c.get("class_path") == override_["class_path"]]
        if override_.get("remove"):
            if not matches:
                raise ValueError(f"remove: true for {override_['class_path']}, which the config's callbacks do not have.")
            merged = [c for i, c in enumerate(merged) if i not in matches]
        elif matches:
            target = merged[matches[0]]
            target["init_args"] = {**(target.get("init_args") or {}), **(override_.get("init_args") or {})}
        else:
            merged.append({"class_path": override_["class_path"], "init_args": dict(override_.get("init_args") or {})})
    return merged


@dataclass
class Variant:
    name: str
    recipe: str
    config: Path
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Goal:
    """What the table ranks runs by: a logged metric, which way is better, and an optional value to reach."""

    metric: str = VAL_ACC
    mode: str = "max"
    target: Optional[float] = None
    timing: bool = True  # False (--no-timing): no wall-clock columns, comparison or plot (a shared machine's runs)

    @property
    def key(self) -> str:  # val/acc -> val_acc: figure names (final_val_acc) and plot file names
        return self.metric.replace("/", "_")

    @property
    def percent(self) -> bool:  # accuracies are shown in %
        return self.metric.rsplit("/", 1)[-1].startswith("acc")

    def better(self, a: float, b: float) -> bool:
        return a >= b if self.mode == "max" else a <= b

    @property
    def target_text(self) -> Optional[str]:  # as the tables name it: 95% for val/acc, 2.5 for val/bpb
        if self.target is None:
            return None
        return f"{100 * self.target:g}%" if self.percent else f"{self.target:g}"


@dataclass
class Grid:
    variants: list[Variant]
    seeds: list[int]
    goal: Goal


def load_grid(path: Path) -> Grid:
    """Parse and validate a grid file; every error names the file and the key."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    allowed = {"recipe", "config", "seeds", "target_acc", "metric", "mode", "target", "base", "variants"}
    if not isinstance(spec, dict) or set(spec) - allowed:
        raise ValueError(f"{path}: unknown top-level keys {sorted(set(spec) - allowed)}; allowed: {sorted(allowed)}.")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{path}: seeds={seeds!r} must be a non-empty list of integers.")
    target = spec.get("target_acc")
    if target is not None and not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"{path}: target_acc={target!r} must be a fraction in (0, 1], e.g. 0.95.")
    metric, mode = spec.get("metric", VAL_ACC), spec.get("mode", "max")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"{path}: metric={metric!r} must be a logged metric's name, e.g. val/bpb.")
    if mode not in ("min", "max"):
        raise ValueError(f"{path}: mode={mode!r} must be 'min' (smaller is better) or 'max'.")
    if "target" in spec:
        if target is not None or not isinstance(spec["target"], (int, float)):
            raise ValueError(f"{path}: target={spec['target']!r} must be a number in {metric}'s units, and not given "
                             "together with target_acc.")
        target = spec["target"]
    elif target is not None and metric != VAL_ACC:
        raise ValueError(f"{path}: target_acc is for metric val/acc, not {metric}: use target.")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"{path}: variants must be a mapping of name -> overrides with at least one entry.")
    base = spec.get("base") or {}
    result = []
    for name, overrides in variants.items():
        overrides = dict(overrides or {})
        recipe = overrides.pop("recipe", spec.get("recipe"))
        if recipe not in RECIPES:
            raise ValueError(f"{path}: variant {name!r} has recipe={recipe!r}; choose one of {sorted(RECIPES)}.")
        config = overrides.pop("config", spec.get("config")) or RECIPES[recipe]
        config_path = Path(config) if Path(config).exists() else CONFIG_DIR / config
        if not config_path.is_file():
            raise ValueError(f"{path}: variant {name!r} config={config!r} is neither a file nor in {CONFIG_DIR}.")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
            raise ValueError(
                f"{path}: variant name {name!r} must be letters, digits, '_', '-' or '.', starting with a letter or "
                "digit (it names a folder)."
            )
        result.append(Variant(str(name), recipe, config_path, merge(base, overrides)))
    return Grid(result, seeds, Goal(metric, mode, target))


def run_config(variant: Variant, seed: int, run_dir: Path) -> dict[str, Any]:
    """The complete config one run uses: the variant's config file, its overrides, and the run's own folders."""
    config = merge(yaml.safe_load(variant.config.read_text()), variant.overrides)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run_dir)
    trainer["enable_progress_bar"] = False
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "tb", "version": ""},
    }
    callbacks = trainer.get("callbacks") or []
    if not any(c.get("class_path") == RUN_STATS for c in callbacks):
        trainer["callbacks"] = [*callbacks, {"class_path": RUN_STATS}]
    config["seed_everything"] = seed
    return config


def run_grid(grid: Grid, out: Path, *, rerun: bool = False, dry_run: bool = False) -> list[Path]:
    """Run every variant × seed one after another (each a fresh process, as a user would); return the run folders."""
    run_dirs = []
    for variant in grid.variants:
        for seed in grid.seeds:
            run_dir = out / variant.name / f"seed_{seed}"
            run_dirs.append(run_dir)
            command = [sys.executable, "-m", f"lightning_recipes.recipes.{variant.recipe}", "fit", "--config"]
            command.append(str(run_dir / "config.yaml"))
            if dry_run:
                print(" ".join(command))
                continue
            record = run_dir / "run.json"
            if not rerun and record.is_file() and json.loads(record.read_text()).get("returncode") == 0:
                print(f"{variant.name} seed {seed}: finished before, kept (--rerun to run it again)")
                continue
            if run_dir.exists():  # an earlier attempt: start clean, never mix two runs' events or checkpoints
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config(variant, seed, run_dir), sort_keys=False))
            print(f"{variant.name} seed {seed}: {' '.join(command)}", flush=True)
            conditions = {"commit": source_commit(), "torch_threads": torch.get_num_threads(),
                          "load_average_1m_at_start": _load_average()}  # fmt: skip
            start = time.time()
            with open(run_dir / "log.txt", "w") as log:
                returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
            seconds = time.time() - start
            record.write_text(
                json.dumps({"variant": variant.name, "seed": seed, "returncode": returncode, "start_time": start,
                            "seconds": seconds, "command": command, **conditions,
                            "load_average_1m_at_end": _load_average()}, indent=1)
            )
            status = "ok" if returncode == 0 else f"CRASHED (exit {returncode}, see {run_dir / 'log.txt'})"
            print(f"{variant.name} seed {seed}: {status} in {seconds:.0f} s", flush=True)
    return run_dirs


def source_commit() -> Optional[str]:
    """The git commit of the recipes that run, ``+dirty`` when the code they run (recipes/, callbacks/,
    datamodules/, pyproject.toml) has uncommitted changes; None outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent
    code = [".", "../callbacks", "../datamodules", "../pyproject.toml"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code], cwd=here,
                                capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)  # other jobs on the machine show here
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ reading logs


@dataclass
class Run:
    """One run's scalar series (tag -> [(step, wall_time, value)]) and what its run.json says, if any."""

    variant: str
    name: str
    path: Path
    series: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    returncode: Optional[int] = None
    start_time: Optional[float] = None
    seconds: Optional[float] = None
    conditions: dict[str, Any] = field(default_factory=dict)  # commit, torch threads, load average (run.json)

    @property
    def crashed(self) -> bool:
        return self.returncode not in (None, 0)


def read_run(variant: str, path: Path, run_root: Path) -> Run:
    """Read the event files of one TensorBoard log folder; ``run_root`` is where a grid's run.json lives."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run = Run(variant, run_root.name, run_root)
    if path.is_dir():
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0 = keep every point
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            run.series[tag] = [(e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag)]
    record = run_root / "run.json"
    if record.is_file():
        info = json.loads(record.read_text())
        run.returncode, run.start_time, run.seconds = info.get("returncode"), info.get("start_time"), info.get("seconds")
        run.conditions = {k: info[k] for k in CONDITIONS if k in info}
    return run


def find_runs(variant_dir: Path, variant: str) -> list[Run]:
    """Every run under a variant's folder: each folder with event files, plus grid runs that crashed before any."""
    roots: dict[Path, Path] = {}  # run root -> folder with the event files
    for events in sorted(variant_dir.rglob(f"{EVENTS}*")):
        log_dir = events.parent
        root = log_dir.parent if log_dir.name == "tb" and (log_dir.parent / "run.json").exists() else log_dir
        roots.setdefault(root, log_dir)
    for record in sorted(variant_dir.rglob("run.json")):
        roots.setdefault(record.parent, record.parent / "tb")
    return [read_run(variant, log_dir, root) for root, log_dir in sorted(roots.items())]


def _last(run: Run, tag: str) -> Optional[float]:
    return run.series[tag][-1][2] if run.series.get(tag) else None


#: What run.json records about how a grid run was measured, copied into its figures.
CONDITIONS = ("commit", "torch_threads", "load_average_1m_at_start", "load_average_1m_at_end")


#: A spike: a logged value above SPIKE_FACTOR x the median of the SPIKE_WINDOW values logged before it (issue 12's
#: definition, loss > 1.5x its running median); the first SPIKE_MIN_HISTORY values have too little history to judge.
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN_HISTORY = 1.5, 25, 5


def count_spikes(values: list[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                 min_history: int = SPIKE_MIN_HISTORY) -> int:  # fmt: skip
    """How many values exceed ``factor`` x the median of the (up to) ``window`` values before them.

    A non-finite value counts as a spike. The median, not the mean, so that a spike does not raise the bar for
    the next ones; a run that stays high counts a spike for every value until the window's median catches up.
    """
    count = 0
    for i in range(min_history, len(values)):
        history = [v for v in values[max(0, i - window) : i] if math.isfinite(v)]
        if not math.isfinite(values[i]) or (history and values[i] > factor * statistics.median(history)):
            count += 1
    return count


def _spikes(run: Run, tag: str) -> Optional[int]:
    points = run.series.get(tag)
    return count_spikes([v for _, _, v in points]) if points else None


def run_figures(run: Run, goal: Goal = Goal()) -> dict[str, Any]:
    """The per-run numbers the table aggregates (None where the run did not log what they need)."""
    measured = run.series.get(goal.metric, [])
    all_points = [p for points in run.series.values() for p in points]
    start = run.start_time if run.start_time is not None else min((p[1] for p in all_points), default=None)
    # Lightning logs a step's metrics at the 0-based index of the optimizer step just taken (epoch-end validation
    # at the last one), so step + 1 counts steps. RunStats' own tags count batches (they differ under
    # accumulation) and are left out.
    step_tags = [t for t in run.series if t in (TRAIN_LOSS, goal.metric, VAL_LOSS) or t.startswith(("lr/", "grad_norm/"))]
    last_step = max((p[0] for tag in step_tags for p in run.series[tag]), default=None)
    steps = None if last_step is None else last_step + 1
    reached = next(((s + 1, w) for s, w, v in measured if goal.target is not None and goal.better(v, goal.target)), None)
    throughput_tag = next((t for t in THROUGHPUT_TAGS if run.series.get(t)), None)
    seconds = run.seconds
    if seconds is None and all_points and start is not None:
        seconds = max(p[1] for p in all_points) - start
    return {
        "variant": run.variant,
        "run": run.name,
        "path": str(run.path),
        "returncode": run.returncode,
        f"final_{goal.key}": _last(run, goal.metric),
        f"best_{goal.key}": (max if goal.mode == "max" else min)((v for _, _, v in measured), default=None),
        "final_val_loss": _last(run, VAL_LOSS),
        "steps": steps,
        "epochs_validated": len(measured),
        "steps_to_target": reached[0] if reached else None,
        "seconds_to_target": reached[1] - start if reached and start is not None else None,
        "samples_per_sec": statistics.median(v for _, _, v in run.series[throughput_tag]) if throughput_tag else None,
        "tokens_per_sec": statistics.median(v for _, _, v in run.series[TOKENS_PER_SEC]) if run.series.get(TOKENS_PER_SEC) else None,
        "peak_memory_mb": max((v for _, _, v in run.series.get(PEAK_MEMORY, [])), default=None),
        "seconds": seconds,
        "loss_points": len(run.series.get(TRAIN_LOSS, [])),
        "loss_spikes": _spikes(run, TRAIN_LOSS),
        "grad_norm_spikes": _spikes(run, GRAD_NORM),
        "max_grad_norm": max((v for _, _, v in run.series.get(GRAD_NORM, [])), default=None),
        **{k: run.conditions.get(k) for k in CONDITIONS},
    }


# ------------------------------------------------------------------------------------------------------- table


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _cell(figures: list[dict[str, Any]], key: str, *, scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± std over the runs that have the figure, and how many of the variant's runs that is if not all."""
    values = [f[key] for f in figures if f[key] is not None and math.isfinite(f[key])]
    text = _mean_std(values, scale, digits)
    return text if len(values) == len(figures) or not values else f"{text} ({len(values)}/{len(figures)})"


def table(figures: list[dict[str, Any]], goal: Goal = Goal()) -> tuple[str, list[str]]:
    """The markdown comparison table and the notes that explain every run it could not count fully."""
    target = goal.target_text
    unit = " %" if goal.percent else ""
    # Text runs: tokens/s (what a language model's speed is quoted in) when every run logged it.
    throughput = "tokens_per_sec" if figures and all(f["tokens_per_sec"] is not None for f in figures) else "samples_per_sec"
    header = [
        "variant", "runs", f"final {goal.metric}{unit}", f"best {goal.metric}{unit}", "final val/loss", "optimizer steps",
        f"steps to {target}" if target else "steps to target", f"seconds to {target}" if target else "seconds to target",
        "tokens/s" if throughput == "tokens_per_sec" else "samples/s", "peak memory MB", "wall time s",
    ]
    timed = [7, 8, 10]  # the wall-clock columns, left out without goal.timing
    header = [h for i, h in enumerate(header) if goal.timing or i not in timed]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    variants = list(dict.fromkeys(f["variant"] for f in figures))
    for variant in variants:
        runs = [f for f in figures if f["variant"] == variant]
        crashed = [f for f in runs if f["returncode"] not in (None, 0)]
        count = f"{len(runs)}" + (f" ({len(crashed)} crashed)" if crashed else "")
        steps = sorted({f["steps"] for f in runs if f["steps"] is not None})
        steps_text = "—" if not steps else str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]} (differ)"
        if goal.target is None:
            to_steps = to_seconds = "—"
        else:
            reached = [f for f in runs if f["steps_to_target"] is not None]
            suffix = "" if len(reached) == len(runs) else f" ({len(reached)}/{len(runs)} reached)"
            to_steps = (_mean_std([f["steps_to_target"] for f in reached], digits=0) + suffix) if reached else "not reached"
            to_seconds = (_mean_std([f["seconds_to_target"] for f in reached if f["seconds_to_target"] is not None],
                                    digits=0) + suffix) if reached else "not reached"
        row = [
            variant, count, *(_cell(runs, f"{which}_{goal.key}", scale=100 if goal.percent else 1,
                                    digits=2 if goal.percent else 3) for which in ("final", "best")),
            _cell(runs, "final_val_loss", digits=3), steps_text, to_steps, to_seconds,
            _cell(runs, throughput, digits=0), _cell(runs, "peak_memory_mb", digits=0), _cell(runs, "seconds", digits=0),
        ]
        row = [cell for i, cell in enumerate(row) if goal.timing or i not in timed]
        lines.append("| " + " | ".join(row) + " |")
        for f in runs:
            where = f"{variant}/{f['run']}"
            if f["returncode"] not in (None, 0):
                notes.append(f"{where}: crashed with exit code {f['returncode']}: {_last_line(Path(f['path']) / 'log.txt')} "
                             f"(see {f['path']}/log.txt); its figures, if any, are from the steps it logged before.")
            logged = (f"final_{goal.key}", "final_val_loss", *([throughput] if goal.timing else []), "peak_memory_mb")
            missing = [k for k in logged if f[k] is None]
            if missing:
                notes.append(f"{where}: logged no {', '.join(missing)}.")
        if len(steps) > 1:
            per_run = ", ".join(f"{f['run']} {f['steps']}" for f in runs)
            notes.append(f"{variant}: runs of different lengths ({per_run} optimizer steps); final figures compare "
                         "different amounts of training.")
    return "\n".join(lines), notes


def spikes_table(figures: list[dict[str, Any]]) -> str:
    """Per variant: loss and pre-clip grad-norm spikes (:func:`count_spikes`) and the largest pre-clip norm."""
    lines = [f"| variant | logged train/loss points | loss spikes (> {SPIKE_FACTOR}x running median) | "
             f"grad-norm spikes (> {SPIKE_FACTOR}x running median) | max pre-clip grad norm |", "|---|---|---|---|---|"]
    for variant in dict.fromkeys(f["variant"] for f in figures):
        runs = [f for f in figures if f["variant"] == variant]
        per_run = lambda key: "/".join("—" if f[key] is None else str(f[key]) for f in runs)  # noqa: E731
        lines.append(f"| {variant} | {per_run('loss_points')} | {per_run('loss_spikes')} | "
                     f"{per_run('grad_norm_spikes')} | {_cell(runs, 'max_grad_norm', digits=2)} |")
    return "\n".join(lines)


def _last_line(log: Path) -> str:
    """The last non-empty line of a run's console output: for a crash, the exception and its message."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return repr(lines[-1]) if lines else "no output"


# -------------------------------------------------------------------------------------------------- statistics

ALPHA, CONFIDENCE = 0.05, 0.95
#: The module docstring's paragraph on the statistics: also the epilog of ``--help``, so the two never differ.
STATISTICS_RULE = next(p for p in (__doc__ or "").split("\n\n") if p.startswith("Statistics:"))


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> dict[str, Optional[float]]:
    """Welch's unequal-variances t-test of mean(a) - mean(b): t, Welch-Satterthwaite df, two-sided p and CI.

    The formulas of ``scipy.stats.ttest_ind(a, b, equal_var=False)`` (whose result has ``df`` and
    ``confidence_interval`` only from scipy 1.11 on): se = sqrt(var_a / n_a + var_b / n_b) with sample variances,
    t = diff / se, df = se^4 / ((var_a / n_a)^2 / (n_a - 1) + (var_b / n_b)^2 / (n_b - 1)), p = 2 P(T_df > |t|),
    interval diff ± t_df((1 + confidence) / 2) se. t, df, p and the interval are None where undefined: an arm
    with fewer than 2 values, or no spread in either (se = 0).
    """
    from scipy import stats

    result: dict[str, Optional[float]] = {"difference": None, "t": None, "df": None, "p": None,
                                          "ci_low": None, "ci_high": None}
    if a and b:
        result["difference"] = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return result
    sa, sb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if sa + sb == 0:
        return result
    se = math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    t = result["difference"] / se
    half = float(stats.t.ppf((1 + confidence) / 2, df)) * se
    result.update(t=t, df=df, p=float(2 * stats.t.sf(abs(t), df)),
                  ci_low=result["difference"] - half, ci_high=result["difference"] + half)
    return result


def _arm(runs: list[dict[str, Any]], key: str, missing: str) -> dict[str, Any]:
    """The finite values of one figure over a variant's finished runs, and which runs are left out and why."""
    values, excluded = [], {"crashed": [], "diverged": [], missing: []}
    for f in runs:
        value = f[key]
        if f["returncode"] not in (None, 0):
            excluded["crashed"].append(f["run"])
        elif value is None:
            excluded[missing].append(f["run"])
        elif not math.isfinite(value):
            excluded["diverged"].append(f["run"])
        else:
            values.append(value)
    return {"n": len(values), "runs": len(runs), "values": values,
            "mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "excluded": {reason: names for reason, names in excluded.items() if names}}


def comparisons(figures: list[dict[str, Any]], goal: Goal = Goal(), baseline: Optional[str] = None) -> dict[str, Any]:
    """Every variant against the baseline on each figure the module docstring lists, with the verdict of its rule."""
    variants = list(dict.fromkeys(f["variant"] for f in figures))
    baseline = variants[0] if baseline is None and variants else baseline
    if baseline not in variants:
        raise ValueError(f"baseline={baseline!r} is not a variant: choose one of {variants}.")
    target = goal.target_text
    keys = [(f"final_{goal.key}", "no value")]
    if target is not None:
        keys += [("steps_to_target", "not reached")] + ([("seconds_to_target", "not reached")] if goal.timing else [])
    result = []
    for variant in variants:
        if variant == baseline:
            continue
        for key, missing in keys:
            arms = [_arm([f for f in figures if f["variant"] == name], key, missing) for name in (variant, baseline)]
            test = welch(arms[0]["values"], arms[1]["values"])
            n = min(arm["n"] for arm in arms)
            if key != f"final_{goal.key}" and any(arm["excluded"] for arm in arms):
                outcome, verdict = "not testable", f"not testable: not every run reached {target}"
            elif n < 2:
                outcome, verdict = "not testable", f"not testable: n = {n}"
            elif test["p"] is None:
                outcome, verdict = "not testable", "not testable: no spread within either variant"
            elif test["p"] < ALPHA:
                outcome, verdict = "differs", f"differs (p < {ALPHA:g})"
            else:
                seeds = f"{arms[0]['n']}" if arms[0]["n"] == arms[1]["n"] else f"{arms[0]['n']} vs {arms[1]['n']}"
                outcome, verdict = "not resolved", f"no difference resolved with {seeds} seeds (p = {test['p']:.3g})"
            result.append({"variant": variant, "baseline": baseline, "figure": key, "variant_arm": arms[0],
                           "baseline_arm": arms[1], **test, "outcome": outcome, "verdict": verdict})
    return {"baseline": baseline, "test": "Welch's t-test, two-sided, unequal variances (scipy.stats)",
            "alpha": ALPHA, "confidence": CONFIDENCE, "comparisons": result}


def statistics_table(stats: dict[str, Any], goal: Goal = Goal()) -> str:
    """The markdown table of ``comparisons``: accuracies in %, like the main table; differences variant - baseline."""
    target = goal.target_text
    labels = {f"final_{goal.key}": (f"final {goal.metric}" + (" %" if goal.percent else ""),
                                     100 if goal.percent else 1, 2 if goal.percent else 3),
              "steps_to_target": (f"steps to {target}", 1, 1), "seconds_to_target": (f"seconds to {target}", 1, 1)}
    header = ["variant - baseline", "figure", "n", "variant", "baseline", "difference",
              f"{100 * stats['confidence']:g} % CI", "Welch t", "df", "p", "verdict"]
    caption = (f"Each variant against `{stats['baseline']}`: {stats['test']}; the rule of the verdict is in "
               "`python recipes/compare.py --help`.")
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def count(arm: dict[str, Any]) -> str:
        left_out = ", ".join(f"{len(names)} {reason}" for reason, names in arm["excluded"].items())
        return f"{arm['n']}" + (f" of {arm['runs']} ({left_out})" if left_out else "")

    def number(value: Optional[float], scale: float, digits: int) -> str:
        return "—" if value is None else f"{value * scale:.{digits}f}"

    for c in stats["comparisons"]:
        label, scale, digits = labels[c["figure"]]
        arms = (c["variant_arm"], c["baseline_arm"])
        mean_std = [number(arm["mean"], scale, digits) + ("" if arm["std"] is None else
                                                           f" ± {arm['std'] * scale:.{digits}f}") for arm in arms]
        ci = "—" if c["ci_low"] is None else (
            f"[{number(c['ci_low'], scale, digits)}, {number(c['ci_high'], scale, digits)}]")
        row = [f"{c['variant']} - {c['baseline']}", label, f"{count(arms[0])} vs {count(arms[1])}", *mean_std,
               number(c["difference"], scale, digits), ci, number(c["t"], 1, 2), number(c["df"], 1, 1),
               "—" if c["p"] is None else f"{c['p']:.3g}", c["verdict"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- plots


def _aligned(runs: list[Run], tag: str) -> Optional[tuple[Any, Any, Any, Any, Any]]:
    """Steps, mean wall time, and mean / min / max of ``tag`` over runs, on the union of their steps."""
    import numpy as np

    series = [run.series[tag] for run in runs if run.series.get(tag)]
    if not series:
        return None
    steps = np.array(sorted({s for points in series for s, _, _ in points}), dtype=float)
    values, times = [], []
    for run, points in zip([r for r in runs if r.series.get(tag)], series):
        x = np.array([p[0] for p in points], dtype=float)
        inside = (steps >= x[0]) & (steps <= x[-1])  # no extrapolation: a shorter run leaves the band there
        start = run.start_time if run.start_time is not None else min(p[1] for p in run.series[tag])
        values.append(np.where(inside, np.interp(steps, x, [p[2] for p in points]), np.nan))
        times.append(np.where(inside, np.interp(steps, x, [p[1] - start for p in points]), np.nan))
    values, times = np.array(values), np.array(times)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps where no run has a point: all-NaN columns
        return steps, np.nanmean(times, 0), np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def plot(runs: list[Run], out: Path, metric: str = VAL_ACC, timing: bool = True) -> list[Path]:
    """One PNG per figure; one line per variant (mean over its runs) and a band from the min to the max run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr_tag = next((t for run in runs for t in sorted(run.series) if t.startswith("lr/")), None)
    figures = [
        (f"{Goal(metric).key}_vs_step", metric, "optimizer step", metric, False),
        *([(f"{Goal(metric).key}_vs_time", metric, "wall time (s)", metric, True)] if timing else []),
        ("train_loss", TRAIN_LOSS, "optimizer step", "train loss", False),
        ("lr", lr_tag, "optimizer step", f"learning rate ({lr_tag})", False),
        ("grad_norm", GRAD_NORM, "optimizer step", "gradient norm before clipping", False),
    ]
    written = []
    variants = list(dict.fromkeys(run.variant for run in runs))
    for name, tag, xlabel, ylabel, by_time in figures:
        if tag is None or not any(run.series.get(tag) for run in runs):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for variant in variants:
            aligned = _aligned([r for r in runs if r.variant == variant], tag)
            if aligned is None:
                continue
            steps, times, mean, low, high = aligned
            x = times if by_time else steps
            (line,) = ax.plot(x, mean, label=variant, linewidth=1.2)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if tag in (TRAIN_LOSS, GRAD_NORM):
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -------------------------------------------------------------------------------------------------------- main


def measured_under(figures: list[dict[str, Any]], timing: bool = True) -> list[str]:
    """A line on how the grid's runs were measured (commit, threads, load), from their run.json, and whether the
    wall-clock figures are left out."""
    def values(key):
        return sorted({f[key] for f in figures if f.get(key) is not None}, key=str)

    commits, threads = values("commit"), values("torch_threads")
    loads = values("load_average_1m_at_start") + values("load_average_1m_at_end")
    parts = [] if timing else ["wall-clock figures left out (--no-timing: other jobs shared the machine)"]
    if not (commits or threads or loads or parts):
        return []
    if commits:
        parts.append(f"commit {', '.join(c[:12] + ('+dirty' if c.endswith('+dirty') else '') for c in commits)}")
    if threads:
        parts.append(f"{' or '.join(map(str, threads))} torch thread(s) per run")
    if loads:
        parts.append(f"1-minute load average {min(loads):.2f}–{max(loads):.2f} at the runs' starts and ends"
                     + (" (timings compare only between runs measured under the same load)" if timing else ""))
    return [f"Measured: {'; '.join(parts)}.", ""]


def compare(variant_dirs: dict[str, Path], out: Path, goal: Goal, title: str, baseline: Optional[str] = None) -> str:
    """Read every variant's runs, write compare.md / compare.json / the plots into ``out``; return the markdown.

    ``baseline``: the variant the others are tested against (default: the first).
    """
    runs = []
    for variant, directory in variant_dirs.items():
        found = find_runs(directory, variant)
        if not found:
            raise FileNotFoundError(f"no TensorBoard event files ({EVENTS}*) and no run.json under {directory}")
        runs.extend(found)
    figures = [run_figures(run, goal) for run in runs]
    markdown, notes = table(figures, goal)
    stats = comparisons(figures, goal, baseline)
    for f in figures:
        value = f[f"final_{goal.key}"]
        if f["returncode"] in (None, 0) and value is not None and not math.isfinite(value):
            notes.append(f"{f['variant']}/{f['run']}: final {goal.metric} is {value} (diverged): counted as diverged "
                         "beside n in the statistics, not in the mean.")
    out.mkdir(parents=True, exist_ok=True)
    plots = plot(runs, out, goal.metric, goal.timing)
    text = [f"# {title}", "", *measured_under(figures, goal.timing), markdown, ""]
    if stats["comparisons"]:
        text += [statistics_table(stats, goal), ""]
    if any(f["loss_spikes"] is not None for f in figures):
        text += [f"Spikes per run (run by run, in the order above; running median of the previous {SPIKE_WINDOW} "
                 "logged values, so they count per logged step: log every step to count every step):", "",
                 spikes_table(figures), ""]
    if notes:
        text += ["Notes:", *[f"- {n}" for n in notes], ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    document = "\n".join(text) + "\n"
    (out / "compare.md").write_text(document)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version()}
    (out / "compare.json").write_text(json.dumps(
        {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
         "metric": goal.metric, "mode": goal.mode, "target": goal.target, "timing": goal.timing, "runs": figures,
         "statistics": stats},
        indent=1))
    return document


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                     epilog=STATISTICS_RULE)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a grid file's variants × seeds, then compare them", epilog=STATISTICS_RULE,
                         formatter_class=argparse.RawTextHelpFormatter)
    run.add_argument("grid", type=Path, help="grid YAML, e.g. experiments/warmup_vit.yaml")
    run.add_argument("--out", type=Path, help="output folder (default runs/experiments/<grid file name>)")
    run.add_argument("--seeds", type=int, nargs="+", help="run these seeds instead of the grid's")
    run.add_argument("--variants", nargs="+", help="run only these variants")
    run.add_argument("--rerun", action="store_true", help="run again the runs that finished before")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    logs = sub.add_parser("logs", help="compare existing TensorBoard log folders, one folder per variant",
                          epilog=STATISTICS_RULE, formatter_class=argparse.RawTextHelpFormatter)
    logs.add_argument("dirs", type=Path, nargs="+", help="one folder per variant; each event folder below it is a run")
    logs.add_argument("--names", nargs="+", help="variant names (default: the folder names)")
    logs.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder (default runs/compare)")
    for p in (run, logs):
        p.add_argument("--target-acc", type=float, help="val/acc to reach, as a fraction (overrides the grid's)")
        p.add_argument("--metric", help="logged metric to rank and plot by (default: the grid's, else val/acc)")
        p.add_argument("--mode", choices=("min", "max"), help="max (default): larger is better; min: smaller is")
        p.add_argument("--target", type=float, help="value of --metric to reach, in its units (e.g. 2.5 for val/bpb)")
        p.add_argument("--baseline", help="variant the others are tested against (default: the first variant)")
        p.add_argument("--no-timing", action="store_true",
                       help="leave out the wall-clock figures (seconds to target, throughput, wall time, the time plot):"
                            "\nfor runs measured while other jobs shared the machine")  # fmt: skip
    args = parser.parse_args(argv)
    if args.target_acc is not None and not 0 < args.target_acc <= 1:
        parser.error(f"--target-acc {args.target_acc} must be a fraction in (0, 1], e.g. 0.95")
    if args.target_acc is not None and (args.target is not None or args.metric not in (None, VAL_ACC)):
        parser.error("--target-acc is the target of --metric val/acc: with another metric, or with --target, use --target")

    if args.command == "run":
        grid = load_grid(args.grid)
        if args.seeds:
            grid.seeds = args.seeds
        if args.variants:
            unknown = set(args.variants) - {v.name for v in grid.variants}
            if unknown:
                parser.error(f"--variants {sorted(unknown)} not in {args.grid}: choose from {[v.name for v in grid.variants]}")
            grid.variants = [v for v in grid.variants if v.name in args.variants]
        _check_baseline(args, parser, [v.name for v in grid.variants])
        out = args.out or Path("runs/experiments") / args.grid.stem
        run_grid(grid, out, rerun=args.rerun, dry_run=args.dry_run)
        if args.dry_run:
            return ""
        document = compare({v.name: out / v.name for v in grid.variants}, out, _goal(args, parser, grid.goal),
                           f"{args.grid.stem} ({args.grid})", args.baseline)
    else:
        names = args.names or [d.name for d in args.dirs]
        if len(names) != len(args.dirs) or len(set(names)) != len(names):
            parser.error(f"--names {names} must give one distinct name per folder ({len(args.dirs)} folders)")
        for d in args.dirs:
            if not d.is_dir():
                parser.error(f"{d} is not a folder")
        _check_baseline(args, parser, names)
        document = compare(dict(zip(names, args.dirs)), args.out, _goal(args, parser, Goal()), "Comparison",
                           args.baseline)
        out = args.out
    print(document)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'} and the PNG plots in {out}")
    return document


def _check_baseline(args: argparse.Namespace, parser: argparse.ArgumentParser, variants: list[str]) -> None:
    if args.baseline is not None and args.baseline not in variants:
        parser.error(f"--baseline {args.baseline!r} is not among the variants compared: choose one of {variants}")


def _goal(args: argparse.Namespace, parser: argparse.ArgumentParser, default: Goal) -> Goal:
    """The command line's --metric / --mode / --target(-acc) over the grid's (or the default) goal."""
    metric = args.metric or default.metric
    mode = args.mode or (default.mode if metric == default.metric else "max")
    if args.mode is None and mode == "max" and any(word in metric.rsplit("/", 1)[-1] for word in LOWER_IS_BETTER):
        parser.error(f"--metric {metric}: smaller is better for it, but --mode defaults to max; pass --mode min "
                     "(or --mode max if you really rank by its largest value)")
    target = args.target if args.target is not None else args.target_acc
    if target is None and metric == default.metric:
        target = default.target
    return Goal(metric, mode, target, timing=not args.no_timing)


if __name__ == "__main__":
    main()
