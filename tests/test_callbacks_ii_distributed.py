"""GradientAccumulation and ResumableCheckpoint in 2 real CPU processes (gloo): DDP, and FSDP2 via ModelParallelStrategy.

One pair of processes runs every training (starting processes and importing Lightning is most of the cost); each
rank writes what it saw to JSON and the tests below check it.
"""

import json
import os

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from recording_logger import RecordingLogger
from two_processes import run_two_processes
from lightning_recipes.callbacks import GradientAccumulation, ResumableCheckpoint

pytestmark = pytest.mark.slow
N = 38  # 19 samples per rank: batches of 4, 4, 4, 4, 3; k = 16 / (4 x 2) = 2: windows of 2, 2, 1 batches
LR = 0.5


def _features():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 8, generator=g, dtype=torch.float64) * 3, torch.randn(N, 8, generator=g, dtype=torch.float64)


class LayerNormModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.LayerNorm(8).double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.normal_()
        self.batch_size = 4

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_features()), batch_size=self.batch_size)


class CountAllReduces(L.Callback):
    """Replaces DDP's all-reduce by a counting one (Lightning registers comm hooks on CUDA only)."""

    def __init__(self) -> None:
        self.count = 0

    def on_fit_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            self.count += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, hook)


class Noisy(Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(8), self.y[i]


class Net(L.LightningModule):
    """Shuffled, augmented data and dropout: every rank's RNGs and position matter for an exact resume."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(Noisy(), batch_size=4, shuffle=True)  # 6 batches per rank per epoch


class ShardedNet(Net):
    def configure_optimizers(self):
        # Loads the train dataloader during strategy set-up, which under ModelParallelStrategy comes before the
        # checkpoint is restored (Lightning issue #20550): ResumableCheckpoint must still start where it stopped.
        assert self.trainer.estimated_stepping_batches == 12
        return super().configure_optimizers()

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.layer:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.layer, mesh=mesh)


class RankSeed(L.Callback):
    """Gives each rank its own random stream on a fresh start, so that a resume must restore them per rank."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            torch.manual_seed(100 + trainer.global_rank)


class Stop(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 5:
            raise RuntimeError("node lost")  # on every rank at once


class DataParallelSizes(L.Callback):
    """What each callback counts as data-parallel processes, and the train loader's replicas (rebuilt by
    ResumableCheckpoint as a ResumableDataLoader): one definition for all."""

    def __init__(self) -> None:
        self.sizes: dict = {}

    def on_train_start(self, trainer, pl_module):
        from lightning_recipes.callbacks import accumulation, lr_schedule
        from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader

        loader = trainer.train_dataloader
        self.sizes = {
            "GradientAccumulation": accumulation._data_parallel_size(trainer),
            "LRSchedule": lr_schedule._data_parallel_size(trainer),
            "train loader": loader.sampler.num_replicas if isinstance(loader, ResumableDataLoader) else None,
            "train loader rank": loader.sampler.rank if isinstance(loader, ResumableDataLoader) else None,
        }


class Writes(L.Callback):
    """Counts the checkpoint files this rank writes through the CheckpointIO (the non-sharded path)."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_start(self, trainer, pl_module):  # after every setup: ResumableCheckpoint installs its IO there
        io = trainer.strategy.checkpoint_io
        original = io.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        io.save_checkpoint = save_checkpoint


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _params(model) -> list[list[float]]:
    return [_full(p.detach()).flatten().tolist() for p in model.parameters()]


def _trainer(strategy, root, callbacks, **kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _accumulation(rank: int, out: dict) -> None:
    counter, logger = CountAllReduces(), RecordingLogger()
    callbacks = [GradientAccumulation(global_batch_size=16, log_every_n_steps=1), counter]
    trainer = _trainer(DDPStrategy(process_group_backend="gloo"), None, callbacks, max_epochs=1, logger=logger,
                       enable_checkpointing=False)  # fmt: skip
    model = LayerNormModel()
    trainer.fit(model)
    out["accumulation"] = {
        "all_reduces": counter.count,
        "steps": trainer.global_step,
        "params": _params(model),
        "logged": [(step, row) for step, row in logger.rows if "accumulation/global_batch_size" in row],
    }


def _token_accumulation(rank: int, out: dict) -> None:
    from test_accumulation import TinyLM

    # 14 ragged sequences, 7 per rank in micro-batches of 2; global batch 8 -> k = 2: windows of 2 and 2 batches.
    callbacks = [GradientAccumulation(global_batch_size=8, weight_by="tokens")]
    trainer = _trainer(DDPStrategy(process_group_backend="gloo"), None, callbacks, max_epochs=1, logger=False,
                       enable_checkpointing=False)  # fmt: skip
    model = TinyLM()
    trainer.fit(model)
    out["tokens"] = {"steps": trainer.global_step, "params": [p.detach().flatten().tolist() for p in model.parameters()]}


def _token_reference() -> list[torch.Tensor]:
    """One process: per window, the mean over every loss-bearing token of both ranks' micro-batches."""
    from test_accumulation import IGNORE, TinyLM, _ragged_tokens

    inputs, targets = _ragged_tokens()
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0)).tolist()
    per_rank = [order[0::2], order[1::2]]
    model = TinyLM().net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for start in (0, 4):
        index = per_rank[0][start : start + 4] + per_rank[1][start : start + 4]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[index]).flatten(0, 1), targets[index].flatten(), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
    return [p.detach().flatten() for p in model.parameters()]


def _resume(name: str, make_strategy, make_model, root: str, rank: int, out: dict) -> None:
    def callbacks():
        return [RankSeed(), ResumableCheckpoint(dirpath=os.path.join(root, name, "run"), every_n_steps=2)]

    reference = make_model()
    L.seed_everything(0, verbose=False)
    _trainer(make_strategy(), root, [RankSeed(), ResumableCheckpoint(dirpath=os.path.join(root, name, "reference"),
             every_n_steps=2)], max_epochs=2, logger=False).fit(reference)  # fmt: skip
    L.seed_everything(0, verbose=False)
    writes, sizes = Writes(), DataParallelSizes()
    try:
        _trainer(make_strategy(), root, [*callbacks(), Stop(), writes, sizes], max_epochs=2, logger=False).fit(make_model())
    except RuntimeError as err:
        assert "node lost" in str(err)
    folder = os.path.join(root, name, "run")
    on_disk = sorted(os.listdir(folder))
    layout = {n: sorted(os.listdir(os.path.join(folder, n))) for n in on_disk if os.path.isdir(os.path.join(folder, n))}
    L.seed_everything(0, verbose=False)
    resumed = make_model()
    trainer = _trainer(make_strategy(), root, callbacks(), max_epochs=2, logger=False)
    trainer.fit(resumed, ckpt_path="last")
    out[name] = {
        "on_disk_after_stop": on_disk,
        "layout": layout,
        "writes": writes.count,
        "data_parallel_sizes": sizes.sizes,
        "steps": trainer.global_step,
        "equal": [torch.equal(_full(a), _full(b)) for a, b in zip(reference.parameters(), resumed.parameters())],
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    # We start the processes ourselves, so Lightning's environment detects them and launches nothing.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    torch.set_num_threads(1)
    out: dict = {}
    _accumulation(rank, out)
    _token_accumulation(rank, out)
    _resume("ddp", lambda: DDPStrategy(process_group_backend="gloo"), Net, out_dir, rank, out)
    fsdp = lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # noqa: E731
    _resume("fsdp2", fsdp, ShardedNet, out_dir, rank, out)
    if rank == 0:
        last = torch.load(os.path.join(out_dir, "ddp", "run", "last.ckpt"), weights_only=True)
        state = last["callbacks"]["ResumableCheckpoint{'monitor': None, 'mode': 'min'}"]
        out["ddp"]["rng_ranks"] = len(state["rng"])
        out["ddp"]["rng_differ"] = not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
        json.dump(out, file)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("callbacks_ii")
    run_two_processes(_worker, str(out_dir))
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def _large_batch_reference() -> list[torch.Tensor]:
    """One process, plain torch: one SGD step per union of the two ranks' windows (16 samples, the last 6)."""
    x, y = _features()
    # Lightning injects DistributedSampler(shuffle=True, seed=0) for training; rank r gets order[r::2].
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()
    per_rank = [order[0::2], order[1::2]]
    model = LayerNormModel().net
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for start in range(0, 19, 8):  # windows of 2 micro-batches of 4
        index = per_rank[0][start : start + 8] + per_rank[1][start : start + 8]
        optimizer.zero_grad()
        ((model(x[index]) - y[index]) ** 2).mean().backward()
        optimizer.step()
    return [p.detach().flatten() for p in model.parameters()]


def test_ddp_all_reduces_once_per_optimizer_step_and_matches_the_large_batch(runs):
    for rank in (0, 1):
        result = runs[rank]["accumulation"]
        # 5 micro-batches per rank in windows of 2, 2, 1: 3 optimizer steps, 3 all-reduces (one bucket), not 5.
        # The last window holds one batch of 3 per rank: exact weighting makes it the mean of those 6 samples.
        assert (result["steps"], result["all_reduces"]) == (3, 3)
        for mine, expected in zip(result["params"], _large_batch_reference()):
            assert (torch.tensor(mine, dtype=torch.float64) - expected).abs().max() < 1e-10
    assert runs[0]["accumulation"]["params"] == runs[1]["accumulation"]["params"]


def test_ddp_logs_global_batch_and_samples_seen_from_rank_zero_only(runs):
    logged = runs[0]["accumulation"]["logged"]
    assert [row["accumulation/global_batch_size"] for _, row in logged] == [16.0, 16.0, 6.0]
    assert [row["accumulation/samples_seen"] for _, row in logged] == [16.0, 32.0, 38.0]
    assert runs[1]["accumulation"]["logged"] == []


def test_ddp_resume_is_exact_with_one_writer_and_every_ranks_rng(runs):
    ddp0, ddp1 = runs[0]["ddp"], runs[1]["ddp"]
    # 2 epochs x 6 batches; stopped before step 5 (no save on a generic exception under DDP): last = step 4.
    assert ddp0["on_disk_after_stop"] == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert (ddp0["writes"], ddp1["writes"]) == (2, 0)  # steps 2 and 4, written by rank zero only
    assert (ddp0["rng_ranks"], ddp0["rng_differ"]) == (2, True)
    for result in (ddp0, ddp1):
        assert result["steps"] == 12 and all(result["equal"])


def test_fsdp2_saves_sharded_directories_atomically_and_resumes_exactly(runs):
    fsdp0, fsdp1 = runs[0]["fsdp2"], runs[1]["fsdp2"]
    assert fsdp0["on_disk_after_stop"] == ["epoch=0-step=4.ckpt", "last.ckpt"]
    shards = [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert fsdp0["layout"] == {"epoch=0-step=4.ckpt": shards, "last.ckpt": shards}
    for result in (fsdp0, fsdp1):
        assert result["steps"] == 12 and all(result["equal"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_callback_and_the_train_loader_count_the_same_data_parallel_processes(runs, strategy):
    for rank in (0, 1):
        sizes = runs[rank][strategy]["data_parallel_sizes"]
        assert sizes == {"GradientAccumulation": 2, "LRSchedule": 2, "train loader": 2, "train loader rank": rank}


def test_ddp_token_weighted_windows_are_the_mean_over_every_token_of_both_ranks(runs):
    reference = _token_reference()
    for rank in (0, 1):
        result = runs[rank]["tokens"]
        assert result["steps"] == 2
        worst = max(float((torch.tensor(mine, dtype=torch.float64) - ref).abs().max())
                    for mine, ref in zip(result["params"], reference))  # fmt: skip
        assert worst <= 1e-12, worst
