"""recipes/experiments.py: each experiment at a tiny size writes its files and measures what it claims to."""

import json
import math

import pytest
import torch

from lightning_recipes.recipes.experiments import main

TINY_VIT = ["--vit-depth", "1", "--vit-width", "32"]
TINY_TRAINING = ["--epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "1"]


def _run(name, tmp_path, *args):
    out = tmp_path / name
    main([name, "--out", str(out), *args])
    result = json.loads((out / "result.json").read_text())
    for key in ("date_utc", "cpu", "cpu_cores", "torch", "lightning"):
        assert result["environment"][key]
    assert result["experiment"] == name and result["arguments"]["seed"] == 0
    return out, result


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_master_weights_exact_values_and_bf16_runs(tmp_path, capsys):
    out, result = _run("master_weights", tmp_path, "--starts", "1.0", "1e-4", *TINY_TRAINING, *TINY_VIT)
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
    assert "| 1 | float16 | 9.77e-04 | no | 1 |" in capsys.readouterr().out


def test_accumulation_matches_to_rounding_without_batchnorm(tmp_path):
    out, result = _run(
        "accumulation", tmp_path, "--steps", "2", "--micro-batch", "4", "--k", "2",
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


def test_loss_scaling_keeps_gradients_that_fp16_flushes(tmp_path):
    out, result = _run("loss_scaling", tmp_path, "--probe-size", "16", *TINY_TRAINING, *TINY_VIT)
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


def test_lr_find_suggests_a_learning_rate_and_saves_each_plot(tmp_path):
    out, result = _run("lr_find", tmp_path, "--num-training", "15", "--batch-size", "16", "--recipes", "vit", "resnet", *TINY_VIT)
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


def test_invalid_sizes_are_refused_by_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["accumulation", "--out", str(tmp_path), "--steps", "0"])
    assert "must be an integer >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["accumulation", "--out", str(tmp_path), "--variants", "vit-fp16"])
    assert not (tmp_path / "result.json").exists()
