"""The recipes on one GPU in one command: throughput, MFU and peak memory of the ImageNet and GPT configs, FSDP1,
and a kill -9 / resume that must end bit-exact with the CUDA RNG restored. Everything lands in one JSON file.

    python benchmarks/gpu_check.py               # on a GPU: about 8 min; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --plan        # the cases and their estimated seconds; runs nothing
    python benchmarks/gpu_check.py --cases 'vit_b16_*' gpt2_124m_bf16          # a subset (shell-style patterns)
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json      # the same cases, tiny, on a CPU

On the lent H200 (no network: the repository travels with ``.whl/``, which holds the jsonargparse, docstring_parser
and typeshed_client wheels the image lacks; README "GPU check" says how to fetch them), from the repository root::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    mkdir -p /tmp/shim/lightning_recipes
    for d in recipes callbacks datamodules; do ln -sfn "$PWD/$d" /tmp/shim/lightning_recipes/$d; done
    PYTHONPATH=/tmp/site:/tmp/shim PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json

(the symbolic links stand in for ``pip install -e .``, which needs nothing from the network either but writes into
the image's environment). Cases, in the order they run (what a budget cut costs least comes last):

- ``resume_kill9``: the ViT recipe at a tiny size on digits (dropout 0.1, so that training draws from the device's
  RNG; bf16-mixed, 32-true on a CPU; 2 loader workers; ``deterministic: true``: with ``warn`` the flash-attention
  backward keeps its non-deterministic kernel, torch's cuda/attention_backward.cu) is killed with SIGKILL right after
  its step-4 checkpoint, resumed with ``--ckpt_path last`` and trained to step 12: its weights and AdamW state must
  be ``torch.equal`` to an uninterrupted run's. The control resumes the same checkpoint without the device RNG
  state (the CUDA states deleted before ResumableCheckpoint reads them; on a CPU the CPU state replaced) and must
  end elsewhere, or the comparison proves nothing. The kill -9 method of tests/test_checkpoint.py.
- ``vit_b16_fsdp_bf16``: vit_b16_imagenet_fsdp.yaml as shipped (Lightning's ``FSDPStrategy``, one unit and
  activation checkpointing per encoder block) on one GPU. On a CPU the recipe refuses FSDP1 with its own message,
  which is recorded as the reason the case is skipped.
- ``gpt2_124m_bf16``: gpt2_124m.yaml on random uint16 token files (``train.bin`` / ``val.bin``, GPT-2's vocabulary
  50257), micro-batch 64 x 1024 as configured, ``global_batch_size`` 64 (one micro-batch per optimizer step) and
  warmup cut to a tenth of the steps (LRSchedule refuses a warmup longer than the run).
- ``vit_b16_*``, ``resnet50_*``: vit_b16_imagenet.yaml / resnet50_imagenet.yaml with their batch sizes (512, 128),
  crops (224; ResNet trains at 176) and augmentation, on a synthetic folder of 224-px JPEGs in 1,000 classes (256
  distinct images hard-linked as often as the steps need, so that one epoch covers the run): bf16-mixed and 16-mixed,
  eager, ``--model.channels_last true`` and ``--model.compile true`` (with channels_last).

Every case runs the recipe's own CLI (``python -m lightning_recipes.recipes.<recipe> fit --config <case>/case.yaml``:
the shipped config merged with the case's overrides by recipes/compare.py's ``merge``; devices 1, strategy auto
unless the config's FSDP, the precision, ``limit_train_batches`` = steps in one epoch, 2 validation batches, logs in
the case's folder) in a process of its own, forked from a server process that imported torch, Lightning and the
recipes once (``multiprocessing``'s forkserver, which never touches CUDA: each case initialises its own). A case has
a timeout; one that fails, times out (after writing its threads' stacks to its log) or is skipped is recorded with
its reason and the last lines of its log, and the others still run. The total ``--budget`` (480 s on a GPU) is
estimated from per-case guesses before anything starts, and enforced: a case is skipped when less is left than its
estimate, and killed when the budget runs out.

Inside each case a ``Probe`` callback (``RunStats`` of recipes/compare.py, i.e. Lightning's ``ThroughputMonitor``,
which synchronises the device after every batch) writes to the case's folder: samples per second over the batches
after ``warmup`` (a fifth of the steps), the share of that time spent waiting for the data loader, the device's peak
``torch.cuda.max_memory_allocated`` during training, and the model FLOPs of one training sample: counted by
``FlopCounterMode`` (Lightning's ``measure_flops``) on a meta-device copy of the model at the batch's shape for the
images, and nanoGPT's ``6 N + 12 L d T`` per token for the GPT (the count is recorded too). MFU = FLOPs per sample x
samples/s / the dense bf16/fp16 peak of the GPU, from overhead.py's table by ``torch.cuda.get_device_name()`` (H100
SXM and H200 989e12, A100 312e12; ``--peak-flops`` otherwise); an unknown device gets no MFU and a note.

``--cpu-smoke`` (automatic without CUDA) runs the same cases on the CPU at a tiny size (16-px crops of 32-px images
in 10 classes, one encoder block or a ResNet-18, a one-block GPT with context 16, 3 steps, one torch thread per
case): the precisions as the recipes run them on a CPU, ``torch.compile`` with ``backend="eager"`` (Dynamo traces
the model and Lightning trains it; Inductor's code generation is left to the GPU run), the kill -9 / resume for real.
It writes nothing to benchmarks/results unless ``--out`` says so.
"""

from __future__ import annotations

import argparse
import faulthandler
import fnmatch
import inspect
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import RunningStage

from overhead import PEAK_BF16_FLOPS, gpt_flops_per_token
from report import RESULTS, Report, config_of, machine

from lightning_recipes.recipes.common import CONFIG_DIR
from lightning_recipes.recipes.compare import RunStats, merge

BENCHMARKS = Path(__file__).resolve().parent
RECIPE_CLASSES = {
    "vit": ("lightning_recipes.recipes.vit", "ViTClassifier"),
    "resnet": ("lightning_recipes.recipes.resnet", "ResNetClassifier"),
    "gpt": ("lightning_recipes.recipes.gpt", "GPT"),
}
#: What the server process imports once, so that a case's process starts without importing anything big.
PRELOAD = ["torch", "torchvision", "lightning.pytorch", "tensorboard", "lightning_recipes.recipes.compare",
           *(module for module, _ in RECIPE_CLASSES.values())]  # fmt: skip
TAIL_LINES = 40
PROBE = "probe.json"
SMOKE_BATCH, SMOKE_CONTEXT = 4, 16


# ------------------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    """One run of a recipe: its config, the overrides that make it a one-GPU measurement, and its time estimate."""

    name: str
    recipe: str  # vit | resnet | gpt | resume
    config: Optional[str]  # a file in recipes/configs
    precision: str
    steps: int = 0
    warmup: int = 0
    compile: bool = False
    channels_last: bool = False
    keep_strategy: bool = False  # the config's (FSDP) strategy, else strategy auto
    estimate_s: float = 0.0  # on an H100-class GPU (or this machine's CPU in smoke mode), for the plan

    @property
    def model_options(self) -> list[str]:
        """The ``--model.*`` options this case needs beyond the config (the recipes' newer arguments)."""
        return [name for name, on in (("compile", self.compile), ("channels_last", self.channels_last)) if on]


# Guesses for an H100-class GPU, from public figures for these models (eager bf16: ResNet-50 at 176 px ~2,500
# images/s, ViT-B/16 ~1,500 images/s, GPT-2 124M ~200k tokens/s); only the plan and the timeouts use them.
# Steps are what fits the default plan into 8 minutes (--steps raises them); the first fifth of them is warmup.
STARTUP_S, COMPILE_S = 15.0, 80.0
SECONDS_PER_STEP = {"resnet50": 0.06, "vit_b16": 0.35, "vit_b16_fsdp": 0.5, "gpt2_124m": 0.35}
GPU_STEPS = {"resnet50": 120, "vit_b16": 50, "vit_b16_fsdp": 40, "gpt2_124m": 60}
RESUME_S, RESUME_STEPS, KILL_STEP = 45.0, 12, 4


def plan(smoke: bool, steps: Optional[int] = None) -> list[Case]:
    """Every case, in the order they run: correctness first, then eager throughput, then compiled throughput."""

    def throughput(name: str, model: str, config: str, precision: str, **kwargs: Any) -> Case:
        n = steps or (3 if smoke else GPU_STEPS[model])
        # The throughput window starts at the end of batch `warmup`, so at least the first batch is left out.
        warmup = min(1 if smoke else max(5, n // 5), n - 1)
        estimate = 10.0 if smoke else STARTUP_S + n * SECONDS_PER_STEP[model]
        if kwargs.get("compile"):
            estimate += 10.0 if smoke else COMPILE_S
        recipe = "gpt" if model.startswith("gpt") else "vit" if model.startswith("vit") else "resnet"
        return Case(name, recipe, config, precision, n, warmup, estimate_s=estimate, **kwargs)

    vit, resnet = "vit_b16_imagenet.yaml", "resnet50_imagenet.yaml"
    return [
        Case("resume_kill9", "resume", None, "32-true" if smoke else "bf16-mixed", steps=RESUME_STEPS,
             estimate_s=40.0 if smoke else RESUME_S),
        throughput("vit_b16_fsdp_bf16", "vit_b16_fsdp", "vit_b16_imagenet_fsdp.yaml", "bf16-mixed", keep_strategy=True),
        throughput("gpt2_124m_bf16", "gpt2_124m", "gpt2_124m.yaml", "bf16-mixed"),
        throughput("vit_b16_bf16", "vit_b16", vit, "bf16-mixed"),
        throughput("resnet50_bf16", "resnet50", resnet, "bf16-mixed"),
        throughput("vit_b16_fp16", "vit_b16", vit, "16-mixed"),
        throughput("resnet50_fp16_cl", "resnet50", resnet, "16-mixed", channels_last=True),
        throughput("resnet50_bf16_cl", "resnet50", resnet, "bf16-mixed", channels_last=True),
        throughput("resnet50_bf16_compile_cl", "resnet50", resnet, "bf16-mixed", compile=True, channels_last=True),
        throughput("vit_b16_bf16_compile_cl", "vit_b16", vit, "bf16-mixed", compile=True, channels_last=True),
    ]


def missing_options(case: Case) -> list[str]:
    """The case's ``--model.*`` options that its recipe's LightningModule does not take (yet)."""
    if case.recipe not in RECIPE_CLASSES or not case.model_options:
        return []
    module, name = RECIPE_CLASSES[case.recipe]
    parameters = inspect.signature(getattr(__import__(module, fromlist=[name]), name).__init__).parameters
    return [f"--model.{option}" for option in case.model_options if option not in parameters]


# ------------------------------------------------------------------------------------------------ synthetic data


def write_image_folder(root: Path, *, classes: int, image_size: int, distinct: int, train: int, val: int) -> Path:
    """``root/train/<class>/`` and ``root/val/<class>/`` with ``train`` / ``val`` JPEGs: ``distinct`` smooth random
    images (seed 0; noise upsampled, so they compress like photographs), hard-linked round-robin over the classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sources = root / "distinct"
    sources.mkdir(parents=True)
    for i in range(distinct):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((image_size, image_size), Image.BICUBIC)
        noise = rng.integers(-12, 13, (image_size, image_size, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(sources / f"{i}.jpg", quality=90)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            (root / split / f"c{c:04d}").mkdir(parents=True)
        for i in range(max(count, classes)):  # every class needs an image in both splits
            os.link(sources / f"{i % distinct}.jpg", root / split / f"c{i % classes:04d}" / f"{i}.jpg")
    return root


def write_tokens(root: Path, *, vocab: int, train: int, val: int) -> Path:
    """``train.bin`` / ``val.bin`` of uniformly random uint16 token ids below ``vocab`` (seed 0), nanoGPT's format."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, count in (("train", train), ("val", val)):
        rng.integers(0, vocab, count, dtype=np.uint16).tofile(root / f"{split}.bin")
    return root


# ------------------------------------------------------------------------------------------------ inside a case


def peak_flops_of(name: str) -> Optional[float]:
    """Dense bf16/fp16 peak FLOP/s of a GPU by its ``torch.cuda.get_device_name()``; None if not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


class Probe(RunStats):
    """In a case's process: throughput over the last ``window_size`` batches (``RunStats``, i.e. Lightning's
    ``ThroughputMonitor``), the share of it spent waiting for data, the device's peak memory during training and the
    FLOPs of one training sample, written to ``out`` as JSON every 10 batches and at the end of training."""

    def __init__(self, *, out: str, window_size: int, peak_flops: Optional[float] = None) -> None:
        super().__init__(window_size=window_size)
        self.out, self.peak_flops = Path(out), peak_flops
        self.record: dict[str, Any] = {"batches": 0, "window_batches": window_size - 1}
        self._waits: deque[float] = deque(maxlen=window_size - 1)  # the waits inside the throughput window
        self._ended: Optional[float] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            name = torch.cuda.get_device_name(device)
            peak = self.peak_flops or peak_flops_of(name)
        else:
            name, peak = machine()["processor"], self.peak_flops
        half = str(trainer.precision) in ("bf16-mixed", "16-mixed") or self.peak_flops is not None
        self.record.update(device=device.type, device_name=name, precision=str(trainer.precision),
                           peak_flops=peak if half else None)  # fmt: skip
        if self.record["peak_flops"] is None:
            self.record["mfu_note"] = (
                f"no dense bf16/fp16 peak known for {name!r} at precision {trainer.precision}: MFU not computed "
                "(--peak-flops gives one)"
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._ended is not None:
            self._waits.append(now - self._ended)
        if "flops_per_sample" not in self.record:
            self.record.update(count_flops(pl_module, batch))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # synchronises the device
        self._ended = time.perf_counter()
        record = self.record
        record["batches"] += 1
        # Lightning 2.6: ThroughputMonitor keeps its Throughput objects in `_throughputs`; compute() is public and
        # gives the window's rate once the window is full.
        throughput = self._throughputs[RunningStage.TRAINING]
        rate = throughput.compute().get("device/samples_per_sec")
        if rate is not None:
            elapsed = throughput._time[-1] - throughput._time[0]
            record.update(samples_per_sec=rate, window_seconds=elapsed, data_wait_fraction=sum(self._waits) / elapsed)
            if record.get("tokens_per_sample"):
                record["tokens_per_sec"] = rate * record["tokens_per_sample"]
            if record.get("peak_flops") and record.get("flops_per_sample"):
                record["mfu"] = record["flops_per_sample"] * rate / record["peak_flops"]
        device = trainer.strategy.root_device
        if device.type == "cuda":
            record["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            record["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and record["batches"] % 10 == 0:
            record["train_loss"] = float(loss)
        if record["batches"] % 10 == 0:
            self.write()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.record["train_loss"] = float(loss)
        self.record["finished"] = True
        self.write()

    def write(self) -> None:
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, self.out)  # the parent never reads half a file, even from a killed case


def count_flops(pl_module: LightningModule, batch: Any) -> dict[str, Any]:
    """FLOPs of one training sample (forward + backward), counted on a meta-device copy of the model at the batch's
    shape; for the GPT also nanoGPT's formula, which the MFU uses (the convention GPT figures are quoted in)."""
    from lightning.fabric.utilities.throughput import measure_flops

    inputs = batch[0]
    # The module's own arguments (LightningCLI adds its `_instantiator` to the saved hyperparameters).
    arguments = inspect.signature(type(pl_module).__init__).parameters
    hparams = {k: v for k, v in pl_module.hparams.items() if k in arguments}
    if "compile" in hparams:
        hparams["compile"] = False  # compilation changes no FLOP, and a meta copy must not compile
    try:
        with torch.device("meta"):
            twin = type(pl_module)(**hparams)
            example = torch.empty(inputs.shape, dtype=inputs.dtype, device="meta")
        counted = measure_flops(twin.model, lambda: twin.model(example), loss_fn=lambda out: out.float().sum())
    except Exception as error:  # noqa: BLE001 - a case must not fail for want of a FLOP count
        return {"flops_per_sample": None, "flops_note": f"FLOP count failed: {type(error).__name__}: {error}"}
    result: dict[str, Any] = {"flops_per_sample_counted": counted / inputs.shape[0], "batch_shape": list(inputs.shape)}
    if inputs.dtype == torch.long:  # token ids: the GPT
        length = inputs.shape[1]
        per_token = gpt_flops_per_token(twin, length)
        result.update(flops_per_sample=per_token * length, flops_source="6N + 12 L d T per token (nanoGPT)",
                      tokens_per_sample=length)  # fmt: skip
    else:
        result.update(flops_per_sample=counted / inputs.shape[0], flops_source="FlopCounterMode")
    return result


class PauseAfterCheckpoint(Callback):
    """At the first batch after optimizer step ``step`` (just checkpointed): tell the parent, wait for SIGKILL."""

    def __init__(self, *, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            time.sleep(600)


class DropDeviceRng(Callback):
    """The control of the resume case: before ResumableCheckpoint reads the checkpoint, delete its CUDA RNG states
    (what a callback without the CUDA path would restore: nothing) or, with no CUDA state saved (CPU), replace the
    CPU state by a freshly seeded one. Writes what it did to ``marker``."""

    def __init__(self, *, marker: str) -> None:
        self.marker = marker

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        done = []
        for key, state in checkpoint.get("callbacks", {}).items():
            if not (key.startswith("ResumableCheckpoint") and isinstance(state, dict) and "rng" in state):
                continue
            for rank_state in state["rng"]:
                if "cuda" in rank_state:
                    del rank_state["cuda"]
                    done.append("cuda state deleted")
                else:
                    rank_state["torch"] = torch.Generator().manual_seed(12345).get_state()
                    done.append("cpu state replaced")
        Path(self.marker).write_text(json.dumps(done))


def _child(recipe: str, argv: list[str], log: str, smoke: bool, compile: bool) -> None:
    """A case's process: the recipe's CLI with ``argv``, its output in ``log``, in a process group of its own, in the
    log's folder (where the CLI writes its config.yaml when there is no logger)."""
    os.setpgrp()  # the parent's kill reaches the loader workers and compile workers too
    os.chdir(os.path.dirname(log))
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # the parent's timeout asks for the stacks first
    # A process the forkserver started has "forkserver" as its default start method, and DataLoader workers would
    # start from that server (35 s instead of 2 s for the resume case's run); use the platform's default, as a script.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the config's gpu_check.Probe
    if smoke:
        # Two OpenMP threads on a small machine shared with other jobs wait for each other at every parallel region
        # (steps several times slower); one thread per case, as tests/test_checkpoint.py's killed runs.
        torch.set_num_threads(1)
        if compile:
            _compile_eagerly()
    print(f"python -m lightning_recipes.recipes.{recipe} {' '.join(argv)}", flush=True)
    __import__(f"lightning_recipes.recipes.{recipe}", fromlist=["main"]).main(argv)


def _compile_eagerly() -> None:
    """CPU smoke only: torch.compile with backend='eager' (Dynamo's tracing, no Inductor C++ build, which takes
    minutes on a small CPU). ``nn.Module.compile`` calls ``torch.compile`` too."""
    original = torch.compile

    def compile_(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("mode", None)
        kwargs.pop("options", None)
        kwargs["backend"] = "eager"
        return original(*args, **kwargs)

    torch.compile = compile_


# ------------------------------------------------------------------------------------------------ the parent


class Runner:
    """Starts case processes from one forkserver, waits with timeouts, kills (SIGKILL, the whole group)."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        # The server must not initialise CUDA before it forks (a forked child could not use it). It imports Lightning,
        # which sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (lightning/fabric/__init__.py): torch.cuda.is_available() there
        # asks NVML and creates no CUDA context.
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)

    def start(self, recipe: str, argv: list[str], log: Path, compile: bool = False) -> multiprocessing.Process:
        sys.stdout.flush()
        sys.stderr.flush()
        process = self.context.Process(target=_child, args=(recipe, argv, str(log), self.smoke, compile))
        process.start()
        return process

    @staticmethod
    def kill(process: multiprocessing.Process) -> None:
        for send in (lambda: os.killpg(process.pid, signal.SIGKILL), process.kill):
            try:
                send()
            except (ProcessLookupError, PermissionError):
                pass
        process.join()

    def wait(self, process: multiprocessing.Process, timeout: float) -> Optional[int]:
        """The exit code, or None after a timeout: the process writes its threads' stacks into its log (SIGUSR2,
        faulthandler), then its process group is killed."""
        process.join(max(timeout, 0.0))
        if process.exitcode is None:
            try:
                os.kill(process.pid, signal.SIGUSR2)
                process.join(3)
            except ProcessLookupError:
                pass
            self.kill(process)
            return None
        try:
            os.killpg(process.pid, signal.SIGKILL)  # loader workers a crash may have left behind
        except (ProcessLookupError, PermissionError):
            pass
        return process.exitcode


def tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    if not path.is_file():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def case_config(case: Case, folder: Path, *, smoke: bool, data: dict[str, Path], workers: int,
                peak_flops: Optional[float]) -> dict:  # fmt: skip
    """The shipped config merged with what makes the case a one-device measurement in ``folder``."""
    config = yaml.safe_load((CONFIG_DIR / case.config).read_text())
    trainer: dict[str, Any] = {
        "accelerator": "cpu" if smoke else "gpu",
        "devices": 1,
        "precision": case.precision,
        "max_steps": case.steps,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "default_root_dir": str(folder),
        "logger": {"init_args": {"save_dir": str(folder)}},
        "callbacks": [
            {
                "class_path": "gpu_check.Probe",
                "init_args": {"out": str(folder / PROBE), "window_size": case.steps - case.warmup + 1,
                              "peak_flops": peak_flops},  # fmt: skip
            }
        ],
    }
    if not case.keep_strategy:
        trainer["strategy"] = "auto"
    model: dict[str, Any] = {option: True for option in case.model_options}
    if case.recipe == "gpt":
        batch = batch_size(case, smoke)
        # One micro-batch per optimizer step; validation once, after the measured steps.
        # The config's 715 warmup steps are longer than the run, which LRSchedule refuses.
        trainer.update(val_check_interval=case.steps)
        callbacks = "lightning_recipes.callbacks"
        trainer["callbacks"] += [
            {"class_path": f"{callbacks}.GradientAccumulation", "init_args": {"global_batch_size": batch}},
            {"class_path": f"{callbacks}.LRSchedule", "init_args": {"warmup_steps": max(1, case.steps // 10)}},
        ]
        data = {"path": str(data["tokens"]), "batch_size": batch, "num_workers": 0 if smoke else 2}
        model["sample_length"] = 4 if smoke else 16
        if smoke:
            data["context_length"] = SMOKE_CONTEXT
            model.update(depth=1, width=32, heads=2)
    else:
        trainer.update(max_epochs=1, limit_train_batches=case.steps)
        data = {"root": str(data["images"]), "num_workers": 0 if smoke else workers}
        if smoke:
            data.update(batch_size=SMOKE_BATCH, train_crop_size=16, val_resize_size=16, val_crop_size=16)
            if case.recipe == "resnet":
                model["arch"] = "resnet18"
            else:
                model.update(depth=1, width=64, heads=2, mlp_dim=64)
    return merge(config, {"trainer": trainer, "model": model, "data": {"init_args": data}})


def run_throughput(case: Case, folder: Path, runner: Runner, timeout: float, **kwargs: Any) -> dict[str, Any]:
    config = case_config(case, folder, smoke=runner.smoke, **kwargs)
    (folder / "case.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = ["fit", "--config", str(folder / "case.yaml")]
    record: dict[str, Any] = {
        "command": f"python -m lightning_recipes.recipes.{case.recipe} {' '.join(argv)}",
        "steps": case.steps,
        "warmup": case.warmup,
        "batch_size": config["data"]["init_args"].get("batch_size"),
    }
    log = folder / "log.txt"
    code = runner.wait(runner.start(case.recipe, argv, log, case.compile), timeout)
    probe = json.loads((folder / PROBE).read_text()) if (folder / PROBE).is_file() else {}
    record.update(probe)
    record["exit_code"] = code
    if case.keep_strategy and runner.smoke:
        # The recipes refuse FSDP1 on a CPU with their own message: that message is the reason this case is skipped.
        refusal = next((line for line in tail(log, 200) if "needs GPUs" in line), None)
        if code not in (None, 0) and refusal:
            return {**record, "status": "skipped", "reason": f"CPU: {refusal.strip()}"}
        reason = "expected the recipe to refuse FSDP1 on a CPU"
        return {**record, "status": "failed", "reason": reason, "log_tail": tail(log)}
    if code is None:
        return {**record, "status": "timeout", "reason": f"killed after {timeout:.0f} s", "log_tail": tail(log)}
    if code != 0:
        return {**record, "status": "failed", "reason": f"exit code {code}", "log_tail": tail(log)}
    if not probe.get("samples_per_sec"):
        return {**record, "status": "failed", "reason": "no throughput: fewer batches than the window",
                "log_tail": tail(log)}  # fmt: skip
    return {**record, "status": "ok"}


RESUME_CONFIG = """
seed_everything: 0
trainer:
  accelerator: {accelerator}
  devices: 1
  precision: {precision}
  deterministic: true
  max_steps: {steps}
  limit_val_batches: 0
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
        every_n_steps: {every}
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
    num_workers: 2
    persistent_workers: false
"""


def _resume_config(folder: Path, dirpath: Path, smoke: bool, extra: str = "") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    # bf16 on a CPU without bf16 instructions is emulated and slow; the CUDA path is what the GPU run is for.
    text = RESUME_CONFIG.format(
        accelerator="cpu" if smoke else "gpu",
        precision="32-true" if smoke else "bf16-mixed",
        steps=RESUME_STEPS,
        every=KILL_STEP,
        dirpath=dirpath,
        extra="".join(f"    {line}\n" for line in extra.splitlines()),
    )
    (folder / "case.yaml").write_text(text)
    return ["fit", "--config", str(folder / "case.yaml")]


def _compare(a: dict, b: dict) -> list[str]:
    """Names of the weights and optimizer-state tensors that are not torch.equal between two checkpoints."""
    differ = [name for name, t in a["state_dict"].items() if not torch.equal(t, b["state_dict"][name])]
    states = zip(a["optimizer_states"][0]["state"].items(), b["optimizer_states"][0]["state"].values())
    for (index, mine), theirs in states:
        differ += [f"optimizer.{index}.{key}" for key, value in mine.items()
                   if torch.is_tensor(value) and not torch.equal(value, theirs[key])]  # fmt: skip
    return differ


def run_resume(case: Case, folder: Path, runner: Runner, timeout: float) -> dict[str, Any]:
    """Kill -9 after the step-4 checkpoint, resume to step 12; compare with an uninterrupted run and with a control.

    The run to kill and the uninterrupted one start together, then the resumed run and the control (on a copy of the
    killed run's checkpoints) together; each process is the recipe's CLI, as a user would run it.
    """
    deadline = time.monotonic() + timeout
    killed, reference, control = folder / "killed", folder / "reference", folder / "control"
    marker, dropped = killed / "marker", control / "dropped.json"
    pause = f"- class_path: gpu_check.PauseAfterCheckpoint\n  init_args:\n    step: {KILL_STEP}\n    marker: {marker}"
    drop = f"- class_path: gpu_check.DropDeviceRng\n  init_args:\n    marker: {dropped}"
    record: dict[str, Any] = {"kill_after_step": KILL_STEP, "steps": RESUME_STEPS}

    def start(where: Path, log: str, extra: str = "", *args: str) -> multiprocessing.Process:
        return runner.start("vit", [*_resume_config(where, where / "ckpt", runner.smoke, extra), *args], where / log)

    def failed(reason: str, log: Path) -> dict[str, Any]:
        return {**record, "status": "failed", "reason": reason, "log_tail": tail(log)}

    to_kill, uninterrupted = start(killed, "log.txt", pause), start(reference, "log.txt")
    while not marker.exists() and to_kill.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.2)
    runner.kill(to_kill)
    record["killed_exit_code"] = to_kill.exitcode
    if not marker.exists():
        runner.kill(uninterrupted)
        return failed("the run to kill never reached its checkpoint", killed / "log.txt")
    if runner.wait(uninterrupted, deadline - time.monotonic()) != 0:
        return failed("the uninterrupted run failed", reference / "log.txt")
    last = torch.load(killed / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    record["resumed_from_step"] = last["global_step"]
    rng = next(state["rng"] for key, state in last["callbacks"].items() if key.startswith("ResumableCheckpoint"))
    record["cuda_rng_saved"] = "cuda" in rng[0]
    shutil.copytree(killed / "ckpt", control / "ckpt")
    runs = {
        "resumed": (start(killed, "resume_log.txt", "", "--ckpt_path", "last"), killed / "resume_log.txt"),
        "control": (start(control, "log.txt", drop, "--ckpt_path", "last"), control / "log.txt"),
    }
    codes = {name: runner.wait(process, deadline - time.monotonic()) for name, (process, _) in runs.items()}
    for name, (_, log) in runs.items():
        if codes[name] != 0:
            return failed(f"the {name} run: exit code {codes[name]}", log)
    final = {name: torch.load(where / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
             for name, where in (("reference", reference), ("resumed", killed), ("control", control))}  # fmt: skip
    optimizer_tensors = sum(len(state) for state in final["reference"]["optimizer_states"][0]["state"].values())
    record.update(
        final_steps={name: checkpoint["global_step"] for name, checkpoint in final.items()},
        tensors=len(final["reference"]["state_dict"]) + optimizer_tensors,
        differing=_compare(final["resumed"], final["reference"]),
        control_differing=len(_compare(final["control"], final["reference"])),
        control=json.loads(dropped.read_text()) if dropped.is_file() else [],
    )
    problems = []
    if record["killed_exit_code"] != -signal.SIGKILL:
        problems.append(f"the killed run's exit code is {record['killed_exit_code']}, not -SIGKILL")
    if record["resumed_from_step"] != KILL_STEP or set(record["final_steps"].values()) != {RESUME_STEPS}:
        problems.append(f"steps: resumed from {record['resumed_from_step']}, ended at {record['final_steps']}")
    if record["differing"]:
        differing = record["differing"]
        problems.append(f"{len(differing)} tensors differ from the uninterrupted run: {differing[:5]}")
    if not record["control"] or record["control_differing"] == 0:
        problems.append("the control (device RNG state not restored) ends equal too: the comparison proves nothing")
    if not runner.smoke and not record["cuda_rng_saved"]:
        problems.append("the checkpoint holds no CUDA RNG state")
    if problems:
        return failed("; ".join(problems), killed / "resume_log.txt")
    return {**record, "status": "ok"}


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    parser.add_argument("--cases", nargs="+", default=["*"], metavar="PATTERN",
                        help="run only the cases whose names match these shell-style patterns (default: all)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run, enforced (default 480 on a GPU, 600 in CPU smoke mode)")
    parser.add_argument("--steps", type=int, default=None, help="steps of every throughput case (default: per model)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers of the image cases (default: CPU cores - 1)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="dense bf16/fp16 peak FLOP/s for MFU (default: by GPU name; none on a CPU)")
    parser.add_argument("--plan", action="store_true", help="print the cases and their estimates; run nothing")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the cases' folders go (default: a temporary folder, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep every case's checkpoints (and the temporary folder)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/gpu_check.json on a GPU; required with --cpu-smoke)")
    args = parser.parse_args(argv)  # fmt: skip
    start = time.monotonic()
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if args.steps is not None and args.steps < 2:
        parser.error(f"--steps {args.steps}: use at least 2 (a throughput window spans 2 batches or more)")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers {args.workers}: use 0 or more")
    if args.peak_flops is not None and not args.peak_flops > 0:
        parser.error(f"--peak-flops {args.peak_flops}: use a positive FLOP/s figure, e.g. 989e12")
    budget = args.budget if args.budget is not None else 600.0 if smoke else 480.0
    if not budget > 0:
        parser.error(f"--budget {budget}: use a positive number of seconds")
    if smoke and args.out is None and not args.plan:
        parser.error("--cpu-smoke: give --out (CPU numbers never go to benchmarks/results/gpu_check.json)")
    cases = [c for c in plan(smoke, args.steps) if any(fnmatch.fnmatchcase(c.name, p) for p in args.cases)]
    if not cases:
        parser.error(f"--cases {' '.join(args.cases)} matches none of {[c.name for c in plan(smoke)]}")
    estimate = sum(c.estimate_s for c in cases)
    print(f"gpu_check ({'CPU smoke' if smoke else 'GPU'}): {len(cases)} cases, estimated {estimate:.0f} s, "
          f"budget {budget:.0f} s")  # fmt: skip
    for case in cases:
        print(f"  {case.name:28s} {case.estimate_s:6.0f} s  {case.steps or '':>4} steps")
    if estimate > budget:
        print("  the estimate exceeds the budget: the last cases may be skipped (--budget, --cases, --steps)")
    if args.plan:
        return {"cases": [c.name for c in cases], "estimate_s": estimate, "budget_s": budget}

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(smoke)
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    results: list[dict[str, Any]] = []
    try:
        data = write_data(cases, workdir, smoke)
        for case in cases:
            left = budget - (time.monotonic() - start)
            folder = workdir / case.name
            folder.mkdir()
            began = time.monotonic()
            if left < case.estimate_s:
                reason = f"budget: {max(left, 0):.0f} s left, the case needs about {case.estimate_s:.0f} s"
                result = {"status": "skipped", "reason": reason}
            elif missing_options(case):
                result = {"status": "failed", "reason": f"the recipe has no {', '.join(missing_options(case))} option"}
            elif case.recipe == "resume":
                result = run_resume(case, folder, runner, min(left, 4 * case.estimate_s + 60))
            else:
                result = run_throughput(case, folder, runner, min(left, 2 * case.estimate_s + 60), data=data,
                                        workers=workers, peak_flops=args.peak_flops)  # fmt: skip
            results.append({"name": case.name, "recipe": case.recipe, "config": case.config,
                            "precision": case.precision, "compile": case.compile, "channels_last": case.channels_last,
                            **result, "seconds": round(time.monotonic() - began, 1), "estimate_s": case.estimate_s})  # fmt: skip
            _print_case(results[-1])
            if not args.keep:
                for checkpoint in list(folder.rglob("*.ckpt")):  # files, or FSDP's sharded folders
                    if checkpoint.is_dir():
                        shutil.rmtree(checkpoint, ignore_errors=True)
                    else:
                        checkpoint.unlink(missing_ok=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - start
    return _report(args, argv, results, smoke=smoke, budget=budget, estimate=estimate, seconds=seconds)


def write_data(cases: list[Case], workdir: Path, smoke: bool) -> dict[str, Path]:
    """The synthetic image folder and token files the cases need, sized so that one epoch covers every run."""
    data: dict[str, Path] = {}
    images = [c for c in cases if c.recipe in ("vit", "resnet")]
    if images:
        batches = [batch_size(c, smoke) for c in images]
        # The configs' repeated-augmentation sampler (ra_reps) makes epochs of len(dataset) // 256 * 256 samples.
        train = 256 * math.ceil((max(c.steps * b for c, b in zip(images, batches)) + max(batches)) / 256)
        data["images"] = write_image_folder(workdir / "images", classes=10 if smoke else 1000,
                                            image_size=32 if smoke else 224, distinct=20 if smoke else 256,
                                            train=train, val=2 * max(batches))  # fmt: skip
    texts = [c for c in cases if c.recipe == "gpt"]
    if texts:
        batch, context = batch_size(texts[0], smoke), SMOKE_CONTEXT if smoke else 1024
        steps = max(c.steps for c in texts)
        data["tokens"] = write_tokens(workdir / "tokens", vocab=50257, train=(steps + 2) * batch * (context + 1),
                                      val=2 * batch * context + 1)  # fmt: skip
    return data


def batch_size(case: Case, smoke: bool) -> int:
    """Samples per step of a case: its config's, or the CPU smoke mode's."""
    config = yaml.safe_load((CONFIG_DIR / case.config).read_text())
    return SMOKE_BATCH if smoke else config["data"]["init_args"]["batch_size"]


def _print_case(result: dict[str, Any]) -> None:
    rate = result.get("tokens_per_sec") or result.get("samples_per_sec")
    reason = f" ({result['reason']})" if result.get("reason") else ""
    print(f"{result['name']}: {result['status']}{reason}" + (f", {rate:,.0f}/s" if rate else "")
          + f" in {result['seconds']:.0f} s", flush=True)  # fmt: skip


def _report(args: argparse.Namespace, argv: list[str], results: list[dict], *, smoke: bool, budget: float,
            estimate: float, seconds: float) -> dict:  # fmt: skip
    report = Report("gpu_check", 1, config_of(args, argv))
    for r in results:
        if r["status"] != "ok":
            continue
        if r["recipe"] == "resume":
            report.add(f"{r['name']}: tensors differing from the uninterrupted run", [len(r["differing"])],
                       goal=("==", 0), note=f"weights + AdamW state, {r['tensors']} tensors; killed after step "
                       f"{r['kill_after_step']}")  # fmt: skip
            report.add(f"{r['name']} control: tensors differing without the device RNG state",
                       [r["control_differing"]], goal=(">=", 1), note="; ".join(r["control"]))  # fmt: skip
            continue
        if r.get("tokens_per_sec"):
            report.add(f"{r['name']}: throughput", [r["tokens_per_sec"]], unit="tokens/s")
        else:
            report.add(f"{r['name']}: throughput", [r["samples_per_sec"]], unit="images/s")
        if r.get("mfu") is not None:
            report.add(f"{r['name']}: MFU", [100 * r["mfu"]], unit="%")
        report.add(f"{r['name']}: data wait", [100 * r["data_wait_fraction"]], unit="%",
                   note="share of the window spent waiting for the loader")  # fmt: skip
        if r.get("peak_memory_mib") is not None:
            report.add(f"{r['name']}: peak memory", [r["peak_memory_mib"]], unit="MiB",
                       note="torch.cuda.max_memory_allocated during training")  # fmt: skip
    counts = {status: sum(r["status"] == status for r in results) for status in ("ok", "failed", "timeout", "skipped")}
    report.notes.append(
        f"{'CPU smoke (tiny sizes)' if smoke else 'GPU'}: {len(results)} cases in {seconds:.0f} s (estimated "
        f"{estimate:.0f} s, budget {budget:.0f} s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    )
    for r in results:
        if r["status"] != "ok":
            report.notes.append(f"{r['name']}: {r['status']}: {r.get('reason', '')}")
    report.extra.update(mode="cpu-smoke" if smoke else "gpu", budget_s=budget, estimate_s=estimate,
                        seconds=round(seconds, 1), all_cases_ok=counts["ok"] == len(results), cases=results)  # fmt: skip
    return report.finish(args.out if args.out is not None else RESULTS / "gpu_check.json")


if __name__ == "__main__":
    main()
