"""Gradient all-reduces per optimizer step under DDP (2 CPU processes, gloo) with ``GradientAccumulation``, k = 1 and 4.

    python benchmarks/allreduce.py                          # digits ViT, 2 epochs per k
    python benchmarks/allreduce.py --epochs 1 --limit-batches 6

Each process trains the digits ViT (``recipes/configs/vit_digits.yaml``'s model) on its half of the digits
training images with ``GradientAccumulation(global_batch_size = batch x 2 processes x k)``. A DDP communication
hook counts the bucket all-reduces: DDP splits the gradients into buckets (the first 1 MiB, then 25 MiB each; on
the very first step one bucket in parameter order, rebuilt after it) and all-reduces each, so one synchronisation
of the gradients is one *round* of ``buckets`` calls, the last of which has ``bucket.is_last()``. Rounds are
counted between consecutive optimizer steps (``on_before_optimizer_step``): with accumulation, Lightning runs the
window's first k - 1 backward passes under ``no_sync``, so every optimizer step should cost exactly one round,
including the shorter last window of an epoch (23 batches per process and epoch at batch 32: windows of 4, 4, 4,
4, 4, 3 for k = 4). These are counts, not timings: one run, every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from report import Report, config_of, digits_vit_args, quiet_lightning, run_two_processes, set_distributed_env

from lightning_recipes.callbacks import GradientAccumulation
from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.recipes.vit import ViTClassifier


class CountAllReduces(L.Callback):
    """Wraps DDP's all-reduce in a counting communication hook (Lightning registers comm hooks on CUDA only)."""

    def __init__(self) -> None:
        self.calls = self.rounds = 0
        self.micro_batches = 0
        self.per_step: list[dict[str, int]] = []

    def on_fit_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.calls += 1
            self.rounds += int(bucket.is_last())
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.micro_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Runs after the window's last backward, whose all-reduces have completed: everything since the last step.
        self.per_step.append({"rounds": self.rounds, "calls": self.calls, "micro_batches": self.micro_batches})
        self.calls = self.rounds = self.micro_batches = 0


def _worker(rank: int, port: int, out_dir: str, config: dict) -> None:
    set_distributed_env(rank, port)
    torch.set_num_threads(1)  # 2 processes on 2 cores
    out = {}
    with quiet_lightning():
        for k in config["ks"]:
            torch.manual_seed(0)
            model = ViTClassifier(**digits_vit_args())
            data = DigitsDataModule(image_size=model.hparams.image_size, augment=False, batch_size=config["batch_size"])
            counter = CountAllReduces()
            accumulation = GradientAccumulation(global_batch_size=config["batch_size"] * 2 * k)
            trainer = L.Trainer(
                accelerator="cpu",
                devices=2,
                strategy=DDPStrategy(process_group_backend="gloo"),
                max_epochs=config["epochs"],
                limit_train_batches=config["limit_batches"],
                limit_val_batches=0,
                num_sanity_val_steps=0,
                callbacks=[accumulation, counter],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=out_dir,
            )
            trainer.fit(model, datamodule=data)
            out[str(k)] = {
                "per_step": counter.per_step,
                "optimizer_steps": trainer.global_step,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(out, file)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4], help="accumulation steps to run (default 1 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per k (default 2)")
    parser.add_argument("--limit-batches", type=int, default=None,
                        help="micro-batches per process and epoch (default: all 23)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="micro batch per process (default 32)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/allreduce.json)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or min(args.ks) < 1 or args.batch_size < 1 or (args.limit_batches or 1) < 1:
        parser.error("--epochs, --ks, --batch-size and --limit-batches must be >= 1")

    config = {"ks": args.ks, "epochs": args.epochs, "batch_size": args.batch_size,
              "limit_batches": args.limit_batches or 1.0}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run_two_processes(_worker, tmp, config)
        ranks = [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in (0, 1)]

    report = Report("allreduce", 1, config_of(args, argv))
    for k in args.ks:
        runs = [rank[str(k)] for rank in ranks]
        steps = [s for run in runs for s in run["per_step"]]
        for run in runs:
            if len(run["per_step"]) != run["optimizer_steps"]:
                raise RuntimeError(f"k={k}: {len(run['per_step'])} steps counted, {run['optimizer_steps']} taken")
        report.add(f"all-reduce rounds per optimizer step, k={k}", [s["rounds"] for s in steps], goal=("==", 1),
                   note=f"{runs[0]['optimizer_steps']} optimizer steps x 2 ranks")  # fmt: skip
        report.add(f"bucket all-reduce calls per optimizer step, k={k}", [s["calls"] for s in steps],
                   note="= DDP buckets per round")  # fmt: skip
        report.add(f"micro-batches per optimizer step, k={k}", [s["micro_batches"] for s in steps])
        report.extra[f"k={k}"] = {"optimizer_steps": runs[0]["optimizer_steps"],
                                  "accumulate_grad_batches": runs[0]["accumulate_grad_batches"]}  # fmt: skip
    parameters = ranks[0][str(args.ks[0])]["parameters"]
    report.notes.append(
        f"digits ViT ({parameters:,} parameters, {4 * parameters / 2**20:.1f} MiB of float32 gradients), micro batch"
        f" {args.batch_size} per process, 2 processes (gloo, CPU), {args.epochs} epoch(s) per k;"
        " 'rounds' counts the calls on DDP's last bucket"
    )
    return report.finish(args.out)


if __name__ == "__main__":
    main()
