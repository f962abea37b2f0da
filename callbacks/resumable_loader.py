"""A train ``DataLoader`` that resumes mid-epoch exactly: its position is its own ``state_dict``.

Copy this one file into your project: it needs torch only (Lightning finds it by its ``state_dict`` /
``load_state_dict`` methods, and saves and restores it with the fit loop).

    loader = ResumableDataLoader(dataset, batch_size=32, shuffle=True, num_workers=2)

Its state is ``{"seed", "epoch", "batches"}``: the base seed of the shuffle, the epoch, and how many batches of that
epoch it has handed out. ``load_state_dict`` makes the next iterator start at the first batch not handed out, in the
same order. The order is ``DistributedSampler``'s (a permutation seeded by ``seed + epoch``, split across the
data-parallel ranks), so it is correct under DDP / FSDP as it is, and Lightning leaves the sampler alone.

Random augmentations are reproducible too: before each sample is loaded, the global torch, Python and NumPy RNGs are
seeded from (seed, epoch, position in the epoch's global order). A sample therefore gets the same augmentation
whichever worker loads it, before or after a resume. (The order and augmentations differ from a plain
``DataLoader``'s, which draws them from the global RNG; they are equally random.) ``seed_rngs=("torch",)`` seeds
only the RNGs named, for transforms known to draw from them alone (torchvision's v2 transforms draw from torch's):
the same draws from those, and about 8 us less per sample (Python's ``random.seed`` is the dearest, ~5.5 us).

``repeated_augmentations=k`` (k > 1) is repeated augmentation (Hoffer et al., 2020; DeiT), in the order of
torchvision's ``RASampler`` (references/classification/sampler.py; timm's ``RepeatAugSampler`` with
``selected_round=256``): each epoch's permutation repeats every index k times in a row, is padded to a multiple of
the replicas and dealt out round-robin, so the k copies of an image go to k consecutive ranks; each rank keeps the
first ``len(dataset) // 256 * 256 / num_replicas`` of its share. An epoch thus still has about ``len(dataset)``
samples over all ranks but about ``len(dataset) / k`` distinct images. The seeds are by position, so the k copies
are augmented differently.

Worker processes ignore SIGTERM and SIGUSR1 (SLURM and torchrun signal the whole process group): the main process
decides when to stop, saves, and its workers end with it.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)

__all__ = ["ResumableDataLoader"]

_MASK64 = (1 << 64) - 1


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    """SplitMix64 of (seed, epoch, position in the epoch's global order): one independent stream per sample."""
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + (position + 1) * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


#: The global RNGs a ``ResumableDataLoader`` can seed per sample.
RNGS = ("torch", "random", "numpy")


def _seed_all(seed: int, rngs: tuple[str, ...] = RNGS) -> None:
    if "torch" in rngs:
        torch.random.default_generator.manual_seed(seed)  # CPU only: never reseeds (or initialises) CUDA
    if "random" in rngs:
        random.seed(seed)
    numpy = sys.modules.get("numpy") if "numpy" in rngs else None  # only if imported: else nothing draws from it
    if numpy is not None:
        numpy.random.seed(seed & 0xFFFFFFFF)


def _default_seed() -> int:
    """Lightning's ``seed_everything`` seed (``PL_GLOBAL_SEED``), else torch's initial seed; rank zero's if distributed."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % (1 << 62)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def _check_repeated_length(size: int, num_replicas: int, repetitions: int) -> None:
    if _repeated_length(size, num_replicas) == 0:
        raise ValueError(
            f"ResumableDataLoader(repeated_augmentations={repetitions}): a dataset of {size} samples gives an empty"
            f" epoch on {num_replicas} process(es): like torchvision's RASampler, an epoch is len(dataset) // 256 * 256"
            " / num_replicas samples per process; use at least 256 samples per process, or repeated_augmentations=1"
        )


class _IgnoreStopSignals:
    """A worker's init: ignore SIGTERM / SIGUSR1, then run the user's ``worker_init_fn``.

    SLURM and torchrun signal a job's whole process group. A worker that dies of it makes the main process fail with
    "DataLoader worker ... is killed by signal: Terminated" before Lightning's handler can stop the loop and a
    checkpoint can be written; the main process decides when to stop, and its workers go with it.
    """

    def __init__(self, worker_init_fn: Any) -> None:
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


class _SeededDataset(Dataset):
    """Calls the wrapped dataset with the global RNGs seeded per sample (keys are ``(index, seed)``)."""

    def __init__(self, dataset: Dataset, rngs: tuple[str, ...] = RNGS) -> None:
        self.dataset, self.rngs = dataset, rngs

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Dunder lookups (pickle, the fetcher's `__getitems__`) must not reach the wrapped dataset.
        if name.startswith("__") or name in ("dataset", "rngs"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        # The fetcher calls this once per batch. In the main process the global RNGs belong to the model (dropout):
        # save and restore them once per batch (NumPy's get/set_state alone is ~50-90 us; seeding ~5 us).
        if get_worker_info() is not None:  # a worker process owns its RNGs
            return [self._seeded(index, seed) for index, seed in keys]
        rngs = self.rngs
        numpy = sys.modules.get("numpy") if "numpy" in rngs else None
        saved = (
            torch.random.default_generator.get_state() if "torch" in rngs else None,
            random.getstate() if "random" in rngs else None,
            numpy and numpy.random.get_state(),
        )
        try:
            return [self._seeded(index, seed) for index, seed in keys]
        finally:
            if saved[0] is not None:
                torch.random.default_generator.set_state(saved[0])
            if saved[1] is not None:
                random.setstate(saved[1])
            if numpy is not None:
                numpy.random.set_state(saved[2])

    def _seeded(self, index: int, seed: int) -> Any:
        _seed_all(seed, self.rngs)
        return self.dataset[index]


def _repeated_length(size: int, num_replicas: int) -> int:
    """Samples per rank and epoch under repeated augmentation: torchvision's ``RASampler.num_selected_samples``."""
    return size // 256 * 256 // num_replicas


class _ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (or ``RASampler``'s), yielding ``(index, sample seed)`` from batch ``skip`` on."""

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool, drop_last: bool,
                 num_replicas: int, rank: int, seed: int, repetitions: int = 1) -> None:  # fmt: skip
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.batch_size = batch_size
        self.repetitions = repetitions
        self.skip = 0

    def __len__(self) -> int:
        if self.repetitions == 1:
            return super().__len__()
        return _repeated_length(len(self.dataset), self.num_replicas)  # type: ignore[arg-type]

    def _indices(self) -> list[int]:
        if self.repetitions == 1:
            return list(super().__iter__())
        # torchvision's RASampler.__iter__, with tensors: the same permutation as DistributedSampler's (seed + epoch).
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(size)
        repeated = order.repeat_interleave(self.repetitions)
        total = -(-size * self.repetitions // self.num_replicas) * self.num_replicas
        repeated = torch.cat([repeated, repeated[: total - len(repeated)]])
        return repeated[self.rank : total : self.num_replicas][: len(self)].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = self._indices()
        # The seed is the sample's position in the epoch's global order, not its index: repeated copies differ.
        for position in range(self.skip * self.batch_size, len(indices)):
            yield indices[position], _sample_seed(self.seed, self.epoch, position * self.num_replicas + self.rank)


class ResumableDataLoader(DataLoader):
    """A map-style ``DataLoader`` whose ``state_dict`` is its position in the epoch (see the module docstring).

    Args:
        dataset: A map-style dataset (``__getitem__`` and ``__len__``).
        batch_size: Samples per batch.
        shuffle: A new permutation every epoch (``set_epoch``, which Lightning calls) or the dataset's order.
        drop_last: Drop the last incomplete batch.
        seed: Base seed of the permutation and of the per-sample augmentation seeds. ``None``: Lightning's
            ``seed_everything`` seed, else torch's initial seed (rank zero's under DDP), read at the first iteration.
        num_replicas, rank: The data-parallel size and this process's place in it. ``None``: the default process
            group's world size and rank (1 and 0 without one), read at the first iteration.
        repeated_augmentations: Copies of each sample per epoch, in ``RASampler``'s order (see the module
            docstring); 1 (the default) is off. Needs ``len(dataset) >= 256 * num_replicas``.
        seed_rngs: The global RNGs seeded before each sample, among ``"torch"``, ``"random"`` (Python's) and
            ``"numpy"``; all three by default. Name fewer only when the dataset's transforms draw from no other:
            an RNG left out is neither seeded nor saved and restored, so its draws in the dataset are not
            reproducible.
        **kwargs: Other ``DataLoader`` options (``num_workers``, ``collate_fn``, ``pin_memory``, ...); not
            ``sampler`` or ``batch_sampler``: the loader owns its order.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        *,
        drop_last: bool = False,
        seed: Optional[int] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        repeated_augmentations: int = 1,
        seed_rngs: tuple[str, ...] = RNGS,
        **kwargs: Any,
    ) -> None:
        for name in ("sampler", "batch_sampler"):
            if kwargs.get(name) is not None:
                raise TypeError(
                    f"ResumableDataLoader({name}=...): the loader owns its order to resume it; use a plain DataLoader"
                    f" for a custom {name}"
                )
            kwargs.pop(name, None)
        if isinstance(dataset, IterableDataset):
            raise TypeError("ResumableDataLoader needs a map-style dataset (__getitem__ and __len__), not an IterableDataset")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"ResumableDataLoader(batch_size={batch_size!r}): must be an integer >= 1")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"ResumableDataLoader(seed={seed!r}): must be an integer or None")
        if num_replicas is not None and (not isinstance(num_replicas, int) or num_replicas < 1):
            raise ValueError(f"ResumableDataLoader(num_replicas={num_replicas!r}): must be an integer >= 1 or None")
        if rank is not None and (not isinstance(rank, int) or rank < 0 or (num_replicas and rank >= num_replicas)):
            raise ValueError(f"ResumableDataLoader(rank={rank!r}): must be in [0, num_replicas) or None")
        if not isinstance(repeated_augmentations, int) or isinstance(repeated_augmentations, bool) or repeated_augmentations < 1:
            raise ValueError(
                f"ResumableDataLoader(repeated_augmentations={repeated_augmentations!r}): must be an integer >= 1"
                " (copies of each sample per epoch; 1 disables repeated augmentation)"
            )
        if isinstance(seed_rngs, str) or not seed_rngs or not set(seed_rngs) <= set(RNGS):
            raise ValueError(
                f"ResumableDataLoader(seed_rngs={seed_rngs!r}): must be a non-empty tuple of {RNGS} (the global RNGs "
                "seeded per sample), e.g. ('torch',) for transforms that draw from torch's RNG only"
            )
        if repeated_augmentations > 1:
            _check_repeated_length(len(dataset), num_replicas or 1, repeated_augmentations)  # type: ignore[arg-type]
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))  # never draw from the model's global RNG
        init = kwargs.get("worker_init_fn")
        kwargs["worker_init_fn"] = init if isinstance(init, _IgnoreStopSignals) else _IgnoreStopSignals(init)
        wrapped = _SeededDataset(dataset, tuple(dict.fromkeys(seed_rngs)))
        self._options = {"shuffle": shuffle, "seed": seed, "num_replicas": num_replicas, "rank": rank}
        sampler = _ResumableSampler(
            wrapped, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            num_replicas=num_replicas or 1, rank=rank or 0, seed=seed or 0, repetitions=repeated_augmentations,
        )  # fmt: skip
        super().__init__(wrapped, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._resolved = False
        self._pending: Optional[tuple[int, int]] = None  # (epoch, batches done) to start the next iterator at
        self._epoch = 0  # the epoch of the current (or last) iterator
        self._handed_out = 0  # batches the current iterator has yielded
        self._finished = False

    @classmethod
    def from_loader(cls, loader: DataLoader, *, num_replicas: int = 1, rank: int = 0) -> "ResumableDataLoader":
        """The same data, batching and worker settings as ``loader``, in this loader's resumable order.

        Raises ``TypeError`` naming the reason when ``loader`` cannot be rebuilt faithfully (a custom batch sampler
        or sampler, an iterable dataset, a ``DataLoader`` subclass, a sampler drawing with replacement).
        """
        reason, sampler = None, getattr(loader, "sampler", None)
        if type(loader) is not DataLoader:
            reason = f"it is a {type(loader).__name__}, not a torch DataLoader"
        elif isinstance(loader.dataset, IterableDataset):
            reason = "its dataset is an IterableDataset"
        elif loader.batch_size is None or type(loader.batch_sampler) is not BatchSampler:
            reason = f"it has a custom batch_sampler ({type(loader.batch_sampler).__name__})"
        elif type(sampler) is RandomSampler and (
            sampler.replacement or sampler.num_samples != len(sampler.data_source)  # type: ignore[arg-type]
        ):
            reason = "its RandomSampler draws with replacement or a custom number of samples"
        elif type(sampler) not in (RandomSampler, SequentialSampler, DistributedSampler):
            reason = f"its sampler is a {type(sampler).__name__}"
        if reason is not None:
            raise TypeError(f"the loader cannot be rebuilt as a ResumableDataLoader: {reason}")
        if isinstance(sampler, DistributedSampler):
            shuffle, drop_last_sampler = sampler.shuffle, sampler.drop_last
            num_replicas, rank = sampler.num_replicas, sampler.rank
        else:
            # What Lightning injects into a training loader with more than one replica: DistributedSampler(shuffle=True).
            shuffle, drop_last_sampler = isinstance(sampler, RandomSampler) or num_replicas > 1, False
        options: dict[str, Any] = dict(
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context, persistent_workers=loader.persistent_workers,
            pin_memory_device=loader.pin_memory_device,
        )  # fmt: skip
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        if hasattr(loader, "in_order"):  # torch >= 2.6
            options["in_order"] = loader.in_order
        new = cls(loader.dataset, loader.batch_size, shuffle, drop_last=loader.drop_last, num_replicas=num_replicas,
                  rank=rank, **options)  # fmt: skip
        new.sampler.drop_last = drop_last_sampler  # type: ignore[attr-defined]
        return new

    def _resolve(self) -> None:
        """Fills in the defaults that need the process group, which may not exist when the loader is built."""
        if self._resolved:
            return
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        grouped = dist.is_available() and dist.is_initialized()
        options = self._options
        epoch, skip = sampler.epoch, sampler.skip
        # DistributedSampler derives its lengths from num_replicas in __init__: run it again with the resolved values.
        DistributedSampler.__init__(
            sampler,
            sampler.dataset,
            num_replicas=options["num_replicas"] or (dist.get_world_size() if grouped else 1),
            rank=options["rank"] if options["rank"] is not None else (dist.get_rank() if grouped else 0),
            shuffle=sampler.shuffle,
            seed=options["seed"] if options["seed"] is not None else _default_seed(),
            drop_last=sampler.drop_last,
        )
        sampler.epoch, sampler.skip = epoch, skip
        if sampler.repetitions > 1:
            _check_repeated_length(len(sampler.dataset), sampler.num_replicas, sampler.repetitions)  # type: ignore[arg-type]
        self._resolved = True

    def __len__(self) -> int:
        self._resolve()
        return super().__len__()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Lazy: nothing is fetched (and no worker started) until the first `next`, so a state loaded after the
        # iterator was created (Lightning creates it before it restores a checkpoint in some set-ups) still applies.
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        self._resolve()
        sampler: _ResumableSampler = self.sampler  # type: ignore[assignment]
        skip = 0
        if self._pending is not None:
            (epoch, skip), self._pending = self._pending, None
            if skip:  # mid-epoch; at an epoch boundary the epoch is the one Lightning sets (`set_epoch`)
                sampler.set_epoch(epoch)
        sampler.skip = skip
        self._epoch, self._handed_out, self._finished = sampler.epoch, skip, False
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch
        self._finished = True

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "epoch", "batches"}``: the epoch of the current iterator and the batches it handed out."""
        self._resolve()
        if self._pending is not None:  # loaded and not iterated yet: the position is still the loaded one
            epoch, batches = self._pending
        elif self._finished or self._handed_out >= len(self):
            # Lightning stops fetching after the last batch of a sized loader: the generator may not have finished.
            epoch, batches = self._epoch + 1, 0
        else:
            epoch, batches = self._epoch, self._handed_out
        return {"seed": int(self.sampler.seed), "epoch": int(epoch), "batches": int(batches)}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The next iterator starts at batch ``batches`` of epoch ``epoch``, in the order of ``seed``."""
        missing = {"seed", "epoch", "batches"} - set(state_dict)
        if missing:
            raise KeyError(f"ResumableDataLoader.load_state_dict: the state has no {sorted(missing)}: {state_dict!r}")
        self._resolve()
        self.sampler.seed = int(state_dict["seed"])  # type: ignore[attr-defined]
        self._pending = (int(state_dict["epoch"]), int(state_dict["batches"]))
