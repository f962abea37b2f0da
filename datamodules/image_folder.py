"""Your own images, one folder per class: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg``."""

from __future__ import annotations

import os
from typing import Optional

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from torchvision.transforms import v2

from lightning_recipes.datamodules.base import ImageClassificationDataModule, _check_positive_int
from lightning_recipes.datamodules.transforms import (
    AUGMIX_SEVERITY,
    RA_MAGNITUDE,
    AutoAugment,
    Interpolation,
    check_augment_options,
    eval_transform,
    resolve_eval_settings,
    train_transform,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(ImageClassificationDataModule):
    """A folder-per-class image data set read with torchvision's ``ImageFolder``, with ImageNet-style transforms.

    Layout: every subfolder of ``<root>/train`` is a class (names sorted alphabetically give labels 0, 1, ...);
    ``<root>/val`` must hold the same class folders. Files with an image extension
    (``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case, in nested folders too) are read and
    converted to RGB. ``test`` and ``predict`` use ``val``: keep a held-out copy elsewhere for a final score.

    The transforms are torchvision's classification presets (references/classification/presets.py). Train:
    RandomResizedCrop(train_crop_size) [+ horizontal flip] [+ auto-augment] + normalize [+ RandomErasing], then
    [MixUp / CutMix] per batch. Val: Resize(val_resize_size) (shorter side) + CenterCrop(val_crop_size) + normalize,
    or exactly a torchvision weights' eval transforms with ``weights_transforms``.

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
        val_resize_size: Optional[int] = None,
        val_crop_size: Optional[int] = None,
        hflip: bool = True,
        auto_augment: Optional[AutoAugment] = None,
        ra_magnitude: int = RA_MAGNITUDE,
        augmix_severity: int = AUGMIX_SEVERITY,
        interpolation: Optional[Interpolation] = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ra_reps: int = 1,
        weights_transforms: Optional[str] = None,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
    ) -> None:
        """
        Args:
            root: folder that holds ``train/`` and ``val/``, each with one subfolder of images per class.
            train_crop_size: side of the random-resized crop taken from each training image.
            val_resize_size: the shorter side of a val image is resized to this before the center crop;
                None = 256, or the weights' with ``weights_transforms``.
            val_crop_size: side of the center crop of val images; also ``image_size``. None = 224, or the weights'.
            hflip: random horizontal flip of training images (turn off for text, digits, asymmetric classes).
            auto_augment: policy after crop + flip (torchvision's ``--auto-augment``): "ra" RandAugment (2 ops),
                "ta_wide" TrivialAugmentWide, "augmix" AugMix, "imagenet" / "cifar10" / "svhn" AutoAugment.
            ra_magnitude: RandAugment's magnitude, 0-30 (with ``auto_augment="ra"``).
            augmix_severity: AugMix's severity, 1-10 (with ``auto_augment="augmix"``).
            interpolation: of the resizes and of the auto-augment policy's geometric ops; None = "bilinear"
                (torchvision's ``--interpolation`` default), or the weights'.
            random_erasing: probability of RandomErasing (Zhong et al., 2020) on a training image; 0 disables it.
            mixup_alpha: MixUp's Beta(alpha, alpha) on training batches (Zhang et al., 2018); 0 disables it.
            cutmix_alpha: CutMix's Beta(alpha, alpha) on training batches (Yun et al., 2019); 0 disables it.
            ra_reps: repeated augmentation: copies of each training image per epoch (torchvision's ``--ra-reps``
                with ``--ra-sampler``); 1 disables it.
            weights_transforms: a torchvision weights name, e.g. "ResNet50_Weights.IMAGENET1K_V2": evaluate with
                its transforms (sets the val sizes, mean, std and interpolation; nothing is downloaded).
            mean: per-channel RGB mean subtracted after scaling pixels to [0, 1]; None = ImageNet's, or the weights'.
            std: per-channel RGB standard deviation divided by; None = ImageNet's, or the weights'.
            batch_size: images per step, per process.
            num_workers: DataLoader worker processes (JPEG decoding + augmentation runs there).
            pin_memory: page-lock batches for faster host-to-GPU copies; None = only when CUDA is present.
            persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        """
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers,
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, ra_reps=ra_reps,
        )  # fmt: skip
        check_augment_options(auto_augment=auto_augment, ra_magnitude=ra_magnitude, augmix_severity=augmix_severity,
                              interpolation=interpolation, random_erasing=random_erasing)  # fmt: skip
        given = dict(val_resize_size=val_resize_size, val_crop_size=val_crop_size, mean=mean, std=std,
                     interpolation=interpolation)  # fmt: skip
        _check_positive_int("train_crop_size", train_crop_size)
        defaults = dict(val_resize_size=256, val_crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        interpolation="bilinear")  # fmt: skip
        settings = resolve_eval_settings(weights_transforms, given, defaults, crop_hint="; torchvision uses 224 of 256")
        self.root = root
        self.train_crop_size = train_crop_size
        self.val_resize_size, self.val_crop_size = settings["val_resize_size"], settings["val_crop_size"]
        self.hflip, self.random_erasing = hflip, float(random_erasing)
        self.auto_augment, self.ra_magnitude, self.augmix_severity = auto_augment, ra_magnitude, augmix_severity
        self.interpolation: str = settings["interpolation"]
        self.weights_transforms = weights_transforms
        self.mean, self.std = tuple(settings["mean"]), tuple(settings["std"])
        self.image_size = self.val_crop_size
        self.classes = _check_layout(root)
        self.num_classes = len(self.classes)
        self.save_hyperparameters()

    def train_transform(self) -> v2.Compose:
        mode = v2.InterpolationMode(self.interpolation)
        return train_transform(
            [v2.RandomResizedCrop(self.train_crop_size, interpolation=mode, antialias=True)],
            hflip=self.hflip, auto_augment=self.auto_augment, interpolation=self.interpolation,
            ra_magnitude=self.ra_magnitude, augmix_severity=self.augmix_severity, mean=self.mean, std=self.std,
            random_erasing=self.random_erasing,
        )  # fmt: skip

    def eval_transform(self) -> v2.Compose:
        return eval_transform(resize_size=self.val_resize_size, crop_size=self.val_crop_size,
                              interpolation=self.interpolation, mean=self.mean, std=self.std)  # fmt: skip

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
