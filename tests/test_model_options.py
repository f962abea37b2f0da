"""The recipes' model options that follow torchvision's references: which parameters decay (its three switches)."""

from pathlib import Path

import pytest
import yaml
from torch import nn

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
    custom = ([("bias", bias)] if bias is not None else []) + [(k, embedding) for k in embedding_keys if embedding is not None]
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
    "resnet18": lambda **decay: ResNetClassifier(arch="resnet18", weight_decay=0.05, **_resnet(decay)),
    "resnet18-groupnorm": lambda **decay: ResNetClassifier(arch="resnet18", norm="group", weight_decay=0.05, **_resnet(decay)),
    "vit": lambda **decay: ViTClassifier(**TINY_VIT, weight_decay=0.05, **_vit(decay)),
    "vit-conv-stem": lambda **decay: ViTClassifier(**TINY_VIT, image_size=16, patch_size=4, conv_stem=[8, 8],
                                                   weight_decay=0.05, **_vit(decay)),  # fmt: skip
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
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in groups] == [("decay", 0.0, 1), ("no_decay", 0.0, 3)]


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
    [(ResNetClassifier, "norm_weight_decay"), (ResNetClassifier, "bias_weight_decay"), (ViTClassifier, "norm_weight_decay"),
     (ViTClassifier, "bias_weight_decay"), (ViTClassifier, "transformer_embedding_decay")],
)  # fmt: skip
@pytest.mark.parametrize("value", [-1e-4, float("nan"), "0.1"])
def test_a_bad_decay_switch_names_the_option(cls, option, value):
    match = (rf"{option}={value!r} is invalid: use a value >= 0 \(0 disables it\), or null for weight_decay's value "
             rf"\(--model\.{option}\)\.$")  # fmt: skip
    with pytest.raises(ValueError, match=match):
        cls(**{option: value})
