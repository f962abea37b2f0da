"""GradientAccumulation: k from the global batch size, exact window means, schedules, BatchNorm warning, logging."""

import warnings

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from recording_logger import RecordingLogger
from lightning_recipes.callbacks import GradientAccumulation, LRSchedule

B = 4  # micro batch
K = 4  # micro-batches per window
GLOBAL = B * K


class Features(L.LightningModule):
    """Per-sample loss (a mean over the batch) of a model whose gradient does not depend on the batch's makeup."""

    def __init__(self, n: int, dtype: torch.dtype = torch.float64, norm: str = "layer", batch_sampler=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        if norm == "layer":
            self.net = nn.LayerNorm(8)
        else:  # BatchNorm: each sample's output depends on the rest of its (micro-)batch
            self.net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.net.to(dtype)
        with torch.no_grad():
            for p in self.net.parameters():
                p.normal_()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=g, dtype=dtype) * 3
        self.y = torch.randn(n, 8, generator=g, dtype=dtype)
        self.batch_size = B  # found by GradientAccumulation through lightning_getattr
        self.batch_sampler = batch_sampler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        data = TensorDataset(self.x, self.y)
        if self.batch_sampler is not None:
            return DataLoader(data, batch_sampler=self.batch_sampler)
        return DataLoader(data, batch_size=self.batch_size)


class Windows(L.Callback):
    """Records the micro-batches of every optimizer step and what the Trainer estimated at train start."""

    def __init__(self) -> None:
        self.windows: list[int] = []
        self.count = 0
        self.estimated = None

    def on_train_start(self, trainer, pl_module):
        self.estimated = trainer.estimated_stepping_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.count += 1
        if len(self.windows) < trainer.global_step:  # this batch stepped
            self.windows.append(self.count)
            self.count = 0


def _fit(model, *, epochs=1, callbacks=(), logger=False, **trainer_kwargs):
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(model)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), trainer


def _large_batches(n: int, size: int = GLOBAL) -> list[list[int]]:
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"global_batch_size": 0}, ValueError, r"`global_batch_size` must be an integer >= 1, got 0"),
        ({"global_batch_size": 16, "micro_batch_size": 2.0}, ValueError, r"`micro_batch_size` must be an integer >= 1, got 2.0"),
        ({"global_batch_size": 16, "schedule_unit": "batch"}, ValueError, r"`schedule_unit` must be one of 'epoch', 'step', got 'batch'"),
        ({"global_batch_size": 16, "partial_window": "keep"}, ValueError, r"`partial_window` must be one of 'mean', 'drop', got 'keep'"),
        ({"global_batch_size": 16, "schedule": {0: 32}}, ValueError, r"`schedule` must map integer starts >= 1 .* got \{0: 32\}"),
        ({"global_batch_size": 16, "schedule": {2: 32, 4: 8}}, ValueError, r"must not decrease the global batch size: global_batch_size=16 then \{2: 32, 4: 8\}"),
        ({"global_batch_size": 16, "log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` must be an integer >= 1, got 0"),
        ({"schedule": {2: 32}}, ValueError, r"`schedule=\{2: 32\}` grows the global batch from `global_batch_size`, which is None"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradientAccumulation(**kwargs)


def test_a_global_batch_that_is_not_a_multiple_names_the_numbers_and_the_nearest_choices():
    with pytest.raises(
        MisconfigurationException,
        match=r"global_batch_size = 100 is not a multiple of micro batch 16 x 1 data-parallel processes = 16\."
        r" Nearest valid global batch sizes: 96 or 112, or a micro batch size m with m x 1 dividing 100"
        r" \(e\.g\. 10 or 20\)",
    ):
        _fit(Features(32), callbacks=[GradientAccumulation(global_batch_size=100, micro_batch_size=16)])
    with pytest.raises(MisconfigurationException, match=r"schedule\[1\] = 18 is not a multiple of micro batch 4"):
        _fit(Features(32), callbacks=[GradientAccumulation(global_batch_size=16, schedule={1: 18})])


def test_conflicts_with_trainer_settings_name_both():
    with pytest.raises(
        MisconfigurationException,
        match=r"GradientAccumulation\(global_batch_size=16\) sets the accumulation itself, but"
        r" Trainer\(accumulate_grad_batches=2\) is set too",
    ):
        _fit(Features(32), callbacks=[GradientAccumulation(global_batch_size=16)], accumulate_grad_batches=2)
    with pytest.raises(
        MisconfigurationException,
        match=r"GradientAccumulation\(global_batch_size=16\) and GradientAccumulationScheduler\(scheduling=\{2: 4, 0: 1\}\) both set",
    ):
        scheduler = GradientAccumulationScheduler(scheduling={2: 4})
        _fit(Features(32), callbacks=[GradientAccumulation(global_batch_size=16), scheduler])


# 43 samples: windows of 4 + 4 + 3 micro-batches, the last batch holding 3 samples (16, 16, 11 samples).
# 47 samples: three full windows of 4 micro-batches, but the last batch holds 3 samples (16, 16, 15).
@pytest.mark.parametrize("n", [43, 47])
def test_k_micro_batches_give_the_update_of_one_large_batch_in_float64(n):
    reference, _ = _fit(Features(n, batch_sampler=_large_batches(n)))
    accumulated, trainer = _fit(Features(n), callbacks=[GradientAccumulation(global_batch_size=GLOBAL)])
    lightning_default, _ = _fit(Features(n), accumulate_grad_batches=K)
    assert trainer.global_step == 3 and trainer.accumulate_grad_batches == 1  # restored after fit
    assert (accumulated - reference).abs().max() < 1e-10
    # Lightning alone divides every micro-batch by k: the last window is weighted wrongly.
    assert (lightning_default - reference).abs().max() > 1e-3


@pytest.mark.parametrize("n", [43, 47])
def test_float32_accumulation_matches_to_rounding_only(n, capsys):
    reference, _ = _fit(Features(n, torch.float32, batch_sampler=_large_batches(n)))
    accumulated, _ = _fit(Features(n, torch.float32), callbacks=[GradientAccumulation(global_batch_size=GLOBAL)])
    difference = (accumulated - reference).abs().max().item()
    with capsys.disabled():
        print(f"\nfloat32, {n} samples: max |accumulated - large batch| after 3 steps = {difference:.3g}")
    # Float addition is not associative: summing 4 partial means differs from one mean by rounding (~1e-7).
    assert 0 < difference < 1e-6


def test_drop_discards_the_partial_window_but_counts_its_step():
    n = 43
    reference, _ = _fit(Features(n, batch_sampler=_large_batches(32)))  # the two full windows only
    dropped, trainer = _fit(Features(n), callbacks=[GradientAccumulation(global_batch_size=GLOBAL, partial_window="drop")])
    assert trainer.global_step == 3
    assert (dropped - reference).abs().max() < 1e-10


def test_logs_the_global_batch_and_samples_seen_per_step():
    logger = RecordingLogger()
    _fit(Features(43), callbacks=[GradientAccumulation(global_batch_size=GLOBAL, log_every_n_steps=1)], logger=logger)
    rows = [(step, m) for step, m in logger.rows if "accumulation/global_batch_size" in m]
    assert [step for step, _ in rows] == [0, 1, 2]
    assert [m["accumulation/global_batch_size"] for _, m in rows] == [16.0, 16.0, 11.0]
    assert [m["accumulation/samples_seen"] for _, m in rows] == [16.0, 32.0, 43.0]
    assert [m["accumulation/micro_batches"] for _, m in rows] == [4.0, 4.0, 3.0]


def test_without_a_global_batch_size_it_steps_every_batch_and_only_logs():
    logger = RecordingLogger()
    plain, _ = _fit(Features(43))
    weights, trainer = _fit(Features(43), callbacks=[GradientAccumulation(log_every_n_steps=1)], logger=logger)
    assert trainer.global_step == 11  # 10 batches of 4 and one of 3: k = 1
    assert torch.equal(weights, plain)
    rows = [m for _, m in logger.rows if "accumulation/global_batch_size" in m]
    assert [m["accumulation/global_batch_size"] for m in rows] == [4.0] * 10 + [3.0]
    assert rows[-1]["accumulation/samples_seen"] == 43.0


def test_the_digits_configs_accumulate_when_the_global_batch_is_given_on_the_command_line(tmp_path, monkeypatch):
    # A named flag, whatever the place of the callback in the config's list (or none there: it is added).
    from lightning_recipes.recipes.common import run_cli
    from lightning_recipes.recipes.vit import ViTClassifier

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--global_batch_size=256", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--model.depth=1", "--model.width=32", "--model.heads=2"]
    cli = run_cli(ViTClassifier, "vit_digits.yaml", args=args)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientAccumulation)]
    assert callback.ks == [(0, 4)]  # 256 / (batch 64 x 1 process)
    assert callback.samples_seen == 256
    without = ["fit", "--config", str(_config_without_accumulation(tmp_path)), *args[1:]]
    (added,) = [c for c in run_cli(ViTClassifier, "vit_digits.yaml", args=without).trainer.callbacks
                if isinstance(c, GradientAccumulation)]  # fmt: skip
    assert added.ks == [(0, 4)]
    with pytest.raises(ValueError, match=r"global_batch_size=0 is invalid.*--global_batch_size"):
        run_cli(ViTClassifier, "vit_digits.yaml", args=["fit", "--global_batch_size=0", *args[2:]])


def _config_without_accumulation(tmp_path):
    import yaml

    from lightning_recipes.recipes.common import CONFIG_DIR

    config = yaml.safe_load((CONFIG_DIR / "vit_digits.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "GradientAccumulation" not in c["class_path"]]
    path = tmp_path / "no_accumulation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_batchnorm_warns_once_and_does_not_match_the_large_batch():
    n = 32
    reference, _ = _fit(Features(n, norm="batch", batch_sampler=_large_batches(n)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accumulated, _ = _fit(Features(n, norm="batch"), callbacks=[GradientAccumulation(global_batch_size=GLOBAL)])
    messages = [str(w.message) for w in caught if "BatchNorm" in str(w.message)]
    assert len(messages) == 1
    assert "normalise over 4 samples (the micro batch), not over the global batch of 16" in messages[0]
    assert "SyncBatchNorm" in messages[0] and "`--model.norm group`" in messages[0]
    # Same data, same windows, exact weighting: the only difference left is BatchNorm's statistics.
    assert (accumulated - reference).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("schedule", "unit", "epochs", "windows"),
    [
        # epochs: k = 1, then 2, then 4 over 10 batches per epoch
        ({1: 8, 2: 16}, "epoch", 3, [1] * 10 + [2] * 5 + [4, 4, 2]),
        # steps: k = 2 from step 4 (batch 4 is a multiple of 2), k = 4 from step 7 = the start of epoch 1
        ({4: 8, 7: 16}, "step", 2, [1, 1, 1, 1, 2, 2, 2, 4, 4, 2]),
        # k = 3 from step 5, taking effect at batch 6, the first window start that is a multiple of 3
        ({5: 12}, "step", 1, [1, 1, 1, 1, 1, 1, 3, 1]),
    ],
)
def test_schedule_keeps_estimated_steps_and_lr_schedule_exact(schedule, unit, epochs, windows):
    probe = Windows()
    lr = LRSchedule(decay="linear")
    callbacks = [GradientAccumulation(global_batch_size=4, schedule=schedule, schedule_unit=unit), probe, lr]
    _, trainer = _fit(Features(40), epochs=epochs, callbacks=callbacks)
    assert probe.windows == windows
    assert trainer.global_step == len(windows)
    assert probe.estimated == len(windows) == lr.resolved_total_steps
    assert trainer.max_steps == -1  # the planned limit is handed back after fit


class NoBatchSize(L.LightningModule):
    """What a user writes: a module without a `batch_size`, trained on a DataLoader passed to `fit`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_loader(loader, callback):
    logger, probe = RecordingLogger(), Windows()
    trainer = L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, probe])
    trainer.fit(NoBatchSize(), train_dataloaders=loader)
    rows = [m for _, m in logger.rows if "accumulation/micro_batches" in m]
    return trainer, probe, rows


DATA = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader(DATA, batch_size=8),
        DataLoader(DATA, batch_sampler=BatchSampler(RandomSampler(DATA), batch_size=8, drop_last=False)),
    ],
    ids=["batch_size", "batch_sampler"],
)
def test_the_micro_batch_size_comes_from_a_plain_dataloader_given_to_fit(loader):
    trainer, probe, rows = _fit_loader(loader, GradientAccumulation(global_batch_size=32, log_every_n_steps=1))
    # 64 samples in batches of 8: 8 micro-batches, 4 per optimizer step.
    assert trainer.global_step == 2
    assert probe.windows == [4, 4]
    assert [m["accumulation/micro_batches"] for m in rows] == [4.0, 4.0]
    assert [m["accumulation/global_batch_size"] for m in rows] == [32.0, 32.0]


def test_a_loader_without_a_batch_size_asks_for_micro_batch_size():
    loader = DataLoader(DATA, batch_sampler=[list(range(i, i + 8)) for i in range(0, 64, 8)])
    with pytest.raises(
        MisconfigurationException,
        match=r"GradientAccumulation\(global_batch_size=32\) needs the micro batch size, but neither NoBatchSize, its"
        r" hparams, the data module nor the train dataloader \(DataLoader\) or its batch sampler has an integer"
        r" `batch_size`: pass GradientAccumulation\(micro_batch_size=...\)",
    ):
        _fit_loader(loader, GradientAccumulation(global_batch_size=32))
    trainer, probe, _ = _fit_loader(loader, GradientAccumulation(global_batch_size=32, micro_batch_size=8))
    assert trainer.global_step == 2 and probe.windows == [4, 4]


def test_a_scheduler_built_before_the_loader_is_known_is_warned_about():
    class WithScheduler(NoBatchSize):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            total = self.trainer.estimated_stepping_batches  # 8 batches, counted before k is known
            return [optimizer], [torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=total)]

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[GradientAccumulation(global_batch_size=32)])
    with pytest.warns(UserWarning, match=r"the micro batch size 8 comes from the train dataloader, which exists only"
                      r" after configure_optimizers: .* instead of 4\. Pass GradientAccumulation\(micro_batch_size=8\)"):
        trainer.fit(WithScheduler(), train_dataloaders=DataLoader(DATA, batch_size=8))
    assert trainer.global_step == 2


# ---------------------------------------------------------------------------------------------------------------
# Per-token windows (weight_by="tokens"): a language model's loss is a mean over loss-bearing tokens.
# ---------------------------------------------------------------------------------------------------------------

VOCAB, LENGTH, IGNORE = 11, 6, -100


def _ragged_tokens(n: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences whose targets are padded (IGNORE) to very different lengths: 1 to LENGTH loss tokens each."""
    g = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    targets = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    keep = torch.tensor([1, 6, 2, 6, 1, 5, 3, 6, 1, 2, 6, 4, 1, 6])[:n]
    targets[torch.arange(LENGTH)[None, :] >= keep[:, None]] = IGNORE
    return inputs, targets


class TinyLM(L.LightningModule):
    """Embedding + linear head in float64; the loss is the mean over the micro-batch's loss-bearing tokens."""

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB)).double()
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_ragged_tokens()), batch_size=self.batch_size)


def _token_reference(k: int, micro: int) -> list[torch.Tensor]:
    """One SGD step per window of k micro-batches: the mean over every loss-bearing token of the window."""
    inputs, targets = _ragged_tokens()
    model = TinyLM().net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for start in range(0, len(inputs), k * micro):  # 14 sequences, windows of 3 x 2: 6, 6 and a partial 2
        x, y = inputs[start : start + k * micro], targets[start : start + k * micro]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _fit_tokens(weight_by: str) -> list[torch.Tensor]:
    model = TinyLM()
    callback = GradientAccumulation(global_batch_size=6, weight_by=weight_by)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[callback], accelerator="cpu")  # fmt: skip
    trainer.fit(model)
    assert trainer.global_step == 3
    return [p.detach().clone() for p in model.parameters()]


def test_token_weighted_windows_equal_one_large_batch_over_all_tokens_and_sample_weighting_does_not():
    reference = _token_reference(k=3, micro=2)
    tokens = _fit_tokens("tokens")
    samples = _fit_tokens("samples")
    exact = max(float((a - b).abs().max()) for a, b in zip(tokens, reference))
    off = max(float((a - b).abs().max()) for a, b in zip(samples, reference))
    print(f"\nfloat64, ragged tokens: max |token-weighted - large batch| = {exact:.2e}; sample-weighted: {off:.2e}")
    assert exact <= 1e-12
    assert off > 1e-3  # the mean of micro-batch means weighs a 1-token sequence like a 6-token one


def test_count_tokens_reads_labels_and_targets_and_says_what_it_cannot_read():
    callback = GradientAccumulation(weight_by="tokens", ignore_index=-1)
    targets = torch.tensor([[3, -1, -1], [1, 2, -1]])
    assert int(callback.count_tokens((torch.zeros(2, 3), targets))) == 3
    assert int(callback.count_tokens({"input_ids": targets, "labels": targets})) == 3
    with pytest.raises(MisconfigurationException, match=r"a dict batch needs 'labels' or 'targets', got \['x'\]"):
        callback.count_tokens({"x": targets})
    with pytest.raises(ValueError, match=r"`weight_by` must be one of 'samples', 'tokens', got 'words'"):
        GradientAccumulation(weight_by="words")
