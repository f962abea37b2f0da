"""CIFAR-10 (torchvision's loader): 50,000 training and 10,000 test images, 32×32 RGB, 10 classes."""

from __future__ import annotations

import os
from typing import Optional

from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from lightning_recipes.datamodules.base import ImageClassificationDataModule
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

# Per-channel statistics of the 50,000 training images (the values torchvision's and timm's CIFAR recipes use).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# Label order of batches.meta: label i is CIFAR10_CLASSES[i].
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py/``, with the standard crop + flip augmentation.

    Split: train = the five training batches (50,000 images); ``val``, ``test`` and ``predict`` all use the
    official test batch (10,000 images), as torchvision's classification references and most CIFAR papers
    do. CIFAR-10 has no separate validation split, so a number reported on ``val`` is a test number: do not
    tune hyper-parameters on it if you want an unbiased final score.

    Train: RandomCrop(32, padding=4) [+ Resize(val_crop_size)] + horizontal flip [+ auto-augment] + normalize
    [+ RandomErasing], then [MixUp / CutMix] per batch, in the order of torchvision's presets. Val: the 32×32
    image normalized; with ``val_resize_size`` / ``val_crop_size`` (or ``weights_transforms``, to fine-tune
    pretrained weights at their resolution), Resize + CenterCrop first, and training images are resized to
    ``val_crop_size`` after their crop, so that ``image_size`` is one size for both.

    Nothing touches the network unless ``download=True``. Files present on disk are always checked against
    torchvision's md5 sums, so a truncated copy fails loudly instead of training on garbage.
    """

    num_classes = 10
    in_channels = 3

    def __init__(
        self,
        *,
        data_dir: str = "data",
        download: bool = False,
        auto_augment: Optional[AutoAugment] = None,
        ra_magnitude: int = RA_MAGNITUDE,
        augmix_severity: int = AUGMIX_SEVERITY,
        interpolation: Optional[Interpolation] = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ra_reps: int = 1,
        weights_transforms: Optional[str] = None,
        val_resize_size: Optional[int] = None,
        val_crop_size: Optional[int] = None,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
    ) -> None:
        """
        Args:
            data_dir: folder that holds (or will receive) ``cifar-10-batches-py/``.
            download: fetch the 170 MB archive from cs.toronto.edu in ``prepare_data`` when the files are missing.
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
            val_resize_size: shorter side val images are resized to; None = 32 (no resize), or the weights'.
            val_crop_size: side of the center crop of val images, and of training images; also ``image_size``.
                None = 32, or the weights'.
            mean: per-channel RGB mean subtracted after scaling pixels to [0, 1]; None = CIFAR-10's, or the weights'.
            std: per-channel RGB standard deviation divided by; None = CIFAR-10's, or the weights'.
            batch_size: images per step, per process.
            num_workers: DataLoader worker processes (PIL decoding + augmentation runs there).
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
        defaults = dict(val_resize_size=32, val_crop_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                        interpolation="bilinear")  # fmt: skip
        settings = resolve_eval_settings(weights_transforms, given, defaults)
        self.data_dir = data_dir
        self.download = download
        self.auto_augment, self.ra_magnitude, self.augmix_severity = auto_augment, ra_magnitude, augmix_severity
        self.interpolation: str = settings["interpolation"]
        self.random_erasing = float(random_erasing)
        self.weights_transforms = weights_transforms
        self.val_resize_size, self.val_crop_size = settings["val_resize_size"], settings["val_crop_size"]
        self.mean, self.std = tuple(settings["mean"]), tuple(settings["std"])
        self.image_size = self.val_crop_size
        self.classes = list(CIFAR10_CLASSES)
        self.save_hyperparameters()

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.data_dir, CIFAR10.base_folder)

    def train_transform(self) -> v2.Compose:
        crop: list[v2.Transform] = [v2.RandomCrop(32, padding=4)]
        if self.val_crop_size != 32:
            crop.append(v2.Resize(self.val_crop_size, interpolation=v2.InterpolationMode(self.interpolation),
                                  antialias=True))  # fmt: skip
        return train_transform(
            crop, hflip=True, auto_augment=self.auto_augment, interpolation=self.interpolation,
            ra_magnitude=self.ra_magnitude, augmix_severity=self.augmix_severity, mean=self.mean, std=self.std,
            random_erasing=self.random_erasing,
        )  # fmt: skip

    def eval_transform(self) -> v2.Compose:
        native = (self.val_resize_size, self.val_crop_size) == (32, 32)  # the stored size: nothing to resize
        return eval_transform(
            resize_size=None if native else self.val_resize_size, crop_size=None if native else self.val_crop_size,
            interpolation=self.interpolation, mean=self.mean, std=self.std,
        )  # fmt: skip

    def _check_files(self) -> None:
        # Existence only (cheap); torchvision's md5 check runs when the data set is built.
        names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        missing = [name for name in names if not os.path.isfile(os.path.join(self.dataset_dir, name))]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: {self.dataset_dir!r} lacks {', '.join(missing)}. "
                f"Pass --data.download true (download=True) to fetch it, or copy the extracted "
                f"cifar-10-batches-py/ folder of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there."
            )

    def prepare_data(self) -> None:
        if self.download:
            # Builds the small test split only; the call downloads and extracts the whole archive when needed.
            CIFAR10(self.data_dir, train=False, download=True)
        self._check_files()

    def _dataset(self, *, train: bool, transform: v2.Compose) -> CIFAR10:
        try:
            return CIFAR10(self.data_dir, train=train, transform=transform, download=False)
        except RuntimeError as err:
            raise RuntimeError(
                f"CIFAR-10 files in {self.dataset_dir!r} fail torchvision's md5 check (truncated or altered copy). "
                f"Delete that folder and rerun with --data.download true (download=True)."
            ) from err

    def setup(self, stage: Optional[str] = None) -> None:
        # prepare_data runs on one process per node; every process checks again before reading.
        self._check_files()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(train=True, transform=self.train_transform())
        if self.val_set is None:
            self.val_set = self._dataset(train=False, transform=self.eval_transform())
            self.test_set = self.val_set
