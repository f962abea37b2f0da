"""Fine-tuning from pretrained weights: torchvision weights read offline from the hub cache, or a file.

``load_pretrained`` fills a recipe's torchvision ResNet or VisionTransformer from ``--model.weights`` (a
torchvision weights name such as ``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``, or a file), keeps
the model's own freshly initialised head when the number of classes differs, and interpolates a ViT's
position embedding to another image size. ``layer_decay_groups`` splits a ViT's parameter groups by depth
for layer-wise learning-rate decay (timm's ``param_groups_layer_decay``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import urlparse

import torch
import torchvision.models
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchvision.models import ResNet, VisionTransformer, WeightsEnum, get_model_weights, list_models
from torchvision.models.vision_transformer import interpolate_embeddings

__all__ = [
    "RESNETS", "VITS", "cache_path", "layer_decay_groups", "load_pretrained", "resolve_weights", "vit_arch",
    "vit_layer_id",
]  # fmt: skip

#: The ResNet recipe's archs by (block, blocks per stage), to name the architecture a state dict holds.
RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
#: torchvision's ViTs as the ViT recipe's options (the builders' arguments; tests/test_pretrained.py checks them).
VITS = {
    "vit_b_16": {"patch_size": 16, "depth": 12, "width": 768, "heads": 12, "mlp_dim": 3072},
    "vit_b_32": {"patch_size": 32, "depth": 12, "width": 768, "heads": 12, "mlp_dim": 3072},
    "vit_l_16": {"patch_size": 16, "depth": 24, "width": 1024, "heads": 16, "mlp_dim": 4096},
    "vit_l_32": {"patch_size": 32, "depth": 24, "width": 1024, "heads": 16, "mlp_dim": 4096},
    "vit_h_14": {"patch_size": 14, "depth": 32, "width": 1280, "heads": 16, "mlp_dim": 5120},
}
_HEADS = {"resnet": ("fc.weight", "fc.bias"), "vit": ("heads.head.weight", "heads.head.bias")}
_POS = "encoder.pos_embedding"
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
OPTION = "--model.weights"


def resolve_weights(arch: Optional[str], weights: str) -> Union[WeightsEnum, Path]:
    """The torchvision weights enum member, or the file, that ``--model.weights`` names.

    ``weights`` is a member name of ``arch``'s enum (``IMAGENET1K_V2``, ``DEFAULT``), a full name
    (``ResNet50_Weights.IMAGENET1K_V2``, which needs no ``arch``), or the path of an existing file. Reads nothing:
    whether a member's file is in the cache is ``load_pretrained``'s concern.
    """
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"{OPTION}={weights!r} is invalid: give a torchvision weights name or a file path.")
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ValueError(f"{OPTION}={weights!r} is a directory: give a state-dict or Lightning checkpoint file.")
    if _looks_like_path(weights):
        raise FileNotFoundError(f"{OPTION}={weights!r}: no such file.")
    if "." in weights:
        enum_name, _, member = weights.partition(".")
        enum = next((get_model_weights(m) for m in _builders() if get_model_weights(m).__name__ == enum_name), None)
        if enum is None:
            example = (
                f"{get_model_weights(arch).__name__}.DEFAULT" if arch in _builders() else "ResNet50_Weights.DEFAULT"
            )
            raise ValueError(
                f"{OPTION}={weights!r}: torchvision has no weights enum {enum_name!r}; full names look like {example}."
            )
        if member not in enum.__members__:
            raise ValueError(f"{OPTION}={weights!r}: {enum.__name__} has {_names(enum)}.")
        return enum[member]
    if arch is None:
        raise ValueError(
            f"{OPTION}={weights!r} is a weights name without its architecture, and the model is none of "
            "torchvision's: give the full name (e.g. ResNet50_Weights.IMAGENET1K_V2) or a file."
        )
    if arch not in _builders():
        raise ValueError(f"arch={arch!r} is not a torchvision classification model with weights.")
    enum = get_model_weights(arch)
    if weights not in enum.__members__:
        raise ValueError(f"{OPTION}={weights!r} is not a weights name of {arch}: {enum.__name__} has {_names(enum)}.")
    return enum[weights]


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or os.sep in weights or Path(weights).suffix in _FILE_SUFFIXES


def _builders() -> list[str]:
    """torchvision's classification model builders (``resnet50``, ``vit_b_16``, ...)."""
    return list_models(module=torchvision.models)


def _names(enum: type[WeightsEnum]) -> str:
    return ", ".join(enum.__members__)  # DEFAULT included: it is an alias the enum accepts


def cache_path(weights: WeightsEnum) -> Path:
    """Where ``weights.get_state_dict()`` keeps the file: ``<torch.hub.get_dir()>/checkpoints/<url basename>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def vit_arch(model: VisionTransformer) -> Optional[str]:
    """The torchvision ViT (``vit_b_16``, ...) whose options the model has, or None."""
    config = _vit_options(model)
    return next((name for name, options in VITS.items() if options == config), None)


def _vit_options(model: VisionTransformer) -> dict[str, int]:
    return {
        "patch_size": model.patch_size,
        "depth": len(model.encoder.layers),
        "width": model.hidden_dim,
        "heads": model.encoder.layers[0].num_heads,  # the one option no parameter's shape records
        "mlp_dim": model.mlp_dim,
    }


def load_pretrained(model: nn.Module, weights: str, *, arch: Optional[str] = None) -> list[str]:
    """Copy ``weights`` into a torchvision ResNet or VisionTransformer, offline; return the head keys kept fresh.

    Args:
        model: the recipe's ``self.model``, built with its own ``num_classes``, before any sharding.
        weights: ``--model.weights``, see :func:`resolve_weights`. A file holds a state dict, a Lightning
            checkpoint (its ``state_dict`` keys start with ``model.``) or a torchvision reference checkpoint
            (``{"model": state_dict, ...}``).
        arch: the model's torchvision builder name (the ResNet recipe's ``arch``); None for a ViT, whose
            builder is found from its options (:func:`vit_arch`).

    A torchvision member is read from the hub cache (``TORCH_HOME``) and never downloaded. Every tensor must
    fit the model except the head (ResNet ``fc``, ViT ``heads.head``): with another number of classes it
    keeps the model's fresh initialisation, as timm's ``pretrained`` with ``num_classes``. A ViT for another
    image size gets the weights' position embedding resized by torchvision's ``interpolate_embeddings``
    (bicubic, the class token's entry kept). Anything else that differs raises ``ValueError`` naming the
    tensor, both shapes and the options to change.
    """
    if isinstance(model, VisionTransformer):
        family, arch, ours = "vit", vit_arch(model) if arch is None else arch, _vit_options(model)
    elif isinstance(model, ResNet):
        family, ours = "resnet", {}
    else:
        raise TypeError(f"{OPTION} loads into a torchvision ResNet or VisionTransformer, not {type(model).__name__}.")
    label = f"{OPTION}={weights!r}"
    short_name = isinstance(weights, str) and "." not in weights and not _looks_like_path(weights)
    if family == "vit" and arch is None and short_name and not Path(weights).expanduser().exists():
        known = "; ".join(f"{name} is {_flags(options)}" for name, options in VITS.items())
        raise ValueError(
            f"{label} names torchvision weights, but the ViT ({_describe(ours)}) is none of torchvision's: "
            f"{known}. Or give a file."
        )
    source = resolve_weights(arch, weights)
    model_state = model.state_dict()
    options = _options(family, model_state, ours, arch)
    if isinstance(source, Path):
        state, theirs = _read_file(source, label)
        subject = f"{source} holds another network"
    else:
        # Checked before the cache: a wrong option is reported without anything to download.
        theirs = _enum_options(label, source, family)
        subject = f"{source!r} are for another network"
        _check_options(label, subject, theirs, options)
        path = cache_path(source)
        if not path.is_file():
            raise FileNotFoundError(_missing_message(label, source, path))
        state = _tensors(_load(path, label), label)
    if family == "vit":
        _rename_legacy_mlp(state)
    theirs = _options(family, state, theirs, None)
    head = _HEADS[family]
    replaced, head_classes = [], None
    if head[0] in state and head[0] in model_state:
        old, new = state[head[0]].shape, model_state[head[0]].shape
        if old[0] != new[0] and old[1:] == new[1:]:
            replaced, head_classes = [k for k in head if k in state], old[0]
            for key in replaced:
                del state[key]
    unexpected = [k for k in state if k not in model_state]
    # BatchNorm fills a missing num_batches_tracked itself (files saved before torch 0.4.1 lack it).
    missing = [k for k in model_state if k not in state and k not in replaced and not k.endswith("num_batches_tracked")]
    wrong = [k for k in state if k in model_state and k != _POS and state[k].shape != model_state[k].shape]
    if wrong:
        key = wrong[0]
        found = f"{key!r} is {tuple(state[key].shape)} in the weights but {tuple(model_state[key].shape)} in the model"
        raise ValueError(f"{label} does not fit the model: {found}. {_advice(theirs, options)}")
    if unexpected or missing:
        found = "; ".join(
            f"the {side} lacks {keys[0]!r}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
            for side, keys in (("model", unexpected), ("weights", missing))
            if keys
        )
        raise ValueError(f"{label} does not fit the model: {found}. {_advice(theirs, options)}")
    _check_options(label, subject, theirs, options)  # what no shape records: a ViT's heads
    if replaced:
        rank_zero_info(
            f"{label}: {', '.join(replaced)} kept freshly initialised for {model_state[head[0]].shape[0]} classes "
            f"(the weights' head has {head_classes})."
        )
    if family == "vit" and state[_POS].shape != model_state[_POS].shape:
        before = tuple(state[_POS].shape)
        interpolate_embeddings(model.image_size, model.patch_size, state)
        rank_zero_info(
            f"{label}: position embedding resized from {before} to {tuple(state[_POS].shape)} for "
            f"image_size={model.image_size}."
        )
    model.load_state_dict(state, strict=False)  # the keys were checked above; the replaced head stays
    return replaced


def _read_file(path: Path, label: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's tensors from a state-dict, Lightning or torchvision-reference file, and the options it records."""
    content = _load(path, label)
    recorded = {}
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):  # Lightning
        hparams = content.get("hyper_parameters") or {}
        if isinstance(hparams.get("heads"), int):
            recorded["heads"] = hparams["heads"]
        content = {k[len("model.") :]: v for k, v in content["state_dict"].items() if k.startswith("model.")}
        if not content:
            raise ValueError(f"{label}: the Lightning checkpoint {path} has no 'model.' tensors (not a recipe's).")
    elif isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):  # torchvision's references
        content = content["model"]
    state = _tensors(content, label)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, recorded


def _load(path: Path, label: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that needs weights_only=False, a truncated file, not a torch file at all
        raise ValueError(
            f"{label}: {path} does not load with torch.load(weights_only=True): {str(err).splitlines()[0]} If you "
            "trust the file, save its state dict alone: torch.save(torch.load(path, weights_only=False)"
            "['state_dict'], 'weights.pt')."
        ) from err


def _tensors(content: Any, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(content, Mapping) or not any(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{label}: the file holds no state dict (a mapping of names to tensors).")
    # A plain dict, without the OrderedDict's _metadata: the modules' load hooks then upgrade older layouts.
    return {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}


def _rename_legacy_mlp(state: dict[str, torch.Tensor]) -> None:
    # torchvision's MLPBlock._load_from_state_dict rule (vision PR 6053): mlp.linear_1/2 became mlp.0/3.
    for key in [k for k in state if re.search(r"\.mlp\.linear_[12]\.(weight|bias)$", k)]:
        index = 3 * (int(key.rsplit(".", 2)[-2][-1]) - 1)
        state[re.sub(r"linear_[12]", str(index), key)] = state.pop(key)


def _missing_message(label: str, weights: WeightsEnum, path: Path) -> str:
    enum, member = type(weights).__name__, weights.name
    return (
        f"{label}: {weights!r} is not in the torch hub cache, and the recipes never download: {path} does not exist. "
        f"On a machine with network, run\n"
        f'    python -c "from torchvision.models import {enum} as W; W.{member}.get_state_dict(progress=True)"\n'
        f"(or download {weights.url}) and copy the file to {path}. The cache is $TORCH_HOME/hub/checkpoints "
        f"(TORCH_HOME moves it; now {Path(torch.hub.get_dir()) / 'checkpoints'}), or pass the downloaded file itself "
        "as --model.weights. Loading a fine-tuned checkpoint with load_from_checkpoint? Pass weights=None: the "
        "checkpoint's own weights replace these."
    )


def _enum_options(label: str, weights: WeightsEnum, family: str) -> dict[str, Any]:
    """The options torchvision's weights imply: RGB, the builder's stem, BatchNorm, the builder's ViT."""
    arch = next(m for m in _builders() if get_model_weights(m) is type(weights))
    if family == "resnet" and arch in RESNETS:
        return {"arch": arch, "stem": "imagenet", "in_channels": 3, "norm": "batch"}
    if family == "vit" and arch in VITS:
        return {**VITS[arch], "conv_stem": None, "in_channels": 3}
    recipe = f"the ResNet recipe builds {', '.join(RESNETS)}" if family == "resnet" else "the model is a ViT"
    raise ValueError(f"{label}: {weights!r} are weights for {arch}, and {recipe}.")


def _options(family: str, state: Mapping[str, torch.Tensor], known: dict[str, Any], arch: Optional[str]) -> dict:
    """The recipe options a state dict implies (``known`` adds those no shape records, e.g. a ViT's heads)."""
    if family == "resnet":
        block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        stages = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        conv1 = state.get("conv1.weight")
        found = next((n for n, structure in RESNETS.items() if structure == (block, stages)), None)
        options = {"arch": arch or found or f"{block} blocks {list(stages)}"}
        if conv1 is not None:
            options.update(stem="imagenet" if conv1.shape[-1] == 7 else "small", in_channels=conv1.shape[1])
        options["norm"] = "batch" if "bn1.running_mean" in state else "group"
        return {**options, **known}
    options: dict[str, Any] = {}
    if "conv_proj.weight" in state:
        first = state["conv_proj.weight"]
        options.update(conv_stem=None, patch_size=first.shape[-1])
    else:
        stem = (k for k in state if re.fullmatch(r"conv_proj\.conv_bn_relu_\d+\.0\.weight", k))
        convs = sorted(stem, key=lambda k: int(k.split(".")[1].rsplit("_", 1)[1]))
        first = state[convs[0]] if convs else None
        options["conv_stem"] = [state[k].shape[0] for k in convs]
    if first is not None:
        options["in_channels"] = first.shape[1]
    options["depth"] = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    if "class_token" in state:
        options["width"] = state["class_token"].shape[-1]
    mlp = state.get("encoder.layers.encoder_layer_0.mlp.0.weight")
    if mlp is not None:
        options["mlp_dim"] = mlp.shape[0]
    options.update(known)
    order = [*VITS["vit_b_16"], "conv_stem", "in_channels"]
    return {k: options[k] for k in sorted(options, key=order.index)}


def _check_options(label: str, subject: str, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    if any(k in ours and ours[k] != v for k, v in theirs.items()):
        raise ValueError(f"{label} does not fit the model: {subject}. {_advice(theirs, ours)}")


def _advice(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    ours = {k: ours[k] for k in theirs if k in ours}  # same order, same keys
    changes = {k: v for k, v in theirs.items() if k in ours and ours[k] != v}
    if not changes:
        return f"The weights are {_describe(theirs)}, as the model; their layout differs from torchvision's."
    return f"The weights are {_describe(theirs)}; the model is {_describe(ours)}: set {_flags(changes)}."


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _flags(options: dict[str, Any]) -> str:
    """The command-line options that give ``options``; in_channels is no option: the CLI links it from the data."""
    flags = []
    for key, value in options.items():
        if key != "in_channels":
            text = json.dumps(value, separators=(",", ":")) if isinstance(value, list) else value
            flags.append(f"--model.{key} {'null' if value is None else text}")
    if "in_channels" in options:
        channels = options["in_channels"]
        flags.append(f"{'and ' if flags else ''}use {channels}-channel images (in_channels comes from the data module)")
    return " ".join(flags)


def vit_layer_id(name: str, depth: int) -> int:
    """timm's layer id of a torchvision ViT parameter: 0 for the embedding, i + 1 for block i, depth + 1 after."""
    if name in ("class_token", _POS) or name.startswith("conv_proj."):
        return 0
    block = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", name)
    # The final norm, the head and anything unmatched take the last id, as timm's param_groups_layer_decay.
    return int(block.group(1)) + 1 if block else depth + 1


def layer_decay_groups(
    model: VisionTransformer, groups: Sequence[dict[str, Any]], *, layer_decay: float, lr: float
) -> list[dict[str, Any]]:
    """Split a torchvision ViT's parameter groups by depth, with layer-wise LR decay (BEiT; timm's semantics).

    ``groups`` are the recipe's decay / no-decay groups (``common.param_groups``): which parameters decay is
    their rule, kept as is, so any change to it applies here too. Each is split by timm's layer id
    (:func:`vit_layer_id`); a part gets ``lr_scale = layer_decay ** (depth + 1 - layer_id)``, ``"lr"`` = its
    group's ``"lr"`` (else ``lr``) times that scale, and ``"name"`` ``layer<id>/<group name>``, with the
    group's other keys (``weight_decay``) unchanged. The scale is applied once, here: ``LRSchedule`` takes
    each group's LR at the start of training as that group's base, so warmup and decay keep the ratios
    (timm's schedulers multiply by ``lr_scale`` on every update instead).
    """
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
        allowed = "use a value in (0, 1]; 1 disables it"
        raise ValueError(f"layer_decay={layer_decay!r} is invalid: {allowed} (--model.layer_decay).")
    depth = len(model.encoder.layers)
    names = {id(p): n for n, p in model.named_parameters()}
    split: dict[tuple[int, int], dict[str, Any]] = {}
    for index, group in enumerate(groups):
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(f"group {group.get('name', index)!r} holds a parameter that is not the ViT's.")
            layer = vit_layer_id(names[id(param)], depth)
            if (layer, index) not in split:
                scale = layer_decay ** (depth + 1 - layer)
                split[(layer, index)] = {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": [],
                    "lr": group.get("lr", lr) * scale,
                    "lr_scale": scale,
                    "name": f"layer{layer}/{group.get('name', f'group{index}')}",
                }
            split[(layer, index)]["params"].append(param)
    return [split[key] for key in sorted(split)]
