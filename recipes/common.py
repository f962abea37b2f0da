"""What the ResNet and ViT recipes share: parameter groups, the classification steps and metrics, the CLI."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_recipes.datamodules.base import ImageClassificationDataModule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def param_groups(model: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Split parameters into a weight-decay group (matrices and conv kernels) and a no-decay group.

    Decay shrinks weights towards zero; on a norm layer's scale, a bias, a position embedding or a class
    token that only fights the layer's purpose, so those go in the no-decay group (the rule of timm,
    nanoGPT and torchvision's references: every parameter with fewer than 2 dims, plus the names given).
    """
    no_decay = set(no_decay)
    unknown = no_decay - {name for name, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_decay names {sorted(unknown)} are not parameters of {type(model).__name__}.")
    decay, skip = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (skip if param.ndim < 2 or name in no_decay else decay).append(param)
    # The names label the groups' LR curves (LRSchedule logs lr/decay and lr/no_decay).
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": skip, "weight_decay": 0.0, "name": "no_decay"},
    ]


class ImageClassifier(LightningModule):
    """Cross-entropy classification with top-1 (and top-5) accuracy; subclasses build ``self.model``.

    Subclasses return their optimizer from ``build_optimizer``. The learning-rate schedule is not here: it
    is the ``LRSchedule`` callback of the recipe's config (per optimizer step, warmup then decay), so that
    the same schedule code serves any LightningModule.
    """

    #: Data-module attributes the CLI copies into the model's arguments before anything is built.
    data_links: Sequence[str] = ("num_classes", "in_channels")

    def __init__(self, *, num_classes: int, label_smoothing: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is invalid: a classifier needs at least 2 classes.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} is invalid: use a value in [0, 1).")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top_k = (1, 5) if num_classes > 5 else (1,)
        self.metric_names = {1: "acc", 5: "acc_top5"}
        for stage in ("train", "val", "test"):
            for k in top_k:
                setattr(self, f"{stage}_{self.metric_names[k]}", MulticlassAccuracy(num_classes, top_k=k))
        self.top_k = top_k

    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for name in self.data_links:
            ours, theirs = self.hparams.get(name), getattr(datamodule, name, None)
            if theirs is not None and ours != theirs:
                raise ValueError(
                    f"model {name}={ours!r} disagrees with the data: {type(datamodule).__name__}.{name}={theirs!r}. "
                    f"Set the model's {name} to {theirs!r} (the recipe CLI links it from the data automatically)."
                )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=stage != "train")
        for k in self.top_k:
            name = self.metric_names[k]
            metric = getattr(self, f"{stage}_{name}")
            metric(logits, targets)
            self.log(f"{stage}/{name}", metric, prog_bar=k == 1)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, _ = batch
        return self(images).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.build_optimizer()


class RecipeCLI(LightningCLI):
    """LightningCLI whose model takes its data-dependent sizes from the chosen data module."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        for name in self.model_class.data_links:
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")


def run_cli(model_class: type[ImageClassifier], default_config: str, args: Optional[list[str]] = None) -> RecipeCLI:
    """Start a recipe's CLI; without ``--config`` its defaults are ``recipes/configs/<default_config>`` (digits).

    A ``--config`` file replaces those defaults instead of being layered on them: the digits choices (16-px
    inputs, a conv stem, a stride-2 stem) must not leak into a CIFAR-10 or ImageNet config that does not
    mention them. Every shipped config is therefore complete on its own.
    """
    argv = sys.argv[1:] if args is None else args
    has_config = any(a in ("--config", "-c") or a.startswith("--config=") for a in argv)
    defaults = {"default_config_files": [] if has_config else [str(CONFIG_DIR / default_config)]}
    with warnings.catch_warnings():
        # Lightning 2.6's pytree helper uses an API torch >= 2.10 deprecated; nothing a user can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)
        if args is not None:
            # Called from Python on purpose (tests, benchmarks): sys.argv belongs to the caller.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return RecipeCLI(
            model_class,
            ImageClassificationDataModule,
            subclass_mode_data=True,
            parser_kwargs={sub: defaults for sub in ("fit", "validate", "test", "predict")},
            save_config_kwargs={"overwrite": True},
            # The optimizer is part of each recipe (its parameter groups matter), not a free CLI choice.
            auto_configure_optimizers=False,
            args=args,
        )
