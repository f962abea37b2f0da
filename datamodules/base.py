"""The DataLoader plumbing that every image-classification data module here shares."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class ImageClassificationDataModule(LightningDataModule):
    """Base class: subclasses build ``self.train_set`` / ``self.val_set`` / ``self.test_set`` in ``setup``.

    Every subclass also sets ``num_classes``, ``in_channels`` and ``image_size`` (the side of the square
    image the model receives) in ``__init__``, so that a recipe's CLI can link them to the model before
    anything trains.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int,
        pin_memory: Optional[bool],
        persistent_workers: bool,
    ) -> None:
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} is invalid: use 0 (load in the main process) or a positive int.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        # None = pin when CUDA is there to receive the batches; pinning on a CPU-only run only costs time.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # Workers that outlive an epoch skip the fork + dataset pickling at every epoch start.
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _loader(self, dataset: Optional[Dataset], *, shuffle: bool, drop_last: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split yet; call setup(stage) first.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be a positive int.")
