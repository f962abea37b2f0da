"""Accuracy and wall time of both recipes' default commands on digits, over seeds, against the SVC reference.

    python benchmarks/digits_accuracy.py                      # 3 seeds × {resnet, vit} + SVC, prints a table
    python benchmarks/digits_accuracy.py --seeds 0 --recipes vit -- --trainer.max_epochs 5

Each run is the recipe's default `fit` (what a user gets with no arguments) with only the seed, the output
folder and the progress bar changed; anything after `--` is passed to every run. The accuracy reported is
that of the *final* weights on the 360 held-out images. Digits has no third split, so picking the best
epoch by that accuracy would be selecting on the test set; we don't.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning
import torch

from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.common import run_cli
from lightning_recipes.recipes.vit import ViTClassifier

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


def run_recipe(name: str, seed: int, extra: list[str], out_dir: Path) -> dict:
    model_class, config = RECIPES[name]
    args = [
        "fit",
        f"--seed_everything={seed}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out_dir}",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        *extra,
    ]
    start = time.perf_counter()
    cli = run_cli(model_class, config, args=args)
    seconds = time.perf_counter() - start
    # Re-evaluate the final weights explicitly (not the best checkpoint) so the figure is unambiguous.
    (result,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return {"recipe": name, "seed": seed, "val_acc": result["val/acc"], "seconds": seconds}


def summarize(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--json", type=Path, default=None, help="also write the runs and machine info here")
    args = parser.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            for seed in args.seeds:
                runs.append(run_recipe(name, seed, extra, Path(tmp) / f"{name}_{seed}"))
                print(json.dumps(runs[-1]), flush=True)
    svc_acc, svc_seconds = svc_reference()

    print(f"\n| recipe | val acc % (mean ± std, {len(args.seeds)} seeds) | min–max % | wall time s (median) |")
    print("|---|---|---|---|")
    for name in args.recipes:
        accs = [r["val_acc"] for r in runs if r["recipe"] == name]
        secs = [r["seconds"] for r in runs if r["recipe"] == name]
        print(
            f"| {name} | {summarize(accs)} | {100 * min(accs):.2f}–{100 * max(accs):.2f} | "
            f"{statistics.median(secs):.0f} |"
        )
    print(f"| SVC(gamma=0.001, C=10) reference | {100 * svc_acc:.2f} | – | {svc_seconds:.1f} |")

    if args.json is not None:
        info = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "extra_args": extra,
            "runs": runs,
            "svc": {"val_acc": svc_acc, "seconds": svc_seconds},
        }
        args.json.write_text(json.dumps(info, indent=2))
    return runs


if __name__ == "__main__":
    main()
