"""README's recipe cards agree with the configs they describe and cover the reference commands they cite.

A card is a README section headed by a config's path, holding a table: published flag or hyperparameter | value in
the reference | value in our config | where it lives. In each cell the first backticked literal is the value the
test reads: the flag, the reference's value, our config's value (YAML), the key (``trainer.max_epochs``,
``data.init_args.ra_reps``, ``trainer.callbacks[LRSchedule].init_args.decay``). The reference commands are kept
here verbatim (torchvision's references/classification README and train.py defaults, kuangliu/pytorch-cifar's and
omihub777/ViT-CIFAR's main.py), so a card that drops a flag or misquotes the reference fails too.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# torchvision's commands (references/classification README; ResNet-50 V2: pytorch/vision#3995), and the train.py
# defaults each recipe relies on: the card must name every flag, with the reference's value.
RESNET50_V2 = (
    "torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5 --lr-scheduler cosineannealinglr"
    " --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide --epochs 600 --random-erase 0.1"
    " --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0"
    " --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4"
)
VIT_B16 = (
    "torchrun --nproc_per_node=8 train.py --model vit_b_16 --epochs 300 --batch-size 512 --opt adamw --lr 0.003"
    " --wd 0.3 --lr-scheduler cosineannealinglr --lr-warmup-method linear --lr-warmup-epochs 30"
    " --lr-warmup-decay 0.033 --amp --label-smoothing 0.11 --mixup-alpha 0.2 --auto-augment ra --clip-grad-norm 1"
    " --ra-sampler --cutmix-alpha 1.0 --model-ema"
)
TORCHVISION_DEFAULTS = {"--lr-warmup-decay": "0.01", "--model-ema-steps": "32",
                        "--model-ema-decay": "0.99998", "--val-crop-size": "224", "--interpolation": "bilinear",
                        "--lr-min": "0.0", "--amp": None, "--clip-grad-norm": None}  # fmt: skip
VIT_B16_DEFAULTS = {"--ra-reps": "3", "--ra-magnitude": "9", "--train-crop-size": "224", "--val-resize-size": "256",
                    "--random-erase": "0.0", "--norm-weight-decay": None, "--bias-weight-decay": None,
                    "--transformer-embedding-decay": None}  # fmt: skip
# kuangliu/pytorch-cifar main.py (49b7aa9): one flag, the rest hard-coded, named as there.
KUANGLIU = {"--lr": "0.1", "momentum": "0.9", "nesterov": "false", "weight_decay": "5e-4", "batch_size": "128",
            "epochs": "200", "eta_min": "0", "CosineAnnealingLR": None, "criterion": None, "transform_train": None,
            "Normalize": None, "net = ResNet18()": None, "torch.nn.DataParallel": "1"}  # fmt: skip
# omihub777/ViT-CIFAR: the README's command and the main.py defaults (ab9043e) it runs with.
VIT_CIFAR = "python main.py --dataset c10 --label-smoothing --autoaugment"
VIT_CIFAR_DEFAULTS = {"--model-name": "vit", "--patch": "8", "--num-layers": "7", "--hidden": "384", "--head": "12",
                      "--mlp-hidden": "384", "--dropout": "0.0", "--batch-size": "128", "--eval-batch-size": "1024",
                      "--lr": "1e-3", "--min-lr": "1e-5", "--beta1": "0.9", "--beta2": "0.999",
                      "--weight-decay": "5e-5", "--max-epochs": "200", "--warmup-epoch": "5", "--precision": "16",
                      "--smoothing": "0.1", "--seed": "42", "--mixup": None, "--cutmix": None}  # fmt: skip


def _flags(command: str) -> dict[str, Optional[str]]:
    """``--flag value`` pairs of a command line; a switch (no value) maps to None."""
    tokens = [t for t in shlex.split(command) if t.startswith("-") or not t.endswith((".py", "torchrun", "python"))]
    flags: dict[str, Optional[str]] = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            name, _, value = token.partition("=")
            following = tokens[i + 1] if i + 1 < len(tokens) else "--"
            flags[name] = value or (None if following.startswith("--") else following)
    return flags


REFERENCES = {
    "recipes/configs/resnet50_imagenet.yaml": {**TORCHVISION_DEFAULTS, "--momentum": "0.9", "--opt": "sgd",
                                               "--bias-weight-decay": None, **_flags(RESNET50_V2)},
    "recipes/configs/vit_b16_imagenet.yaml": {**TORCHVISION_DEFAULTS, **VIT_B16_DEFAULTS, **_flags(VIT_B16)},
    "recipes/configs/resnet18_cifar10.yaml": KUANGLIU,
    "recipes/configs/vit_cifar10.yaml": {**VIT_CIFAR_DEFAULTS, **_flags(VIT_CIFAR)},
}
# The sharded ViT-B/16 configs carry the card's values but for what their headers explain: FSDP2 runs bf16-mixed
# (Lightning refuses 16-mixed with ModelParallelStrategy), FSDP1 has no EMA (refused on its flat parameters).
VARIANTS = {
    "recipes/configs/vit_b16_imagenet_fsdp.yaml": ("trainer.strategy", "trainer.callbacks[ExponentialMovingAverage]"),
    "recipes/configs/vit_b16_imagenet_fsdp2.yaml": ("trainer.strategy", "trainer.precision"),
}
_MISSING = object()


def cards(text: str = README) -> dict[str, list[list[str]]]:
    """``{config path: rows}`` of every card in ``text``; a row is its four cells."""
    found: dict[str, list[list[str]]] = {}
    for section in re.split(r"^(?=#{2,3} )", text, flags=re.M):
        heading = re.match(r"### `(recipes/configs/[\w.-]+\.yaml)`", section)
        if not heading:
            continue
        assert heading.group(1) not in found, f"two cards for {heading.group(1)}"
        lines = [line for line in section.splitlines() if line.startswith("|")]
        assert lines[0] == "| published flag or hyperparameter | value in the reference | value in our config | where it lives |"
        assert set(lines[1]) <= {"|", "-"}, lines[1]
        found[heading.group(1)] = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]
    return found


def literal(cell: str) -> Optional[str]:
    """The first backticked literal of a cell, or None."""
    match = re.search(r"`([^`]*)`", cell)
    return match.group(1) if match else None


def resolve(config: dict[str, Any], key: str) -> Any:
    """The value at ``key`` (dotted; ``callbacks[Class]`` picks the callback whose class_path ends in ``.Class``)."""
    node: Any = config
    for part in key.split("."):
        name, _, selector = part.partition("[")
        if not isinstance(node, dict) or name not in node:
            return _MISSING
        node = node[name]
        if selector:
            matches = [c for c in node or [] if c["class_path"].endswith("." + selector.rstrip("]"))]
            if len(matches) != 1:
                return _MISSING
            node = matches[0]
    return node


def normalized(value: Any) -> Any:
    """Numbers as floats (YAML reads ``5e-4`` as a string, ``5.0e-4`` as a float), strings lower-cased."""
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        return str(value).lower()


def card_value(cell: str) -> Any:
    text = literal(cell)
    assert text is not None, f"no backticked value in {cell!r}"
    return normalized(yaml.safe_load(text))


def _load(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())


def test_every_real_scale_config_has_one_card():
    assert set(cards()) == set(REFERENCES)


@pytest.mark.parametrize("path", sorted(REFERENCES))
def test_every_row_is_the_configs_value_at_its_key(path):
    config = _load(path)
    rows = cards()[path]
    assert len(rows) >= 20
    for flag, reference, ours, where in rows:
        assert flag and reference, f"{path}: an empty cell in the row {flag!r}"
        key = literal(where)
        assert key, f"{path}: row {flag!r} names no key"
        value = resolve(config, key)
        assert value is not _MISSING, f"{path}: row {flag!r} names {key}, which the config does not set"
        assert normalized(value) == card_value(ours), f"{path}: {key} is {value!r}, the card says {ours!r}"


@pytest.mark.parametrize("path", sorted(REFERENCES))
def test_every_reference_flag_has_a_row_with_the_references_value(path):
    rows = cards()[path]
    by_flag: dict[str, list[Any]] = {}
    for flag, reference, _, _ in rows:
        text = literal(reference)
        by_flag.setdefault(literal(flag), []).append(None if text is None else normalized(yaml.safe_load(text)))
    missing = sorted(set(REFERENCES[path]) - set(by_flag))
    assert not missing, f"{path}: the card has no row for {missing}"
    for flag, value in REFERENCES[path].items():
        if value is not None:
            expected = normalized(yaml.safe_load(value))
            assert expected in by_flag[flag], f"{path}: no {flag} row quotes the reference's {value!r}: {by_flag[flag]}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_sharded_vit_b16_configs_carry_the_cards_values(variant):
    config, exceptions = _load(variant), VARIANTS[variant]
    checked = 0
    for flag, _, ours, where in cards()["recipes/configs/vit_b16_imagenet.yaml"]:
        key = literal(where)
        if key.startswith(exceptions):
            continue
        value = resolve(config, key)
        assert value is not _MISSING and normalized(value) == card_value(ours), f"{variant}: {key} is {value!r}, not {ours!r}"
        checked += 1
    assert checked >= 40


def test_a_changed_config_value_or_card_value_is_caught(tmp_path):
    # The checks above against a card and a config that each differ from the shipped ones in one place.
    path = "recipes/configs/resnet50_imagenet.yaml"
    config = _load(path)
    row = next(r for r in cards()[path] if literal(r[3]) == "trainer.callbacks[LRSchedule].init_args.warmup_start_factor")
    assert normalized(resolve(config, literal(row[3]))) == card_value(row[2]) == 0.01
    config["trainer"]["callbacks"][0]["init_args"]["warmup_start_factor"] = 0.1
    assert normalized(resolve(config, literal(row[3]))) != card_value(row[2])
    edited = README.replace("| `--lr-warmup-decay` | `0.01` (default) | `0.01` |", "| `--lr-warmup-decay` | `0.01` (default) | `0.1` |")
    assert edited != README
    (changed,) = [r for r in cards(edited)[path] if literal(r[0]) == "--lr-warmup-decay"]
    assert card_value(changed[2]) != normalized(resolve(_load(path), literal(changed[3])))
    # A key the config does not set, and a callback that is not there, resolve to nothing.
    assert resolve(config, "data.init_args.no_such_option") is _MISSING
    assert resolve(config, "trainer.callbacks[StochasticWeightAveraging].init_args.swa_lrs") is _MISSING


def test_the_reference_commands_parse_into_their_flags():
    assert _flags(RESNET50_V2)["--nproc_per_node"] == "8" and _flags(RESNET50_V2)["--ra-reps"] == "4"
    assert _flags(VIT_B16)["--amp"] is None and _flags(VIT_B16)["--clip-grad-norm"] == "1"
    assert _flags(VIT_CIFAR) == {"--dataset": "c10", "--label-smoothing": None, "--autoaugment": None}
    assert len(_flags(RESNET50_V2)) == 20 and len(_flags(VIT_B16)) == 19
