"""Your own images, one folder per class: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from torchvision.transforms import v2

from lightning_recipes.datamodules.base import ImageClassificationDataModule, _check_positive_int, check_number

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(ImageClassificationDataModule):
    """A folder-per-class image data set read with torchvision's ``ImageFolder``, with ImageNet-style transforms.

    Layout: every subfolder of ``<root>/train`` is a class (names sorted alphabetically give labels 0, 1, ...);
    ``<root>/val`` must hold the same class folders. Files with an image extension
    (``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case, in nested folders too) are read and
    converted to RGB. ``test`` and ``predict`` use ``val``: keep a held-out copy elsewhere for a final score.

    Train: RandomResizedCrop(train_crop_size) [+ horizontal flip] [+ TrivialAugmentWide] + normalize
    [+ RandomErasing]. Val: Resize(val_resize_size) (shorter side) + CenterCrop(val_crop_size) + normalize.

    ``image_size`` is ``val_crop_size``, the size evaluated and predicted on. Training at a smaller
    ``train_crop_size`` (FixRes, Touvron et al., 2019) works with convolutional nets; a ViT with learned
    position embeddings needs ``train_crop_size == val_crop_size``.

    The folder layout is checked in ``__init__`` (directory listings only, stopping at the first image of each
    class), so a wrong path fails before a model is built.
    """

    in_channels = 3

    def __init__(
        self,
        *,
        root: str,
        train_crop_size: int = 224,
        val_resize_size: int = 256,
        val_crop_size: int = 224,
        hflip: bool = True,
        trivial_augment: bool = False,
        random_erasing: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
    ) -> None:
        """
        Args:
            root: folder that holds ``train/`` and ``val/``, each with one subfolder of images per class.
            train_crop_size: side of the random-resized crop taken from each training image.
            val_resize_size: the shorter side of a val image is resized to this before the center crop.
            val_crop_size: side of the center crop of val images; also ``image_size``.
            hflip: random horizontal flip of training images (turn off for text, digits, asymmetric classes).
            trivial_augment: add TrivialAugmentWide (Müller & Hutter, 2021) to training images.
            random_erasing: probability of RandomErasing (Zhong et al., 2020) on a training image; 0 disables it.
            mean: per-channel RGB mean subtracted after scaling pixels to [0, 1]; ImageNet's by default.
            std: per-channel RGB standard deviation divided by; ImageNet's by default.
            batch_size: images per step, per process.
            num_workers: DataLoader worker processes (JPEG decoding + augmentation runs there).
            pin_memory: page-lock batches for faster host-to-GPU copies; None = only when CUDA is present.
            persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        """
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers
        )
        for name, value in (
            ("train_crop_size", train_crop_size),
            ("val_resize_size", val_resize_size),
            ("val_crop_size", val_crop_size),
        ):
            _check_positive_int(name, value)
        if val_crop_size > val_resize_size:
            # CenterCrop larger than the resized image pads it with black borders.
            raise ValueError(
                f"val_crop_size={val_crop_size!r} is invalid with val_resize_size={val_resize_size!r}: "
                "the crop must not exceed the resized shorter side (--data.val_crop_size; torchvision uses 224 of 256)."
            )
        erasing = "it is a probability in [0, 1] (0 disables it)"
        check_number("random_erasing", random_erasing, erasing, option="--data.random_erasing", at_least=0, at_most=1)
        if len(mean) != 3 or not all(_is_finite(m) for m in mean):
            raise ValueError(f"mean={mean!r} is invalid: give 3 values, one per RGB channel, all finite (--data.mean).")
        if len(std) != 3 or not all(_is_finite(s) and s > 0 for s in std):
            raise ValueError(f"std={std!r} is invalid: give 3 positive values, one per RGB channel (--data.std).")
        self.root = root
        self.train_crop_size, self.val_resize_size, self.val_crop_size = train_crop_size, val_resize_size, val_crop_size
        self.hflip, self.trivial_augment, self.random_erasing = hflip, trivial_augment, float(random_erasing)
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = val_crop_size
        self.classes = _check_layout(root)
        self.num_classes = len(self.classes)
        self.save_hyperparameters()

    def train_transform(self) -> v2.Compose:
        steps: list = [v2.RandomResizedCrop(self.train_crop_size, antialias=True)]
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.trivial_augment:
            steps.append(v2.TrivialAugmentWide())
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        if self.random_erasing > 0:
            # After Normalize, as in torchvision's references: erased pixels become 0, the data set mean.
            steps.append(v2.RandomErasing(p=self.random_erasing))
        return v2.Compose(steps)

    def eval_transform(self) -> v2.Compose:
        return v2.Compose(
            [
                v2.Resize(self.val_resize_size, antialias=True),
                v2.CenterCrop(self.val_crop_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ImageFolder(os.path.join(self.root, "train"), transform=self.train_transform())
        if self.val_set is None:
            self.val_set = ImageFolder(os.path.join(self.root, "val"), transform=self.eval_transform())
            self.test_set = self.val_set


def _check_layout(root: str) -> list[str]:
    """Returns the class names of ``<root>/train`` after checking that ``val`` matches and no class is empty."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"root={root!r} is not a folder: point --data.root at the folder that holds train/ and val/."
        )
    classes = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"{split_dir!r} is missing: root={root!r} must hold train/ and val/, each with one folder per class."
            )
        try:
            classes[split], _ = find_classes(split_dir)  # the function ImageFolder itself calls
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{split_dir!r} has no class folders: put each class's images in {split_dir}/<class name>/."
            ) from None
    if classes["train"] != classes["val"]:
        # ImageFolder numbers each split's classes on its own: a mismatch would silently shift the labels.
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(
            f"train/ and val/ of {root!r} hold different class folders: only in train: {only_train}, "
            f"only in val: {only_val}. Every class needs a folder, with images, in both."
        )
    for split in ("train", "val"):
        for name in classes[split]:
            class_dir = os.path.join(root, split, name)
            if not _has_image(class_dir):
                raise FileNotFoundError(
                    f"class folder {class_dir!r} holds no image ({' '.join(IMG_EXTENSIONS)}): add images or "
                    f"remove the folder from both train/ and val/ (every subfolder of train/ is a class)."
                )
    return classes["train"]


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _has_image(folder: str) -> bool:
    # Stops at the first image, so a class of 10,000 files costs one directory read, not 10,000 stats.
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(entry.path)  # ImageFolder reads nested folders (following links) too
                elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    return True
    return False
