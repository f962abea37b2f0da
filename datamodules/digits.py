"""scikit-learn's bundled handwritten digits: the offline default data set of every recipe."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.functional import grid_sample
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

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


class RandomAffineNormalize:
    """``v2.Compose([v2.RandomAffine(bilinear, fill 0), v2.Normalize])`` on one image tensor, bit for bit, and cheaper.

    The same draws from torch's global RNG as ``RandomAffine.make_params`` (angle, then the x and y shifts rounded to
    whole pixels, then the zoom; no shear, centre of the image) and the same float32 operations as torchvision
    0.24's ``affine_image`` kernel (inverse matrix, ``_affine_grid``, ``grid_sample`` with a mask channel for the fill)
    and ``normalize_image``. What it leaves out is v2's per-call dispatch (pytree flattening, input checks, kernel
    lookup), which at 16 px costs several times the kernel itself. With the resize done once in ``setup``, loading a
    16-px training batch takes a quarter of the CPU time it did (it had been about a fifth of a digits ViT step's).
    tests/test_digits.py compares it with torchvision's transforms by ``torch.equal``.
    """

    def __init__(
        self,
        *,
        degrees: float,
        translate: float,
        scale: tuple[float, float],
        mean: float,
        std: float,
        size: int,
    ) -> None:
        self.degrees, self.translate, self.scale = float(degrees), float(translate), tuple(scale)
        self.mean = torch.tensor([mean]).view(-1, 1, 1)
        self.std = torch.tensor([std]).view(-1, 1, 1)
        # _affine_grid's base grid (pixel centres, then 1) depends only on the size: built once, not per image.
        self.base_grid = torch.empty(1, size, size, 3)
        line = torch.linspace((1.0 - size) * 0.5, (size - 1.0) * 0.5, steps=size)
        self.base_grid[..., 0].copy_(line)
        self.base_grid[..., 1].copy_(line.unsqueeze(-1))
        self.base_grid[..., 2].fill_(1)
        self.half_size = torch.tensor([0.5 * size, 0.5 * size])
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        channels, height, width = image.shape
        if (height, width) != (self.size, self.size):
            raise ValueError(f"RandomAffineNormalize was built for {self.size}x{self.size} images, got {height}x{width}")
        angle = torch.empty(1).uniform_(-self.degrees, self.degrees).item()
        max_dx, max_dy = float(self.translate * width), float(self.translate * height)
        tx = int(round(float(torch.empty(1).uniform_(-max_dx, max_dx).item())))
        ty = int(round(float(torch.empty(1).uniform_(-max_dy, max_dy).item())))
        zoom = torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
        # torchvision's _get_inverse_affine_matrix with shear 0 and centre (0, 0), in its order of operations.
        rot = math.radians(angle)
        a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
        matrix = [d / zoom, -b / zoom, 0.0, -c / zoom, a / zoom, 0.0]
        matrix[2] += 0.0 - matrix[0] * float(tx) - matrix[1] * float(ty)
        matrix[5] += 0.0 - matrix[3] * float(tx) - matrix[4] * float(ty)
        theta = torch.tensor(matrix).view(1, 2, 3).transpose(1, 2).div_(self.half_size)
        grid = self.base_grid.view(1, height * width, 3).bmm(theta).view(1, height, width, 2)
        # The fill of the area moved in from outside: a mask channel sampled with the image (torchvision's trick).
        sampled = grid_sample(
            torch.cat((image.unsqueeze(0), torch.ones(1, 1, height, width)), dim=1),
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        image, mask = sampled[0, :channels], sampled[0, channels:]
        return (image * mask).sub_(self.mean).div_(self.std)


class DigitsDataModule(ImageClassificationDataModule):
    """1,797 real 8×8 grey-scale handwritten digits (UCI, via scikit-learn): no download, ever.

    Split: stratified 80/20 with ``split_seed=0``, i.e. exactly
    ``train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)``, the split on which
    ``SVC(gamma=0.001, C=10)`` scores 98.9%. That gives 1,437 training and 360 held-out images.
    Digits has no third split: ``val``, ``test`` and ``predict`` all use the same 360 held-out images,
    which are never trained on.
    """

    #: RandomAffineNormalize draws from torch's global RNG alone: the train loader seeds only it per sample.
    augmentation_rngs = ("torch",)

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
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ra_reps: int = 1,
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
            mixup_alpha: MixUp's Beta(alpha, alpha) on training batches (Zhang et al., 2018); 0 disables it.
            cutmix_alpha: CutMix's Beta(alpha, alpha) on training batches (Yun et al., 2019); 0 disables it.
            ra_reps: repeated augmentation: copies of each training image per epoch, each augmented differently
                (torchvision's ``--ra-reps``); 1 disables it.
            val_fraction: share of the 1,797 images held out (stratified).
            split_seed: seed of the stratified split; keep 0 to compare with the published numbers.
        """
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, ra_reps=ra_reps,
        )  # fmt: skip
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

    def _normalize(self, images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        # v2.Normalize's operations (normalize_image), once for the whole set instead of once per sample.
        return images.sub(torch.tensor([mean]).view(-1, 1, 1)).div_(torch.tensor([std]).view(-1, 1, 1))

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
        train_images, held_out_images = images[train_idx], images[held_out_idx]
        mean, std = train_images.mean().item(), train_images.std().item()  # of the native 8×8 training images
        if self.image_size != 8:
            # Resizing is deterministic: done once here (the same pixels as v2.Resize on each sample, by test).
            train_images = F.resize(train_images, [self.image_size], antialias=True)
            held_out_images = F.resize(held_out_images, [self.image_size], antialias=True)
        if self.augment:
            augment = RandomAffineNormalize(
                degrees=self.max_rotation,
                translate=self.max_translate,
                scale=self.scale,
                mean=mean,
                std=std,
                size=self.image_size,
            )
            self.train_set = TensorImageDataset(train_images, targets[train_idx], augment)
        else:
            self.train_set = TensorImageDataset(self._normalize(train_images, mean, std), targets[train_idx])
        self.val_set = TensorImageDataset(self._normalize(held_out_images, mean, std), targets[held_out_idx])
        self.test_set = self.val_set
