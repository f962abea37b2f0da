"""Atomic, validated and optionally asynchronous checkpoint files: a Lightning ``CheckpointIO`` plugin.

Copy this one file into your project: it needs torch and lightning only.

    trainer = Trainer(plugins=[SafeCheckpointIO(asynchronous=True)])

- **Atomic.** A file is written to a hidden temporary beside it (``.<name>.tmp``), flushed to disk (``fsync``) and
  renamed: readers see the old file or the new one, never half of one. A crash or ``kill -9`` mid-write leaves the
  earlier files intact.
- **Validated.** Loading reads the file once into memory, checks the zip structure and every member's CRC-32 on those
  bytes, then unpickles them with ``weights_only=True`` (unless told otherwise) and checks that the result is a
  Lightning training checkpoint. Every problem is an error that names the file and what is wrong with it.
- **Asynchronous** (``asynchronous=True``). The training loop pays for a consistent snapshot of the state (tensors
  copied to CPU memory); a background thread serialises, writes, fsyncs, renames and then runs the caller's
  ``after_commit`` function (rotation). At most one save is in flight: the next one first waits for it, and the
  wait is recorded (``wait_seconds``). The price: one copy of the state in host memory, reused by every save. ``wait()`` and ``teardown()`` (which Lightning calls at the end of every
  ``fit`` / ``validate`` / ...) block until the file is on disk.

``storage_options={"after_commit": fn}`` in ``trainer.save_checkpoint`` runs ``fn(path)`` once the file is committed
(in the background thread when asynchronous). Sharded checkpoints (``ModelParallelStrategy`` / FSDP2 with
``torch.distributed.checkpoint``) are written by the strategy itself and never reach a ``CheckpointIO``.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

__all__ = ["SafeCheckpointIO", "checkpoint_problem"]

SHARDED_MARKER = ".metadata"  # torch.distributed.checkpoint writes it last, once every shard is on disk
SHARDED_META = "meta.pt"  # Lightning's ModelParallelStrategy: everything but the sharded tensors
NEEDS_PICKLE = "it holds objects that only load with weights_only=False"  # intact, but not weights-only
_LIGHTNING_KEYS = ("state_dict", "loops", "global_step")


# ---------------------------------------------------------------------------------------------------- validation


def _members(file: Any, size: int, data: memoryview) -> tuple[list[tuple[str, int, int, int]], Optional[str]]:
    """The ``(name, start, size, CRC-32)`` of every member of a ``torch.save`` zip archive, from its directory (read
    from the seekable ``file``) and local headers (in ``data``, the same bytes); or ``([], the problem)``."""
    if size == 0:
        return [], "empty file (0 bytes)"
    try:
        archive = zipfile.ZipFile(file)  # reads the central directory only
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return [], f"truncated or not written by torch.save: no zip directory at the end of its {size} bytes"
    members = []
    with archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:  # torch.save stores, never compresses
                return [], f"not written by torch.save: member {info.filename!r} is compressed"
            header = bytes(data[info.header_offset : info.header_offset + 30])
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                return [], f"corrupted zip archive (no local header for member {info.filename!r})"
            start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            if start + info.compress_size > size:
                return [], f"truncated: member {info.filename!r} ends past the end of the file"
            members.append((info.filename, start, info.compress_size, info.CRC))
    return members, None


def _crc_problem(members: list[tuple[str, int, int, int]], data: memoryview) -> Optional[str]:
    for name, start, length, crc in members:
        if zlib.crc32(data[start : start + length]) != crc:  # zlib releases the GIL on large buffers
            return f"corrupted: member {name!r} fails its CRC-32 check"
    return None


def _checked_load(path: str, *, map_location: Any, weights_only: bool, memory_map: bool = False) -> tuple[Any, Optional[str]]:
    """Unpickles the file while a second thread checks every CRC-32 of it; (content, None) or (None, the problem),
    the problem including "not a Lightning training checkpoint".

    The zip structure is checked first (cheap). The CRCs, a full pass over the memory-mapped bytes, run beside
    ``torch.load``, so a checked load costs about one pass over the file, as an unchecked one does; a failed CRC
    discards whatever was loaded. Both read the same open file: a rename that replaces ``path`` meanwhile does not
    matter.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return None, "empty file (0 bytes)"
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                members, problem = _members(file, size, view)
                if problem is not None:
                    return None, problem
                result: list[Optional[str]] = []
                checker = threading.Thread(target=lambda: result.append(_crc_problem(members, view)),
                                           name="SafeCheckpointIO-crc")  # fmt: skip
                checker.start()
                try:
                    file.seek(0)
                    source = path if memory_map else file  # torch memory-maps by name (a check only, never the load)
                    content, problem = _unpickle(source, map_location=map_location, weights_only=weights_only,
                                                 memory_map=memory_map)  # fmt: skip
                finally:
                    checker.join()
                if result[0] is not None:  # corrupted bytes: whatever unpickled from them does not count
                    return None, result[0]
                return content, problem or _content_problem(content, sharded=False)
            finally:
                view.release()


def _content_problem(content: Any, *, sharded: bool) -> Optional[str]:
    wanted = ("loops", "global_step") if sharded else _LIGHTNING_KEYS
    missing = [key for key in wanted if not isinstance(content, dict) or key not in content]
    if missing:
        return f"not a Lightning training checkpoint: no {', '.join(map(repr, missing))}"
    return None


def _unpickle(source: Any, *, map_location: Any, weights_only: bool, memory_map: bool = False) -> tuple[Any, Optional[str]]:
    """``torch.load``; (content, None), or (None, the problem). ``memory_map`` (a path only): tensors are not read."""
    try:
        return torch.load(source, map_location=map_location, weights_only=weights_only, mmap=memory_map), None
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is the answer
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            first_line = str(err).strip().splitlines()[0]
            return None, f"{NEEDS_PICKLE} ({first_line}); if you trust the file, {_weights_only_fix()}"
        return None, f"cannot be unpickled ({type(err).__name__}: {err})"


def _weights_only_fix() -> str:
    import inspect

    from lightning.pytorch import Trainer

    if "weights_only" in inspect.signature(Trainer.fit).parameters:  # Lightning >= 2.6
        return "pass trainer.fit(..., weights_only=False)"
    return "use SafeCheckpointIO(weights_only=False)"


def checkpoint_problem(path: str, *, weights_only: bool = True) -> Optional[str]:
    """What is wrong with the checkpoint at ``path`` (a file, or a sharded checkpoint directory), or ``None``.

    A file must be a complete zip archive whose every member passes its CRC-32 check and must unpickle (with
    ``weights_only``) into a Lightning training checkpoint. An intact file that needs ``weights_only=False`` gets a
    message starting with ``NEEDS_PICKLE``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        missing = [name for name in (SHARDED_MARKER, SHARDED_META) if not os.path.isfile(os.path.join(path, name))]
        if missing:
            return f"incomplete sharded checkpoint directory: {' and '.join(missing)} missing"
        content, problem = _unpickle(os.path.join(path, SHARDED_META), map_location="cpu", weights_only=weights_only)
        return problem or _content_problem(content, sharded=True)
    if not os.path.isfile(path):
        return "no such file"
    # Memory-mapped: the CRCs read every byte, the unpickling only the structure (not a second copy of the tensors).
    return _checked_load(path, map_location="cpu", weights_only=weights_only, memory_map=True)[1]


# ---------------------------------------------------------------------------------------------------- writing


def fsync_path(path: str) -> None:
    """Flushes a file, or a directory's entries (and every file below it), to disk."""
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                fsync_path(os.path.join(root, name))
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


def temporary_path(path: str) -> str:
    """The hidden temporary beside ``path`` that a save writes before renaming it to ``path``."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def _snapshot(obj: Any, staging: list[torch.Tensor], index: Optional[list[int]] = None) -> Any:
    """A copy of a checkpoint that training can no longer change: tensors copied to CPU, containers rebuilt.

    The tensors are copied into ``staging``, the previous save's buffers (reused when the shapes and dtypes agree,
    which they do from one save to the next): copying into memory already touched is about twice as fast as into
    fresh memory, whose every page faults and is zeroed first.
    """
    index = [0] if index is None else index
    if isinstance(obj, torch.Tensor):
        i = index[0]
        index[0] += 1
        source = obj.detach()
        if i < len(staging) and staging[i].shape == source.shape and staging[i].dtype == source.dtype:
            return staging[i].copy_(source)
        copy = source.to("cpu", copy=True)
        if i < len(staging):
            staging[i] = copy
        else:
            staging.append(copy)
        return copy
    if isinstance(obj, dict):
        copy = type(obj)() if type(obj) is not dict else {}
        for key, value in obj.items():
            copy[key] = _snapshot(value, staging, index)
        return copy
    if isinstance(obj, list):
        return [_snapshot(value, staging, index) for value in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_snapshot(value, staging, index) for value in obj)
    return obj


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic writes, validated loads and an optional background writer.

    Args:
        asynchronous: Write in a background thread (see the module docstring); ``False`` writes before returning.
        fsync: Flush each file and its directory entry to disk before and after the rename (durability across a
            power loss; a rename alone already protects against a killed process).
        weights_only: What ``load_checkpoint`` uses when Lightning passes ``None`` (Lightning < 2.6 never passes it).
    """

    def __init__(self, *, asynchronous: bool = False, fsync: bool = True, weights_only: bool = True) -> None:
        super().__init__()
        for name, value in (("asynchronous", asynchronous), ("fsync", fsync), ("weights_only", weights_only)):
            if not isinstance(value, bool):
                raise TypeError(f"SafeCheckpointIO(`{name}`) must be True or False, got {value!r}")
        self.asynchronous = asynchronous
        self.fsync = fsync
        self.weights_only = weights_only
        self._executor: Optional[ThreadPoolExecutor] = None
        self._future: Optional[Future] = None
        self._staging: list[torch.Tensor] = []  # host copies of the state, reused by every asynchronous save
        self._lock = threading.Lock()
        #: Seconds the caller spent waiting for the previous save, per save (asynchronous mode).
        self.wait_seconds: list[float] = []
        #: Seconds the caller was blocked per save: the snapshot (asynchronous) or the whole write (synchronous).
        self.stall_seconds: list[float] = []

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        after_commit = self._after_commit(storage_options)
        path = os.fspath(path)
        if not self.asynchronous:
            start = time.perf_counter()
            self._write(checkpoint, path, after_commit)
            self.stall_seconds.append(time.perf_counter() - start)
            return
        start = time.perf_counter()
        self.wait_seconds.append(self.wait())  # at most one save in flight
        snapshot = _snapshot(checkpoint, self._staging)  # the previous save is done with these buffers
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="SafeCheckpointIO")
        with self._lock:
            self._future = self._executor.submit(self._write, snapshot, path, after_commit)
        self.stall_seconds.append(time.perf_counter() - start)

    @staticmethod
    def _after_commit(storage_options: Optional[Any]) -> Optional[Callable[[str], None]]:
        if storage_options is None:
            return None
        if not isinstance(storage_options, dict) or set(storage_options) - {"after_commit"}:
            raise TypeError(
                f"SafeCheckpointIO.save_checkpoint(storage_options={storage_options!r}): the only option is"
                " {'after_commit': fn}, a function called with the path once the file is committed"
            )
        return storage_options["after_commit"]

    def _write(self, checkpoint: dict[str, Any], path: str, after_commit: Optional[Callable[[str], None]]) -> None:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = temporary_path(path)
        with open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            if self.fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
        if self.fsync:
            fsync_path(directory)
        if after_commit is not None:
            after_commit(path)

    def wait(self) -> float:
        """Blocks until the save in flight (if any) is on disk; re-raises its error. Returns the seconds waited."""
        with self._lock:
            future, self._future = self._future, None
        if future is None:
            return 0.0
        start = time.perf_counter()
        future.result()
        return time.perf_counter() - start

    @override
    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = os.fspath(path)
        if "://" in path and not path.startswith("file://"):
            return super().load_checkpoint(path, map_location=map_location)  # remote: the plain loader
        self.wait()  # a save of this very file may be in flight
        weights_only = self.weights_only if weights_only is None else weights_only
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Cannot resume from checkpoint {path}: no such file")
        content, problem = _checked_load(path, map_location=map_location, weights_only=weights_only)
        if problem is not None:
            raise RuntimeError(f"Cannot resume from checkpoint {path}: {problem}")
        return content

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        super().remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._staging = []
