"""Save and load speed (MB/s) of ResumableCheckpoint's atomic checkpoints against Lightning's plain
``trainer.save_checkpoint`` and checkpoint loading, interleaved, in the middle of a real training run.

    python benchmarks/checkpoint_io.py                      # 64 MiB of float32 weights: a ~192 MiB checkpoint
    python benchmarks/checkpoint_io.py --size-mb 1 --reps 2

A model of ``--size-mb`` MiB of float32 weights trains 2 AdamW steps (so the checkpoint holds weights, both AdamW
moments, the loops and every callback's state: about 3x the weights) with ``ResumableCheckpoint`` attached. Then, from
``on_train_batch_end`` of the last step, with the trainer in the state a periodic save sees, each repetition runs:

save
- ``lightning``: ``trainer.save_checkpoint(path)``, what Lightning's ``ModelCheckpoint`` calls: ``torch.save`` into
  memory, written through fsspec's local transaction (a temporary file in the system temp folder, moved into place;
  no fsync).
- ``ours``: what ``ResumableCheckpoint`` runs every ``every_n_steps``: the same ``trainer.save_checkpoint`` into a
  hidden temporary next to the target, fsync, rename, fsync of the folder, then ``last.ckpt`` hard-linked and
  committed the same way.
- ``ours, no fsync``: the same with the fsyncs made no-ops, to show what durability costs.

load
- ``lightning``: ``strategy.checkpoint_io.load_checkpoint(path)``: ``torch.load`` (``weights_only`` by torch's default).
- ``ours``: the strategy's ``load_checkpoint`` as ResumableCheckpoint patches it: every zip member's CRC-32 checked
  and the pickle read with ``weights_only=True`` (the check is cached per file; cleared each repetition), then the
  same load.

All files live in one temporary folder on the same file system as the system temp folder (``--dir``), so that
Lightning's move is a rename too. Files just written are in the page cache: loads read memory, not the disk.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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

import lightning_recipes.callbacks.checkpoint as checkpoint_module
from lightning_recipes.callbacks import ResumableCheckpoint

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

        def save_ours() -> None:
            ours._last_write = None  # else it sees this very state on disk already and skips the write
            ours._save_recent(trainer)  # what on_train_batch_end runs every `every_n_steps` (callbacks/checkpoint.py)

        def save_ours_no_fsync() -> None:
            fsync, checkpoint_module._fsync_path = checkpoint_module._fsync_path, lambda path: None
            try:
                save_ours()
            finally:
                checkpoint_module._fsync_path = fsync

        def load_ours() -> Any:
            ours._checked.clear()  # the validity check is cached per (file, mtime, size): measure it every time
            return trainer.strategy.load_checkpoint(ours.last_model_path)

        saves = {
            "save, lightning": lambda: trainer.save_checkpoint(plain),
            "save, ours": save_ours,
            "save, ours, no fsync": save_ours_no_fsync,
        }
        loads = {
            "load, lightning": lambda: trainer.strategy.checkpoint_io.load_checkpoint(plain),
            "load, ours": load_ours,
        }
        for fn in (*saves.values(), *loads.values()):  # first calls: imports, file creation; not timed
            fn()
        self.seconds.update(interleave({name: _timed(fn) for name, fn in saves.items()}, reps=self.reps))
        self.seconds.update(interleave({name: _timed(fn) for name, fn in loads.items()}, reps=self.reps))
        self.sizes = {"lightning": os.path.getsize(plain), "ours": os.path.getsize(ours.last_model_path)}
        self.state_dict_seconds = [_timed(ours.state_dict)() for _ in range(self.reps)]


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
        report.add("save MB/s, ours / lightning", ratios(s["save, lightning"], s["save, ours"]), goal=(">=", 0.9),
                   note="equal sizes: the ratio of times, lightning / ours")  # fmt: skip
        report.add("load MB/s, ours / lightning", ratios(s["load, lightning"], s["load, ours"]), goal=(">=", 0.9))
        no_fsync = ratios(s["save, lightning"], s["save, ours, no fsync"])
        share = [1 - b / a for a, b in zip(s["save, ours"], s["save, ours, no fsync"])]
        report.add("save MB/s, ours without fsync / lightning", no_fsync)
        report.add("fsync share of our save", share, note="1 - (time without fsync) / (time with)")
        for name, seconds in s.items():
            size = mb["ours"] if "ours" in name else mb["lightning"]
            report.add(f"{name}", [size / t for t in seconds], unit="MB/s")
        report.add("ResumableCheckpoint.state_dict() per save", [1e3 * t for t in bench.state_dict_seconds], unit="ms",
                   note="our extra state (every rank's RNG states, data position): in both saves above")  # fmt: skip
        report.extra["checkpoint_bytes"] = bench.sizes
        report.notes.append(
            f"checkpoint {mb['ours']:.1f} MB (ours) / {mb['lightning']:.1f} MB (lightning): {args.size_mb:g} MiB of"
            f" weights + AdamW state; folder {'on the same file system as' if device else 'NOT on the file system of'}"
            f" the system temp folder{' (Lightning moves by copying!)' if not device else ''}; MB = 10^6 bytes"
        )
        report.notes.append(
            f"save: without its fsyncs our atomic protocol (hidden temporary, rename, hard link) runs at"
            f" {statistics.median(no_fsync):.2f}x Lightning's speed; the fsyncs (file, folder, link, folder: what makes"
            f" a save survive a power loss or node crash, not only a kill -9) are {statistics.median(share):.0%} of our"
            " save here. Lightning's save returns with the data still in the page cache"
        )
        report.notes.append(
            "load: ours first reads the whole file to check every zip member's CRC-32 and unpickles it memory-mapped"
            " (the checks that turn a truncated or corrupted file into an error naming it), then loads as Lightning"
            " does: about one extra read of the file, once per resume (cached per file)"
        )
        return report.finish(args.out)


if __name__ == "__main__":
    main()
