"""norm: sync_batch under DDP on CPU: 2 processes × batch B compute what 1 process × batch 2B computes."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from two_processes import run_two_processes
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.sync_batchnorm import GlobalBatchNorm2d

B, STEPS = 4, 3


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, 1, 8, 8, generator=generator), torch.randint(0, 10, (2 * B,), generator=generator)


def _model(norm: str) -> ResNetClassifier:
    torch.manual_seed(0)
    return ResNetClassifier(norm=norm, label_smoothing=0.0)


def _train(module: ResNetClassifier, network: torch.nn.Module, images, targets) -> dict[str, torch.Tensor]:
    optimizer = module.build_optimizer()
    for _ in range(STEPS):
        optimizer.zero_grad()
        module.criterion(network(images), targets).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    images, targets = _data()
    local = slice(rank * B, (rank + 1) * B)
    for norm in ("sync_batch", "batch"):
        module = _model(norm)
        # What Lightning's DDP on CPU shows the module in setup(): 2 processes, a CPU root device.
        module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                          datamodule=None, precision="32-true", gradient_clip_val=None)
        module.setup("fit")
        state = _train(module, DistributedDataParallel(module.model), images[local], targets[local])
        converted = sum(isinstance(m, GlobalBatchNorm2d) for m in module.model.modules())
        if rank == 0:
            torch.save({"state": state, "converted": converted}, os.path.join(out_dir, f"{norm}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn")
    run_two_processes(_worker, str(out))
    return {norm: torch.load(out / f"{norm}.pt") for norm in ("sync_batch", "batch")}


def _max_diff(a: dict, b: dict, buffers: bool) -> float:
    keys = [k for k in a if ("running_" in k) == buffers and "num_batches" not in k]
    return max((a[k] - b[k]).abs().max().item() for k in keys)


@pytest.mark.slow
def test_sync_batch_on_two_cpu_processes_matches_one_process_with_the_double_batch(runs):
    module = _model("batch")
    reference = _train(module, module.model, *_data())
    sync = runs["sync_batch"]
    assert sync["converted"] == 20  # every BatchNorm2d of ResNet-18
    assert _max_diff(sync["state"], reference, buffers=True) < 1e-5  # running mean / var
    assert _max_diff(sync["state"], reference, buffers=False) < 1e-5  # weights after 3 SGD steps
    # Without synchronisation each process normalises with its own 4 images: a different model.
    plain = runs["batch"]
    assert plain["converted"] == 0
    assert _max_diff(plain["state"], reference, buffers=True) > 1e-2
    assert _max_diff(plain["state"], reference, buffers=False) > 1e-3


def test_global_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    plain, ours = torch.nn.BatchNorm2d(3), GlobalBatchNorm2d(3)
    assert torch.equal(plain(x), ours(x)) and torch.equal(plain.running_var, ours.running_var)
