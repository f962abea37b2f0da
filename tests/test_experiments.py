"""experiments/: the commands of EXPERIMENTS.md name files that exist and run as written; each experiment at a tiny
size writes its files and measures what it claims to; nothing in the package or the benchmarks imports experiments/.

The experiment scripts are not a package: `python experiments/<name>.py` imports `_common` from its own folder. One
runs here in a subprocess exactly so; the others are imported from that folder, as the script would be, to save the
seconds of a second interpreter importing torch and Lightning.
"""

import ast
import importlib
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_recipes.recipes import compare

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
TINY_VIT = ["--vit-depth", "1", "--vit-width", "32"]
TINY_TRAINING = ["--epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "1"]


def _documented_commands() -> list[list[str]]:
    """Every command line of EXPERIMENTS.md's bash blocks, split as the shell would, comments dropped."""
    text = (ROOT / "EXPERIMENTS.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()]


COMMANDS = _documented_commands()
SCRIPT_COMMANDS = {argv[1]: argv for argv in COMMANDS if argv[1].startswith("experiments/")}
GRID_COMMANDS = [argv for argv in COMMANDS if argv[1:3] == ["recipes/compare.py", "run"]]
LOGS_COMMANDS = [argv for argv in COMMANDS if argv[1:3] == ["recipes/compare.py", "logs"]]


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_every_experiment_file_has_its_command_in_experiments_md_and_every_command_names_one():
    for argv in COMMANDS:
        assert argv[0] == "python" and (argv[1].startswith("experiments/") or argv in GRID_COMMANDS + LOGS_COMMANDS), argv
        if argv[1].startswith("experiments/"):
            # The documented command is the one that wrote the raw file the section quotes (its --out, or
            # docs/experiments/<name> for a command run with the default --out and its result copied there).
            out = _option(argv, "--out") or f"docs/experiments/{Path(argv[1]).stem}"
            assert out.startswith("docs/experiments/"), argv
            assert json.loads((ROOT / out / "result.json").read_text())["command"] == " ".join(argv)
    # A logs command writes its comparison (of a grid's runs) into the docs too.
    assert all((_option(argv, "--out") or "").startswith("docs/experiments/") for argv in LOGS_COMMANDS), LOGS_COMMANDS
    scripts = {p.relative_to(ROOT).as_posix() for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_")}
    grids = {p.relative_to(ROOT).as_posix() for p in EXPERIMENTS.glob("*.yaml")}
    assert set(SCRIPT_COMMANDS) == scripts == {
        "experiments/accumulation.py", "experiments/loss_scaling.py", "experiments/master_weights.py",
        "experiments/lr_find.py", "experiments/token_accumulation.py",
    }
    assert sorted(argv[3] for argv in GRID_COMMANDS) == sorted(grids) and len(grids) == 9
    assert not (ROOT / "recipes/experiments.py").exists() and not (ROOT / "recipes/configs/experiments").exists()


@pytest.mark.parametrize("argv", GRID_COMMANDS, ids=lambda argv: Path(argv[3]).stem)
def test_every_grid_command_plans_one_run_per_variant_and_seed(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the grid path is relative to the repository root, where the command is run
    compare.main([*argv[2:], "--dry-run", "--out", str(tmp_path)])
    grid = yaml.safe_load((ROOT / argv[3]).read_text())
    planned = [line for line in capsys.readouterr().out.splitlines() if " fit --config " in line]
    assert len(planned) == len(grid["variants"]) * len(grid["seeds"]) >= 2
    assert all(f"-m lightning_recipes.recipes.{grid['recipe']} fit" in line for line in planned)


def test_the_experiments_train_the_models_they_were_measured_with_whatever_the_digits_default(monkeypatch):
    """Experiments 1-9 measured a 6-block ViT at AdamW 1e-3, both recipes with torch's default optimizer kernel; the
    digits defaults are tuned apart from them (issue 15)."""
    monkeypatch.chdir(ROOT)
    grids = {argv[3]: yaml.safe_load((ROOT / argv[3]).read_text())["recipe"] for argv in GRID_COMMANDS}
    assert sorted(grids.values()).count("vit") == 4 and sorted(grids.values()).count("resnet") == 3
    for grid, recipe in grids.items():
        if recipe not in ("vit", "resnet"):
            continue
        for variant in compare.load_grid(Path(grid)).variants:
            model = compare.run_config(variant, 0, Path("unused"))["model"]
            assert model["fused"] is False, (grid, variant.name)
            if recipe == "vit":
                assert model["depth"] == 6, (grid, variant.name)
                assert model.get("optimizer") == "sgd" or model["lr"] in (1e-3, 0.01), (grid, variant.name)
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    common = importlib.import_module("_common")
    hparams = common.recipe_model("vit").hparams
    assert {k: hparams[k] for k in ("depth", "lr", "fused")} == {"depth": 6, "lr": 1e-3, "fused": False}
    for recipe in ("vit", "resnet"):
        assert {group["fused"] for group in common.recipe_model(recipe).build_optimizer().param_groups} == {None}


@pytest.fixture
def load(monkeypatch):
    # On sys.path while the test runs, as `python experiments/<name>.py` puts it: the scripts import `_common`.
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    return importlib.import_module


def _check(out: Path, name: str, argv: list[str]) -> dict:
    result = json.loads((out / "result.json").read_text())
    for key in ("date_utc", "cpu", "cpu_cores", "torch", "lightning"):
        assert result["environment"][key]
    assert result["experiment"] == name and result["arguments"]["seed"] == 0
    assert result["command"] == " ".join(["python", f"experiments/{name}.py", *argv])
    return result


def _run(load, name: str, tmp_path: Path, *args: str) -> tuple[Path, dict]:
    """The documented command with ``--out`` and ``args`` added, run by the script's own ``main``."""
    documented = SCRIPT_COMMANDS[f"experiments/{name}.py"]
    out = tmp_path / name
    argv = [*documented[2:], "--out", str(out), *args]
    load(name).main(argv)
    return out, _check(out, name, argv)


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_master_weights_exact_values_and_bf16_runs_as_a_user_runs_it(tmp_path):
    documented = SCRIPT_COMMANDS["experiments/master_weights.py"]
    out = tmp_path / "master_weights"
    argv = [*documented[2:], "--out", str(out), "--starts", "1.0", "1e-4", *TINY_TRAINING, *TINY_VIT]
    process = subprocess.run([sys.executable, documented[1], *argv], capture_output=True, text=True, cwd=ROOT)
    assert process.returncode == 0, process.stderr
    result = _check(out, "master_weights", argv)
    assert _is_png(out / "master_weights.png") and _is_png(out / "master_weights_training.png")
    final = {(r["start"], r["dtype"]): r["final"] for r in result["exact"]}
    # 1.0 + 1e-6, 1000 times: fp16 (spacing 2^-10 at 1.0) and bf16 (2^-7) round every step back to 1.0.
    assert final[(1.0, "float16")] == 1.0 and final[(1.0, "bfloat16")] == 1.0
    assert abs(final[(1.0, "float64")] - 1.001) < 1e-12
    # float32 keeps the updates but not exactly: 1e-6 is 8.39 ulps (2^-23) at 1.0, rounded to 8 at every step.
    assert final[(1.0, "float32")] == 1.0 + 1000 * 8 * 2**-23
    # A float32 master copy keeps the sum; the fp16 copy is 1.001 rounded to fp16: 1 + 2^-10.
    assert final[(1.0, "float16, float32 master")] == 1.0 + 2**-10
    # At 1e-4 fp16's spacing is 2^-24 * 2^0: each update survives, rounded to whole ulps.
    assert final[(1e-4, "float16")] != torch.tensor(1e-4, dtype=torch.float16).item()
    runs = result["runs"]
    assert [runs[p]["parameter_dtype"] for p in ("32-true", "bf16-mixed", "bf16-true")] == [
        "torch.float32", "torch.float32", "torch.bfloat16",
    ]
    assert all(runs[p]["optimizer_steps"] == 3 for p in runs)
    assert "| 1 | float16 | 9.77e-04 | no | 1 |" in process.stdout
    assert f"wrote {out / 'result.json'}" in process.stdout
    # The recipe's warning about bf16-true is what this experiment measures: silenced.
    assert "precision='bf16-true' keeps" not in process.stderr, process.stderr


def test_accumulation_matches_to_rounding_without_batchnorm(load, tmp_path):
    out, result = _run(
        load, "accumulation", tmp_path, "--steps", "2", "--micro-batch", "4", "--k", "2",
        "--variants", "vit-fp32", "vit-fp64", "resnet-bn-fp32", *TINY_VIT,
    )
    assert _is_png(out / "accumulation.png")
    v = {r["variant"]: r for r in result["variants"]}
    assert all(r["same_samples_in_same_order"] and len(r["weights_max_abs_diff_per_step"]) == 2 for r in v.values())
    # float64: k micro-batches give the large batch's weights to the last bits.
    assert v["vit-fp64"]["weights_max_abs_diff"] < 1e-10
    # float32: rounding of the partial sums, far below anything BatchNorm's micro-batch statistics do.
    assert 0 < v["vit-fp32"]["gradient_step1_relative_diff"] < 1e-5
    assert v["resnet-bn-fp32"]["weights_max_abs_diff"] > 1e3 * v["vit-fp32"]["weights_max_abs_diff"]
    assert v["resnet-bn-fp32"]["batchnorm_running_stats_max_abs_diff"] > 0
    assert v["vit-fp32"]["batchnorm_running_stats_max_abs_diff"] is None


def test_loss_scaling_keeps_gradients_that_fp16_flushes(load, tmp_path):
    out, result = _run(load, "loss_scaling", tmp_path, "--probe-size", "16", *TINY_TRAINING, *TINY_VIT)
    assert _is_png(out / "loss_scaling_histogram.png") and _is_png(out / "loss_scaling_training.png")
    runs = result["runs"]
    probes = [result["initial_probe"]] + [
        p for run in runs.values() for p in [run["after_first_step"]] + [e["probe"] for e in run["epochs"]]
    ]
    unscaled = scaled = 0.0
    for probe in probes:
        for kind in ("params", "activations"):
            assert probe["scaled"][kind]["share_zero_in_fp16"] <= probe["unscaled"][kind]["share_zero_in_fp16"]
            unscaled += probe["unscaled"][kind]["share_zero_in_fp16"]
            scaled += probe["scaled"][kind]["share_zero_in_fp16"]
    assert unscaled > scaled  # a few steps in, some gradients underflow unscaled
    dynamic, plain = runs["fp16, dynamic loss scaling"], runs["fp16, no loss scaling"]
    assert dynamic["loss_scaling"] is True and plain["loss_scaling"] is False
    assert math.log2(dynamic["final_loss_scale"]).is_integer() and plain["final_loss_scale"] is None
    assert all(run["optimizer_steps"] == 3 for run in runs.values())


def test_lr_find_suggests_a_learning_rate_and_saves_each_plot(load, tmp_path):
    out, result = _run(
        load, "lr_find", tmp_path, "--num-training", "15", "--batch-size", "16", "--recipes", "vit", "resnet", *TINY_VIT
    )
    r = {x["recipe"]: x for x in result["recipes"]}
    assert (r["vit"]["default_lr"], r["resnet"]["default_lr"]) == (1e-3, 0.1)
    assert (r["vit"]["optimizer"], r["resnet"]["optimizer"]) == ("AdamW", "SGD")
    for recipe in ("vit", "resnet"):
        suggestion = r[recipe]["suggestion"]
        assert isinstance(suggestion, float) and math.isfinite(suggestion) and suggestion > 0
        assert 1e-6 <= suggestion <= 10.0
        assert _is_png(out / f"lr_find_{recipe}.png")
    # torchvision's ViT starts with a zero head: uniform predictions, loss ln 10, unchanged by the first tiny LRs.
    # Lightning records about half of it at the first point; the corrected curve starts at ln 10.
    vit = r["vit"]
    assert vit["smoothed_losses_lightning"][0] == pytest.approx(math.log(10) / 1.98, rel=1e-4)
    assert vit["smoothed_losses_corrected"][0] == pytest.approx(math.log(10), rel=1e-4)


def test_invalid_sizes_are_refused_by_the_command_line(load, tmp_path, capsys):
    accumulation = load("accumulation")
    with pytest.raises(SystemExit):
        accumulation.main(["--out", str(tmp_path), "--steps", "0"])
    err = capsys.readouterr().err
    assert err.startswith("usage: python experiments/accumulation.py") and "must be an integer >= 1, got '0'" in err
    with pytest.raises(SystemExit):
        accumulation.main(["--out", str(tmp_path), "--variants", "vit-fp16"])
    assert "invalid choice: 'vit-fp16'" in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()


# ---------------------------------------------------------------- the import graph: experiments use, nothing uses them

EXPERIMENT_MODULES = {p.stem for p in EXPERIMENTS.glob("*.py")}  # `python experiments/x.py` makes them top-level


def _imports_of_experiments(source: str, package: str) -> list[str]:
    """The imports in ``source`` (a module of ``package``) that would load a file of experiments/."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the installed package, lightning_recipes.<package>
                parent = ["lightning_recipes", package][: max(0, 2 - node.level + 1)]
                base = ".".join([*parent, *([base] if base else [])])
            modules = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] in EXPERIMENT_MODULES | {"experiments"} or "experiments" in parts:
                found.append(f"line {node.lineno}: {module}")
    return found


def test_the_import_graph_detector_sees_every_way_to_import_an_experiment():
    for source in ("import experiments", "from experiments import lr_find", "import experiments.lr_find as x",
                   "from _common import markdown", "import accumulation", "from lightning_recipes import experiments",
                   "from .. import experiments", "from ..experiments import lr_find"):
        assert _imports_of_experiments(source, "recipes"), source
    for source in ("from lightning_recipes.recipes import compare", "from . import common", "import report"):
        assert not _imports_of_experiments(source, "recipes"), source


@pytest.mark.parametrize("folder", ["recipes", "callbacks", "datamodules", "benchmarks"])
def test_nothing_in_the_package_or_the_benchmarks_imports_an_experiment(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    offending = {
        str(f.relative_to(ROOT)): found
        for f in files
        if (found := _imports_of_experiments(f.read_text(), folder))
    }
    assert not offending, offending
    assert importlib.util.find_spec("lightning_recipes.recipes.experiments") is None


def test_the_experiments_use_the_installed_package_and_their_own_common_module_only():
    repository_folders = {p.name for p in ROOT.iterdir() if p.is_dir()} | {"report", "data_fakes"}
    for script in sorted(EXPERIMENTS.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{script.name}: relative import (the folder is not a package)"
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in repository_folders and top not in EXPERIMENT_MODULES - {"_common"}, (
                    f"{script.name} line {node.lineno}: import {module}; use lightning_recipes.* or _common"
                )


#: EXPERIMENTS.md sections whose tables are pasted from the files their command wrote (issue 17: a raw file behind
#: every number): each table of the section must appear, line for line, in one of those files (all of its rows, or
#: its header and some of its rows, in their order).
RAW_TABLES = {
    "1. ": ("docs/experiments/accumulation_1thread/result.json", "docs/experiments/accumulation/result.json"),
    "2. ": ("docs/experiments/loss_scaling/result.json",),
    "3. ": ("docs/experiments/master_weights/result.json",),
    "4. ": ("docs/experiments/warmup_vit/compare.md", "docs/experiments/warmup_resnet/compare.md"),
    "5. ": ("docs/experiments/linear_scaling_resnet/compare.md", "docs/experiments/linear_scaling_resnet_b128/compare.md"),
    "6. ": ("docs/experiments/clipping_vit/compare.md",),
    "7. ": ("docs/experiments/optimizers_vit/compare.md", "docs/experiments/optimizers_vit_patchify/compare.md",
            "docs/experiments/norms_resnet/compare.md"),
    "8. ": ("docs/experiments/schedules_vit/compare.md", "docs/experiments/schedules_vit_vs_constant/compare.md"),
    "9. ": ("docs/experiments/lr_find_1thread/result.json", "docs/experiments/lr_find/result.json"),
    "10. ": ("docs/experiments/gpt_warmup_norm/compare.md",),
    "11. ": ("docs/experiments/gpt_beta2_clipping/compare.md",),
    "12. ": ("docs/experiments/token_accumulation/token_accumulation.md",),
}


def _tables(text: str) -> list[str]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def _raw_text(path: Path) -> str:
    """A compare.md as it is; a script's result.json: the markdown table it wrote into its "table" entry."""
    return json.loads(path.read_text())["table"] if path.suffix == ".json" else path.read_text()


@pytest.mark.parametrize("prefix", sorted(RAW_TABLES))
def test_the_tables_of_a_measured_section_are_the_raw_files_tables(prefix):
    text = (ROOT / "EXPERIMENTS.md").read_text()
    (start,) = [m.start() for m in re.finditer(rf"^## {re.escape(prefix)}", text, flags=re.M)]
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    raw = [t for path in RAW_TABLES[prefix] for t in _tables(_raw_text(ROOT / path))]
    tables = _tables(section)
    assert tables, f"section {prefix!r} has no table"
    for table in tables:
        # The table as written, or its header and some of its rows (a long raw table shortened), rows in order.
        header, rows = table.splitlines()[:2], table.splitlines()[2:]
        sources = [t.splitlines()[2:] for t in raw if t.splitlines()[:2] == header]
        assert any(rows == [r for r in source if r in rows] for source in sources), (
            f"a table of section {prefix!r} is not (a shortening of) a table in {RAW_TABLES[prefix]}:\n{table}")
