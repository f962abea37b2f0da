"""The installed import path is namespaced, in editable installs and in wheels alike."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}
    )


def test_namespaced_imports_and_no_bare_top_level_packages(tmp_path):
    # Run from an unrelated folder so that the repository's own top-level folders are not on sys.path.
    probe = _python(
        "import importlib.util as u, lightning_recipes.callbacks, lightning_recipes.datamodules, "
        "lightning_recipes.recipes.vit, lightning_recipes.recipes.resnet; "
        "print([name for name in ('callbacks', 'recipes', 'datamodules') if u.find_spec(name) is not None])",
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", "a bare `import callbacks` (or recipes, datamodules) must not be ours"


@pytest.mark.slow
def test_wheel_installs_namespaced_package_with_configs(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("lightning_recipes-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes/configs").rglob("*.yaml"))
    for path in ["callbacks/__init__.py", "datamodules/digits.py", "recipes/vit.py", "recipes/resnet.py", *configs]:
        assert f"lightning_recipes/{path}" in names
    assert not [n for n in names if n.split("/")[0] in {"callbacks", "recipes", "datamodules", "tests"}]

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    probe = _python(
        "import lightning_recipes.recipes.common as c, lightning_recipes.recipes.vit as v; "
        "print(v.__file__); print((c.CONFIG_DIR / 'vit_digits.yaml').is_file())",
        cwd=tmp_path,
        PYTHONPATH=str(site),
        PYTHONNOUSERSITE="1",
    )
    assert probe.returncode == 0, probe.stderr
    module_file, config_found = probe.stdout.split()
    assert Path(module_file).is_relative_to(site) and config_found == "True"


def test_the_lowest_versions_ci_stage_installs_exactly_the_declared_floors():
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    declared = {}
    for requirement in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)", requirement.split(";")[0].strip()).groups()
        declared[name.lower()] = floor
    pinned = {}
    for line in (root / ".ci/lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name.lower()] = version
    # Every dependency has a floor, and the stage pins each at it (1.24 == 1.24.0).
    assert set(pinned) == set(declared)
    for name, floor in declared.items():
        assert tuple(map(int, pinned[name].split("."))) == tuple(map(int, (floor + ".0.0").split(".")[:3])), name
    run = (root / ".ci/run").read_text()
    assert "pip install -c .ci/lowest.txt -e \".[dev]\"" in run and "python -m pytest -q -n auto --dist loadfile" in run
