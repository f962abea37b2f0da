"""Accuracy, wall time and time to pass the SVM of both recipes' default commands on digits, over seeds.

    python benchmarks/digits_accuracy.py                      # 3 seeds × {resnet, vit} + SVC, in this process
    python benchmarks/digits_accuracy.py --cli --seeds 0 1 2 3 4   # each run a fresh `python recipes/<r>.py fit`
    python benchmarks/digits_accuracy.py --seeds 0 --recipes vit --json /tmp/vit.json -- --trainer.max_epochs 5
    python benchmarks/digits_accuracy.py --recipes vit --json /tmp/candidate.json -- --config candidate.yaml

Each run is the recipe's default `fit` (what a user gets with no arguments) with only the seed, the output
folder and the progress bar changed; anything after `--` is passed to every run (a `--config` there replaces the
recipe's default config, as on the command line). The accuracy reported is
that of the *final* weights on the 360 held-out images. Digits has no third split, so picking the best
epoch by that accuracy would be selecting on the test set; we don't.

Per run: the final accuracy; the wall time (in-process: the `fit` call, data set-up, sanity check and checkpoints
included; with `--cli`: the whole command, interpreter start and imports included, as a user times it); and the
time to pass the SVM: from the same start to the end of the first validation whose logged `val/acc` is above the
SVC's (read from the run's TensorBoard events, which carry each value's wall-clock time; the defaults validate
after every epoch). Summary per recipe: mean ± sample std, min and max, whether every seed is above the SVC, the
median times. Writes benchmarks/results/digits_accuracy.json (date, machine, versions, commit, torch threads,
load average at the start and end) unless --json says where.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import lightning
import torch

from report import RESULTS, machine, quiet_lightning

from lightning_recipes.recipes.common import run_cli
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"resnet": (ResNetClassifier, "resnet_digits.yaml"), "vit": (ViTClassifier, "vit_digits.yaml")}


def svc_reference() -> tuple[float, float]:
    """scikit-learn's SVC(gamma=0.001, C=10) on the same stratified split (seed 0): accuracy, seconds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    start = time.perf_counter()
    accuracy = SVC(gamma=0.001, C=10).fit(x_train, y_train).score(x_test, y_test)
    return accuracy, time.perf_counter() - start


def logged_val_acc(out_dir: Path) -> list[dict]:
    """Every ``val/acc`` the run logged, in order: epoch, optimizer step, wall-clock time (``time.time()``), value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[int, dict] = {}
    for path in sorted(out_dir.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        if "val/acc" not in tags:
            continue
        epochs = {e.step: int(e.value) for e in events.Scalars("epoch")} if "epoch" in tags else {}
        for e in events.Scalars("val/acc"):
            rows[e.step] = {"epoch": epochs.get(e.step), "step": e.step, "time": e.wall_time, "val_acc": e.value}
    return [rows[step] for step in sorted(rows)]


def time_to_pass(curve: list[dict], start: float, threshold: float) -> tuple[Optional[float], Optional[int]]:
    """Seconds from ``start`` to the first logged accuracy above ``threshold``, and that epoch; None if never."""
    for row in curve:
        if row["val_acc"] > threshold:
            return row["time"] - start, row["epoch"]
    return None, None


def _args(seed: int, out_dir: Path, extra: list[str]) -> list[str]:
    # A `--config` given after `--` goes first: the overrides below name its logger's arguments.
    configs, rest, i = [], [], 0
    while i < len(extra):
        if extra[i] in ("--config", "-c"):
            configs += extra[i : i + 2]
            i += 2
        else:
            (configs if extra[i].startswith("--config=") else rest).append(extra[i])
            i += 1
    return [
        "fit",
        *configs,
        f"--seed_everything={seed}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out_dir}",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        *rest,
    ]


def run_recipe(name: str, seed: int, extra: list[str], out_dir: Path, svc_acc: float, cli: bool = False) -> dict:
    """One default run: in this process (and re-validated), or as the command line in a fresh process (``cli``)."""
    model_class, config = RECIPES[name]
    args = _args(seed, out_dir, extra)
    start_clock, start = time.time(), time.perf_counter()
    if cli:
        subprocess.run([sys.executable, str(ROOT / "recipes" / f"{name}.py"), *args], check=True, cwd=out_dir.parent,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        seconds = time.perf_counter() - start
        curve = logged_val_acc(out_dir)
        val_acc = curve[-1]["val_acc"] if curve else float("nan")  # logged after the last epoch: the final weights
        steps = curve[-1]["step"] if curve else None
    else:
        with quiet_lightning():
            result = run_cli(model_class, config, args=args)
        seconds = time.perf_counter() - start
        curve = logged_val_acc(out_dir)
        # Re-evaluate the final weights explicitly (not the best checkpoint) so the figure is unambiguous.
        with quiet_lightning():
            (metrics,) = result.trainer.validate(result.model, datamodule=result.datamodule, verbose=False)
        val_acc, steps = metrics["val/acc"], result.trainer.global_step
    to_svm, epoch_to_svm = time_to_pass(curve, start_clock, svc_acc)
    return {
        "recipe": name,
        "seed": seed,
        "val_acc": val_acc,
        "seconds": round(seconds, 2),
        "seconds_to_svm": None if to_svm is None else round(to_svm, 2),
        "epoch_to_svm": epoch_to_svm,
        "optimizer_steps": steps,
        "val_acc_per_epoch": [round(row["val_acc"], 5) for row in curve],
    }


def summary(runs: list[dict], svc_acc: float) -> dict:
    """Mean ± sample std, min, max of the accuracy; whether every seed beats the SVC; median times."""
    accs = [r["val_acc"] for r in runs]
    to_svm = [r["seconds_to_svm"] for r in runs]
    return {
        "runs": len(runs),
        "val_acc_mean": statistics.mean(accs),
        "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "val_acc_min": min(accs),
        "val_acc_max": max(accs),
        "every_seed_above_svm": all(a > svc_acc for a in accs),
        "seconds_median": statistics.median(r["seconds"] for r in runs),
        "seconds_max": max(r["seconds"] for r in runs),
        # A run that never passes counts as slower than every run that did; None (JSON null) stands for never.
        "seconds_to_svm_median": _finite(statistics.median(math.inf if t is None else t for t in to_svm)),
        "seconds_to_svm_max": _finite(max(math.inf if t is None else t for t in to_svm)),
    }


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _seconds(value: Optional[float]) -> str:
    return "never" if value is None else f"{value:.1f}"


def _commit() -> Optional[str]:
    """HEAD, marked when what the runs execute (the package, the benchmarks, pyproject.toml) has uncommitted changes:
    an edit to README or a test while the benchmark runs does not change its figures."""
    code = ["recipes", "callbacks", "datamodules", "benchmarks/*.py", "pyproject.toml"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def table(summaries: dict[str, dict], svc_acc: float, svc_seconds: float, time_label: str) -> str:
    lines = [
        f"| recipe | val acc % (mean ± std) | min / max % | every seed > SVC | {time_label} s (median / max) "
        "| s to pass the SVC (median / max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} ({s['runs']} seeds) | {100 * s['val_acc_mean']:.2f} ± {100 * s['val_acc_std']:.2f} | "
            f"{100 * s['val_acc_min']:.2f} / {100 * s['val_acc_max']:.2f} | "
            f"{'yes' if s['every_seed_above_svm'] else '**no**'} | "
            f"{s['seconds_median']:.1f} / {s['seconds_max']:.1f} | "
            f"{_seconds(s['seconds_to_svm_median'])} / {_seconds(s['seconds_to_svm_max'])} |"
        )
    lines.append(f"| SVC(gamma=0.001, C=10), same split | {100 * svc_acc:.2f} | – | – | {svc_seconds:.2f} | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--cli", action="store_true", help="run each seed as the recipe's command in a fresh process")
    parser.add_argument("--json", type=Path, default=RESULTS / "digits_accuracy.json", help="where to write the runs")
    args = parser.parse_args(argv)

    load_at_start = os.getloadavg()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    svc_acc, svc_seconds = svc_reference()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            for seed in args.seeds:
                out_dir = Path(tmp) / f"{name}_{seed}"
                runs.append(run_recipe(name, seed, extra, out_dir, svc_acc, cli=args.cli))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "val_acc_per_epoch"}), flush=True)

    summaries = {name: summary([r for r in runs if r["recipe"] == name], svc_acc) for name in args.recipes}
    time_label = "command wall time" if args.cli else "fit wall time"
    print()
    print(table(summaries, svc_acc, svc_seconds, time_label))
    info = {
        "benchmark": "digits_accuracy",
        "command": " ".join(["python benchmarks/digits_accuracy.py", *argv, *(["--", *extra] if extra else [])]),
        "date": date,
        "machine": {**machine(), "load_average_1m_5m_15m_at_start": list(load_at_start),
                    "load_average_1m_5m_15m_at_end": list(os.getloadavg())},  # fmt: skip
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": lightning.__version__},  # fmt: skip
        "commit": _commit(),
        "mode": "cli" if args.cli else "in-process",
        "extra_args": extra,
        "svc": {"val_acc": svc_acc, "seconds": svc_seconds},
        "summary": summaries,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
