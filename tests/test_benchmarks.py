"""Every benchmark runs at its smallest size and writes its JSON, so that none of them rots.

No timing is asserted (these machines are noisy and the numbers belong to benchmarks/results): timed figures must
only be finite. What is behaviour, not timing, is asserted exactly: one gradient all-reduce per optimizer step under
DDP, no host sync on GradNormMonitor's quiet steps, FSDP2's shards adding up to the whole model. The scripts live in
benchmarks/ (not a package): they are imported from there, as `python benchmarks/<name>.py` imports them.
"""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def load(monkeypatch):
    # On sys.path while the test runs: the benchmarks import `report`, and spawned workers find the script by name.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def _figures(out: Path, name: str, repetitions: int) -> dict:
    """The JSON's figures, after checking that it says what, where, with which versions, when and how often."""
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert result["command"].startswith(f"python benchmarks/{name}.py")
    assert result["date"].endswith("+00:00")  # UTC
    assert {"platform", "processor", "cpu_count", "torch_threads"} <= set(result["machine"])
    assert result["machine"]["cpu_count"] >= 1
    assert set(result["versions"]) == {"python", "torch", "lightning"}
    assert result["repetitions"] == repetitions
    for name, figure in result["figures"].items():
        values = figure["values"]
        assert values and all(math.isfinite(v) for v in values), name
        assert (figure["min"], figure["max"]) == (min(values), max(values)), name
        assert figure["min"] <= figure["median"] <= figure["max"], name
        assert (figure["goal"] is None) == (figure["met"] is None), name
    assert result["all_goals_met"] == all(f["met"] is not False for f in result["figures"].values())
    return result["figures"]


def test_overhead_times_loop_trainer_recipe_and_each_part_of_the_recipe(load, tmp_path):
    out, threads = tmp_path / "overhead.json", torch.get_num_threads()
    result = load("overhead").main(["--steps", "2", "--warmup", "1", "--reps", "1", "--batch-size", "8",
                                    "--threads", "1", "--profile", "always", "--out", str(out)])  # fmt: skip
    figures = _figures(out, "overhead", 1)
    # The recipe is vit_digits.yaml's: its logger and callbacks, each added in turn by the breakdown.
    config = yaml.safe_load((ROOT / "recipes/configs/vit_digits.yaml").read_text())["trainer"]
    callbacks = [entry["class_path"].rpartition(".")[2] for entry in config["callbacks"]]
    assert "GradNormMonitor" in callbacks and "ResumableCheckpoint" in callbacks
    assert result["recipe_parts"] == ["logger", *callbacks]
    for part in ("recipe module", "+ logger", *[f"+ {name}" for name in callbacks]):
        assert f"breakdown: {part} / previous, median step" in figures
    assert figures["recipe / loop, median step"]["goal"] == "<= 1.03"
    assert figures["recipe / trainer, median step"]["goal"] == "<= 1.01"
    for name in ("loop", "trainer", "recipe"):
        assert len(figures[f"{name} step, median"]["values"]) == 1
    assert result["model"]["args"]["conv_stem"] == [32, 64] and result["model"]["image_size"] == 16
    assert result["machine"]["torch_threads"] == 1 and torch.get_num_threads() == threads  # restored
    assert result["model"]["flops_per_step"] > 0
    assert not any("MFU" in name for name in figures)  # no peak FLOP/s on a CPU
    profiled = result["profile_ms_per_step"]
    assert "[Callback]GradNormMonitor.on_before_optimizer_step" in profiled["recipe"]
    assert not any("GradNormMonitor" in action for action in profiled["trainer"])
    assert set(result["callback_hooks_ms_per_step"]) == set(callbacks)


def test_overhead_gpu_mode_runs_on_cpu_at_a_tiny_size(load, tmp_path):
    out = tmp_path / "overhead.json"
    tiny = ["--image-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--reps", "1", "--threads", "1",
            "--no-breakdown", "--profile", "never"]  # fmt: skip
    result = load("overhead").main(["--model", "vit_b16", *tiny, "--model-args", "depth=1", "width=64", "heads=2",
                                    "mlp_dim=64", "--peak-flops", "1e12", "--out", str(out)])  # fmt: skip
    figures = _figures(out, "overhead", 1)
    assert result["model"]["precision"] == "bf16-mixed"  # the ImageNet config's
    assert result["model"]["args"]["patch_size"] == 16 and result["model"]["args"]["num_classes"] == 1000
    # MFU from the counted FLOPs and the given peak; the 45% goal is the ViT-B/16 recipe's.
    assert figures["recipe MFU"]["goal"] == ">= 45"
    mfu = 100 * result["model"]["flops_per_step"] / (figures["recipe step, median"]["values"][0] / 1e3) / 1e12
    assert figures["recipe MFU"]["values"][0] == pytest.approx(mfu)
    assert result["recipe_parts"] == ["logger", "LRSchedule", "GradNormMonitor", "ModelCheckpoint",
                                      "EMAWeightAveraging"]  # fmt: skip

    load("overhead").main(["--model", "resnet50", *tiny, "--precision", "32-true", "--out", str(out)])
    figures = _figures(out, "overhead", 1)
    assert "recipe images/s" in figures and not any("MFU" in name for name in figures)
    assert any("MFU n/a" in note for note in json.loads(out.read_text())["notes"])


def test_grad_norm_counts_no_host_sync_on_steps_that_log_nothing(load, tmp_path):
    out = tmp_path / "grad_norm.json"
    load("grad_norm").main(["--layers", "1", "--width", "64", "--reps", "2", "--calls", "1", "--sync-steps", "10",
                            "--out", str(out)])  # fmt: skip
    figures = _figures(out, "grad_norm", 2)
    assert figures["lightning grad_norm / monitor"]["goal"] == ">= 10"
    for monitor in ("GradNormMonitor()", "GradNormMonitor(layer_depth=2, log_update_ratio=True)"):
        quiet = figures[f"host syncs per non-logging step, {monitor}"]
        assert quiet["values"] == [0] * 8 and quiet["met"] is True  # steps 0-3 and 5-8 of 10, logging every 5th
        logging = figures[f"host syncs per logging step, {monitor}"]
        assert len(logging["values"]) == 2 and min(logging["values"]) >= 1  # the count sees a log's reads
        # With Lightning's clipping by norm, one pass over the gradients on a quiet step: the pre-clip norm.
        assert figures[f"norm passes per non-logging step, {monitor}"]["values"] == [1] * 8
        assert min(figures[f"norm passes per logging step, {monitor}"]["values"]) >= 2  # and the post-clip norm


def test_allreduce_counts_one_round_per_optimizer_step(load, tmp_path):
    out = tmp_path / "allreduce.json"
    load("allreduce").main(["--epochs", "1", "--limit-batches", "3", "--batch-size", "8", "--out", str(out)])
    figures = _figures(out, "allreduce", 1)
    assert figures["all-reduce rounds per optimizer step, k=1"]["values"] == [1] * 6  # 3 steps x 2 ranks
    assert figures["micro-batches per optimizer step, k=1"]["values"] == [1] * 6
    assert figures["all-reduce rounds per optimizer step, k=4"]["values"] == [1] * 2  # one window of 3 batches
    assert figures["micro-batches per optimizer step, k=4"]["values"] == [3] * 2
    for k in (1, 4):
        assert figures[f"all-reduce rounds per optimizer step, k={k}"]["met"] is True


def test_fsdp_memory_shards_add_up_to_the_single_process_model(load, tmp_path):
    out = tmp_path / "fsdp_memory.json"
    result = load("fsdp_memory").main(["--depth", "1", "--width", "32", "--heads", "2", "--mlp-dim", "32",
                                       "--steps", "1", "--out", str(out)])  # fmt: skip
    figures = _figures(out, "fsdp_memory", 1)
    total = figures["FSDP2 / single process, parameters + gradients + optimizer state, per rank"]
    assert total["goal"] == "<= 0.55" and total["goal_applies_to"] == "every value" and len(total["values"]) == 2
    single = result["bytes"]["single_process"]
    ranks = (result["bytes"]["fsdp2_rank0"], result["bytes"]["fsdp2_rank1"])
    assert single["owned"] == single["allocated"]  # nothing padded in a single process
    for kind in ("params", "grads", "optimizer"):
        owned = [rank["owned"][kind] for rank in ranks]
        assert sum(owned) == single["owned"][kind]  # every element on exactly one rank
        assert 0 < min(owned) and max(owned) < single["owned"][kind]
        assert all(rank["allocated"][kind] >= rank["owned"][kind] for rank in ranks)
    # FSDP2 pads the parameter shards to equal buffers on both ranks.
    assert ranks[0]["allocated"]["params"] == ranks[1]["allocated"]["params"] >= single["owned"]["params"] / 2
    assert single["owned"]["optimizer"] == 2 * single["owned"]["params"]  # AdamW: two moments per weight


def test_checkpoint_io_saves_and_loads_both_ways(load, tmp_path):
    out = tmp_path / "checkpoint_io.json"
    result = load("checkpoint_io").main(["--size-mb", "0.25", "--reps", "1", "--dir", str(tmp_path),
                                         "--out", str(out)])  # fmt: skip
    figures = _figures(out, "checkpoint_io", 1)
    for name in ("save on disk, lightning", "save on disk, ours, sync", "save on disk, ours, async", "load, lightning",
                 "load, ours"):  # fmt: skip
        assert figures[name]["unit"] == "MB/s"
    for name in ("save blocked, lightning", "save blocked, ours, sync", "save blocked, ours, async"):
        assert figures[name]["unit"] == "ms"
    assert figures["training-loop stall per save, ours async / lightning"]["goal"] == "<= 0.1"
    assert figures["save throughput to disk, ours async / lightning"]["goal"] == ">= 0.9"
    assert figures["load MB/s, ours / lightning"]["goal"] == ">= 0.9"
    # Synchronous saves block until the file is on disk: blocked time = time to disk.
    assert figures["save blocked, lightning"]["values"][0] > 0
    sizes = result["checkpoint_bytes"]
    assert 3 * 0.25 * 2**20 < sizes["ours"] < 4 * 0.25 * 2**20
    assert sizes["ours"] == pytest.approx(sizes["lightning"], rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_io.json"]  # its files are gone


def test_digits_accuracy_runs_one_short_seed(load, tmp_path):
    out = tmp_path / "digits.json"
    runs = load("digits_accuracy").main(["--seeds", "0", "--recipes", "vit", "--json", str(out), "--",
                                         "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                         "--trainer.limit_val_batches=1", "--model.depth=1"])  # fmt: skip
    assert [(r["recipe"], r["seed"]) for r in runs] == [("vit", 0)] and 0 <= runs[0]["val_acc"] <= 1
    assert json.loads(out.read_text())["runs"] == runs


def test_lm_baseline_computes_the_anchors_and_the_recipe_on_the_same_held_out_bytes(load, tmp_path):
    from data_fakes import write_text_folder

    out, text = tmp_path / "lm.json", write_text_folder(tmp_path / "text")
    result = load("lm_baseline").main(["--path", text, "--train-tail-mb", "0.01", "--ngram-order", "2", "--out", str(out),
                                       "--", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                                       "--data.context_length=16", "--data.batch_size=4", "--model.depth=1",
                                       "--model.width=32", "--model.heads=2", "--model.sample_length=0"])  # fmt: skip
    figures = _figures(out, "lm_baseline", 1)
    corpus = result["corpus"]
    assert (corpus["file_count"], corpus["val_tokens"]) == (40, 1120) and len(corpus["sha256"]) == 64
    anchors = ["gzip -9, held-out alone", "xz -9e, held-out alone", "xz -9e, held-out given the training tail"]
    assert all(figures[name]["unit"] == "bits/byte" and 0 < figures[name]["median"] < 8 for name in anchors)
    # The made-up files repeat one pattern: knowing the training text must help xz.
    assert figures[anchors[2]]["median"] < figures[anchors[1]]["median"]
    ngrams = [figures[f"byte n-gram, {order} bytes of context (Witten-Bell)"]["median"] for order in range(3)]
    assert ngrams[0] > ngrams[1] > ngrams[2]  # more context, fewer bits, on this regular text
    recipe = figures["recipe val/bpb (final weights)"]
    assert recipe["goal"] == f"<= {figures[anchors[0]]['median']:g}" and result["recipe"]["steps"] == 2
    assert recipe["median"] == pytest.approx(result["recipe"]["val_loss"] / math.log(2), rel=1e-6)


def test_lm_baseline_n_gram_is_exact_on_a_hand_computed_case(load):
    import numpy as np

    # Training "abab": order 0 counts a=2, b=2 (T=2); held-out "ab": p(a) = (2 + 2/256) / (4 + 2), likewise p(b).
    # Order 1: context "a" is followed by "b" twice (C=2, T=1): p(b|a) = (2 + 1 * p0(b)) / 3; the first held-out byte
    # has no context and keeps p0(a).
    ngram = load("lm_baseline").ngram_bpb(np.frombuffer(b"abab", np.uint8), np.frombuffer(b"ab", np.uint8), 1)
    p0 = (2 + 2 / 256) / 6
    assert ngram[0] == pytest.approx(-math.log2(p0))
    assert ngram[1] == pytest.approx(-(math.log2(p0) + math.log2((2 + p0) / 3)) / 2)


def test_the_readme_language_model_table_quotes_benchmarks_results_lm_baseline_json():
    import re

    result = json.loads((BENCHMARKS / "results" / "lm_baseline.json").read_text())
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Results on the standard library") :]
    section = section[: section.index("\n## ")]
    figures = {name: f["median"] for name, f in result["figures"].items()}
    rows = {
        "`gzip -9` of the held-out bytes alone": figures["gzip -9, held-out alone"],
        "`xz -9e` of the held-out bytes alone": figures["xz -9e, held-out alone"],
        "`xz -9e` of the held-out bytes given the last 8 MB of training text": figures["xz -9e, held-out given the training tail"],
        "byte n-gram model, 6 bytes of context (Witten-Bell), counted on the training bytes":
            figures["byte n-gram, 6 bytes of context (Witten-Bell)"],
        "`python recipes/gpt.py fit` (the default, 400 steps, 1.6M training tokens)": result["recipe"]["val_bpb"],
    }
    for label, value in rows.items():
        (row,) = [line for line in section.splitlines() if line.startswith(f"| {label} |")]
        assert re.search(rf"\| \**{value:.3f}\** ", row), (label, value, row)
    assert f"{result['recipe']['seconds']:.0f} s" in section
    corpus = result["corpus"]
    assert corpus["sha256"][:8] in section and corpus["python_version"] in section
    assert f"{corpus['val_tokens']:,} held-out bytes" in section
