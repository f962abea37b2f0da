"""ResNet recipe: torchvision's ResNet-18/34/50, SGD with (Nesterov) momentum, BatchNorm / GroupNorm / SyncBN.

    python recipes/resnet.py fit                    # digits, offline, under a minute on 2 CPU cores
    python recipes/resnet.py fit --config recipes/configs/resnet18_cifar10.yaml
    python recipes/resnet.py fit --model.norm group --print_config
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, Optional

import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50

from lightning_recipes.recipes.common import (
    ImageClassifier,
    check_decay_switch,
    check_model_arg,
    check_number,
    fused_optimizer,
    param_groups,
    run_cli,
)
from lightning_recipes.recipes.pretrained import load_pretrained
from lightning_recipes.recipes.sync_batchnorm import GlobalBatchNorm2d, convert_to_global_batchnorm

ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


class ResNetClassifier(ImageClassifier):
    """A ResNet classifier; the arguments below are the recipe's whole model and optimizer config."""

    supports_true_half = False

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        arch: str = "resnet18",
        stem: Literal["imagenet", "small"] = "small",
        stem_stride: int = 1,
        norm: Literal["batch", "group", "sync_batch"] = "batch",
        group_norm_groups: int = 32,
        zero_init_residual: bool = True,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        norm_weight_decay: Optional[float] = 0.0,
        bias_weight_decay: Optional[float] = 0.0,
        label_smoothing: float = 0.1,
        channels_last: bool = False,
        compile: bool = False,
        fused: Optional[bool] = None,
        weights: Optional[str] = None,
    ) -> None:
        """
        Args:
            num_classes: classes to predict (linked from the data module by the CLI).
            in_channels: image channels (linked from the data module by the CLI).
            arch: torchvision architecture, one of resnet18, resnet34, resnet50.
            stem: ``imagenet`` = 7×7 stride-2 conv + max-pool (for ≥ 128 px images); ``small`` = 3×3 stride-1
                conv and no pooling, the CIFAR-style stem that keeps small images' resolution.
            stem_stride: stride of the ``small`` stem's conv: 2 halves the resolution once, so that upsampled
                images (augmented at the higher resolution) cost what the native size costs.
            norm: ``batch``; ``group`` (GroupNorm, independent of the batch size); ``sync_batch`` (BatchNorm whose
                statistics are computed over all processes under DDP).
            group_norm_groups: groups per GroupNorm layer when ``norm=group``.
            zero_init_residual: start each residual branch's last norm scale at 0 (Goyal et al. 2017).
            lr: peak SGD learning rate; the config's LRSchedule callback warms up to it and decays it.
            momentum: SGD momentum.
            nesterov: Nesterov momentum.
            weight_decay: L2 penalty on every parameter that the two switches below do not set.
            norm_weight_decay: L2 penalty on the norm layers' scales and shifts; null: weight_decay
                (torchvision's --norm-weight-decay; its ResNet-50 V2 recipe sets 0.0).
            bias_weight_decay: L2 penalty on every bias, the norms' shifts included (a value here wins over
                norm_weight_decay, as in torchvision); null: the norms' shifts follow norm_weight_decay and the
                head's bias weight_decay (torchvision's --bias-weight-decay).
            label_smoothing: mass spread uniformly over all classes in the cross-entropy target.
            channels_last: keep the conv weights and the input images in NHWC order (``torch.channels_last``), the
                layout in which GPU tensor cores (and oneDNN on CPUs) run the convolutions fastest.
            compile: ``torch.compile`` the network (``nn.Module.compile``, after any FSDP2 sharding): the first steps
                pay the compilation; checkpoints keep the plain model's keys.
            fused: torch's fused optimizer kernel, one pass over all parameters. null (automatic): on for CPU
                parameters unless the precision is mixed and scales (16-mixed) or clips, where Lightning refuses it
                (``common.fused_by_default``); ResNet-18's SGD step 5.6 instead of 18 ms on 2 cores, the same update
                to float32 rounding. true / false: on / off (off: torch's default implementation).
            weights: start from pretrained weights: a torchvision weights name of ``arch`` (``IMAGENET1K_V2``,
                ``ResNet50_Weights.DEFAULT``), read offline from the torch hub cache, or a file (state dict,
                Lightning checkpoint, torchvision reference checkpoint). With another ``num_classes`` the head
                stays freshly initialised. Read when the module is built, so
                ``load_from_checkpoint(path, weights=None)`` skips it.
        """
        super().__init__(
            num_classes=num_classes, label_smoothing=label_smoothing, channels_last=channels_last, compile=compile,
            fused=fused,
        )
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r} is not supported: choose one of {sorted(ARCHS)}.")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem={stem!r} is not supported: choose 'imagenet' or 'small'.")
        if stem_stride not in (1, 2) or (stem_stride == 2 and stem != "small"):
            raise ValueError(
                f"stem_stride={stem_stride!r} is invalid with stem={stem!r}: use 1, or 2 with stem='small' "
                "(--model.stem_stride 1; the digits defaults set 2 for their 16-px inputs)."
            )
        if norm not in ("batch", "group", "sync_batch"):
            raise ValueError(f"norm={norm!r} is not supported: choose one of 'batch', 'group', 'sync_batch'.")
        check_number("in_channels", in_channels, "it must be a positive int", option=None, integer=True, at_least=1)
        groups = "GroupNorm needs at least 1 group"
        check_model_arg("group_norm_groups", group_norm_groups, groups, integer=True, at_least=1)
        check_model_arg("lr", lr, "the peak learning rate must be > 0", above=0)
        # 1 or more never forgets a gradient: the update grows without bound.
        check_model_arg("momentum", momentum, "SGD momentum must lie in [0, 1)", at_least=0, below=1)
        if nesterov and momentum == 0:
            raise ValueError(
                f"momentum={momentum!r} is invalid with nesterov=True: Nesterov momentum must lie in (0, 1) "
                "(--model.momentum); or set --model.nesterov false for plain SGD."
            )
        check_model_arg("weight_decay", weight_decay, "use a value >= 0 (0 disables it)", at_least=0)
        check_decay_switch("norm_weight_decay", norm_weight_decay)
        check_decay_switch("bias_weight_decay", bias_weight_decay)
        if norm == "group" and 64 % group_norm_groups:
            raise ValueError(
                f"group_norm_groups={group_norm_groups} must divide every layer's channels (64 at the narrowest): "
                f"choose one of {[g for g in range(1, 65) if 64 % g == 0]}."
            )
        self.save_hyperparameters()
        norm_layer = functools.partial(nn.GroupNorm, group_norm_groups) if norm == "group" else nn.BatchNorm2d
        self.model = ARCHS[arch](num_classes=num_classes, norm_layer=norm_layer, zero_init_residual=zero_init_residual)
        if stem == "small":
            self.model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
            self.model.maxpool = nn.Identity()
        elif in_channels != 3:
            self.model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.model.conv1.weight, mode="fan_out", nonlinearity="relu")
        if weights is not None:
            load_pretrained(self.model, weights, arch=arch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.norm != "sync_batch":
            return
        if self.trainer.world_size == 1:
            warnings.warn(
                "norm='sync_batch' has nothing to synchronise in a single process: plain BatchNorm is used. "
                "It takes effect under a distributed strategy (e.g. --trainer.strategy ddp --trainer.devices 2).",
                stacklevel=2,
            )
        elif any(isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm2d)) for m in self.model.modules()):
            return  # converted by an earlier stage (fit, then test)
        elif self.trainer.strategy.root_device.type == "cpu":  # the module itself is not on its device yet
            # torch's SyncBatchNorm refuses CPU tensors (CUDA, XPU, HPU only, torch 2.14): same statistics,
            # computed with an autograd-aware all-reduce that gloo runs.
            self.model = convert_to_global_batchnorm(self.model)
        else:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

    def fsdp_units(self) -> list[nn.Module]:
        # The four residual stages; the stem and the head stay with the root unit.
        return [self.model.layer1, self.model.layer2, self.model.layer3, self.model.layer4]

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            param_groups(
                self.model,
                self.hparams.weight_decay,
                norm_weight_decay=self.hparams.norm_weight_decay,
                bias_weight_decay=self.hparams.bias_weight_decay,
            ),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            nesterov=self.hparams.nesterov,
            **fused_optimizer(self, self.fused),
        )


def main(args: Optional[list[str]] = None) -> None:
    run_cli(ResNetClassifier, "resnet_digits.yaml", args=args)


if __name__ == "__main__":
    main()
