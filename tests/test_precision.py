"""Both recipes under 32-true / bf16-mixed / 16-mixed in one process, the 16-bit "true" modes, and the
combinations that must fail before anything runs. (DDP and FSDP2: tests/test_strategies.py.)"""

import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.recipes.common import _check_precision_and_strategy, run_cli
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier
from lightning_recipes.recipes.vit import main as vit_main

TINY = {
    "vit": (ViTClassifier, "vit_digits.yaml", ["--model.depth=1", "--model.width=32", "--model.heads=2",
                                               "--model.mlp_dim=32", "--data.batch_size=16"]),
    # 8-px images, batch 4: CPU bf16/fp16 convolutions are slow; lr 0.1 overshoots one small batch.
    "resnet": (ResNetClassifier, "resnet_digits.yaml", ["--model.lr=0.02", "--data.image_size=8", "--data.batch_size=4"]),
}
STEPS = 3


def _fit(recipe, precision, tmp_path, *extra):
    cls, config, tiny = TINY[recipe]
    args = ["fit", *tiny, f"--trainer.precision={precision}", "--trainer.accelerator=cpu", "--trainer.overfit_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--data.augment=false", *extra]
    return run_cli(cls, config, args=args)


def _losses(run_dir):
    (events,) = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("train/loss")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("recipe", ["vit", "resnet"])
def test_recipe_trains_saves_and_resumes_under_each_precision(recipe, precision, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The config's ResumableCheckpoint as shipped: last.ckpt (and the best by val/acc) at every one-batch epoch end.
    cli = _fit(recipe, precision, tmp_path, f"--trainer.max_steps={STEPS}")
    plugin = cli.trainer.precision_plugin
    assert plugin.precision == precision  # not silently bf16-mixed for 16-mixed on CPU (Lightning 2.6.6 would)
    if precision == "32-true":
        assert type(plugin) is Precision
    else:
        assert isinstance(plugin, MixedPrecision)
        head = cli.model.model.heads.head if recipe == "vit" else cli.model.model.fc
        with plugin.autocast_context_manager():
            out = head(torch.ones(1, head.in_features))
        assert out.dtype == (torch.float16 if precision == "16-mixed" else torch.bfloat16)
        # Dynamic loss scaling for fp16 only: bf16 has float32's exponent range.
        assert (plugin.scaler is not None) == (precision == "16-mixed")
    # Master weights and optimizer state stay float32 in every mode: the optimizer's own tensors.
    (optimizer,) = cli.trainer.optimizers
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}
    (run_dir,) = tmp_path.glob("runs/*/version_0")
    losses = _losses(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    if precision == "16-mixed" and not optimizer.state:
        # The fp16 ResNet's gradients overflow at the scaler's start scale 2**16: every step was skipped and
        # the dynamic scaler halved its scale each time (the run goes on once it fits; on GPU as on CPU).
        assert plugin.scaler.get_scale() == 2.0**16 / 2**STEPS and losses[0] == losses[-1]
    else:
        assert {v.dtype for s in optimizer.state.values() for v in s.values() if v.ndim} == {torch.float32}
        assert losses[-1] < losses[0], losses  # one fixed batch: the loss must go down
    last = tmp_path / "runs" / f"{recipe}_digits" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == STEPS
    if precision == "16-mixed":
        assert saved["MixedPrecision"]["scale"] == plugin.scaler.get_scale()  # the scaler resumes too

    resumed = _fit(recipe, precision, tmp_path, f"--trainer.max_steps={STEPS + 1}", f"--ckpt_path={last}")
    assert resumed.trainer.global_step == STEPS + 1
    assert all(math.isfinite(x) for x in _losses(tmp_path / run_dir.parent / "version_1"))


def test_lightning_alone_would_run_cpu_16_mixed_as_bf16():
    # Why the recipes' CLI builds the precision plugin itself (Lightning 2.6.6, accelerator_connector.py).
    with pytest.warns(UserWarning, match=r"AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        trainer = Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_cpu_16_mixed_becomes_fp16_amp_with_a_dynamic_cpu_grad_scaler(accelerator):
    if accelerator == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    config = {"accelerator": accelerator, "precision": "16-mixed", "strategy": DDPStrategy(), "plugins": None}
    _check_precision_and_strategy(config)
    (plugin,) = config["plugins"]
    assert config["precision"] is None and isinstance(plugin, MixedPrecision) and plugin.precision == "16-mixed"
    assert plugin.device == "cpu" and plugin.scaler._device == "cpu"
    assert plugin.scaler.get_scale() == 65536.0 and plugin.scaler.get_growth_interval() == 2000  # dynamic


def test_a_precision_plugin_given_by_the_user_is_kept():
    mine = MixedPrecision("bf16-mixed", "cpu")
    config = {"accelerator": "cpu", "precision": "16-mixed", "plugins": [mine]}
    _check_precision_and_strategy(config)
    assert config["plugins"] == [mine] and config["precision"] == "16-mixed"


def test_16_mixed_with_fsdp2_fails_up_front_and_names_the_alternative():
    config = {"accelerator": "cpu", "precision": "16-mixed", "strategy": ModelParallelStrategy()}
    with pytest.raises(ValueError, match=r"precision='16-mixed' with strategy=ModelParallelStrategy \(FSDP2\): .* "
                                         r"Use --trainer.precision bf16-mixed"):
        _check_precision_and_strategy(config)


def test_fsdp_strategy_on_cpu_fails_up_front_and_names_the_fsdp2_route(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"strategy='fsdp' on CPU \(accelerator='cpu'\): Lightning's FSDPStrategy "
                                         r"\(FSDP1\) needs GPUs. Use the FSDP2 route"):
        vit_main(["fit", "--trainer.accelerator=cpu", "--trainer.strategy=fsdp", "--trainer.devices=2"])
    assert not (tmp_path / "runs").exists()  # nothing started
    if not torch.cuda.is_available():  # accelerator auto resolves to the CPU here
        with pytest.raises(ValueError, match=r"strategy=FSDPStrategy on CPU \(accelerator='auto'\): .*ModelParallelStrategy \(see recipes/configs/vit_b16_imagenet_fsdp2.yaml\)"):
            _check_precision_and_strategy({"accelerator": "auto", "strategy": FSDPStrategy()})


def test_bf16_true_vit_trains_in_bfloat16_and_warns_what_is_lost(tmp_path):
    # The warning's example, checked: 1e-6 is below half of bfloat16's spacing at 1.0 (2**-7), float32 keeps it.
    weight16, weight32 = torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(1.0)
    for _ in range(1000):
        weight16, weight32 = weight16 + 1e-6, weight32 + 1e-6
    assert weight16.item() == 1.0 and weight32.item() == pytest.approx(1.001, abs=1e-4)

    model = ViTClassifier(depth=1, width=32, heads=2, mlp_dim=32)
    trainer = Trainer(accelerator="cpu", precision="bf16-true", max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match=r"precision='bf16-true' keeps the weights, gradients and AdamW state in "
                                         r"bfloat16: .* 1.0 \+ 1e-6 added 1000 times stays 1.0"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=8))
    assert trainer.global_step == 2
    (optimizer,) = trainer.optimizers
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.bfloat16}


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_resnet_fails_up_front(precision, tmp_path):
    trainer = Trainer(accelerator="cpu", precision=precision, max_steps=1, logger=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"precision='{precision}' with ResNetClassifier: BatchNorm running statistics "
                                         r"and SGD momentum .* Use --trainer.precision bf16-mixed"):
        trainer.fit(ResNetClassifier(), datamodule=DigitsDataModule(batch_size=8))
    assert trainer.global_step == 0


def _saved_activations(model, images, targets):
    """Loss, gradients, and (count, bytes) of the tensors autograd keeps from forward for backward."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.criterion(model(images), targets)
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}, (len(sizes), sum(sizes))


@pytest.mark.parametrize(("depth", "plain", "checkpointed"), [(2, (63, 258128), (17, 30608)), (4, (111, 503056), (19, 48016))])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_from_fewer_saved_activations(depth, plain, checkpointed):
    torch.manual_seed(0)
    reference = ViTClassifier(depth=depth, width=32, heads=2, mlp_dim=32)
    # torchvision starts the head at zero, which would make every block's gradient zero: the test needs them.
    torch.nn.init.normal_(reference.model.heads.head.weight, std=0.1)
    recomputed = ViTClassifier(depth=depth, width=32, heads=2, mlp_dim=32, activation_checkpointing=True)
    assert recomputed.state_dict().keys() == reference.state_dict().keys()  # checkpoints interchange
    recomputed.load_state_dict(reference.state_dict())
    images, targets = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])

    loss, grads, saved = _saved_activations(reference, images, targets)
    loss_ckpt, grads_ckpt, saved_ckpt = _saved_activations(recomputed, images, targets)
    assert torch.equal(loss, loss_ckpt)  # the same ops replayed: bit-identical on CPU
    assert all(torch.equal(grads[name], grads_ckpt[name]) for name in grads)
    assert grads["model.encoder.layers.encoder_layer_0.mlp.0.weight"].abs().sum() > 0
    # Each block keeps 24 tensors (122,464 bytes at batch 4, 17 tokens, width 32) without checkpointing and
    # only its input (1 tensor) with it; the 15 tensors outside the blocks are the same.
    assert (saved, saved_ckpt) == (plain, checkpointed)
