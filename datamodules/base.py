"""The DataLoader plumbing that every image-classification data module here shares."""

from __future__ import annotations

import math
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader


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
        check_number(
            "num_workers",
            num_workers,
            "use 0 (load in the main process) or a positive int",
            option="--data.num_workers",
            integer=True,
            at_least=0,
        )
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
        # A ResumableDataLoader: its position in the epoch (and the order's seed) is its own state_dict, which
        # Lightning saves in every checkpoint, so a mid-epoch resume continues with the next batch exactly. Under
        # overfit_batches Lightning swaps in a SequentialSampler, which only a plain DataLoader accepts.
        if self.trainer is not None and self.trainer.overfit_batches > 0:
            return self._loader(self.train_set, shuffle=True)
        if self.train_set is None:
            return self._loader(None, shuffle=True)  # the error
        # The data-parallel ranks as the Trainer's strategy defines them (what GradientAccumulation and LRSchedule
        # count as data-parallel processes too); without a Trainer, the process group's.
        ranks = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_replicas=ranks.get("num_replicas"),
            rank=ranks.get("rank"),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def check_number(
    name: str,
    value: object,
    allowed: str,
    *,
    option: Optional[str],
    integer: bool = False,
    at_least: float = -math.inf,
    above: float = -math.inf,
    below: float = math.inf,
    at_most: float = math.inf,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number (an int if ``integer``) within the bounds given.

    The message quotes the value, names the argument and its command-line option and says what is allowed:
    ``depth=0 is invalid: a ViT needs at least 1 encoder block (--model.depth).`` Shared by the data modules
    and the recipes; ``option=None`` for an argument the CLI links from the data module instead of exposing it.
    """
    number = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not number or not (at_least <= value <= at_most and above < value < below):
        raise ValueError(f"{name}={value!r} is invalid: {allowed}" + (f" ({option})." if option else "."))


def _check_positive_int(name: str, value: object) -> None:
    check_number(name, value, "it must be a positive int", option=f"--data.{name}", integer=True, at_least=1)
