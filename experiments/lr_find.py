"""Lightning's LR range test (``Tuner.lr_find``) for the ViT and ResNet recipes, against their default LRs.

    python experiments/lr_find.py            # about a minute on 2 CPU cores
    python experiments/lr_find.py --help     # the size options

Claim (001_3f3111d79c3bcddc.txt): Smith's LR range test, ``Tuner(trainer).lr_find``, for the ViT (AdamW) and the
ResNet (SGD) against each recipe's default LR: Lightning's suggestion (steepest descent), the steepest descent
against log LR and the lowest loss (and a tenth of it) on the smoothed curve with its bias correction fixed; the
finder's plot per recipe.

Writes ``<out>/result.json``, ``<out>/lr_find_<recipe>.png`` and a markdown table (``_common.py`` says what is in
them).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.tuner import Tuner

# experiments/ is not a package: `python experiments/lr_find.py` puts this folder on sys.path.
from _common import (
    RECIPES,
    add_vit_size_options,
    experiment_parser,
    markdown,
    positive_int,
    pyplot,
    quiet_trainer,
    recipe_clipping,
    recipe_data,
    recipe_model,
    run_experiment,
    vit_size,
)


LR_FINDER_BETA = 0.98  # Lightning 2.6's _LRCallback smoothing factor (Tuner.lr_find does not expose it)


def _debiased(smoothed: list[float]) -> list[float]:
    """Lightning's smoothed range-test losses with the EMA's bias correction applied at the right step.

    Lightning 2.6.6 (``_LRCallback.on_train_batch_end``) divides the running average by ``1 - beta^(t + 1)`` with
    ``t = trainer.global_step``, which already counts the step just taken: the first point is the first loss
    divided by 1 + beta (about half), and the early curve rises even where the raw loss is flat (the symptom of
    Lightning issue #14167). Point i (0-based) was divided by ``1 - beta^(i + 2)`` instead of ``1 - beta^(i + 1)``.
    """
    beta = LR_FINDER_BETA
    return [s * (1 - beta ** (i + 2)) / (1 - beta ** (i + 1)) for i, s in enumerate(smoothed)]


def _steepest_on_log_axis(
    lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1
) -> Optional[float]:
    """The LR of the steepest descent of ``losses`` against log10(LR), with Lightning's default skips.

    Lightning 2.6.6's ``suggestion()`` differentiates against the LR itself although the LRs are log-spaced, which
    magnifies the slope of any small dip at small LRs (Lightning issue #21141, open PR #21171).
    """
    points = [(math.log10(lr), loss) for lr, loss in zip(lrs, losses)][skip_begin:-skip_end]
    points = [(x, y) for x, y in points if math.isfinite(y)]
    if len(points) < 2:
        return None
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    return float(10 ** x[torch.gradient(y, spacing=[x])[0].argmin()])


def lr_find(args: argparse.Namespace) -> dict[str, Any]:
    plt = pyplot()
    results = []
    for recipe in args.recipes:
        L.seed_everything(args.seed, verbose=False)
        size = vit_size(args.vit_depth, args.vit_width) if recipe == "vit" else {}
        batch = {} if args.batch_size is None else {"batch_size": args.batch_size}
        model, data = recipe_model(recipe, **size), recipe_data(recipe, **batch)
        default_lr = float(model.hparams.lr)
        # No LRSchedule: it writes the LR before every step and would overwrite the finder's exponential ramp
        # (Lightning 2.6 also swaps the Trainer's callbacks for its own during the search).
        trainer = quiet_trainer(max_epochs=-1, default_root_dir=str(args.out), **recipe_clipping(recipe))
        start = time.perf_counter()
        finder = Tuner(trainer).lr_find(
            model,
            datamodule=data,
            min_lr=args.min_lr,
            max_lr=args.max_lr,
            num_training=args.num_training,
            early_stop_threshold=args.early_stop_threshold,
            update_attr=False,
        )
        seconds = time.perf_counter() - start
        assert finder is not None
        lrs, losses = list(finder.results["lr"]), list(finder.results["loss"])
        suggestion = finder.suggestion()
        corrected = _debiased(losses)
        steepest_log = _steepest_on_log_axis(lrs, corrected)
        finite = [(loss, lr) for loss, lr in zip(corrected, lrs) if math.isfinite(loss)]
        min_loss, min_loss_lr = min(finite) if finite else (float("nan"), float("nan"))
        stopped_early = len(losses) < args.num_training
        fig = finder.plot(suggest=True)
        ax = fig.axes[0]
        ax.lines[0].set_label("smoothed loss, as Lightning records it")
        ax.plot(lrs, corrected, color="C1", lw=1, label="bias corrected at the right step")
        ax.axvline(default_lr, color="green", ls="--", label=f"recipe default {default_lr:g}")
        ax.axvline(min_loss_lr / 10, color="grey", ls=":", label=f"lowest-loss LR / 10 = {min_loss_lr / 10:.2g}")
        if suggestion is not None:
            ax.plot([], [], "o", color="red", label=f"Lightning's suggestion {suggestion:.2g}")
        if steepest_log is not None:
            label = f"steepest vs log LR (corrected) {steepest_log:.2g}"
            ax.axvline(steepest_log, color="C1", ls="-.", lw=1, label=label)
        ax.set_title(f"LR range test, {recipe} ({type(model.configure_optimizers()).__name__}), {len(losses)} steps")
        ax.legend(fontsize=8)
        path = args.out / f"lr_find_{recipe}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        results.append(
            {
                "recipe": recipe,
                "optimizer": type(model.configure_optimizers()).__name__,
                "model_arguments": size,
                "default_lr": default_lr,
                "suggestion": suggestion,
                "suggestion_over_default": None if suggestion is None else suggestion / default_lr,
                "steepest_descent_vs_log_lr_corrected": steepest_log,
                "lowest_loss": min_loss,
                "lowest_loss_lr": min_loss_lr,
                "lowest_loss_lr_over_10": min_loss_lr / 10,
                "stopped_early": stopped_early,
                "last_lr": lrs[-1] if lrs else None,
                "steps": len(losses),
                "lrs": lrs,
                "smoothed_losses_lightning": losses,
                "smoothed_losses_corrected": corrected,
                "plot": path,
                "seconds": seconds,
            }
        )
    table = markdown(
        ["recipe", "optimizer", "default LR", "Lightning's suggestion", "suggestion / default",
         "steepest vs log LR (corrected)", "LR of lowest loss (corrected)", "lowest-loss LR / 10",
         "stopped (loss > 4× best) at LR", "seconds"],
        [
            [r["recipe"], r["optimizer"], r["default_lr"], r["suggestion"], r["suggestion_over_default"],
             r["steepest_descent_vs_log_lr_corrected"], r["lowest_loss_lr"], r["lowest_loss_lr_over_10"],
             r["last_lr"] if r["stopped_early"] else "not reached",
             round(r["seconds"], 1)]
            for r in results
        ],
    )
    return {"recipes": results, "plots": [r["plot"] for r in results], "table": table}


def _parser() -> argparse.ArgumentParser:
    p = experiment_parser("lr_find", "Lightning's LR range test (Tuner.lr_find) for the ViT and ResNet recipes.")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["vit", "resnet"],
                   help="recipes to test (default: %(default)s)")
    p.add_argument("--num-training", type=positive_int, default=100,
                   help="LRs tried, one optimizer step each (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="first LR (default: %(default)s)")
    p.add_argument("--max-lr", type=float, default=10.0, help="last LR (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="data batch size (default: the digits configs' 64)")
    p.add_argument("--early-stop-threshold", type=float, default=4.0,
                   help="stop once the smoothed loss exceeds this many times the best (default: %(default)s)")
    add_vit_size_options(p, None, None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; returns what it wrote to ``<out>/result.json`` (with the plots' paths)."""
    return run_experiment("lr_find", _parser(), lr_find, argv)


if __name__ == "__main__":
    main()
