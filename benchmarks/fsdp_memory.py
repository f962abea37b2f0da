"""Per-rank parameter, gradient and optimizer-state bytes of the ViT recipe under FSDP2 (2 CPU processes, gloo)
against the same training in a single process.

    python benchmarks/fsdp_memory.py                        # ViT-S/16-sized: 12 blocks x 384, 21.3M parameters
    python benchmarks/fsdp_memory.py --depth 1 --width 32 --heads 2 --mlp-dim 32      # tiny

FSDP2 is the recipe's own: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, whose mesh the
recipe's ``configure_model`` uses to ``fully_shard`` every encoder block and then the root (ZeRO-3). The
single-process run is a plain ``Trainer(devices=1)`` of the same model (seed 0). After the last optimizer step
(``on_train_batch_end``, gradients not yet cleared) each rank adds up the bytes of the tensors it holds for the
parameters, their gradients and AdamW's state, two ways: *allocated*, the storage behind each local shard (FSDP2
pads every parameter's first dimension to a multiple of 2, so both ranks hold equal-sized buffers; the goal is on
this), and *owned*, the elements of ``to_local()`` alone (the two ranks add up to the single process exactly).
ZeRO-3 over 2 ranks says 1/2; the padding shows on small tensors. Bytes are behaviour, not timings: one run; the
figures' values are one per rank.

The default size is ViT-S/16's transformer (Touvron et al. 2021: 12 blocks, width 384, 6 heads, MLP 1536) on the
digits images upsampled to 32 px in 8-px patches: big enough for realistic tensor shapes, small enough for a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from report import Report, config_of, quiet_lightning, run_two_processes, set_distributed_env

from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.recipes.vit import ViTClassifier

KINDS = ("params", "grads", "optimizer")


def _local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _storage_bytes(tensors) -> int:
    """Bytes of the storage behind this rank's parts, each storage counted once: FSDP2 keeps every local shard in a
    buffer padded to the size of rank 0's, so this is what the rank allocates, not only what it owns."""
    storages = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class Bytes(L.Callback):
    """The bytes of parameters, gradients and optimizer state this process holds after the last step."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.allocated: dict[str, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (optimizer,) = trainer.optimizers
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
        grads = [p.grad for p in params if p.grad is not None]
        # AdamW's state: exp_avg and exp_avg_sq; its step counters are 0-d scalars, left out.
        self.bytes = {"params": _local_bytes(params), "grads": _local_bytes(grads), "optimizer": _local_bytes(state)}
        self.allocated = {"params": _storage_bytes(params), "grads": _storage_bytes(grads),
                          "optimizer": _storage_bytes(state)}  # fmt: skip


def _fit(config: dict, **trainer_kwargs: Any) -> dict[str, dict[str, int]]:
    torch.manual_seed(0)
    model = ViTClassifier(**config["model"])
    data = DigitsDataModule(image_size=config["model"]["image_size"], augment=False, batch_size=config["batch_size"])
    recorder = Bytes()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=config["steps"],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=config["root"],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data)
    return {"owned": recorder.bytes, "allocated": recorder.allocated}


def _worker(rank: int, port: int, config: dict) -> None:
    set_distributed_env(rank, port)
    torch.set_num_threads(1)  # 2 processes on 2 cores
    with quiet_lightning():
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        sharded = _fit(config, devices=2, strategy=strategy)
    with open(os.path.join(config["root"], f"rank{rank}.json"), "w") as file:
        json.dump(sharded, file)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12, help="encoder blocks (default 12)")
    parser.add_argument("--width", type=int, default=384, help="token dimension (default 384)")
    parser.add_argument("--heads", type=int, default=6, help="attention heads (default 6)")
    parser.add_argument("--mlp-dim", type=int, default=1536, help="MLP hidden size (default 1536)")
    parser.add_argument("--image-size", type=int, default=32, help="input side in pixels (default 32)")
    parser.add_argument("--patch-size", type=int, default=8, help="patch side (default 8)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps before measuring (default 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="micro batch per process (default 4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/fsdp_memory.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.depth, args.width, args.heads, args.mlp_dim, args.steps, args.batch_size) < 1:
        parser.error("sizes and --steps must be >= 1")

    model = dict(num_classes=10, in_channels=1, image_size=args.image_size, patch_size=args.patch_size,
                 depth=args.depth, width=args.width, heads=args.heads, mlp_dim=args.mlp_dim)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, quiet_lightning():
        config = {"model": model, "steps": args.steps, "batch_size": args.batch_size, "root": tmp}
        single = _fit(config, devices=1)
        run_two_processes(_worker, config)
        ranks = [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in (0, 1)]

    parameters = sum(p.numel() for p in ViTClassifier(**model).parameters())
    report = Report("fsdp_memory", 1, config_of(args, argv))
    mine = [rank["allocated"] for rank in ranks]
    whole = single["allocated"]
    report.add("FSDP2 / single process, parameters + gradients + optimizer state, per rank",
               [sum(r.values()) / sum(whole.values()) for r in mine], goal=("<=", 0.55), every=True,
               note="allocated: shards with FSDP2's padding")  # fmt: skip
    report.add("FSDP2 / single process, the same, owned elements only, per rank",
               [sum(r["owned"].values()) / sum(single["owned"].values()) for r in ranks],
               note="to_local() sizes, without the padding: the ranks' values add up to 1")  # fmt: skip
    for kind in KINDS:
        report.add(f"FSDP2 / single process, {kind}, per rank", [r[kind] / whole[kind] for r in mine])
    for kind in KINDS:
        report.add(f"FSDP2 {kind}, per rank", [r[kind] / 2**20 for r in mine], unit="MiB")
        report.add(f"single process {kind}", [whole[kind] / 2**20], unit="MiB")
    report.extra["bytes"] = {"single_process": single, "fsdp2_rank0": ranks[0], "fsdp2_rank1": ranks[1]}
    report.extra["model"] = {"class": "ViTClassifier", "args": model, "parameters": parameters}
    report.notes.append(
        f"ViTClassifier {parameters:,} parameters ({args.depth} blocks x {args.width}, {args.heads} heads, MLP"
        f" {args.mlp_dim}, {args.image_size} px / {args.patch_size}-px patches), AdamW, float32; FSDP2 ="
        " ModelParallelStrategy(data_parallel_size=2) over 2 CPU processes (gloo); measured after"
        f" {args.steps} optimizer step(s)"
    )
    return report.finish(args.out)


if __name__ == "__main__":
    main()
