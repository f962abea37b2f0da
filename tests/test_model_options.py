"""The recipes' model options: which parameters decay (torchvision's three switches), probability targets,
the per-step cost of the training metrics, channels-last and torch.compile."""

import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from recording_logger import RecordingLogger
from two_processes import run_two_processes

from lightning_recipes.recipes.common import param_groups
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
VIT_EMBEDDINGS = ("class_token", "encoder.pos_embedding")
TINY_VIT = {"depth": 2, "width": 32, "heads": 2, "mlp_dim": 64}


# ------------------------------------------------------------------------------------------------ weight decay


def torchvision_decay(model, weight_decay, *, norm=None, bias=None, embedding=None, embedding_keys=(),
                      bias_is=lambda name: name == "bias"):  # fmt: skip
    """{parameter name: weight decay} by torchvision's rule, re-implemented from its references.

    ``references/classification/utils.py::set_weight_decay`` walks the modules; a parameter takes the first
    custom key that matches (train.py lists ``bias`` first, then the transformer embedding keys; a key without
    a dot matches the parameter's own name, a dotted key its full name), else the norm value if the module
    is a norm layer and ``--norm-weight-decay`` is given, else ``weight_decay``. ``bias_is`` is the bias
    match: torchvision's is ``== "bias"``.
    """
    norm_classes = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)  # fmt: skip
    custom = [("bias", bias)] if bias is not None else []
    custom += [(key, embedding) for key in embedding_keys if embedding is not None]
    decay = {}

    def visit(module, prefix):
        for name, _ in module.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            for key, value in custom:
                target = full if "." in key else name
                if bias_is(target) if key == "bias" else key == target:
                    decay[full] = value
                    break
            else:
                decay[full] = norm if norm is not None and isinstance(module, norm_classes) else weight_decay
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    return decay


def decay_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    found = [(names[id(p)], group["weight_decay"]) for group in groups for p in group["params"]]
    assert len(found) == len({n for n, _ in found}) == len(names)  # every parameter in exactly one group
    return dict(found)


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {group["name"]: [names[id(p)] for p in group["params"]] for group in groups}


MODELS = {
    "resnet18": lambda **decay: ResNetClassifier(weight_decay=0.05, **_resnet(decay)),
    "resnet18-groupnorm": lambda **decay: ResNetClassifier(norm="group", weight_decay=0.05, **_resnet(decay)),
    "vit": lambda **decay: ViTClassifier(**TINY_VIT, weight_decay=0.05, **_vit(decay)),
    "vit-conv-stem": lambda **decay: ViTClassifier(
        **TINY_VIT, image_size=16, patch_size=4, conv_stem=[8, 8], weight_decay=0.05, **_vit(decay)
    ),
}


def _vit(decay):
    return {("transformer_embedding_decay" if k == "embedding" else f"{k}_weight_decay"): v for k, v in decay.items()}


def _resnet(decay):
    return {f"{k}_weight_decay": v for k, v in decay.items() if k != "embedding"}


# (switches, the group names expected) with weight_decay 0.05
SWITCHES = [
    ({"norm": 0.0, "bias": 0.0, "embedding": 0.0}, {"decay", "no_decay"}),  # the defaults
    ({"norm": None, "bias": None, "embedding": None}, {"decay"}),  # torchvision's ViT-B/16 command
    ({"norm": 0.0, "bias": None, "embedding": None}, {"decay", "no_decay"}),  # torchvision's ResNet-50 V2 command
    ({"norm": 1e-5, "bias": 2e-4, "embedding": 3e-4}, {"decay", "norm", "bias", "embedding"}),
    ({"norm": 1e-5, "bias": 1e-5, "embedding": 0.05}, {"decay", "norm_bias"}),  # equal values share a group
    ({"norm": None, "bias": 0.0, "embedding": 0.0}, {"decay", "no_decay"}),
]


@pytest.mark.parametrize(("switches", "expected_groups"), SWITCHES, ids=[str(s) for s, _ in SWITCHES])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_each_parameter_decays_as_torchvision_sets_it(model_name, switches, expected_groups):
    vit = model_name.startswith("vit")
    module = MODELS[model_name](**{k: v for k, v in switches.items() if vit or k != "embedding"})
    groups = module.build_optimizer().param_groups
    expected = torchvision_decay(
        module.model, 0.05, norm=switches["norm"], bias=switches["bias"],
        embedding=switches["embedding"] if vit else None, embedding_keys=VIT_EMBEDDINGS if vit else (),
        bias_is=lambda name: name.endswith("bias"),
    )  # fmt: skip
    assert decay_by_name(module.model, groups) == expected
    if not vit:  # a ResNet has no embeddings
        expected_groups = expected_groups - {"embedding"}
    assert sorted(g["name"] for g in groups) == sorted(expected_groups)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_the_default_switches_keep_the_grouping_of_the_ndim_rule_exactly(model_name):
    # The rule before the switches: every parameter with fewer than 2 dims, plus the ViT's named embeddings.
    module = MODELS[model_name]()
    named = VIT_EMBEDDINGS if model_name.startswith("vit") else ()
    params = list(module.model.named_parameters())
    before = {
        "decay": [n for n, p in params if not (p.ndim < 2 or n in named)],
        "no_decay": [n for n, p in params if p.ndim < 2 or n in named],
    }
    groups = module.build_optimizer().param_groups
    assert group_names(module.model, groups) == before
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.05), ("no_decay", 0.0)]


def test_every_parameter_decays_when_all_switches_are_none():
    module = ViTClassifier(**TINY_VIT, weight_decay=0.3, norm_weight_decay=None, bias_weight_decay=None,
                           transformer_embedding_decay=None)  # fmt: skip
    (group,) = module.build_optimizer().param_groups
    assert (group["name"], group["weight_decay"]) == ("decay", 0.3)
    assert len(group["params"]) == len(list(module.model.parameters()))


def test_torchvisions_exact_bias_match_would_decay_only_the_attention_input_biases():
    # The one place our bias rule differs from torchvision's `key == "bias"`: nn.MultiheadAttention's in_proj_bias.
    module = ViTClassifier(**TINY_VIT)
    ours = decay_by_name(module.model, module.build_optimizer().param_groups)
    theirs = torchvision_decay(module.model, 0.05, norm=0.0, bias=0.0, embedding=0.0, embedding_keys=VIT_EMBEDDINGS)
    differ = {n for n in ours if ours[n] != theirs[n]}
    assert differ == {f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_bias" for i in range(2)}
    resnet = ResNetClassifier(arch="resnet18")
    assert decay_by_name(resnet.model, resnet.build_optimizer().param_groups) == torchvision_decay(
        resnet.model, 5e-4, norm=0.0, bias=0.0
    )


def test_a_set_bias_value_wins_over_the_norm_value_for_the_norms_shifts():
    module = ResNetClassifier(arch="resnet18", weight_decay=0.05, norm_weight_decay=1e-5, bias_weight_decay=2e-4)
    decay = decay_by_name(module.model, module.build_optimizer().param_groups)
    assert (decay["bn1.weight"], decay["bn1.bias"], decay["fc.bias"], decay["fc.weight"]) == (1e-5, 2e-4, 2e-4, 0.05)


def test_a_zero_weight_decay_keeps_both_groups():
    # weight_decay 0 (no decay anywhere) still gives lr/decay and lr/no_decay, as before the switches.
    groups = param_groups(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), 0.0)
    summary = [(g["name"], g["weight_decay"], len(g["params"])) for g in groups]
    assert summary == [("decay", 0.0, 1), ("no_decay", 0.0, 3)]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # torchvision's ViT-B/16 command passes --wd 0.3 and none of the three switches: everything decays.
        ("vit_b16_imagenet.yaml", {"weight_decay": 0.3, "norm_weight_decay": None, "bias_weight_decay": None,
                                   "transformer_embedding_decay": None}),
        ("vit_b16_imagenet_fsdp.yaml", {"weight_decay": 0.3, "norm_weight_decay": None, "bias_weight_decay": None,
                                        "transformer_embedding_decay": None}),
        ("vit_b16_imagenet_fsdp2.yaml", {"weight_decay": 0.3, "norm_weight_decay": None, "bias_weight_decay": None,
                                         "transformer_embedding_decay": None}),
        # ResNet-50 V2: --weight-decay 2e-5 --norm-weight-decay 0.0, no --bias-weight-decay (fc.bias decays).
        ("resnet50_imagenet.yaml", {"weight_decay": 2e-5, "norm_weight_decay": 0.0, "bias_weight_decay": None}),
        # The CIFAR configs keep what they trained with: norms, biases (and the ViT's embeddings) undecayed.
        ("resnet18_cifar10.yaml", {"weight_decay": 5e-4, "norm_weight_decay": 0.0, "bias_weight_decay": 0.0}),
        ("vit_cifar10.yaml", {"weight_decay": 5e-5, "norm_weight_decay": 0.0, "bias_weight_decay": 0.0,
                              "transformer_embedding_decay": 0.0}),
    ],
)  # fmt: skip
def test_configs_set_the_switches_of_their_reference(config, expected):
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    assert {k: model.get(k, "missing") for k in expected} == expected
    resnet = config.startswith("resnet")
    module = ResNetClassifier(arch="resnet18", **expected) if resnet else ViTClassifier(**TINY_VIT, **expected)
    decay = decay_by_name(module.model, module.build_optimizer().param_groups)
    switches = {"norm": expected["norm_weight_decay"], "bias": expected["bias_weight_decay"]}
    if not resnet:
        switches.update(embedding=expected["transformer_embedding_decay"], embedding_keys=VIT_EMBEDDINGS)
    assert decay == torchvision_decay(module.model, expected["weight_decay"], **switches,
                                      bias_is=lambda name: name.endswith("bias"))  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "option"),
    [
        (ResNetClassifier, "norm_weight_decay"),
        (ResNetClassifier, "bias_weight_decay"),
        (ViTClassifier, "norm_weight_decay"),
        (ViTClassifier, "bias_weight_decay"),
        (ViTClassifier, "transformer_embedding_decay"),
    ],
)
@pytest.mark.parametrize("value", [-1e-4, float("nan"), "0.1"])
def test_a_bad_decay_switch_names_the_option(cls, option, value):
    match = (rf"{option}={value!r} is invalid: use a value >= 0 \(0 disables it\), or null for weight_decay's value "
             rf"\(--model\.{option}\)\.$")  # fmt: skip
    with pytest.raises(ValueError, match=match):
        cls(**{option: value})


# ------------------------------------------------------------------------------------------------ soft targets


def test_the_loss_of_probability_targets_is_cross_entropy_against_the_smoothed_distribution():
    module = ViTClassifier(depth=1, width=16, heads=2, mlp_dim=16, label_smoothing=0.1)
    torch.manual_seed(0)
    logits = torch.randn(3, 10, dtype=torch.float64)
    first, second, share = torch.tensor([1, 4, 9]), torch.tensor([7, 4, 0]), torch.tensor([0.7, 0.5, 0.2])
    mixed = share[:, None] * F.one_hot(first, 10) + (1 - share[:, None]) * F.one_hot(second, 10)  # MixUp's targets
    by_hand = 0.0
    for row, target in zip(logits.tolist(), mixed.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        smoothed = [0.9 * t + 0.1 / 10 for t in target]  # (1 - eps) p + eps / C
        by_hand += -sum(s * (v - log_z) for s, v in zip(smoothed, row)) / 3
    assert module.criterion(logits, mixed.double()).item() == pytest.approx(by_hand, rel=1e-12)
    # A class index is its one-hot distribution: the two target forms agree.
    one_hot = F.one_hot(first, 10).double()
    assert module.criterion(logits, first).item() == pytest.approx(module.criterion(logits, one_hot).item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ per-step logging


class Probe(ViTClassifier):
    """Keeps what each training step saw, and logs a probe every step to show where Lightning writes step metrics."""

    def __init__(self, **kwargs):
        super().__init__(depth=1, width=16, heads=2, mlp_dim=16, **kwargs)
        self.steps = []  # (the optimizer step the batch counts towards, logits, targets)

    def training_step(self, batch, batch_idx):
        self.log("probe", float(batch_idx))
        self._batch, self._before = batch, self.trainer.global_step
        return super().training_step(batch, batch_idx)

    def forward(self, images):
        self._logits = super().forward(images)
        return self._logits

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # 1-based: a batch inside an accumulation window counts towards the step after the current count.
        step = self.trainer.global_step + (self.trainer.global_step == self._before)
        self.steps.append((step, self._logits.detach().clone(), self._batch[1].clone()))
        super().on_train_batch_end(outputs, batch, batch_idx)


def _sums(steps, criterion):
    """Sample-weighted mean loss, top-1 and top-5 accuracy of the steps given, computed again from their logits."""
    n = sum(len(t) for _, _, t in steps)
    loss = sum(criterion(logits, targets).item() * len(targets) for _, logits, targets in steps) / n
    labels = [t.argmax(-1) if t.is_floating_point() else t for _, _, t in steps]
    logits = [logits for _, logits, _ in steps]
    top1 = sum(int((x.argmax(-1) == y).sum()) for x, y in zip(logits, labels)) / n
    top5 = sum(int((x.topk(5).indices == y[:, None]).any(-1).sum()) for x, y in zip(logits, labels)) / n
    return loss, top1, top5


@pytest.mark.parametrize(
    ("soft", "log_every", "accumulate", "logged_at"),
    [
        # 7 batches an epoch, 2 epochs: optimizer steps 1..14, logged after steps 3, 6, 9, 12 (logger steps 2, 5, ...)
        (False, 3, 1, [3, 6, 9, 12]),
        # Accumulating 2 batches: steps after batches 2, 4, 6 and the epoch's last (7): 4 an epoch; every 2nd logs.
        (True, 2, 2, [2, 4, 6, 8]),
    ],
)
def test_train_metrics_are_logged_at_lightnings_logging_steps_as_means_over_the_window(
    soft, log_every, accumulate, logged_at, tmp_path
):
    torch.manual_seed(0)
    images = torch.randn(14, 1, 8, 8)
    if soft:  # MixUp-style: 60/40 mixes of two classes
        targets = 0.6 * F.one_hot(torch.randint(0, 10, (14,)), 10) + 0.4 * F.one_hot(torch.randint(0, 10, (14,)), 10)
    else:
        targets = torch.randint(0, 10, (14,))
    module, logger = Probe(), RecordingLogger()
    trainer = Trainer(max_epochs=2, log_every_n_steps=log_every, accumulate_grad_batches=accumulate, logger=logger,
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_checkpointing=False,
                      enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(images, targets), batch_size=2))

    train_rows = [(step, row) for step, row in logger.rows if "train/loss" in row]
    # Exactly where Lightning writes a metric logged on every step (the probe), and nowhere else.
    assert [step for step, _ in train_rows] == [step for step, row in logger.rows if "probe" in row]
    assert [step + 1 for step, _ in train_rows] == logged_at  # the logger's step counts the steps before this one
    start = 0
    for (_, row), end in zip(train_rows, logged_at):
        window = [s for s in module.steps if start < s[0] <= end]
        start = end
        loss, top1, top5 = _sums(window, module.criterion)
        logged = (row["train/loss"], row["train/acc"], row["train/acc_top5"])
        assert logged == pytest.approx((loss, top1, top5), rel=1e-6)
    epoch_rows = [row for _, row in logger.rows if "train/acc_epoch" in row]
    assert len(epoch_rows) == 2
    for epoch, row in enumerate(epoch_rows):
        steps = module.steps[7 * epoch : 7 * (epoch + 1)]
        loss, top1, top5 = _sums(steps, module.criterion)
        assert (row["train/loss_epoch"], row["train/acc_epoch"], row["train/acc_top5_epoch"]) == pytest.approx(
            (loss, top1, top5), rel=1e-6
        )
    # The progress bar shows the latest window.
    assert trainer.progress_bar_metrics["train/loss"] == pytest.approx(train_rows[-1][1]["train/loss"])
    assert trainer.progress_bar_metrics["train/acc"] == pytest.approx(train_rows[-1][1]["train/acc"])


def test_steps_between_logging_steps_neither_log_nor_read_a_tensor_back_to_the_host(tmp_path, monkeypatch):
    # On a GPU each read-back (item, tolist, bool, float, cpu, ...) waits for the device: only logging steps may.
    reads, calls, watching = [], [], [False]
    def guarded(name):
        original = getattr(torch.Tensor, name)

        def guard(self, *args, **kwargs):
            if watching[0] and (name != "to" or "cpu" in map(str, (*args, *kwargs.values()))):
                reads.append(name)
            return original(self, *args, **kwargs)

        return guard

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "cpu", "to"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))

    class Watched(ViTClassifier):
        def log(self, name, *args, **kwargs):
            calls.append((self.trainer.global_step, name))
            return super().log(name, *args, **kwargs)

        def training_step(self, batch, batch_idx):
            watching[0] = True
            loss = super().training_step(batch, batch_idx)
            watching[0] = False
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            watching[0] = self.trainer.global_step % 3 != 0  # logging steps: 3, 6
            super().on_train_batch_end(outputs, batch, batch_idx)
            watching[0] = False

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(14, 1, 8, 8), torch.randint(0, 10, (14,))), batch_size=2)
    trainer = Trainer(max_steps=7, log_every_n_steps=3, logger=RecordingLogger(), default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      limit_val_batches=0)  # fmt: skip
    trainer.fit(Watched(depth=1, width=16, heads=2, mlp_dim=16), data)
    assert reads == []
    names = ("train/loss", "train/acc", "train/acc_top5")
    epoch_end = [(7, f"{n}_epoch") for n in names]
    assert calls == [(s, n) for s in (3, 6) for n in names] + epoch_end


# ------------------------------------------------------------------------------------------- channels-last, compile

SMALL = {
    "resnet": lambda **o: ResNetClassifier(arch="resnet18", stem_stride=2, **o),
    "vit": lambda **o: ViTClassifier(
        depth=1, width=16, heads=2, mlp_dim=16, image_size=16, patch_size=4, conv_stem=[8, 8], **o
    ),
}


@pytest.mark.parametrize("recipe", sorted(SMALL))
def test_channels_last_lays_out_the_weights_and_inputs_in_nhwc_and_gives_the_same_logits(recipe, tmp_path):
    torch.manual_seed(0)
    plain = SMALL[recipe]()
    torch.manual_seed(0)
    nhwc = SMALL[recipe](channels_last=True)
    nhwc.configure_model()  # what the Trainer calls before building the optimizer
    convs = [m for m in nhwc.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # (Kernels with 1 input channel or 1x1 are both layouts at once.)
    assert not any(c.weight.is_contiguous() for c in convs if c.in_channels > 1 and c.kernel_size != (1, 1))
    seen = []
    layout = lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))  # noqa: E731
    convs[0].register_forward_pre_hook(layout)
    images = torch.randn(4, 1, 16, 16)
    plain.eval(), nhwc.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc(images), plain(images), rtol=1e-5, atol=1e-5)
    assert seen == [True]
    # A checkpoint of the plain layout loads into the NHWC weights without changing their layout.
    nhwc.load_state_dict(plain.state_dict())
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_channels_last_weights_stay_nhwc_through_training(tmp_path):
    module = SMALL["vit"](channels_last=True, optimizer="sgd")  # conv stem: two 3x3 convs (8 channels), a 1x1
    trainer = Trainer(max_steps=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(2, 1, 16, 16), torch.randint(0, 10, (2,))), batch_size=2))
    weight = next(m for m in module.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 8).weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    momentum = trainer.optimizers[0].state[weight]["momentum_buffer"]
    assert momentum.is_contiguous(memory_format=torch.channels_last)


class LossRecorder(Callback):
    def __init__(self, losses):
        self.losses = losses

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_compile_trains_to_the_eager_loss_and_saves_the_plain_models_keys(tmp_path, monkeypatch):
    """One step compiled and one eager from the same weights, then a checkpoint round trip.

    The backend is AOTAutograd without code generation (``aot_eager``): Dynamo's graph capture and the
    functionalised forward and backward that inductor would compile, in seconds instead of the minutes that
    inductor's C++ compilation takes on a 2-core CPU. ``RECIPES_COMPILE_BACKEND=inductor`` runs the real thing.
    """
    backend = torch._dynamo.lookup_backend(os.environ.get("RECIPES_COMPILE_BACKEND", "aot_eager"))
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return backend(graph, example_inputs)

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording))
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), batch_size=4)
    losses, modules = {}, {}
    for compile in (False, True):
        torch.manual_seed(0)
        modules[compile] = module = ViTClassifier(depth=1, width=16, heads=2, mlp_dim=16, compile=compile)
        trainer = Trainer(max_steps=2, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                          enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                          callbacks=[LossRecorder(losses.setdefault(compile, []))])  # fmt: skip
        trainer.fit(module, data)
        trainer.save_checkpoint(tmp_path / f"compile={compile}.ckpt")
    assert graphs and losses[True] == pytest.approx(losses[False], rel=1e-5)
    # Checkpoints name the parameters as the plain model does: no `_orig_mod.` prefixes; they load both ways.
    saved = torch.load(tmp_path / "compile=True.ckpt", weights_only=False)["state_dict"]
    assert list(saved) == list(modules[False].state_dict())
    loaded = ViTClassifier.load_from_checkpoint(tmp_path / "compile=True.ckpt")
    plain = ViTClassifier(depth=1, width=16, heads=2, mlp_dim=16)
    plain.load_state_dict(saved)
    for name, value in modules[True].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value) and torch.equal(plain.state_dict()[name], value), name


# ------------------------------------------------------------------------------------------------ 2 processes


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(rank)  # each rank its own 10 samples, 5 batches of 2
    images = torch.randn(10, 1, 8, 8, generator=generator)
    mix = torch.rand(10, 1, generator=generator) * 0.4 + 0.6  # MixUp-style soft targets
    targets = mix * F.one_hot(torch.randint(0, 10, (10,), generator=generator), 10) + (1 - mix) * F.one_hot(
        torch.randint(0, 10, (10,), generator=generator), 10
    )
    data = DataLoader(TensorDataset(images, targets), batch_size=2)
    strategies = {
        # DDP with channels-last ResNet weights (its gradient buckets take the weights' strides) ...
        "ddp": (DDPStrategy(process_group_backend="gloo"), lambda: ResNetClassifier(stem_stride=2, channels_last=True)),
        # ... and FSDP2 (its shards are contiguous; the inputs still go channels-last).
        "fsdp2": (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                  lambda: ViTClassifier(depth=1, width=16, heads=2, mlp_dim=16, channels_last=True)),
    }  # fmt: skip
    for name, (strategy, build) in strategies.items():
        torch.manual_seed(0)
        module, logger, logits = build(), RecordingLogger(), []

        def forward(images, plain=module.forward, logits=logits):
            logits.append(plain(images))
            return logits[-1]

        module.forward = forward
        trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, log_every_n_steps=2,
                          logger=logger, default_root_dir=out_dir, use_distributed_sampler=False,
                          enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                          limit_val_batches=0)  # fmt: skip
        trainer.fit(module, data)
        record = {
            "logits": torch.cat([t.detach() for t in logits]).tolist(),
            "targets": targets.tolist(),
            "rows": [(step, {k: float(v) for k, v in row.items()}) for step, row in logger.rows],
        }
        if name == "ddp":
            weight = module.model.layer1[0].conv1.weight
            record["nhwc"] = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
            record["weight"] = weight.detach().flatten().tolist()
        with open(os.path.join(out_dir, f"{name}-rank{rank}.json"), "w") as file:
            json.dump(record, file)


@pytest.mark.slow
def test_under_ddp_and_fsdp2_each_rank_logs_its_window_and_the_epoch_is_over_all_ranks(tmp_path):
    run_two_processes(_distributed_worker, str(tmp_path))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def sums(logits, targets):  # loss x samples, samples, top-1 and top-5 correct
        labels = targets.argmax(-1)
        top1 = int((logits.argmax(-1) == labels).sum())
        top5 = int((logits.topk(5).indices == labels[:, None]).any(-1).sum())
        return criterion(logits, targets).item() * len(targets), len(targets), top1, top5

    for name in ("ddp", "fsdp2"):
        ranks = [json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)]
        epoch = [0.0, 0, 0, 0]
        for record in ranks:
            logits, targets = torch.tensor(record["logits"]), torch.tensor(record["targets"])
            assert logits.shape == (10, 10)  # 5 steps of 2
            windows = [sums(logits[:4], targets[:4]), sums(logits[4:8], targets[4:8])]  # steps 1-2 and 3-4
            rows = [(step, row) for step, row in record["rows"] if "train/loss" in row]
            assert [step for step, _ in rows] == [1, 3]
            for (_, row), (loss, n, top1, top5) in zip(rows, windows):
                assert (row["train/loss"], row["train/acc"], row["train/acc_top5"]) == pytest.approx(
                    (loss / n, top1 / n, top5 / n), rel=1e-5
                )
            epoch = [a + b for a, b in zip(epoch, sums(logits, targets))]
        loss, n, top1, top5 = epoch
        for record in ranks:  # the same epoch figures on both ranks: every rank's samples
            (row,) = [row for _, row in record["rows"] if "train/acc_epoch" in row]
            assert (row["train/loss_epoch"], row["train/acc_epoch"], row["train/acc_top5_epoch"]) == pytest.approx(
                (loss / n, top1 / n, top5 / n), rel=1e-5
            )
    ddp = [json.loads((tmp_path / f"ddp-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ddp[0]["nhwc"] and ddp[1]["nhwc"] and ddp[0]["weight"] == ddp[1]["weight"]


# ------------------------------------------------------------------------------------- FSDP1 gradient clipping


class RootFSDP(nn.Module):
    """Stands in for the root ``FullyShardedDataParallel`` (FSDPStrategy needs CUDA): records clip_grad_norm_."""

    def __init__(self):
        super().__init__()
        self.clipped = []

    def clip_grad_norm_(self, max_norm):
        self.clipped.append(max_norm)


@pytest.mark.parametrize("recipe", [ViTClassifier, ResNetClassifier])
def test_under_fsdp1_clipping_by_norm_goes_to_the_root_modules_clip_grad_norm(recipe, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities import GradClipAlgorithmType
    from lightning.pytorch.utilities.model_helpers import is_overridden

    options = TINY_VIT if recipe is ViTClassifier else {}
    module = recipe(**options)
    strategy = FSDPStrategy()
    root = RootFSDP()
    monkeypatch.setattr(FSDPStrategy, "model", property(lambda self: root))
    module._trainer = SimpleNamespace(strategy=strategy, precision="16-mixed", gradient_clip_val=1.0, datamodule=None)
    assert not is_overridden("configure_gradient_clipping", module)
    module.setup("fit")
    assert is_overridden("configure_gradient_clipping", module)
    optimizer = module.build_optimizer()
    module.configure_gradient_clipping(optimizer, 1.0, GradClipAlgorithmType.NORM)
    module.configure_gradient_clipping(optimizer, 0.5, None)
    assert root.clipped == [1.0, 0.5]
    # By value: Lightning's own clipping (elementwise, right on shards), through the precision plugin.
    calls = []
    monkeypatch.setattr(module, "clip_gradients", lambda *args: calls.append(args))
    module.configure_gradient_clipping(optimizer, 0.1, GradClipAlgorithmType.VALUE)
    assert calls == [(optimizer, 0.1, GradClipAlgorithmType.VALUE)] and root.clipped == [1.0, 0.5]
    # Another strategy: the class's hook, untouched.
    other = recipe(**options)
    other._trainer = SimpleNamespace(strategy=SimpleNamespace(), precision="32-true", gradient_clip_val=None, datamodule=None)
    other.setup("fit")
    assert not is_overridden("configure_gradient_clipping", other)
