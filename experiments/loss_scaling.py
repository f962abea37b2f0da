"""fp16 without loss scaling vs dynamic loss scaling: which gradients underflow to zero, and does training suffer.

    python experiments/loss_scaling.py            # about 2 minutes on 2 CPU cores
    python experiments/loss_scaling.py --help     # the size options

Claim (002_228528335da7dbf2.txt, 004_147b669fcad93baf.txt; Micikevicius et al. 2018, "Mixed precision training"):
without loss scaling, small fp16 gradients underflow to zero. On a fixed batch and the same weights, the share of
the parameter gradients and of the activation gradients (outputs of Linear / Conv2d modules, fp16 under autocast)
that are nonzero in float32 but exactly zero under fp16 autocast, unscaled and scaled by the GradScaler's scale; at
initialisation, after the first step that moves the weights, and after every epoch. Then the ViT recipe trained in
float32, in ``16-mixed`` with Lightning's dynamic GradScaler and in ``16-mixed`` with a disabled one.

The ViT is trained at depth 2, width 64 by default (``--vit-depth``, ``--vit-width``): on the project's 2-core AVX2
CPU, fp16 steps of the ViT take about 10x as long as float32 ones. Writes ``<out>/result.json``,
``<out>/loss_scaling_histogram.png``, ``<out>/loss_scaling_training.png`` and markdown tables (``_common.py`` says
what is in them).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from typing_extensions import override

# experiments/ is not a package: `python experiments/loss_scaling.py` puts this folder on sys.path.
from _common import (
    add_training_options,
    add_vit_size_options,
    experiment_parser,
    flat,
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
    trainable_parameters,
    vit_size,
)

from lightning_recipes.recipes.common import ImageClassifier

# float16: smallest positive subnormal, smallest normal, largest finite value.
FP16_SUBNORMAL, FP16_NORMAL, FP16_MAX = 2.0**-24, 2.0**-14, 65504.0
INITIAL_LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale


def _backward(
    model: ImageClassifier, images: torch.Tensor, targets: torch.Tensor, *, half: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter gradients and activation gradients of one backward of ``scale x loss``, flattened, as stored.

    Activation gradients: those of the outputs of every Linear and Conv2d module (the MLPs, the stem or patchify
    convolutions, the head). Under fp16 autocast these outputs are fp16, so their gradients are computed and held
    in fp16: where Micikevicius et al. (2018) saw small activation gradients become zero.
    """
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: captured.append(grad.detach().reshape(-1).float()))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model.zero_grad(set_to_none=True)
    try:
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            loss = model.criterion(model(images), targets)
        # As GradScaler.scale does: the float32 loss times the scale, before any fp16 gradient exists.
        (loss * scale).backward()
    finally:
        for hook in hooks:
            hook.remove()
    params = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable_parameters(model)]).float()
    return params, torch.cat(captured)


def _underflow(reference: torch.Tensor, half: torch.Tensor, scale: float) -> dict[str, Any]:
    """Entries nonzero in the float32 gradient that are exactly zero in the fp16 one (same scale x loss).

    Also, from the float32 values times ``scale``, the share that fp16 cannot hold as a normal number: below its
    smallest subnormal 2^-24 (flushed to 0, or to 2^-24), or in its subnormal range [2^-24, 2^-14) (fewer
    significant bits).
    """
    nonzero = reference != 0
    n = int(nonzero.sum())
    magnitude = reference[nonzero].abs() * scale
    return {
        "entries": int(reference.numel()),
        "nonzero_in_fp32": n,
        "share_zero_in_fp16": int((nonzero & (half == 0)).sum()) / max(n, 1),
        "nonfinite_in_fp16": int((~torch.isfinite(half)).sum()),
        "share_fp32_below_fp16_subnormal": int((magnitude < FP16_SUBNORMAL).sum()) / max(n, 1),
        "share_fp32_in_fp16_subnormal_range": int(((magnitude >= FP16_SUBNORMAL) & (magnitude < FP16_NORMAL)).sum())
        / max(n, 1),
        "share_fp32_above_fp16_max": int((magnitude > FP16_MAX).sum()) / max(n, 1),
    }


HIST_EDGES = list(range(-56, 21))  # log2 |gradient| bins, one per binade


def _log2_histogram(values: torch.Tensor) -> list[int]:
    """Counts of log2 |value| of the nonzero entries per binade of ``HIST_EDGES`` (the ends absorb the rest)."""
    logs = values[values != 0].abs().double().log2().clamp(HIST_EDGES[0], HIST_EDGES[-1] - 1e-9)
    return torch.histogram(logs, torch.tensor(HIST_EDGES, dtype=torch.float64))[0].long().tolist()


def _probe(
    model_factory: Callable[[], ImageClassifier],
    state: dict[str, torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
) -> dict[str, Any]:
    """fp32 vs fp16-autocast gradients of a copy of the weights ``state`` on fixed images, unscaled and at ``scale``."""
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training run's RNG
        model = model_factory()
    model.load_state_dict(state)
    model.train()  # BatchNorm in the conv stem normalises with the probe batch, as in training
    ref_params, ref_acts = _backward(model, images, targets, half=False, scale=1.0)
    result: dict[str, Any] = {"loss_scale": scale}
    for label, s in (("unscaled", 1.0), ("scaled", scale)):
        params, acts = _backward(model, images, targets, half=True, scale=s)
        result[label] = {
            "params": _underflow(ref_params, params, s),
            "activations": _underflow(ref_acts, acts, s),
        }
    result["fp32_log2_histogram"] = {
        "edges": HIST_EDGES,
        "params": _log2_histogram(ref_params),
        "activations": _log2_histogram(ref_acts),
    }
    return result


class _LossScalingMonitor(Callback):
    """Per epoch: validation metrics, the GradScaler's scale and skipped steps, and an underflow probe."""

    def __init__(self, probe: Callable[[L.LightningModule, float], dict[str, Any]]) -> None:
        self.probe = probe
        self.epochs: list[dict[str, Any]] = []
        self.skipped = 0
        self.nonfinite_losses = 0
        self.after_first_step: Optional[dict[str, Any]] = None
        self._moved = False
        self._scale_before = 0.0

    @staticmethod
    def _scaler(trainer: L.Trainer) -> Optional[torch.amp.GradScaler]:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        scaler = self._scaler(trainer)
        self._scale_before = scaler.get_scale() if scaler is not None else 0.0

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        scaler = self._scaler(trainer)
        scale = scaler.get_scale() if scaler is not None else None
        if scale is not None and scale < self._scale_before:
            self.skipped += 1  # the scaler found inf/NaN gradients, skipped optimizer.step and halved its scale
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            self.nonfinite_losses += 1
        if self._moved and self.after_first_step is None:
            # torchvision's ViT starts with a zero head, so at initialisation only the head has a gradient; the
            # rest of the network gets one from the first step that moves the weights (the warmup's first has LR 0).
            self.after_first_step = self.probe(pl_module, scale if scale is not None else INITIAL_LOSS_SCALE)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._moved = self._moved or any(group["lr"] > 0 for group in optimizer.param_groups)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        scaler = self._scaler(trainer)
        scale = scaler.get_scale() if scaler is not None else None
        self.epochs.append(
            {
                "epoch": trainer.current_epoch,
                "steps": trainer.global_step,
                "train_loss_last_step": float(metrics["train/loss"]) if "train/loss" in metrics else None,
                "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else None,
                "val_acc": float(metrics["val/acc"]) if "val/acc" in metrics else None,
                "loss_scale": scale,
                "skipped_steps_so_far": self.skipped,
                "nonfinite_losses_so_far": self.nonfinite_losses,
                # A run without a scaler is probed at the scale a GradScaler would start from.
                "probe": self.probe(pl_module, scale if scale is not None else INITIAL_LOSS_SCALE),
            }
        )


def loss_scaling(args: argparse.Namespace) -> dict[str, Any]:
    size = vit_size(args.vit_depth, args.vit_width)

    def factory() -> ImageClassifier:
        return recipe_model("vit", **size)

    probe_data = recipe_data("vit", augment=False)
    probe_data.setup("fit")
    samples = [probe_data.train_set[i] for i in range(args.probe_size)]  # type: ignore[index]
    images = torch.stack([image for image, _ in samples])
    targets = torch.tensor([target for _, target in samples])

    def probe(module: L.LightningModule, scale: float) -> dict[str, Any]:
        return _probe(factory, module.state_dict(), images, targets, scale)

    L.seed_everything(args.seed, verbose=False)
    initial = _probe(factory, factory().state_dict(), images, targets, INITIAL_LOSS_SCALE)

    runs = {}
    for name, scaler in (
        ("fp32", None),
        ("fp16, dynamic loss scaling", torch.amp.GradScaler("cpu")),
        # Lightning refuses scaler=None for 16-mixed (it builds a default one): a disabled scaler scales by 1 and
        # steps the optimizer unconditionally, i.e. plain fp16 autocast training.
        ("fp16, no loss scaling", torch.amp.GradScaler("cpu", enabled=False)),
    ):
        L.seed_everything(args.seed, verbose=False)
        model, data = factory(), recipe_data("vit")
        monitor = _LossScalingMonitor(probe)
        precision: dict[str, Any] = (
            {"precision": "32-true"} if scaler is None else {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}
        )
        trainer = quiet_trainer(
            max_epochs=args.epochs,
            callbacks=[recipe_lr_schedule("vit"), monitor],
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            **precision,
            **recipe_clipping("vit"),
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        runs[name] = {
            "precision": "32-true" if scaler is None else "16-mixed",
            "loss_scaling": None if scaler is None else scaler.is_enabled(),
            "optimizer_steps": trainer.global_step,
            "skipped_steps": monitor.skipped,
            "nonfinite_losses": monitor.nonfinite_losses,
            "final_loss_scale": monitor.epochs[-1]["loss_scale"],
            "after_first_step": monitor.after_first_step,
            "epochs": monitor.epochs,
            "seconds": time.perf_counter() - start,
        }
    scaled_run = runs["fp16, dynamic loss scaling"]
    epochs = scaled_run["epochs"]
    curves = [("after the first step with LR > 0", scaled_run["after_first_step"])]
    curves += [(f"after epoch {e['epoch'] + 1}", e["probe"]) for e in epochs[:1] + epochs[1:][-1:]]
    plots = [
        _plot_loss_scaling_histogram([(label, p) for label, p in curves if p is not None], args.out),
        plot_training(runs, args.out, "loss_scaling_training.png"),
    ]

    probed = [("initial weights", initial)]
    for name, run in runs.items():
        epochs = run["epochs"]
        probed.append((f"{name}, after its first step with LR > 0", run["after_first_step"]))
        probed += [(f"{name}, after epoch {e['epoch'] + 1}", e["probe"]) for e in (epochs[:1] + epochs[1:][-1:])]
    probe_rows = []
    for label, p in probed:
        if p is None:
            continue
        unscaled, scaled = p["unscaled"], p["scaled"]
        probe_rows.append(
            [
                label,
                unscaled["activations"]["nonzero_in_fp32"],
                pct(unscaled["activations"]["share_fp32_in_fp16_subnormal_range"]),
                pct(unscaled["activations"]["share_zero_in_fp16"]),
                pct(unscaled["params"]["share_zero_in_fp16"]),
                f"2^{math.log2(p['loss_scale']):.0f}",
                pct(scaled["activations"]["share_zero_in_fp16"]),
                pct(scaled["params"]["share_zero_in_fp16"]),
                scaled["params"]["nonfinite_in_fp16"] + scaled["activations"]["nonfinite_in_fp16"],
            ]
        )
    probe_table = markdown(
        [
            "weights (probe: same images, fp32 vs fp16 autocast)", "act. grads ≠ 0 in fp32",
            "of those in fp16 subnormal range", "act. → 0 in fp16, unscaled", "param → 0, unscaled", "scale",
            "act. → 0, scaled", "param → 0, scaled", "inf/NaN, scaled",
        ],
        probe_rows,
    )
    training_table = markdown(
        ["run", "epochs", "val acc", "val loss", "skipped steps", "final loss scale", "non-finite losses", "seconds"],
        [
            [
                name, len(r["epochs"]), r["epochs"][-1]["val_acc"], r["epochs"][-1]["val_loss"],
                r["skipped_steps"] if r["loss_scaling"] else None,
                None if r["final_loss_scale"] is None else f"2^{math.log2(r['final_loss_scale']):.0f}",
                r["nonfinite_losses"], round(r["seconds"], 1),
            ]
            for name, r in runs.items()
        ],
    )
    return {
        "model_arguments": size,
        "probe_images": args.probe_size,
        "initial_probe": initial,
        "runs": runs,
        "plots": plots,
        "table": probe_table + "\n\n" + training_table,
    }


def _plot_loss_scaling_histogram(probes: list[tuple[str, dict[str, Any]]], out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    edges = HIST_EDGES
    centers = [e + 0.5 for e in edges[:-1]]
    scale = probes[-1][1]["loss_scale"]
    for ax, kind, title in zip(axes, ("activations", "params"), ("activation gradients", "parameter gradients")):
        for label, probe in probes:
            counts = probe["fp32_log2_histogram"][kind]
            total = max(sum(counts), 1)
            ax.step(centers, [c / total for c in counts], where="mid", label=label)
        ax.axvline(math.log2(FP16_SUBNORMAL), color="red", lw=1, label="fp16 smallest subnormal 2^-24")
        ax.axvline(math.log2(FP16_NORMAL), color="orange", lw=1, label="fp16 smallest normal 2^-14")
        ax.axvline(math.log2(FP16_MAX), color="black", lw=1, label="fp16 largest 65504")
        ax.axvline(math.log2(FP16_SUBNORMAL / scale), color="red", ls="--", lw=1,
                   label=f"2^-24 / loss scale 2^{math.log2(scale):.0f}: smallest kept when scaled")
        ax.set_xlim(-45, 20)
        ax.set_xlabel("log2 |gradient| (float32 reference, unscaled)")
        ax.set_ylabel("share of nonzero entries")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle("Gradient magnitudes vs the fp16 range (probe batch; weights of the fp16 run with dynamic scaling)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / "loss_scaling_histogram.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = experiment_parser(
        "loss_scaling", "fp16 gradient underflow with and without loss scaling, and fp16 training with each."
    )
    add_training_options(p, epochs=10)
    p.add_argument("--probe-size", type=positive_int, default=64,
                   help="training images (unaugmented) in the underflow probe batch (default: %(default)s)")
    add_vit_size_options(p, 2, 64)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the experiment; returns what it wrote to ``<out>/result.json`` (with the plots' paths)."""
    return run_experiment("loss_scaling", _parser(), loss_scaling, argv)


if __name__ == "__main__":
    main()
