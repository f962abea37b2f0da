"""CIFAR-10 (torchvision's loader): 50,000 training and 10,000 test images, 32×32 RGB, 10 classes."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torchvision.datasets import CIFAR10
from torchvision.transforms import v2

from lightning_recipes.datamodules.base import ImageClassificationDataModule, check_number

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

    Nothing touches the network unless ``download=True``. Files present on disk are always checked against
    torchvision's md5 sums, so a truncated copy fails loudly instead of training on garbage.
    """

    num_classes = 10
    in_channels = 3
    image_size = 32

    def __init__(
        self,
        *,
        data_dir: str = "data",
        download: bool = False,
        trivial_augment: bool = False,
        random_erasing: float = 0.0,
        batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
    ) -> None:
        """
        Args:
            data_dir: folder that holds (or will receive) ``cifar-10-batches-py/``.
            download: fetch the 170 MB archive from cs.toronto.edu in ``prepare_data`` when the files are missing.
            trivial_augment: add TrivialAugmentWide (Müller & Hutter, 2021) after crop + flip on training images.
            random_erasing: probability of RandomErasing (Zhong et al., 2020) on a training image; 0 disables it.
            batch_size: images per step, per process.
            num_workers: DataLoader worker processes (PIL decoding + augmentation runs there).
            pin_memory: page-lock batches for faster host-to-GPU copies; None = only when CUDA is present.
            persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
        """
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers
        )
        erasing = "it is a probability in [0, 1] (0 disables it)"
        check_number("random_erasing", random_erasing, erasing, option="--data.random_erasing", at_least=0, at_most=1)
        self.data_dir = data_dir
        self.download = download
        self.trivial_augment = trivial_augment
        self.random_erasing = float(random_erasing)
        self.classes = list(CIFAR10_CLASSES)
        self.save_hyperparameters()

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.data_dir, CIFAR10.base_folder)

    def train_transform(self) -> v2.Compose:
        steps: list = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
        if self.trivial_augment:
            steps.append(v2.TrivialAugmentWide())
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        if self.random_erasing > 0:
            # After Normalize, as in torchvision's references: erased pixels become 0, the data set mean.
            steps.append(v2.RandomErasing(p=self.random_erasing))
        return v2.Compose(steps)

    def eval_transform(self) -> v2.Compose:
        return v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        )

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
