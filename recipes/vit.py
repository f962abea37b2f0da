"""Vision Transformer recipe: torchvision's ViT, AdamW (or SGD to compare), LayerNorm, clipping by norm, warmup + cosine.

    python recipes/vit.py fit                       # digits, offline, under a minute on 2 CPU cores
    python recipes/vit.py fit --config recipes/configs/vit_cifar10.yaml
    python recipes/vit.py fit --print_config        # every option and its default
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import VisionTransformer
from torchvision.models.vision_transformer import ConvStemConfig

from lightning_recipes.recipes.common import (
    ImageClassifier,
    check_decay_switch,
    check_model_arg,
    check_number,
    fused_optimizer,
    param_groups,
    run_cli,
)
from lightning_recipes.recipes.pretrained import layer_decay_groups, load_pretrained


class CheckpointedBlocks(nn.Sequential):
    """The encoder's blocks, each recomputed in backward instead of keeping its activations (Chen et al. 2016).

    A Sequential subclass, so parameter names and checkpoints are those of the plain model. Non-reentrant
    checkpointing composes with FSDP2's per-block hooks and with autocast (it replays the autocast state).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if torch.is_grad_enabled() else block(x)
        return x


class ViTClassifier(ImageClassifier):
    """A ViT classifier; the arguments below are the recipe's whole model and optimizer config."""

    data_links = ("num_classes", "in_channels", "image_size")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        patch_size: int = 2,
        depth: int = 6,
        width: int = 128,
        heads: int = 4,
        mlp_dim: int = 256,
        conv_stem: Optional[list[int]] = None,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        activation_checkpointing: bool = False,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        norm_weight_decay: Optional[float] = 0.0,
        bias_weight_decay: Optional[float] = 0.0,
        transformer_embedding_decay: Optional[float] = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        label_smoothing: float = 0.1,
        channels_last: bool = False,
        compile: bool = False,
        fused: Optional[bool] = None,
        weights: Optional[str] = None,
        layer_decay: Optional[float] = None,
    ) -> None:
        """
        Args:
            num_classes: classes to predict (linked from the data module by the CLI).
            in_channels: image channels (linked from the data module by the CLI).
            image_size: side of the square input image (linked from the data module by the CLI).
            patch_size: side of the square patches; must divide ``image_size``.
            depth: number of encoder blocks.
            width: token dimension (``hidden_dim``); must be divisible by ``heads``.
            heads: attention heads per block.
            mlp_dim: hidden size of each block's MLP.
            conv_stem: channels of a convolutional stem that replaces the patchify layer (Xiao et al. 2021,
                "Early convolutions help transformers see better"): 3×3 conv + BatchNorm + ReLU per entry, the
                last log2(patch_size) with stride 2, then a 1×1 conv to ``width``. None = the standard patchify.
            dropout: dropout after the embedding, attention output and MLP.
            attention_dropout: dropout on the attention weights.
            activation_checkpointing: keep only each encoder block's input in forward and recompute the block in
                backward: same loss and gradients, activation memory of one block instead of ``depth`` blocks,
                about one more forward of compute.
            optimizer: ``adamw`` (the ViT default) or ``sgd`` (Nesterov momentum; for comparing the two, as
                transformers are known to train poorly with SGD).
            lr: peak learning rate; the config's LRSchedule callback warms up to it and decays it.
            weight_decay: weight decay on every parameter that the three switches below do not set; decoupled for
                AdamW, L2 added to the gradient for SGD.
            norm_weight_decay: weight decay on the LayerNorms' (and a conv stem's BatchNorms') scales and shifts;
                null: weight_decay (torchvision's --norm-weight-decay).
            bias_weight_decay: weight decay on every bias, the norms' shifts included (a value here wins over
                norm_weight_decay, as in torchvision); null: weight_decay, or norm_weight_decay for the norms'
                shifts (torchvision's --bias-weight-decay).
            transformer_embedding_decay: weight decay on the class token and the position embedding; null:
                weight_decay (torchvision's --transformer-embedding-decay; its ViT-B/16 recipe passes none of
                the three, so every parameter decays).
            betas: AdamW's moment decay rates (``optimizer: adamw`` only).
            momentum: SGD's Nesterov momentum (``optimizer: sgd`` only).
            label_smoothing: mass spread uniformly over all classes in the cross-entropy target.
            channels_last: keep the conv weights and the input images in NHWC order (``torch.channels_last``), the
                layout in which GPU tensor cores (and oneDNN on CPUs) run the patch embedding (and conv stem) fastest.
            compile: ``torch.compile`` the network (``nn.Module.compile``, after any FSDP2 sharding): the first steps
                pay the compilation; checkpoints keep the plain model's keys.
            fused: torch's fused optimizer kernel, one pass over all parameters. null (automatic): on for CPU
                parameters unless the precision is mixed and scales (16-mixed) or clips, where Lightning refuses it
                (``common.fused_by_default``); ResNet-18's SGD step 5.6 instead of 18 ms on 2 cores, the same update
                to float32 rounding. true / false: on / off (off: torch's default implementation).
            weights: start from pretrained weights: a torchvision weights name (``IMAGENET1K_V1`` when the options
                are those of one of torchvision's ViTs, or ``ViT_B_16_Weights.DEFAULT``), read offline from the
                torch hub cache, or a file (state dict, Lightning checkpoint, torchvision reference checkpoint).
                With another ``num_classes`` the head stays freshly initialised; with another ``image_size`` the
                position embedding is interpolated. Read when the module is built, so
                ``load_from_checkpoint(path, weights=None)`` skips it.
            layer_decay: layer-wise LR decay for fine-tuning (BEiT; timm's ``layer_decay``): block i (from 0) trains
                at ``lr × layer_decay ** (depth - i)``, the embeddings (and a conv stem) one step lower, the final
                norm and the head at ``lr``; each group's name is ``layer<id>/<decay group>``. null: one LR.
        """
        super().__init__(
            num_classes=num_classes, label_smoothing=label_smoothing, channels_last=channels_last, compile=compile,
            fused=fused,
        )
        check_number("in_channels", in_channels, "it must be a positive int", option=None, integer=True, at_least=1)
        check_number("image_size", image_size, "it must be a positive int", option=None, integer=True, at_least=1)
        check_model_arg("patch_size", patch_size, "a patch side is a positive int", integer=True, at_least=1)
        check_model_arg("depth", depth, "a ViT needs at least 1 encoder block", integer=True, at_least=1)
        check_model_arg("width", width, "the token dimension must be a positive int", integer=True, at_least=1)
        check_model_arg("heads", heads, "a block needs at least 1 attention head", integer=True, at_least=1)
        check_model_arg("mlp_dim", mlp_dim, "a block's MLP needs at least 1 hidden unit", integer=True, at_least=1)
        if conv_stem is not None and not all(type(c) is int and c >= 1 for c in conv_stem):
            raise ValueError(
                f"conv_stem={conv_stem!r} is invalid: every entry is a channel count >= 1 (--model.conv_stem)."
            )
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            check_model_arg(name, value, "it is a probability in [0, 1); 1 would drop everything", at_least=0, below=1)
        check_model_arg("lr", lr, "the peak learning rate must be > 0", above=0)
        check_model_arg("weight_decay", weight_decay, "use a value >= 0 (0 disables it)", at_least=0)
        if layer_decay is not None:
            check_model_arg("layer_decay", layer_decay, "use a value in (0, 1]; null disables it", above=0, at_most=1)
        for name, value in (("norm_weight_decay", norm_weight_decay), ("bias_weight_decay", bias_weight_decay),
                            ("transformer_embedding_decay", transformer_embedding_decay)):  # fmt: skip
            check_decay_switch(name, value)
        if image_size % patch_size:
            raise ValueError(
                f"patch_size={patch_size} does not divide image_size={image_size}: choose a patch size among "
                f"{[p for p in range(1, image_size + 1) if image_size % p == 0]}, or change the data's image_size."
            )
        if width % heads:
            raise ValueError(
                f"heads={heads} does not divide width={width}: choose heads among "
                f"{[h for h in range(1, min(width, 64) + 1) if width % h == 0]}, or change width."
            )
        if optimizer == "sgd" and tuple(betas) != (0.9, 0.999):
            raise ValueError(
                f"betas={tuple(betas)} is an AdamW setting but optimizer='sgd': drop --model.betas or use adamw."
            )
        if optimizer == "adamw" and momentum != 0.9:
            raise ValueError(
                f"momentum={momentum} is an SGD setting but optimizer='adamw': drop --model.momentum or use sgd."
            )
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer={optimizer!r} is not supported: use 'adamw' or 'sgd'.")
        if len(betas) != 2 or not all(type(b) in (int, float) and 0 <= b < 1 for b in betas):
            raise ValueError(
                f"betas={tuple(betas)} is invalid: give AdamW's 2 decay rates, each in [0, 1) (--model.betas)."
            )
        # torch's SGD refuses Nesterov without momentum; 1 or more never forgets a gradient and diverges.
        check_model_arg("momentum", momentum, "SGD's Nesterov momentum must lie in (0, 1)", above=0, below=1)
        strides = []
        if conv_stem:
            halvings = patch_size.bit_length() - 1
            if 2**halvings != patch_size or len(conv_stem) < halvings:
                raise ValueError(
                    f"conv_stem={conv_stem} with patch_size={patch_size}: a conv stem downsamples by 2 per stride-2 "
                    f"conv, so patch_size must be a power of 2 and conv_stem needs at least log2(patch_size) entries; "
                    "or --model.conv_stem null for the standard patchify layer (the digits defaults set a conv stem)."
                )
            strides = [1] * (len(conv_stem) - halvings) + [2] * halvings
        self.save_hyperparameters()
        self.model = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=depth,
            num_heads=heads,
            hidden_dim=width,
            mlp_dim=mlp_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            num_classes=num_classes,
            conv_stem_configs=[ConvStemConfig(c, 3, s) for c, s in zip(conv_stem, strides)] if conv_stem else None,
        )
        if conv_stem:
            # torchvision's stem is hard-wired to RGB too; swap its first conv for one with our channel count.
            first = self.model.conv_proj[0][0]
            self.model.conv_proj[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, first.stride, 1, bias=False)
        elif in_channels != 3:
            # torchvision's patch embedding is hard-wired to RGB; rebuild it with its own initialisation.
            proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
            nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / (in_channels * patch_size**2)))
            nn.init.zeros_(proj.bias)
            self.model.conv_proj = proj
        if weights is not None:
            load_pretrained(self.model, weights)
        if activation_checkpointing:
            self.model.encoder.layers = CheckpointedBlocks(OrderedDict(self.model.encoder.layers.named_children()))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        train_crop = getattr(self.trainer.datamodule, "train_crop_size", None)
        if stage == "fit" and train_crop is not None and train_crop != self.hparams.image_size:
            raise ValueError(
                f"data train_crop_size={train_crop} differs from image_size={self.hparams.image_size} (val_crop_size): "
                "a ViT's position embeddings fix one input size. Set --data.train_crop_size and "
                "--data.val_crop_size to the same value."
            )

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def build_optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(
            self.model,
            self.hparams.weight_decay,
            no_decay=("class_token", "encoder.pos_embedding"),
            norm_weight_decay=self.hparams.norm_weight_decay,
            bias_weight_decay=self.hparams.bias_weight_decay,
            embedding_weight_decay=self.hparams.transformer_embedding_decay,
        )
        if self.hparams.layer_decay is not None:
            groups = layer_decay_groups(self.model, groups, layer_decay=self.hparams.layer_decay, lr=self.hparams.lr)
        fused = fused_optimizer(self, self.fused)
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.hparams.lr, momentum=self.hparams.momentum, nesterov=True, **fused)
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=self.hparams.betas, **fused)


def main(args: Optional[list[str]] = None) -> None:
    run_cli(ViTClassifier, "vit_digits.yaml", args=args)


if __name__ == "__main__":
    main()
