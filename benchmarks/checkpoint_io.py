"""What a checkpoint costs the training loop, and how fast it is written and read: ``ResumableCheckpoint`` with
``SafeCheckpointIO`` (synchronous and asynchronous) against Lightning's plain ``trainer.save_checkpoint`` and load,
interleaved, in the middle of a real training run.

    python benchmarks/checkpoint_io.py                      # 64 MiB of float32 weights: a ~201 MB checkpoint
    python benchmarks/checkpoint_io.py --size-mb 1 --reps 2

A model of ``--size-mb`` MiB of float32 weights trains 2 AdamW steps (so the checkpoint holds weights, both AdamW
moments, the loops and every callback's state: about 3x the weights) with ``ResumableCheckpoint`` attached. Then, from
``on_train_batch_end`` of the last step, with the trainer in the state a periodic save sees, each repetition runs:

save (seconds the training loop is blocked, and seconds until the file is on disk)
- ``lightning``: ``trainer.save_checkpoint(path)`` through Lightning's own ``TorchCheckpointIO`` (what its
  ``ModelCheckpoint`` calls): ``torch.save`` into memory, written through fsspec (a temporary file moved into place;
  no fsync). Blocked = on disk.
- ``ours, sync``: what ``ResumableCheckpoint`` runs every ``every_n_steps`` with ``SafeCheckpointIO``: a hidden
  temporary beside the target, fsync, rename, fsync of the folder, then ``last.ckpt`` hard-linked and committed the
  same way. Blocked = on disk.
- ``ours, async``: the same with ``asynchronous=True``: the loop is blocked for the snapshot (every tensor copied)
  and the hand-off; "on disk" adds the wait for the background thread.

load
- ``lightning``: ``TorchCheckpointIO().load_checkpoint(path)`` (``torch.load`` through fsspec, no checks).
- ``ours``: ``SafeCheckpointIO().load_checkpoint(path)``: one read of the file into memory, every zip member's CRC-32
  checked on those bytes, ``torch.load(weights_only=True)`` from them, the Lightning keys checked.

All files live in one temporary folder on the same file system as the system temp folder (``--dir``), so that
Lightning's move is a rename too. Files just written are in the page cache: loads read memory, not the disk.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from report import Report, config_of, interleave, quiet_lightning, ratios, torch_threads

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_recipes.callbacks import ResumableCheckpoint
from lightning_recipes.callbacks.checkpoint_io import SafeCheckpointIO

STEPS = 2


class Weights(L.LightningModule):
    """``size_mb`` MiB of float32 weights in square linear layers of at most 1024 x 1024 (4 MiB each)."""

    def __init__(self, size_mb: float) -> None:
        super().__init__()
        elements = size_mb * 2**20 / 4
        width = 1024 if elements >= 1024 * 1024 else max(2, int(math.sqrt(elements)))
        layers = max(1, round(elements / (width * width)))
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
        self.width = width

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layers(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _timed(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


class Bench(L.Callback):
    """Runs the interleaved saves and loads after the last training step, while the Trainer is fitting."""

    def __init__(self, folder: Path, reps: int, checkpoint: ResumableCheckpoint) -> None:
        self.folder, self.reps, self.checkpoint = folder, reps, checkpoint
        self.seconds: dict[str, list[float]] = {}
        self.sizes: dict[str, int] = {}
        self.state_dict_seconds: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step < STEPS:
            return
        ours, plain = self.checkpoint, str(self.folder / "plain.ckpt")
        strategy, lightning_io = trainer.strategy, TorchCheckpointIO()
        sync_io, async_io = SafeCheckpointIO(), SafeCheckpointIO(asynchronous=True)

        def save_lightning() -> tuple[float, float]:
            installed, strategy.checkpoint_io = strategy.checkpoint_io, lightning_io
            try:
                start = time.perf_counter()
                trainer.save_checkpoint(plain)
                blocked = time.perf_counter() - start
            finally:
                strategy.checkpoint_io = installed
            return blocked, blocked

        def save_ours(io: SafeCheckpointIO) -> Callable[[], tuple[float, float]]:
            def run() -> tuple[float, float]:
                installed, strategy.checkpoint_io, ours.io = strategy.checkpoint_io, io, io
                ours._last_write = None  # else it sees this very state on disk already and skips the write
                try:
                    start = time.perf_counter()
                    ours._save_recent(trainer)  # what on_train_batch_end runs every `every_n_steps`
                    blocked = time.perf_counter() - start
                    io.wait()
                    return blocked, time.perf_counter() - start
                finally:
                    strategy.checkpoint_io = ours.io = installed

            return run

        saves = {"lightning": save_lightning, "ours, sync": save_ours(sync_io), "ours, async": save_ours(async_io)}
        loads = {
            "load, lightning": lambda: lightning_io.load_checkpoint(plain),
            "load, ours": lambda: SafeCheckpointIO().load_checkpoint(ours.last_model_path),
        }
        for fn in (*saves.values(), *loads.values()):  # first calls: imports, file creation; not timed
            fn()
        timed = interleave(saves, reps=self.reps)
        for name, pairs in timed.items():
            self.seconds[f"save blocked, {name}"] = [blocked for blocked, _ in pairs]
            self.seconds[f"save on disk, {name}"] = [done for _, done in pairs]
        self.seconds.update(interleave({name: _timed(fn) for name, fn in loads.items()}, reps=self.reps))
        self.sizes = {"lightning": os.path.getsize(plain), "ours": os.path.getsize(ours.last_model_path)}
        self.state_dict_seconds = [_timed(ours.state_dict)() for _ in range(self.reps)]
        async_io.teardown()


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=64.0, help="MiB of float32 weights (default 64)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions of every save and load (default 7)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a new folder in the system temp folder)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/checkpoint_io.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.reps < 1:
        parser.error("--size-mb must be > 0 and --reps >= 1")

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, quiet_lightning(), torch_threads(args.threads):
        folder = Path(tmp)
        torch.manual_seed(0)
        model = Weights(args.size_mb)
        checkpoint = ResumableCheckpoint(dirpath=str(folder / "checkpoints"), every_n_steps=1000,
                                         save_on_epoch_end=False)  # fmt: skip
        bench = Bench(folder, args.reps, checkpoint)
        trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[bench, checkpoint], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder)  # fmt: skip
        data = TensorDataset(torch.randn(8 * STEPS, model.width))
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=8))
        device = os.stat(folder).st_dev == os.stat(tempfile.gettempdir()).st_dev

        s, mb = bench.seconds, {name: size / 1e6 for name, size in bench.sizes.items()}
        report = Report("checkpoint_io", args.reps, config_of(args, argv))
        lightning = s["save on disk, lightning"]
        report.add("training-loop stall per save, ours async / lightning", ratios(s["save blocked, ours, async"], lightning),
                   goal=("<=", 0.1), note="seconds the loop is blocked, ours (snapshot + hand-off) / Lightning's whole save")  # fmt: skip
        report.add("save throughput to disk, ours async / lightning", ratios(lightning, s["save on disk, ours, async"]),
                   goal=(">=", 0.9), note="equal sizes: Lightning's save time / ours from request to committed, fsync included")  # fmt: skip
        report.add("save throughput to disk, ours sync / lightning", ratios(lightning, s["save on disk, ours, sync"]))
        report.add("load MB/s, ours / lightning", ratios(s["load, lightning"], s["load, ours"]), goal=(">=", 0.9),
                   note="ours checks every CRC-32 and the Lightning keys; Lightning checks nothing")  # fmt: skip
        for name, seconds in s.items():
            size = mb["ours"] if "ours" in name else mb["lightning"]
            if name.startswith("save blocked"):
                report.add(f"{name}", [1e3 * t for t in seconds], unit="ms")
            else:
                report.add(f"{name}", [size / t for t in seconds], unit="MB/s")
        report.add("ResumableCheckpoint.state_dict() per save", [1e3 * t for t in bench.state_dict_seconds], unit="ms",
                   note="our extra state (every rank's RNG states): in the saves above")  # fmt: skip
        report.extra["checkpoint_bytes"] = bench.sizes
        report.notes.append(
            f"checkpoint {mb['ours']:.1f} MB (ours) / {mb['lightning']:.1f} MB (lightning): {args.size_mb:g} MiB of"
            f" weights + AdamW state; folder {'on the same file system as' if device else 'NOT on the file system of'}"
            f" the system temp folder{' (Lightning moves by copying!)' if not device else ''}; MB = 10^6 bytes"
        )
        report.notes.append(
            "ours fsyncs the file and its folder (a save that survives a power loss or node crash, not only a kill -9);"
            " Lightning's save returns with the data still in the page cache"
        )
        return report.finish(args.out)


if __name__ == "__main__":
    main()
