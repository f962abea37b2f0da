"""Rotating checkpoints that resume training bit for bit, as a drop-in Lightning callback.

Copy three files into your project, side by side: ``checkpoint.py`` (this one: rotation, RNG states, ``last``),
``checkpoint_io.py`` (atomic, validated, asynchronous files) and ``resumable_loader.py`` (the train loader's
position). They need torch and lightning only. After a pre-emption, run the same command again with
``ckpt_path="last"`` (``--ckpt_path last`` with LightningCLI).

Where resume state lives:

=========================  =====================================================================================
state                       saved and restored by
=========================  =====================================================================================
weights, optimizer, AMP     Lightning (``state_dict``, ``optimizer_states``, ...)
loops, step counters        Lightning (``loops``)
data position, order seed   ``ResumableDataLoader.state_dict`` (Lightning's stateful-loader path, ``loops.fit_loop``)
RNG states of every rank    this callback's ``state_dict`` (``rng``), restored at ``on_train_start``
half-window gradients       this callback's ``state_dict`` (``grads``; single process)
rotation bookkeeping        this callback's ``state_dict`` (``recent``, and ``ModelCheckpoint``'s best-k fields)
=========================  =====================================================================================

Private Lightning attributes used (checked on Lightning 2.6.0 and 2.6.6, each exercised by tests/test_checkpoint.py):

=======================================================  ===========================================================
``ModelCheckpoint._find_last_checkpoints``                 the hook Lightning calls to resolve ``ckpt_path="last"``
``trainer.fit_loop._data_source``                          where a user's plain train loader comes from, to rebuild it
``trainer._accelerator_connector.use_distributed_sampler``  whether Lightning would shard a rebuilt loader
``ModelParallelStrategy._save_distributed_checkpoint``     whether FSDP2 writes a sharded directory (bypassing IO)
``Callback._generate_state_key``                           the key of this callback's state in the checkpoint
=======================================================  ===========================================================
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import sys
from typing import Any, Callable, Optional
from weakref import proxy

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from typing_extensions import override

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

try:  # inside a package (ours, or yours)
    from .checkpoint_io import NEEDS_PICKLE, SafeCheckpointIO, checkpoint_problem, fsync_path, temporary_path
    from .resumable_loader import ResumableDataLoader
except ImportError:  # the three files copied as top-level modules
    from checkpoint_io import NEEDS_PICKLE, SafeCheckpointIO, checkpoint_problem, fsync_path, temporary_path
    from resumable_loader import ResumableDataLoader

__all__ = ["ResumableCheckpoint"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------- files


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _commit(tmp: str, final: str) -> None:
    """Moves the finished ``tmp`` (same directory) to ``final``: readers see the old or the new one."""
    fsync_path(tmp)
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
    fsync_path(os.path.dirname(final) or ".")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no extra bytes written; the kept file and last.ckpt share them
    except OSError:
        shutil.copy2(src, dst)


def _publish(source: str, last: str, drop: list[str]) -> None:
    """Makes ``last`` the same file as the committed ``source``, then deletes the rotated-out files."""
    if not (os.path.exists(last) and os.path.samefile(source, last)):
        tmp = temporary_path(last)
        _remove_path(tmp)
        if os.path.isdir(source):
            shutil.copytree(source, tmp, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, tmp)
        _commit(tmp, last)
    for path in drop:
        _remove_path(path)


# ---------------------------------------------------------------------------------------------------- RNG states


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


def _gather(obj: Any, trainer: pl.Trainer) -> list[Any]:
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _batches_done(trainer: pl.Trainer) -> int:
    """Batches of the current epoch that a resume does not redo (Lightning redoes one whose step did not finish)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return progress.ready if progress.processed == progress.ready else progress.completed


def _flatten(iterables: Any) -> list[Any]:
    """The loaders of ``trainer.train_dataloader`` in Lightning's order (a loader, or a list / tuple / dict of them)."""
    if isinstance(iterables, dict):
        return [loader for value in iterables.values() for loader in _flatten(value)]
    if isinstance(iterables, (list, tuple)):
        return [loader for value in iterables for loader in _flatten(value)]
    return [iterables]


def _stateful(loader: Any) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


# ---------------------------------------------------------------------------------------------------- callback


class ResumableCheckpoint(ModelCheckpoint):
    """Saves atomically every ``every_n_steps`` optimizer steps and/or at epoch end, and resumes bit for bit.

    **Files** in ``dirpath`` (default ``<Trainer.default_root_dir>/checkpoints``, the same for every run so that
    ``ckpt_path="last"`` finds it): ``epoch=E-step=S.ckpt`` (``filename``, a ``ModelCheckpoint`` template) for the last
    ``keep_last`` saves and for the ``top_k`` best by ``monitor``, and ``last.ckpt``, the newest of them (a hard link:
    no extra bytes). Files go through ``SafeCheckpointIO`` (installed unless the Trainer has a custom
    ``CheckpointIO``): temporary file, fsync, rename, so a crash or ``kill -9`` during a save leaves the previous files
    intact (leftover temporaries are removed at the next start). With ``asynchronous=True`` a background thread writes
    while training goes on (one save in flight; the final and the ``SIGTERM`` saves finish before ``fit`` returns).
    Under DDP rank zero writes; under FSDP2 (``ModelParallelStrategy``) every rank writes its shards into a temporary
    directory that is renamed once all are done (synchronously: Lightning writes sharded checkpoints itself).

    **Exact resume.** Besides what Lightning saves, the checkpoint holds every rank's Python, NumPy and torch (CPU and
    CUDA) RNG states, restored right before training continues, and the train loader's position: a
    ``ResumableDataLoader`` (the recipes' data modules return one) saves it itself; with ``resumable_data`` a plain
    ``DataLoader`` is rebuilt as one (custom samplers, iterable datasets and ``DataLoader`` subclasses are left alone
    with a warning; a loader with ``state_dict``/``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``, is
    Lightning's to restore). In a single process a checkpoint written inside an accumulation window (``SIGTERM``) also
    holds the window's gradients.

    **Pre-emption.** On ``SIGTERM`` Lightning stops after the current batch; this callback then saves and the process
    exits with status 0. Any other exception saves too (in a single process: under DDP the other ranks may be
    elsewhere, so the newest periodic checkpoint stands).

    **Loading.** A truncated or corrupted checkpoint fails with an error naming the file and the problem; loading uses
    ``weights_only=True`` unless you pass ``weights_only=False``. With ``ckpt_path="last"`` the newest loadable
    checkpoint of ``dirpath`` is used, with a warning naming the skipped ones; with none there yet, training starts
    from scratch (so the same command serves the first run).

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
        resumable_data: Rebuild a plain train ``DataLoader`` as a ``ResumableDataLoader`` (see above).
        asynchronous: Write files in a background thread (see ``SafeCheckpointIO``).
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
        asynchronous: bool = False,
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
            ("asynchronous", asynchronous),
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
        self.asynchronous = asynchronous
        self._given_dirpath = self.dirpath
        self._recent: list[str] = []
        self._trainer: Optional[pl.Trainer] = None
        self._training = False  # between on_train_start and teardown: only then is there progress to save
        self._undo: list[Callable[[], None]] = []
        self._last_write: Optional[tuple[str, Any]] = None
        self._step_at_batch_start = -1
        self._pending_rng: Optional[list[Any]] = None
        self._pending_grads: Optional[list[Any]] = None
        self._pending_loaders: Optional[list[Any]] = None
        self._checked: dict[tuple[str, float, int], Optional[str]] = {}
        self.io: Optional[SafeCheckpointIO] = None

    @property
    @override
    def state_key(self) -> str:
        # Stable across changes of the save frequency, so that a resume always finds its RNG state.
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------------------------------------ set-up

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        if self._given_dirpath is not None:
            return str(self._given_dirpath)
        return os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    @staticmethod
    def _dirpath_of(callback: ModelCheckpoint, trainer: pl.Trainer) -> str:
        """Where another ModelCheckpoint writes (its own rule, as Lightning resolves it in its setup)."""
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
        # A checkpoint restored by validate/test (Lightning >= 2.5 restores callbacks there too) must not leave
        # RNG states, gradients or a data position behind for a later fit without a checkpoint.
        self._pending_rng = self._pending_grads = self._pending_loaders = None
        self.dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        self.last_model_path = self._last_path()
        self._install_io(trainer)
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
        if self.resumable_data:
            self._make_train_loader_resumable(trainer)

    def _install_io(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        current = strategy.checkpoint_io
        if isinstance(current, SafeCheckpointIO):
            self.io = current
            return
        if type(current) is not TorchCheckpointIO:
            self.io = None
            rank_zero_warn(
                f"ResumableCheckpoint: the Trainer's CheckpointIO is a {type(current).__name__}; it is used as it is, so"
                " files are neither committed atomically nor checked before loading. Use SafeCheckpointIO for both"
            )
            return
        self.io = SafeCheckpointIO(asynchronous=self.asynchronous)
        strategy.checkpoint_io = self.io

        def undo() -> None:
            strategy.checkpoint_io = current

        self._undo.append(undo)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            if self.io is not None:
                self.io.wait()  # the last save is on disk before fit returns
        finally:
            while self._undo:
                self._undo.pop()()
            self._trainer = None
            self._training = False

    def _make_train_loader_resumable(self, trainer: pl.Trainer) -> None:
        # Lightning 2.5-2.6: the fit loop's `_data_source` says where the train loader comes from (a hook of the
        # module / data module, or the loader given to `fit`); it is requested after the restore.
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
        if _stateful(loader) or not isinstance(loader, DataLoader):
            return loader  # resumable already (ours, torchdata's StatefulDataLoader), or not ours to rebuild
        if trainer.overfit_batches > 0:
            # Lightning re-creates the loader with a SequentialSampler for overfit_batches, replacing any sampler.
            reason = f"Trainer(overfit_batches={trainer.overfit_batches}) replaces its sampler"
        else:
            # Lightning injects DistributedSampler(shuffle=True, **distributed_sampler_kwargs) into a training loader
            # when `use_distributed_sampler` and there is more than one replica: the rebuilt loader does the same.
            kwargs = trainer.distributed_sampler_kwargs if trainer._accelerator_connector.use_distributed_sampler else None
            replicas, rank = int((kwargs or {}).get("num_replicas", 1)), int((kwargs or {}).get("rank", 0))
            try:
                return ResumableDataLoader.from_loader(loader, num_replicas=replicas, rank=rank)
            except TypeError as err:
                reason = str(err).split(": ", 1)[-1]
        rank_zero_warn(
            f"ResumableCheckpoint: the train dataloader cannot be made resumable mid-epoch ({reason}). A resume"
            " from a mid-epoch checkpoint will not continue the same data order: give the loader state_dict()/"
            "load_state_dict() (e.g. ResumableDataLoader or torchdata's StatefulDataLoader) or save at epoch ends only"
        )
        return loader

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
            self._checked[key] = checkpoint_problem(path)
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
            if problem is None or problem.startswith(NEEDS_PICKLE):  # intact: loading says what to pass
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

    # ------------------------------------------------------------------------------------------------ when to save

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
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            rank_zero_warn(
                f"ResumableCheckpoint(monitor={self.monitor!r}): no such logged metric at validation end (logged:"
                f" {sorted(trainer.callback_metrics)}); no best checkpoint kept this time"
            )
            return
        score = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        if torch.isnan(score):
            return
        if len(self.best_k_models) >= self.save_top_k and not self._better(score, self._worst()[1]):
            return
        path = self.format_checkpoint_name(self._candidates(trainer))
        self.best_k_models[path] = score
        dropped = []
        while len(self.best_k_models) > self.save_top_k:
            worst = self._worst()[0]
            del self.best_k_models[worst]
            if worst not in self._recent and worst != path:
                dropped.append(worst)
        self.kth_best_model_path, self.kth_value = self._worst()
        self.best_model_path = min(self.best_k_models, key=lambda p: self._rank(self.best_k_models[p]))
        self.best_model_score = self.best_k_models[self.best_model_path]
        self.current_score = score
        self._save(trainer, path, dropped)

    def _rank(self, score: torch.Tensor) -> float:
        return float(score) if self.mode == "min" else -float(score)

    def _better(self, score: torch.Tensor, than: torch.Tensor) -> bool:
        return self._rank(score) < self._rank(than)

    def _worst(self) -> tuple[str, torch.Tensor]:
        path = max(self.best_k_models, key=lambda p: self._rank(self.best_k_models[p]))
        return path, self.best_k_models[path]

    @staticmethod
    def _candidates(trainer: pl.Trainer) -> dict[str, Any]:
        metrics = dict(trainer.callback_metrics)
        metrics.setdefault("epoch", torch.tensor(trainer.current_epoch))
        metrics.setdefault("step", torch.tensor(trainer.global_step))
        return metrics

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
            # Lightning calls no `teardown` hook after an exception: finish the write and undo the set-up here.
            self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------------------------------------ saving

    def _written(self, trainer: pl.Trainer) -> bool:
        return self._last_write is not None and self._last_write[1] == (trainer.global_step, _batches_done(trainer))

    def _save_recent(self, trainer: pl.Trainer) -> None:
        path = self.format_checkpoint_name(self._candidates(trainer))
        recent = [p for p in self._recent if p != path] + [path]
        rotated, self._recent = recent[: -self.keep_last], recent[-self.keep_last :]
        self._save(trainer, path, [old for old in rotated if old not in self.best_k_models])

    def _save(self, trainer: pl.Trainer, path: str, drop: list[str]) -> None:
        """Writes the checkpoint to ``path``; once it is committed, ``last.ckpt`` becomes it and ``drop`` goes."""
        key = (trainer.global_step, _batches_done(trainer))
        last = self._last_path()
        drop = [p for p in drop if self._inside(p) and os.path.abspath(p) != os.path.abspath(last)]
        if self._last_write is not None and self._last_write == (path, key):
            # This very state is on disk under this name already (e.g. best and epoch end): only rotate.
            if trainer.is_global_zero:
                if self.io is not None:
                    self.io.wait()
                _publish(path, last, drop)
            return
        strategy = trainer.strategy
        # Lightning 2.5-2.6: ModelParallelStrategy writes a sharded directory itself, bypassing CheckpointIO.
        sharded = isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", True)
        if sharded or self.io is None:
            tmp = temporary_path(path)
            if trainer.is_global_zero:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _remove_path(tmp)
            strategy.barrier("ResumableCheckpoint.before_save")
            trainer.save_checkpoint(tmp, weights_only=False)  # every rank: sharded strategies write their own part
            if trainer.is_global_zero:
                _commit(tmp, path)
                _publish(path, last, drop)
            strategy.barrier("ResumableCheckpoint.after_save")
        else:
            trainer.save_checkpoint(
                path, weights_only=False, storage_options={"after_commit": lambda p: _publish(p, last, drop)}
            )
        self._last_write = (path, key)
        self.last_model_path = last
        if self.verbose:
            rank_zero_info(f"ResumableCheckpoint: saved {path}")
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _inside(self, path: str) -> bool:
        return os.path.realpath(os.path.dirname(path)) == os.path.realpath(str(self.dirpath))

    # ------------------------------------------------------------------------------------------------ state

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A ResumableDataLoader counts the batches it handed out. If a save interrupts a batch (an exception inside
        # the step), Lightning redoes that batch after the resume: the loader must hand it out again.
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.processed == progress.ready:
            return
        states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])
        for state in states:
            if isinstance(state, dict) and set(state) == {"seed", "epoch", "batches"} and state["batches"] > 0:
                state["batches"] = min(state["batches"], _batches_done(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["recent"] = list(self._recent)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return state
        state["rng"] = _gather(_rng_state(), trainer)
        done, k = _batches_done(trainer), trainer.accumulate_grad_batches
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
        self._pending_rng = state_dict.get("rng")
        self._pending_grads = state_dict.get("grads")

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
            self._pending_loaders = fit_loop.get("state_dict", {}).get("combined_loader") or None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True
        loaders, self._pending_loaders = self._pending_loaders, None
        if loaders:
            # Lightning loads loader states only when it builds the train loader after the restore; a loader built
            # earlier (`estimated_stepping_batches` read in `setup` / `on_fit_start` / `configure_optimizers`,
            # Lightning issue #20550) is never given its state. Nothing has been fetched yet: give it now.
            stateful = [loader for loader in _flatten(trainer.train_dataloader) if _stateful(loader)]
            if len(stateful) == len(loaders):
                for loader, state in zip(stateful, loaders):
                    if isinstance(loader, ResumableDataLoader):
                        loader.load_state_dict(state)
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
