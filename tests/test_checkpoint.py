"""ResumableCheckpoint: files on disk, atomic saves, bit-exact resume (in process and after kill -9), SIGTERM, bad files."""

import inspect
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_recipes.callbacks import GradientAccumulation, ResumableCheckpoint
from lightning_recipes.callbacks.checkpoint import _rng_state, _set_rng_state
from lightning_recipes.callbacks.checkpoint_io import SafeCheckpointIO
from lightning_recipes.recipes.vit import main as vit_main

ROOT = Path(__file__).resolve().parents[1]
FIT_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(L.Trainer.fit).parameters  # Lightning >= 2.6


class Noisy(Dataset):
    """Random augmentation per sample from the global torch, NumPy and Python RNGs."""

    def __init__(self, n: int = 50) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        noise = 0.1 * torch.randn(8) + float(np.random.uniform(-0.1, 0.1)) + random.uniform(-0.1, 0.1)
        return self.x[i] + noise, self.y[i]


class Net(L.LightningModule):
    """Shuffled, augmented data; dropout; AdamW: every source of state an exact resume must restore."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))
        self.batch_size = 8

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(Noisy(), batch_size=self.batch_size, shuffle=True)  # 7 batches, the last of 2

    def val_dataloader(self):
        return DataLoader(Noisy(16), batch_size=8)


class Interrupt(L.Callback):
    """Raises `error` before the batch after optimizer step `step`, or sends this process SIGTERM after batch
    `sigterm_at = (epoch, batch_idx)`."""

    def __init__(self, step: int = -1, *, error=None, sigterm_at=None) -> None:
        self.step, self.error, self.sigterm_at = step, error, sigterm_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.error is not None and trainer.global_step == self.step:
            raise self.error

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this batch


class StartStep(L.Callback):
    def __init__(self) -> None:
        self.step = None

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def _trainer(root, callbacks, epochs=3, **kwargs):
    return L.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _fit(root, callbacks, ckpt_path=None, epochs=3, weights_only=None, model_class=Net, **kwargs):
    L.seed_everything(0, verbose=False)
    model = model_class()
    if weights_only is not None and not FIT_TAKES_WEIGHTS_ONLY:  # Lightning < 2.6: the plugin's own default
        kwargs["plugins"] = [SafeCheckpointIO(weights_only=weights_only)]
    trainer = _trainer(root, callbacks, epochs, **kwargs)
    extra = {"weights_only": weights_only} if FIT_TAKES_WEIGHTS_ONLY else {}
    trainer.fit(model, ckpt_path=ckpt_path, **extra)
    return model, trainer


def _equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _files(root) -> list[str]:
    return sorted(os.listdir(Path(root) / "checkpoints"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, r"`every_n_steps` must be an integer >= 1 or None, got 0"),
        ({"keep_last": 0}, ValueError, r"`keep_last` must be an integer >= 1 \(last\.ckpt is the newest of them\), got 0"),
        ({"top_k": 3}, ValueError, r"`top_k=3` keeps the best checkpoints by `monitor`, which is None"),
        ({"monitor": "val/loss", "top_k": -1}, ValueError, r"`top_k` must be an integer >= 0, got -1"),
        ({"mode": "best"}, ValueError, r"`mode` must be 'min' or 'max', got 'best'"),
        ({"filename": "last"}, ValueError, r"`filename` must be a non-empty template .* got 'last'"),
        ({"dirpath": "s3://bucket/run"}, ValueError, r"`dirpath='s3://bucket/run'`: .* not an object store"),
        ({"save_on_epoch_end": False}, ValueError, r"would never save"),
        ({"resumable_data": 1}, TypeError, r"`resumable_data` must be True or False, got 1"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResumableCheckpoint(**kwargs)


def test_a_second_model_checkpoint_in_the_same_directory_is_refused(tmp_path):
    callbacks = [ResumableCheckpoint(dirpath=str(tmp_path)), ModelCheckpoint(dirpath=str(tmp_path))]
    with pytest.raises(
        MisconfigurationException,
        match=r"ResumableCheckpoint\(dirpath=.*\) and ModelCheckpoint\(dirpath=.*\) both write to",
    ):
        _fit(tmp_path, callbacks)


def test_files_kept_last_is_a_hard_link_and_everything_loads_weights_only(tmp_path):
    losses = {}

    class Losses(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                losses[trainer.global_step] = float(trainer.callback_metrics["val/loss"])

    checkpoint = ResumableCheckpoint(every_n_steps=3, keep_last=2, monitor="val/loss")
    _fit(tmp_path, [checkpoint, Losses()])
    best_step = min(losses, key=losses.get)  # validation at the end of each epoch: steps 7, 14, 21
    best = f"epoch={best_step // 7 - 1}-step={best_step}.ckpt"
    assert _files(tmp_path) == sorted({"epoch=2-step=18.ckpt", "epoch=2-step=21.ckpt", "last.ckpt", best})
    folder = tmp_path / "checkpoints"
    assert os.path.samefile(folder / "last.ckpt", folder / "epoch=2-step=21.ckpt")
    assert Path(checkpoint.best_model_path).name == best
    for name in _files(tmp_path):
        loaded = torch.load(folder / name, weights_only=True)
        state = loaded["callbacks"][checkpoint.state_key]
        assert sorted(state["rng"][0]) == ["numpy", "python", "torch"]
        (position,) = loaded["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        assert set(position) == {"seed", "epoch", "batches"}
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 21


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.save({"rng": _rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    model, _ = _fit(root, [ResumableCheckpoint(every_n_steps=3)])
    return model


def test_exception_saves_and_resume_is_bit_exact(tmp_path, uninterrupted):
    with pytest.raises(RuntimeError, match="node lost"):
        _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3), Interrupt(10, error=RuntimeError("node lost"))])
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 10
    start = StartStep()
    resumed, trainer = _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3), start], ckpt_path="last")
    assert (start.step, trainer.global_step) == (10, 21)
    assert _equal(resumed, uninterrupted)


class EarlyLoader(Net):
    """Two loader workers (they take their first indices as soon as the iterator exists), and the train loader
    built in `setup`, before Lightning restores the checkpoint (Lightning issue #20550)."""

    def setup(self, stage):
        assert self.trainer.estimated_stepping_batches == 21

    def train_dataloader(self):
        return DataLoader(Noisy(), batch_size=self.batch_size, shuffle=True, num_workers=2)


def test_resume_is_exact_when_the_train_iterator_started_before_the_restore(tmp_path, uninterrupted):
    stop = Interrupt(10, error=RuntimeError("node lost"))
    with pytest.raises(RuntimeError, match="node lost"):
        _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3), stop], model_class=EarlyLoader)
    resumed, trainer = _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3)], ckpt_path="last", model_class=EarlyLoader)
    assert trainer.global_step == 21
    assert _equal(resumed, uninterrupted)  # the uninterrupted run had no workers: sample seeds do not depend on them


def test_without_the_callback_a_mid_epoch_resume_is_not_exact(tmp_path, uninterrupted):
    # The control: Lightning's ModelCheckpoint resumes from the same step, but the data order and RNGs differ.
    callbacks = [ModelCheckpoint(every_n_train_steps=5, save_last=True), Interrupt(10, error=RuntimeError("node lost"))]
    with pytest.raises(RuntimeError, match="node lost"):
        _fit(tmp_path, callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed, trainer = _fit(tmp_path, [ModelCheckpoint(every_n_train_steps=5, save_last=True)], ckpt_path="last")
    assert trainer.global_step == 21
    assert not _equal(resumed, uninterrupted)


def test_sigterm_inside_an_accumulation_window_saves_exits_cleanly_and_resumes_exactly(tmp_path):
    def callbacks():  # k = 2: 4 optimizer steps per epoch of 7 batches
        return [GradientAccumulation(global_batch_size=16), ResumableCheckpoint(every_n_steps=3)]

    reference, _ = _fit(tmp_path / "reference", callbacks())
    # Step 5 is reached after batch 1 of epoch 1; SIGTERM arrives after batch 2, the first half of a window.
    with pytest.raises(SIGTERMException) as stopped:
        _fit(tmp_path / "run", [*callbacks(), Interrupt(sigterm_at=(1, 2))])
    assert stopped.value.code is None  # SystemExit(None): the process exits with status 0
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    state = saved["callbacks"]["ResumableCheckpoint{'monitor': None, 'mode': 'min'}"]
    (position,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the ResumableDataLoader's own state
    assert (saved["global_step"], position["epoch"], position["batches"]) == (5, 1, 3)
    assert len(state["grads"]) == 4  # the half window's gradients, one per parameter
    resumed, trainer = _fit(tmp_path / "run", callbacks(), ckpt_path="last")
    assert trainer.global_step == 12
    assert _equal(resumed, reference)


def _flip_a_byte_inside_the_largest_member(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        offset = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))
    return info.filename


def test_bad_files_are_named_with_what_is_wrong(tmp_path):
    _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3)])
    good = tmp_path / "checkpoints/epoch=2-step=21.ckpt"
    cases = {}
    cases["empty"] = (b"", r"empty file \(0 bytes\)")
    content = good.read_bytes()
    cases["truncated"] = (content[: len(content) // 2], rf"truncated or not written by torch\.save: no zip directory at the end of its {len(content) // 2} bytes")
    for name, (data, match) in cases.items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(data)
        with pytest.raises(RuntimeError, match=rf"Cannot resume from checkpoint {re.escape(str(bad))}: {match}"):
            _fit(tmp_path / name, [ResumableCheckpoint()], ckpt_path=str(bad))
    flipped = tmp_path / "flipped.ckpt"
    shutil.copy(good, flipped)
    member = _flip_a_byte_inside_the_largest_member(flipped)
    with pytest.raises(
        RuntimeError,
        match=rf"Cannot resume from checkpoint {re.escape(str(flipped))}: corrupted: member '{member}' fails its CRC-32 check",
    ):
        _fit(tmp_path / "flipped", [ResumableCheckpoint()], ckpt_path=str(flipped))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(RuntimeError, match=r"not a Lightning training checkpoint: no 'state_dict', 'loops', 'global_step'"):
        _fit(tmp_path / "foreign", [ResumableCheckpoint()], ckpt_path=str(foreign))


class Opaque:
    """Not a tensor, container or primitive: torch's weights-only unpickler refuses it."""


def test_loading_is_weights_only_unless_asked_otherwise(tmp_path):
    _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3)], epochs=1)
    path = tmp_path / "checkpoints/last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"] = {"opaque": Opaque()}
    os.remove(path)  # a hard link: write a new file rather than through the kept one
    torch.save(checkpoint, path)
    fix = r"pass trainer\.fit\(\.\.\., weights_only=False\)" if FIT_TAKES_WEIGHTS_ONLY else r"use SafeCheckpointIO\(weights_only=False\)"
    with pytest.raises(RuntimeError, match=rf"only load with weights_only=False .* {fix}"):
        _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3)], ckpt_path="last", epochs=2)
    start = StartStep()
    _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3), start], ckpt_path="last", epochs=2, weights_only=False)
    assert start.step == 7


def test_last_falls_back_to_the_newest_loadable_checkpoint_and_says_so(tmp_path):
    _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3, keep_last=2)])
    last = tmp_path / "checkpoints/last.ckpt"
    os.truncate(last, 1000)  # last.ckpt and epoch=2-step=21.ckpt are one file (hard link): both broken
    start = StartStep()
    with pytest.warns(UserWarning, match=r"skipped unloadable checkpoint\(s\) .*last\.ckpt: truncated .*step=21\.ckpt: truncated.* Resuming from .*epoch=2-step=18\.ckpt, the newest loadable one"):
        _, trainer = _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3, keep_last=2), start], ckpt_path="last", epochs=4)
    assert (start.step, trainer.global_step) == (18, 28)
    os.truncate(tmp_path / "checkpoints/epoch=3-step=28.ckpt", 10)
    os.truncate(tmp_path / "checkpoints/epoch=3-step=27.ckpt", 0)
    with pytest.raises(RuntimeError, match=r"no loadable checkpoint in .*checkpoints to resume from \('last'\): .*empty file"):
        _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3)], ckpt_path="last")


def test_a_crash_while_writing_leaves_last_intact(tmp_path, monkeypatch):
    class FailingWrite(L.Callback):
        """The disk fills up halfway through writing the step-6 file (inside SafeCheckpointIO's real write)."""

        def on_train_start(self, trainer, pl_module):
            original = torch.save

            def save(obj, f, *args, **kwargs):
                if trainer.global_step == 6:
                    f.write(b"PK\x03\x04 half a checkpoint")
                    monkeypatch.undo()  # once
                    raise OSError("No space left on device")
                return original(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", save)

    with pytest.raises(OSError, match="No space left"):
        _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3, save_on_exception=False), FailingWrite()])
    assert _files(tmp_path) == [".epoch=0-step=6.ckpt.tmp", "epoch=0-step=3.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    start = StartStep()
    _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3), start], ckpt_path="last", epochs=1)
    assert start.step == 3 and ".epoch=0-step=6.ckpt.tmp" not in _files(tmp_path)


def test_asynchronous_saves_resume_bit_exact(tmp_path, uninterrupted):
    checkpoint = ResumableCheckpoint(every_n_steps=3, asynchronous=True)
    with pytest.raises(RuntimeError, match="node lost"):
        _fit(tmp_path, [checkpoint, Interrupt(10, error=RuntimeError("node lost"))])
    # Steps 3, 6, 7 (epoch end), 9 and the exception's save at 10, each written in the background; the exception's
    # save is on disk before `fit` re-raises.
    assert checkpoint.io.asynchronous and len(checkpoint.io.stall_seconds) == len(checkpoint.io.wait_seconds) == 5
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 10
    start = StartStep()
    resumed, trainer = _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3, asynchronous=True), start], ckpt_path="last")
    assert (start.step, trainer.global_step) == (10, 21)
    assert _equal(resumed, uninterrupted)
    assert _files(tmp_path) == ["epoch=2-step=21.ckpt", "last.ckpt"]
    assert os.path.samefile(tmp_path / "checkpoints/last.ckpt", tmp_path / "checkpoints/epoch=2-step=21.ckpt")


class _GatedSave:
    """torch.save that waits for `gate` first: the background write is provably still running."""

    def __init__(self, monkeypatch, before=None) -> None:
        self.gate, self.original, self.before = threading.Event(), torch.save, before
        monkeypatch.setattr(torch, "save", self)

    def __call__(self, obj, f, *args, **kwargs):
        if self.before is not None:
            self.before()  # in the writer thread, as the write begins
        assert self.gate.wait(30)
        return self.original(obj, f, *args, **kwargs)


def _state(weights: torch.Tensor, step: int = 1) -> dict:
    return {"state_dict": {"w": weights}, "loops": {}, "global_step": step, "lists": [weights]}


def test_the_background_writer_saves_the_state_as_it_was_when_asked(tmp_path, monkeypatch):
    save = _GatedSave(monkeypatch)
    io = SafeCheckpointIO(asynchronous=True)
    weights = torch.zeros(1000)
    io.save_checkpoint(_state(weights), tmp_path / "a.ckpt")
    weights += 1  # training goes on while the file is written
    deadline = time.monotonic() + 10
    while not (tmp_path / ".a.ckpt.tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer thread opens its temporary file, then waits at the gate
    assert (tmp_path / ".a.ckpt.tmp").exists() and not (tmp_path / "a.ckpt").exists()  # not committed yet
    save.gate.set()
    io.teardown()
    saved = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(1000)) and torch.equal(saved["lists"][0], torch.zeros(1000))
    assert not (tmp_path / ".a.ckpt.tmp").exists()


def test_a_second_save_waits_for_the_one_in_flight_and_the_wait_is_recorded(tmp_path, monkeypatch):
    committed, committed_as_each_write_began = [], []
    save = _GatedSave(monkeypatch, before=lambda: committed_as_each_write_began.append(list(committed)))
    io = SafeCheckpointIO(asynchronous=True)
    io.save_checkpoint(_state(torch.zeros(3)), tmp_path / "a.ckpt", storage_options={"after_commit": committed.append})
    threading.Timer(0.3, save.gate.set).start()
    io.save_checkpoint(_state(torch.ones(3), 2), tmp_path / "b.ckpt", storage_options={"after_commit": committed.append})
    io.wait()
    # The first was committed (and rotated) before the second began. (Read in the writer thread: once the second
    # call has returned, its own small write may already be done too.)
    assert committed_as_each_write_began == [[], [str(tmp_path / "a.ckpt")]]
    assert io.wait_seconds[0] == 0.0 and io.wait_seconds[1] >= 0.2
    io.teardown()
    assert committed == [str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]
    # The second snapshot reused the first one's buffers (same shapes) only once the first file was written.
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]["w"], torch.zeros(3))
    assert torch.equal(torch.load(tmp_path / "b.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(3))
    with pytest.raises(TypeError, match=r"storage_options=\{'bucket': 'x'\}\): the only option is"):
        io.save_checkpoint(_state(torch.ones(3)), tmp_path / "c.ckpt", storage_options={"bucket": "x"})


def test_an_error_in_the_background_write_reaches_the_training_loop(tmp_path):
    io = SafeCheckpointIO(asynchronous=True)
    (tmp_path / "a_file").write_text("")
    io.save_checkpoint(_state(torch.zeros(3)), tmp_path / "a_file" / "x.ckpt")  # its folder is a file
    with pytest.raises((FileExistsError, NotADirectoryError)):
        io.wait()


class OwnStatefulLoader(DataLoader):
    """A user's own resumable loader (as torchdata's StatefulDataLoader): used as it is, restored by Lightning."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loaded = None

    def state_dict(self) -> dict:
        return {"mine": 42}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


class OwnLoaderNet(Net):
    def train_dataloader(self):
        self.loader = OwnStatefulLoader(Noisy(), batch_size=self.batch_size, shuffle=True)
        return self.loader


def test_a_loader_with_its_own_state_is_used_as_is_and_lightning_restores_it(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cannot be made resumable" warning either
        model, trainer = _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3, keep_last=3)], epochs=1,
                              model_class=OwnLoaderNet)  # fmt: skip
    assert trainer.train_dataloader is model.loader  # not rebuilt
    middle = tmp_path / "checkpoints/epoch=0-step=6.ckpt"  # mid-epoch: Lightning restores loader states there
    saved = torch.load(middle, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"mine": 42}]
    resumed, _ = _fit(tmp_path, [ResumableCheckpoint(every_n_steps=3)], ckpt_path=str(middle), epochs=1,
                      model_class=OwnLoaderNet)  # fmt: skip
    assert resumed.loader.loaded == {"mine": 42}


def test_validate_from_a_checkpoint_leaves_nothing_behind_for_a_later_fit(tmp_path):
    # Lightning >= 2.5 restores callback state in validate/test too. A checkpoint written by SIGTERM inside an
    # accumulation window holds RNG states, half a window's gradients and a data position: none may leak into a
    # later fit without a checkpoint on the same Trainer.
    def callbacks():
        return [GradientAccumulation(global_batch_size=16), ResumableCheckpoint(every_n_steps=3)]

    with pytest.raises(SIGTERMException):
        _fit(tmp_path / "run", [*callbacks(), Interrupt(sigterm_at=(1, 2))])
    saved = tmp_path / "run/checkpoints/last.ckpt"
    assert "grads" in torch.load(saved, weights_only=True)["callbacks"][ResumableCheckpoint().state_key]
    reference, _ = _fit(tmp_path / "reference", callbacks())
    trainer = _trainer(tmp_path / "again", callbacks())
    trainer.validate(Net(), ckpt_path=str(saved), verbose=False)
    L.seed_everything(0, verbose=False)
    model = Net()
    trainer.fit(model)
    assert trainer.global_step == 12
    assert _equal(model, reference)


def test_a_damaged_checkpoint_given_to_a_recipe_is_named_before_anything_loads(tmp_path):
    _fit(tmp_path, [ResumableCheckpoint()], epochs=1)
    good = (tmp_path / "checkpoints/last.ckpt").read_bytes()
    cases = {
        "empty.ckpt": (b"", r"empty file \(0 bytes\)"),
        "half.ckpt": (good[: len(good) // 2], r"truncated or not written by torch\.save"),
        "text.ckpt": (b"not a checkpoint at all", r"truncated or not written by torch\.save"),
    }
    for name, (data, problem) in cases.items():
        (tmp_path / name).write_bytes(data)
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(good)
    member = _flip_a_byte_inside_the_largest_member(flipped)
    cases["flipped.ckpt"] = (None, rf"corrupted: member '{re.escape(member)}' fails its CRC-32 check")
    for name, (_, problem) in cases.items():
        path = re.escape(str(tmp_path / name))
        with pytest.raises(SystemExit, match=rf"^error: --ckpt_path {path}: Cannot resume from checkpoint {path}: {problem}"):
            vit_main(["fit", "--ckpt_path", str(tmp_path / name), "--trainer.max_steps=1"])
    # As a user types it: one line on stderr, status 1, no traceback.
    done = subprocess.run([sys.executable, str(ROOT / "recipes/vit.py"), "fit", "--ckpt_path", str(tmp_path / "half.ckpt")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"Cannot resume from checkpoint {tmp_path / 'half.ckpt'}: truncated or not written by torch.save" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The headline: the ViT recipe on digits, kill -9 mid-epoch, `--ckpt_path last`, weights torch.equal.
# ---------------------------------------------------------------------------------------------------------------

HELPERS = '''
import io, os, time
import torch
import lightning.pytorch as L


class PauseAfterCheckpoint(L.Callback):
    """At the first batch after optimizer step `step` (just checkpointed): tell the test, wait for kill -9."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            open(self.marker, "w").close()
            time.sleep(600)


class StallWhileSaving(L.Callback):
    """The checkpoint of optimizer step `step` stops half written: tell the test, wait for kill -9."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_start(self, trainer, pl_module):
        original = torch.save  # what SafeCheckpointIO writes its temporary file with

        def save(obj, f, *args, **kwargs):
            if trainer.global_step == self.step:
                buffer = io.BytesIO()
                original(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                open(self.marker, "w").close()
                time.sleep(600)
            return original(obj, f, *args, **kwargs)

        torch.save = save
'''

CONFIG = """
trainer:
  max_epochs: 2
  limit_train_batches: 12
  limit_val_batches: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_recipes.callbacks.LRSchedule
      init_args:
        decay: cosine
        warmup_fraction: 0.1
    - class_path: lightning_recipes.callbacks.GradNormMonitor
    - class_path: lightning_recipes.callbacks.ResumableCheckpoint
      init_args:
        dirpath: {dirpath}
        every_n_steps: 3
        monitor: val/acc
        mode: max
{extra}model:
  depth: 1
  width: 32
  heads: 2
  mlp_dim: 32
  dropout: 0.1
data:
  class_path: lightning_recipes.datamodules.DigitsDataModule
  init_args:
    batch_size: 64
"""


def _config(path: Path, dirpath: Path, extra: str = "", asynchronous: bool = False) -> Path:
    text = CONFIG.format(dirpath=dirpath, extra=textwrap.indent(extra, "    "))
    if asynchronous:
        text = text.replace("        every_n_steps: 3\n", "        every_n_steps: 3\n        asynchronous: true\n")
    path.write_text(text)
    return path


def _args(config: Path, workers: int) -> list[str]:
    # Workers that persist across epochs would create the validation iterator once instead of at every validation,
    # and each creation draws a seed from the global RNG: the runs with 2 workers would follow another (equally
    # exact) trajectory. Without persistence, 0 and 2 workers give identical runs: one reference serves both.
    return ["fit", f"--config={config}", f"--data.num_workers={workers}", "--data.persistent_workers=false"]


def _recipe_in_process(config: Path, workers: int, *args: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocess (OMP_NUM_THREADS=1): same kernels, same rounding
    try:
        vit_main([*_args(config, workers), *args])
    finally:
        torch.set_num_threads(threads)


def _final(dirpath: Path) -> dict:
    return torch.load(dirpath / "last.ckpt", weights_only=True)


# 12 batches of 64 per epoch, a checkpoint every 3 steps.
# workers=0: killed while paused right after the step-6 checkpoint (epoch 0, batch 6 of 12).
# workers=2: killed in the middle of writing the step-18 checkpoint (epoch 1), so it resumes from step 15.
# workers=2 saves asynchronously: the kill hits the background writer while the training loop has gone on.
KILLS = {0: ("PauseAfterCheckpoint", 6, 6), 2: ("StallWhileSaving", 18, 15)}
ASYNC = {0: False, 2: True}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """Starts both runs to be killed (each spends most of its time importing), trains the uninterrupted reference
    meanwhile, then kill -9s each run once it reached its point."""
    root = tmp_path_factory.mktemp("recipe")
    (root / "kill_helpers.py").write_text(HELPERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    runs = {}
    for workers, (helper, step, _) in KILLS.items():
        folder = root / f"killed_workers{workers}"
        folder.mkdir()
        extra = f"- class_path: kill_helpers.{helper}\n  init_args:\n    step: {step}\n    marker: {folder / 'marker'}\n"
        config = _config(folder / "run.yaml", folder / "ckpt", extra, asynchronous=ASYNC[workers])
        log = open(folder / "log.txt", "w")
        command = [sys.executable, str(ROOT / "recipes/vit.py"), *_args(config, workers)]
        runs[workers] = (subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), folder)
    cwd = os.getcwd()
    try:
        folder = root / "reference"
        folder.mkdir()
        os.chdir(folder)  # the CLI writes its config.yaml into the working directory
        _recipe_in_process(_config(folder / "run.yaml", folder / "ckpt"), 0)
        reference = _final(folder / "ckpt")
    finally:
        os.chdir(cwd)
        deadline = time.monotonic() + 240
        for workers, (process, folder) in runs.items():
            while not (folder / "marker").exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            process.kill()  # SIGKILL: no handler, no finally, no flush
            process.wait()
    for workers, (process, folder) in runs.items():
        assert (folder / "marker").exists(), f"never reached the kill point:\n{(folder / 'log.txt').read_text()[-3000:]}"
        assert process.returncode == -signal.SIGKILL
    return {workers: folder for workers, (_, folder) in runs.items()}, reference


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_mid_epoch_then_ckpt_path_last_ends_with_equal_weights(workers, recipe_runs):
    killed, reference = recipe_runs  # the reference ran with 0 workers: the result does not depend on them
    folder = killed[workers]
    _, step, resume_step = KILLS[workers]
    dirpath = folder / "ckpt"
    on_disk = sorted(os.listdir(dirpath))
    assert torch.load(dirpath / "last.ckpt", weights_only=True)["global_step"] == resume_step
    if workers == 2:
        partial = dirpath / f".epoch=1-step={step}.ckpt.tmp"
        assert partial.name in on_disk and not zipfile.is_zipfile(partial)
        assert f"epoch=1-step={step}.ckpt" not in on_disk
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        _recipe_in_process(_config(folder / "resume.yaml", dirpath, asynchronous=ASYNC[workers]), workers, "--ckpt_path", "last")
    finally:
        os.chdir(cwd)
    assert not [name for name in os.listdir(dirpath) if name.endswith(".tmp")]
    resumed = _final(dirpath)
    assert resumed["global_step"] == reference["global_step"] == 24
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for mine, theirs in zip(resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
