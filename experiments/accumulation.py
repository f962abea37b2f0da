"""Gradient accumulation vs one large batch: k micro-batches of B against one batch of kB, LayerNorm vs BatchNorm.

    python experiments/accumulation.py            # about a minute on 2 CPU cores
    python experiments/accumulation.py --help     # the size options

Claim (000_7dba73f58e4c82a3.txt, 002_228528335da7dbf2.txt): k accumulated micro-batches equal one batch k times
larger up to float rounding (addition is not associative: "1e-6 to 1e-8"), except with BatchNorm, which normalises
over the micro-batch. ``GradientAccumulation(global_batch_size=k*B)`` on batches of B vs plain batches of kB, same
seed, the same samples in the same order (checked), no augmentation, no dropout, N steps of the recipe's optimizer
at its peak LR. Reports the gradient difference at the first step (same weights: only the arithmetic differs), the
weight difference after every step and the BatchNorm running statistics, for the ViT with the patchify stem
(LayerNorm only) in float32 and float64, the ResNet with BatchNorm, and the ResNet with GroupNorm as the control
(``--variants`` adds both ResNets in float64).

Writes ``<out>/result.json``, ``<out>/accumulation.png`` and a markdown table (``_common.py`` says what is in them).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

# experiments/ is not a package: `python experiments/accumulation.py` puts this folder on sys.path.
from _common import (
    add_vit_size_options,
    experiment_parser,
    flat,
    fmt,
    markdown,
    positive_int,
    pyplot,
    quiet_trainer,
    recipe_clipping,
    recipe_data,
    recipe_model,
    run_experiment,
    stepped,
    trainable_parameters,
    vit_size,
)

from lightning_recipes.callbacks import GradientAccumulation

# name: (recipe, model arguments, Trainer precision)
ACCUMULATION_VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    # conv_stem=None: the patchify stem, so the ViT has LayerNorm only (the digits config's conv stem has BatchNorm).
    "vit-fp32": ("vit", {"conv_stem": None}, "32-true"),
    "vit-fp64": ("vit", {"conv_stem": None}, "64-true"),
    "resnet-bn-fp32": ("resnet", {"norm": "batch"}, "32-true"),
    "resnet-gn-fp32": ("resnet", {"norm": "group"}, "32-true"),
    "resnet-bn-fp64": ("resnet", {"norm": "batch"}, "64-true"),
    "resnet-gn-fp64": ("resnet", {"norm": "group"}, "64-true"),
}
DEFAULT_ACCUMULATION_VARIANTS = ["vit-fp32", "vit-fp64", "resnet-bn-fp32", "resnet-gn-fp32"]


class _StepTrace(Callback):
    """What one run saw and where its weights went, step by step; compared live against a ``reference`` trace.

    The reference (large-batch) run keeps a copy of the weights after every optimizer step; the accumulated run
    keeps only the differences, so memory holds one run's trajectory.
    """

    def __init__(self, reference: Optional[_StepTrace] = None) -> None:
        self.reference = reference
        self.images: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.first_gradient: Optional[torch.Tensor] = None
        self.weights: list[torch.Tensor] = []
        self.max_abs_diff: list[float] = []
        self.relative_diff: list[float] = []
        self.buffers: dict[str, torch.Tensor] = {}
        self._steps = 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images, targets = batch
        self.images.append(images.detach().clone())
        self.targets.append(targets.detach().clone())

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step == 0:  # the same weights in both runs: only the gradient's arithmetic differs
            self.first_gradient = flat([p.grad for p in trainable_parameters(pl_module)]).clone()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not stepped(trainer, self._steps):
            return
        self._steps = trainer.global_step
        weights = flat(trainable_parameters(pl_module))
        if self.reference is None:
            self.weights.append(weights)
            return
        other = self.reference.weights[self._steps - 1]
        diff = weights.double() - other.double()  # exact for these nearby values
        self.max_abs_diff.append(diff.abs().max().item())
        self.relative_diff.append((diff.norm() / other.double().norm()).item())

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # BatchNorm running statistics (num_batches_tracked is an integer count, left out).
        self.buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers() if b.is_floating_point()}


def _accumulation_run(
    variant: str, args: argparse.Namespace, *, accumulate: bool, reference: Optional[_StepTrace] = None
) -> tuple[_StepTrace, float]:
    recipe, overrides, precision = ACCUMULATION_VARIANTS[variant]
    L.seed_everything(args.seed, verbose=False)  # the same initial weights and the same shuffled order in both runs
    size = vit_size(args.vit_depth, args.vit_width) if recipe == "vit" else {}
    dropout = {"dropout": 0.0, "attention_dropout": 0.0} if recipe == "vit" else {}
    model = recipe_model(recipe, **overrides, **size, **dropout)
    # No augmentation: the random affine draws from the global RNG per sample, and Lightning prefetches one batch
    # ahead, so its draws would interleave differently with batches of B than with batches of kB.
    data = recipe_data(recipe, batch_size=args.micro_batch if accumulate else args.micro_batch * args.k, augment=False)
    trace = _StepTrace(reference)
    callbacks: list[Callback] = [trace]
    if accumulate:
        callbacks.append(GradientAccumulation(global_batch_size=args.micro_batch * args.k))
    # The recipe's optimizer at its peak LR (no LRSchedule: its warmup starts at LR 0, a step that moves nothing)
    # and the config's clipping, applied to the accumulated gradient in the one run and the large one in the other.
    trainer = quiet_trainer(
        max_steps=args.steps, precision=precision, limit_val_batches=0, callbacks=callbacks, **recipe_clipping(recipe)
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return trace, time.perf_counter() - start


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max |a - b| and ||a - b|| / ||b||, in float64."""
    diff = a.double() - b.double()
    return diff.abs().max().item(), (diff.norm() / b.double().norm()).item()


def _with_relative(value: Optional[float], other: Optional[float]) -> Optional[str]:
    return None if value is None else f"{fmt(value)} ({fmt(other)})"


def accumulation(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for variant in args.variants:
        recipe, overrides, precision = ACCUMULATION_VARIANTS[variant]
        large, large_s = _accumulation_run(variant, args, accumulate=False)
        accumulated, accumulated_s = _accumulation_run(variant, args, accumulate=True, reference=large)
        # The premise: k consecutive micro-batches are exactly the chunks of one large batch, step by step.
        same = torch.equal(torch.cat(accumulated.images), torch.cat(large.images)) and torch.equal(
            torch.cat(accumulated.targets), torch.cat(large.targets)
        )
        if not same or len(accumulated.images) != args.k * len(large.images):
            raise RuntimeError(f"{variant}: the accumulated run did not see the large batches' samples in order")
        assert accumulated.first_gradient is not None and large.first_gradient is not None
        grad_max, grad_rel = _difference(accumulated.first_gradient, large.first_gradient)
        norms = [n for n in large.buffers if n.endswith(("running_mean", "running_var"))]
        running = None
        if norms:
            running = _difference(
                flat([accumulated.buffers[n] for n in norms]), flat([large.buffers[n] for n in norms])
            )
        results.append(
            {
                "variant": variant,
                "recipe": recipe,
                "model_arguments": overrides,
                "precision": precision,
                "parameters": int(large.weights[-1].numel()),
                "same_samples_in_same_order": same,
                "gradient_step1_max_abs": large.first_gradient.double().abs().max().item(),
                "gradient_step1_max_abs_diff": grad_max,
                "gradient_step1_relative_diff": grad_rel,
                "weights_max_abs_diff_per_step": accumulated.max_abs_diff,
                "weights_relative_diff_per_step": accumulated.relative_diff,
                "weights_max_abs_diff": accumulated.max_abs_diff[-1],
                "weights_relative_diff": accumulated.relative_diff[-1],
                "batchnorm_running_stats_max_abs_diff": None if running is None else running[0],
                "batchnorm_running_stats_relative_diff": None if running is None else running[1],
                "seconds_large_batch": large_s,
                "seconds_accumulated": accumulated_s,
            }
        )
        del large, accumulated  # the reference trajectory of a ResNet is 45 MB per step
    by_name = {r["variant"]: r for r in results}
    ratios = {}
    for numerator, denominator in (
        ("resnet-bn-fp32", "vit-fp32"),
        ("resnet-bn-fp32", "resnet-gn-fp32"),
        ("vit-fp32", "vit-fp64"),
        ("resnet-bn-fp64", "resnet-gn-fp64"),
    ):
        if numerator in by_name and denominator in by_name and by_name[denominator]["weights_max_abs_diff"] > 0:
            key = f"{numerator} / {denominator}"
            ratios[key] = by_name[numerator]["weights_max_abs_diff"] / by_name[denominator]["weights_max_abs_diff"]
    plot = _plot_accumulation(results, args.out)
    headers = [
        "variant", "dtype", "max abs Δgrad, step 1 (max abs grad)", "rel. Δgrad, step 1",
        f"max abs Δw after {args.steps} steps", "‖Δw‖/‖w‖", "BN running stats: max abs Δ (rel.)",
    ]
    rows = [
        [
            r["variant"],
            "float64" if r["precision"] == "64-true" else "float32",
            _with_relative(r["gradient_step1_max_abs_diff"], r["gradient_step1_max_abs"]),
            r["gradient_step1_relative_diff"],
            r["weights_max_abs_diff"],
            r["weights_relative_diff"],
            _with_relative(r["batchnorm_running_stats_max_abs_diff"], r["batchnorm_running_stats_relative_diff"]),
        ]
        for r in results
    ]
    table = markdown(headers, rows)
    if ratios:
        table += "\n\nRatios of max |Δw|: " + "; ".join(f"{k}: {v:.3g}" for k, v in ratios.items())
    return {"variants": results, "ratios_of_max_abs_weight_diff": ratios, "plots": [plot], "table": table}


def _plot_accumulation(results: list[dict[str, Any]], out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = range(1, len(r["weights_max_abs_diff_per_step"]) + 1)
        for ax, key in zip(axes, ("weights_max_abs_diff_per_step", "weights_relative_diff_per_step")):
            y = [v if v > 0 else float("nan") for v in r[key]]  # an exact 0 has no place on a log axis
            ax.plot(x, y, marker="o", markersize=3, label=r["variant"])
    for ax, label in zip(axes, ("max |Δw|", "‖Δw‖ / ‖w‖")):
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Accumulated k×B vs one batch of kB: weight difference after each step")
    fig.tight_layout()
    path = out / "accumulation.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = experiment_parser(
        "accumulation", "Accumulated k micro-batches of B vs one batch of kB: weight differences after N steps."
    )
    p.add_argument("--steps", type=positive_int, default=20, help="optimizer steps N (default: %(default)s)")
    p.add_argument("--micro-batch", type=positive_int, default=16, help="micro batch B (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=4, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--variants", nargs="+", choices=sorted(ACCUMULATION_VARIANTS),
                   default=DEFAULT_ACCUMULATION_VARIANTS, help="models and dtypes to compare (default: %(default)s)")
    add_vit_size_options(p, None, None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; returns what it wrote to ``<out>/result.json`` (with the plots' paths)."""
    # The recipe's BatchNorm warning: measuring that effect is the point.
    return run_experiment("accumulation", _parser(), accumulation, argv,
                          expected_warnings=[r"GradientAccumulation: the model has"])


if __name__ == "__main__":
    main()
