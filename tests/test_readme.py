"""The README's commands name files that exist, and its fast commands run as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_repository_path_in_the_readme_exists():
    paths = set(re.findall(r"(?:recipes|callbacks|datamodules|benchmarks|experiments|docs|tests)/[\w./-]+\.(?:py|yaml|png|md)", README))
    assert "recipes/vit.py" in paths and "recipes/configs/resnet50_imagenet.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"README names files that do not exist: {missing}"


def _commands(prefix: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip().startswith(prefix)]


def test_lr_preview_command_runs_as_written(tmp_path):
    (command,) = _commands("python -m lightning_recipes.callbacks.lr_schedule")
    argv = shlex.split(command.replace("docs/lr_schedule_preview.png", str(tmp_path / "preview.png")))
    result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "preview.png").stat().st_size > 10_000
    assert re.search(r"^\s+100\s+1\.000000\s+1\.0000e-03$", result.stdout, flags=re.M), result.stdout


@pytest.mark.parametrize("script", ["recipes/vit.py", "recipes/resnet.py"])
def test_print_config_runs_as_written(script):
    result = subprocess.run(
        [sys.executable, script, "fit", "--print_config"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "lightning_recipes.callbacks.LRSchedule" in result.stdout
    assert "lightning_recipes.datamodules.DigitsDataModule" in result.stdout


def test_compare_run_command_names_a_grid_that_plans_its_runs(tmp_path):
    (command,) = _commands("python recipes/compare.py run")
    argv = shlex.split(command)
    result = subprocess.run([sys.executable, *argv[1:], "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    planned = [line for line in result.stdout.splitlines() if "-m lightning_recipes.recipes.vit fit --config" in line]
    assert len(planned) == 12  # schedules_vit: 4 schedules x 3 seeds


def test_image_folder_and_fine_tuning_commands_build_their_run_as_written(tmp_path, monkeypatch):
    """Every README command on ``my_data`` builds its model and data as typed (the digits defaults included, as
    for a user without --config); those with ``--model.weights`` get as far as the torch hub cache."""
    from data_fakes import write_tree

    from lightning_recipes.datamodules.base import ImageClassificationDataModule
    from lightning_recipes.recipes.common import CONFIG_DIR, RecipeCLI
    from lightning_recipes.recipes.resnet import ResNetClassifier
    from lightning_recipes.recipes.vit import ViTClassifier

    recipes = {"recipes/resnet.py": (ResNetClassifier, "resnet_digits.yaml"),
               "recipes/vit.py": (ViTClassifier, "vit_digits.yaml")}  # fmt: skip
    commands = [c for c in _commands("python recipes/") if "--data.root my_data" in c]
    assert len(commands) == 4 and sum("--model.weights" in c for c in commands) == 2, commands
    root = write_tree(tmp_path / "my_data")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    for command in commands:
        _, script, subcommand, *args = shlex.split(command)
        assert subcommand == "fit"
        args = [root if a == "my_data" else a for a in args]
        model_class, defaults = recipes[script]

        def build():
            return RecipeCLI(model_class, ImageClassificationDataModule, subclass_mode_data=True, run=False,
                             auto_configure_optimizers=False, args=args,
                             parser_kwargs={"default_config_files": [str(CONFIG_DIR / defaults)]})  # fmt: skip

        if "--model.weights" in args:
            with pytest.raises(FileNotFoundError, match="is not in the torch hub cache, and the recipes never download"):
                build()
        else:
            cli = build()
            assert cli.datamodule.num_classes == 3 and cli.model.hparams.num_classes == 3
