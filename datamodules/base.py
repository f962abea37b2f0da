"""The DataLoader plumbing that every image-classification data module here shares."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from typing_extensions import override

from lightning_recipes.callbacks.resumable_loader import RNGS, ResumableDataLoader


class ImageClassificationDataModule(LightningDataModule):
    """Base class: subclasses build ``self.train_set`` / ``self.val_set`` / ``self.test_set`` in ``setup``.

    Every subclass also sets ``num_classes``, ``in_channels`` and ``image_size`` (the side of the square
    image the model receives) in ``__init__``, so that a recipe's CLI can link them to the model before
    anything trains.
    """

    #: The global RNGs the train loader seeds before each sample (``ResumableDataLoader(seed_rngs=...)``): all three
    #: here; a subclass whose training transforms draw from fewer names only those (DigitsDataModule: torch).
    augmentation_rngs: tuple[str, ...] = RNGS

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
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ra_reps: int = 1,
    ) -> None:
        """
        Args:
            batch_size, num_workers, pin_memory, persistent_workers: the DataLoader's; see the subclasses.
            mixup_alpha: MixUp's Beta(alpha, alpha) on training batches (Zhang et al., 2018); 0 disables it.
            cutmix_alpha: CutMix's Beta(alpha, alpha) on training batches (Yun et al., 2019); 0 disables it.
            ra_reps: repeated augmentation (Hoffer et al., 2020): each training image appears this many times per
                epoch, differently augmented, spread over the processes (torchvision's ``--ra-reps``); 1 disables it.
        """
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
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            check_number(name, value, "Beta's alpha must be a finite value >= 0 (0 disables it)",
                         option=f"--data.{name}", at_least=0)  # fmt: skip
        reps = "the copies of each image per epoch are an int >= 1 (1 disables repeated augmentation)"
        check_number("ra_reps", ra_reps, reps, option="--data.ra_reps", integer=True, at_least=1)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mixup_alpha, self.cutmix_alpha, self.ra_reps = float(mixup_alpha), float(cutmix_alpha), ra_reps
        self._mixer: Optional[v2.Transform] = None
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
            repeated_augmentations=self.ra_reps,
            seed_rngs=self.augmentation_rngs,
        )

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """MixUp / CutMix on a training batch, on its device: ``(images, labels)`` -> ``(images, soft targets)``.

        torchvision's ``train.py`` recipe: one of ``v2.MixUp`` / ``v2.CutMix`` per batch, chosen with p = 0.5
        (``v2.RandomChoice``), each pairing image i with image i - 1 of the batch. The targets become float
        ``(batch, num_classes)`` rows summing to 1. The draws come from torch's global (CPU) RNG, which
        ResumableCheckpoint saves, so a mid-epoch resume mixes the same way. Validation, test and predict
        batches keep their integer labels. Lightning calls this hook only for a data module given to the
        Trainer (``trainer.fit(model, datamodule=...)``).
        """
        if self.trainer is None or not self.trainer.training or (self.mixup_alpha == 0 and self.cutmix_alpha == 0):
            return batch
        if self._mixer is None:
            self._mixer = batch_mixer(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                                      num_classes=self.num_classes)  # fmt: skip
        images, labels = batch
        return self._mixer(images, labels)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def batch_mixer(*, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Optional[v2.Transform]:
    """MixUp / CutMix of a batch, one of them chosen with p = 0.5: torchvision's ``get_mixup_cutmix`` (``train.py``).

    None when both alphas are 0. With one alpha > 0 it is a ``RandomChoice`` of that one alone, as the reference
    builds it, so the draws from torch's global RNG are the reference's.
    """
    mixers: list[v2.Transform] = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


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
