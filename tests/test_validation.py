"""Bad numbers fail at construction, before anything trains: the message quotes the value, names the option and
says what is allowed. One table per recipe, data module and callback, as a user would type or write them."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from data_fakes import write_tree
from lightning_recipes.callbacks import GradientAccumulation, GradNormMonitor, LRSchedule
from lightning_recipes.datamodules import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule
from lightning_recipes.recipes.common import run_cli
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

REPO = Path(__file__).resolve().parents[1]

# (CLI flag, bad value, the other arguments it needs, message). Values that trained silently before these checks
# are marked "silent"; the others failed later, inside torch or scikit-learn, without naming the option.
VIT = [
    ("--model.depth", 0, {}, r"depth=0 is invalid: a ViT needs at least 1 encoder block \(--model\.depth\)\.$"),  # silent
    ("--model.width", 0, {}, r"width=0 is invalid: the token dimension must be a positive int \(--model\.width\)\.$"),
    ("--model.heads", 0, {}, r"heads=0 is invalid: a block needs at least 1 attention head \(--model\.heads\)\.$"),
    ("--model.patch_size", 0, {}, r"patch_size=0 is invalid: a patch side is a positive int \(--model\.patch_size\)"),
    ("--model.mlp_dim", 0, {}, r"mlp_dim=0 is invalid: a block's MLP needs at least 1 hidden unit \(--model\.mlp_dim\)"),  # silent
    ("--model.conv_stem", [16, 0], {}, r"conv_stem=\[16, 0\] is invalid: every entry is a channel count >= 1 \(--model\.conv_stem\)"),
    ("--model.dropout", 1.0, {}, r"dropout=1\.0 is invalid: it is a probability in \[0, 1\); 1 would drop everything \(--model\.dropout\)"),  # silent
    ("--model.attention_dropout", -0.1, {}, r"attention_dropout=-0\.1 is invalid: it is a probability in \[0, 1\)"),
    ("--model.lr", 0.0, {}, r"lr=0\.0 is invalid: the peak learning rate must be > 0 \(--model\.lr\)"),  # silent
    ("--model.lr", math.nan, {}, r"lr=nan is invalid: the peak learning rate must be > 0 \(--model\.lr\)"),
    ("--model.weight_decay", -0.05, {}, r"weight_decay=-0\.05 is invalid: use a value >= 0 \(0 disables it\) \(--model\.weight_decay\)"),
    ("--model.betas", (0.9, 1.5), {}, r"betas=\(0\.9, 1\.5\) is invalid: give AdamW's 2 decay rates, each in \[0, 1\) \(--model\.betas\)"),
    ("--model.momentum", 1.5, {"optimizer": "sgd"}, r"momentum=1\.5 is invalid: SGD's Nesterov momentum must lie in \(0, 1\) \(--model\.momentum\)"),  # silent
    ("--model.momentum", 0.0, {"optimizer": "sgd"}, r"momentum=0\.0 is invalid: SGD's Nesterov momentum must lie in \(0, 1\)"),
    ("--model.label_smoothing", math.nan, {}, r"label_smoothing=nan is invalid: use a value in \[0, 1\) \(--model\.label_smoothing\)"),
]
RESNET = [
    ("--model.momentum", 1.5, {}, r"momentum=1\.5 is invalid: SGD momentum must lie in \[0, 1\) \(--model\.momentum\)\.$"),  # silent
    ("--model.momentum", 0.0, {}, r"momentum=0\.0 is invalid with nesterov=True: Nesterov momentum must lie in \(0, 1\) \(--model\.momentum\); or set --model\.nesterov false"),
    ("--model.lr", 0.0, {}, r"lr=0\.0 is invalid: the peak learning rate must be > 0 \(--model\.lr\)"),  # silent
    ("--model.weight_decay", -5e-4, {}, r"weight_decay=-0\.0005 is invalid: use a value >= 0 \(0 disables it\) \(--model\.weight_decay\)"),
    ("--model.group_norm_groups", 0, {"norm": "group"}, r"group_norm_groups=0 is invalid: GroupNorm needs at least 1 group \(--model\.group_norm_groups\)"),
    ("--model.label_smoothing", -0.1, {}, r"label_smoothing=-0\.1 is invalid: use a value in \[0, 1\) \(--model\.label_smoothing\)"),
]


def _kwargs(flag: str, value, others: dict) -> dict:
    return {flag.split(".", 1)[1]: value, **others}


@pytest.mark.parametrize(("flag", "value", "others", "message"), VIT, ids=[f"{f}={v}" for f, v, _, _ in VIT])
def test_vit_rejects(flag, value, others, message):
    with pytest.raises(ValueError, match=message):
        ViTClassifier(**_kwargs(flag, value, others))


@pytest.mark.parametrize(("flag", "value", "others", "message"), RESNET, ids=[f"{f}={v}" for f, v, _, _ in RESNET])
def test_resnet_rejects(flag, value, others, message):
    with pytest.raises(ValueError, match=message):
        ResNetClassifier(**_kwargs(flag, value, others))


def test_resnet_plain_sgd_may_have_no_momentum():
    optimizer = ResNetClassifier(momentum=0.0, nesterov=False).build_optimizer()
    assert optimizer.defaults["momentum"] == 0.0


@pytest.mark.parametrize(
    ("main_class", "config", "table"),
    [(ViTClassifier, "vit_digits.yaml", VIT), (ResNetClassifier, "resnet_digits.yaml", RESNET)],
    ids=["vit", "resnet"],
)
def test_every_option_a_message_names_is_a_real_cli_option(main_class, config, table, capsys):
    with pytest.raises(SystemExit):
        run_cli(main_class, config, args=["fit", "--help"])
    usage = capsys.readouterr().out
    for flag, *_ in table:
        assert f"{flag} " in usage


@pytest.mark.parametrize(
    ("main_class", "config", "args", "message"),
    [
        (ViTClassifier, "vit_digits.yaml", ["--model.depth", "0"], r"depth=0 is invalid: a ViT needs at least 1 encoder block \(--model\.depth\)"),
        (ResNetClassifier, "resnet_digits.yaml", ["--model.momentum", "1.5"], r"momentum=1\.5 is invalid: SGD momentum must lie in \[0, 1\) \(--model\.momentum\)"),
        (ViTClassifier, "vit_digits.yaml", ["--data.max_rotation", "400"], r"max_rotation=400\.0 is invalid: the largest rotation must lie in \[0, 180\] degrees \(--data\.max_rotation\)"),
    ],
    ids=["vit-depth", "resnet-momentum", "digits-rotation"],
)
def test_the_command_line_fails_before_training(main_class, config, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_cli(main_class, config, args=["fit", *args])
    assert not any(tmp_path.iterdir())  # no run folder: nothing started


DIGITS = [
    ("--data.batch_size", 0, r"batch_size=0 is invalid: it must be a positive int \(--data\.batch_size\)\.$"),
    ("--data.num_workers", -1, r"num_workers=-1 is invalid: use 0 \(load in the main process\) or a positive int \(--data\.num_workers\)"),
    ("--data.image_size", 0, r"image_size=0 is invalid: it must be a positive int \(--data\.image_size\)"),
    ("--data.max_rotation", 400.0, r"max_rotation=400\.0 is invalid: the largest rotation must lie in \[0, 180\] degrees \(--data\.max_rotation\)"),  # silent
    ("--data.max_translate", 1.5, r"max_translate=1\.5 is invalid: the largest shift is a fraction of the image side, in \[0, 1\] \(--data\.max_translate\)"),
    ("--data.scale", (0.9, math.inf), r"scale=\(0\.9, inf\) is invalid: give \(low, high\) with 0 < low <= high \(--data\.scale\)"),
    ("--data.val_fraction", 1.0, r"val_fraction=1\.0 is invalid: it must lie strictly between 0 and 1 \(--data\.val_fraction\)"),
    ("--data.val_fraction", 0.003, r"val_fraction=0\.003 is invalid: it holds out 6 of the 1,797 images, and each side of the stratified split needs at least 10 \(one per class\): use a value in \[0\.006, 0\.994\] \(--data\.val_fraction\)"),
    ("--data.split_seed", -1, r"split_seed=-1 is invalid: scikit-learn takes a seed in \[0, 2\*\*32 - 1\] \(--data\.split_seed\)"),
]
CIFAR10 = [
    ("--data.random_erasing", 1.5, r"random_erasing=1\.5 is invalid: it is a probability in \[0, 1\] \(0 disables it\) \(--data\.random_erasing\)"),
    ("--data.batch_size", 2.5, r"batch_size=2\.5 is invalid: it must be a positive int \(--data\.batch_size\)"),
]
IMAGE_FOLDER = [
    ("--data.train_crop_size", 0, r"train_crop_size=0 is invalid: it must be a positive int \(--data\.train_crop_size\)"),
    ("--data.val_crop_size", 300, r"val_crop_size=300 is invalid with val_resize_size=256: the crop must not exceed the resized shorter side \(--data\.val_crop_size"),
    ("--data.random_erasing", -0.1, r"random_erasing=-0\.1 is invalid: it is a probability in \[0, 1\]"),
    ("--data.mean", (0.5, math.nan, 0.5), r"mean=\(0\.5, nan, 0\.5\) is invalid: give 3 values, one per RGB channel, all finite \(--data\.mean\)"),  # silent
    ("--data.std", (0.2, math.inf, 0.2), r"std=\(0\.2, inf, 0\.2\) is invalid: give 3 positive values, one per RGB channel \(--data\.std\)"),  # silent
]


@pytest.mark.parametrize(("flag", "value", "message"), DIGITS, ids=[f"{f}={v}" for f, v, _ in DIGITS])
def test_digits_rejects(flag, value, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**_kwargs(flag, value, {}))


@pytest.mark.parametrize(("flag", "value", "message"), CIFAR10, ids=[f"{f}={v}" for f, v, _ in CIFAR10])
def test_cifar10_rejects(flag, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(data_dir=str(tmp_path), **_kwargs(flag, value, {}))


@pytest.mark.parametrize(("flag", "value", "message"), IMAGE_FOLDER, ids=[f"{f}={v}" for f, v, _ in IMAGE_FOLDER])
def test_image_folder_rejects(flag, value, message, tmp_path):
    root = write_tree(tmp_path)
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=root, **_kwargs(flag, value, {}))


def test_digits_split_edges_are_the_ones_the_message_gives():
    for fraction, held_out in ((0.006, 11), (0.994, 1787)):
        dm = DigitsDataModule(val_fraction=fraction)
        dm.setup("fit")
        assert len(dm.val_set) == held_out and len(dm.train_set) == 1797 - held_out


# The callbacks validate their own arguments (each file is copied alone, so each has its own checks); values a
# YAML config or a careless call can produce: bools for ints, NaN and inf for floats.
CALLBACKS = [
    (LRSchedule, {"warmup_steps": -1}, ValueError, r"`warmup_steps` must be an integer >= 0, got -1"),
    (LRSchedule, {"warmup_fraction": 1.0}, ValueError, r"`warmup_fraction` must be a number in \[0, 1\), got 1\.0"),
    (LRSchedule, {"total_steps": True}, ValueError, r"`total_steps` must be an integer >= 1, got True"),
    (LRSchedule, {"warmup_start_factor": math.nan}, ValueError, r"`warmup_start_factor` must be a number in \[0, 1\], got nan"),
    (LRSchedule, {"min_lr_factor": 1.5}, ValueError, r"`min_lr_factor` must be a number in \[0, 1\]"),
    (LRSchedule, {"decay": "polynomial", "power": math.inf}, ValueError, r"`power` must be a number > 0, got inf"),
    (LRSchedule, {"decay": "step", "milestones": [10], "gamma": 1.0}, ValueError, r"`gamma` must be a number in \(0, 1\), got 1\.0"),
    (LRSchedule, {"decay": "cosine_restarts", "period": 0}, ValueError, r"`period` must be an integer >= 1 \(steps per cosine cycle\), got 0"),
    (LRSchedule, {"decay": "cosine_restarts", "period": 5, "period_mult": 0.5}, ValueError, r"`period_mult` must be a number >= 1, got 0\.5"),
    (LRSchedule, {"decay": "wsd", "decay_fraction": 0.0}, ValueError, r"`decay_fraction` must be a number in \(0, 1\], got 0\.0"),
    (LRSchedule, {"reference_batch_size": 0}, ValueError, r"`reference_batch_size` must be an integer >= 1, got 0"),
    (GradNormMonitor, {"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` must be an integer >= 1 or None, got 0"),
    (GradNormMonitor, {"layer_depth": True}, ValueError, r"`layer_depth` must be an integer >= 1 or None, got True"),
    (GradNormMonitor, {"log_param_norm": 1}, TypeError, r"`log_param_norm` must be True or False, got 1"),
    (GradientAccumulation, {"global_batch_size": 32.0}, ValueError, r"`global_batch_size` must be an integer >= 1, got 32\.0"),
    (GradientAccumulation, {"micro_batch_size": -8}, ValueError, r"`micro_batch_size` must be an integer >= 1, got -8"),
    (GradientAccumulation, {"log_every_n_steps": False}, ValueError, r"`log_every_n_steps` must be an integer >= 1, got False"),
    (GradientAccumulation, {"global_batch_size": 32, "schedule": {2: 0}}, ValueError, r"`schedule` must map integer starts >= 1 .* got \{2: 0\}"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "message"), CALLBACKS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _, _ in CALLBACKS]
)
def test_callbacks_reject(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)


BAD_YAML = "model:\n  depth: 2\n  width: [1, 2\ntrainer:\n  max_steps: 1\n"


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "vit.py"), "fit", "--config", "bad.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "error: Problems parsing config file bad.yaml: while parsing a flow sequence" in result.stderr
    assert 'in "bad.yaml", line 3, column 10' in result.stderr and 'in "bad.yaml", line 4, column 8' in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("spelling", [["--config", "{path}"], ["-c", "{path}"], ["--config={path}"]])
def test_every_spelling_of_config_is_checked(spelling, tmp_path, capsys):
    path = tmp_path / "also bad.yaml"
    path.write_text("trainer:\n  max_steps: 1\n model: {}\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ViTClassifier, "vit_digits.yaml", args=["fit", *(a.format(path=path) for a in spelling)])
    assert exit_info.value.code == 2
    assert f'in "{path}", line 3, column 2' in capsys.readouterr().err
