"""GradNormMonitor and LRSchedule in 2 real CPU processes (gloo): DDP, and FSDP2 via ModelParallelStrategy.

One pair of processes runs both trainings (starting processes and importing Lightning is most of the
cost); each rank writes what it saw to JSON and the tests below compare the ranks.
"""

import json
import math
import os

import pytest
import torch
import lightning.pytorch as L
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from recording_logger import RecordingLogger
from two_processes import run_two_processes
from lightning_recipes.callbacks import GradNormMonitor, LRSchedule

pytestmark = pytest.mark.slow
STEPS = 3
CLIP = 0.05


class TwoLayerBoringModel(BoringModel):
    """Lightning's BoringModel with a two-layer `self.layer`, no scheduler; FSDP2-shardable."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        torch.manual_seed(1234)
        return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=4)


class ShardedBoringModel(TwoLayerBoringModel):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.layer:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.layer, mesh=mesh)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _norm64(tensors) -> float:
    return math.sqrt(sum(float(_full(t).detach().double().pow(2).sum()) for t in tensors))


class Reference(L.Callback):
    """Hand-computed norms of the *unsharded* gradients (gathered with full_tensor under FSDP2)."""

    def __init__(self, monitor: GradNormMonitor) -> None:
        self.monitor = monitor
        self.seen: dict[int, dict] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {name: p.grad for name, p in pl_module.named_parameters()}
        self.seen[trainer.global_step] = {
            "pre": _norm64(grads.values()),
            "layers": {
                prefix: _norm64(g for n, g in grads.items() if n.startswith(prefix + "."))
                for prefix in ("layer.0", "layer.2")
            },
            "lr": [group["lr"] for group in optimizer.param_groups],
            "grad_types": sorted({type(g).__name__ for g in grads.values()}),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.seen[step]["post"] = _norm64(p.grad for p in pl_module.parameters())
        self.seen[step]["logged"] = dict(self.monitor.last_logged)


def _train(strategy, model, rank, out_dir, name):
    monitor = GradNormMonitor(log_every_n_steps=1, layer_depth=2)
    schedule = LRSchedule(warmup_steps=1, decay="linear", reference_batch_size=4)
    reference = Reference(monitor)
    logger = RecordingLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        gradient_clip_val=CLIP,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[schedule, monitor, reference],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model)
    result = {
        "seen": reference.seen,
        "logged_here": [(step, row) for step, row in logger.rows if "grad_norm/total" in row],
        "base_lrs": schedule.base_lrs,
    }
    with open(os.path.join(out_dir, f"{name}-rank{rank}.json"), "w") as file:
        json.dump(result, file)


def _worker(rank: int, port: int, out_dir: str) -> None:
    # We start the processes ourselves, so Lightning's environment detects them and launches nothing.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    _train(DDPStrategy(process_group_backend="gloo"), TwoLayerBoringModel(), rank, out_dir, "ddp")
    # FSDP2: ModelParallelStrategy with a 2-way data-parallel mesh, the model sharded in configure_model.
    fsdp = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    _train(fsdp, ShardedBoringModel(), rank, out_dir, "fsdp2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    run_two_processes(_worker, str(out_dir))
    results = {}
    for name in ("ddp", "fsdp2"):
        for rank in (0, 1):
            with open(out_dir / f"{name}-rank{rank}.json") as file:
                results[name, rank] = json.load(file)
    return results


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_identical_on_every_rank_logged_once_and_equal_to_the_unsharded_norms(runs, name):
    rank0, rank1 = runs[name, 0], runs[name, 1]
    assert sorted(rank0["seen"]) == [str(s) for s in range(STEPS)]
    expected_types = ["DTensor"] if name == "fsdp2" else ["Tensor"]
    for step in range(STEPS):
        seen0, seen1 = rank0["seen"][str(step)], rank1["seen"][str(step)]
        assert seen0["grad_types"] == expected_types
        assert seen0["logged"] == seen1["logged"]  # every rank computes the same numbers
        logged = seen0["logged"]
        assert logged["grad_norm/total"] == pytest.approx(seen0["pre"], rel=1e-6)
        assert logged["grad_norm/total_post_clip"] == pytest.approx(seen0["post"], rel=1e-6)
        assert logged["grad_norm/total_post_clip"] == pytest.approx(min(seen0["pre"], CLIP), rel=1e-5)
        assert logged["grad_norm/clip_fraction"] == (1.0 if seen0["pre"] > CLIP else 0.0)
        for prefix, value in seen0["layers"].items():
            assert logged[f"grad_norm/layer/{prefix}"] == pytest.approx(value, rel=1e-6)
    # Logged once: by rank zero, at every step; nothing reaches a logger on rank one.
    assert [step for step, _ in rank0["logged_here"]] == list(range(STEPS))
    assert rank1["logged_here"] == []


def test_fsdp2_total_equals_the_ddp_total_of_the_same_model_and_data(runs):
    # Same initial weights and data: step 0 gradients are the same, sharded or not.
    ddp = runs["ddp", 0]["seen"]["0"]["logged"]
    fsdp = runs["fsdp2", 0]["seen"]["0"]["logged"]
    assert fsdp["grad_norm/total"] == pytest.approx(ddp["grad_norm/total"], rel=1e-5)
    assert fsdp["param/norm"] == pytest.approx(ddp["param/norm"], rel=1e-5)


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_lr_schedule_scales_by_the_world_size_on_every_rank(runs, name):
    # global batch 4 x 1 x 2 processes = 8 = 2 x reference_batch_size
    for rank in (0, 1):
        assert runs[name, rank]["base_lrs"] == [0.2]
        lrs = [runs[name, rank]["seen"][str(t)]["lr"] for t in range(STEPS)]
        assert lrs == [[0.0], [0.2], [0.1]]  # warmup 1 step, then linear to 0 at step 3
