"""FP32 master weights: small updates lost in fp16 / bf16 and kept in fp32, and bf16-true vs bf16-mixed training.

    python experiments/master_weights.py            # about 2 minutes on 2 CPU cores
    python experiments/master_weights.py --help     # the size options

Claim (000_7dba73f58e4c82a3.txt, 001_3f3111d79c3bcddc.txt): 1e-6 added 1,000 times to a float16 or bfloat16
parameter at 1.0 is lost (it is below half the spacing there), while float32 keeps it; the same at smaller
magnitudes, and with a float32 master copy. Then the ViT recipe in ``bf16-true`` (weights and AdamW state in
bfloat16) vs ``bf16-mixed`` (float32 master weights) vs ``32-true``, with the share of weights whose AdamW step does
not change their bfloat16 value.

The ViT is trained at depth 2, width 64 by default (``--vit-depth``, ``--vit-width``): on the project's 2-core AVX2
CPU, bf16 steps of the ViT take about 10x as long as float32 ones. Writes ``<out>/result.json``,
``<out>/master_weights.png``, ``<out>/master_weights_training.png`` and markdown tables (``_common.py`` says what is
in them).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

# experiments/ is not a package: `python experiments/master_weights.py` puts this folder on sys.path.
from _common import (
    add_training_options,
    add_vit_size_options,
    experiment_parser,
    markdown,
    pct,
    plot_training,
    positive_int,
    pyplot,
    quiet_trainer,
    recipe_clipping,
    recipe_data,
    recipe_lr_schedule,
    recipe_model,
    run_experiment,
    stepped,
    trainable_parameters,
    vit_size,
)


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _spacing(value: float, dtype: torch.dtype) -> float:
    """The gap between ``value`` (as stored in ``dtype``) and the next larger number of ``dtype``."""
    info = torch.finfo(dtype)
    stored = abs(torch.tensor(value, dtype=dtype).item())
    if stored < info.smallest_normal:
        return info.smallest_normal * info.eps  # subnormals are evenly spaced
    return 2.0 ** math.floor(math.log2(stored)) * info.eps


def _repeat_update(start: float, update: float, n: int, dtype: torch.dtype, master: bool) -> list[float]:
    """The parameter after each of ``n`` additions of ``update``, as an optimizer step computes it in ``dtype``.

    ``master=True``: mixed precision's scheme, the sum kept in float32 and the ``dtype`` parameter its rounded copy.
    """
    work = torch.float32 if master else dtype
    param = torch.tensor(start, dtype=work)
    step = torch.tensor(update, dtype=work)  # the update itself is rounded to the working dtype too
    values = []
    for _ in range(n):
        param.add_(step)
        values.append(param.to(dtype).item())
    return values


def _lost_updates_shares(before: list[torch.Tensor], after: list[torch.Tensor]) -> dict[str, float]:
    """Share of entries whose bfloat16 value the step left unchanged: all, matrices (>= 2 dims) and vectors."""
    counts = {"all": [0, 0], "matrices": [0, 0], "vectors": [0, 0]}
    for b, a in zip(before, after):
        same = int((b.to(torch.bfloat16) == a.to(torch.bfloat16)).sum())
        for key in ("all", "matrices" if b.ndim >= 2 else "vectors"):
            counts[key][0] += same
            counts[key][1] += b.numel()
    return {k: same / max(total, 1) for k, (same, total) in counts.items()}


class _LostUpdates(Callback):
    """Per optimizer step, the share of parameter entries whose AdamW update leaves their bfloat16 value unchanged.

    Under ``bf16-true`` that is the update lost (the weights are bfloat16); under ``bf16-mixed`` / ``32-true`` it is
    the update a bfloat16 copy would have lost, which the float32 weights keep.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._before: list[torch.Tensor] = []
        self._seen = 0

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._before = [p.detach().clone() for p in trainable_parameters(pl_module)]

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not stepped(trainer, self._seen) or not self._before:
            return
        self._seen = trainer.global_step
        after = [p.detach() for p in trainable_parameters(pl_module)]
        shares = _lost_updates_shares(self._before, after)
        moved = sum(int((b != a).sum()) for b, a in zip(self._before, after)) / sum(b.numel() for b in self._before)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.steps.append({"epoch": trainer.current_epoch, "lr": lr, "moved": moved, **shares})
        self._before = []

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        steps = [s for s in self.steps if s["epoch"] == trainer.current_epoch]
        mean = {k: sum(s[k] for s in steps) / max(len(steps), 1) for k in ("all", "matrices", "vectors", "moved")}
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else None,
                "val_acc": float(metrics["val/acc"]) if "val/acc" in metrics else None,
                "unchanged_in_bf16": mean,
            }
        )


def master_weights(args: argparse.Namespace) -> dict[str, Any]:
    exact = []
    trajectories: dict[tuple[float, str], list[float]] = {}
    for start in args.starts:
        for label, dtype, master in (
            ("float64", torch.float64, False),
            ("float32", torch.float32, False),
            ("float16", torch.float16, False),
            ("bfloat16", torch.bfloat16, False),
            ("float16, float32 master", torch.float16, True),
            ("bfloat16, float32 master", torch.bfloat16, True),
        ):
            values = _repeat_update(start, args.update, args.updates, dtype, master)
            stored = torch.tensor(start, dtype=dtype).item()
            trajectories[(start, label)] = values
            exact.append(
                {
                    "start": start,
                    "dtype": label,
                    "start_as_stored": stored,
                    "spacing_at_start": _spacing(start, dtype),
                    "first_update_survives": values[0] != stored,
                    "value_after": {str(n): values[n - 1] for n in (1, 10, 100, args.updates) if n <= args.updates},
                    "final": values[-1],
                    "exact_sum": start + args.updates * args.update,
                    "share_of_total_update_kept": (values[-1] - stored) / (args.updates * args.update),
                }
            )

    runs = {}
    size = vit_size(args.vit_depth, args.vit_width)
    for precision in args.precisions:
        L.seed_everything(args.seed, verbose=False)
        model, data = recipe_model("vit", **size), recipe_data("vit")
        lost = _LostUpdates()
        trainer = quiet_trainer(
            max_epochs=args.epochs,
            precision=precision,
            callbacks=[recipe_lr_schedule("vit"), lost],
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            **recipe_clipping("vit"),
        )
        start_time = time.perf_counter()
        trainer.fit(model, datamodule=data)
        steps = lost.steps
        runs[precision] = {
            "optimizer_steps": trainer.global_step,
            "parameter_dtype": str(next(model.parameters()).dtype),
            "epochs": lost.epochs,
            "unchanged_in_bf16_mean_over_steps": {
                k: sum(s[k] for s in steps) / max(len(steps), 1) for k in ("all", "matrices", "vectors", "moved")
            },
            "seconds": time.perf_counter() - start_time,
        }
    plots = [_plot_master_weights(trajectories, args), plot_training(runs, args.out, "master_weights_training.png")]
    exact_table = markdown(
        ["start", "dtype", "spacing at start", "one update changes it", f"after {args.updates} updates",
         "exact", "abs error", "share of the total update kept"],
        [
            [r["start"], r["dtype"], r["spacing_at_start"], r["first_update_survives"], f"{r['final']:.9g}",
             f"{r['exact_sum']:.9g}", abs(r["final"] - r["exact_sum"]), r["share_of_total_update_kept"]]
            for r in exact
        ],
    )
    training_table = markdown(
        ["precision", "weights", "val acc", "val loss", "entries unchanged in bf16 per step: all (matrices / vectors)",
         "last epoch", "entries moved per step", "seconds"],
        [
            [
                p, r["parameter_dtype"].replace("torch.", ""), r["epochs"][-1]["val_acc"], r["epochs"][-1]["val_loss"],
                f"{pct(r['unchanged_in_bf16_mean_over_steps']['all'])} "
                f"({pct(r['unchanged_in_bf16_mean_over_steps']['matrices'])} / "
                f"{pct(r['unchanged_in_bf16_mean_over_steps']['vectors'])})",
                pct(r["epochs"][-1]["unchanged_in_bf16"]["all"]),
                pct(r["unchanged_in_bf16_mean_over_steps"]["moved"]),
                round(r["seconds"], 1),
            ]
            for p, r in runs.items()
        ],
    )
    exact_table += (
        "\n\nMaster rows: the float32 sum is the float32 row; the 16-bit copy the model computes with is that sum"
        " rounded, so it moves whenever the sum crosses half a spacing."
    )
    return {
        "update": args.update,
        "updates": args.updates,
        "exact": exact,
        "model_arguments": size,
        "runs": runs,
        "plots": plots,
        "table": exact_table + "\n\n" + training_table,
    }


def _plot_master_weights(trajectories: dict[tuple[float, str], list[float]], args: argparse.Namespace) -> Path:
    plt = pyplot()
    starts = list(args.starts)
    columns = min(3, len(starts))
    rows = math.ceil(len(starts) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(starts):]:
        ax.set_visible(False)
    n = range(1, args.updates + 1)
    for ax, start in zip(axes.flat, starts):
        ax.plot(n, [k * args.update for k in n], color="grey", ls=":", lw=2, label="exact")
        for (s, label), values in trajectories.items():
            if s != start:
                continue
            stored = torch.tensor(start, dtype=DTYPES[label.split(",")[0]]).item()
            ax.plot(n, [v - stored for v in values], label=label, lw=1.2)
        ax.set_title(f"start {start:g}")
        ax.set_xlabel("updates of +%g" % args.update)
        ax.set_ylabel("parameter − start")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"+{args.update:g} applied {args.updates} times, in each dtype (master: float32 sum, rounded copy)")
    fig.tight_layout()
    path = args.out / "master_weights.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = experiment_parser("master_weights", "Small updates in fp32/fp16/bf16, and bf16-true vs bf16-mixed training.")
    p.add_argument("--update", type=float, default=1e-6, help="the repeated update (default: %(default)s)")
    p.add_argument("--updates", type=positive_int, default=1000, help="how many times (default: %(default)s)")
    p.add_argument("--starts", type=float, nargs="+", default=[1.0, 0.1, 0.01, 1e-3, 1e-4],
                   help="starting parameter values (default: %(default)s)")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed", "bf16-true"],
                   choices=["32-true", "bf16-mixed", "bf16-true"],
                   help="Trainer precisions to train (default: %(default)s)")
    add_training_options(p, epochs=10)
    add_vit_size_options(p, 2, 64)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; returns what it wrote to ``<out>/result.json`` (with the plots' paths)."""
    # The recipe's bf16-true warning: measuring that effect is the point.
    return run_experiment("master_weights", _parser(), master_weights, argv,
                          expected_warnings=[r"precision='bf16-true' keeps"])


if __name__ == "__main__":
    main()
