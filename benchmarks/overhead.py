"""Per-step cost of Lightning and of the recipe's callbacks: a hand-written PyTorch loop, a bare Trainer and the
recipe as its config runs it, on the same model, data and precision, interleaved (loop, trainer, recipe, loop, ...).

    python benchmarks/overhead.py                                   # the digits ViT of vit_digits.yaml, CPU
    python benchmarks/overhead.py --steps 50 --reps 3               # quicker
    python benchmarks/overhead.py --device cuda --model vit_b16 --precision bf16-mixed [--compile]
    python benchmarks/overhead.py --device cuda --model resnet50 --precision bf16-mixed
    python benchmarks/overhead.py --device cuda --model gpt2_124m --steps 30 --warmup 5 --reps 3 --no-breakdown

The last is issue 12's GPU run of the GPT recipe (gpt2_124m.yaml: micro-batch 64 x 1024 tokens, bf16-mixed), about
2 minutes on an H100-class GPU; it writes benchmarks/results/overhead_gpt2_124m.json (every model but the default
writes ``overhead_<model>.json``, so that a GPU run never replaces the CPU figures README quotes).

The three candidates share the model (built by the recipe's own class with the config's arguments, seed 0), the
optimizer (the recipe's ``build_optimizer``), the gradient clipping, the precision and the data:

- ``loop``: forward, loss, backward, ``clip_grad_norm_``, ``step``, ``zero_grad`` in plain PyTorch.
- ``trainer``: a bare ``Trainer`` (no logger, no checkpointing, no progress bar, no model summary, no callbacks)
  around a LightningModule whose ``training_step`` returns the same loss.
- ``recipe``: the recipe's LightningModule (its ``training_step`` logs the loss and updates the accuracy metrics)
  with the config's logger (TensorBoard) and callbacks (digits: ``LRSchedule``, ``GradNormMonitor``,
  ``ResumableCheckpoint`` and ``GradientAccumulation`` without a global batch size, i.e. k = 1, logging only) at
  the config's ``log_every_n_steps``, the data handed over by a data module as in the recipes. The progress bar
  and model summary are off (Lightning's, not ours, and a terminal's cost), and validation is off in all three
  (not per step).

Step time is the wall time between the starts of consecutive training steps, taken the same way in all three (a
``perf_counter()`` appended to a list: at the top of the loop body, and in a callback's ``on_train_batch_start``
for the Trainers, so after the batch is fetched in every case). Each repetition builds everything afresh, runs
``--warmup`` steps, then ``--steps`` timed steps; the figure per repetition is the median step (the issue's
goal) and the mean step, which also holds the rare expensive steps: logging steps, epoch ends, and the
checkpoints (digits: ``ResumableCheckpoint(every_n_steps=100)`` plus one at every epoch end, as shipped).

Data: digits uses the 1,437 real training images of ``DigitsDataModule(image_size=16, augment=False)`` held in a
``TensorDataset`` (no augmentation: its cost is the data module's, not the loop's); the ImageNet models use one
synthetic batch already on the device (data loading is not what is measured), the GPT one batch of random token ids
(GPT-2's vocabulary 50257, the config's context 1024). With one fixed batch, three callbacks are set to what the
measured run can be: ``GradientAccumulation(global_batch_size=<batch size>)`` (the config accumulates 512 windows per
step; k = 1 gives one optimizer step per batch, as the loop), the GPT's ``LRSchedule(warmup_steps=1)`` (715 would
outlast the run) and ``ExponentialMovingAverage(adjust_to_run=False)`` (the fixed batch tells no batch size to adjust
the decay by); none of them costs more or less per step for it. ``--breakdown`` (on by default) adds the recipe's
module without callbacks, then the logger, then each callback in config order, so that the recipe's extra cost is
split by component; when a goal is missed (or with ``--profile always``) the bare Trainer and the recipe run once more
under Lightning's SimpleProfiler and the JSON gets the milliseconds per step of every hook.
GPU mode (``--device cuda``) adds images/s and model FLOPs utilisation: FLOPs of one training step counted by
``torch.utils.flop_counter.FlopCounterMode``, over the median step time, over the GPU's dense bf16 peak (a small
table by device name, or ``--peak-flops``); with no known peak (CPU) MFU is not reported. For the GPT the MFU uses
nanoGPT's count, ``6 N + 12 L d T`` FLOPs per token (N the parameters without the position embedding, L blocks of
width d, context T: PaLM's appendix B convention), which GPT figures are quoted in; the FlopCounterMode count is
reported beside it (they agree to within the biases and norms the formula counts as matmul weights).
Tiny on a CPU: ``--model gpt2_124m --model-args depth=1 width=32 heads=2 context_length=16 --batch-size 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, Dataset, TensorDataset

from report import RESULTS, Report, config_of, interleave, quiet_lightning, ratios, torch_threads

from lightning_recipes.recipes.common import CONFIG_DIR, ImageClassifier
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
        return contextlib.nullcontext()


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
    """The loader as the recipes' data modules hand it over, with the ``batch_size`` attribute callbacks read."""

    def __init__(self, spec: Spec, steps: int) -> None:
        super().__init__()
        self.spec, self.steps, self.batch_size = spec, steps, spec.batch_size

    def train_dataloader(self) -> DataLoader:
        return _loader(self.spec, self.steps)


# ------------------------------------------------------------------------------------------------ the candidates


class _StepClock(L.Callback):
    """Appends the time at every training step's start: the Trainers' counterpart of the loop's first line."""

    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


class _Bare(L.LightningModule):
    """The recipe's network, loss and optimizer, and nothing else: no logging, no metrics."""

    def __init__(self, spec: Spec, classifier: LightningModule) -> None:
        super().__init__()
        self.spec, self.classifier = spec, classifier

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.spec.loss(self.classifier, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.spec.optimizer(self.classifier)


def _periods(times: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])][warmup:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loop(spec: Spec, *, warmup: int, steps: int) -> list[float]:
    """The hand-written loop; returns the step times after warmup."""
    classifier = spec.build().to(spec.device)
    model = classifier.model
    model.train()
    optimizer = spec.optimizer(classifier)
    clip_val, clip_algorithm = spec.clip
    total = warmup + steps + 1  # `steps` periods between `steps + 1` step starts
    times: list[float] = []
    loader = _loader(spec, total)
    while len(times) < total:
        for inputs, targets in loader:
            times.append(time.perf_counter())
            inputs, targets = inputs.to(spec.device, non_blocking=True), targets.to(spec.device, non_blocking=True)
            with spec.autocast():
                loss = spec.loss(classifier, (inputs, targets))
            loss.backward()
            if clip_val:
                if clip_algorithm == "norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_val)
                else:
                    torch.nn.utils.clip_grad_value_(model.parameters(), clip_val)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if len(times) == total:
                break
    _sync(spec.device)
    return _periods(times, warmup)


def _trainer(spec: Spec, total: int, times: list[float], *, logger: Any, callbacks: list, **kwargs: Any) -> L.Trainer:
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
        callbacks=[_StepClock(times), *callbacks],
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=clip_algorithm if clip_val else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=spec.root,
        **kwargs,
    )


def run_trainer(spec: Spec, *, warmup: int, steps: int, profiler: Any = None) -> list[float]:
    """The bare Trainer; returns the step times after warmup."""
    total, times = warmup + steps + 1, []
    trainer = _trainer(spec, total, times, logger=False, callbacks=[], enable_checkpointing=False, profiler=profiler)
    trainer.fit(_Bare(spec, spec.build()), datamodule=_Data(spec, total))
    _sync(spec.device)
    return _periods(times, warmup)


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


def run_recipe(
    spec: Spec, *, warmup: int, steps: int, parts: Optional[int] = None, profiler: Any = None
) -> list[float]:
    """The recipe's module with the first ``parts`` of its logger and callbacks (all by default)."""
    total, times = warmup + steps + 1, []
    run = Path(tempfile.mkdtemp(dir=spec.root))
    chosen = recipe_parts(spec)[:parts]
    logger = next((make(run) for name, make in chosen if name == "logger"), False)
    callbacks = [make(run) for name, make in chosen if name != "logger"]
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    every = spec.trainer_config.get("log_every_n_steps", 50)
    trainer = _trainer(spec, total, times, logger=logger, callbacks=callbacks, enable_checkpointing=checkpointing,
                       log_every_n_steps=every, profiler=profiler)  # fmt: skip
    trainer.fit(spec.build(), datamodule=_Data(spec, total))
    _sync(spec.device)
    return _periods(times, warmup)


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


def profile(spec: Spec, *, warmup: int, steps: int) -> dict[str, Any]:
    """Per-step time of every Trainer action (Lightning's SimpleProfiler) for the bare Trainer and the recipe."""
    out: dict[str, Any] = {}
    for name, run in (("trainer", run_trainer), ("recipe", run_recipe)):
        profiler = SimpleProfiler()
        run(spec, warmup=warmup, steps=steps, profiler=profiler)
        per_step: dict[str, float] = {}
        for action, durations in profiler.recorded_durations.items():
            if action == "run_training_epoch":  # the whole epoch: the sum of the rest
                continue
            # The two modules' classes differ (_Bare, ViTClassifier): name their hooks alike to compare them.
            action = re.sub(r"^\[LightningModule\]\w+\.", "[LightningModule].", action)
            per_step[action] = per_step.get(action, 0.0) + sum(durations) / (warmup + steps + 1) * 1e3
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


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_digits",
                        help="vit_digits: the digits ViT of vit_digits.yaml on real digits (default); vit_b16 /"
                             " resnet50: the ImageNet configs' models on one synthetic batch; gpt2_124m: the GPT of"
                             " gpt2_124m.yaml on one batch of random tokens (GPU modes)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=200, help="timed steps per candidate and repetition (default 200;"
                        " at least 100 for the mean to hold a checkpoint of every_n_steps=100)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default 10)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of loop, trainer, recipe (default 5)")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default=None,
                        help="default: the config's (digits 32-true, the ImageNet configs bf16-mixed)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's (digits 64, GPT 64)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's (digits 16, ImageNet"
                        " training crop: ViT 224, ResNet 176); small ones make ImageNet models CPU-sized")  # fmt: skip
    parser.add_argument("--model-args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override the config's model arguments, e.g. depth=1 width=64 (YAML values)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (in all three)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is"
                        " steadier on a machine shared with other jobs)")  # fmt: skip
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s for MFU; default: bf16 dense peaks by GPU name (none on CPU)")  # fmt: skip
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the recipe's module alone and with each of its logger and callbacks added"
                             " in turn (default on)")  # fmt: skip
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help="run bare Trainer and recipe once more under SimpleProfiler: when a goal is missed"
                             " (auto, default), always or never")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/overhead.json;"
                        " for another --model overhead_<model>.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--steps and --reps must be >= 1, --warmup >= 0")

    with tempfile.TemporaryDirectory() as tmp, quiet_lightning(), torch_threads(args.threads):
        spec = _spec(args, Path(tmp))
        if spec.device.type == "cuda":
            # Fixed input shapes: let cuDNN pick its fastest convolutions, in all three alike (the Trainer keeps it).
            torch.backends.cudnn.benchmark = True
        timing = dict(warmup=args.warmup, steps=args.steps)
        candidates: dict[str, Callable[[], list[float]]] = {
            "loop": lambda: run_loop(spec, **timing),
            "trainer": lambda: run_trainer(spec, **timing),
        }
        parts = recipe_parts(spec)
        if args.breakdown:
            candidates["recipe module"] = lambda: run_recipe(spec, parts=0, **timing)
            for i, (name, _) in enumerate(parts[:-1], start=1):
                candidates[f"+ {name}"] = lambda i=i: run_recipe(spec, parts=i, **timing)
        candidates["recipe"] = lambda: run_recipe(spec, **timing)
        periods = interleave(candidates, reps=args.reps)
        median = {name: [statistics.median(p) for p in runs] for name, runs in periods.items()}
        mean = {name: [statistics.fmean(p) for p in runs] for name, runs in periods.items()}

        report = Report("overhead", args.reps, config_of(args, argv))
        report.add("recipe / loop, median step", ratios(median["recipe"], median["loop"]), goal=("<=", 1.03))
        report.add("recipe / trainer, median step", ratios(median["recipe"], median["trainer"]), goal=("<=", 1.01))
        report.add("trainer / loop, median step", ratios(median["trainer"], median["loop"]),
                   note="Lightning's own per-step cost")  # fmt: skip
        report.add("recipe / loop, mean step", ratios(mean["recipe"], mean["loop"]),
                   note="with logging steps, epoch ends and checkpoint saves")  # fmt: skip
        report.add("recipe / trainer, mean step", ratios(mean["recipe"], mean["trainer"]),
                   note="with logging steps, epoch ends and checkpoint saves")  # fmt: skip
        if args.breakdown:
            names = ["recipe module", *[f"+ {n}" for n, _ in parts[:-1]], "recipe"]
            labels = ["recipe module", *[f"+ {n}" for n, _ in parts]]
            previous = "trainer"
            for name, label in zip(names, labels):
                report.add(f"breakdown: {label} / previous, median step", ratios(median[name], median[previous]),
                           note=f"previous = {previous}")  # fmt: skip
                previous = name
        for name in ("loop", "trainer", "recipe"):
            report.add(f"{name} step, median", [1e3 * v for v in median[name]], unit="ms")
        for name in ("loop", "trainer", "recipe"):
            report.add(f"{name} step, mean", [1e3 * v for v in mean[name]], unit="ms")

        counted = flops_per_step(spec)
        model = spec.build()
        # GPT: MFU in nanoGPT's convention (PaLM's 6N + 12LdT per token); the images: the counted FLOPs.
        tokens = spec.data == "tokens"
        flops = gpt_flops_per_token(model, spec.image_size) * spec.samples_per_batch if tokens else counted
        peak = args.peak_flops or peak_flops(spec.device, spec.precision)
        for name in ("loop", "trainer", "recipe"):
            report.add(f"{name} {spec.samples_unit}", [spec.samples_per_batch / v for v in median[name]],
                       unit=spec.samples_unit, note="batch size / median step")  # fmt: skip
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
        shape = f"context {spec.image_size}" if tokens else f"{spec.image_size} px"
        report.notes.append(
            f"{spec.model_class.__name__} {report.extra['model']['parameters']:,} parameters, batch {spec.batch_size},"
            f" {shape}, {spec.precision}, {spec.device.type}; {args.steps} timed steps after"
            f" {args.warmup} warmup per candidate and repetition; recipe = module + {', '.join(n for n, _ in parts)}"
        )
        source = f"6N + 12LdT per token (nanoGPT); FlopCounterMode counts {counted:.4g}" if tokens else "FlopCounterMode"
        report.notes.append(f"model FLOPs per training step ({source}): {flops:.4g}; MFU "
                            + (f"against a peak of {peak:.4g} FLOP/s" if peak else "n/a: no peak FLOP/s known for"
                               " this device and precision (--peak-flops)"))  # fmt: skip
        missed = any(f.met is False for f in report.figures)
        if args.profile == "always" or (args.profile == "auto" and missed):
            profiled = profile(spec, **timing)
            report.extra["profile_ms_per_step"] = profiled
            names = [name for name, _ in parts if name != "logger"]
            report.extra["callback_hooks_ms_per_step"] = callback_ms_per_step(profiled["recipe"], names)
            report.notes.extend(_profile_notes(profiled, [name for name, _ in parts]))
        default = RESULTS / ("overhead.json" if args.model == "vit_digits" else f"overhead_{args.model}.json")
        return report.finish(args.out if args.out is not None else default)


if __name__ == "__main__":
    main()
