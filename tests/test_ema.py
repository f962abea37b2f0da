"""ExponentialMovingAverage against torchvision's reference: its decay formula, its AveragedModel update loop, the raw
and EMA weights both evaluated, save/resume, and DDP / FSDP2 in 2 real CPU processes (gloo)."""

import os
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from recording_logger import RecordingLogger
from two_processes import run_two_processes
from lightning_recipes.callbacks import ExponentialMovingAverage, LRSchedule, ResumableCheckpoint
from lightning_recipes.callbacks.ema import _SecondPass, adjusted_decay

BATCHES = 5  # training batches per epoch (20 samples of 4)
STEPS = 2  # update_every_n_steps
WARMUP = 5  # LRSchedule's warmup: the whole first epoch, as torchvision's --lr-warmup-epochs 1


class TorchvisionEMA(AveragedModel):
    """torchvision's references/classification/utils.py ExponentialMovingAverage, verbatim."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


class Net(L.LightningModule):
    """BatchNorm (buffers, an integer one too), a torchmetrics Metric, a MetricCollection and a plain tensor logged."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
        self.val_acc = MulticlassAccuracy(3, average="micro")
        self.val_more = MetricCollection({"acc_top2": MulticlassAccuracy(3, top_k=2, average="micro")}, prefix="val/")
        self.test_acc = MulticlassAccuracy(3, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc)
        self.val_more(logits, y)
        self.log_dict(self.val_more)
        # Draws from the RNG: the second pass must leave the raw run's random numbers as they were.
        self.log("val/noise", torch.rand(()))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.net(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(_data(4 * BATCHES, 1), batch_size=4)

    def val_dataloader(self):
        return DataLoader(_data(12, 2), batch_size=5)  # batches of 5, 5, 2: the weighted mean is exercised

    def test_dataloader(self):
        return self.val_dataloader()


class Snapshots(L.Callback):
    """The weights after every optimizer step, with torchvision's (epoch, i)."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        self.seen.append((trainer.current_epoch, batch_idx, state))


def _torchvision_average(snapshots, decay, steps, warmup_epochs):
    """torchvision's train loop: `if i % model_ema_steps == 0: update; if epoch < lr_warmup_epochs: reset`."""
    model = Net().net
    reference = TorchvisionEMA(model, decay)
    for epoch, i, state in snapshots:
        model.load_state_dict(state)
        if i % steps == 0:
            reference.update_parameters(model)
            if epoch < warmup_epochs:
                reference.n_averaged.fill_(0)
    return {f"net.{k}": v for k, v in reference.module.state_dict().items()}


def _trainer(root, *callbacks, **kwargs):
    # Every run saves every 3 steps (the checkpoint's loader wrapper takes part in the run's RNG use, so the resume
    # test's uninterrupted reference is the fixture's run with the same callbacks).
    checkpoint = ResumableCheckpoint(dirpath=str(root), every_n_steps=3, save_on_exception=False)
    return L.Trainer(default_root_dir=root, max_epochs=2, logger=RecordingLogger(), enable_progress_bar=False,
                     enable_model_summary=False, **kwargs,
                     callbacks=[LRSchedule(warmup_steps=WARMUP, decay="constant"), *callbacks, checkpoint])  # fmt: skip


def _ema(**kwargs):
    return ExponentialMovingAverage(decay=0.99, update_every_n_steps=STEPS, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    L.seed_everything(0, verbose=False)
    plain_trainer, plain = _trainer(root / "plain"), Net()
    plain_trainer.fit(plain)
    L.seed_everything(0, verbose=False)
    snapshots, ema = Snapshots(), _ema()
    trainer, model = _trainer(root / "ema", snapshots, ema), Net()
    trainer.fit(model)
    trainer.test(model)
    return SimpleNamespace(plain=plain, plain_rows=plain_trainer.logger.rows, model=model, trainer=trainer, ema=ema,
                           snapshots=snapshots.seen, rows=trainer.logger.rows, root=root)  # fmt: skip


def test_adjusted_decay_is_torchvisions_for_the_published_recipes():
    def torchvision(model_ema_decay, world_size, batch_size, model_ema_steps, epochs):  # train.py, verbatim
        adjust = world_size * batch_size * model_ema_steps / epochs
        alpha = 1.0 - model_ema_decay
        alpha = min(1.0, alpha * adjust)
        return 1.0 - alpha

    # ResNet-50 V2: 8 GPUs x 128, --model-ema-steps 32, 600 epochs: 1 - 2e-5 x 54.6133.
    resnet = adjusted_decay(0.99998, world_size=8, batch_size=128, update_every_n_steps=32, epochs=600)
    assert resnet == torchvision(0.99998, 8, 128, 32, 600)
    assert resnet == pytest.approx(1 - 2e-5 * 8 * 128 * 32 / 600, abs=1e-14) and round(resnet, 7) == 0.9989077
    # ViT-B/16: 8 GPUs x 512, 300 epochs: 1 - 2e-5 x 436.9067.
    vit = adjusted_decay(0.99998, world_size=8, batch_size=512, update_every_n_steps=32, epochs=300)
    assert vit == torchvision(0.99998, 8, 512, 32, 300) and round(vit, 7) == 0.9912619
    # alpha is capped at 1: the average is then the latest weights.
    assert adjusted_decay(0.9, world_size=8, batch_size=512, update_every_n_steps=32, epochs=1) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decay": 1.0}, ValueError, r"`decay` must be a number in \[0, 1\).*got 1.0"),
        ({"decay": "0.9"}, ValueError, r"`decay` must be a number in \[0, 1\).*got '0.9'"),
        ({"update_every_n_steps": 0}, ValueError, r"`update_every_n_steps` must be an integer >= 1.*got 0"),
        ({"update_every_n_steps": 2.0}, ValueError, r"`update_every_n_steps` must be an integer >= 1.*got 2.0"),
        ({"reset_until_step": -1}, ValueError, r"`reset_until_step` must be an integer >= 0.*got -1"),
        ({"adjust_to_run": 1}, TypeError, r"`adjust_to_run` must be True or False, got 1"),
        ({"evaluate_both": None}, TypeError, r"`evaluate_both` must be True or False, got None"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExponentialMovingAverage(**kwargs)


def test_adjusted_decay_refuses_a_non_positive_count():
    with pytest.raises(ValueError, match=r"`epochs` must be an integer >= 1, got 0"):
        adjusted_decay(0.9, world_size=1, batch_size=1, update_every_n_steps=1, epochs=0)


def test_the_average_is_torchvisions_bit_for_bit_with_the_restart_during_warmup(runs):
    # world 1 x batch 4 x 2 steps / 2 epochs = 4 -> 1 - 0.01 x 4
    assert runs.ema.resolved_decay == adjusted_decay(0.99, world_size=1, batch_size=4, update_every_n_steps=2, epochs=2)
    assert runs.ema.resolved_reset_until_step == WARMUP  # read from LRSchedule
    assert [(e, i) for e, i, _ in runs.snapshots] == [(e, i) for e in range(2) for i in range(BATCHES)]
    average = runs.ema.state_dict()["average"]
    expected = _torchvision_average(runs.snapshots, runs.ema.resolved_decay, STEPS, warmup_epochs=1)
    assert sorted(average) == sorted(expected)  # parameters and buffers, num_batches_tracked included
    assert all(torch.equal(average[k], v) for k, v in expected.items())
    # The restart matters here, and the average is not the raw weights: the comparison above can fail.
    without_restart = _torchvision_average(runs.snapshots, runs.ema.resolved_decay, STEPS, warmup_epochs=0)
    assert not torch.equal(average["net.0.weight"], without_restart["net.0.weight"])
    assert not torch.equal(average["net.0.weight"], runs.model.net[0].weight)
    assert runs.ema.n_averaged == 3  # epoch 1: i = 0 (a copy), 2, 4


def test_raw_metrics_and_training_are_those_of_a_run_without_the_callback(runs):
    raw = [(step, {k: v for k, v in row.items() if not k.endswith("_ema")})
           for step, row in runs.rows if "val/acc" in row]  # fmt: skip
    plain = [(step, row) for step, row in runs.plain_rows if "val/acc" in row]
    assert len(plain) == 2 and raw == plain  # noise included: the RNG is restored after the second pass
    assert all(torch.equal(a, b) for a, b in zip(runs.model.state_dict().values(), runs.plain.state_dict().values()))


def test_every_validation_logs_both_and_the_ema_metrics_are_those_of_the_ema_weights(runs):
    rows = [row for _, row in runs.rows if "val/acc" in row]
    names = {"val/loss", "val/acc", "val/acc_top2", "val/noise", "epoch"}
    assert [set(row) for row in rows] == [names | {f"{n}_ema" for n in names - {"epoch"}}] * 2
    assert rows[0]["val/acc_ema"] != rows[1]["val/acc_ema"] or rows[0]["val/loss_ema"] != rows[1]["val/loss_ema"]
    # The EMA weights loaded into a fresh model and validated by a plain Trainer give the logged _ema numbers.
    model = Net()
    model.load_state_dict(runs.ema.state_dict()["average"])
    separate = L.Trainer(default_root_dir=runs.root, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    (metrics,) = separate.validate(model, verbose=False)
    for name in ("val/loss", "val/acc", "val/acc_top2"):
        assert metrics[name] == rows[-1][f"{name}_ema"], name
    assert metrics["val/acc"] != rows[-1]["val/acc"]  # the EMA weights are not the raw ones
    test = runs.trainer.callback_metrics
    assert test["test/acc_ema"].item() == metrics["val/acc"] and test["test/acc"].item() == rows[-1]["val/acc"]


def test_resume_mid_epoch_continues_the_same_average(runs, tmp_path):
    class Stop(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:  # epoch 1, after its 2 first steps; the last checkpoint is at step 6
                raise RuntimeError("pre-empted")

    def run(*callbacks, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        ema = _ema()
        _trainer(tmp_path, Snapshots(), ema, *callbacks).fit(Net(), ckpt_path=ckpt_path)
        return ema

    with pytest.raises(RuntimeError, match="pre-empted"):
        run(Stop())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = saved["callbacks"]["ExponentialMovingAverage"]
    assert (saved["global_step"], state["epoch"], state["epoch_iteration"], state["n_averaged"]) == (6, 1, 1, 1)
    resumed = run(ckpt_path="last").state_dict()
    uninterrupted = runs.ema.state_dict()
    assert resumed["n_averaged"] == uninterrupted["n_averaged"]
    assert all(torch.equal(resumed["average"][k], v) for k, v in uninterrupted["average"].items())


def test_validate_from_a_checkpoint_evaluates_both(runs, tmp_path):
    path = tmp_path / "final.ckpt"
    runs.trainer.save_checkpoint(path)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_ema()])  # fmt: skip
    (metrics,) = trainer.validate(Net(), ckpt_path=path, verbose=False)
    last = [row for _, row in runs.rows if "val/acc" in row][-1]
    assert metrics["val/acc_ema"] == last["val/acc_ema"] and metrics["val/acc"] == last["val/acc"]

    class Other(Net):  # other parameter names; its weights load with strict_loading=False
        strict_loading = False

        def __init__(self):
            super().__init__()
            del self.net
            self.head = nn.Linear(4, 3)

    other = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[_ema()])  # fmt: skip
    with pytest.warns(UserWarning, match="no average to evaluate outside fit without a checkpoint: pass ckpt_path="):
        (metrics,) = other.validate(Net(), verbose=False)
    assert "val/acc" in metrics and "val/acc_ema" not in metrics
    with pytest.raises(RuntimeError, match=r"does not fit this model: missing \['head.weight', 'head.bias'\],"
                                           r" unexpected \['net.0.weight', "):  # fmt: skip
        other.validate(Other(), ckpt_path=path, verbose=False)


def test_setup_refuses_fsdp1_an_epochless_run_and_a_dataloader_iter_step(tmp_path):
    ema = ExponentialMovingAverage()
    with pytest.raises(MisconfigurationException, match=r"does not support Trainer\(strategy=FSDPStrategy\).*"
                                                       r"ModelParallelStrategy with torch's fully_shard"):  # fmt: skip
        ema.setup(SimpleNamespace(strategy=FSDPStrategy()), Net(), "fit")
    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, callbacks=[ema])
    with pytest.raises(MisconfigurationException, match=r"Trainer\(max_epochs=-1, max_steps=3\) sets none.*"
                                                       r"adjust_to_run=False, decay=\.\.\."):  # fmt: skip
        trainer.fit(Net())
    ExponentialMovingAverage(adjust_to_run=False).setup(trainer, Net(), "fit")  # a fixed decay needs no epochs

    class Iterating(Net):
        def validation_step(self, dataloader_iter):
            pass

    with pytest.raises(MisconfigurationException, match=r"Iterating.validation_step a second time.*evaluate_both"):
        ema.setup(L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False), Iterating(), "fit")


def test_a_loader_without_batch_size_needs_a_fixed_decay():
    loader = DataLoader(_data(8, 0), batch_sampler=BatchSampler(SequentialSampler(range(8)), 4, False))
    trainer = SimpleNamespace(train_dataloader=loader, global_step=0, strategy=None, accumulate_grad_batches=1,
                              max_epochs=2)  # fmt: skip
    with pytest.raises(MisconfigurationException, match=r"no integer `batch_size` \(got None\).*adjust_to_run=False"):
        ExponentialMovingAverage().on_train_start(trainer, Net())


def test_warnings_for_coarse_weights_and_a_resume_with_another_decay():
    trainer = SimpleNamespace(global_step=0, max_epochs=2)
    ema = ExponentialMovingAverage(decay=0.999, adjust_to_run=False)
    with pytest.warns(UserWarning, match=r"weights are torch.bfloat16, whose resolution is coarser than the update"
                                         r" 1 - decay = 0.001"):  # fmt: skip
        ema.on_train_start(trainer, Net().to(torch.bfloat16))
    ema.load_state_dict({"average": {}, "n_averaged": 1, "epoch": 0, "epoch_iteration": 1, "decay": 0.99})
    with pytest.warns(UserWarning, match=r"resumed with decay 0.999, but the checkpoint was written with decay 0.99"):
        ema.on_train_start(trainer, Net())


def test_a_metric_outside_the_module_is_refused_in_the_second_pass():
    model = Net()
    second = _SecondPass(model, "validation_step")
    loose = MulticlassAccuracy(3)
    refused = r"MulticlassAccuracy logged as 'val/x' .* not a submodule"
    with second.suffixed(model), pytest.raises(MisconfigurationException, match=refused):
        model.log("val/x", loose)
    assert "log" not in vars(model) and model.val_acc is not second.swaps[0][3]  # everything put back


# ------------------------------------------------------------------------------------------- 2 processes, gloo
class SmallNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.val_acc = MulticlassAccuracy(3, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self.layer(x), y)
        self.log("val/acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(_data(16, 1), batch_size=2)  # 4 batches per process and epoch

    def val_dataloader(self):
        return DataLoader(_data(12, 2), batch_size=3)


class ShardedSmallNet(SmallNet):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.layer[0], mesh=mesh)
        # The root keeps layer[2]'s parameters gathered after a forward without backward (validation).
        fully_shard(self.layer, mesh=mesh)


class FullSnapshots(L.Callback):
    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in pl_module.layer.state_dict().items()}  # fmt: skip
        self.seen.append((trainer.current_epoch, batch_idx, full))


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True  # after epoch 0, whose checkpoint is saved: a pre-empted 2-epoch run


def _distributed_run(strategy, model_class, root, stop=False, ckpt_path=None):
    snapshots, ema = FullSnapshots(), ExponentialMovingAverage(decay=0.99, update_every_n_steps=2)
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
    callbacks = [snapshots, ema, checkpoint, *([StopAfterFirstEpoch()] if stop else [])]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=RecordingLogger(),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)  # fmt: skip
    model = model_class()
    trainer.fit(model, ckpt_path=ckpt_path)
    rows = [row for _, row in trainer.logger.rows if "val/acc_ema" in row]
    return {"decay": ema.resolved_decay, "average": ema.state_dict()["average"], "snapshots": snapshots.seen,
            "rows": rows}  # fmt: skip


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    strategies = {"ddp": lambda: DDPStrategy(process_group_backend="gloo"),
                  "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)}  # fmt: skip
    for name, strategy in strategies.items():
        model_class = SmallNet if name == "ddp" else ShardedSmallNet
        root = os.path.join(out_dir, name)
        full = _distributed_run(strategy(), model_class, root)
        first = _distributed_run(strategy(), model_class, root + "-resumed", stop=True)
        resumed = _distributed_run(strategy(), model_class, root + "-resumed",
                                   ckpt_path=os.path.join(root + "-resumed", "epoch=0.ckpt"))  # fmt: skip
        results[name] = {"full": full, "first": first, "resumed": resumed}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ema-distributed")
    run_two_processes(_worker, str(out_dir))
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_two_processes_average_evaluate_and_resume_like_torchvision(distributed, name):
    decay = adjusted_decay(0.99, world_size=2, batch_size=2, update_every_n_steps=2, epochs=2)
    for rank in (0, 1):
        full = distributed[rank][name]["full"]
        assert full["decay"] == decay  # the world size of 2 counts
        expected = _torchvision_small(full["snapshots"], decay)
        assert all(torch.equal(full["average"][f"layer.{k}"], v) for k, v in expected.items())
        resumed = distributed[rank][name]["resumed"]["average"]
        assert all(torch.equal(resumed[k], v) for k, v in full["average"].items())
    # Both ranks hold the same average; rank zero logs the accuracy of the EMA weights over the whole val set.
    assert all(torch.equal(distributed[1][name]["full"]["average"][k], v)
               for k, v in distributed[0][name]["full"]["average"].items())  # fmt: skip
    model = SmallNet()
    model.load_state_dict(distributed[0][name]["full"]["average"])
    x, y = _data(12, 2).tensors
    correct = (model.layer(x).argmax(-1) == y).sum()
    rows = distributed[0][name]["full"]["rows"]
    assert len(rows) == 2 and rows[-1]["val/acc_ema"] == (correct / torch.tensor(12)).item()
    assert distributed[1][name]["full"]["rows"] == rows  # synced: every rank computes the same numbers


def _torchvision_small(snapshots, decay):
    model = SmallNet().layer
    reference = TorchvisionEMA(model, decay)
    for _, i, state in snapshots:
        model.load_state_dict(state)
        if i % 2 == 0:
            reference.update_parameters(model)
    return reference.module.state_dict()
