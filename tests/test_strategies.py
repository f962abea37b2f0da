"""Both recipes under DDP and FSDP2 in 2 real CPU processes (gloo), compared with a single-process run.

One pair of processes runs every distributed training below (starting processes and importing Lightning
is most of the cost); each rank writes what it saw to files that the tests read.
"""

import json
import math
import os
import time

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler

from two_processes import run_two_processes
from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.recipes.common import _check_precision_and_strategy
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

pytestmark = pytest.mark.slow
B = 8  # per-process batch
STEPS = 3
MATRIX = [
    (recipe, strategy, precision)
    for recipe in ("vit", "resnet")
    for strategy in ("ddp", "fsdp2")
    for precision in ("32-true", "bf16-mixed", "16-mixed")
    if not (strategy == "fsdp2" and precision == "16-mixed")  # fails up front: tests/test_precision.py
]


def _model(recipe: str) -> L.LightningModule:
    torch.manual_seed(0)  # the same initial weights in every process and in the reference run
    if recipe == "vit":
        return ViTClassifier(depth=1, width=32, heads=2, mlp_dim=32)
    if recipe == "vit-sgd":
        # For comparing weights across strategies: SGD's update is linear in the gradient, so the few-ulp difference
        # between 2 per-rank means all-reduced and one mean over 2B stays a few ulp of the update. AdamW's m/sqrt(v)
        # amplifies it where v is tiny (up to ~lr per step: 1.6e-5 after 3 steps on one CPU kind, < 1e-5 on another).
        return ViTClassifier(depth=1, width=32, heads=2, mlp_dim=32, optimizer="sgd", lr=0.1)
    # lr 0.1 (the recipe's, for batch 64+ with warmup) overshoots on one small batch without warmup; the
    # stride-2 stem (as in resnet_digits.yaml) keeps CPU bf16/fp16 convolutions, which are slow, affordable.
    return ResNetClassifier(arch="resnet18", norm="batch", stem_stride=2, lr=0.02)


def _strategy(name: str):
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


class Recorder(L.Callback):
    """What a rank saw: losses, the sampler's order per epoch, dtypes, and the bytes this rank holds."""

    def __init__(self) -> None:
        self.seen = {"loss": [], "orders": {}, "start_step": None, "bytes": None, "dtypes": None}

    def on_train_start(self, trainer, pl_module):
        self.seen["start_step"] = trainer.global_step

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        if isinstance(sampler, DistributedSampler):
            # The data modules' ResumableDataLoader yields (index, per-sample seed); Lightning's sampler, indices.
            indices = [item[0] if isinstance(item, tuple) else item for item in sampler]
            self.seen["orders"][trainer.current_epoch] = {"set_epoch": sampler.epoch, "indices": indices}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["loss"].append(float(outputs["loss"]))
        (optimizer,) = trainer.optimizers
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        # After the optimizer step: the gradients of this step are still there (zeroed at the next step).
        self.seen["bytes"] = {
            "params": _local_bytes(params),
            "grads": _local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": _local_bytes(state),
        }
        self.seen["dtypes"] = sorted({str(p.dtype) for p in params} | {str(v.dtype) for v in state if v.ndim})


def _fit(strategy, model, datamodule, out_dir, name, rank, *, precision="32-true", ckpt_path=None, **trainer_kwargs):
    recorder = Recorder()
    config = {"accelerator": "cpu", "precision": precision, "strategy": strategy}
    _check_precision_and_strategy(config)  # what the recipes' CLI does: real fp16 AMP + GradScaler on CPU
    trainer = L.Trainer(
        devices=2,
        default_root_dir=out_dir,  # Lightning's default ModelCheckpoint writes there, not into the cwd
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[recorder, *trainer_kwargs.pop("callbacks", [])],
        **config,
        **trainer_kwargs,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    recorder.seen["seconds"] = time.perf_counter() - started
    recorder.seen["precision_plugin"] = type(trainer.precision_plugin).__name__
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    recorder.seen["scaler"] = type(scaler).__name__
    recorder.seen["scale"] = scaler.get_scale() if scaler is not None else None
    with open(os.path.join(out_dir, f"{name}-rank{rank}.json"), "w") as file:
        json.dump(recorder.seen, file)
    return trainer


def _save_full_weights(model, path, rank):
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, path)


def _worker(rank: int, port: int, out_dir: str) -> None:
    # We start the processes ourselves, so Lightning's environment detects them and launches nothing.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    torch.set_num_threads(1)
    digits = DigitsDataModule(augment=False, batch_size=B)  # no random augmentation: ranks vs reference comparable

    # Equivalence: 2 processes x B against 1 process x 2B (reference in the test); the real shuffled sampler.
    for name in ("ddp", "fsdp2"):
        model = _model("vit-sgd")
        _fit(_strategy(name), model, digits, out_dir, f"equal-{name}", rank, max_steps=STEPS)
        _save_full_weights(model, os.path.join(out_dir, f"equal-{name}.pt"), rank)

    # Sampling: 2 epochs of 2 batches, a checkpoint per epoch, then a resume from the epoch-0 checkpoint.
    ckpts = os.path.join(out_dir, "sampling")
    every_epoch = ModelCheckpoint(dirpath=ckpts, filename="{epoch}", save_top_k=-1)
    _fit(_strategy("ddp"), _model("vit"), digits, out_dir, "sampling", rank, max_epochs=2, limit_train_batches=2,
         callbacks=[every_epoch])
    _fit(_strategy("ddp"), _model("vit"), digits, out_dir, "sampling-resumed", rank, max_epochs=2,
         limit_train_batches=2, ckpt_path=os.path.join(ckpts, "epoch=0.ckpt"))

    # The matrix: a fixed batch per rank (overfit_batches=1), STEPS steps, save, resume for one more.
    small = DigitsDataModule(augment=False, batch_size=2)
    for recipe, strategy, precision in MATRIX:
        name = f"{recipe}-{strategy}-{precision}"
        data = digits if recipe == "vit" else small
        ckpt = ModelCheckpoint(dirpath=os.path.join(out_dir, name), save_last=True, save_top_k=0)
        common = {"precision": precision, "overfit_batches": 1}
        _fit(_strategy(strategy), _model(recipe), data, out_dir, name, rank, max_steps=STEPS, callbacks=[ckpt], **common)
        _fit(_strategy(strategy), _model(recipe), data, out_dir, f"{name}-resumed", rank, max_steps=STEPS + 1,
             ckpt_path=os.path.join(out_dir, name, "last.ckpt"), **common)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("strategies")
    run_two_processes(_worker, str(out_dir))

    def load(name, rank):
        with open(out_dir / f"{name}-rank{rank}.json") as file:
            return json.load(file)

    return out_dir, load


class ReferenceDigits(DigitsDataModule):
    """One process reading the order a 2-process DistributedSampler splits: global batch k is the same set."""

    def train_dataloader(self):
        sampler = DistributedSampler(self.train_set, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory):
    model = _model("vit-sgd")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path_factory.mktemp("reference"),
    )
    trainer.fit(model, datamodule=ReferenceDigits(augment=False, batch_size=2 * B))
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_two_processes_of_b_reach_the_weights_of_one_process_of_2b(runs, reference_weights, name):
    out_dir, _ = runs
    weights = torch.load(out_dir / f"equal-{name}.pt")
    assert weights.keys() == reference_weights.keys()
    initial = _model("vit-sgd").state_dict()
    moved = max(float((reference_weights[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # the weights did move: the comparison below is not of untouched tensors
    # float32: the 2 per-rank means summed by all-reduce and halved round differently from one mean over
    # 2B (a few ulp of each gradient); SGD's update is linear in it, so the weights differ by ulps of the updates.
    worst = max(float((weights[k] - reference_weights[k]).abs().max()) for k in weights)
    assert worst < 1e-6, worst


def test_ranks_see_disjoint_samples_reshuffled_every_epoch_and_the_same_order_after_resume(runs):
    _, load = runs
    first = [load("sampling", rank)["orders"] for rank in (0, 1)]
    resumed = [load("sampling-resumed", rank)["orders"] for rank in (0, 1)]
    for epoch in ("0", "1"):
        assert [first[rank][epoch]["set_epoch"] for rank in (0, 1)] == [int(epoch)] * 2
        rank0, rank1 = (set(first[rank][epoch]["indices"]) for rank in (0, 1))
        assert len(rank0) == len(rank1) == 719  # 1437 images, padded to 1438 and split
        assert len(rank0 & rank1) == 1  # disjoint but for the one index repeated to pad
    assert first[0]["0"]["indices"] != first[0]["1"]["indices"]  # set_epoch reshuffled
    # Resumed from the epoch-0 checkpoint, the run starts at epoch 1 with the order of the original epoch 1.
    assert [sorted(r) for r in resumed] == [["1"], ["1"]]
    assert [r["1"]["indices"] for r in resumed] == [f["1"]["indices"] for f in first]


@pytest.mark.parametrize(("recipe", "strategy", "precision"), MATRIX)
def test_matrix_cell_trains_saves_and_resumes(runs, recipe, strategy, precision):
    _, load = runs
    name = f"{recipe}-{strategy}-{precision}"
    for rank in (0, 1):
        run, resumed = load(name, rank), load(f"{name}-resumed", rank)
        losses = run["loss"] + resumed["loss"]
        assert len(run["loss"]) == STEPS and resumed["start_step"] == STEPS and len(resumed["loss"]) == 1
        assert all(math.isfinite(x) for x in losses)
        if recipe == "resnet" and precision == "16-mixed":
            # fp16 ResNet gradients overflow at the scaler's start scale 2**16: each step is skipped and the
            # dynamic scale halved, and the resumed run continues from the saved scale (not a fresh 2**16).
            assert (run["scale"], resumed["scale"]) == (2.0**16 / 2**STEPS, 2.0**16 / 2 ** (STEPS + 1))
            assert len(set(losses)) == 1
        else:
            assert losses[-1] < losses[0], losses  # the same batch every step: the loss must go down
        # Master weights and optimizer state stay float32 in every mode.
        assert run["dtypes"] == ["torch.float32"]
        expected_plugin = {"32-true": "Precision", "bf16-mixed": "MixedPrecision", "16-mixed": "MixedPrecision"}
        assert run["precision_plugin"] == expected_plugin[precision]
        assert run["scaler"] == ("GradScaler" if precision == "16-mixed" else "NoneType")


def test_fsdp2_holds_about_half_of_the_parameters_gradients_and_optimizer_state_per_rank(runs):
    _, load = runs
    unsharded = load("equal-ddp", 0)["bytes"]
    for rank in (0, 1):
        sharded = load("equal-fsdp2", rank)["bytes"]
        for kind in ("params", "grads", "optimizer"):
            assert 0.45 < sharded[kind] / unsharded[kind] < 0.56, (kind, sharded, unsharded)
    assert sum(load("equal-fsdp2", 0)["bytes"].values()) + sum(load("equal-fsdp2", 1)["bytes"].values()) >= sum(
        unsharded.values()
    )
