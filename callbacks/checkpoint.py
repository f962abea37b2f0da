"""Atomic, rotating checkpoints that resume training bit for bit, as a drop-in Lightning callback.

Copy this one file into your project: it needs torch and lightning only. After a pre-emption, run the same
command again with ``ckpt_path="last"`` (``--ckpt_path last`` with LightningCLI).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import sys
import zipfile
from typing import Any, Callable, Optional
from weakref import proxy

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
from typing_extensions import override

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

__all__ = ["ResumableCheckpoint"]

_MASK64 = (1 << 64) - 1
_SHARDED_MARKER = ".metadata"  # torch.distributed.checkpoint writes it last, once every shard is on disk
_SHARDED_META = "meta.pt"  # Lightning's ModelParallelStrategy: everything but the sharded tensors
_NEEDS_PICKLE = "it holds objects that only load with weights_only=False"  # intact, but not weights-only


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------------------
# Files: validation, atomic commit, hard-linked last.ckpt
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_problem(path: str) -> Optional[str]:
    """What is wrong with the checkpoint at ``path`` (a file, or a sharded checkpoint directory), or ``None``.

    A file must be a complete zip archive (``torch.save``'s format) whose every member passes its CRC-32 check, and
    must unpickle with ``weights_only=True`` (memory-mapped, so the tensors are not read) into a Lightning training
    checkpoint. An intact checkpoint that needs ``weights_only=False`` gets a message starting with ``_NEEDS_PICKLE``.
    """
    if os.path.isdir(path):
        missing = [name for name in (_SHARDED_MARKER, _SHARDED_META) if not os.path.isfile(os.path.join(path, name))]
        if missing:
            return f"incomplete sharded checkpoint directory: {' and '.join(missing)} missing"
        return _content_problem(os.path.join(path, _SHARDED_META), sharded=True)
    if not os.path.isfile(path):
        return "no such file"
    size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"truncated or not written by torch.save: no zip directory at the end of its {size} bytes"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"corrupted zip archive ({err})"
    if bad is not None:
        return f"corrupted: member {bad!r} fails its CRC-32 check"
    return _content_problem(path, sharded=False)


def _content_problem(path: str, *, sharded: bool) -> Optional[str]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is the answer
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            first_line = str(err).strip().splitlines()[0]
            return f"{_NEEDS_PICKLE} ({first_line}); if you trust the file, pass trainer.fit(..., weights_only=False)"
        return f"cannot be unpickled ({type(err).__name__}: {err})"
    wanted = ("loops", "global_step") if sharded else ("state_dict", "loops", "global_step")
    missing = [key for key in wanted if not isinstance(content, dict) or key not in content]
    if missing:
        return f"not a Lightning training checkpoint: no {', '.join(map(repr, missing))}"
    return None


def _fsync_path(path: str) -> None:
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_path(os.path.join(root, name))
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    else:
        flags = os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # directories cannot be opened on some platforms; the rename is atomic regardless
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _commit(tmp: str, final: str) -> None:
    """Moves the finished ``tmp`` (same directory) to ``final``: a rename, so readers see the old or the new one."""
    _fsync_path(tmp)
    if os.path.isdir(tmp) or os.path.isdir(final):
        # A directory cannot replace a non-empty one in one rename. For the instant between the two renames the
        # old checkpoint lives on as `.<name>.trash` and `final` is missing (never half-written).
        trash = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.trash")
        _remove_path(trash)
        if os.path.lexists(final):
            os.replace(final, trash)
        os.replace(tmp, final)
        _remove_path(trash)
    else:
        os.replace(tmp, final)
    _fsync_path(os.path.dirname(final) or ".")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no extra bytes written; the kept file and last.ckpt share them
    except OSError:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------------------------------------------
# Random state and data position
# ----------------------------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """The global RNG states of this process, in types that load with ``weights_only=True``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy = sys.modules.get("numpy")  # only if something imported it: nothing else can have used its RNG
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        keys = torch.tensor(keys.tolist(), dtype=torch.int64)
        state["numpy"] = (str(kind), keys, int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy  # noqa: PLC0415 - the checkpoint was written by a process that had numpy

        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.asarray(keys.tolist(), dtype=numpy.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    """SplitMix64 of (seed, epoch, position in the epoch's global order): one independent stream per sample."""
    x = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xBF58476D1CE4E5B9 + (position + 1) * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _seed_all(seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)  # CPU only: never reseeds (or initialises) CUDA
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed & 0xFFFFFFFF)


class _DataState:
    """Shared by the callback and its sampler: the base seed, and where to resume (epoch, batches done)."""

    def __init__(self) -> None:
        self.seed = 0
        self.pending: Optional[tuple[int, int]] = None
        self.in_flight = 0  # sampler iterations started and not finished: they will not see a new `pending`


class _SeededDataset(Dataset):
    """Calls the wrapped dataset with the global RNGs seeded per sample, so its random transforms depend on the
    sample's place in the epoch only, not on which worker process loads it or on what that worker loaded before."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Dunder lookups (pickle, the fetcher's `__getitems__`) must not reach the wrapped dataset.
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        # The DataLoader's fetcher calls this once per batch. Saving and restoring the main process's RNGs once per
        # batch instead of once per sample: NumPy's get_state + set_state alone take ~50-90 us, which per sample
        # cost several % of a small model's training step (benchmarks/overhead.py); seeding is ~5 us.
        if get_worker_info() is not None:  # a worker process owns its RNGs
            return [self._seeded(index, seed) for index, seed in keys]
        numpy = sys.modules.get("numpy")
        saved = (torch.random.default_generator.get_state(), random.getstate(), numpy and numpy.random.get_state())
        try:
            return [self._seeded(index, seed) for index, seed in keys]
        finally:  # the main process's RNGs belong to the model (dropout, ...): leave them as they were
            torch.random.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            if numpy is not None:
                numpy.random.set_state(saved[2])

    def _seeded(self, index: int, seed: int) -> Any:
        _seed_all(seed)
        return self.dataset[index]


class _ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (seeded by the base seed + epoch), yielding ``(index, sample seed)`` and
    starting, once after a resume, at the first batch the checkpoint had not trained on."""

    def __init__(self, dataset: Dataset, state: _DataState, *, batch_size: int, shuffle: bool, drop_last: bool,
                 num_replicas: int, rank: int) -> None:  # fmt: skip
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=state.seed,
                         drop_last=drop_last)  # fmt: skip
        self.state = state
        self.batch_size = batch_size

    def __iter__(self):  # type: ignore[override]
        epoch, skip = self.epoch, 0
        if self.state.pending is not None:
            (epoch, skip), self.state.pending = self.state.pending, None
            self.epoch = epoch
        self.seed = self.state.seed
        indices = list(super().__iter__())
        self.state.in_flight += 1
        try:
            for position in range(skip * self.batch_size, len(indices)):
                yield indices[position], _sample_seed(self.seed, epoch, position * self.num_replicas + self.rank)
        finally:  # exhausted, or closed when the DataLoader iterator is dropped
            self.state.in_flight -= 1


class _ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position ``ResumableCheckpoint`` saves and restores (from the loop's progress, which,
    unlike the iterator, does not count the batch Lightning prefetched). The methods tell Lightning it resumes."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": "saved by ResumableCheckpoint"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _position(trainer: pl.Trainer) -> tuple[int, int]:
    """(epoch, batches of it done) that a resume from a checkpoint written now continues from."""
    # Lightning 2.6 loop progress; a batch counts as done once processed (Lightning redoes one that is not).
    batches = trainer.fit_loop.epoch_loop.batch_progress.current
    done = batches.ready if batches.processed == batches.ready else batches.completed
    started = trainer.fit_loop.epoch_progress.current.ready  # epochs started, the current one included
    total = trainer.num_training_batches
    if total != float("inf") and done >= total:
        return started, 0
    return max(started - 1, 0), done


def _gather(obj: Any, trainer: pl.Trainer) -> list[Any]:
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ----------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------


class ResumableCheckpoint(ModelCheckpoint):
    """Saves atomically every ``every_n_steps`` optimizer steps and/or at epoch end, and resumes bit for bit.

    **Files** in ``dirpath`` (default ``<Trainer.default_root_dir>/checkpoints``, the same for every run so that
    ``ckpt_path="last"`` finds it): ``epoch=E-step=S.ckpt`` (``filename``, a ``ModelCheckpoint`` template) for the last
    ``keep_last`` saves and for the ``top_k`` best by ``monitor``, and ``last.ckpt``, the newest of them (a hard link:
    no extra bytes). Every file is written to a hidden temporary in the same directory, flushed to disk and renamed:
    a crash or ``kill -9`` during a save leaves the previous files intact (the temporary is removed at the next
    start). Under DDP rank zero writes; under FSDP2 (``ModelParallelStrategy``) every rank writes its shards into a
    temporary directory that is renamed once all are done.

    **Exact resume.** Besides what Lightning saves (weights, optimizer, LR schedulers, loops, callbacks' state, AMP
    scaler), the checkpoint holds every rank's Python, NumPy and torch (CPU and CUDA) RNG states, restored right
    before training continues, and the position in the epoch. With ``resumable_data`` the train ``DataLoader`` is
    rebuilt around a sampler in ``DistributedSampler`` order (seeded by the run's seed + epoch) that skips the
    batches already trained on, and around a dataset wrapper that seeds the RNGs for each sample from (seed, epoch,
    position): random augmentations are then the same whether a sample is loaded by the main process or any
    worker, before or after a resume. The order and augmentations differ from those of a plain ``DataLoader``
    (which draws from the global RNG), equally random. A loader that has ``state_dict``/``load_state_dict`` (e.g.
    torchdata's ``StatefulDataLoader``) is left to Lightning; other loaders that cannot be rebuilt (custom batch
    samplers, iterable datasets, ``DataLoader`` subclasses) are left alone with a warning. In a single process a
    checkpoint written inside an accumulation window (``SIGTERM``) also holds the window's gradients.

    **Pre-emption.** On ``SIGTERM`` Lightning stops after the current batch; this callback then saves and the process
    exits with status 0. Any other exception saves too (in a single process: under DDP the other ranks may be
    elsewhere, so the newest periodic checkpoint stands).

    **Loading.** A checkpoint that is truncated or corrupted makes ``fit`` fail with an error naming the file and the
    problem, before Lightning reads it; loading uses ``weights_only=True`` unless you pass ``weights_only=False``.
    With ``ckpt_path="last"`` the newest loadable checkpoint of ``dirpath`` is used, with a warning naming the
    skipped ones; with none there yet, training starts from scratch (so the same command serves the first run).

    Args:
        dirpath: Directory of the checkpoints; local or network-mounted (atomic renames).
        filename: ``ModelCheckpoint`` template of the kept files' names, without extension.
        every_n_steps: Save every this many optimizer steps.
        save_on_epoch_end: Save at the end of every training epoch.
        keep_last: How many of the newest step/epoch checkpoints to keep.
        monitor: Metric whose ``top_k`` best checkpoints (at validation end) are kept as well.
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are best.
        top_k: How many best checkpoints to keep; needs ``monitor``.
        save_on_exception: Save when training stops with ``SIGTERM`` or an exception.
        resumable_data: Rebuild the train ``DataLoader`` to resume mid-epoch exactly (see above).
        verbose: Log every save.
    """

    CHECKPOINT_NAME_LAST = "last"

    def __init__(
        self,
        *,
        dirpath: Optional[str] = None,
        filename: Optional[str] = None,
        every_n_steps: Optional[int] = None,
        save_on_epoch_end: bool = True,
        keep_last: int = 1,
        monitor: Optional[str] = None,
        mode: str = "min",
        top_k: int = 1,
        save_on_exception: bool = True,
        resumable_data: bool = True,
        verbose: bool = False,
    ) -> None:
        if dirpath is not None:
            if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
                raise TypeError(f"`dirpath` must be a non-empty path, got {dirpath!r}")
            if "://" in str(dirpath) and not str(dirpath).startswith("file://"):
                raise ValueError(
                    f"`dirpath={str(dirpath)!r}`: ResumableCheckpoint commits files with a rename in the same"
                    " directory, which needs a local or network-mounted file system, not an object store"
                )
        if filename is not None and (
            not isinstance(filename, str) or not filename or filename.startswith(".") or filename == "last"
        ):
            raise ValueError(
                "`filename` must be a non-empty template that does not start with '.' and is not 'last',"
                f" got {filename!r}"
            )
        if every_n_steps is not None and (not _is_int(every_n_steps) or every_n_steps < 1):
            raise ValueError(f"`every_n_steps` must be an integer >= 1 or None, got {every_n_steps!r}")
        if not _is_int(keep_last) or keep_last < 1:
            raise ValueError(
                f"`keep_last` must be an integer >= 1 (last.ckpt is the newest of them), got {keep_last!r}"
            )
        if not _is_int(top_k) or top_k < 0:
            raise ValueError(f"`top_k` must be an integer >= 0, got {top_k!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be a logged metric's name or None, got {monitor!r}")
        if monitor is None and top_k != 1:
            raise ValueError(f"`top_k={top_k!r}` keeps the best checkpoints by `monitor`, which is None: set `monitor`")
        for name, value in (
            ("save_on_epoch_end", save_on_epoch_end),
            ("save_on_exception", save_on_exception),
            ("resumable_data", resumable_data),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}")
        if every_n_steps is None and not save_on_epoch_end and monitor is None:
            raise ValueError(
                "ResumableCheckpoint(every_n_steps=None, save_on_epoch_end=False, monitor=None) would never save:"
                " set at least one of them"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=True,
            save_top_k=top_k if monitor is not None else 0,
            mode=mode,
            enable_version_counter=False,
        )
        self.every_n_steps = every_n_steps
        self.save_on_epoch_end = save_on_epoch_end
        self.keep_last = keep_last
        self.top_k = top_k
        self.save_on_exception = save_on_exception
        self.resumable_data = resumable_data
        self._given_dirpath = self.dirpath
        self._recent: list[str] = []
        self._data = _DataState()
        self._converted = False
        self._trainer: Optional[pl.Trainer] = None
        self._training = False  # between on_train_start and teardown: only then is there progress to save
        self._undo: list[Callable[[], None]] = []
        self._last_write: Optional[tuple[str, Any]] = None
        self._step_at_batch_start = -1
        self._pending_rng: Optional[list[Any]] = None
        self._pending_grads: Optional[list[Any]] = None
        self._checked: dict[tuple[str, float, int], Optional[str]] = {}

    @property
    @override
    def state_key(self) -> str:
        # Stable across changes of the save frequency, so that a resume always finds its RNG and data state.
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------------------------------------ set-up

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        if self._given_dirpath is not None:
            return str(self._given_dirpath)
        return os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    @staticmethod
    def _dirpath_of(callback: ModelCheckpoint, trainer: pl.Trainer) -> str:
        """Where another ModelCheckpoint writes (its own rule, as Lightning 2.6 resolves it in its setup)."""
        if callback.dirpath is not None:
            return os.path.realpath(str(callback.dirpath))
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.realpath(os.path.join(save_dir, str(logger.name), version, "checkpoints"))
        return os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        self._fs = get_filesystem(self.dirpath)
        self.last_model_path = self._last_path()
        if stage != "fit":
            return
        for callback in trainer.checkpoint_callbacks:
            if callback is self or not isinstance(callback, ModelCheckpoint):
                continue
            theirs = self._dirpath_of(callback, trainer)
            if theirs == os.path.realpath(self.dirpath):
                raise MisconfigurationException(
                    f"ResumableCheckpoint(dirpath={self.dirpath!r}) and {type(callback).__name__}(dirpath="
                    f"{callback.dirpath!r}) both write to {theirs}: their last.ckpt and rotations would clash."
                    " Give them different `dirpath`s, or remove one"
                )
        self._trainer = trainer
        if trainer.is_global_zero and os.path.isdir(self.dirpath):
            for name in os.listdir(self.dirpath):  # leftovers of a save that was killed
                if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".trash")):
                    _remove_path(os.path.join(self.dirpath, name))
        trainer.strategy.barrier("ResumableCheckpoint.setup")
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % (1 << 62)
        self._data.seed = int(trainer.strategy.broadcast(seed))
        self._patch_loading(trainer)
        if self.resumable_data:
            self._patch_train_dataloader(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        while self._undo:
            self._undo.pop()()
        self._trainer = None
        self._training = False

    def _patch_loading(self, trainer: pl.Trainer) -> None:
        """Checks a checkpoint before Lightning loads it, and loads with ``weights_only=True`` by default."""
        strategy = trainer.strategy
        original = strategy.load_checkpoint

        @functools.wraps(original)
        def load_checkpoint(checkpoint_path: Any, weights_only: Optional[bool] = None, **kwargs: Any) -> Any:
            path = str(checkpoint_path)
            if "://" not in path:
                problem = self._problem(path)
                if problem is not None and not (weights_only is False and problem.startswith(_NEEDS_PICKLE)):
                    raise RuntimeError(f"Cannot resume from checkpoint {path}: {problem}")
            return original(checkpoint_path, weights_only=True if weights_only is None else weights_only, **kwargs)

        strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
        self._undo.append(lambda: delattr(strategy, "load_checkpoint"))

    def _patch_train_dataloader(self, trainer: pl.Trainer) -> None:
        # Lightning 2.6: the fit loop's `_data_source` says where the train dataloader comes from (a module's hook
        # or the loader given to `fit`); the loader is requested after restore, so it can start where it stopped.
        source = trainer.fit_loop._data_source
        if source.is_module():
            instance, name = source.instance, source.name
            original = getattr(instance, name)

            @functools.wraps(original)
            def train_dataloader(*args: Any, **kwargs: Any) -> Any:
                return self._resumable(original(*args, **kwargs), trainer)

            setattr(instance, name, train_dataloader)
            self._undo.append(lambda: delattr(instance, name))
        else:
            given = source.instance
            source.instance = self._resumable(given, trainer)
            self._undo.append(lambda: setattr(source, "instance", given))

    def _resumable(self, loader: Any, trainer: pl.Trainer) -> Any:
        if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
            return loader  # resumable already (e.g. torchdata's StatefulDataLoader): Lightning restores it
        reason, sampler = None, getattr(loader, "sampler", None)
        if trainer.overfit_batches > 0:
            # Lightning re-creates the loader with a SequentialSampler for overfit_batches, replacing ours.
            reason = f"Trainer(overfit_batches={trainer.overfit_batches}) replaces its sampler"
        elif type(loader) is not DataLoader:
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
            rank_zero_warn(
                f"ResumableCheckpoint: the train dataloader cannot be made resumable mid-epoch ({reason}). A resume"
                " from a mid-epoch checkpoint will not continue the same data order: give the loader state_dict()/"
                "load_state_dict() (e.g. torchdata's StatefulDataLoader) or save at epoch ends only"
            )
            return loader
        if isinstance(sampler, DistributedSampler):
            shuffle, drop_last = sampler.shuffle, sampler.drop_last
            replicas, rank = sampler.num_replicas, sampler.rank
        else:
            # Lightning 2.6 injects DistributedSampler(shuffle=True, **distributed_sampler_kwargs) into a training
            # loader when `use_distributed_sampler` and there is more than one replica: do the same.
            injects = trainer._accelerator_connector.use_distributed_sampler
            kwargs = trainer.distributed_sampler_kwargs if injects else None
            replicas, rank = int((kwargs or {}).get("num_replicas", 1)), int((kwargs or {}).get("rank", 0))
            shuffle, drop_last = isinstance(sampler, RandomSampler) or replicas > 1, False
        dataset = _SeededDataset(loader.dataset)
        resumable_sampler = _ResumableSampler(
            dataset, self._data, batch_size=loader.batch_size, shuffle=shuffle, drop_last=drop_last,
            num_replicas=replicas, rank=rank,
        )  # fmt: skip
        options: dict[str, Any] = dict(
            batch_size=loader.batch_size,
            sampler=resumable_sampler,
            drop_last=loader.drop_last,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            # Its own generator: iterating never draws from the global RNG (which belongs to the model).
            generator=torch.Generator().manual_seed(self._data.seed),
            persistent_workers=loader.persistent_workers,
            pin_memory_device=loader.pin_memory_device,
        )
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        if hasattr(loader, "in_order"):
            options["in_order"] = loader.in_order
        self._converted = True
        return _ResumableDataLoader(dataset, **options)

    # ------------------------------------------------------------------------------------------------ "last"

    def _last_path(self) -> str:
        assert self.dirpath is not None
        return os.path.join(str(self.dirpath), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def _problem(self, path: str) -> Optional[str]:
        try:
            stat = os.stat(path)
            key = (os.path.realpath(path), stat.st_mtime, stat.st_size)
        except OSError:
            return "no such file"
        if key not in self._checked:
            self._checked[key] = _checkpoint_problem(path)
        return self._checked[key]

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """The newest loadable checkpoint of ``dirpath``: ``last.ckpt``, else the kept files from newest to oldest."""
        dirpath = self._resolve_dirpath(trainer)
        if not os.path.isdir(dirpath):
            return set()
        last = os.path.join(dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        others = [
            os.path.join(dirpath, name)
            for name in os.listdir(dirpath)
            if name.endswith(self.FILE_EXTENSION) and not name.startswith(".") and name != os.path.basename(last)
        ]
        others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        candidates = ([last] if os.path.lexists(last) else []) + others
        skipped = []
        for path in candidates:
            problem = self._problem(path)
            if problem is None or problem.startswith(_NEEDS_PICKLE):  # intact: loading says what to pass
                if skipped:
                    rank_zero_warn(
                        "ResumableCheckpoint: skipped unloadable checkpoint(s) "
                        + "; ".join(f"{p}: {why}" for p, why in skipped)
                        + f". Resuming from {path}, the newest loadable one"
                    )
                return {os.path.normpath(path)}
            skipped.append((path, problem))
        if skipped:
            raise RuntimeError(
                f"ResumableCheckpoint: no loadable checkpoint in {dirpath} to resume from ('last'): "
                + "; ".join(f"{p}: {why}" for p, why in skipped)
            )
        return set()

    # ------------------------------------------------------------------------------------------------ saving

    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._step_at_batch_start
        if self.every_n_steps and stepped and trainer.global_step % self.every_n_steps == 0 and not self._skip(trainer):
            self._save_recent(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_epoch_end and not self._skip(trainer):
            self._save_recent(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or self.save_top_k == 0 or self._skip(trainer):
            return
        before = self._last_write
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._last_write is not before and self._last_write is not None:
            self._publish_last(trainer, self._last_write[0])

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip(trainer) and not self._written(trainer):
            self._save_recent(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            if not self.save_on_exception or not self._training or self._skip(trainer) or self._written(trainer):
                return
            if trainer.world_size > 1 and not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
                rank_zero_warn(
                    f"ResumableCheckpoint: not saving on {type(exception).__name__} with {trainer.world_size} processes"
                    f" (the others may not reach this point); resume from the newest checkpoint in {self.dirpath}"
                )
                return
            self._save_recent(trainer)
            rank_zero_info(
                f"ResumableCheckpoint: saved {self.last_model_path} after {type(exception).__name__} at step"
                f" {trainer.global_step}; resume with ckpt_path='last'"
            )
        finally:
            # Lightning calls no `teardown` hook after an exception: undo the patches here.
            self.teardown(trainer, pl_module, "fit")

    def _written(self, trainer: pl.Trainer) -> bool:
        return self._last_write is not None and self._last_write[1] == (trainer.global_step, _position(trainer))

    def _save_recent(self, trainer: pl.Trainer) -> None:
        path = self.format_checkpoint_name(self._monitor_candidates(trainer))
        recent = [p for p in self._recent if p != path] + [path]
        dropped, self._recent = recent[: -self.keep_last], recent[-self.keep_last :]
        self._save_checkpoint(trainer, path)
        self._publish_last(trainer, path)
        for old in dropped:
            if old not in self.best_k_models:
                self._delete(trainer, old)

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        key = (trainer.global_step, _position(trainer))
        if self._last_write == (filepath, key) and os.path.exists(filepath):
            return  # this very state is on disk under this name already (e.g. best and epoch end)
        tmp = os.path.join(os.path.dirname(filepath), f".{os.path.basename(filepath)}.tmp")
        if trainer.is_global_zero:
            os.makedirs(os.path.dirname(filepath), exist_ok=True)
            _remove_path(tmp)
        trainer.strategy.barrier("ResumableCheckpoint.before_save")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank: sharded strategies write their own part
        if trainer.is_global_zero:
            _commit(tmp, filepath)
        trainer.strategy.barrier("ResumableCheckpoint.after_save")
        self._last_write = (filepath, key)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if self.verbose:
            rank_zero_info(f"ResumableCheckpoint: saved {filepath}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _publish_last(self, trainer: pl.Trainer, source: str) -> None:
        last = self._last_path()
        self.last_model_path = last
        linked = os.path.exists(last) and os.path.exists(source) and os.path.samefile(source, last)
        if trainer.is_global_zero and not linked:
            tmp = os.path.join(os.path.dirname(last), f".{os.path.basename(last)}.tmp")
            _remove_path(tmp)
            if os.path.isdir(source):
                shutil.copytree(source, tmp, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, tmp)
            _commit(tmp, last)
        trainer.strategy.barrier("ResumableCheckpoint.last")

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Called by ModelCheckpoint's top-k bookkeeping: a file that is also one of the newest stays.
        if filepath not in self._recent:
            self._delete(trainer, filepath)

    def _delete(self, trainer: pl.Trainer, filepath: str) -> None:
        inside = os.path.realpath(os.path.dirname(filepath)) == os.path.realpath(str(self.dirpath))
        if trainer.is_global_zero and inside and os.path.abspath(filepath) != os.path.abspath(self._last_path()):
            _remove_path(filepath)

    # ------------------------------------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["recent"] = list(self._recent)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return state
        epoch, done = _position(trainer)
        state["data"] = {"seed": self._data.seed, "epoch": epoch, "batches": done}
        state["rng"] = _gather(_rng_state(), trainer)
        k = trainer.accumulate_grad_batches
        if done % k and done < trainer.num_training_batches:  # inside an accumulation window
            if trainer.world_size == 1:
                state["grads"] = [
                    None if p.grad is None else p.grad.detach().clone() for p in trainer.lightning_module.parameters()
                ]
            else:
                rank_zero_warn(
                    f"ResumableCheckpoint: saving after {done % k} of {k} micro-batches of an accumulation window with"
                    f" {trainer.world_size} processes: their partial gradients are not saved, so a resume from this"
                    " checkpoint does not continue this window exactly"
                )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath") == self.dirpath:
            self._recent = list(state_dict.get("recent", []))
        data = state_dict.get("data")
        if data is not None:
            self._data.seed = int(data["seed"])
            self._data.pending = (int(data["epoch"]), int(data["batches"]))
        self._pending_rng = state_dict.get("rng")
        self._pending_grads = state_dict.get("grads")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._training = True
        if self._converted and self._data.pending is not None and self._data.in_flight:
            # The train iterator started before the checkpoint was restored (e.g. `estimated_stepping_batches` read
            # in `LightningModule.setup`, or in `configure_optimizers` under a strategy that restores after setup,
            # with worker processes, which take indices at once; Lightning issue #20550): start it again.
            iter(trainer.fit_loop._data_fetcher)  # Lightning 2.6; the epoch loop then adds the batches done
        if not self._converted:
            self._data.pending = None
        grads, self._pending_grads = self._pending_grads, None
        if grads is not None:
            params = list(pl_module.parameters())
            if len(grads) == len(params):
                for p, g in zip(params, grads):
                    p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        states, self._pending_rng = self._pending_rng, None
        if states is not None:
            if len(states) == trainer.world_size:
                # Last of all: whatever ran since the restore (sanity check, dataloader set-up) must not shift them.
                _set_rng_state(states[trainer.global_rank])
            else:
                rank_zero_warn(
                    f"ResumableCheckpoint: the checkpoint holds the RNG states of {len(states)} processes, this run has"
                    f" {trainer.world_size}: random states are not restored, the run continues but not bit for bit"
                )
