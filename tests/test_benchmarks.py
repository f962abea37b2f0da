"""Every benchmark runs at its smallest size and writes its JSON, so that none of them rots.

No timing is asserted (these machines are noisy and the numbers belong to benchmarks/results): timed figures must
only be finite. What is behaviour, not timing, is asserted exactly: one gradient all-reduce per optimizer step under
DDP, no host sync on GradNormMonitor's quiet steps, FSDP2's shards adding up to the whole model. The scripts live in
benchmarks/ (not a package): they are imported from there, as `python benchmarks/<name>.py` imports them.
"""

import importlib
import json
import math
import re
import statistics
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
    tiny = ["depth=1", "width=16", "heads=2", "mlp_dim=16", "conv_stem=[4, 4]"]  # the set-up, not the steps, costs
    result = load("overhead").main(["--blocks", "3", "--steps", "2", "--warmup", "1", "--batch-size", "8", "--threads",
                                    "1", "--profile", "always", "--out", str(out), "--model-args", *tiny])  # fmt: skip
    figures = _figures(out, "overhead", 3)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))  # the JSON is what main returns
    # The recipe is vit_digits.yaml's: its logger and callbacks, each added in turn by the breakdown.
    shipped = yaml.safe_load((ROOT / "recipes/configs/vit_digits.yaml").read_text())
    callbacks = [entry["class_path"].rpartition(".")[2] for entry in shipped["trainer"]["callbacks"]]
    assert "GradNormMonitor" in callbacks and "ResumableCheckpoint" in callbacks
    assert result["recipe_parts"] == ["logger", *callbacks]
    candidates = ["loop", "trainer", "recipe module", "+ logger", *[f"+ {name}" for name in callbacks[:-1]], "recipe"]
    for part in ("recipe module", "+ logger", *[f"+ {name}" for name in callbacks]):
        assert f"breakdown: {part} / previous, median step" in figures
    assert figures["recipe / loop, median step"]["goal"] == "<= 1.03"
    assert figures["recipe / trainer, median step"]["goal"] == "<= 1.01"

    # Threads, blocks, the machine and the method, stated in the file.
    assert result["threads"] == 1 and result["machine"]["torch_threads"] == 1 and torch.get_num_threads() == threads
    assert result["blocks"] == 3 and result["config"]["blocks"] == 3
    assert result["cpu"]["model"] and result["cpu"]["cores"] >= 1
    method = result["method"]
    assert method["candidates"] == candidates
    assert method["every_position_equally_often"] is False  # 3 blocks, 8 candidates
    assert (method["warmup_steps"], method["timed_steps_per_block"], method["timed_steps_per_candidate"]) == (2, 2, 6)

    # Every ratio is per block, its interval brackets its median, and it is the ratio of the per-block medians.
    ms = {name: figures[f"{name} step, median"]["values"] for name in ("loop", "trainer", "recipe")}
    for name, figure in figures.items():
        if name.endswith(", median step"):
            assert len(figure["values"]) == 3, name
            low, high = figure["interval_95"]
            assert low <= figure["median"] <= high and figure["min"] <= low and high <= figure["max"], name
    for a, b in (("recipe", "loop"), ("recipe", "trainer"), ("trainer", "loop")):
        assert figures[f"{a} / {b}, median step"]["values"] == pytest.approx([x / y for x, y in zip(ms[a], ms[b])])
    # The total-time rows: one value, the ratio of every timed second, inside its interval.
    seconds = result["block_seconds"]
    assert list(seconds) == candidates and all(len(v) == 3 for v in seconds.values())
    for a, b in (("recipe", "loop"), ("recipe", "trainer")):
        (value,) = figures[f"{a} / {b}, mean step"]["values"]
        assert value == pytest.approx(sum(seconds[a]) / sum(seconds[b]))
        low, high = figures[f"{a} / {b}, mean step"]["interval_95"]
        assert low <= value <= high
    # The verdict of each goal, and the README table: one row per ratio, with the JSON's median and interval.
    for name, figure in figures.items():
        if figure["goal"] is not None and figure["unit"] == "":
            word = "met" if figure["met"] else "missed"
            assert result["verdicts"][name] == (word if figure["resolved"] else f"not resolved (median {word})")
    table = result["performance_table"]
    assert table.startswith("`python benchmarks/overhead.py --blocks 3") and "1 torch thread," in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) == 5 + 2 + len(callbacks)  # the ratios, recipe module, + logger, + each callback
    row = next(line for line in rows if line.startswith("| recipe step / bare Trainer step |"))
    recipe = figures["recipe / trainer, median step"]
    low, high = recipe["interval_95"]
    assert f"| {recipe['median']:.3f} | {low:.3f} – {high:.3f} | ≤ 1.01 |" in row
    assert row.endswith(f" {result['verdicts']['recipe / trainer, median step']} |")

    assert result["model"]["args"] == {**shipped["model"], "num_classes": 10, "in_channels": 1, "image_size": 16,
                                       "depth": 1, "width": 16, "heads": 2, "mlp_dim": 16, "conv_stem": [4, 4],
                                       "fused": True}  # the kernel the recipe picks on a CPU in 32-true: every candidate's
    assert result["model"]["flops_per_step"] > 0
    assert not any("MFU" in name for name in figures)  # no peak FLOP/s on a CPU
    profiled = result["profile_ms_per_step"]
    assert "[Callback]GradNormMonitor.on_before_optimizer_step" in profiled["recipe"]
    assert not any("GradNormMonitor" in action for action in profiled["trainer"])
    assert set(result["callback_hooks_ms_per_step"]) == set(callbacks)


def test_overhead_interleaves_persistent_candidates_a_slice_at_a_time_in_rotated_order(load):
    overhead, log = load("overhead"), []

    def run(name):
        def steps(clock):
            started = 0
            while True:  # as the loop and the Trainer: the step whose clock says stop still runs
                running = clock()
                started += 1
                log.append(f"{name}{started}")  # the step number shows that each candidate continues where it paused
                if not running:
                    return

        return steps

    periods = overhead.run_interleaved({name: run(name) for name in "abc"}, blocks=3, steps=2, warmup=1)
    # Warm-up: 2 steps each; then blocks abc, bca, cab of 3 steps each (1 untimed + 2 timed); then each ends with one
    # last step: steps_needed steps in all.
    warmup = ["a1", "a2", "b1", "b2", "c1", "c2"]
    blocks = []
    done = {"a": 2, "b": 2, "c": 2}
    for order in ("abc", "bca", "cab"):
        for name in order:
            blocks += [f"{name}{done[name] + i}" for i in (1, 2, 3)]
            done[name] += 3
    assert log == warmup + blocks + ["a12", "b12", "c12"]
    assert overhead.steps_needed(blocks=3, steps=2, warmup=1) == 12
    assert {name: [len(s) for s in slices] for name, slices in periods.items()} == {n: [2, 2, 2] for n in "abc"}
    assert all(p > 0 for slices in periods.values() for s in slices for p in s)

    def fails(clock):
        clock()
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match=r"candidate 'b' failed: ValueError\('boom'\)"):
        overhead.run_interleaved({"a": run("a"), "b": fails}, blocks=2, steps=1, warmup=0)

    def short(clock):
        for _ in range(3):
            clock()

    with pytest.raises(RuntimeError, match="candidate 'b' ended after 3 steps, before its slice of 2 was complete"):
        overhead.run_interleaved({"a": run("a"), "b": short}, blocks=2, steps=1, warmup=0)


def test_overhead_figures_give_back_a_known_ratio_with_its_interval_and_verdict(load):
    overhead, report = load("overhead"), load("report")
    # Fake step times: the loop drifts from block to block (a noisy machine), the bare Trainer runs 0.99x it and
    # the recipe 1.02x the loop in every step of every block, with a rare slow step (a save) in block 2.
    drift = [0.100, 0.130, 0.090, 0.110, 0.125, 0.095, 0.105, 0.115]
    loop = [[d * f for f in (1.00, 1.01, 0.99, 1.02, 0.98)] for d in drift]
    periods = {
        "loop": loop,
        "trainer": [[0.99 * t for t in s] for s in loop],
        "recipe": [[1.02 * t for t in s] for s in loop],
    }
    periods["recipe"][2][3] += 0.5  # on its slowest step: the slice's median stays 1.02x the loop's
    result = report.Report("overhead", 8, {})
    overhead.step_figures(result, periods, [("recipe", "+ everything")])
    figures = {f.name: f for f in result.figures}
    recipe_loop = figures["recipe / loop, median step"]
    assert recipe_loop.values == pytest.approx([1.02] * 8) and recipe_loop.interval == pytest.approx((1.02, 1.02))
    assert recipe_loop.met and recipe_loop.resolved and overhead.verdict(recipe_loop) == "met"
    trainer = figures["recipe / trainer, median step"]
    assert statistics.median(trainer.values) == pytest.approx(1.02 / 0.99)  # 1.0303 > 1.01: missed for certain
    assert overhead.verdict(trainer) == "missed"
    assert figures["breakdown: + everything / previous, median step"].values == trainer.values
    assert figures["loop step, median"].values == pytest.approx([1e3 * d for d in drift])  # ms, one per block
    # Total time, the slow step included: (1.02 x the loop's total + 0.5) / the loop's total.
    total = sum(map(sum, loop))
    assert figures["recipe / loop, mean step"].values == pytest.approx([(1.02 * total + 0.5) / total])
    low, high = figures["recipe / loop, mean step"].interval
    assert low <= (1.02 * total + 0.5) / total <= high and high > 1.1  # the one slow block widens the interval

    # Noisy ratios around the goal: the median meets 1.01, the interval straddles it.
    per_block = [0.99, 1.00, 1.005, 1.02, 1.03, 0.995, 1.01, 1.00]
    periods["recipe"] = [[r * 0.99 * t for t in s] for r, s in zip(per_block, loop)]
    result = report.Report("overhead", 8, {})
    overhead.step_figures(result, periods, [])
    trainer = next(f for f in result.figures if f.name == "recipe / trainer, median step")
    assert trainer.values == pytest.approx(per_block)
    assert trainer.interval == report.bootstrap_interval(trainer.values)
    assert trainer.met and trainer.resolved is False and overhead.verdict(trainer) == "not resolved (median met)"
    row = overhead.performance_table(result, "caption").splitlines()[5]
    low, high = trainer.interval
    assert row == (f"| recipe step / bare Trainer step | 1.002 | {low:.3f} – {high:.3f} | ≤ 1.01 |"
                   " not resolved (median met) |")

    assert overhead.total_ratio_interval([2.0, 4.0], [1.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="at least 2 paired blocks, got 1 and 1"):
        overhead.total_ratio_interval([1.0], [1.0])


def test_overhead_aa_control_times_the_bare_trainer_twice_and_reports_their_ratio(load, tmp_path):
    overhead, report = load("overhead"), load("report")
    # Two identical candidates whose steps differ by a systematic 3 % in every block (one thread, one place in the
    # rotation slower than the other): the control shows a bias the method cannot tell from code.
    drift = [0.100, 0.130, 0.090, 0.110]
    trainer = [[d, d * 1.01, d * 0.99] for d in drift]
    again = [[1.03 * t for t in s] for s in trainer]
    periods = {"loop": trainer, "trainer": trainer, "recipe": trainer, overhead.AA: again}
    result = report.Report("overhead", 4, {})
    overhead.step_figures(result, periods, [])
    control = next(f for f in result.figures if f.name == "A/A: trainer again / trainer, median step")
    assert control.values == pytest.approx([1.03] * 4) and control.interval == pytest.approx((1.03, 1.03))
    row = "| A/A control: a second bare Trainer / the first (the method's own bias) | 1.030 | 1.030 – 1.030 |  |  |"
    assert row in overhead.performance_table(result, "caption")
    result = report.Report("overhead", 4, {})
    overhead.step_figures(result, {k: v for k, v in periods.items() if k != overhead.AA}, [])
    assert not any(f.name.startswith("A/A") for f in result.figures)  # only with --aa

    out = tmp_path / "aa.json"
    tiny = ["depth=1", "width=16", "heads=2", "mlp_dim=16", "conv_stem=[4, 4]"]
    argv = ["--aa", "--no-breakdown", "--blocks", "2", "--steps", "1", "--warmup", "0", "--batch-size", "8"]
    result = overhead.main([*argv, "--threads", "1", "--profile", "never", "--out", str(out), "--model-args", *tiny])
    assert result["method"]["candidates"] == ["loop", "trainer", "recipe", "trainer again"]
    assert len(result["figures"]["A/A: trainer again / trainer, median step"]["values"]) == 2
    assert "A/A control" in result["performance_table"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blocks", "1"], r"--blocks must be >= 2 \(the interval resamples blocks\), got 1; try --blocks 24"),
        (["--steps", "0"], r"--steps must be >= 1 \(timed steps per candidate and block\), got 0; try --steps 8"),
        (["--warmup", "-1"], r"--warmup must be >= 0, got -1; try --warmup 10"),
        (["--threads", "0"], r"--threads must be >= 1, got 0; omit it for one per usable core"),
    ],
)
def test_overhead_rejects_bad_options_naming_them(load, capsys, argv, message):
    with pytest.raises(SystemExit):
        load("overhead").main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_overhead_gpu_mode_runs_on_cpu_at_a_tiny_size(load, tmp_path):
    out = tmp_path / "overhead.json"
    tiny = ["--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--blocks", "2",
            "--threads", "1", "--no-breakdown", "--profile", "never"]  # fmt: skip
    result = load("overhead").main(["--model", "vit_b16", *tiny, "--model-args", "depth=1", "width=64", "heads=2",
                                    "mlp_dim=64", "--peak-flops", "1e12", "--out", str(out)])  # fmt: skip
    figures = _figures(out, "overhead", 2)
    shipped = yaml.safe_load((ROOT / "recipes/configs/vit_b16_imagenet.yaml").read_text())["trainer"]["precision"]
    assert result["model"]["precision"] == shipped == "16-mixed"  # the config's (torchvision's --amp), bf16 on a CPU
    assert result["model"]["args"]["patch_size"] == 16 and result["model"]["args"]["num_classes"] == 1000
    # The loop runs what the Trainer runs: 16-mixed becomes bf16 autocast on a CPU, without loss scaling.
    overhead = load("overhead")
    spec = overhead._spec(overhead.argparse.Namespace(model="vit_b16", image_size=32, model_args=[], precision=None,
                                                      batch_size=2, device="cpu", compile=False), tmp_path)  # fmt: skip
    with spec.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert spec.grad_scaler() is None
    # MFU from the counted FLOPs and the given peak; the 45% goal is the ViT-B/16 recipe's.
    assert figures["recipe MFU"]["goal"] == ">= 45"
    mfu = 100 * result["model"]["flops_per_step"] / (figures["recipe step, median"]["values"][0] / 1e3) / 1e12
    assert figures["recipe MFU"]["values"][0] == pytest.approx(mfu)
    assert result["recipe_parts"] == ["logger", "LRSchedule", "GradNormMonitor", "ModelCheckpoint",
                                      "ExponentialMovingAverage"]  # fmt: skip

    load("overhead").main(["--model", "resnet50", *tiny, "--precision", "32-true", "--out", str(out)])
    figures = _figures(out, "overhead", 2)
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


def test_overhead_gpt_mode_counts_nanogpt_flops_and_writes_its_own_file(load, tmp_path, monkeypatch):
    overhead = load("overhead")
    monkeypatch.setattr(overhead, "RESULTS", tmp_path)  # the default --out for a model other than vit_digits
    result = overhead.main(["--model", "gpt2_124m", "--model-args", "depth=1", "width=32", "heads=2", "context_length=16",
                            "--batch-size", "2", "--steps", "1", "--warmup", "0", "--blocks", "2", "--threads", "1",
                            "--no-breakdown", "--profile", "never", "--peak-flops", "1e12"])  # fmt: skip
    out = tmp_path / "overhead_gpt2_124m.json"
    figures = _figures(out, "overhead", 2)
    model = result["model"]
    assert model["class"] == "GPT" and model["context_length"] == 16 and model["precision"] == "bf16-mixed"
    assert model["args"]["vocab_size"] == 50257 and model["args"]["pad_vocab_multiple"] == 64  # the config's
    # 6N + 12 L d T per token: N = 1,623,008 parameters - 16 x 32 position embedding = 1,622,496 (the head is the
    # token embedding, 50304 x 32, counted once); 6N + 12 x 1 x 32 x 16 = 9,741,120 per token, x 2 x 16 tokens.
    assert model["parameters"] == 1_623_008 and model["flops_per_step"] == 9_741_120 * 32
    assert model["flops_per_step_counted"] == pytest.approx(model["flops_per_step"], rel=1e-3)  # FlopCounterMode
    step = figures["recipe step, median"]["values"][0] / 1e3
    assert figures["recipe tokens/s"]["values"][0] == pytest.approx(32 / step)
    assert figures["recipe MFU"]["values"][0] == pytest.approx(100 * 9_741_120 * 32 / step / 1e12)
    assert figures["recipe MFU"]["goal"] is None  # the 45% goal is the ViT-B/16 recipe's
    assert "recipe images/s" not in figures
    # The config's callbacks, with k = 1 accumulation so that every candidate steps the optimizer once per batch.
    assert result["recipe_parts"] == ["logger", "LRSchedule", "GradNormMonitor", "ResumableCheckpoint",
                                      "GradientAccumulation"]  # fmt: skip
    spec = overhead._spec(overhead.argparse.Namespace(model="gpt2_124m", image_size=None, model_args=[], precision=None,
                                                      batch_size=None, device="cpu", compile=False), tmp_path)  # fmt: skip
    accumulation = dict(overhead.recipe_parts(spec))["GradientAccumulation"](tmp_path)
    assert accumulation.global_batch_size == spec.batch_size == 64


# ------------------------------------------------------------------------------------------------ gpu_check.py


def test_gpu_check_peak_flops_table_by_device_name(load):
    peak = load("gpu_check").peak_flops_of
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100 80GB PCIe") == 312e12
    assert peak("Tesla T4") is None


def test_gpu_check_gpu_plan_fits_its_default_budget(load, capsys):
    gpu_check = load("gpu_check")
    cases = gpu_check.plan(smoke=False)
    assert [c.name for c in cases] == [
        "resume_kill9", "vit_b16_fsdp_bf16", "gpt2_124m_bf16", "vit_b16_bf16", "resnet50_bf16", "vit_b16_fp16",
        "resnet50_fp16_cl", "resnet50_bf16_cl", "resnet50_bf16_compile_cl", "vit_b16_bf16_compile_cl",
    ]  # fmt: skip
    assert sum(c.estimate_s for c in cases) <= 480  # the default --budget: 8 minutes
    assert {c.precision for c in cases} == {"bf16-mixed", "16-mixed"}
    compiled = [c.name for c in cases if c.compile]
    assert compiled == ["resnet50_bf16_compile_cl", "vit_b16_bf16_compile_cl"] and all(c.channels_last for c in cases if c.compile)
    for case in cases:  # a window of at least 2 batches after warmup
        assert case.recipe == "resume" or case.steps - case.warmup >= 30
    planned = gpu_check.main(["--plan", "--cases", "vit_b16_*"])
    assert planned["cases"] == ["vit_b16_fsdp_bf16", "vit_b16_bf16", "vit_b16_fp16", "vit_b16_bf16_compile_cl"]
    assert "estimated" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "1"], "--steps 1: use at least 2"),
        (["--cases", "nothing*", "--out", "x.json"], "--cases nothing\\* matches none of"),
        (["--cpu-smoke"], "--cpu-smoke: give --out"),
        (["--budget", "0", "--out", "x.json"], "--budget 0.0: use a positive number of seconds"),
        (["--peak-flops", "0", "--out", "x.json"], "--peak-flops 0.0: use a positive FLOP/s figure"),
        (["--workers", "-1", "--out", "x.json"], "--workers -1: use 0 or more"),
    ],
)
def test_gpu_check_refuses_bad_arguments(load, capsys, argv, message):
    with pytest.raises(SystemExit):
        load("gpu_check").main(["--cpu-smoke", *argv])
    assert re.search(message, capsys.readouterr().err)


def test_gpu_check_skips_a_case_the_budget_cannot_hold(load, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = load("gpu_check").main(["--cpu-smoke", "--cases", "vit_b16_bf16", "--budget", "1", "--out", str(out)])
    (case,) = result["cases"]
    assert case["status"] == "skipped" and re.fullmatch(r"budget: \d+ s left, the case needs about 10 s", case["reason"])
    assert result["all_cases_ok"] is False and not result["figures"]


class _SlowBatches(torch.utils.data.Dataset):
    """Random 32-px images whose every batch takes 50 ms to load."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        import time

        time.sleep(0.05)
        g = torch.Generator().manual_seed(index)
        return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g)


@pytest.mark.parametrize("peak", [None, 1e12])
def test_gpu_check_probe_measures_throughput_data_wait_flops_and_mfu(load, tmp_path, peak):
    import lightning.pytorch as L
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_recipes.recipes.vit import ViTClassifier

    gpu_check = load("gpu_check")
    args = dict(num_classes=10, in_channels=3, image_size=32, patch_size=16, depth=1, width=32, heads=2, mlp_dim=32)
    probe = gpu_check.Probe(out=str(tmp_path / "probe.json"), window_size=3, peak_flops=peak)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, callbacks=[probe], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(ViTClassifier(**args), torch.utils.data.DataLoader(_SlowBatches(), batch_size=None))
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["batches"] == 4 and record["window_batches"] == 2 and record["finished"] is True
    # Throughput over the last 2 intervals between batch ends (batches 2 to 4), each with a 50-ms load in it.
    assert record["samples_per_sec"] == pytest.approx(2 * 2 / record["window_seconds"])
    assert 2 * 0.05 <= record["data_wait_fraction"] * record["window_seconds"] < record["window_seconds"]
    # FLOPs of one sample: forward + backward of the real model with its loss, counted on the CPU, with attention as
    # matmuls (FlopCounterMode has no entry for the CPU's fused attention kernel; it has the GPU's).
    model = ViTClassifier(**args)
    images, targets = _SlowBatches()[0]
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.criterion(model(images), targets).backward()
    assert record["flops_per_sample"] == counter.get_total_flops() / 2 and record["flops_source"] == "FlopCounterMode"
    if peak is None:  # a CPU at 32-true: no peak, no MFU, and a note that says so
        assert record["peak_flops"] is None and "mfu" not in record and "--peak-flops" in record["mfu_note"]
    else:
        assert record["mfu"] == pytest.approx(record["flops_per_sample"] * record["samples_per_sec"] / 1e12)


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_case_or_says_why(load, tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_recipes.recipes.vit import ViTClassifier

    gpu_check = load("gpu_check")
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    result = gpu_check.main(["--cpu-smoke", "--out", str(out), "--workdir", str(work)])
    figures = _figures(out, "gpu_check", 1)
    assert result["mode"] == "cpu-smoke"
    cases = {c["name"]: c for c in result["cases"]}
    plan = gpu_check.plan(smoke=True)
    assert list(cases) == [c.name for c in plan]
    missing = {c.name: gpu_check.missing_options(c) for c in plan}
    for case in plan:
        record = cases[case.name]
        if missing[case.name]:  # the recipe lacks --model.compile / --model.channels_last: named, not run
            assert record["status"] == "failed" and all(option in record["reason"] for option in missing[case.name])
        elif case.keep_strategy:  # FSDP1: the recipe's own refusal on a CPU is the reason
            assert record["status"] == "skipped" and "Lightning's FSDPStrategy (FSDP1) needs GPUs" in record["reason"]
        else:
            assert record["status"] == "ok", (case.name, record.get("reason"), record.get("log_tail"))
    assert result["all_cases_ok"] is False  # FSDP1 cannot run on a CPU

    throughput = [cases[c.name] for c in plan if c.recipe != "resume" and cases[c.name]["status"] == "ok"]
    for record in throughput:
        assert (record["exit_code"], record["batches"], record["window_batches"], record["finished"]) == (0, 3, 2, True)
        assert record["samples_per_sec"] > 0 and 0 <= record["data_wait_fraction"] < 1
        assert record["peak_flops"] is None and "mfu" not in record and record["mfu_note"]
        assert figures[f"{record['name']}: throughput"]["values"] == [record.get("tokens_per_sec") or record["samples_per_sec"]]
    # The ViT case: the shipped config with the case's overrides, and its FLOPs those of the tiny model it ran.
    config = yaml.safe_load((work / "vit_b16_bf16" / "case.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "recipes/configs/vit_b16_imagenet.yaml").read_text())
    trainer = config["trainer"]
    assert (trainer["devices"], trainer["strategy"], trainer["precision"], trainer["accelerator"]) == (1, "auto", "bf16-mixed", "cpu")
    assert (trainer["max_steps"], trainer["limit_train_batches"], trainer["limit_val_batches"]) == (3, 3, 2)
    assert [c["class_path"] for c in trainer["callbacks"]] == [c["class_path"] for c in shipped["trainer"]["callbacks"]] + ["gpu_check.Probe"]
    assert config["data"]["init_args"]["root"] == str(work / "images") and config["model"]["depth"] == 1
    assert yaml.safe_load((work / "vit_b16_fsdp_bf16" / "case.yaml").read_text())["trainer"]["strategy"]["class_path"] == (
        "lightning.pytorch.strategies.FSDPStrategy")  # fmt: skip
    vit = cases["vit_b16_bf16"]
    model = ViTClassifier(**{**config["model"], "num_classes": 10, "in_channels": 3, "image_size": 16})
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.criterion(model(torch.randn(4, 3, 16, 16)), torch.zeros(4, dtype=torch.long)).backward()
    assert vit["batch_shape"] == [4, 3, 16, 16] and vit["flops_per_sample"] == counter.get_total_flops() / 4
    # The GPT case: nanoGPT's count for 1 block x 32, context 16, vocabulary 50257 padded to 50304 (see the overhead
    # test): 9,741,120 FLOPs per token, 16 tokens per sample; FlopCounterMode agrees to the biases and norms.
    gpt = cases["gpt2_124m_bf16"]
    assert gpt["flops_per_sample"] == 9_741_120 * 16 and gpt["tokens_per_sec"] == pytest.approx(16 * gpt["samples_per_sec"])
    assert gpt["flops_per_sample_counted"] == pytest.approx(gpt["flops_per_sample"], rel=1e-3)

    # Kill -9 after the step-4 checkpoint, resumed to step 12: every weight and AdamW tensor equal to the uninterrupted
    # run's; the control (the CPU RNG state replaced, as no CUDA state exists) ends elsewhere.
    resume = cases["resume_kill9"]
    assert resume["killed_exit_code"] == -9 and resume["resumed_from_step"] == 4
    assert resume["final_steps"] == {"reference": 12, "resumed": 12, "control": 12}
    assert resume["differing"] == [] and resume["tensors"] > 10
    assert resume["control"] == ["cpu state replaced"] and resume["control_differing"] > 0
    assert resume["cuda_rng_saved"] is False
    assert figures["resume_kill9: tensors differing from the uninterrupted run"]["met"] is True
    assert figures["resume_kill9 control: tensors differing without the device RNG state"]["met"] is True
    assert not list(work.rglob("*.ckpt"))  # checkpoints are removed after each case unless --keep

    # A case past its timeout writes its threads' stacks into its log before it is killed (the server is warm now).
    runner, folder = gpu_check.Runner(smoke=True), tmp_path / "stuck"
    pause = f"- class_path: gpu_check.PauseAfterCheckpoint\n  init_args:\n    step: 0\n    marker: {folder / 'marker'}"
    process = runner.start("vit", gpu_check._resume_config(folder, folder / "ckpt", True, pause), folder / "log.txt")
    while not (folder / "marker").exists() and process.exitcode is None:
        process.join(0.2)
    assert runner.wait(process, timeout=0) is None and process.exitcode == -9
    log = (folder / "log.txt").read_text()
    assert "Current thread" in log and "in on_train_batch_start" in log  # faulthandler's dump, then SIGKILL
