"""experiments/token_accumulation.py at a tiny size: every run trains on the same ragged windows and masks, token
weighting is the large batch's gradient in float64 while the mean of micro-batch means is not.

The script is not in a package: it is imported from experiments/, as `python experiments/token_accumulation.py` would
load it. The model is the gpt_stdlib config's (4 x 128, context 128) on the real stdlib windows, k = 2 micro-batches
of 2 windows, one optimizer step per run.
"""

import argparse
import importlib
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--k", "2", "--micro-batch", "2", "--steps", "1", "--last-steps", "1", "--seeds", "0", "--val-windows", "4",
        "--precisions", "float64"]  # fmt: skip


pytestmark = pytest.mark.filterwarnings(  # the experiment's module masks the batches; the data module has no such hook
    "ignore:You have overridden `on_after_batch_transfer` in `LightningModule`"
)


@pytest.fixture
def experiment(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs (--threads 1), whose main() sets it for the process
    yield importlib.import_module("token_accumulation")
    torch.set_num_threads(threads)


def test_ragged_lengths_are_seeded_and_the_targets_past_them_bear_no_loss(experiment):
    lengths = experiment.ragged_lengths(0, 4096, 128)
    assert torch.equal(lengths, experiment.ragged_lengths(0, 4096, 128))
    assert not torch.equal(lengths, experiment.ragged_lengths(1, 4096, 128))
    assert int(lengths.min()) == 1 and int(lengths.max()) == 128  # uniform on 1..128: both ends drawn in 4,096
    args = argparse.Namespace(seed=0, k=2, micro_batch=2)
    _, model = experiment.first_gradient(args, "float64", 2, "tokens")
    inputs, targets = (torch.cat(t) for t in zip(*model.batches))
    assert targets.shape == (4, 128) and len(model.batches) == 2
    for row, length in enumerate(experiment.ragged_lengths(0, 4, 128).tolist()):
        assert (targets[row, length:] == -100).all() and (targets[row, :length] >= 0).all()
        # The kept targets are the data's next bytes: the window shifted by one.
        assert torch.equal(targets[row, : length - 1], inputs[row, 1:length])


def test_token_weighting_is_the_large_batch_in_float64_and_the_micro_batch_mean_is_not(experiment, tmp_path):
    out = tmp_path / "token_accumulation"
    experiment.main(["--out", str(out), *TINY])
    result = json.loads((out / "result.json").read_text())
    assert result["command"] == " ".join(["python experiments/token_accumulation.py", "--out", str(out), *TINY])
    assert result["environment"]["torch_threads"] == 1 and (out / "token_accumulation.png").is_file()
    assert (out / "token_accumulation.md").read_text() == result["table"] + "\n"
    rows = {(r["micro_batch"], r["mode"]): r for r in result["gradient"]}
    assert sorted(rows) == [(1, "samples"), (1, "tokens"), (2, "samples"), (2, "tokens")]
    for micro_batch in (1, 2):
        tokens, samples = rows[micro_batch, "tokens"], rows[micro_batch, "samples"]
        assert len(set(tokens["tokens_per_micro_batch"])) > 1  # the premise: ragged micro-batches
        assert tokens["same_windows_and_masks_as_reference"] and samples["same_windows_and_masks_as_reference"]
        assert tokens["max_abs_diff"] <= 1e-12 and tokens["relative_diff"] <= 1e-12
        assert samples["relative_diff"] > 1e-2 and samples["cosine"] < 0.999
    # Both modes and the one-batch control trained on the same windows and masks (checked in the run).
    runs = {r["mode"]: r for r in result["runs"]}
    assert sorted(runs) == ["one batch", "samples", "tokens"]
    assert all(r["same_windows_and_masks_across_runs"] for r in runs.values())
    assert {r["loss_bearing_tokens"] for r in runs.values()} == {sum(rows[2, "tokens"]["tokens_per_micro_batch"])}
    # One step from the same weights: the training loss is the same in every run (rounding aside).
    assert len({round(r["train_loss_per_token_last"], 6) for r in runs.values()}) == 1
    assert sorted(result["paired_differences"]) == ["tokens - one batch", "tokens - samples"]


def test_runs_that_see_different_masks_are_refused(experiment, monkeypatch):
    draw = experiment.ragged_lengths
    calls = []

    def one_length_differs_after_the_reference(seed: int, windows: int, context_length: int) -> torch.Tensor:
        lengths = draw(seed, windows, context_length)
        calls.append(1)
        if len(calls) > 1:
            lengths[-1] = lengths[-1] % context_length + 1
        return lengths

    monkeypatch.setattr(experiment, "ragged_lengths", one_length_differs_after_the_reference)
    args = argparse.Namespace(seed=0, k=2, micro_batch=2, gradient_micro_batches=[], precisions=["float64"])
    with pytest.raises(RuntimeError, match="float64 samples: the micro-batches of 2 are not the reference batch's windows and masks"):
        experiment.gradient_differences(args)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--val-windows", "6", "--k", "2", "--micro-batch", "2"],
         r"--val-windows 6 is not a multiple of --k x --micro-batch = 4: .* use 4"),
        (["--gradient-micro-batches", "1", "3"], r"--gradient-micro-batches 1 3: each must divide --k x --micro-batch = 32"),
        (["--steps", "5", "--last-steps", "6"], r"--last-steps 6 is more than --steps 5: use at most 5"),
    ],
)
def test_inconsistent_sizes_are_refused_before_any_run(experiment, tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        experiment.main(["--out", str(tmp_path), *argv])
    assert not (tmp_path / "result.json").exists()
