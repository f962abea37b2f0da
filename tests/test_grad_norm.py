"""GradNormMonitor: logged numbers against clip_grad_norm_ and hand-computed norms, in modules not ours."""

import ast
import importlib.util
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import lightning.pytorch as L
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.demos.transformer import LightningTransformer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from recording_logger import RecordingLogger
from lightning_recipes.callbacks import GradNormMonitor

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "callbacks" / "grad_norm.py"


class MetricsLogger(RecordingLogger):
    """Keeps the monitor's rows by step, and fails if a step is logged twice."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step=None):
        if any(key.startswith(("grad_norm/", "param/", "amp/")) for key in metrics):
            assert step not in self.rows, f"step {step} logged twice"
            self.rows[step] = dict(metrics)


class Model(BoringModel):
    """Lightning's BoringModel with plain SGD (no scheduler), optional loss scaling and an injected inf."""

    def __init__(self, loss_scales=None, inf_at_step=None, momentum=0.0) -> None:
        super().__init__()
        self.loss_scales = loss_scales  # per optimizer step: makes some steps' gradients large
        self.inf_at_step = inf_at_step  # poisons one element of layer.weight's gradient at this step
        self.momentum = momentum

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.loss_scales is not None:
            out["loss"] = out["loss"] * self.loss_scales[self.global_step % len(self.loss_scales)]
        return out

    def on_after_backward(self):
        if self.global_step == self.inf_at_step:
            self.layer.weight.grad[0, 0] = float("inf")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)

    def train_dataloader(self):
        torch.manual_seed(1234)
        return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=4)


def norm64(tensors) -> float:
    """Hand-computed L2 norm, in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class Reference(L.Callback):
    """Placed after the monitor: hand-computes pre-clip and post-step norms of the same gradients."""

    def __init__(self) -> None:
        self.pre: dict[int, float] = {}
        self.post: dict[int, float] = {}
        self.params: dict[int, float] = {}
        self.scale: dict[int, float] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        self.pre[step] = norm64(p.grad for p in pl_module.parameters() if p.grad is not None)
        self.weights[step] = [p.detach().clone() for p in pl_module.parameters()]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scale[step] = scaler.get_scale()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.post[step] = norm64(p.grad for p in pl_module.parameters() if p.grad is not None)
        self.params[step] = norm64(pl_module.parameters())


def fit(model, monitor, *, steps=4, reference=None, extra=(), **trainer_kwargs):
    logger = MetricsLogger()
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
        callbacks=[*extra, monitor] + ([reference] if reference else []),
    )
    trainer = L.Trainer(**(defaults | trainer_kwargs))
    trainer.fit(model)
    return logger.rows, trainer


PRECISIONS = {
    "32-true": dict(precision="32-true"),
    "bf16-mixed": dict(precision="bf16-mixed"),
    # Trainer(accelerator="cpu", precision="16-mixed") silently falls back to bf16-mixed in Lightning 2.6;
    # the plugin is the documented way to get fp16 autocast + GradScaler on CPU (torch >= 2.4).
    "16-mixed": dict(
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    ),
}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_norms_match_clip_grad_norm_and_hand_computed_values(precision, monkeypatch):
    returned: list[torch.Tensor] = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip_grad_norm(*args, **kwargs):
        returned.append(clip_grad_norm(*args, **kwargs))
        return returned[-1]

    # Lightning's own clipping path calls torch.nn.utils.clip_grad_norm_ and drops its return value.
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip_grad_norm)
    reference = Reference()
    rows, trainer = fit(
        Model(loss_scales=[30.0, 0.01]),
        GradNormMonitor(log_every_n_steps=1),
        reference=reference,
        gradient_clip_val=1.0,
        **PRECISIONS[precision],
    )
    assert sorted(rows) == [0, 1, 2, 3]
    assert len(returned) == 4
    for step, row in rows.items():
        pre = row["grad_norm/total"]
        assert torch.equal(torch.tensor(pre), returned[step])  # the very value clip_grad_norm_ computed
        assert pre == pytest.approx(reference.pre[step], rel=1e-6)
        assert row["grad_norm/total_post_clip"] == pytest.approx(reference.post[step], rel=1e-6)
        assert row["grad_norm/total_post_clip"] == pytest.approx(min(pre, 1.0), rel=1e-5)
        assert row["grad_norm/clip_fraction"] == (1.0 if pre > 1.0 else 0.0)
        assert row["grad_norm/nonfinite_steps"] == 0.0
        assert row["param/norm"] == pytest.approx(reference.params[step], rel=1e-6)
    assert [rows[s]["grad_norm/clip_fraction"] for s in range(4)] == [1.0, 0.0, 1.0, 0.0]
    if precision == "16-mixed":
        # Unscaled: equal to the gradients Lightning clips, not to them times the loss scale.
        assert [rows[s]["amp/loss_scale"] for s in range(4)] == [reference.scale[s] for s in range(4)] == [256.0] * 4
        assert [rows[s]["amp/skipped_steps"] for s in range(4)] == [0.0] * 4
    else:
        assert not any(key.startswith("amp/") for row in rows.values() for key in row)


def test_clip_fraction_counts_clipped_steps_since_the_last_log():
    rows, _ = fit(
        Model(loss_scales=[30.0, 0.01, 30.0, 30.0]),
        GradNormMonitor(log_every_n_steps=4),
        steps=8,
        gradient_clip_val=1.0,
    )
    assert sorted(rows) == [3, 7]
    assert rows[3]["grad_norm/clip_fraction"] == rows[7]["grad_norm/clip_fraction"] == 0.75


def test_default_interval_is_the_trainers_and_no_clipping_means_no_post_clip_pass():
    monitor = GradNormMonitor(log_param_norm=False)
    rows, _ = fit(Model(), monitor, steps=6, log_every_n_steps=3)
    assert sorted(rows) == [2, 5]
    assert sorted(rows[2]) == [
        "grad_norm/clip_fraction",
        "grad_norm/nonfinite_steps",
        "grad_norm/total",
        "grad_norm/total_post_clip",
    ]
    assert monitor.last_logged == rows[5]


def test_clipping_by_value():
    reference = Reference()
    rows, _ = fit(
        Model(),
        GradNormMonitor(log_every_n_steps=1),
        reference=reference,
        gradient_clip_val=0.01,
        gradient_clip_algorithm="value",
        steps=2,
    )
    for step, row in rows.items():
        assert row["grad_norm/total"] == pytest.approx(reference.pre[step], rel=1e-6)
        assert row["grad_norm/total_post_clip"] == pytest.approx(reference.post[step], rel=1e-6)
        assert row["grad_norm/total_post_clip"] <= 0.01 * math.sqrt(66) * (1 + 1e-6)  # 66 elements, each <= 0.01
        assert row["grad_norm/clip_fraction"] == 1.0
    rows, _ = fit(Model(), GradNormMonitor(log_every_n_steps=1), gradient_clip_val=1e9, gradient_clip_algorithm="value")
    for row in rows.values():
        assert row["grad_norm/total_post_clip"] == row["grad_norm/total"]
        assert row["grad_norm/clip_fraction"] == 0.0


def test_without_clipping_post_clip_equals_pre_clip_and_update_ratio_is_exact():
    reference = Reference()
    rows, _ = fit(Model(), GradNormMonitor(log_every_n_steps=2, log_update_ratio=True), reference=reference)
    assert sorted(rows) == [1, 3]
    for step, row in rows.items():
        assert row["grad_norm/total_post_clip"] == row["grad_norm/total"]
        assert row["grad_norm/clip_fraction"] == 0.0
        # SGD without momentum: the update is lr x gradient.
        assert row["param/update_ratio"] == pytest.approx(0.05 * reference.pre[step] / reference.params[step], rel=1e-5)


def test_per_layer_norms_group_by_module_prefix_in_a_transformer():
    class Transformer(LightningTransformer):  # Lightning's demo, on random tokens instead of WikiText2
        def prepare_data(self):
            pass

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, 50, (8, 2, 12), generator=generator)
            return torch.utils.data.DataLoader(list(zip(tokens[:, 0], tokens[:, 1])), batch_size=4)

    class LayerReference(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.groups = {}
            for name, p in pl_module.named_parameters():
                parts = name.split(".")[:-1]
                self.groups.setdefault(".".join(parts[:5]), []).append(p.grad)

    torch.manual_seed(0)
    reference = LayerReference()
    monitor = GradNormMonitor(log_every_n_steps=1, layer_depth=5)
    rows, _ = fit(Transformer(vocab_size=50), monitor, reference=reference, steps=1)
    row = rows[0]
    layers = {key.removeprefix("grad_norm/layer/"): v for key, v in row.items() if key.startswith("grad_norm/layer/")}
    assert sorted(layers) == sorted(reference.groups)
    assert {"model.embedding", "model.transformer.encoder.layers.0", "model.transformer.decoder.layers.1"} < set(layers)
    # rel 2e-5: torch's float32 norm kernel (the one clip_grad_norm_ uses) sums 1e5 elements on CPU.
    for prefix, value in layers.items():
        assert value == pytest.approx(norm64(reference.groups[prefix]), rel=2e-5)
    assert math.sqrt(sum(v * v for v in layers.values())) == pytest.approx(row["grad_norm/total"], rel=2e-5)


def test_nonfinite_warn_names_the_parameters_at_the_next_log():
    with pytest.warns(
        UserWarning,
        match=r"1 of the last 2 optimizer steps had a non-finite gradient norm; first at step 1, offending"
        r" parameters: layer.weight$",
    ):
        rows, trainer = fit(Model(inf_at_step=1), GradNormMonitor(log_every_n_steps=2), steps=2)
    assert rows[1]["grad_norm/nonfinite_steps"] == 1.0
    # 'warn' only reports: the step ran with the inf gradient (use 'skip' to protect the weights).
    assert not torch.isfinite(trainer.lightning_module.layer.weight).all()


def test_nonfinite_raise():
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradient norm at optimizer step 1; first offending parameters: layer.weight$",
    ):
        fit(Model(inf_at_step=1), GradNormMonitor(on_nonfinite="raise"))


def test_nonfinite_skip_leaves_parameters_and_optimizer_state_untouched():
    class StateReference(Reference):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            state = trainer.optimizers[0].state
            self.weights[f"after {trainer.global_step - 1}"] = [p.detach().clone() for p in pl_module.parameters()]
            self.weights[f"momentum {trainer.global_step - 1}"] = [
                state[p]["momentum_buffer"].clone() for p in pl_module.parameters()
            ]

    reference = StateReference()
    with pytest.warns(UserWarning, match=r"at optimizer step 2; .*layer.weight; skipped the optimizer step"):
        rows, trainer = fit(
            Model(inf_at_step=2, momentum=0.9),
            GradNormMonitor(log_every_n_steps=4, on_nonfinite="skip"),
            reference=reference,
        )
    w = reference.weights
    assert all(torch.equal(a, b) for a, b in zip(w["after 2"], w["after 1"]))
    assert all(torch.equal(a, b) for a, b in zip(w["momentum 2"], w["momentum 1"]))
    assert not torch.equal(w["after 3"][0], w["after 2"][0])
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert rows[3]["grad_norm/nonfinite_steps"] == 1.0
    assert trainer.global_step == 4


def test_steps_the_grad_scaler_skips_are_counted_under_16_mixed():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    reference = Reference()
    rows, trainer = fit(
        Model(inf_at_step=1),
        GradNormMonitor(log_every_n_steps=2),
        reference=reference,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert rows[1]["amp/skipped_steps"] == 1.0 and rows[3]["amp/skipped_steps"] == 0.0
    assert rows[1]["grad_norm/nonfinite_steps"] == 1.0
    assert rows[1]["grad_norm/total"] == math.inf
    assert rows[1]["amp/loss_scale"] == 256.0 and rows[3]["amp/loss_scale"] == 128.0  # halved by the skip
    assert all(torch.equal(a, b) for a, b in zip(reference.weights[1], reference.weights[2]))


def test_fused_optimizers_under_16_mixed_are_reported_as_scaled():
    class FusedModel(Model):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    with pytest.warns(UserWarning, match=r"AdamW unscales its gradients inside step\(\) \(fused\), so under the"):
        fit(FusedModel(), GradNormMonitor(), steps=1, plugins=[MixedPrecision("16-mixed", "cpu")])


def test_16_mixed_conflicts_with_raise_or_skip():
    with pytest.raises(
        MisconfigurationException,
        match=r"GradNormMonitor\(on_nonfinite='skip'\) conflicts with the GradScaler of"
        r" Trainer\(precision='16-mixed'\)",
    ):
        fit(Model(), GradNormMonitor(on_nonfinite="skip"), plugins=[MixedPrecision("16-mixed", "cpu")])


def test_no_host_device_sync_on_steps_that_do_not_log(monkeypatch):
    """Every way to read a tensor on the host raises while the monitor handles a step it does not log."""
    state = {"quiet": False, "reads_while_logging": 0}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if state["quiet"]:
                raise AssertionError(f"Tensor.{name}() on a step that logs nothing")
            state["reads_while_logging"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    monitor = GradNormMonitor(log_every_n_steps=3, layer_depth=1, log_update_ratio=True)

    def watched(method):
        def call(*args, **kwargs):
            pending = monitor._pending
            step = pending.step if pending is not None else trainer_ref[0].global_step
            state["quiet"] = (step + 1) % 3 != 0
            try:
                return method(*args, **kwargs)
            finally:
                state["quiet"] = False

        return call

    trainer_ref = []

    class Capture(L.Callback):
        def setup(self, trainer, pl_module, stage):
            trainer_ref.append(trainer)
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
                guard(name)

    monitor.on_before_optimizer_step = watched(monitor.on_before_optimizer_step)
    monitor.on_train_batch_end = watched(monitor.on_train_batch_end)
    monitor._after_step = watched(monitor._after_step)
    rows, _ = fit(Model(loss_scales=[30.0, 0.01]), monitor, steps=6, extra=[Capture()], gradient_clip_val=1.0)
    assert sorted(rows) == [2, 5]
    assert state["reads_while_logging"] > 0  # the guard works: logging steps do read


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(log_every_n_steps=0), ValueError, r"`log_every_n_steps` must be an integer >= 1 or None, got 0"),
        (dict(log_every_n_steps=2.5), ValueError, r"`log_every_n_steps` must be an integer >= 1 or None, got 2.5"),
        (dict(layer_depth=-1), ValueError, r"`layer_depth` must be an integer >= 1 or None, got -1"),
        (dict(log_param_norm="yes"), TypeError, r"`log_param_norm` must be True or False, got 'yes'"),
        (dict(log_update_ratio=1), TypeError, r"`log_update_ratio` must be True or False, got 1"),
        (dict(on_nonfinite="ignore"), ValueError, r"`on_nonfinite` must be one of 'warn', 'raise', 'skip', got 'ig"),
    ],
)
def test_arguments_are_validated_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradNormMonitor(**kwargs)
    with pytest.raises(TypeError):
        GradNormMonitor(10)  # type: ignore[misc]  # keyword-only


def test_the_file_imports_only_torch_lightning_and_the_standard_library(tmp_path, monkeypatch):
    allowed = {"torch", "lightning", "typing_extensions"} | set(sys.stdlib_module_names)
    tree = ast.parse(SOURCE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import: the file would not work copied alone"
            roots.add(node.module.split(".")[0])
    assert roots <= allowed, roots - allowed

    copied = tmp_path / "my_grad_norm.py"
    shutil.copy(SOURCE, copied)
    spec = importlib.util.spec_from_file_location("my_grad_norm", copied)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_grad_norm", module)  # as `import my_grad_norm` would
    spec.loader.exec_module(module)
    rows, _ = fit(Model(), module.GradNormMonitor(log_every_n_steps=2), steps=2)
    assert sorted(rows) == [1]
