"""scikit-learn's bundled handwritten digits: the offline default data set of every recipe."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_recipes.datamodules.base import ImageClassificationDataModule, _check_positive_int, check_number

N_IMAGES = 1797  # len(load_digits().target)


class TensorImageDataset(Dataset):
    """Images held in memory as one float tensor, transformed one sample at a time."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Optional[Callable] = None) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class DigitsDataModule(ImageClassificationDataModule):
    """1,797 real 8×8 grey-scale handwritten digits (UCI, via scikit-learn): no download, ever.

    Split: stratified 80/20 with ``split_seed=0``, i.e. exactly
    ``train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)``, the split on which
    ``SVC(gamma=0.001, C=10)`` scores 98.9%. That gives 1,437 training and 360 held-out images.
    Digits has no third split: ``val``, ``test`` and ``predict`` all use the same 360 held-out images,
    which are never trained on.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        *,
        image_size: int = 8,
        augment: bool = True,
        max_rotation: float = 10.0,
        max_translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        """
        Args:
            image_size: side of the square image given to the model; the native 8×8 images are resized
                (bilinear) when it differs.
            augment: random affine on training images (rotation, shift, scale); off for val/test.
            max_rotation: largest rotation in degrees, either way.
            max_translate: largest shift, as a fraction of the image side.
            scale: range of the random zoom factor.
            batch_size: images per step, per process.
            num_workers: DataLoader worker processes; 0 is fastest here because the data is in memory.
            pin_memory: page-lock batches for faster host-to-GPU copies; None = only when CUDA is present.
            persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
            val_fraction: share of the 1,797 images held out (stratified).
            split_seed: seed of the stratified split; keep 0 to compare with the published numbers.
        """
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers
        )
        _check_positive_int("image_size", image_size)
        rotation = "the largest rotation must lie in [0, 180] degrees"
        check_number("max_rotation", max_rotation, rotation, option="--data.max_rotation", at_least=0, at_most=180)
        translate = "the largest shift is a fraction of the image side, in [0, 1]"
        check_number("max_translate", max_translate, translate, option="--data.max_translate", at_least=0, at_most=1)
        finite = len(scale) == 2 and all(isinstance(s, (int, float)) and math.isfinite(s) for s in scale)
        if not finite or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale={scale!r} is invalid: give (low, high) with 0 < low <= high (--data.scale).")
        between = "it must lie strictly between 0 and 1"
        check_number("val_fraction", val_fraction, between, option="--data.val_fraction", above=0, below=1)
        held_out = math.ceil(val_fraction * N_IMAGES)  # how scikit-learn's train_test_split rounds
        if min(held_out, N_IMAGES - held_out) < self.num_classes:
            # A stratified split needs one image of every class on each side; scikit-learn would fail in setup().
            raise ValueError(
                f"val_fraction={val_fraction!r} is invalid: it holds out {held_out:,} of the {N_IMAGES:,} images, and"
                f" each side of the stratified split needs at least {self.num_classes} (one per class): use a value"
                " in [0.006, 0.994] (--data.val_fraction)."
            )
        seed = "scikit-learn takes a seed in [0, 2**32 - 1]"
        check_number("split_seed", split_seed, seed, option="--data.split_seed", integer=True, at_least=0, below=2**32)
        self.image_size = image_size
        self.augment = augment
        self.max_rotation, self.max_translate, self.scale = max_rotation, max_translate, tuple(scale)
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.save_hyperparameters()

    def _transforms(self, mean: float, std: float) -> tuple[v2.Compose, v2.Compose]:
        resize = [] if self.image_size == 8 else [v2.Resize(self.image_size, antialias=True)]
        normalize = v2.Normalize([mean], [std])
        evaluate = v2.Compose([*resize, normalize])
        if not self.augment:
            return evaluate, evaluate
        affine = v2.RandomAffine(
            degrees=self.max_rotation,
            translate=(self.max_translate, self.max_translate),
            scale=self.scale,
            interpolation=v2.InterpolationMode.BILINEAR,
        )
        return v2.Compose([*resize, affine, normalize]), evaluate

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        train_idx, held_out_idx = train_test_split(
            range(len(digits.target)),
            test_size=self.val_fraction,
            stratify=digits.target,
            random_state=self.split_seed,
        )
        # Pixel values are counts 0..16 of an 4×4 block; scale to [0, 1].
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        targets = torch.tensor(digits.target, dtype=torch.long)
        train_images = images[train_idx]
        train_tf, eval_tf = self._transforms(train_images.mean().item(), train_images.std().item())
        self.train_set = TensorImageDataset(train_images, targets[train_idx], train_tf)
        self.val_set = TensorImageDataset(images[held_out_idx], targets[held_out_idx], eval_tf)
        self.test_set = self.val_set
