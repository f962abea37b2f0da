"""Experiments that measure four training-technique claims on the embedded digits, one command each (issue #7).

    python recipes/experiments.py accumulation     # k micro-batches of B vs one batch of kB: LayerNorm vs BatchNorm
    python recipes/experiments.py loss_scaling     # fp16 gradients that underflow to zero, without and with scaling
    python recipes/experiments.py master_weights   # 1e-6 added 1,000 times in fp32/fp16/bf16; bf16-true vs bf16-mixed
    python recipes/experiments.py lr_find          # Lightning's LR range test for both recipes
    python recipes/experiments.py <name> --help    # the size options of one experiment

Each one builds the real recipes (``recipes/vit.py``, ``recipes/resnet.py``) from their digits configs (model, data
at ``image_size=16``, clipping, ``LRSchedule``) and trains them with the repository's callbacks in a Lightning
``Trainer`` in this process. It writes ``<out>/result.json`` (machine, versions, UTC date, seed, arguments, every
number) and PNG plots into ``<out>`` (default ``runs/experiments/<name>``), and prints markdown tables. The defaults
take a few minutes on 2 CPU cores. The claims come from the background texts, cited by file name:

- ``accumulation`` (000_7dba73f58e4c82a3.txt, 002_228528335da7dbf2.txt): k accumulated micro-batches equal one
  batch k times larger up to float rounding (addition is not associative: "1e-6 to 1e-8"), except with BatchNorm,
  which normalises over the micro-batch. ``GradientAccumulation(global_batch_size=k*B)`` on batches of B vs plain
  batches of kB, same seed, the same samples in the same order (checked), no augmentation, no dropout, N steps of
  the recipe's optimizer at its peak LR. Reports the gradient difference at the first step (same weights: only
  the arithmetic differs), the weight difference after every step and the BatchNorm running statistics, for the
  ViT with the patchify stem (LayerNorm only) in float32 and float64, the ResNet with BatchNorm, and the ResNet
  with GroupNorm as the control (``--variants`` adds both ResNets in float64).
- ``loss_scaling`` (002, 004_147b669fcad93baf.txt; Micikevicius et al. 2018, "Mixed precision training"): without
  loss scaling, small fp16 gradients underflow to zero. On a fixed batch and the same weights, the share of the
  parameter gradients and of the activation gradients (outputs of Linear / Conv2d modules, fp16 under autocast)
  that are nonzero in float32 but exactly zero under fp16 autocast, unscaled and scaled by the GradScaler's scale;
  at initialisation, after the first step that moves the weights, and after every epoch. Then the ViT recipe
  trained in float32, in ``16-mixed`` with Lightning's dynamic GradScaler and in ``16-mixed`` with a disabled one.
- ``master_weights`` (000, 001_3f3111d79c3bcddc.txt): 1e-6 added 1,000 times to a float16 or bfloat16 parameter at
  1.0 is lost (it is below half the spacing there), while float32 keeps it; the same at smaller magnitudes, and
  with a float32 master copy. Then the ViT recipe in ``bf16-true`` (weights and AdamW state in bfloat16) vs
  ``bf16-mixed`` (float32 master weights) vs ``32-true``, with the share of weights whose AdamW step does not
  change their bfloat16 value.
- ``lr_find`` (001): Smith's LR range test, ``Tuner(trainer).lr_find``, for the ViT (AdamW) and the ResNet (SGD)
  against each recipe's default LR: Lightning's suggestion (steepest descent), the steepest descent against
  log LR and the lowest loss (and a tenth of it) on the smoothed curve with its bias correction fixed; the
  finder's plot per recipe.

The fp16 / bf16 experiments train the ViT at depth 2, width 64 by default (``--vit-depth``, ``--vit-width``): on the
project's 2-core AVX2 CPU, fp16 and bf16 steps of the ViT take about 10x as long as float32 ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import lightning
import lightning.pytorch as L
import matplotlib
import torch
import torchvision
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.tuner import Tuner
from torch import nn
from typing_extensions import override

from lightning_recipes.callbacks import GradientAccumulation, LRSchedule
from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.recipes.common import CONFIG_DIR, ImageClassifier
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

RECIPES: dict[str, type[ImageClassifier]] = {"vit": ViTClassifier, "resnet": ResNetClassifier}
# float16: smallest positive subnormal, smallest normal, largest finite value.
FP16_SUBNORMAL, FP16_NORMAL, FP16_MAX = 2.0**-24, 2.0**-14, 65504.0
INITIAL_LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale


# ---------------------------------------------------------------- the recipes, as their digits configs build them


def _config(recipe: str) -> dict[str, Any]:
    """The recipe's digits config, read so that these runs train what ``python recipes/<recipe>.py fit`` trains."""
    with open(CONFIG_DIR / f"{recipe}_digits.yaml") as f:
        return yaml.safe_load(f)


def _model(recipe: str, **overrides: Any) -> ImageClassifier:
    """The recipe's LightningModule with the config's model arguments, the digits data links, then ``overrides``."""
    config = _config(recipe)
    kwargs = dict(config.get("model") or {})
    kwargs.update(num_classes=DigitsDataModule.num_classes, in_channels=DigitsDataModule.in_channels)
    if recipe == "vit":
        kwargs["image_size"] = config["data"]["init_args"]["image_size"]
    kwargs.update(overrides)
    return RECIPES[recipe](**kwargs)


def _vit_size(depth: Optional[int], width: Optional[int]) -> dict[str, int]:
    """ViT size overrides: ``depth`` blocks of ``width``, MLP 2 x width as in the recipe's default (128 -> 256)."""
    size: dict[str, int] = {}
    if depth is not None:
        size["depth"] = depth
    if width is not None:
        size.update(width=width, mlp_dim=2 * width)
    return size


def _data(recipe: str, **overrides: Any) -> DigitsDataModule:
    kwargs = dict(_config(recipe)["data"]["init_args"])
    kwargs.update(overrides)
    return DigitsDataModule(**kwargs)


def _lr_schedule(recipe: str) -> LRSchedule:
    """The config's LRSchedule (warmup + cosine over the run's optimizer steps)."""
    for callback in _config(recipe)["trainer"].get("callbacks", []):
        if callback["class_path"].endswith(".LRSchedule"):
            return LRSchedule(**callback.get("init_args", {}))
    raise ValueError(f"recipes/configs/{recipe}_digits.yaml has no LRSchedule callback")


def _clipping(recipe: str) -> dict[str, Any]:
    trainer = _config(recipe)["trainer"]
    return {k: trainer[k] for k in ("gradient_clip_val", "gradient_clip_algorithm") if k in trainer}


def _trainer(**kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU Trainer: no logger, checkpoints, progress bar or sanity check."""
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence what these runs trigger on purpose or cannot act on (Lightning's INFO lines, expected warnings)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for message in (
            r".*does not have many workers",  # the data is in memory; 0 workers is fastest (DigitsDataModule)
            r".*isinstance\(treespec, LeafSpec\)",  # Lightning 2.6 on torch >= 2.10
            r"GradientAccumulation: the model has",  # the BatchNorm warning: measuring that effect is the point
            r"precision='bf16-true' keeps",  # the recipe's warning: measuring that effect is the point
            r".*smaller than the logging interval",
        ):
            warnings.filterwarnings("ignore", message=message)
        try:
            yield
        finally:
            logger.setLevel(level)


# ---------------------------------------------------------------- reporting


def _environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
    }


def _jsonable(value: Any) -> Any:
    """Plain JSON: inf and NaN as strings (json.dumps would write the non-standard Infinity / NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _with_relative(value: Optional[float], other: Optional[float]) -> Optional[str]:
    return None if value is None else f"{_fmt(value)} ({_fmt(other)})"


def _pct(share: Optional[float]) -> Optional[str]:
    return None if share is None else f"{100 * share:.3g}%"


def _pyplot() -> Any:
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    return plt


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _parameters(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _stepped(trainer: L.Trainer, seen: int) -> bool:
    """Whether an optimizer step ran since the step count ``seen`` (in ``on_train_batch_end``)."""
    return trainer.global_step > seen


# ---------------------------------------------------------------- 1. accumulation


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
            self.first_gradient = _flat([p.grad for p in _parameters(pl_module)]).clone()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _stepped(trainer, self._steps):
            return
        self._steps = trainer.global_step
        weights = _flat(_parameters(pl_module))
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
    size = _vit_size(args.vit_depth, args.vit_width) if recipe == "vit" else {}
    dropout = {"dropout": 0.0, "attention_dropout": 0.0} if recipe == "vit" else {}
    model = _model(recipe, **overrides, **size, **dropout)
    # No augmentation: the random affine draws from the global RNG per sample, and Lightning prefetches one batch
    # ahead, so its draws would interleave differently with batches of B than with batches of kB.
    data = _data(recipe, batch_size=args.micro_batch if accumulate else args.micro_batch * args.k, augment=False)
    trace = _StepTrace(reference)
    callbacks: list[Callback] = [trace]
    if accumulate:
        callbacks.append(GradientAccumulation(global_batch_size=args.micro_batch * args.k))
    # The recipe's optimizer at its peak LR (no LRSchedule: its warmup starts at LR 0, a step that moves nothing)
    # and the config's clipping, applied to the accumulated gradient in the one run and the large one in the other.
    trainer = _trainer(
        max_steps=args.steps, precision=precision, limit_val_batches=0, callbacks=callbacks, **_clipping(recipe)
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return trace, time.perf_counter() - start


def _difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max |a - b| and ||a - b|| / ||b||, in float64."""
    diff = a.double() - b.double()
    return diff.abs().max().item(), (diff.norm() / b.double().norm()).item()


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
                _flat([accumulated.buffers[n] for n in norms]), _flat([large.buffers[n] for n in norms])
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
    table = _markdown(headers, rows)
    if ratios:
        table += "\n\nRatios of max |Δw|: " + "; ".join(f"{k}: {v:.3g}" for k, v in ratios.items())
    return {"variants": results, "ratios_of_max_abs_weight_diff": ratios, "plots": [plot], "table": table}


def _plot_accumulation(results: list[dict[str, Any]], out: Path) -> Path:
    plt = _pyplot()
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


# ---------------------------------------------------------------- 2. loss scaling


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
    params = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in _parameters(model)]).float()
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
    size = _vit_size(args.vit_depth, args.vit_width)

    def factory() -> ImageClassifier:
        return _model("vit", **size)

    probe_data = _data("vit", augment=False)
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
        model, data = factory(), _data("vit")
        monitor = _LossScalingMonitor(probe)
        precision: dict[str, Any] = (
            {"precision": "32-true"} if scaler is None else {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]}
        )
        trainer = _trainer(
            max_epochs=args.epochs,
            callbacks=[_lr_schedule("vit"), monitor],
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            **precision,
            **_clipping("vit"),
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
        _plot_training(runs, args.out, "loss_scaling_training.png"),
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
                _pct(unscaled["activations"]["share_fp32_in_fp16_subnormal_range"]),
                _pct(unscaled["activations"]["share_zero_in_fp16"]),
                _pct(unscaled["params"]["share_zero_in_fp16"]),
                f"2^{math.log2(p['loss_scale']):.0f}",
                _pct(scaled["activations"]["share_zero_in_fp16"]),
                _pct(scaled["params"]["share_zero_in_fp16"]),
                scaled["params"]["nonfinite_in_fp16"] + scaled["activations"]["nonfinite_in_fp16"],
            ]
        )
    probe_table = _markdown(
        [
            "weights (probe: same images, fp32 vs fp16 autocast)", "act. grads ≠ 0 in fp32",
            "of those in fp16 subnormal range", "act. → 0 in fp16, unscaled", "param → 0, unscaled", "scale",
            "act. → 0, scaled", "param → 0, scaled", "inf/NaN, scaled",
        ],
        probe_rows,
    )
    training_table = _markdown(
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
    plt = _pyplot()
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


def _plot_training(runs: dict[str, dict[str, Any]], out: Path, name: str) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, run in runs.items():
        epochs = [e["epoch"] + 1 for e in run["epochs"]]
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            values = [e[key] if e[key] is not None else float("nan") for e in run["epochs"]]
            ax.plot(epochs, values, marker="o", label=label)
    for ax, key in zip(axes, ("validation accuracy", "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- 3. master weights


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
        self._before = [p.detach().clone() for p in _parameters(pl_module)]

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _stepped(trainer, self._seen) or not self._before:
            return
        self._seen = trainer.global_step
        after = [p.detach() for p in _parameters(pl_module)]
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
    size = _vit_size(args.vit_depth, args.vit_width)
    for precision in args.precisions:
        L.seed_everything(args.seed, verbose=False)
        model, data = _model("vit", **size), _data("vit")
        lost = _LostUpdates()
        trainer = _trainer(
            max_epochs=args.epochs,
            precision=precision,
            callbacks=[_lr_schedule("vit"), lost],
            limit_train_batches=args.limit_train_batches,
            limit_val_batches=args.limit_val_batches,
            **_clipping("vit"),
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
    plots = [_plot_master_weights(trajectories, args), _plot_training(runs, args.out, "master_weights_training.png")]
    exact_table = _markdown(
        ["start", "dtype", "spacing at start", "one update changes it", f"after {args.updates} updates",
         "exact", "abs error", "share of the total update kept"],
        [
            [r["start"], r["dtype"], r["spacing_at_start"], r["first_update_survives"], f"{r['final']:.9g}",
             f"{r['exact_sum']:.9g}", abs(r["final"] - r["exact_sum"]), r["share_of_total_update_kept"]]
            for r in exact
        ],
    )
    training_table = _markdown(
        ["precision", "weights", "val acc", "val loss", "entries unchanged in bf16 per step: all (matrices / vectors)",
         "last epoch", "entries moved per step", "seconds"],
        [
            [
                p, r["parameter_dtype"].replace("torch.", ""), r["epochs"][-1]["val_acc"], r["epochs"][-1]["val_loss"],
                f"{_pct(r['unchanged_in_bf16_mean_over_steps']['all'])} "
                f"({_pct(r['unchanged_in_bf16_mean_over_steps']['matrices'])} / "
                f"{_pct(r['unchanged_in_bf16_mean_over_steps']['vectors'])})",
                _pct(r["epochs"][-1]["unchanged_in_bf16"]["all"]),
                _pct(r["unchanged_in_bf16_mean_over_steps"]["moved"]),
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
    plt = _pyplot()
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


# ---------------------------------------------------------------- 4. LR range test


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
    plt = _pyplot()
    results = []
    for recipe in args.recipes:
        L.seed_everything(args.seed, verbose=False)
        size = _vit_size(args.vit_depth, args.vit_width) if recipe == "vit" else {}
        batch = {} if args.batch_size is None else {"batch_size": args.batch_size}
        model, data = _model(recipe, **size), _data(recipe, **batch)
        default_lr = float(model.hparams.lr)
        # No LRSchedule: it writes the LR before every step and would overwrite the finder's exponential ramp
        # (Lightning 2.6 also swaps the Trainer's callbacks for its own during the search).
        trainer = _trainer(max_epochs=-1, default_root_dir=str(args.out), **_clipping(recipe))
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
    table = _markdown(
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


# ---------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _limit(text: str) -> float | int:
    """Trainer's limit_*_batches: an int counts batches, a float is a fraction of the epoch."""
    return float(text) if "." in text or "e" in text.lower() else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python recipes/experiments.py",
        description="Measure training-technique claims on the digits data: result.json, PNG plots, a markdown table.",
    )
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    def add(name: str, help: str, run: Callable[[argparse.Namespace], dict[str, Any]]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        p.add_argument("--out", type=Path, default=Path("runs/experiments") / name,
                       help="folder for result.json and the plots (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default: %(default)s)")
        return p

    def vit_size(p: argparse.ArgumentParser, depth: Optional[int], width: Optional[int]) -> None:
        p.add_argument("--vit-depth", type=_positive_int, default=depth,
                       help="ViT encoder blocks (default: %(default)s; None = the recipe's 6)")
        p.add_argument("--vit-width", type=_positive_int, default=width,
                       help="ViT token width, MLP 2x width, 4 heads (default: %(default)s; None = the recipe's 128)")

    def training(p: argparse.ArgumentParser, epochs: int) -> None:
        p.add_argument("--epochs", type=_positive_int, default=epochs, help="training epochs (default: %(default)s)")
        p.add_argument("--limit-train-batches", type=_limit, default=None,
                       help="Trainer(limit_train_batches): batches (int) or share (float) per epoch (default: all)")
        p.add_argument("--limit-val-batches", type=_limit, default=None,
                       help="Trainer(limit_val_batches) (default: all 360 held-out images)")

    p = add("accumulation", "Accumulated k micro-batches of B vs one batch of kB: weight differences after N steps.",
            accumulation)
    p.add_argument("--steps", type=_positive_int, default=20, help="optimizer steps N (default: %(default)s)")
    p.add_argument("--micro-batch", type=_positive_int, default=16, help="micro batch B (default: %(default)s)")
    p.add_argument("--k", type=_positive_int, default=4, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--variants", nargs="+", choices=sorted(ACCUMULATION_VARIANTS),
                   default=DEFAULT_ACCUMULATION_VARIANTS, help="models and dtypes to compare (default: %(default)s)")
    vit_size(p, None, None)

    p = add("loss_scaling", "fp16 gradient underflow with and without loss scaling, and fp16 training with each.",
            loss_scaling)
    training(p, epochs=10)
    p.add_argument("--probe-size", type=_positive_int, default=64,
                   help="training images (unaugmented) in the underflow probe batch (default: %(default)s)")
    vit_size(p, 2, 64)

    p = add("master_weights", "Small updates in fp32/fp16/bf16, and bf16-true vs bf16-mixed training.", master_weights)
    p.add_argument("--update", type=float, default=1e-6, help="the repeated update (default: %(default)s)")
    p.add_argument("--updates", type=_positive_int, default=1000, help="how many times (default: %(default)s)")
    p.add_argument("--starts", type=float, nargs="+", default=[1.0, 0.1, 0.01, 1e-3, 1e-4],
                   help="starting parameter values (default: %(default)s)")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed", "bf16-true"],
                   choices=["32-true", "bf16-mixed", "bf16-true"],
                   help="Trainer precisions to train (default: %(default)s)")
    training(p, epochs=10)
    vit_size(p, 2, 64)

    p = add("lr_find", "Lightning's LR range test (Tuner.lr_find) for the ViT and ResNet recipes.", lr_find)
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["vit", "resnet"],
                   help="recipes to test (default: %(default)s)")
    p.add_argument("--num-training", type=_positive_int, default=100,
                   help="LRs tried, one optimizer step each (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="first LR (default: %(default)s)")
    p.add_argument("--max-lr", type=float, default=10.0, help="last LR (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="data batch size (default: the digits configs' 64)")
    p.add_argument("--early-stop-threshold", type=float, default=4.0,
                   help="stop once the smoothed loss exceeds this many times the best (default: %(default)s)")
    vit_size(p, None, None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run one experiment; returns what it wrote to ``<out>/result.json`` (with the plots' paths)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _quiet():
        result = args.run(args)
    arguments = {k: v for k, v in vars(args).items() if k != "run"}
    payload = {
        "experiment": args.experiment,
        "command": " ".join(["python recipes/experiments.py", *argv]),
        "environment": _environment(),
        "arguments": arguments,
        "seconds": time.perf_counter() - start,
        **result,
    }
    (args.out / "result.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    print(result["table"])
    print(f"\n{args.experiment}: {payload['seconds']:.0f} s; wrote {args.out / 'result.json'} and "
          + ", ".join(str(p) for p in result["plots"]))
    return payload


if __name__ == "__main__":
    main()
