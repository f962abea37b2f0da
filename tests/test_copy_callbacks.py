"""The callbacks as a user copies them: files in a project that is not ours, without this package installed."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader

ROOT = Path(__file__).resolve().parents[1]

# README, "Copying a callback": exact resume needs these three files side by side; each other callback is one file.
EXACT_RESUME = ["checkpoint.py", "checkpoint_io.py", "resumable_loader.py"]
SINGLE_FILES = ["lr_schedule.py", "grad_norm.py", "accumulation.py", "ema.py"]

SCRIPT = '''
import sys
import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from {package}checkpoint import ResumableCheckpoint
from {package}lr_schedule import LRSchedule
from {package}grad_norm import GradNormMonitor
from {package}accumulation import GradientAccumulation
from {package}ema import ExponentialMovingAverage


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x + 0.1 * torch.randn_like(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g))
        return DataLoader(data, batch_size=4, shuffle=True)


class Stop(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == int(sys.argv[2]):
            raise RuntimeError("pre-empted")


L.seed_everything(0, verbose=False)
ema = ExponentialMovingAverage(decay=0.9, update_every_n_steps=2)
callbacks = [ResumableCheckpoint(every_n_steps=2), LRSchedule(warmup_steps=2), GradNormMonitor(),
             GradientAccumulation(global_batch_size=8), ema]
if int(sys.argv[2]) >= 0:
    callbacks.append(Stop())
trainer = L.Trainer(default_root_dir=sys.argv[1], max_epochs=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=callbacks)
model = Net()
try:
    trainer.fit(model, ckpt_path=sys.argv[3] if len(sys.argv) > 3 else None)
except RuntimeError as err:
    print("stopped:", err)
weights = model.state_dict()
weights.update(("ema." + name, value) for name, value in ema.state_dict()["average"].items())
torch.save(weights, sys.argv[1] + "/weights.pt")
assert not [m for m in sys.modules if m.startswith("lightning_recipes")], "the copied files imported this package"
'''


def _run(project: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "train.py", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["top-level modules", "a package of the project"])
def test_copied_files_resume_bit_exact_in_a_foreign_project(tmp_path, layout):
    project = tmp_path / "project"
    target = project if layout == "top-level modules" else project / "mycallbacks"
    target.mkdir(parents=True)
    if target != project:
        (target / "__init__.py").write_text("")
    for name in EXACT_RESUME + SINGLE_FILES:
        shutil.copy(ROOT / "callbacks" / name, target / name)
    package = "" if target == project else "mycallbacks."
    (project / "train.py").write_text(SCRIPT.format(package=package))
    _run(project, str(tmp_path / "reference"), "-1")
    if layout == "top-level modules":
        return  # the imports between the three files work both ways; the resume itself is the same code
    assert "stopped: pre-empted" in _run(project, str(tmp_path / "run"), "7")
    _run(project, str(tmp_path / "run"), "-1", "last")
    reference = torch.load(tmp_path / "reference/weights.pt", weights_only=True)
    resumed = torch.load(tmp_path / "run/weights.pt", weights_only=True)
    assert any(k.startswith("ema.") for k in reference)  # the EMA average resumes too
    assert all(torch.equal(resumed[k], v) for k, v in reference.items())


class _WhatTheWorkerIgnores(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor([signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN])


def test_loader_workers_ignore_the_stop_signals_that_the_main_process_handles():
    calls = []
    loader = ResumableDataLoader(_WhatTheWorkerIgnores(), batch_size=4, num_workers=1, worker_init_fn=calls.append)
    (batch,) = list(loader)
    assert batch.all()  # in the worker: SIGTERM and SIGUSR1 ignored
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process keeps its handler
    main_process = list(ResumableDataLoader(_WhatTheWorkerIgnores(), batch_size=4))[0]
    assert not main_process.any()
