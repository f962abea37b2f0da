"""GradNormMonitor's per-step cost against Lightning's ``grad_norm`` utility and torch's ``clip_grad_norm_``, on the
parameter shapes of torchvision's ViT-B/16, and the host syncs the monitor makes on steps that log nothing.

    python benchmarks/grad_norm.py                          # ViT-B/16 shapes: 86M parameters, 152 tensors, CPU
    python benchmarks/grad_norm.py --layers 1 --width 64 --reps 3 --calls 2     # tiny

Timed, interleaved (monitor, grad_norm, clip_grad_norm_, ... per repetition), each ``--calls`` calls per repetition:

- ``monitor``: what ``GradNormMonitor`` runs on an optimizer step that logs nothing, driven through its hooks as the
  Trainer drives them: ``setup`` with a ``Trainer(gradient_clip_val=1.0)`` (the recipes' setting), then per step
  ``on_before_optimizer_step`` (pre-clip norms) and the optimizer step post-hook it registers (the clip count; the
  post-clip norm is measured on logging steps only). ``monitor, no clipping``: ``gradient_clip_val=None``.
- ``lightning grad_norm``: ``lightning.pytorch.utilities.grad_norm(module, norm_type=2)``, the per-parameter
  norms Lightning's docs log from ``on_before_optimizer_step``.
- ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(params, max_norm=inf)``: the total norm and the rescale
  (by 1.0, so the gradients do not shrink from one call to the next); ``get_total_norm``: the total norm alone.

The host-sync count runs the monitor in a small real Trainer (clipping on, ``log_every_n_steps=5``) with
``torch.Tensor.item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``cpu`` and ``numpy``
patched to count calls made from inside the monitor's hooks, by step: the goal is 0 on every step that logs
nothing. The same run counts the monitor's passes over tensors (``torch._foreach_norm`` calls) per step. On CPU these reads are what would be host-device syncs on a GPU; a sync inside a torch operator (on CUDA
e.g. ``nonzero`` or boolean-mask indexing, none of which the monitor calls) is not seen by this count.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import VisionTransformer

from report import Report, config_of, interleave, quiet_lightning, ratios, torch_threads

from lightning_recipes.callbacks import GradNormMonitor

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


class Holder(L.LightningModule):
    """A LightningModule around the network, with random gradients on every parameter."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def vit_with_gradients(*, layers: int, width: int, device: torch.device) -> Holder:
    """torchvision's ViT (ViT-B/16 at 12 layers x 768), uninitialised, then random weights and gradients."""
    heads = max(1, width // 64)
    with torch.device("meta"):  # no initialisation cost: the values are filled below
        net = VisionTransformer(image_size=224, patch_size=16, num_layers=layers, num_heads=heads, hidden_dim=width,
                                mlp_dim=4 * width)  # fmt: skip
    net = net.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02, generator=g)
            p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=g)
    return Holder(net)


def _timed(fn: Callable[[], Any], calls: int, device: torch.device) -> Callable[[], float]:
    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / calls

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def monitor_step(holder: Holder, *, clip: Optional[float]) -> Callable[[], None]:
    """One non-logging optimizer step of GradNormMonitor, through the hooks the Trainer calls."""
    # Never fitted: it only carries the settings the monitor reads (clipping, log interval, no GradScaler, step 0).
    trainer = L.Trainer(accelerator="cpu", gradient_clip_val=clip, log_every_n_steps=50, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    monitor = GradNormMonitor()
    monitor.setup(trainer, holder, "fit")
    # Never stepped: the parameters and gradients stay as they are. The monitor registers its post-hook on it.
    optimizer = torch.optim.SGD(holder.parameters(), lr=0.0)
    assert trainer.global_step == 0 and (0 + 1) % 50 != 0  # a step that logs nothing

    def step() -> None:
        monitor.on_before_optimizer_step(trainer, holder, optimizer)
        monitor._after_step(optimizer, (), {})  # what optimizer.step() calls last, through the registered hook

    return step


# ------------------------------------------------------------------------------------------------ host syncs


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layers(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def count_per_step(monitor: GradNormMonitor, *, steps: int, every: int) -> dict[str, dict[str, list[int]]]:
    """Tensor reads (host syncs on a GPU) and fused norm passes over tensors made inside the monitor's hooks, per
    optimizer step, split into the steps that log and the others."""
    counts: dict[int, dict[str, int]] = {}
    state: dict[str, Any] = {"step": None, "trainer": None}
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    foreach_norm = torch._foreach_norm

    def counted(original: Callable, kind: str) -> Callable:
        @functools.wraps(original)
        def call(*args, **kwargs):
            if state["step"] is not None:
                counts[state["step"]][kind] += 1
            return original(*args, **kwargs)

        return call

    def watched(method: Callable, *, after_step: bool) -> Callable:
        def call(*args, **kwargs):
            pending, trainer = monitor._pending, state["trainer"]
            # After the step Lightning has already counted it: the step the hook belongs to is the previous one.
            step = pending.step if pending is not None else trainer.global_step - (1 if after_step else 0)
            state["step"] = step
            counts.setdefault(step, {"reads": 0, "norm passes": 0})
            try:
                return method(*args, **kwargs)
            finally:
                state["step"] = None

        return call

    class Capture(L.Callback):
        def setup(self, trainer, pl_module, stage):
            state["trainer"] = trainer

    monitor.on_before_optimizer_step = watched(monitor.on_before_optimizer_step, after_step=False)
    monitor._after_step = watched(monitor._after_step, after_step=False)
    monitor.on_train_batch_end = watched(monitor.on_train_batch_end, after_step=True)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * steps, 16, generator=g), torch.randint(0, 4, (8 * steps,), generator=g))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, gradient_clip_val=1.0, log_every_n_steps=every,
                        logger=RecordingLogger(), callbacks=[Capture(), monitor], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original, "reads"))
    torch._foreach_norm = counted(foreach_norm, "norm passes")  # the monitor calls it as torch._foreach_norm
    try:
        trainer.fit(_Tiny(), train_dataloaders=DataLoader(data, batch_size=8))
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch._foreach_norm = foreach_norm
    logged = {step for step, row in trainer.logger.rows if any(k.startswith("grad_norm/") for k in row)}
    expected = {s for s in range(steps) if (s + 1) % every == 0}
    if logged != expected:
        raise RuntimeError(f"the monitor logged at steps {sorted(logged)}, expected {sorted(expected)}")
    return {
        kind: {
            "non-logging": [c[kind] for s, c in sorted(counts.items()) if s not in logged],
            "logging": [c[kind] for s, c in sorted(counts.items()) if s in logged],
        }
        for kind in ("reads", "norm passes")
    }


class RecordingLogger(Logger):
    """Keeps the rows the monitor logs, to check which steps logged."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


# ------------------------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="encoder blocks (default 12: ViT-B/16)")
    parser.add_argument("--width", type=int, default=768, help="hidden size; MLP 4x, heads width/64 (default 768)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions of every candidate (default 7)")
    parser.add_argument("--calls", type=int, default=10, help="calls per candidate and repetition (default 10)")
    parser.add_argument("--sync-steps", type=int, default=20,
                        help="optimizer steps of the host-sync count, logging every 5th (default 20)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/grad_norm.json)")
    args = parser.parse_args(argv)
    if min(args.layers, args.width, args.reps, args.calls) < 1 or args.sync_steps < 5:
        parser.error("--layers, --width, --reps, --calls must be >= 1 and --sync-steps >= 5")
    device = torch.device(args.device)

    with quiet_lightning(), torch_threads(args.threads):
        holder = vit_with_gradients(layers=args.layers, width=args.width, device=device)
        params = list(holder.parameters())
        grads = [p.grad for p in params]
        calls = {
            "monitor": monitor_step(holder, clip=1.0),
            "monitor, no clipping": monitor_step(holder, clip=None),
            "lightning grad_norm": lambda: grad_norm(holder, norm_type=2),
            "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm=math.inf),
            "get_total_norm": lambda: torch.nn.utils.get_total_norm(grads),
        }
        for call in calls.values():  # first calls allocate and register hooks: not timed
            call()
        seconds = interleave({name: _timed(call, args.calls, device) for name, call in calls.items()}, reps=args.reps)

        report = Report("grad_norm", args.reps, config_of(args, argv))
        report.add("lightning grad_norm / monitor", ratios(seconds["lightning grad_norm"], seconds["monitor"]),
                   goal=(">=", 10.0), note="speed-up of the monitor (clipping on) over grad_norm")  # fmt: skip
        report.add("lightning grad_norm / monitor, no clipping",
                   ratios(seconds["lightning grad_norm"], seconds["monitor, no clipping"]))  # fmt: skip
        report.add("clip_grad_norm_ / monitor", ratios(seconds["clip_grad_norm_"], seconds["monitor"]))
        report.add("get_total_norm / monitor, no clipping",
                   ratios(seconds["get_total_norm"], seconds["monitor, no clipping"]),
                   note="1.0 = the monitor costs one fused total norm, the least possible")  # fmt: skip
        for name, values in seconds.items():
            report.add(f"{name} per call", [1e3 * v for v in values], unit="ms")

        every = 5
        for label, monitor in (
            ("GradNormMonitor()", GradNormMonitor()),
            ("GradNormMonitor(layer_depth=2, log_update_ratio=True)",
             GradNormMonitor(layer_depth=2, log_update_ratio=True)),  # fmt: skip
        ):
            counts = count_per_step(monitor, steps=args.sync_steps, every=every)
            reads, passes = counts["reads"], counts["norm passes"]
            report.add(f"host syncs per non-logging step, {label}", reads["non-logging"], unit="reads",
                       goal=("==", 0), note=f"{len(reads['non-logging'])} steps")  # fmt: skip
            report.add(f"host syncs per logging step, {label}", reads["logging"], unit="reads",
                       note="> 0: the count does see the reads a log makes")  # fmt: skip
            report.add(f"norm passes per non-logging step, {label}", passes["non-logging"], unit="_foreach_norm",
                       note="1 with Lightning's norm clipping: the pre-clip norm says if it clipped")  # fmt: skip
            report.add(f"norm passes per logging step, {label}", passes["logging"], unit="_foreach_norm",
                       note="pre- and post-clip gradients, parameters (and update, with log_update_ratio)")  # fmt: skip

        n_params = sum(p.numel() for p in params)
        report.extra["parameters"] = {"tensors": len(params), "elements": n_params, "layers": args.layers,
                                      "width": args.width}  # fmt: skip
        report.notes.append(
            f"{len(params)} gradient tensors, {n_params:,} elements (float32, {args.device}); {args.calls} calls per"
            f" candidate and repetition; torch {torch.get_num_threads()} threads"
        )
        report.notes.append(
            "on CPU every candidate reads all gradients once at memory speed (torch's _foreach_norm has no fused CPU"
            " kernel: it loops over the tensors as grad_norm does), so about 1x is the floor there, and"
            " get_total_norm / monitor shows how close the monitor is to it. The >= 10x goal is about GPUs, where"
            " grad_norm pays a kernel launch and a host sync per parameter (torch.tensor of a list of device"
            " scalars) and the monitor one fused kernel and no sync"
        )
        return report.finish(args.out)


if __name__ == "__main__":
    main()
