"""Per-step cost of Lightning and of the recipe's callbacks, judged against 1 % goals on a noisy machine: a
hand-written PyTorch loop, a bare Trainer and the recipe as its config runs it (plus the recipe with its parts added
one at a time), on the same model, data and precision, interleaved a second at a time in rotated order, each ratio
reported with a bootstrap 95 % interval.

    python benchmarks/overhead.py                                   # the digits ViT of vit_digits.yaml, CPU, ~4 min
    python benchmarks/overhead.py --blocks 48                       # twice the blocks: a ~0.7x narrower interval
    python benchmarks/overhead.py --aa --blocks 27 --profile never --out benchmarks/results/overhead_aa.json
    python benchmarks/overhead.py --blocks 3 --steps 2 --warmup 1 --batch-size 8   # seconds: does it run?
    python benchmarks/overhead.py --device cuda --model vit_b16 --precision bf16-mixed [--compile]
    python benchmarks/overhead.py --device cuda --model resnet50 --precision bf16-mixed
    python benchmarks/overhead.py --device cuda --model gpt2_124m --steps 10 --blocks 6 --warmup 5 --no-breakdown

The last is issue 12's GPU run of the GPT recipe (gpt2_124m.yaml: micro-batch 64 x 1024 tokens, bf16-mixed); it
writes benchmarks/results/overhead_gpt2_124m.json (every model but the default writes ``overhead_<model>.json``, so
that a GPU run never replaces the CPU figures README quotes).

Method
------
*Interleaving.* On a shared 2-core machine the speed of a step drifts by 10-30 % from one minute to the next (other
jobs, the OS, the CPU's clock), far more than the 1 % a goal is about. Timing the loop for a minute and then the
recipe for a minute compares two different machines. So the run is cut into ``--blocks`` blocks; a block runs every
candidate for one slice of ``--steps`` consecutive timed steps (about a second), one after the other, and each
ratio is taken within a block, between slices a few seconds apart, where the drift has not had time to act: it
cancels in the ratio. The finer the grain, the better it cancels, and the more blocks (independent ratios) a
budget buys.

*Candidates that persist.* A slice of a second is affordable only if it pays no set-up: each candidate (its model,
optimizer, Trainer, logger, checkpoints) is built once and runs in its own thread, paused between its slices. A
baton (two semaphores per candidate, ``Candidate``) lets exactly one thread run at a time while the others wait
without using the CPU, so every slice has the machine as a lone run would. Each candidate first runs ``--warmup``
untimed steps (lazy initialisation, the allocator's pools, the first log and save), discarded; then, in every
slice, the first step after the hand-over runs untimed too (it starts with the caches as the previous candidate
left them). All candidates are alive at once: memory is theirs together (small on CPU; on a GPU, 8 copies of the
weights and optimizer state). Background threads a candidate starts (the TensorBoard writer, an asynchronous
checkpoint's writer) keep running after the hand-over; what they do then lands in whoever runs next, and the
rotation spreads it over all candidates (the median below ignores it; the total-time rows do not).

*Rotation.* Block b starts with the (b mod n)-th of the n candidates (ABC, BCA, CAB, ...), so that no candidate always
runs first after the main thread's bookkeeping or always right after a particular other one: position effects
average out over every n blocks (``--blocks`` a multiple of n gives every candidate every position equally often;
the JSON says whether it does).

*Threads.* torch's CPU threads are set (``--threads``, default one per core this process may use) and stated in the
JSON and the table: the per-step overhead is single-threaded Python, so the ratios depend on how fast the threads
make the compute around it. 1 thread is steadier on a machine shared with other jobs.

*Median ratio.* Per block and candidate, the median step of the slice: it ignores the rare expensive steps (a
logging step every ``log_every_n_steps``, epoch ends, checkpoint saves) and a step hit by another process; the goals
are about the common step. Per block, the ratio of two candidates' medians; the figure is the median of those
ratios over blocks. The rare steps are reported apart ("mean step" rows): the ratio of total times over all timed
steps, logging steps, epoch ends and saves included.

*Bootstrap over blocks.* The blocks are resampled with replacement 10,000 times and the 2.5 % and 97.5 % points of
the resampled medians are the 95 % interval (percentile bootstrap, seeded: a report reproduces from its values;
report.bootstrap_interval). Blocks, not steps, are the unit: steps within a slice share that second's machine state
and are not independent draws; blocks, a few seconds apart, nearly are. The interval narrows as 1 / sqrt(blocks).

*A/A control* (``--aa``). One more candidate runs the bare Trainer's code a second time. Nothing distinguishes the
two but their place in the rotation, their thread and their memory, so the distance of their ratio from 1, and
whether its interval contains 1, is the method's own bias on this machine: a goal closer to 1 than that cannot be
judged by one run, whatever its interval says.

*Reading a goal.* "met" or "missed" is judged at the median (recipe / loop <= 1.03, recipe / bare Trainer <= 1.01).
"resolved" means the whole interval lies on one side of the goal, so this run establishes the verdict; "not resolved
(median met)" means the interval straddles the goal: the machine's noise is larger than the distance between the
median and the goal, and the run says nothing either way. Run more blocks, or on a quieter machine, to resolve it.

Candidates
----------
All share the model (built by the recipe's own class with the config's arguments, seed 0), the optimizer (the
recipe's ``build_optimizer``, with the kernel its module picks in the Trainer: ``fused`` on a CPU unless the precision
is mixed and clips, ``common.fused_by_default``), the gradient clipping, the precision and the data:

- ``loop``: forward, loss, backward, ``clip_grad_norm_``, ``step``, ``zero_grad`` in plain PyTorch.
- ``trainer``: a bare ``Trainer`` (no logger, no checkpointing, no progress bar, no model summary, no callbacks)
  around a LightningModule whose ``training_step`` returns the same loss.
- ``recipe``: the recipe's LightningModule (its ``training_step`` with its metrics and logging) with the config's
  logger (TensorBoard) and callbacks (digits: ``LRSchedule``, ``GradNormMonitor``, ``ResumableCheckpoint`` and
  ``GradientAccumulation`` without a global batch size, i.e. k = 1, logging only) at the config's
  ``log_every_n_steps``, the data handed over by a data module as in the recipes. The progress bar and model summary
  are off (Lightning's, not ours, and a terminal's cost), and validation is off in all (not per step).
- ``--breakdown`` (on by default) adds, between ``trainer`` and ``recipe``: the recipe's module without logger and
  callbacks (``recipe module``), then ``+ logger``, then each callback in config order (``+ LRSchedule``, ...), so
  that the recipe's extra cost is split by component, each row a ratio to the previous candidate.

Step time is the wall time between the starts of consecutive training steps, taken the same way in all (a clock at
the top of the loop body, and in a callback's ``on_train_batch_start`` for the Trainers, so after the batch is
fetched in every case; on a GPU a slice's last time is taken after a device synchronisation). When a goal is missed
(or with ``--profile always``) the bare Trainer and the recipe run once more, alone, under Lightning's SimpleProfiler
and the JSON gets the milliseconds per step of every hook.

Data: digits uses the 1,437 real training images of ``DigitsDataModule(image_size=16, augment=False)`` held in a
``TensorDataset`` (no augmentation: its cost is the data module's, not the loop's), shuffled: for the loop and the
bare Trainer in a plain ``DataLoader``, for the recipe in the loader ``DigitsDataModule.train_dataloader`` builds (a
``ResumableDataLoader`` seeding the RNGs its transforms draw from before each sample), so the recipe pays what its
data module's resumable order costs; the ImageNet models use one
synthetic batch already on the device (data loading is not what is measured), the GPT one batch of random token ids
(GPT-2's vocabulary 50257, the config's context 1024). With one fixed batch, three callbacks are set to what the
measured run can be: ``GradientAccumulation(global_batch_size=<batch size>)`` (the config accumulates 512 windows per
step; k = 1 gives one optimizer step per batch, as the loop), the GPT's ``LRSchedule(warmup_steps=1)`` (715 would
outlast the run) and ``ExponentialMovingAverage(adjust_to_run=False)`` (the fixed batch tells no batch size to adjust
the decay by); none of them costs more or less per step for it.
GPU mode (``--device cuda``) adds images/s and model FLOPs utilisation: FLOPs of one training step counted by
``torch.utils.flop_counter.FlopCounterMode``, over the median step time, over the GPU's dense bf16 peak (a small
table by device name, or ``--peak-flops``); with no known peak (CPU) MFU is not reported. For the GPT the MFU uses
nanoGPT's count, ``6 N + 12 L d T`` FLOPs per token (N the parameters without the position embedding, L blocks of
width d, context T: PaLM's appendix B convention), which GPT figures are quoted in; the FlopCounterMode count is
reported beside it (they agree to within the biases and norms the formula counts as matmul weights).
Tiny on a CPU: ``--model gpt2_124m --model-args depth=1 width=32 heads=2 context_length=16 --batch-size 2``.

Output: the table of every figure, then the README table (the ratios, their intervals and verdicts, under a caption
naming command, date, CPU, threads and versions); both, the per-block values and every candidate's timed seconds per
block go to benchmarks/results/overhead.json (fields: date, machine, cpu, versions, threads, blocks, method,
figures with values / median / interval_95 / met / resolved, verdicts, performance_table, block_seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, Dataset, TensorDataset

from report import (
    RESULTS,
    Figure,
    Report,
    _cpu_model,  # report.machine()'s "processor" is platform.processor() first, often only "x86_64"
    bootstrap_interval,
    config_of,
    interleave,
    machine,
    percentile_bootstrap,
    quiet_lightning,
    ratios,
    torch_threads,
)

from lightning_recipes.recipes.common import CONFIG_DIR, ImageClassifier, fused_by_default
from lightning_recipes.recipes.gpt import GPT
from lightning_recipes.recipes.resnet import ResNetClassifier
from lightning_recipes.recipes.vit import ViTClassifier

MODELS = {
    # name: (recipe class, config, data)
    "vit_digits": (ViTClassifier, "vit_digits.yaml", "digits"),
    "vit_b16": (ViTClassifier, "vit_b16_imagenet.yaml", "synthetic"),
    "resnet50": (ResNetClassifier, "resnet50_imagenet.yaml", "synthetic"),
    "gpt2_124m": (GPT, "gpt2_124m.yaml", "tokens"),
}
# Defaults: 8 candidates x (12 + 24 x 9) = 1,824 steps of the digits ViT (~90-120 ms each on 2 cores), 24 being a
# multiple of both 8 and 3 candidates (with and without --breakdown); about 4 minutes in all on 2 quiet cores.
BLOCKS, STEPS, WARMUP = 24, 8, 10
PROFILE_STEPS = 110  # of each SimpleProfiler run: past step 100, where the digits config's checkpoint is saved
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s, matched in this order against
# torch.cuda.get_device_name(); anything else needs --peak-flops.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


# ------------------------------------------------------------------------------------------------ set-up


def gpt_flops_per_token(module: GPT, length: int) -> int:
    """Training FLOPs per token of a GPT on sequences of ``length`` tokens: nanoGPT's ``estimate_mfu`` (PaLM, Chowdhery
    et al. 2022, appendix B): ``6 N + 12 L d T``, N the parameters without the position embedding (the tied output
    head counted once, as the token embedding), L blocks, d their width, T = ``length``."""
    n = sum(p.numel() for p in module.model.parameters()) - module.model.pos_embedding.weight.numel()
    return 6 * n + 12 * module.hparams.depth * module.hparams.width * length


@dataclass
class Spec:
    """Everything the three candidates share."""

    model_class: type[LightningModule]
    model_args: dict[str, Any]
    trainer_config: dict[str, Any]
    data: str  # digits | synthetic (images) | tokens
    image_size: int  # tokens: the context length
    in_channels: int
    num_classes: int  # tokens: the vocabulary
    batch_size: int
    precision: str
    device: torch.device
    compile: bool
    root: Path

    def build(self) -> LightningModule:
        torch.manual_seed(0)  # the same initial weights in every candidate and repetition
        model = self.model_class(**self.model_args)
        if self.compile:
            model.model.compile()  # in place: parameter names (and so the optimizer's groups) stay those of the model
        return model

    def loss(self, module: LightningModule, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The recipe's training loss, without its logging: what the loop and the bare Trainer compute."""
        if isinstance(module, GPT):
            return module._loss(batch)
        images, targets = batch
        return module.criterion(module.model(images), targets)

    @staticmethod
    def optimizer(module: LightningModule) -> torch.optim.Optimizer:
        return module.build_optimizer() if isinstance(module, ImageClassifier) else module.configure_optimizers()

    def synthetic_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data == "tokens":
            shape = (self.batch_size, self.image_size)
            return (torch.randint(0, self.num_classes, shape, generator=generator),
                    torch.randint(0, self.num_classes, shape, generator=generator))  # fmt: skip
        shape = (self.batch_size, self.in_channels, self.image_size, self.image_size)
        return (torch.randn(shape, generator=generator),
                torch.randint(0, self.num_classes, (self.batch_size,), generator=generator))  # fmt: skip

    @property
    def samples_unit(self) -> str:
        return "tokens/s" if self.data == "tokens" else "images/s"

    @property
    def samples_per_batch(self) -> int:
        return self.batch_size * (self.image_size if self.data == "tokens" else 1)

    @property
    def clip(self) -> tuple[Optional[float], str]:
        config = self.trainer_config
        return config.get("gradient_clip_val"), config.get("gradient_clip_algorithm") or "norm"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "16-mixed":  # float16 on a GPU; on a CPU Lightning runs bf16-mixed instead, and so do we
            dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """float16's loss scaling (torchvision's train.py with --amp; Lightning's MixedPrecision plugin alike)."""
        if self.precision == "16-mixed" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def _instantiate(entry: dict[str, Any], **overrides: Any) -> Any:
    module, _, name = entry["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(entry.get("init_args") or {}), **overrides})


def _spec(args: argparse.Namespace, root: Path) -> Spec:
    model_class, config_name, data = MODELS[args.model]
    config = yaml.safe_load((CONFIG_DIR / config_name).read_text())
    data_args = config["data"].get("init_args") or {}
    if data == "digits":
        image_size, in_channels, num_classes = data_args.get("image_size", 8), 1, 10
    elif data == "tokens":  # the data's vocabulary and context, linked into the model by the recipe's CLI
        image_size, in_channels, num_classes = data_args["context_length"], 0, data_args["vocab_size"]
    else:  # ImageNet: the training crop
        image_size, in_channels, num_classes = data_args.get("train_crop_size", 224), 3, 1000
    image_size = args.image_size or image_size
    model_args = dict(config.get("model") or {})
    if data == "tokens":
        model_args.update(vocab_size=num_classes, context_length=image_size)
    else:
        model_args.update(num_classes=num_classes, in_channels=in_channels)
    if "image_size" in model_class.data_links:
        model_args["image_size"] = image_size
    for item in args.model_args:
        key, _, value = item.partition("=")
        model_args[key] = yaml.safe_load(value)
    if data == "tokens":
        image_size = model_args["context_length"]
    precision = args.precision or str(config["trainer"].get("precision") or "32-true")
    if issubclass(model_class, ImageClassifier) and "fused" not in model_args:
        # The optimizer kernel the recipe's module picks in its Trainer (--model.fused null), given to every
        # candidate: the loop's and the bare Trainer's classifier build the optimizer outside that Trainer.
        where = [torch.empty(0, device=args.device)]
        model_args["fused"] = fused_by_default(where, precision, config["trainer"].get("gradient_clip_val"))
    return Spec(
        model_class=model_class,
        model_args=model_args,
        trainer_config=config["trainer"],
        data=data,
        image_size=image_size,
        in_channels=in_channels,
        num_classes=num_classes,
        batch_size=args.batch_size or data_args.get("batch_size", 64),
        precision=precision,
        device=torch.device(args.device),
        compile=args.compile,
        root=root,
    )


_BATCHES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class _FixedBatch(Dataset):
    """One synthetic batch, already on the device, returned for every index (a ``batch_size=None`` loader)."""

    def __init__(self, spec: Spec, length: int) -> None:
        key = (spec.data, spec.batch_size, spec.in_channels, spec.image_size, spec.num_classes, str(spec.device))
        if key not in _BATCHES:  # made once: 300 MB of random numbers for ViT-B/16 at batch 512
            _BATCHES.clear()
            batch = spec.synthetic_batch(torch.Generator().manual_seed(0))
            _BATCHES[key] = tuple(t.to(spec.device) for t in batch)
        self.batch = _BATCHES[key]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


_DIGITS: dict[int, TensorDataset] = {}


def _digits(image_size: int) -> TensorDataset:
    """The recipe's 1,437 training images (no augmentation) and labels, in memory."""
    if image_size not in _DIGITS:
        from lightning_recipes.datamodules import DigitsDataModule

        datamodule = DigitsDataModule(image_size=image_size, augment=False)
        datamodule.setup("fit")
        samples = [datamodule.train_set[i] for i in range(len(datamodule.train_set))]
        images = torch.stack([image for image, _ in samples])
        targets = torch.tensor([target for _, target in samples])
        _DIGITS[image_size] = TensorDataset(images, targets)
    return _DIGITS[image_size]


def _loader(spec: Spec, steps: int) -> DataLoader:
    if spec.data == "digits":
        # What DigitsDataModule.train_dataloader builds: shuffled, last batch kept, loaded in the main process.
        return DataLoader(_digits(spec.image_size), batch_size=spec.batch_size, shuffle=True)
    return DataLoader(_FixedBatch(spec, steps + 2), batch_size=None)


class _Data(L.LightningDataModule):
    """The loader as the recipes' data modules hand it over, with the ``batch_size`` attribute callbacks read.

    ``recipe``: digits in the ``ResumableDataLoader`` that ``DigitsDataModule.train_dataloader`` builds.
    """

    def __init__(self, spec: Spec, steps: int, recipe: bool = False) -> None:
        super().__init__()
        self.spec, self.steps, self.batch_size, self.recipe = spec, steps, spec.batch_size, recipe

    def train_dataloader(self) -> DataLoader:
        if self.recipe and self.spec.data == "digits":
            from lightning_recipes.callbacks.resumable_loader import ResumableDataLoader
            from lightning_recipes.datamodules import DigitsDataModule

            return ResumableDataLoader(_digits(self.spec.image_size), batch_size=self.spec.batch_size, shuffle=True,
                                       seed_rngs=DigitsDataModule.augmentation_rngs)  # fmt: skip
        return _loader(self.spec, self.steps)


# ------------------------------------------------------------------------------------------------ the candidates

#: A candidate's step clock, called at the start of every training step; False: stop after this step.
Clock = Callable[[], bool]


class _Tick(L.Callback):
    """Calls the clock at every training step's start: the Trainers' counterpart of the loop's first line."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.clock():
            trainer.should_stop = True  # the fit ends after this step, as the loop's does


class _Bare(L.LightningModule):
    """The recipe's network, loss and optimizer, and nothing else: no logging, no metrics."""

    def __init__(self, spec: Spec, classifier: LightningModule) -> None:
        super().__init__()
        self.spec, self.classifier = spec, classifier

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.spec.loss(self.classifier, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.spec.optimizer(self.classifier)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(spec: Spec, clock: Clock, total: int) -> None:
    """The hand-written loop: at most ``total`` steps, the clock read at the top of each (torchvision's train.py step:
    autocast forward, scaled backward with 16-mixed, unscale before clipping, scaler step and update)."""
    classifier = spec.build().to(spec.device)
    model = classifier.model
    model.train()
    optimizer = spec.optimizer(classifier)
    scaler = spec.grad_scaler()
    clip_val, clip_algorithm = spec.clip
    loader, done = _loader(spec, total), 0
    while done < total:
        for inputs, targets in loader:
            running = clock()
            inputs, targets = inputs.to(spec.device, non_blocking=True), targets.to(spec.device, non_blocking=True)
            with spec.autocast():
                loss = spec.loss(classifier, (inputs, targets))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients
            else:
                loss.backward()
            if clip_val:
                if clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(model.parameters(), clip_val)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if not running or done == total:
                return


def _trainer(spec: Spec, total: int, clock: Clock, *, logger: Any, callbacks: list, **kwargs: Any) -> L.Trainer:
    clip_val, clip_algorithm = spec.clip
    return L.Trainer(
        accelerator=spec.device.type,
        devices=1,
        precision=spec.precision,
        max_steps=total,
        # The fixed-batch loaders hold total + 2 batches: one epoch covers the run, and callbacks that need an epoch
        # count (ExponentialMovingAverage's adjusted decay) get one. Digits runs over several epochs.
        max_epochs=1 if spec.data != "digits" else None,
        logger=logger,
        callbacks=[_Tick(clock), *callbacks],
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=clip_algorithm if clip_val else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=spec.root,
        **kwargs,
    )


def run_trainer(spec: Spec, clock: Clock, total: int, *, profiler: Any = None) -> None:
    """The bare Trainer, at most ``total`` steps."""
    trainer = _trainer(spec, total, clock, logger=False, callbacks=[], enable_checkpointing=False, profiler=profiler)
    trainer.fit(_Bare(spec, spec.build()), datamodule=_Data(spec, total))


def recipe_parts(spec: Spec) -> list[tuple[str, Callable[[Path], Any]]]:
    """The logger and callbacks of the recipe's config, in order, each as (name, factory of a fresh instance)."""
    parts: list[tuple[str, Callable[[Path], Any]]] = []
    logger = spec.trainer_config.get("logger")
    if logger:
        parts.append(("logger", lambda run: _instantiate(logger, save_dir=str(run / "logs"))))
    for entry in spec.trainer_config.get("callbacks") or []:

        def make(run: Path, entry: dict = entry) -> Any:
            overrides: dict[str, Any] = {}
            name = entry["class_path"].rpartition(".")[2]
            if name in ("ModelCheckpoint", "ResumableCheckpoint"):
                overrides["dirpath"] = str(run / "checkpoints")
            if name == "ResumableCheckpoint" and spec.data != "digits":
                overrides["resumable_data"] = False  # one fixed batch: there is no data order to resume
            scaled = (entry.get("init_args") or {}).get("reference_batch_size")
            if name == "LRSchedule" and spec.data != "digits" and scaled:
                # The fixed-batch loader (batch_size=None) does not tell its batch size; the linear scaling rule
                # needs it.
                overrides["micro_batch_size"] = spec.batch_size
            if name == "ExponentialMovingAverage" and spec.data != "digits":
                # Its adjusted decay needs the loader's batch size, which the fixed-batch loader does not tell; the
                # per-update cost is the same with the config's decay as given.
                overrides["adjust_to_run"] = False
            if name == "LRSchedule" and spec.data == "tokens":
                # The config's 715 warmup steps are longer than the measured run, which LRSchedule refuses; the
                # schedule's per-step cost does not depend on them.
                overrides["warmup_steps"] = 1
            if name == "GradientAccumulation" and spec.data == "tokens":
                overrides["global_batch_size"] = spec.batch_size  # k = 1, as the loop: one optimizer step per batch
            return _instantiate(entry, **overrides)

        parts.append((entry["class_path"].rpartition(".")[2], make))
    return parts


def run_recipe(spec: Spec, clock: Clock, total: int, *, parts: Optional[int] = None, profiler: Any = None) -> None:
    """The recipe's module with the first ``parts`` of its logger and callbacks (all by default), at most ``total``
    steps."""
    run = Path(tempfile.mkdtemp(dir=spec.root))
    chosen = recipe_parts(spec)[:parts]
    logger = next((make(run) for name, make in chosen if name == "logger"), False)
    callbacks = [make(run) for name, make in chosen if name != "logger"]
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    every = spec.trainer_config.get("log_every_n_steps", 50)
    trainer = _trainer(spec, total, clock, logger=logger, callbacks=callbacks, enable_checkpointing=checkpointing,
                       log_every_n_steps=every, profiler=profiler)  # fmt: skip
    trainer.fit(spec.build(), datamodule=_Data(spec, total, recipe=True))


# ------------------------------------------------------------------------------------------------ interleaving


class Candidate:
    """One candidate in its own thread, run one slice of consecutive steps at a time while every other one waits.

    A baton between the main thread and the candidate's: ``slice`` releases ``_go`` and waits on ``_back``; the
    candidate's clock records each step's start and, once the slice is complete, releases ``_back`` and waits on
    ``_go`` at the top of the next step. Exactly one thread runs at any time and a waiting one uses no CPU (a
    semaphore, not a poll), so a slice has the machine as a lone run would, and each candidate keeps its model,
    optimizer, Trainer, logger and checkpoints between slices: a slice pays no set-up, which is what makes
    slices of a second, and so many blocks, affordable.
    """

    def __init__(self, name: str, run: Callable[[Clock], None], sync: Callable[[], None] = lambda: None) -> None:
        self.name, self._run, self._sync = name, run, sync
        self.ticks = 0  #: steps started so far, the one running included
        self._times: list[float] = []
        self._quota = 0
        self._started = self._stopping = self._ended = False
        self._error: Optional[BaseException] = None
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=f"overhead: {name}", daemon=True)

    def _main(self) -> None:
        self._go.acquire()
        try:
            if not self._stopping:
                self._run(self._clock)
        except BaseException as error:  # handed to the main thread, which raises it
            self._error = error
        finally:
            self._ended = True
            self._back.release()

    def _clock(self) -> bool:
        if self._stopping:
            return False
        self.ticks += 1
        if len(self._times) == self._quota + 1:
            self._sync()  # the slice's last time waits for the device: the work it queued belongs to this slice
        self._times.append(time.perf_counter())
        if len(self._times) < self._quota + 2:
            return True
        self._back.release()
        self._go.acquire()
        self._times = [time.perf_counter()]  # the step that paused starts now
        return not self._stopping

    def slice(self, steps: int) -> list[float]:
        """Runs ``steps + 1`` consecutive steps and returns the durations of the last ``steps``, in seconds.

        The first step runs untimed: it starts with the caches and the allocator as the previous candidate left them.
        """
        self._quota = steps
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._back.acquire()
        self._raise()
        if self._ended:
            raise RuntimeError(f"candidate {self.name!r} ended after {self.ticks} steps, before its slice of"
                               f" {steps + 1} was complete")  # fmt: skip
        times = self._times
        return [b - a for a, b in zip(times, times[1:])][1:]

    def close(self) -> None:
        """Lets the candidate end (its last step, then the end of its fit) and waits for its thread."""
        self._stopping = True
        if self._started and not self._ended:
            self._go.release()
            self._back.acquire()
        if self._started:
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"candidate {self.name!r} failed: {error!r}") from error


def steps_needed(*, blocks: int, steps: int, warmup: int) -> int:
    """Steps each candidate runs in ``run_interleaved``: the warm-up slice, every block's slice, the last step."""
    return (warmup + 2) + blocks * (steps + 1)


def run_interleaved(
    runs: dict[str, Callable[[Clock], None]],
    *,
    blocks: int,
    steps: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[list[float]]]:
    """Step durations, per candidate and block: each candidate runs ``warmup + 1`` untimed steps, then ``blocks``
    blocks run every candidate for one slice of ``steps`` timed steps (after one untimed), the order rotated per
    block (report.interleave)."""
    candidates = {name: Candidate(name, run, sync) for name, run in runs.items()}
    try:
        for candidate in candidates.values():
            candidate.slice(warmup)  # discarded
        slices = {name: (lambda c=candidate: c.slice(steps)) for name, candidate in candidates.items()}
        periods = interleave(slices, reps=blocks, rotate=True)
        for candidate in candidates.values():
            candidate.close()
    except BaseException:
        for candidate in candidates.values():
            with contextlib.suppress(BaseException):
                candidate.close()
        raise
    return periods


# ------------------------------------------------------------------------------------------------ figures


def total_ratio_interval(
    numerators: list[float], denominators: list[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)``, the pairs (one per block)
    resampled together (report.percentile_bootstrap, as report.bootstrap_interval)."""
    if len(numerators) < 2 or len(numerators) != len(denominators):
        raise ValueError(f"need at least 2 paired blocks, got {len(numerators)} and {len(denominators)}")
    return percentile_bootstrap(
        len(numerators), lambda picks: sum(numerators[i] for i in picks) / sum(denominators[i] for i in picks),
        level=level, resamples=resamples, seed=seed,
    )  # fmt: skip


#: Figure name -> the row label of the README table.
README_LABELS = {
    "recipe / loop, median step": "recipe step / hand-written loop step",
    "recipe / trainer, median step": "recipe step / bare Trainer step",
    "trainer / loop, median step": "bare Trainer step / loop step (Lightning's own cost)",
    "A/A: trainer again / trainer, median step": (
        "A/A control: a second bare Trainer / the first (the method's own bias)"
    ),
}
#: ``--aa``'s control candidate: a second bare Trainer, the same code as ``trainer``.
AA = "trainer again"


def step_figures(report: Report, periods: dict[str, list[list[float]]], breakdown: list[tuple[str, str]]) -> None:
    """Adds the step-time figures to ``report`` from the step durations of ``run_interleaved``.

    Median figures: per block, the ratio of two candidates' median steps; the figure's values are those ratios
    (one per block), judged at their median, with a 95 % bootstrap interval over blocks. Mean figures: the ratio
    of total times over all timed steps (logging steps, epoch ends and saves included), with the same interval.
    ``breakdown``: (candidate, label) in the order each adds a part to the previous one, starting from ``trainer``.
    """
    median = {name: [statistics.median(s) for s in slices] for name, slices in periods.items()}
    totals = {name: [math.fsum(s) for s in slices] for name, slices in periods.items()}

    def by_median(name: str, a: str, b: str, **kwargs: Any) -> None:
        values = ratios(median[a], median[b])
        report.add(name, values, interval=bootstrap_interval(values), **kwargs)

    def by_total(name: str, a: str, b: str) -> None:
        value = math.fsum(totals[a]) / math.fsum(totals[b])
        note = "total time of all timed steps (logging steps, epoch ends, checkpoint saves included)"
        report.add(name, [value], interval=total_ratio_interval(totals[a], totals[b]), note=note)

    note = "per block: ratio of the median steps; median over blocks"
    by_median("recipe / loop, median step", "recipe", "loop", goal=("<=", 1.03), note=note)
    by_median("recipe / trainer, median step", "recipe", "trainer", goal=("<=", 1.01), note=note)
    by_median("trainer / loop, median step", "trainer", "loop", note="Lightning's own per-step cost")
    by_total("recipe / loop, mean step", "recipe", "loop")
    by_total("recipe / trainer, mean step", "recipe", "trainer")
    if AA in periods:  # two candidates that run the same code: any distance from 1 is the method's, not the code's
        by_median(f"A/A: {AA} / trainer, median step", AA, "trainer", note="--aa: the same code twice")
    previous = "trainer"
    for name, label in breakdown:
        by_median(f"breakdown: {label} / previous, median step", name, previous, note=f"previous = {previous}")
        previous = name
    for name in ("loop", "trainer", "recipe"):
        report.add(f"{name} step, median", [1e3 * v for v in median[name]], unit="ms", note="per block")
    for name in ("loop", "trainer", "recipe"):
        report.add(f"{name} step, mean", [1e3 * statistics.fmean(s) for s in periods[name]], unit="ms",
                   note="per block")  # fmt: skip


def verdict(figure: Figure) -> str:
    """"met" / "missed" by the median, or "not resolved (median met|missed)" when the interval straddles the goal."""
    if figure.met is None:
        return ""
    word = "met" if figure.met else "missed"
    return f"not resolved (median {word})" if figure.resolved is False else word


_SYMBOLS = {"<=": "≤", ">=": "≥", "==": "="}


def performance_table(report: Report, caption: str) -> str:
    """The ratio figures as the markdown table README's Performance section quotes, under a one-line caption."""
    lines = [caption, "", "| figure | median | 95 % interval | goal | verdict |", "|---|---|---|---|---|"]
    for figure in report.figures:
        if figure.interval is None:
            continue
        label = README_LABELS.get(figure.name)
        if label is None and figure.name.startswith("breakdown: "):
            label = "breakdown, each over the previous: " + figure.name[len("breakdown: "):].split(" / previous")[0]
        if label is None:  # the mean rows
            label = figure.name.replace(", mean step", ", all steps (total time)")
        goal = "" if figure.goal is None else f"{_SYMBOLS[figure.goal[0]]} {figure.goal[1]:g}"
        low, high = figure.interval
        lines.append(f"| {label} | {statistics.median(figure.values):.3f} | {low:.3f} – {high:.3f} | {goal} |"
                     f" {verdict(figure)} |")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ FLOPs, profile


def flops_per_step(spec: Spec) -> int:
    """Model FLOPs of one training step (forward + backward, optimizer excluded), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    compiled, spec.compile = spec.compile, False  # count the plain model: compilation changes no FLOP
    try:
        classifier = spec.build().to(spec.device)
    finally:
        spec.compile = compiled
    with FlopCounterMode(display=False) as counter:
        with spec.autocast():
            loss = spec.loss(classifier, _FixedBatch(spec, 1).batch)
        loss.backward()
    return counter.get_total_flops()


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda" or precision not in ("bf16-mixed", "16-mixed"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def profile(spec: Spec, *, steps: int) -> dict[str, Any]:
    """Per-step time of every Trainer action (Lightning's SimpleProfiler) for the bare Trainer and the recipe, each run
    alone for ``steps + 2`` steps."""
    out: dict[str, Any] = {}
    for name, run in (("trainer", run_trainer), ("recipe", run_recipe)):
        profiler = SimpleProfiler()
        candidate = Candidate(name, lambda clock, run=run, p=profiler: run(spec, clock, steps + 3, profiler=p))
        candidate.slice(steps)
        candidate.close()
        per_step: dict[str, float] = {}
        for action, durations in profiler.recorded_durations.items():
            if action == "run_training_epoch":  # the whole epoch: the sum of the rest
                continue
            # The two modules' classes differ (_Bare, ViTClassifier): name their hooks alike to compare them.
            action = re.sub(r"^\[LightningModule\]\w+\.", "[LightningModule].", action)
            per_step[action] = per_step.get(action, 0.0) + sum(durations) / candidate.ticks * 1e3
        out[name] = dict(sorted(per_step.items(), key=lambda kv: -kv[1]))
    return out


def callback_ms_per_step(recipe_profile: dict[str, float], names: list[str]) -> dict[str, float]:
    """Milliseconds per step in each callback's hooks (SimpleProfiler's ``[Callback]<state key>.<hook>`` actions)."""
    return {
        name: sum(ms for action, ms in recipe_profile.items() if action.startswith(f"[Callback]{name}"))
        for name in names
    }


def _profile_notes(profiled: dict[str, Any], parts: list[str], top: int = 12) -> list[str]:
    trainer, recipe = profiled["trainer"], profiled["recipe"]
    rows = sorted(recipe, key=lambda action: -(recipe[action] - trainer.get(action, 0.0)))[:top]
    extra = ", ".join(f"{a}: {recipe[a]:.3f} vs {trainer.get(a, 0.0):.3f}" for a in rows)
    hooks = callback_ms_per_step(recipe, [p for p in parts if p != "logger"])
    return [
        f"SimpleProfiler, ms per step, recipe vs bare Trainer, largest differences first: {extra}",
        "SimpleProfiler, ms per step in each callback's hooks (all steps averaged, saves included): "
        + ", ".join(f"{name} {ms:.3f}" for name, ms in hooks.items())
        + ". Not in any hook: GradNormMonitor's post-clip norm (an optimizer step post-hook, inside optimizer_step)"
        " and ResumableCheckpoint's per-sample seeding of the data (inside train_dataloader_next)",
    ]


# ------------------------------------------------------------------------------------------------ main


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_digits",
                        help="vit_digits: the digits ViT of vit_digits.yaml on real digits (default); vit_b16 /"
                             " resnet50: the ImageNet configs' models on one synthetic batch; gpt2_124m: the GPT of"
                             " gpt2_124m.yaml on one batch of random tokens (GPU modes)")  # fmt: skip
    parser.add_argument("--blocks", type=int, default=BLOCKS, help=f"interleaved blocks, each one slice of every"
                        f" candidate in rotated order (default {BLOCKS}, >= 2; a multiple of the number of candidates"
                        " gives each candidate every position equally often)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed steps per candidate and block, after one"
                        f" untimed (default {STEPS})")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=WARMUP, help=f"untimed steps of each candidate before the first"
                        f" block (default {WARMUP})")  # fmt: skip
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"], default=None,
                        help="default: the config's (digits 32-true, ViT-B/16 16-mixed, ResNet-50 32-true, GPT"
                             " bf16-mixed); 16-mixed runs as bf16-mixed on a CPU, as Lightning does")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (digits 64, GPT 64)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's (digits 16, ImageNet"
                        " training crop: ViT 224, ResNet 176); small ones make ImageNet models CPU-sized")  # fmt: skip
    parser.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the config's model arguments, e.g. depth=1 width=64 (YAML values)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (in all candidates)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores this process"
                        " may use; 1 is steadier on a machine shared with other jobs)")  # fmt: skip
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s for MFU; default: bf16 dense peaks by GPU name (none on CPU)")  # fmt: skip
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the recipe's module alone and with each of its logger and callbacks added"
                             " in turn (default on)")  # fmt: skip
    parser.add_argument("--aa", action="store_true",
                        help="add an A/A control: a second bare Trainer, timed like the others; its ratio to the first"
                             " shows how far from 1 the method itself puts two identical candidates")  # fmt: skip
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="run bare Trainer and recipe once more under SimpleProfiler: when a goal is missed"
                             " (auto, default), always or never")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/overhead.json;"
                        " for another --model overhead_<model>.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.blocks < 2:
        parser.error(f"--blocks must be >= 2 (the interval resamples blocks), got {args.blocks}; try --blocks {BLOCKS}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1 (timed steps per candidate and block), got {args.steps};"
                     f" try --steps {STEPS}")  # fmt: skip
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}; try --warmup {WARMUP}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}; omit it for one per usable core ({_usable_cores()})")
    threads = args.threads or _usable_cores()

    with tempfile.TemporaryDirectory() as tmp, quiet_lightning(), torch_threads(threads):
        spec = _spec(args, Path(tmp))
        if spec.device.type == "cuda":
            # Fixed input shapes: let cuDNN pick its fastest convolutions, in all alike (the Trainer keeps it).
            torch.backends.cudnn.benchmark = True
        total = steps_needed(blocks=args.blocks, steps=args.steps, warmup=args.warmup) + 1
        runs: dict[str, Callable[[Clock], None]] = {
            "loop": lambda clock: run_loop(spec, clock, total),
            "trainer": lambda clock: run_trainer(spec, clock, total),
        }
        parts = recipe_parts(spec)
        breakdown: list[tuple[str, str]] = []
        if args.breakdown:
            runs["recipe module"] = lambda clock: run_recipe(spec, clock, total, parts=0)
            breakdown.append(("recipe module", "recipe module"))
            for i, (name, _) in enumerate(parts[:-1], start=1):
                runs[f"+ {name}"] = lambda clock, i=i: run_recipe(spec, clock, total, parts=i)
                breakdown.append((f"+ {name}", f"+ {name}"))
            breakdown.append(("recipe", f"+ {parts[-1][0]}" if parts else "recipe"))
        runs["recipe"] = lambda clock: run_recipe(spec, clock, total)
        if args.aa:
            runs[AA] = lambda clock: run_trainer(spec, clock, total)
        periods = run_interleaved(runs, blocks=args.blocks, steps=args.steps, warmup=args.warmup,
                                  sync=lambda: _sync(spec.device))  # fmt: skip
        median = {name: [statistics.median(s) for s in slices] for name, slices in periods.items()}

        report = Report("overhead", args.blocks, config_of(args, argv))
        step_figures(report, periods, breakdown)

        counted = flops_per_step(spec)
        model = spec.build()
        # GPT: MFU in nanoGPT's convention (PaLM's 6N + 12LdT per token); the images: the counted FLOPs.
        tokens = spec.data == "tokens"
        flops = gpt_flops_per_token(model, spec.image_size) * spec.samples_per_batch if tokens else counted
        peak = args.peak_flops or peak_flops(spec.device, spec.precision)
        for name in ("loop", "trainer", "recipe"):
            report.add(f"{name} {spec.samples_unit}", [spec.samples_per_batch / v for v in median[name]],
                       unit=spec.samples_unit, note="batch size / median step, per block")  # fmt: skip
        if peak:
            goal = (">=", 45.0) if args.model == "vit_b16" else None
            for name in ("loop", "trainer", "recipe"):
                report.add(f"{name} MFU", [100 * flops / v / peak for v in median[name]], unit="%",
                           goal=goal if name == "recipe" else None)  # fmt: skip
        report.extra["model"] = {
            "class": spec.model_class.__name__,
            "args": spec.model_args,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": spec.batch_size,
            ("context_length" if tokens else "image_size"): spec.image_size,
            "precision": spec.precision,
            "flops_per_step": flops,
            "flops_per_step_counted": counted,
            "peak_flops": peak,
        }
        report.extra["recipe_parts"] = [name for name, _ in parts]
        report.extra["threads"] = torch.get_num_threads()
        report.extra["blocks"] = args.blocks
        cpu = _cpu_model() or machine()["processor"]
        report.extra["cpu"] = {"model": cpu, "cores": os.cpu_count(), "usable_cores": _usable_cores()}
        report.extra["method"] = {
            "candidates": list(runs),
            "order": "rotated: block b runs the candidates starting from the (b mod n)-th",
            "every_position_equally_often": args.blocks % len(runs) == 0,
            "warmup_steps": args.warmup + 1,
            "timed_steps_per_block": args.steps,
            "untimed_steps_per_block": 1,
            "timed_steps_per_candidate": args.blocks * args.steps,
            "per_block_statistic": "median step (mean step: total time)",
            "interval": "95 % percentile bootstrap over blocks, 10,000 resamples, seed 0",
            "goals_judged_on": "the median over blocks; resolved when the interval lies on one side of the goal",
        }
        # Every candidate's timed seconds per block, so that any other statistic can be computed from the file.
        report.extra["block_seconds"] = {name: [math.fsum(s) for s in slices] for name, slices in periods.items()}
        shape = f"context {spec.image_size}" if tokens else f"{spec.image_size} px"
        plural = "thread" if threads == 1 else "threads"
        described = (f"{spec.model_class.__name__} {report.extra['model']['parameters']:,} parameters, batch"
                     f" {spec.batch_size}, {shape}, {spec.precision}, {spec.device.type}")  # fmt: skip
        report.notes.append(
            f"{described}; {args.blocks} interleaved blocks (rotated order) x {args.steps} timed steps (after 1"
            f" untimed) per candidate, after {args.warmup + 1} warm-up steps each; {threads} torch {plural};"
            f" recipe = module + {', '.join(n for n, _ in parts)}"
        )
        source = "FlopCounterMode"
        if tokens:
            source = f"6N + 12LdT per token (nanoGPT); FlopCounterMode counts {counted:.4g}"
        report.notes.append(f"model FLOPs per training step ({source}): {flops:.4g}; MFU "
                            + (f"against a peak of {peak:.4g} FLOP/s" if peak else "n/a: no peak FLOP/s known for"
                               " this device and precision (--peak-flops)"))  # fmt: skip
        missed = any(f.met is False for f in report.figures)
        if args.profile == "always" or (args.profile == "auto" and missed):
            profiled = profile(spec, steps=min(total, PROFILE_STEPS))
            report.extra["profile_ms_per_step"] = profiled
            names = [name for name, _ in parts if name != "logger"]
            report.extra["callback_hooks_ms_per_step"] = callback_ms_per_step(profiled["recipe"], names)
            report.notes.extend(_profile_notes(profiled, [name for name, _ in parts]))
        report.extra["verdicts"] = {f.name: verdict(f) for f in report.figures if f.goal is not None}
        versions = f"torch {torch.__version__}, Lightning {L.__version__}"
        command = " ".join(["python", "benchmarks/overhead.py", *argv])
        gpu = f", {machine()['gpu']}" if spec.device.type == "cuda" else ""
        caption = (f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d}, {cpu or 'CPU'} ({_usable_cores()} cores{gpu}),"
                   f" {threads} torch {plural}, {versions}: {described}; {args.blocks} interleaved blocks x"
                   f" {args.steps} timed steps per candidate; per block the ratio of median steps, the median over"
                   " blocks and its 95 % bootstrap interval over blocks")  # fmt: skip
        report.extra["performance_table"] = performance_table(report, caption)
        default = RESULTS / ("overhead.json" if args.model == "vit_digits" else f"overhead_{args.model}.json")
        result = report.finish(args.out if args.out is not None else default)
        print("\nREADME (Performance):\n" + report.extra["performance_table"])
        return result


if __name__ == "__main__":
    main()
