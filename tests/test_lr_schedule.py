"""LRSchedule: the pure schedule function value by value, and the callback in modules that are not ours."""

import ast
import importlib.util
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from recording_logger import RecordingLogger
from lightning_recipes.callbacks import LRSchedule
from lightning_recipes.callbacks.lr_schedule import lr_factor, main

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "callbacks" / "lr_schedule.py"

# ---------------------------------------------------------------------------------------------
# The pure function against closed forms: T=100 steps, W=10 warmup steps from 0.1, floor m=0.05.
# ---------------------------------------------------------------------------------------------
T, W, S0, M = 100, 10, 0.1, 0.05
COMMON = dict(total_steps=T, warmup_steps=W, warmup_start_factor=S0)


def cos_decay(p: float) -> float:
    return M + (1 - M) * 0.5 * (1 + math.cos(math.pi * p))


CASES = [
    # (decay kwargs, step, closed form)
    *[
        (kind, 0, S0)  # step 0 of every kind: the warmup start
        for kind in [
            dict(decay="cosine", min_lr_factor=M),
            dict(decay="linear", min_lr_factor=M),
            dict(decay="polynomial", power=2.0, min_lr_factor=M),
            dict(decay="step", milestones=[40, 70], gamma=0.5),
            dict(decay="constant"),
            dict(decay="cosine_restarts", period=30, min_lr_factor=M),
            dict(decay="wsd", decay_fraction=0.2, min_lr_factor=M),
        ]
    ],
    (dict(decay="cosine", min_lr_factor=M), 9, S0 + (1 - S0) * 9 / 10),  # last warmup step
    (dict(decay="cosine", min_lr_factor=M), 10, 1.0),  # first decay step: the peak
    (dict(decay="cosine", min_lr_factor=M), 55, cos_decay(0.5)),
    (dict(decay="cosine", min_lr_factor=M), 99, cos_decay(89 / 90)),  # last step taken
    (dict(decay="cosine", min_lr_factor=M), 100, M),  # the LR training ends at
    (dict(decay="cosine", min_lr_factor=M), 150, M),  # past the end: stays at the floor
    (dict(decay="linear", min_lr_factor=M), 9, 0.91),
    (dict(decay="linear", min_lr_factor=M), 10, 1.0),
    (dict(decay="linear", min_lr_factor=M), 55, M + (1 - M) * 0.5),
    (dict(decay="linear", min_lr_factor=M), 99, M + (1 - M) / 90),
    (dict(decay="linear", min_lr_factor=M), 100, M),
    (dict(decay="polynomial", power=2.0, min_lr_factor=M), 10, 1.0),
    (dict(decay="polynomial", power=2.0, min_lr_factor=M), 55, M + (1 - M) * 0.25),
    (dict(decay="polynomial", power=2.0, min_lr_factor=M), 99, M + (1 - M) / 90**2),
    (dict(decay="polynomial", power=2.0, min_lr_factor=M), 100, M),
    (dict(decay="polynomial", min_lr_factor=M), 55, M + (1 - M) * 0.5),  # default power 1 = linear
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 9, 0.91),
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 10, 1.0),
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 39, 1.0),
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 40, 0.5),  # a milestone takes effect at its step
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 69, 0.5),
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 70, 0.25),
    (dict(decay="step", milestones=[40, 70], gamma=0.5), 100, 0.25),
    (dict(decay="step", milestones=[40, 70], gamma=0.5, min_lr_factor=0.3), 70, 0.3),  # floored
    (dict(decay="step", milestones=[40]), 40, 0.1),  # default gamma
    (dict(decay="constant"), 9, 0.91),
    (dict(decay="constant"), 10, 1.0),
    (dict(decay="constant"), 100, 1.0),
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 10, 1.0),
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 25, cos_decay(15 / 30)),
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 39, cos_decay(29 / 30)),  # end of cycle 1
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 40, 1.0),  # restart
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 70, 1.0),
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 99, cos_decay(29 / 30)),
    (dict(decay="cosine_restarts", period=30, min_lr_factor=M), 100, 1.0),
    (dict(decay="cosine_restarts", period=30, period_mult=2.0, min_lr_factor=M), 39, cos_decay(29 / 30)),
    (dict(decay="cosine_restarts", period=30, period_mult=2.0, min_lr_factor=M), 40, 1.0),  # cycle 2: 60 steps
    (dict(decay="cosine_restarts", period=30, period_mult=2.0, min_lr_factor=M), 70, cos_decay(30 / 60)),
    (dict(decay="cosine_restarts", period=30, period_mult=2.0, min_lr_factor=M), 99, cos_decay(59 / 60)),
    (dict(decay="cosine_restarts", period=30, period_mult=2.0, min_lr_factor=M), 100, 1.0),  # cycle 3
    (dict(decay="wsd", min_lr_factor=M), 10, 1.0),  # default decay_fraction 0.2: decay from step 80
    (dict(decay="wsd", min_lr_factor=M), 79, 1.0),
    (dict(decay="wsd", min_lr_factor=M), 80, 1.0),
    (dict(decay="wsd", min_lr_factor=M), 90, M + (1 - M) * 0.5),
    (dict(decay="wsd", min_lr_factor=M), 99, M + (1 - M) / 20),
    (dict(decay="wsd", min_lr_factor=M), 100, M),
    (dict(decay="wsd", decay_fraction=0.5, min_lr_factor=M), 50, 1.0),
    (dict(decay="wsd", decay_fraction=0.5, min_lr_factor=M), 75, M + (1 - M) * 0.5),
]


@pytest.mark.parametrize(("kwargs", "step", "expected"), CASES)
def test_lr_factor_closed_forms(kwargs, step, expected):
    assert lr_factor(step, **COMMON, **kwargs) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_factor_without_warmup_starts_at_the_peak_and_boundaries_are_exact():
    assert lr_factor(0, total_steps=10) == 1.0
    assert lr_factor(10, total_steps=10, min_lr_factor=0.25) == 0.25  # exactly the floor, not approximately
    assert lr_factor(0, total_steps=10, warmup_steps=4) == 0.0  # default warmup_start_factor
    assert lr_factor(2, total_steps=10, warmup_steps=4) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(step=-1), r"`step` must be an integer >= 0, got -1"),
        (dict(step=1.5), r"`step` must be an integer >= 0, got 1.5"),
        (dict(total_steps=0), r"`total_steps` must be an integer >= 1, got 0"),
        (dict(warmup_steps=-3), r"`warmup_steps` must be an integer >= 0, got -3"),
        (dict(warmup_steps=100), r"`warmup_steps=100` must be shorter than training: it must be < total_steps=100"),
        (dict(decay="exponential"), r"`decay` must be one of 'cosine', .*'wsd', got 'exponential'"),
        (dict(min_lr_factor=1.5), r"`min_lr_factor` must be a number in \[0, 1\] .*got 1.5"),
        (dict(min_lr_factor=-0.1), r"`min_lr_factor` must be a number in \[0, 1\] .*got -0.1"),
        (dict(warmup_start_factor=2), r"`warmup_start_factor` must be a number in \[0, 1\], got 2"),
        (dict(decay="constant", min_lr_factor=0.1), r"`min_lr_factor=0.1` has no effect with decay='constant'"),
        (dict(power=2.0), r"`power=2.0` applies only to decay='polynomial', got decay='cosine'"),
        (dict(decay="linear", period=5), r"`period=5` applies only to decay='cosine_restarts', got decay='linear'"),
        (dict(decay="polynomial", power=0), r"`power` must be a number > 0, got 0"),
        (dict(decay="step"), r"`milestones` must be a non-empty, strictly increasing list of integer steps, got None"),
        (dict(decay="step", milestones=[50, 50]), r"strictly increasing list of integer steps, got \[50, 50\]"),
        (dict(decay="step", milestones=[5, 50]), r"`milestones=\[5, 50\]` must lie in \(warmup_steps, total_steps\]"),
        (dict(decay="step", milestones=[50, 101]), r"must lie in \(warmup_steps, total_steps\] = \(10, 100\]"),
        (dict(decay="step", milestones=[50], gamma=1.5), r"`gamma` must be a number in \(0, 1\), got 1.5"),
        (dict(decay="cosine_restarts"), r"`period` must be an integer >= 1 \(steps per cosine cycle\), got None"),
        (dict(decay="cosine_restarts", period=10, period_mult=0.5), r"`period_mult` must be a number >= 1, got 0.5"),
        (dict(decay="wsd", decay_fraction=0), r"`decay_fraction` must be a number in \(0, 1\], got 0"),
        (dict(decay="wsd", decay_fraction=0.95), r"gives 95 decay steps; they must be >= 1 and start after warmup"),
    ],
)
def test_lr_factor_rejects_invalid_arguments(kwargs, match):
    arguments = dict(step=0, total_steps=T, warmup_steps=W) | kwargs
    with pytest.raises(ValueError, match=match):
        lr_factor(arguments.pop("step"), **arguments)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(warmup_steps=-1), r"`warmup_steps` must be an integer >= 0, got -1"),
        (dict(warmup_steps=10, warmup_fraction=0.1), r"either `warmup_steps` or `warmup_fraction`, not both"),
        (dict(warmup_fraction=1.0), r"`warmup_fraction` must be a number in \[0, 1\), got 1.0"),
        (dict(decay="cosinus"), r"`decay` must be one of .* got 'cosinus'"),
        (dict(min_lr_factor=2.0), r"`min_lr_factor` must be a number in \[0, 1\] .*above 1 the minimum would exceed"),
        (dict(total_steps=10, warmup_steps=20), r"`warmup_steps=20` must be shorter than training"),
        (dict(total_steps=-5), r"`total_steps` must be an integer >= 1, got -5"),
        (dict(reference_batch_size=0), r"`reference_batch_size` must be an integer >= 1, got 0"),
        (dict(micro_batch_size=8), r"`micro_batch_size=8` is only used by the scaling rule"),
        (dict(decay="step", milestones=[]), r"`milestones` must be a non-empty"),
        (dict(gamma=0.5), r"`gamma=0.5` applies only to decay='step', got decay='cosine'"),
    ],
)
def test_callback_validates_arguments_in_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


def test_callback_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        LRSchedule("cosine")  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The callback in training, on Lightning's own BoringModel.
# ---------------------------------------------------------------------------------------------
class GroupedBoringModel(BoringModel):
    """BoringModel with two named parameter groups at different LRs and no scheduler of its own."""

    def __init__(self, batch_size: int = 1, momentum: float = 0.0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.momentum = momentum

    def configure_optimizers(self):
        groups = [
            {"params": [self.layer.weight], "lr": 0.1, "name": "weights"},
            {"params": [self.layer.bias], "lr": 0.01, "name": "biases"},
        ]
        return torch.optim.SGD(groups, momentum=self.momentum)

    def train_dataloader(self):
        torch.manual_seed(1234)
        return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=self.batch_size)


class LRRecorder(L.Callback):
    """Records, per optimizer step, the LR each group had when the optimizer ran, and the weights."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}
        self.lrs_before: dict[int, list[float]] = {}  # as set for each step, whether or not it ran
        self.weights: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.weights[trainer.global_step] = pl_module.layer.weight.detach().clone()

        def after_step(opt, args, kwargs):
            self.lrs[trainer.global_step] = [group["lr"] for group in opt.param_groups]

        optimizer.register_step_post_hook(after_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs_before[trainer.global_step] = [group["lr"] for group in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = pl_module.layer.weight.detach().clone()


def make_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**(defaults | kwargs))


def test_counts_optimizer_steps_under_accumulation_and_keeps_group_ratios():
    schedule = LRSchedule(warmup_steps=2, decay="linear", min_lr_factor=0.1)
    recorder = LRRecorder()
    logger = RecordingLogger()
    trainer = make_trainer(
        max_epochs=2,
        limit_train_batches=9,
        accumulate_grad_batches=3,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[schedule, recorder],
    )
    trainer.fit(GroupedBoringModel())

    assert trainer.global_step == 6  # 2 epochs x 9 batches / 3
    assert schedule.resolved_total_steps == 6
    factors = [lr_factor(t, total_steps=6, warmup_steps=2, decay="linear", min_lr_factor=0.1) for t in range(6)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 0.775, 0.55, 0.325], rel=1e-12)
    assert recorder.lrs == {t: [0.1 * f, 0.01 * f] for t, f in enumerate(factors)}
    # Logged every 2 optimizer steps, on Lightning's step axis, under the groups' names.
    lr_rows = [(step, row) for step, row in logger.rows if "lr/weights" in row]
    assert lr_rows == [(t, {"lr/weights": 0.1 * factors[t], "lr/biases": 0.01 * factors[t]}) for t in (1, 3, 5)]


def test_warmup_fraction_and_total_steps_come_from_the_trainer():
    schedule = LRSchedule(warmup_fraction=0.25, decay="cosine")
    recorder = LRRecorder()
    make_trainer(max_steps=8, callbacks=[schedule, recorder]).fit(GroupedBoringModel())
    assert (schedule.resolved_total_steps, schedule.resolved_warmup_steps) == (8, 2)
    assert [lrs[0] for lrs in recorder.lrs.values()] == [
        0.1 * lr_factor(t, total_steps=8, warmup_steps=2) for t in range(8)
    ]


def test_linear_scaling_rule_scales_base_lrs_and_logs_once(caplog):
    schedule = LRSchedule(decay="constant", reference_batch_size=4)
    recorder = LRRecorder()
    trainer = make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[schedule, recorder])
    with caplog.at_level(logging.INFO):
        trainer.fit(GroupedBoringModel(batch_size=8))
    # global batch 8 x 2 x 1 process = 16 = 4 x the reference
    assert schedule.base_lrs == [0.4, 0.04]
    assert recorder.lrs[2] == [0.4, 0.04]
    messages = [r.getMessage() for r in caplog.records if "LRSchedule" in r.getMessage()]
    assert messages == [
        "LRSchedule: global batch 16 = micro batch 8 x accumulate_grad_batches 2 x 1 data-parallel processes;"
        " reference_batch_size=4",
        "LRSchedule: linear scaling rule multiplies the base LRs by 4 (weights: 0.1 -> 0.4, biases: 0.01 -> 0.04)",
    ]


def test_linear_scaling_rule_needs_the_micro_batch_size():
    class SamplerModel(GroupedBoringModel):
        def train_dataloader(self):
            sampler = torch.utils.data.BatchSampler(range(64), batch_size=4, drop_last=False)
            return torch.utils.data.DataLoader(RandomDataset(32, 64), batch_sampler=sampler)

    trainer = make_trainer(max_steps=2, callbacks=[LRSchedule(reference_batch_size=4)])
    with pytest.raises(MisconfigurationException, match=r"has no integer `batch_size` \(got None\): pass LRSchedule"):
        trainer.fit(SamplerModel())
    schedule = LRSchedule(decay="constant", reference_batch_size=4, micro_batch_size=2)
    make_trainer(max_steps=2, callbacks=[schedule]).fit(SamplerModel())
    assert schedule.base_lrs == [0.05, 0.005]


def test_a_scheduler_from_the_module_for_the_same_optimizer_is_an_error():
    trainer = make_trainer(max_steps=2, callbacks=[LRSchedule()])
    with pytest.raises(
        MisconfigurationException,
        match=r"LRSchedule and the StepLR returned by BoringModel.configure_optimizers both set the LR of the SGD",
    ):
        trainer.fit(BoringModel())  # Lightning's BoringModel returns SGD + StepLR


def test_more_than_one_optimizer_is_an_error():
    class TwoOptimizers(GroupedBoringModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def configure_optimizers(self):
            return [torch.optim.SGD([self.layer.weight], lr=0.1), torch.optim.SGD([self.layer.bias], lr=0.1)]

    with pytest.raises(
        MisconfigurationException,
        match=r"LRSchedule drives exactly one optimizer, but TwoOptimizers.configure_optimizers returned 2",
    ):
        make_trainer(max_steps=2, callbacks=[LRSchedule()]).fit(TwoOptimizers())


def test_trainer_conflicts_are_errors_naming_both_settings():
    with pytest.raises(MisconfigurationException, match=r"Trainer\(max_steps=-1, max_epochs=-1\) trains forever"):
        make_trainer(max_steps=-1, max_epochs=-1, callbacks=[LRSchedule()]).fit(GroupedBoringModel())
    with pytest.raises(
        MisconfigurationException,
        match=r"total_steps=5 from Trainer\(max_steps=5, .*\): `warmup_steps=10` must be shorter than training",
    ):
        make_trainer(max_steps=5, callbacks=[LRSchedule(warmup_steps=10)]).fit(GroupedBoringModel())


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    def run(ckpt_path=None, checkpoint=None):
        L.seed_everything(7)
        recorder = LRRecorder()
        schedule = LRSchedule(warmup_steps=2, reference_batch_size=2)
        callbacks = [schedule, recorder] + ([checkpoint] if checkpoint else [])
        model = GroupedBoringModel(momentum=0.9)
        trainer = make_trainer(
            max_epochs=2, limit_train_batches=4, callbacks=callbacks, enable_checkpointing=checkpoint is not None
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return recorder, model

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    full, full_model = run(checkpoint=checkpoint)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    resumed_checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    resumed, resumed_model = run(ckpt_path=tmp_path / "epoch=0-step=4.ckpt", checkpoint=resumed_checkpoint)

    assert sorted(resumed.lrs) == [4, 5, 6, 7]
    assert {t: full.lrs[t] for t in range(4, 8)} == resumed.lrs  # exact, float for float
    assert torch.equal(full_model.layer.weight, resumed_model.layer.weight)
    assert torch.equal(full_model.layer.bias, resumed_model.layer.bias)


class InfAtStep2(GroupedBoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step == 2:
            out["loss"] = out["loss"] * float("inf")
        return out


def test_a_step_skipped_by_the_grad_scaler_still_advances_the_schedule():
    schedule = LRSchedule(warmup_steps=2, decay="linear")
    recorder = LRRecorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    trainer = make_trainer(
        max_steps=6, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[schedule, recorder]
    )
    trainer.fit(InfAtStep2())

    assert trainer.global_step == 6
    assert scaler.get_scale() == 2.0**3  # halved once, by the inf step
    # The skipped step ran no optimizer step (no post-hook record) and left the weights untouched...
    assert sorted(recorder.lrs) == [0, 1, 3, 4, 5]
    assert torch.equal(recorder.weights[3], recorder.weights[2])
    assert not torch.equal(recorder.weights[4], recorder.weights[3])
    # ...but it counted: step 3 uses factor(3), as in the uninterrupted schedule.
    factors = [lr_factor(t, total_steps=6, warmup_steps=2, decay="linear") for t in range(6)]
    assert recorder.lrs_before == {t: [0.1 * f, 0.01 * f] for t, f in enumerate(factors)}
    assert recorder.lrs == {t: recorder.lrs_before[t] for t in (0, 1, 3, 4, 5)}


# ---------------------------------------------------------------------------------------------
# The preview command.
# ---------------------------------------------------------------------------------------------
def test_preview_prints_the_boundaries(capsys):
    main(["--total-steps", "100", "--warmup-steps", "10", "--decay", "cosine", "--min-lr-factor", "0.1", "--rows", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "LRSchedule preview: total_steps=100, warmup_steps=10, decay=cosine, min_lr_factor=0.1"
    table = {int(line.split()[0]): float(line.split()[1]) for line in lines[2:]}
    assert sorted(table) == [0, 9, 10, 50, 99, 100]
    assert table[0] == 0.0 and table[10] == 1.0 and table[100] == 0.1
    assert table[50] == round(lr_factor(50, total_steps=100, warmup_steps=10, min_lr_factor=0.1), 6)


def test_preview_reads_a_recipe_config_and_plots(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 40\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n"
        "    - class_path: lightning_recipes.callbacks.LRSchedule\n"
        "      init_args:\n"
        "        decay: step\n"
        "        warmup_fraction: 0.25\n"
        "        milestones: [20, 30]\n"
        "        gamma: 0.5\n"
        "        reference_batch_size: 256\n"
    )
    png = tmp_path / "curve.png"
    main(["--config", str(config), "--base-lr", "0.2", "--rows", "2", "--plot", str(png)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: reference_batch_size is set")
    rows = {int(line.split()[0]): float(line.split()[2]) for line in out[3:-1]}
    assert rows == {0: 0.0, 9: 0.18, 10: 0.2, 19: 0.2, 20: 0.1, 29: 0.1, 30: 0.05, 39: 0.05, 40: 0.05}
    assert out[-1] == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_reports_bad_configurations(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--total-steps", "10", "--warmup-steps", "20"])
    assert exit_info.value.code == 2
    assert "`warmup_steps=20` must be shorter than training" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--decay", "linear"])
    assert "--total-steps is required" in capsys.readouterr().err


def test_documented_preview_command_runs_and_the_picture_exists(tmp_path):
    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "lightning_recipes.callbacks.lr_schedule"]
    # The README's command, writing its picture to tmp_path instead of over docs/lr_schedule_preview.png.
    args = "--total-steps 1000 --warmup-steps 100 --decay cosine --min-lr-factor 0.1 --base-lr 1e-3 --plot".split()
    result = subprocess.run(command + args + ["preview.png"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2].split() == ["1000", "0.100000", "1.0000e-04"]
    assert lines[-1] == "wrote preview.png" and (tmp_path / "preview.png").is_file()
    assert (ROOT / "docs" / "lr_schedule_preview.png").is_file()


# ---------------------------------------------------------------------------------------------
# The file is drop-in: only torch, lightning and the standard library, and it works copied alone.
# ---------------------------------------------------------------------------------------------
def test_the_file_imports_only_torch_lightning_and_the_standard_library(tmp_path):
    allowed = {"torch", "lightning", "typing_extensions"} | set(sys.stdlib_module_names)
    tree = ast.parse(SOURCE.read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    in_functions = {id(node) for function in functions for node in ast.walk(function)}

    def roots(nodes):
        found = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, "relative import: the file would not work copied alone"
                found.add(node.module.split(".")[0])
        return found

    module_level = roots(node for node in ast.walk(tree) if id(node) not in in_functions)
    assert module_level <= allowed, module_level - allowed
    # The preview command alone may use yaml (installed with jsonargparse) and matplotlib, lazily.
    lazy = roots(node for function in functions for node in ast.walk(function))
    assert lazy - allowed == {"yaml", "matplotlib"}

    copied = tmp_path / "my_lr_schedule.py"
    shutil.copy(SOURCE, copied)
    spec = importlib.util.spec_from_file_location("my_lr_schedule", copied)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    schedule = module.LRSchedule(decay="constant")
    make_trainer(max_steps=2, callbacks=[schedule]).fit(GroupedBoringModel())
    assert schedule.base_lrs == [0.1, 0.01]
