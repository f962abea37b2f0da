"""--model.fused: torch's fused optimizer kernel where it only saves time (the CPU, no GradScaler), the same training
as torch's default kernel, this run's choice after a resume, and clear errors."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipes.recipes.common import fused_optimizer
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

TINY_VIT = {"image_size": 8, "patch_size": 4, "depth": 1, "width": 16, "heads": 2, "mlp_dim": 32}


def _data(n: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 8, 8, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(n) % 10), batch_size=8)


def _trainer(tmp_path, **kwargs) -> Trainer:
    kwargs = {"max_steps": 4, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, "default_root_dir": tmp_path, **kwargs}  # fmt: skip
    return Trainer(accelerator="cpu", devices=1, **kwargs)


class Kernels(Callback):
    """Records the optimizer's kernel flags as the first training step sees them."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "seen"):
            self.seen = [(g.get("fused"), g.get("foreach")) for g in trainer.optimizers[0].param_groups]


MODELS = {
    "resnet-sgd": lambda **kw: ResNetClassifier(**kw),
    "vit-adamw": lambda **kw: ViTClassifier(**TINY_VIT, **kw),
    "vit-sgd": lambda **kw: ViTClassifier(**TINY_VIT, optimizer="sgd", lr=0.05, **kw),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_automatic_picks_the_fused_kernel_on_the_cpu_and_it_trains_as_the_default_kernel(tmp_path, name):
    weights = {}
    for fused in (None, False):
        torch.manual_seed(0)
        model, kernels = MODELS[name](fused=fused), Kernels()
        _trainer(tmp_path, callbacks=[kernels]).fit(model, _data())
        assert {f for f, _ in kernels.seen} == ({True} if fused is None else {None})  # None: torch picks its default
        weights[fused] = [p.detach().clone() for p in model.parameters()]
    worst = max((a - b).abs().max().item() for a, b in zip(weights[None], weights[False]))
    # The same update up to float32 rounding (the multiply-adds in another order). SGD's is linear in the gradient;
    # AdamW's m / (sqrt(v) + eps) turns the rounding of a near-zero gradient into a sizeable share of one step (lr).
    assert worst < (1e-6 if name.endswith("sgd") else 0.1 * model.hparams.lr)


def _float16(tmp_path, **kwargs) -> Trainer:
    """float16 with a GradScaler, as 16-mixed on a GPU (Lightning turns precision='16-mixed' on a CPU into bf16)."""
    return _trainer(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=1, **kwargs)


@pytest.mark.parametrize(
    ("precision", "clip", "fused"),
    [("16-mixed", None, None), ("16-mixed", 1.0, None), ("bf16-mixed", 1.0, None), ("bf16-mixed", None, True),
     ("bf16-true", 1.0, True)],
)  # fmt: skip
def test_mixed_precision_keeps_the_default_kernel_where_it_clips_or_scales(tmp_path, precision, clip, fused):
    """Lightning's MixedPrecision refuses to clip a fused optimizer (bf16 too); 16-mixed's GradScaler would hand
    GradNormMonitor scaled gradients."""
    kernels = Kernels()
    if precision == "16-mixed":
        trainer = _float16(tmp_path, callbacks=[kernels], gradient_clip_val=clip)
        assert trainer.precision_plugin.scaler is not None
    else:
        trainer = _trainer(tmp_path, callbacks=[kernels], precision=precision, gradient_clip_val=clip, max_steps=1)
    trainer.fit(ViTClassifier(**TINY_VIT), _data())
    assert {f for f, _ in kernels.seen} == {fused}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_forcing_fused_with_mixed_precision_and_clipping_names_the_option(tmp_path, precision):
    if precision == "16-mixed":
        trainer = _float16(tmp_path, gradient_clip_val=1.0)
    else:
        trainer = _trainer(tmp_path, precision=precision, gradient_clip_val=1.0, max_steps=1)
    pattern = rf"fused=True is invalid with precision='{precision}' and gradient_clip_val=1.0.*--model\.fused null"
    with pytest.raises(ValueError, match=pattern):
        trainer.fit(ViTClassifier(**TINY_VIT, fused=True), _data())


@pytest.mark.parametrize("value", ["yes", 1])
def test_a_fused_value_that_is_not_a_bool_or_null_is_refused(value):
    with pytest.raises(ValueError, match=r"fused=.* is invalid: use true, false or null \(automatic\) \(--model\.fused\)"):
        ResNetClassifier(fused=value)


def test_dtensor_parameters_keep_the_default_kernel():
    """FSDP2's shards are DTensors: automatic leaves them to torch's default (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = ViTClassifier(**TINY_VIT)
        assert fused_optimizer(model, None) == {"fused": True}
        fully_shard(model.model, mesh=init_device_mesh("cpu", (1,)))
        assert fused_optimizer(model, None) == {}
    finally:
        dist.destroy_process_group()


def test_a_resumed_run_steps_with_the_kernel_it_chose_not_the_checkpoints(tmp_path):
    """torch's Optimizer.load_state_dict copies each group's settings from the checkpoint, fused / foreach included."""
    first = _trainer(tmp_path, max_steps=2)
    first.fit(ResNetClassifier(fused=False), _data())
    path = tmp_path / "unfused.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["optimizer_states"][0]["param_groups"][0]["fused"] is None
    kernels = Kernels()
    _trainer(tmp_path, callbacks=[kernels]).fit(ResNetClassifier(), _data(), ckpt_path=path)
    assert {f for f, _ in kernels.seen} == {True}
