"""Every shipped YAML config parses, and trains a few steps with tiny overrides on generated data."""

from pathlib import Path

import pytest

from data_fakes import write_cifar, write_text_folder, write_token_bins, write_tree
from lightning_recipes.recipes.common import CONFIG_DIR
from lightning_recipes.recipes.gpt import main as gpt_main
from lightning_recipes.recipes.resnet import main as resnet_main
from lightning_recipes.recipes.vit import main as vit_main

# Recipe configs only: recipes/configs/experiments/ holds compare.py grids (tests/test_compare.py checks them).
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
MAINS = {"gpt": gpt_main, "resnet": resnet_main, "vit": vit_main}


def _main(config: Path):
    recipe = config.name.split("_")[0].rstrip("0123456789")
    assert recipe in MAINS, f"{config.name}: a config's name starts with the recipe it is for ({sorted(MAINS)})"
    return MAINS[recipe]


def test_the_expected_configs_ship():
    names = {c.name for c in CONFIGS}
    assert {
        "vit_digits.yaml",
        "resnet_digits.yaml",
        "resnet18_cifar10.yaml",
        "vit_cifar10.yaml",
        "resnet50_imagenet.yaml",
        "vit_b16_imagenet.yaml",
        "gpt_stdlib.yaml",
        "gpt_stdlib_long.yaml",
        "gpt2_124m.yaml",
        "gpt2_124m_fsdp2.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(config)(["fit", f"--config={config}", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_recipes.datamodules." in printed


def _data_overrides(config: Path, tmp_path: Path, monkeypatch) -> list[str]:
    text = config.read_text()
    if "CIFAR10DataModule" in text:
        write_cifar(tmp_path / "cifar", monkeypatch)
        return [f"--data.data_dir={tmp_path / 'cifar'}", "--data.batch_size=4", "--data.num_workers=0"]
    if "ImageFolderDataModule" in text:
        # Repeated augmentation needs 256 training images per process (torchvision's RASampler rounds to 256).
        root = write_tree(tmp_path / "images", per_class=(86, 2) if "ra_reps:" in text else (4, 2))
        return [
            f"--data.root={root}",
            "--data.train_crop_size=32",
            "--data.val_resize_size=36",
            "--data.val_crop_size=32",
            "--data.batch_size=4",
            "--data.num_workers=0",
        ]
    if "TextDataModule" in text:
        # Tiny generated text (or tiny token files for the GPU configs), a 1-block model, an 8-byte sample at the end.
        tiny = ["--data.batch_size=2", "--data.context_length=16", "--model.sample_length=8", "--model.depth=1",
                "--model.width=32", "--model.heads=2"]  # fmt: skip
        if "vocab_size:" in text:
            # Two micro-batches per optimizer step: the GPU configs' accumulation to 512 windows, scaled down.
            tiny += ["--trainer.callbacks.global_batch_size=4"]
            return [f"--data.path={write_token_bins(tmp_path / 'tokens')}", "--data.num_workers=0", *tiny]
        return [f"--data.path={write_text_folder(tmp_path / 'text')}", "--data.glob=**/*.txt", *tiny]
    return ["--data.batch_size=8"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_smoke_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = _data_overrides(config, tmp_path, monkeypatch)
    if "patch_size: 16" in config.read_text():
        # ViT-B/16 cut to one block over 4×4 patches of 8 pixels: the rest of the config runs as shipped.
        overrides += ["--model.patch_size=8", "--model.depth=1"]
    run_config = config
    if "warmup_steps: 715" in config.read_text():
        # GPT-2's 715 warmup steps (an absolute count, no command-line flag reaches it in the callback list) cut to 1.
        run_config = tmp_path / config.name
        run_config.write_text(config.read_text().replace("warmup_steps: 715", "warmup_steps: 1"))
    _main(config)(
        [
            "fit",
            f"--config={run_config}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            *overrides,
        ]
    )
    # ModelCheckpoint saves next to the logs; the digits configs' ResumableCheckpoint in <default_root_dir>.
    ckpts = list(tmp_path.glob("runs/*/version_0/checkpoints/last.ckpt")) + list(tmp_path.glob("runs/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 1, "every config saves one last.ckpt, under runs/<name>/"


@pytest.mark.parametrize(
    ("config", "expected"),
    [("vit_cifar10.yaml", "conv_stem: null"), ("resnet18_cifar10.yaml", "stem_stride: 1")],
)
def test_a_config_replaces_the_digits_defaults_instead_of_inheriting_them(config, expected, capsys):
    # The digits defaults (conv stem, stride-2 stem, 16-px inputs) must not leak into other data sets' configs.
    with pytest.raises(SystemExit):
        _main(CONFIG_DIR / config)(["fit", f"--config={CONFIG_DIR / config}", "--print_config"])
    assert f"  {expected}\n" in capsys.readouterr().out
