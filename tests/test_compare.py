"""recipes/compare.py: grids run as real short training runs, tables checked number by number, plots written."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from lightning_recipes.datamodules import DigitsDataModule
from lightning_recipes.datamodules.base import ImageClassificationDataModule
from lightning_recipes.recipes import compare
from lightning_recipes.recipes.common import RecipeCLI
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

ROOT = Path(__file__).resolve().parents[1]

PLOTS = {"val_acc_vs_step.png", "val_acc_vs_time.png", "train_loss.png", "lr.png", "grad_norm.png"}
LRSCHEDULE = "lightning_recipes.callbacks.LRSchedule"


def _write_run(folder: Path, acc: list[float], *, steps: int = 30, val_loss: bool = True, start: float = 1000.0):
    """A TensorBoard run as Lightning writes it: step-indexed scalars; wall time = start + step seconds."""
    writer = SummaryWriter(str(folder))
    for step in range(steps):
        writer.add_scalar("train/loss", 2.0 - step / steps, step, walltime=start + step)
        writer.add_scalar("lr/decay", 0.1, step, walltime=start + step)
        writer.add_scalar("grad_norm/total", 1.0, step, walltime=start + step)
    for epoch, value in enumerate(acc):
        step = 10 * epoch + 9
        writer.add_scalar("val/acc", value, step, walltime=start + step)
        if val_loss:
            writer.add_scalar("val/loss", 1.0 - value, step, walltime=start + step)
    writer.add_scalar("train/device/samples_per_sec", 100.0, steps - 1, walltime=start + steps - 1)
    writer.close()


def _row(markdown: str, variant: str) -> list[str]:
    # The main table's row: the first (the spikes table below it has a row per variant too).
    line = [line for line in markdown.splitlines() if line.startswith(f"| {variant} |")][0]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_logs_table_aggregates_seeds_exactly_and_reports_short_and_incomplete_runs(tmp_path):
    _write_run(tmp_path / "a" / "seed0", [0.5, 0.8, 0.9])
    _write_run(tmp_path / "a" / "seed1", [0.6, 0.7, 0.95])
    _write_run(tmp_path / "b" / "seed0", [0.4, 0.5, 0.6])
    _write_run(tmp_path / "b" / "seed1", [0.3, 0.85], steps=20, val_loss=False)  # stopped early, no val/loss

    document = compare.main(["logs", str(tmp_path / "a"), str(tmp_path / "b"), "--names", "adamw", "sgd",
                             "--target-acc", "0.8", "--out", str(tmp_path / "out")])

    header = [c.strip() for c in document.splitlines()[2].strip("|").split("|")]
    assert header[6:8] == ["steps to 80%", "seconds to 80%"]
    # final 0.9 / 0.95: mean 92.50, sample std 3.54; target 0.8 reached after steps 20 and 30 (19 and 29 s).
    assert _row(document, "adamw") == [
        "adamw", "2", "92.50 ± 3.54", "92.50 ± 3.54", "0.075 ± 0.035", "30", "25 ± 7", "24 ± 7", "100 ± 0", "—", "29 ± 0"
    ]
    # sgd: final 0.6 and 0.85 over runs of 30 and 20 steps; only seed1 reaches 0.8; val/loss from one run only.
    assert _row(document, "sgd") == [
        "sgd", "2", "72.50 ± 17.68", "72.50 ± 17.68", "0.400 (1/2)", "20–30 (differ)", "20 (1/2 reached)",
        "19 (1/2 reached)", "100 ± 0", "—", "24 ± 7",
    ]
    assert "- sgd: runs of different lengths (seed0 30, seed1 20 optimizer steps)" in document
    assert "- sgd/seed1: logged no final_val_loss, peak_memory_mb." in document
    figures = json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]
    assert [(f["variant"], f["run"], f["steps_to_target"]) for f in figures] == [
        ("adamw", "seed0", 20), ("adamw", "seed1", 30), ("sgd", "seed0", None), ("sgd", "seed1", 20)
    ]
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == PLOTS
    assert (tmp_path / "out" / "compare.md").read_text() == document


def test_no_timing_leaves_out_every_wall_clock_figure_and_keeps_the_rest(tmp_path):
    _write_run(tmp_path / "a" / "seed0", [0.5, 0.8, 0.9])
    _write_run(tmp_path / "a" / "seed1", [0.6, 0.7, 0.95])
    _write_run(tmp_path / "b" / "seed0", [0.4, 0.85, 0.6], start=5000.0)
    _write_run(tmp_path / "b" / "seed1", [0.3, 0.9, 0.7], start=9000.0)
    out = tmp_path / "out"
    document = compare.main(["logs", str(tmp_path / "a"), str(tmp_path / "b"), "--target-acc", "0.8", "--no-timing",
                             "--out", str(out)])
    header = next(line for line in document.splitlines() if line.startswith("| variant"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "variant", "runs", "final val/acc %", "best val/acc %", "final val/loss", "optimizer steps", "steps to 80%",
        "peak memory MB"]
    # The same figures as with timing, less the three wall-clock cells (the first test's row for the same runs).
    assert _row(document, "a") == ["a", "2", "92.50 ± 3.54", "92.50 ± 3.54", "0.075 ± 0.035", "30", "25 ± 7", "—"]
    assert "seconds to" not in document and "samples_per_sec" not in document
    assert document.splitlines()[2] == "Measured: wall-clock figures left out (--no-timing: other jobs shared the machine)."
    saved = json.loads((out / "compare.json").read_text())
    assert saved["timing"] is False and {c["figure"] for c in saved["statistics"]["comparisons"]} == {
        "final_val_acc", "steps_to_target"}
    assert {p.name for p in out.glob("*.png")} == PLOTS - {"val_acc_vs_time.png"}


def test_logs_rejects_a_folder_without_runs_and_mismatched_names(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no TensorBoard event files .* under .*empty"):
        compare.main(["logs", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        compare.main(["logs", str(tmp_path / "empty"), "--names", "x", "y"])
    assert "--names ['x', 'y'] must give one distinct name per folder (1 folders)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["logs", str(tmp_path / "empty"), "--target-acc", "95"])
    assert "--target-acc 95.0 must be a fraction in (0, 1]" in capsys.readouterr().err


def test_merge_updates_removes_and_appends_callbacks_by_class_path():
    config = {
        "model": {"lr": 0.1, "depth": 2},
        "trainer": {"max_epochs": 5, "callbacks": [
            {"class_path": LRSCHEDULE, "init_args": {"decay": "cosine", "warmup_fraction": 0.1}},
            {"class_path": "lightning_recipes.callbacks.GradNormMonitor"},
        ]},
    }
    merged = compare.merge(config, {
        "model": {"lr": 0.5},
        "trainer": {"callbacks": [
            {"class_path": LRSCHEDULE, "init_args": {"warmup_fraction": 0.0}},
            {"class_path": "lightning_recipes.callbacks.GradNormMonitor", "remove": True},
            {"class_path": "x.New", "init_args": {"a": 1}},
        ]},
    })
    assert merged == {
        "model": {"lr": 0.5, "depth": 2},
        "trainer": {"max_epochs": 5, "callbacks": [
            {"class_path": LRSCHEDULE, "init_args": {"decay": "cosine", "warmup_fraction": 0.0}},
            {"class_path": "x.New", "init_args": {"a": 1}},
        ]},
    }
    assert config["model"]["lr"] == 0.1  # the input is left alone
    with pytest.raises(ValueError, match="remove: true for x.Missing, which the config's callbacks do not have"):
        compare.merge(config, {"trainer": {"callbacks": [{"class_path": "x.Missing", "remove": True}]}})
    with pytest.raises(ValueError, match=r"unknown keys \['patience'\]; use init_args or remove"):
        compare.merge(config, {"trainer": {"callbacks": [{"class_path": LRSCHEDULE, "patience": 3}]}})
    with pytest.raises(ValueError, match="must be a list of mappings with a class_path"):
        compare.merge(config, {"trainer": {"callbacks": {"class_path": LRSCHEDULE}}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"variants": {"a": {}}, "recipe": "mlp"}, r"variant 'a' has recipe='mlp'; choose one of \['gpt', 'resnet', 'vit'\]"),
        ({"variants": {"a": {}}, "recipe": "vit", "seeds": []}, r"seeds=\[\] must be a non-empty list of integers"),
        ({"variants": {"a": {}}, "recipe": "vit", "target_acc": 95}, r"target_acc=95 must be a fraction in \(0, 1\]"),
        ({"variants": {}, "recipe": "vit"}, "variants must be a mapping of name -> overrides"),
        ({"variants": {"a": {}}, "recipe": "vit", "epochs": 3}, r"unknown top-level keys \['epochs'\]"),
        ({"variants": {"a b": {}}, "recipe": "vit"}, "variant name 'a b' must be letters, digits, '_', '-' or '.'"),
        ({"variants": {"a": {"config": "nope.yaml"}}, "recipe": "vit"}, "variant 'a' config='nope.yaml' is neither a file nor in"),
    ],
)
def test_grid_errors_name_the_file_and_the_key(tmp_path, spec, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        compare.load_grid(path)


def test_run_grid_trains_real_runs_and_the_table_reads_what_they_logged(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "recipe": "vit",
        "seeds": [3],
        "target_acc": 0.2,
        "base": {"trainer": {"max_epochs": 2, "limit_train_batches": 12, "log_every_n_steps": 2},
                 "model": {"depth": 1, "width": 32, "heads": 2, "mlp_dim": 64}},
        "variants": {
            "warmup": {},
            "no_warmup": {"trainer": {"callbacks": [{"class_path": LRSCHEDULE, "init_args": {"warmup_fraction": 0.0}}]}},
            "broken": {"model": {"heads": 3}},
        },
    }))
    out = tmp_path / "out"
    document = compare.main(["run", str(grid), "--out", str(out)])

    config = yaml.safe_load((out / "no_warmup" / "seed_3" / "config.yaml").read_text())
    assert config["seed_everything"] == 3
    callbacks = {c["class_path"]: c.get("init_args") for c in config["trainer"]["callbacks"]}
    assert callbacks[LRSCHEDULE] == {"decay": "cosine", "warmup_fraction": 0.0}
    assert compare.RUN_STATS in callbacks
    for variant in ("warmup", "no_warmup"):
        row = _row(document, variant)
        assert row[1] == "1" and row[5] == "24"  # one run; 2 epochs × 12 batches = 24 optimizer steps
        assert row[8] != "—" and row[9] != "—"  # RunStats logged samples/s and peak memory
    assert _row(document, "broken")[:3] == ["broken", "1 (1 crashed)", "—"]
    assert "broken/seed_3: crashed with exit code 1: 'ValueError: heads=3 does not divide width=32" in document
    assert {p.name for p in out.glob("*.png")} == PLOTS

    # The table's final accuracy is the final weights' accuracy: re-validate the run's last checkpoint.
    figures = {f["variant"]: f for f in json.loads((out / "compare.json").read_text())["runs"]}
    model = ViTClassifier.load_from_checkpoint(out / "warmup" / "seed_3" / "checkpoints" / "last.ckpt")
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(model, datamodule=DigitsDataModule(image_size=16), verbose=False)
    assert figures["warmup"]["final_val_acc"] == pytest.approx(result["val/acc"], abs=1e-7)  # TensorBoard stores fp32
    assert figures["warmup"]["final_val_acc"] != figures["no_warmup"]["final_val_acc"] or (
        figures["warmup"]["final_val_loss"] != figures["no_warmup"]["final_val_loss"]
    )

    # How the runs were measured: the commit of the recipes that ran, torch's threads, the load around each run.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for f in figures.values():
        assert f["commit"].split("+")[0] == head and f["torch_threads"] == torch.get_num_threads()
        assert f["load_average_1m_at_start"] >= 0 and f["load_average_1m_at_end"] >= 0
    measured = next(line for line in document.splitlines() if line.startswith("Measured: "))
    assert f"commit {head[:12]}" in measured and f"{torch.get_num_threads()} torch thread(s) per run" in measured

    # Running the grid again keeps finished runs instead of training them again.
    capsys.readouterr()
    stamp = (out / "warmup" / "seed_3" / "run.json").stat().st_mtime_ns
    compare.main(["run", str(grid), "--out", str(out), "--variants", "warmup"])
    assert "warmup seed 3: finished before, kept" in capsys.readouterr().out
    assert (out / "warmup" / "seed_3" / "run.json").stat().st_mtime_ns == stamp


GRIDS = sorted((ROOT / "experiments").glob("*.yaml"))
MODELS = {"vit": ViTClassifier, "resnet": ResNetClassifier}


def _recipe_classes(recipe):
    if recipe == "gpt":
        from lightning_recipes.datamodules.text import TextDataModule
        from lightning_recipes.recipes.gpt import GPT

        return GPT, TextDataModule
    return MODELS[recipe], ImageClassificationDataModule


def test_the_experiment_grids_ship():
    assert len(GRIDS) >= 7, [g.name for g in GRIDS]


@pytest.mark.parametrize("grid_file", GRIDS, ids=lambda g: g.stem)
def test_every_experiment_variant_builds_its_model_data_and_trainer(grid_file, tmp_path):
    grid = compare.load_grid(grid_file)
    assert len(grid.variants) >= 2 and grid.seeds
    for variant in grid.variants:
        config = compare.run_config(variant, grid.seeds[0], tmp_path / variant.name)
        path = tmp_path / f"{variant.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        # Instantiates everything the run would (model, data, trainer, callbacks, strategy, precision), trains nothing.
        model_class, data_class = _recipe_classes(variant.recipe)
        cli = RecipeCLI(
            model_class, data_class, subclass_mode_data=True, run=False,
            auto_configure_optimizers=False, args=["--config", str(path)],
        )
        assert cli.trainer.default_root_dir == str(tmp_path / variant.name)


# ------------------------------------------------------------------------------------- any metric, language models


def _write_lm_run(folder: Path, bpb: list[float], tokens_per_sec: float, *, steps: int = 30, start: float = 1000.0):
    """A language-model run as the GPT recipe logs it: val/bpb and val/loss (nats) per validation, tokens/s."""
    writer = SummaryWriter(str(folder))
    for step in range(steps):
        writer.add_scalar("train/loss", 2.0 - step / steps, step, walltime=start + step)
        writer.add_scalar("train/tokens_per_sec", tokens_per_sec, step, walltime=start + step)
        writer.add_scalar("lr/decay", 0.1, step, walltime=start + step)
    for epoch, value in enumerate(bpb):
        step = 10 * epoch + 9
        writer.add_scalar("val/bpb", value, step, walltime=start + step)
        writer.add_scalar("val/loss", value * 0.6931471805599453, step, walltime=start + step)
    writer.close()


def test_logs_ranks_by_any_metric_smaller_is_better_and_reports_tokens_per_sec(tmp_path):
    _write_lm_run(tmp_path / "a" / "seed0", [3.0, 2.0, 2.1], 1000.0)  # best 2.0 is not the final 2.1
    _write_lm_run(tmp_path / "a" / "seed1", [3.2, 2.6, 2.3], 1200.0)
    _write_lm_run(tmp_path / "b" / "seed0", [3.5, 3.0, 2.8], 900.0)
    document = compare.main(["logs", str(tmp_path / "a"), str(tmp_path / "b"), "--metric", "val/bpb", "--mode", "min",
                             "--target", "2.5", "--out", str(tmp_path / "out")])

    header = [c.strip() for c in document.splitlines()[2].strip("|").split("|")]
    assert header[2:4] == ["final val/bpb", "best val/bpb"] and header[6:9] == ["steps to 2.5", "seconds to 2.5", "tokens/s"]
    # final 2.1 / 2.3: mean 2.200, std 0.141; best (the minimum) 2.0 / 2.3: 2.150 ± 0.212; val/loss = bpb x ln 2;
    # below 2.5 first at steps 20 (19 s) and 30 (29 s); tokens/s 1000 and 1200.
    assert _row(document, "a") == [
        "a", "2", "2.200 ± 0.141", "2.150 ± 0.212", "1.525 ± 0.098", "30", "25 ± 7", "24 ± 7", "1100 ± 141", "—", "29 ± 0"
    ]
    assert _row(document, "b")[2:9] == ["2.800", "2.800", "1.941", "30", "not reached", "not reached", "900"]
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert (result["metric"], result["mode"], result["target"]) == ("val/bpb", "min", 2.5)
    assert [f["best_val_bpb"] for f in result["runs"]] == pytest.approx([2.0, 2.3, 2.8])
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {"val_bpb_vs_step.png", "val_bpb_vs_time.png",
                                                                   "train_loss.png", "lr.png"}


def test_a_smaller_is_better_metric_needs_an_explicit_mode(tmp_path, capsys):
    _write_lm_run(tmp_path / "a" / "seed0", [3.0], 1000.0)
    with pytest.raises(SystemExit):
        compare.main(["logs", str(tmp_path / "a"), "--metric", "val/bpb"])
    assert "--metric val/bpb: smaller is better for it, but --mode defaults to max; pass --mode min" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["logs", str(tmp_path / "a"), "--metric", "val/bpb", "--mode", "min", "--target-acc", "0.9"])
    assert "--target-acc is the target of --metric val/acc" in capsys.readouterr().err
    # --mode max on purpose: the largest value ranks first, and "reached" means at or above the target.
    document = compare.main(["logs", str(tmp_path / "a"), "--metric", "val/bpb", "--mode", "max", "--target", "2.5",
                             "--out", str(tmp_path / "out")])
    assert _row(document, "a")[6] == "10"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"mode": "lowest"}, r"mode='lowest' must be 'min' \(smaller is better\) or 'max'"),
        ({"metric": "val/bpb", "target_acc": 0.9}, r"target_acc is for metric val/acc, not val/bpb: use target"),
        ({"metric": "val/bpb", "target": "low"}, r"target='low' must be a number in val/bpb's units"),
    ],
)
def test_grid_metric_errors_name_the_file_and_the_key(tmp_path, spec, message):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"recipe": "gpt", "variants": {"a": {}}, **spec}))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        compare.load_grid(path)


def test_a_gpt_grid_runs_real_runs_and_ranks_them_by_val_bpb(tmp_path):
    from data_fakes import write_text_folder

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "recipe": "gpt", "seeds": [0], "metric": "val/bpb", "mode": "min", "target": 100.0,
        "base": {"trainer": {"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1},
                 "model": {"depth": 1, "width": 32, "heads": 2, "sample_length": 0},
                 "data": {"init_args": {"path": write_text_folder(tmp_path / "text"), "context_length": 16, "batch_size": 4}}},
        "variants": {"pre_ln": {}, "post_ln": {"model": {"norm_first": False}}},
    }))
    out = tmp_path / "out"
    document = compare.main(["run", str(grid), "--out", str(out)])
    for variant in ("pre_ln", "post_ln"):
        row = _row(document, variant)
        assert row[:2] == [variant, "1"] and row[5] == "4"  # 4 optimizer steps
        assert 0 < float(row[2]) < 9 and float(row[3]) <= float(row[2])  # bits per byte; best = the smallest
        assert row[6] == "2"  # below 100 bits at the first validation, step 2 (min mode: "reached" is <=)
        assert row[8] not in ("—", "0")  # the tokens/s column
    assert "tokens/s" in next(line for line in document.splitlines() if line.startswith("| variant"))
    config = yaml.safe_load((out / "post_ln" / "seed_0" / "config.yaml").read_text())
    assert config["model"]["norm_first"] is False and config["data"]["class_path"].endswith("TextDataModule")


def test_spikes_are_values_above_one_and_a_half_times_the_running_median_and_the_table_lists_them(tmp_path):
    assert compare.count_spikes([1.0] * 10) == 0
    # Index 6: 1.6 > 1.5 x median(1.0 ...); index 7: 1.4 is not; index 8: nan counts; the first 5 have no verdict.
    assert compare.count_spikes([9.0, 1, 1, 1, 1, 1, 1.6, 1.4, math.nan, 1.0]) == 2
    # The median over the previous 25 values only: a level that stays high stops counting once it is the median.
    values = [1.0] * 30 + [2.0] * 30
    assert compare.count_spikes(values) == 13  # steps 30..42, until 2.0 fills more than half of the window
    for seed, spike in enumerate((False, True)):
        writer = SummaryWriter(str(tmp_path / "v" / f"seed{seed}"))
        for step in range(20):
            loss = 5.0 if spike and step == 12 else 2.0
            writer.add_scalar("train/loss", loss, step, walltime=1000 + step)
            writer.add_scalar("grad_norm/total", 3.0 * loss, step, walltime=1000 + step)
        writer.add_scalar("val/acc", 0.5, 19, walltime=1019)
        writer.close()
    document = compare.main(["logs", str(tmp_path / "v"), "--out", str(tmp_path / "out")])
    # Run by run: 0 then 1 spike in both series; the largest pre-clip norm 6 and 15.
    assert "| v | 20/20 | 0/1 | 0/1 | 10.50 ± 6.36 |" in document
    figures = json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]
    assert [(f["loss_spikes"], f["grad_norm_spikes"], f["max_grad_norm"]) for f in figures] == [(0, 0, 6.0), (1, 1, 15.0)]


# ------------------------------------------------------------------------------------------- statistics (Welch's t)


def _t_two_sided_p(t: float, df: float, steps: int = 20_000) -> float:
    """2 P(T_df > |t|) by Simpson's rule on Student's t density: a computation by hand, independent of scipy."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = [math.exp(log_c - (df + 1) / 2 * math.log1p((abs(t) * i / steps) ** 2 / df)) for i in range(steps + 1)]
    inside = abs(t) / steps / 3 * sum(d * (1 if i in (0, steps) else 4 if i % 2 else 2) for i, d in enumerate(density))
    return 1 - 2 * inside


def test_welch_equals_scipy_and_the_hand_computation():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    result = compare.welch(a, b)
    # By hand: means 2 and 5, sample variances 1 and 20/3; se^2 = 1/3 + (20/3)/4 = 2, so t = -3 / sqrt(2), and
    # df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 216/53.
    assert result["difference"] == -3.0
    assert result["t"] == pytest.approx(-3 / math.sqrt(2), rel=1e-14)
    assert result["df"] == pytest.approx(216 / 53, rel=1e-14)
    assert result["p"] == pytest.approx(_t_two_sided_p(3 / math.sqrt(2), 216 / 53), abs=1e-9)
    assert result["p"] == pytest.approx(0.09991286431180087, rel=1e-9)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert (result["t"], result["p"]) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-12)
    # The 95 % interval is -3 ± q sqrt(2) where 2 P(T_216/53 > q) = 0.05, i.e. the shifts of a at which Welch's
    # test has p = 0.05 exactly (the interval is the set of differences the test does not reject).
    half = (result["ci_high"] - result["ci_low"]) / 2
    assert (result["ci_low"] + result["ci_high"]) / 2 == pytest.approx(-3.0, rel=1e-14)
    assert _t_two_sided_p(half / math.sqrt(2), 216 / 53) == pytest.approx(0.05, abs=1e-9)
    for bound in (result["ci_low"], result["ci_high"]):
        assert stats.ttest_ind([x - bound for x in a], b, equal_var=False).pvalue == pytest.approx(0.05, rel=1e-9)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((-6.897975451083128, 0.8979754510831279), rel=1e-9)
    if hasattr(reference, "df"):  # scipy >= 1.11 returns df and the interval too
        interval = reference.confidence_interval(0.95)
        assert (result["df"], result["ci_low"], result["ci_high"]) == pytest.approx(
            (reference.df, interval.low, interval.high), rel=1e-12)
    # Undefined, not made up: one value in an arm, or no spread in either.
    assert compare.welch([1.0], [2.0, 3.0]) == {"difference": -1.5, "t": None, "df": None, "p": None,
                                                "ci_low": None, "ci_high": None}
    assert compare.welch([1.0, 1.0], [2.0, 2.0])["t"] is None


def _figure(variant, run, final, *, steps=None, seconds=None, returncode=0, key="final_val_acc"):
    return {"variant": variant, "run": run, "returncode": returncode, key: final,
            "steps_to_target": steps, "seconds_to_target": seconds}


def _verdicts(figures, goal=None, baseline=None):
    stats = compare.comparisons(figures, goal or compare.Goal(), baseline)
    return [(c["variant"], c["figure"], c["verdict"]) for c in stats["comparisons"]]


def test_the_verdict_follows_the_stated_rule():
    figures = [
        *(_figure("base", f"s{i}", v, steps=s, seconds=10.0 * s)
          for i, (v, s) in enumerate([(0.2, 10), (0.4, 20), (0.6, 30), (0.8, 40)])),
        *(_figure("worse", f"s{i}", v, steps=s, seconds=10.0 * s)
          for i, (v, s) in enumerate([(0.1, 10), (0.2, 20), (0.3, 40)])),
        *(_figure("much_worse", f"s{i}", v, steps=None) for i, v in enumerate([0.01, 0.02, 0.03])),
        _figure("one_seed", "s0", 0.9, steps=10, seconds=100.0),
        *(_figure("flat", f"s{i}", 0.3, steps=20, seconds=200.0) for i in range(2)),
    ]
    goal = compare.Goal(target=0.1)
    assert _verdicts(figures, goal) == [
        # [0.1, 0.2, 0.3] vs [0.2, 0.4, 0.6, 0.8]: the hand-computed example above scaled by 0.1, p = 0.0999.
        ("worse", "final_val_acc", "no difference resolved with 3 vs 4 seeds (p = 0.0999)"),
        ("worse", "steps_to_target", "no difference resolved with 3 vs 4 seeds (p = 0.886)"),  # [10, 20, 40]
        ("worse", "seconds_to_target", "no difference resolved with 3 vs 4 seeds (p = 0.886)"),  # vs [10, 20, 30, 40]
        ("much_worse", "final_val_acc", "differs (p < 0.05)"),
        ("much_worse", "steps_to_target", "not testable: not every run reached 10%"),
        ("much_worse", "seconds_to_target", "not testable: not every run reached 10%"),
        ("one_seed", "final_val_acc", "not testable: n = 1"),
        ("one_seed", "steps_to_target", "not testable: n = 1"),
        ("one_seed", "seconds_to_target", "not testable: n = 1"),
        ("flat", "final_val_acc", "no difference resolved with 2 vs 4 seeds (p = 0.219)"),  # the baseline has spread
        ("flat", "steps_to_target", "no difference resolved with 2 vs 4 seeds (p = 0.495)"),
        ("flat", "seconds_to_target", "no difference resolved with 2 vs 4 seeds (p = 0.495)"),
    ]
    stats = compare.comparisons(figures, goal)["comparisons"]
    assert [c["outcome"] for c in stats[:7:3]] == ["not resolved", "differs", "not testable"]
    # Against flat as the baseline, flat's twin has no spread either: t is undefined, and no p is made up.
    twin = [_figure("twin", f"s{i}", 0.4) for i in range(3)]
    assert _verdicts(figures + twin, baseline="flat")[-1] == (
        "twin", "final_val_acc", "not testable: no spread within either variant")
    with pytest.raises(ValueError, match=r"baseline='nope' is not a variant: choose one of \['base', 'worse'"):
        compare.comparisons(figures, goal, "nope")


def test_crashed_and_diverged_runs_are_counted_and_left_out_of_the_test(tmp_path, monkeypatch):
    key = "final_val_bpb"
    goal = compare.Goal("val/bpb", "min")
    figures = [
        *(_figure("base", f"s{i}", v, key=key) for i, v in enumerate([2.5, 2.45, 2.6])),
        _figure("fast", "s0", 2.1, key=key), _figure("fast", "s1", 2.2, key=key), _figure("fast", "s2", 2.3, key=key),
        _figure("fast", "s3", float("nan"), key=key), _figure("fast", "s4", 2.0, key=key, returncode=1),
        _figure("fast", "s5", None, key=key),
    ]
    (c,) = compare.comparisons(figures, goal)["comparisons"]
    arm = c["variant_arm"]
    assert (arm["n"], arm["runs"], arm["values"]) == (3, 6, [2.1, 2.2, 2.3])
    assert arm["excluded"] == {"crashed": ["s4"], "diverged": ["s3"], "no value": ["s5"]}
    assert c["baseline_arm"]["excluded"] == {} and c["baseline_arm"]["n"] == 3
    # The test over the three finite finished runs only: the same numbers as Welch's on them alone.
    assert {k: c[k] for k in ("difference", "t", "df", "p", "ci_low", "ci_high")} == compare.welch(
        [2.1, 2.2, 2.3], [2.5, 2.45, 2.6])
    assert c["verdict"] == "differs (p < 0.05)" and c["p"] == pytest.approx(0.013981813937706236, rel=1e-9)
    table = compare.statistics_table(compare.comparisons(figures, goal), goal)
    assert _row(table, "fast - base") == [
        "fast - base", "final val/bpb", "3 of 6 (1 crashed, 1 diverged, 1 no value) vs 3", "2.200 ± 0.100",
        "2.517 ± 0.076", "-0.317", "[-0.524, -0.109]", "-4.36", "3.7", "0.014", "differs (p < 0.05)",
    ]

    # From the logs: a run whose val/bpb became NaN is named in the notes and counted beside n.
    monkeypatch.setattr(compare, "plot", lambda *args, **kwargs: [])
    for i, bpb in enumerate([2.5, 2.45, 2.6]):
        _write_lm_run(tmp_path / "base" / f"seed{i}", [3.0, bpb], 1000.0)
    for i, bpb in enumerate([2.1, 2.2, 2.3, float("nan")]):
        _write_lm_run(tmp_path / "fast" / f"seed{i}", [3.0, bpb], 1000.0)
    document = compare.main(["logs", str(tmp_path / "base"), str(tmp_path / "fast"), "--metric", "val/bpb", "--mode",
                             "min", "--out", str(tmp_path / "out")])
    assert _row(document, "fast - base")[2:4] == ["3 of 4 (1 diverged) vs 3", "2.200 ± 0.100"]
    assert "- fast/seed3: final val/bpb is nan (diverged): counted as diverged beside n in the statistics" in document
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())["statistics"]["comparisons"][0]
    assert saved["variant_arm"]["excluded"] == {"diverged": ["seed3"]} and saved["variant_arm"]["n"] == 3


def test_logs_prints_and_saves_the_statistics_of_every_variant_against_the_baseline(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "plot", lambda *args, **kwargs: [])  # the plots are tested above; seconds here
    for i, acc in enumerate([0.90, 0.92, 0.94]):
        _write_run(tmp_path / "a" / f"seed{i}", [0.5, acc])
    for i, acc in enumerate([0.80, 0.83, 0.83]):
        _write_run(tmp_path / "b" / f"seed{i}", [0.5, acc])
    _write_run(tmp_path / "c" / "seed0", [0.5, 0.7])
    dirs = [str(tmp_path / name) for name in "abc"]
    document = compare.main(["logs", *dirs, "--target-acc", "0.8", "--out", str(tmp_path / "out")])

    assert "Each variant against `a`: Welch's t-test, two-sided, unequal variances (scipy.stats)" in document
    # b - a: means 0.82 and 0.92, sample variances 3e-4 and 4e-4, so se^2 = 1e-4 + 1.33e-4, t = -0.1 / se = -6.547,
    # df = se^4 / ((1e-4)^2 / 2 + (1.33e-4)^2 / 2) = 3.92 (and TensorBoard stores the accuracies in float32).
    row = _row(document, "b - a | final val/acc %")
    assert row == ["b - a", "final val/acc %", "3 vs 3", "82.00 ± 1.73", "92.00 ± 2.00", "-10.00", "[-14.28, -5.72]",
                   "-6.55", "3.9", "0.00302", "differs (p < 0.05)"]
    # Everyone reached 80 % at the same step (19): no spread; c has one run.
    assert _row(document, "b - a | steps to 80%")[2:] == [
        "3 vs 3", "20.0 ± 0.0", "20.0 ± 0.0", "0.0", "—", "—", "—", "—", "not testable: no spread within either variant"]
    assert _row(document, "c - a | final val/acc %")[10] == "not testable: n = 1"
    result = json.loads((tmp_path / "out" / "compare.json").read_text())["statistics"]
    assert (result["baseline"], result["alpha"], result["confidence"]) == ("a", 0.05, 0.95)
    first = result["comparisons"][0]
    assert [first[k] for k in ("variant", "baseline", "figure", "outcome")] == ["b", "a", "final_val_acc", "differs"]
    assert first["variant_arm"]["values"] == pytest.approx([0.80, 0.83, 0.83], abs=1e-7)
    exact = compare.welch([0.80, 0.83, 0.83], [0.90, 0.92, 0.94])  # numbers, not only strings; fp32 inputs
    assert {k: first[k] for k in exact} == pytest.approx(exact, rel=1e-5)
    assert (first["t"], first["df"], first["p"]) == pytest.approx((-6.5465, 3.92, 0.0030194), rel=1e-4)
    assert [c["figure"] for c in result["comparisons"]] == ["final_val_acc", "steps_to_target", "seconds_to_target"] * 2

    # --baseline picks another variant; a name that is not one is refused.
    document = compare.main(["logs", *dirs, "--baseline", "b", "--out", str(tmp_path / "out_b")])
    assert _row(document, "a - b | final val/acc %")[5] == "10.00"
    assert _row(document, "c - b | final val/acc %")[10] == "not testable: n = 1"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        compare.main(["logs", *dirs, "--baseline", "d"])
    assert "--baseline 'd' is not among the variants compared: choose one of ['a', 'b', 'c']" in capsys.readouterr().err


def test_the_help_states_the_rule_of_the_verdict(capsys):
    assert compare.STATISTICS_RULE in compare.__doc__
    for argv in ([], ["logs"], ["run"]):
        with pytest.raises(SystemExit):
            compare.main([*argv, "--help"])
        help_text = capsys.readouterr().out
        for verdict in ('"differs (p < 0.05)"', '"no difference resolved with <n> seeds (p = <p>)"',
                        '"not testable: n = <k>"', "Welch-Satterthwaite", "sample std (ddof 1)"):
            assert verdict in help_text, (argv, verdict)
