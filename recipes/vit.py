"""Vision Transformer recipe: torchvision's ViT, AdamW, LayerNorm, clipping by norm, warmup + cosine.

    python recipes/vit.py fit                       # digits, offline, a couple of minutes on 2 CPU cores
    python recipes/vit.py fit --config recipes/configs/vit_cifar10.yaml
    python recipes/vit.py fit --print_config        # every option and its default
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torchvision.models import VisionTransformer

from lightning_recipes.recipes.common import ImageClassifier, param_groups, run_cli


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
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        label_smoothing: float = 0.1,
        warmup_fraction: float = 0.1,
        min_lr_factor: float = 0.0,
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
            dropout: dropout after the embedding, attention output and MLP.
            attention_dropout: dropout on the attention weights.
            lr: peak AdamW learning rate (reached after warmup).
            weight_decay: decoupled weight decay on matrices only (not norms, biases, pos-embedding, class token).
            betas: AdamW's moment decay rates.
            label_smoothing: mass spread uniformly over all classes in the cross-entropy target.
            warmup_fraction: share of the optimizer steps spent in linear warmup.
            min_lr_factor: the cosine decay ends at ``min_lr_factor × lr``.
        """
        super().__init__(
            num_classes=num_classes,
            label_smoothing=label_smoothing,
            warmup_fraction=warmup_fraction,
            min_lr_factor=min_lr_factor,
        )
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
        )
        if in_channels != 3:
            # torchvision's patch embedding is hard-wired to RGB; rebuild it with its own initialisation.
            proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
            nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / (in_channels * patch_size**2)))
            nn.init.zeros_(proj.bias)
            self.model.conv_proj = proj

    def build_optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(
            self.model, self.hparams.weight_decay, no_decay=("class_token", "encoder.pos_embedding")
        )
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=self.hparams.betas)


def main(args: Optional[list[str]] = None) -> None:
    run_cli(ViTClassifier, "vit_digits.yaml", args=args)


if __name__ == "__main__":
    main()
