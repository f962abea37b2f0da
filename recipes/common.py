"""What the ResNet and ViT recipes share: parameter groups, the classification steps and metrics, the CLI,
and the precision / strategy checks and FSDP2 sharding that make every recipe run under every Trainer setting."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_recipes.callbacks.checkpoint_io import NEEDS_PICKLE, checkpoint_problem
from lightning_recipes.datamodules.base import ImageClassificationDataModule, check_number

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


#: Module types whose parameters are "norm" parameters: torchvision's ``set_weight_decay`` list, plus RMSNorm.
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1/2/3d, SyncBatchNorm, sync_batchnorm.GlobalBatchNorm2d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Iterable[str] = (),
    *,
    norm_weight_decay: Optional[float] = 0.0,
    bias_weight_decay: Optional[float] = 0.0,
    embedding_weight_decay: Optional[float] = 0.0,
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: which parameters decay, and by how much (torchvision's three switches).

    torchvision's references (``references/classification/utils.py``, ``set_weight_decay``) give every parameter
    ``weight_decay`` except, for each switch that is not None: the parameters of norm layers (``NORM_LAYERS``, by
    module type) get ``norm_weight_decay``, biases ``bias_weight_decay``, and the embedding-like parameters named
    in ``no_decay`` (class token, position embedding) ``embedding_weight_decay``. A bias or an embedding that is
    switched on wins over the norm rule, as there. The defaults (all 0.0) keep norms, biases and the named
    parameters out of decay, the rule of timm and nanoGPT: pulling a norm's scale, a bias or an embedding
    towards zero only fights what it is for. All None decays every parameter. Two deliberate differences
    from torchvision's name matching: a bias is any parameter whose own name ends in ``bias`` (torchvision's
    exact ``bias`` misses ``MultiheadAttention.in_proj_bias``), and ``no_decay`` holds full names
    (torchvision's key ``position_embedding`` misses its own ViT's ``encoder.pos_embedding``).

    Groups are named for ``LRSchedule``'s ``lr/<name>`` curves: ``decay`` (at ``weight_decay``), ``no_decay``
    (at 0.0), and only for a value that is neither, one group named after its kinds (``norm``, ``bias``,
    ``embedding``, joined by ``_`` when they share a value). Empty groups are left out.
    """
    embeddings = set(no_decay)
    unknown = embeddings - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_decay names {sorted(unknown)} are not parameters of {type(model).__name__}.")
    in_norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups = {label: {"params": [], "weight_decay": value, "name": label}
              for label, value in (("decay", weight_decay), ("no_decay", 0.0))}  # fmt: skip
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in embeddings and embedding_weight_decay is not None:
            kind, value = "embedding", embedding_weight_decay
        elif name.rsplit(".", 1)[-1].endswith("bias") and bias_weight_decay is not None:
            kind, value = "bias", bias_weight_decay
        elif id(param) in in_norm and norm_weight_decay is not None:
            kind, value = "norm", norm_weight_decay
        else:
            kind, value = "decay", weight_decay
        label = "no_decay" if kind != "decay" and value == 0.0 else "decay" if value == weight_decay else kind
        groups.setdefault(label, {"params": [], "weight_decay": value, "name": label})["params"].append(param)
    # Kinds that share a value other than weight_decay and 0 (norms and biases both at 1e-5) share a group.
    shared: dict[float, dict[str, Any]] = {}
    for kind in ("norm", "bias", "embedding"):
        if kind in groups:
            group = groups.pop(kind)
            if group["weight_decay"] in shared:
                shared[group["weight_decay"]]["params"] += group["params"]
                shared[group["weight_decay"]]["name"] += f"_{kind}"
            else:
                shared[group["weight_decay"]] = group
    return [group for group in (*groups.values(), *shared.values()) if group["params"]]


def check_model_arg(name: str, value: object, allowed: str, **bounds: Any) -> None:
    """``check_number`` for a recipe's model argument: the message names its option ``--model.<name>``."""
    check_number(name, value, allowed, option=f"--model.{name}", **bounds)


def check_decay_switch(name: str, value: object) -> None:
    """Check one of ``param_groups``' switches: None (decay at ``weight_decay``) or a number >= 0."""
    if value is not None:
        check_model_arg(name, value, "use a value >= 0 (0 disables it), or null for weight_decay's value", at_least=0)


def check_model_flag(name: str, value: object, *, none: bool = False) -> None:
    """Refuse a non-bool for a recipe's on/off model argument, naming its option ``--model.<name>``; with
    ``none``, null (automatic) is allowed too."""
    if not isinstance(value, bool) and not (none and value is None):
        allowed = "true, false or null (automatic)" if none else "true or false"
        raise ValueError(f"{name}={value!r} is invalid: use {allowed} (--model.{name}).")


def _mixed_and_clipped(precision: str, gradient_clip_val: Optional[float]) -> bool:
    """Lightning's MixedPrecision plugin refuses to clip the gradients of a fused optimizer (Lightning 2.6)."""
    return precision in ("16-mixed", "bf16-mixed") and bool(gradient_clip_val)


def fused_by_default(parameters: Iterable[torch.Tensor], precision: str, gradient_clip_val: Optional[float]) -> bool:
    """Whether ``--model.fused null`` (automatic) picks torch's fused optimizer kernel: where it is a pure speed-up.

    That is every parameter a plain tensor on the CPU (torch >= 2.4 has fused SGD / Adam / AdamW kernels there: one
    pass over every parameter instead of torch's default CPU implementation, a Python loop over them; ResNet-18's SGD
    step takes 5.6 ms instead of 18 ms on 2 cores, the same numbers to float32 rounding), unless the precision is
    mixed and either has a GradScaler (16-mixed) or clips: Lightning's MixedPrecision plugin refuses to clip the
    gradients of a fused optimizer (it counts on the optimizer to unscale them inside ``step()``, Lightning 2.6), and
    under the scaler GradNormMonitor would see scaled gradients. On a GPU torch's default (``foreach``) stays, as in
    torchvision's references, and so do FSDP2's DTensor shards.
    """
    if precision == "16-mixed" or _mixed_and_clipped(precision, gradient_clip_val):
        return False
    return all(type(p.data) is torch.Tensor and p.device.type == "cpu" for p in parameters)


def fused_optimizer(module: LightningModule, fused: Optional[bool]) -> dict[str, Any]:
    """The ``fused`` keyword for a torch SGD / Adam / AdamW of ``module``'s parameters (a recipe's ``--model.fused``):
    null picks it by ``fused_by_default``; true / false force it on / off (off: torch's default kernel)."""
    trainer = module._trainer  # None outside a Trainer (a script that builds the optimizer itself)
    precision = str(trainer.precision) if trainer is not None else "32-true"
    clip = trainer.gradient_clip_val if trainer is not None else None
    if fused is None:
        fused = fused_by_default(module.parameters(), precision, clip)
    elif fused and _mixed_and_clipped(precision, clip):
        raise ValueError(
            f"fused=True is invalid with precision={precision!r} and gradient_clip_val={clip!r}: Lightning's"
            " mixed-precision plugin refuses to clip the gradients of a fused optimizer. Use --model.fused null"
            " (automatic) or false, or --trainer.gradient_clip_val null."
        )
    return {"fused": True} if fused else {}


class ImageClassifier(LightningModule):
    """Cross-entropy classification with top-1 (and top-5) accuracy; subclasses build ``self.model``.

    Targets are class indices (int64, ``(batch,)``) or class probabilities (float, ``(batch, num_classes)``), as
    MixUp / CutMix make them. The loss is ``nn.CrossEntropyLoss`` with label smoothing either way: the target
    distribution ``p`` (one-hot for an index) becomes ``(1 - label_smoothing) * p + label_smoothing / C``. The
    accuracy counts a prediction right when it is the target's argmax: on a mixed image, the class with the
    larger share (as ``utils.accuracy`` in torchvision's references).

    Logged in training, at Lightning's logging steps (every ``log_every_n_steps`` optimizer steps):
    ``train/loss`` and ``train/acc`` (``train/acc_top5`` with more than 5 classes), each the mean over this
    process's samples since the previous logging step; at each epoch end ``train/loss_epoch`` and
    ``train/acc_epoch`` (``train/acc_top5_epoch``) over the epoch's samples of all processes (those since the
    resume, after a mid-epoch resume). Other steps only add to sums on the device: no host sync, no
    ``self.log``. In validation and test: ``val/loss``, ``val/acc`` (``val/acc_top5``) over the whole epoch
    and all processes; ``test/...`` likewise.

    Subclasses return their optimizer from ``build_optimizer``, with ``**fused_optimizer(self, self.fused)``. The
    learning-rate schedule is not here: it is the ``LRSchedule`` callback of the recipe's config (per optimizer
    step, warmup then decay), so that the same schedule code serves any LightningModule.
    """

    #: Data-module attributes the CLI copies into the model's arguments before anything is built.
    data_links: Sequence[str] = ("num_classes", "in_channels")
    #: Whether ``precision='bf16-true' / '16-true'`` (weights and optimizer state in 16 bits) is allowed.
    supports_true_half: bool = True

    def __init__(
        self,
        *,
        num_classes: int,
        label_smoothing: float,
        channels_last: bool = False,
        compile: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__()
        # No --model option for num_classes (nor in_channels, image_size): the CLI links it from the data module.
        classes = "a classifier needs at least 2 classes"
        check_number("num_classes", num_classes, classes, option=None, integer=True, at_least=2)
        check_model_arg("label_smoothing", label_smoothing, "use a value in [0, 1)", at_least=0, below=1)
        check_model_flag("channels_last", channels_last)
        check_model_flag("compile", compile)
        check_model_flag("fused", fused, none=True)
        self.channels_last, self.compile_model, self.fused = channels_last, compile, fused
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top_k = (1, 5) if num_classes > 5 else (1,)
        self.metric_names = {1: "acc", 5: "acc_top5"}
        for stage in ("val", "test"):
            for k in top_k:
                # No argument validation: its torch.unique of the targets syncs with the device on every batch,
                # and the loss has already refused labels out of range.
                metric = MulticlassAccuracy(num_classes, top_k=k, average="micro", validate_args=False)
                setattr(self, f"{stage}_{self.metric_names[k]}", metric)
        self.top_k = top_k
        # Training sums on the device, [loss x samples, samples, correct top-k for each k]: since the last
        # logging step, and over the epoch. Plain attributes, not buffers: DDP would broadcast rank 0's.
        self._train_sums: Optional[torch.Tensor] = None
        self._epoch_sums: Optional[torch.Tensor] = None
        self._steps_before_batch = 0
        self._configured = False
        self._kernels: Optional[list[dict[str, Any]]] = None  # the optimizer's fused / foreach flags, per group

    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules that FSDP2 shards (and all-gathers) one at a time, in forward order."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """Lay out, shard and compile the network, once: channels-last, then FSDP2, then ``torch.compile``.

        Under ModelParallelStrategy FSDP2's ``fully_shard`` goes on every unit and then on the root (ZeRO-3): one
        unit at a time is all-gathered in forward and backward and freed after, so the peak holds one unit's
        full parameters; the root call shards what is left (embeddings, head). Other strategies wrap the model
        themselves. Compiling comes last, on the sharded model, with ``nn.Module.compile``: it compiles the
        module's call in place, so parameter names, the optimizer's groups and checkpoints stay those of the
        plain model (``torch.compile(model)`` would prefix every key with ``_orig_mod.``).
        """
        if self.channels_last and not self._configured:
            # 4-d weights in NHWC order. FSDP2 keeps its shards contiguous (torch 2.9-2.14): under it only the
            # inputs are channels-last, which is enough for conv kernels to run channels-last.
            self.model.to(memory_format=torch.channels_last)
        shard_with_fsdp2(self, self.model, self.fsdp_units)
        if self.compile_model and not self._configured:  # configure_model runs again for validate / test after fit
            self.model.compile()
        self._configured = True

    def setup(self, stage: str) -> None:
        check_true_half(self, self.supports_true_half)
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # An instance attribute, not a class override: elsewhere Lightning's own clipping stays in place (and
            # GradNormMonitor's cheap path for it).
            self.configure_gradient_clipping = self._clip_fsdp_gradients  # type: ignore[method-assign]
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in self.data_links:
            ours, theirs = self.hparams.get(name), getattr(datamodule, name, None)
            if theirs is not None and ours != theirs:
                raise ValueError(
                    f"model {name}={ours!r} disagrees with the data: {type(datamodule).__name__}.{name}={theirs!r}. "
                    f"Set the model's {name} to {theirs!r} (the recipe CLI links it from the data automatically)."
                )

    def _clip_fsdp_gradients(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float] = None,
        gradient_clip_algorithm: Optional[str] = None,
    ) -> None:  # fmt: skip
        """Clip by the norm over all shards under ``FSDPStrategy`` (FSDP1), whose precision plugin refuses it.

        Lightning 2.6's ``FSDPPrecision.clip_grad_by_norm`` raises: ``torch.nn.utils.clip_grad_norm_`` on one
        rank's shards would be wrong. The root ``FullyShardedDataParallel.clip_grad_norm_`` reduces the norm over
        every rank (torch's FSDP docs, "clip_grad_norm_"); under ``16-mixed`` Lightning has unscaled the gradients
        before this hook. Clipping by value is elementwise and stays Lightning's.
        """
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):  # a str enum in Lightning
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self._steps_before_batch = self.trainer.global_step  # the optimizer steps after this returns, if at all
        with torch.no_grad():
            # Kernels with the batch size as an argument: no host-to-device copy, nothing waits for the device.
            samples = torch.full((), len(targets), dtype=torch.float32, device=loss.device)
            sums = torch.stack([loss.float() * len(targets), samples, *self._correct(logits, targets)])
            if self._train_sums is None:
                self._train_sums, self._epoch_sums = torch.zeros_like(sums), torch.zeros_like(sums)
            self._train_sums += sums
            self._epoch_sums += sums
        return loss

    def on_train_start(self) -> None:
        self._train_sums = self._epoch_sums = None  # nothing left over from an earlier fit of this module
        # torch's Optimizer.load_state_dict takes every group setting from the checkpoint, the kernel choice (fused,
        # foreach) included: a resumed run steps with the one this run chose (``fused_optimizer``), not the saved run's.
        if self._kernels is not None and len(self.trainer.optimizers) == 1:
            for group, kernel in zip(self.trainer.optimizers[0].param_groups, self._kernels):
                group.update(kernel)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._train_sums is None or not self._is_logging_step():
            return
        # One device-to-host copy per logging step (the loggers would sync for the values anyway); the progress
        # bar then reads host tensors on every refresh instead of syncing with the device each time.
        loss_sum, samples, *correct = self._train_sums.to("cpu", copy=True)
        self._train_sums.zero_()
        self.log("train/loss", loss_sum / samples, prog_bar=True)
        for k, right in zip(self.top_k, correct):
            self.log(f"train/{self.metric_names[k]}", right / samples, prog_bar=k == 1)

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this batch's step metrics to the loggers (called in ``on_train_batch_end``).

        Lightning 2.6's rule (``_LoggerConnector.should_update_logs``, private) from public Trainer state: not
        inside an accumulation window (no optimizer step in this batch), then every step under
        ``fast_dev_run``, else when the optimizer steps taken are a multiple of ``log_every_n_steps`` or the
        Trainer is stopping. Lightning counts ``_batches_that_stepped + 1`` before its increment; that equals
        ``global_step`` after this batch's step (one optimizer, automatic optimization).
        """
        trainer = self.trainer
        if trainer.global_step == self._steps_before_batch:
            return False
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (trainer.global_step % every == 0 or trainer.should_stop)

    def on_train_epoch_end(self) -> None:
        if self._epoch_sums is None:
            return
        # Summed over processes before dividing: exact with unequal sample counts per rank.
        loss_sum, samples, *correct = self.trainer.strategy.reduce(self._epoch_sums.clone(), reduce_op="sum")
        self._epoch_sums.zero_()
        # Every process now holds the same values: "max" over processes returns them exactly (a mean could round)
        # and tells Lightning they are synced (unsynced epoch values make it warn under DDP).
        self.log("train/loss_epoch", loss_sum / samples, sync_dist=True, reduce_fx="max")
        for k, right in zip(self.top_k, correct):
            self.log(f"train/{self.metric_names[k]}_epoch", right / samples, sync_dist=True, reduce_fx="max")

    def _correct(self, logits: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Correct predictions in the batch for each k of ``top_k``, float32 sums on the device."""
        labels = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        correct = [(logits.argmax(dim=-1) == labels).sum()]
        if 5 in self.top_k:
            correct.append((logits.topk(5, dim=-1).indices == labels[:, None]).any(dim=-1).sum())
        return [c.float() for c in correct]

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, targets = batch
        logits = self(images)
        self.log(f"{stage}/loss", self.criterion(logits, targets), prog_bar=True, sync_dist=True)
        labels = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        for k in self.top_k:
            name = self.metric_names[k]
            metric = getattr(self, f"{stage}_{name}")
            metric.update(logits, labels)  # Lightning computes it (synced over processes) at the epoch end
            self.log(f"{stage}/{name}", metric, prog_bar=k == 1)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        return self(images).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = self.build_optimizer()
        self._kernels = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]
        return optimizer


def shard_with_fsdp2(module: LightningModule, root: nn.Module, units: Callable[[], Iterable[nn.Module]]) -> None:
    """Under ModelParallelStrategy, apply FSDP2's ``fully_shard`` to every unit and then to ``root`` (ZeRO-3).

    Shared by every recipe's ``configure_model``; ``units`` is called only when sharding happens.
    """
    # `_trainer` is None when Lightning calls this outside a Trainer (load_from_checkpoint, Lightning 2.6):
    # the public `trainer` property raises there.
    if module._trainer is None or not isinstance(module.trainer.strategy, ModelParallelStrategy):
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(root, FSDPModule):  # configure_model runs again on validate/test after fit
        return
    mesh = module.device_mesh["data_parallel"]
    for unit in units():
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)


def check_true_half(module: LightningModule, supported: bool) -> None:
    """Refuse (``supported=False``) or warn about ``precision='bf16-true' / '16-true'``: 16-bit master weights."""
    precision = str(getattr(module.trainer, "precision", "32-true"))
    if precision in ("bf16-true", "16-true"):
        if not supported:
            raise ValueError(
                f"precision={precision!r} with {type(module).__name__}: BatchNorm running statistics and SGD momentum "
                "in 16 bits lose the small updates they accumulate. Use --trainer.precision bf16-mixed "
                "(16-bit compute, float32 weights)."
            )
        dtype = "bfloat16" if precision == "bf16-true" else "float16"
        spacing = torch.finfo(getattr(torch, dtype)).eps
        warnings.warn(
            f"precision={precision!r} keeps the weights, gradients and AdamW state in {dtype}: an update smaller "
            f"than half the spacing of a weight's value is lost (spacing {spacing:.2g} at 1.0, so 1.0 + 1e-6 added "
            "1000 times stays 1.0 instead of reaching about 1.001). Use --trainer.precision bf16-mixed to keep float32 master "
            "weights.",
            stacklevel=3,
        )


class RecipeCLI(LightningCLI):
    """LightningCLI whose model takes its data-dependent sizes from the chosen data module."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        for name in self.model_class.data_links:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_argument(
            "--global_batch_size",
            type=Optional[int],
            default=None,
            help="Samples per optimizer step over all processes: sets the GradientAccumulation callback's"
            " global_batch_size (adding the callback if the config has none), which accumulates"
            " k = global / (data batch_size x data-parallel processes) micro-batches per step.",
        )

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        size = config.get("global_batch_size")
        if size is None:
            return
        check_number("global_batch_size", size, "use a positive int", option="--global_batch_size", integer=True,
                     at_least=1)  # fmt: skip
        callbacks = config.trainer.callbacks
        callbacks = [] if callbacks is None else callbacks if isinstance(callbacks, list) else [callbacks]
        ours = [c for c in callbacks if str(getattr(c, "class_path", "")).endswith(".GradientAccumulation")]
        if len(ours) > 1:
            raise ValueError(
                f"--global_batch_size={size}: the config has {len(ours)} GradientAccumulation callbacks; keep one"
            )
        if ours:
            ours[0].init_args.global_batch_size = size
        else:
            callbacks.append(Namespace(class_path="lightning_recipes.callbacks.GradientAccumulation",
                                       init_args=Namespace(global_batch_size=size)))  # fmt: skip
        config.trainer.callbacks = callbacks

    def _parse_ckpt_path(self) -> None:
        # Lightning >= 2.5 reads the checkpoint's hyperparameters here, before any Trainer or callback exists, and
        # a damaged file would fail inside torch without its name: check it first, with the callbacks' messages.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("last", "best", "hpc", "registry") and "://" not in str(path):
            problem = checkpoint_problem(str(path))
            if problem is not None and not problem.startswith(NEEDS_PICKLE):
                raise SystemExit(f"error: --ckpt_path {path}: Cannot resume from checkpoint {path}: {problem}")
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Private in Lightning 2.6 (the public instantiate_trainer only forwards here), but it is the one point
        # that sees the instantiated strategy / plugins before the Trainer (and any process launch) exists.
        _check_precision_and_strategy(config)
        return super()._instantiate_trainer(config, callbacks)


def _check_precision_and_strategy(config: dict[str, Any]) -> None:
    """Fail before any process starts on a combination that cannot run; give CPU its real fp16 AMP.

    Edits the Trainer arguments in place: ``precision='16-mixed'`` on CPU becomes the equivalent precision
    plugin with a CPU GradScaler, because Lightning 2.6 silently swaps CPU 16-mixed for bf16-mixed.
    """
    strategy, precision = config.get("strategy"), str(config.get("precision"))
    accelerator = str(config.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    fsdp1 = isinstance(strategy, FSDPStrategy) or (isinstance(strategy, str) and strategy.startswith("fsdp"))
    if fsdp1 and on_cpu:
        label = repr(strategy) if isinstance(strategy, str) else type(strategy).__name__
        raise ValueError(
            f"strategy={label} on CPU (accelerator={accelerator!r}): Lightning's FSDPStrategy (FSDP1) needs GPUs. "
            "Use the FSDP2 route, which runs on CPU with gloo: --trainer.strategy "
            "lightning.pytorch.strategies.ModelParallelStrategy (see recipes/configs/vit_b16_imagenet_fsdp2.yaml)."
        )
    if precision in ("16-mixed", "16") and isinstance(strategy, ModelParallelStrategy):
        raise ValueError(
            f"precision={precision!r} with strategy=ModelParallelStrategy (FSDP2): Lightning has no sharded GradScaler "
            "for it. Use --trainer.precision bf16-mixed (no scaler needed) or 32-true."
        )
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if precision in ("16-mixed", "16") and on_cpu and not any(isinstance(p, Precision) for p in plugins):
        # Lightning 2.6.6 turns CPU 16-mixed into bf16-mixed with a warning; torch has fp16 autocast and a
        # dynamic GradScaler on CPU, so run what was asked for.
        config["precision"] = None
        config["plugins"] = [*plugins, MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]


def _check_yaml_syntax(argv: Sequence[str]) -> None:
    """Exit naming the file when a ``--config`` file is not valid YAML.

    jsonargparse 4.x reads the file's text and reports a syntax error with its line and column but without
    the file's name, which leaves a user with several configs guessing. Composing the YAML (syntax only: no
    values are built, so nothing jsonargparse would accept is refused here) reports the same positions, named.
    """
    import yaml  # installed with jsonargparse

    paths = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not Path(path).is_file():  # a YAML string instead of a path, or a missing file jsonargparse reports
            continue
        with open(path, "rb") as file:  # the stream's name puts the path into the error's positions
            try:
                # jsonargparse 4.53's loader class, so that the wording is the one it would print.
                yaml.compose(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            except yaml.YAMLError as err:
                # Exit status 2, as jsonargparse's (argparse's) own usage errors.
                print(f"error: Problems parsing config file {path}: {err}", file=sys.stderr)
                raise SystemExit(2) from None


def run_cli(
    model_class: type[LightningModule],
    default_config: str,
    args: Optional[list[str]] = None,
    datamodule_class: type[LightningDataModule] = ImageClassificationDataModule,
) -> RecipeCLI:
    """Start a recipe's CLI; without ``--config`` its defaults are ``recipes/configs/<default_config>`` (digits).

    A ``--config`` file replaces those defaults instead of being layered on them: the digits choices (16-px
    inputs, a conv stem, a stride-2 stem) must not leak into a CIFAR-10 or ImageNet config that does not
    mention them. Every shipped config is therefore complete on its own.
    """
    argv = sys.argv[1:] if args is None else args
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in argv)
    _check_yaml_syntax(argv)
    defaults = {"default_config_files": [] if has_config else [str(CONFIG_DIR / default_config)]}
    with warnings.catch_warnings():
        # Lightning 2.6's pytree helper uses an API torch >= 2.10 deprecated; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
        if args is not None:
            # Called from Python on purpose (tests, benchmarks): sys.argv belongs to the caller.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return RecipeCLI(
            model_class,
            datamodule_class,
            subclass_mode_data=True,
            parser_kwargs={sub: defaults for sub in ("fit", "validate", "test", "predict")},
            save_config_kwargs={"overwrite": True},
            # The optimizer is part of each recipe (its parameter groups matter), not a free CLI choice.
            auto_configure_optimizers=False,
            args=args,
        )
