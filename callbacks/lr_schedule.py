"""Per-optimizer-step learning-rate warmup and decay, as a drop-in Lightning callback.

Copy this one file into your project: it needs torch and lightning only. Preview a schedule before
training with ``python -m lightning_recipes.callbacks.lr_schedule --total-steps 1000 --warmup-steps 100``
(or ``python lr_schedule.py ...`` on the copied file); add ``--plot out.png`` for a picture.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any, Optional

import torch
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["LRSchedule", "lr_factor"]

DECAY_KINDS = ("cosine", "linear", "polynomial", "step", "constant", "cosine_restarts", "wsd")
# Arguments that only mean something for one decay kind, with their default for that kind.
_KIND_ARGS: dict[str, tuple[str, Any]] = {
    "power": ("polynomial", 1.0),
    "milestones": ("step", None),
    "gamma": ("step", 0.1),
    "period": ("cosine_restarts", None),
    "period_mult": ("cosine_restarts", 1.0),
    "decay_fraction": ("wsd", 0.2),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _resolve_kind_args(decay: str, given: dict[str, Any]) -> dict[str, Any]:
    """Rejects an argument given for another decay kind and fills in the defaults of ``decay``."""
    if decay not in DECAY_KINDS:
        raise ValueError(f"`decay` must be one of {', '.join(map(repr, DECAY_KINDS))}, got {decay!r}")
    resolved = {}
    for name, (kind, default) in _KIND_ARGS.items():
        value = given.get(name)
        if value is not None and kind != decay:
            raise ValueError(f"`{name}={value!r}` applies only to decay={kind!r}, got decay={decay!r}")
        resolved[name] = default if value is None else value
    return resolved


def _check_schedule(
    *,
    total_steps: Optional[int],
    warmup_steps: Optional[int],
    warmup_start_factor: float,
    decay: str,
    min_lr_factor: float,
    **kind_args: Any,
) -> dict[str, Any]:
    """Validates a schedule; checks that need ``total_steps`` run only when it is known."""
    k = _resolve_kind_args(decay, kind_args)
    if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
        raise ValueError(f"`total_steps` must be an integer >= 1, got {total_steps!r}")
    if warmup_steps is not None:
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}")
        if total_steps is not None and warmup_steps >= total_steps:
            raise ValueError(
                f"`warmup_steps={warmup_steps}` must be shorter than training: it must be < total_steps={total_steps}"
            )
    if not _is_real(warmup_start_factor) or not 0.0 <= warmup_start_factor <= 1.0:
        raise ValueError(f"`warmup_start_factor` must be a number in [0, 1], got {warmup_start_factor!r}")
    if not _is_real(min_lr_factor) or not 0.0 <= min_lr_factor <= 1.0:
        raise ValueError(
            f"`min_lr_factor` must be a number in [0, 1] (the final LR as a fraction of the base LR; above 1 the"
            f" minimum would exceed the base), got {min_lr_factor!r}"
        )
    if decay == "constant" and min_lr_factor != 0.0:
        raise ValueError(f"`min_lr_factor={min_lr_factor!r}` has no effect with decay='constant'; leave it at 0")
    if not _is_real(k["power"]) or k["power"] <= 0:
        raise ValueError(f"`power` must be a number > 0, got {k['power']!r}")
    if not _is_real(k["gamma"]) or not 0.0 < k["gamma"] < 1.0:
        raise ValueError(f"`gamma` must be a number in (0, 1), got {k['gamma']!r}")
    if not _is_real(k["period_mult"]) or k["period_mult"] < 1.0:
        raise ValueError(f"`period_mult` must be a number >= 1, got {k['period_mult']!r}")
    if not _is_real(k["decay_fraction"]) or not 0.0 < k["decay_fraction"] <= 1.0:
        raise ValueError(f"`decay_fraction` must be a number in (0, 1], got {k['decay_fraction']!r}")
    if decay == "cosine_restarts" and (not _is_int(k["period"]) or k["period"] < 1):
        raise ValueError(f"`period` must be an integer >= 1 (steps per cosine cycle), got {k['period']!r}")
    if decay == "step":
        milestones = k["milestones"]
        if (
            not isinstance(milestones, Sequence)
            or isinstance(milestones, str)
            or not milestones
            or not all(_is_int(m) for m in milestones)
            or any(b <= a for a, b in zip(milestones, milestones[1:]))
        ):
            raise ValueError(
                f"`milestones` must be a non-empty, strictly increasing list of integer steps, got {milestones!r}"
            )
        low = warmup_steps or 0
        high = total_steps if total_steps is not None else math.inf
        if not low < milestones[0] or milestones[-1] > high:
            raise ValueError(
                f"`milestones={list(milestones)!r}` must lie in (warmup_steps, total_steps] = ({low}, {high}]"
            )
        k["milestones"] = list(milestones)
    if decay == "wsd" and total_steps is not None:
        decay_steps = round(k["decay_fraction"] * total_steps)
        if decay_steps < 1 or total_steps - decay_steps < (warmup_steps or 0):
            raise ValueError(
                f"`decay_fraction={k['decay_fraction']!r}` of total_steps={total_steps} gives {decay_steps} decay"
                f" steps; they must be >= 1 and start after warmup_steps={warmup_steps or 0}"
            )
    return k


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.0,
    decay: str = "cosine",
    min_lr_factor: float = 0.0,
    power: Optional[float] = None,
    milestones: Optional[Sequence[int]] = None,
    gamma: Optional[float] = None,
    period: Optional[int] = None,
    period_mult: Optional[float] = None,
    decay_fraction: Optional[float] = None,
) -> float:
    """The multiplier of the base LR for optimizer step ``step`` (0-based): a pure function of its arguments.

    With ``W = warmup_steps``, ``T = total_steps`` and ``m = min_lr_factor``:

    - warmup, ``step < W``: ``warmup_start_factor + (1 - warmup_start_factor) * step / W``;
    - the peak, 1.0, is reached at ``step == W``; decay runs over ``p = (step - W) / (T - W)`` in [0, 1]:
      ``cosine``: ``m + (1 - m) * (1 + cos(pi p)) / 2``; ``linear``: ``m + (1 - m)(1 - p)``;
      ``polynomial``: ``m + (1 - m)(1 - p) ** power``; ``step``: ``max(m, gamma ** k)`` with ``k`` the
      number of ``milestones`` (absolute steps) ``<= step``; ``constant``: 1; ``cosine_restarts``: cosine
      from 1 to ``m`` over cycles of ``period``, ``period * period_mult``, ... steps starting at ``W``;
      ``wsd``: 1 until the last ``round(decay_fraction * T)`` steps, then linear to ``m``.

    ``lr_factor(T) == m``: the optimizer is left at the minimum; the last step taken (``T - 1``) uses the
    value one step before (the Hugging Face / timm convention). Steps past ``T`` keep the final value.
    """
    if not _is_int(step) or step < 0:
        raise ValueError(f"`step` must be an integer >= 0, got {step!r}")
    k = _check_schedule(
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup_start_factor=warmup_start_factor,
        decay=decay,
        min_lr_factor=min_lr_factor,
        power=power,
        milestones=milestones,
        gamma=gamma,
        period=period,
        period_mult=period_mult,
        decay_fraction=decay_fraction,
    )
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    low = min_lr_factor
    since_peak = step - warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "step":
        return max(low, k["gamma"] ** bisect_right(k["milestones"], step))
    if decay == "cosine_restarts":
        length, mult = float(k["period"]), float(k["period_mult"])
        if mult == 1.0:
            start = (since_peak // k["period"]) * length
        else:  # cycles grow geometrically, so this loop runs O(log(step)) times
            start = 0.0
            while since_peak >= start + length:
                start, length = start + length, length * mult
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * (since_peak - start) / length))
    if decay == "wsd":
        decay_steps = round(k["decay_fraction"] * total_steps)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return low + (1.0 - low) * (1.0 - min(1.0, (step - decay_start) / decay_steps))
    progress = min(1.0, since_peak / (total_steps - warmup_steps))
    if decay == "cosine":
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "linear":
        return low + (1.0 - low) * (1.0 - progress)
    return low + (1.0 - low) * (1.0 - progress) ** k["power"]  # polynomial



def _data_parallel_size(trainer: "pl.Trainer") -> int:
    """Processes that each train on their own batch: the strategy's sampler replicas (the definition
    ``GradientAccumulation`` and ``ResumableDataLoader`` share), not the world size: tensor-parallel ranks share one
    batch; 1 for a single-process strategy."""
    return int((getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1))

class LRSchedule(Callback):
    """Sets every parameter group's LR before each optimizer step from :func:`lr_factor` of the step count.

    Each group keeps its own base LR (the LR it was created with), so layer-wise or no-decay groups keep
    their ratios. The step is ``trainer.global_step``, which counts optimizer steps: with
    ``accumulate_grad_batches=k`` an epoch of ``n`` batches is ``ceil(n / k)`` steps. The schedule length
    is ``total_steps`` if given, else ``trainer.estimated_stepping_batches`` (which honours ``max_steps``).

    Under ``precision="16-mixed"`` a step the GradScaler skips (inf/NaN gradients) still counts: Lightning
    2.6 increments ``global_step`` whether or not ``scaler.step`` ran the optimizer, so the schedule moves
    on and that step's LR is never applied, exactly like a torch step-based scheduler under Lightning.

    Args:
        decay: ``"cosine"``, ``"linear"``, ``"polynomial"``, ``"step"``, ``"constant"``,
            ``"cosine_restarts"`` or ``"wsd"`` (warmup-stable-decay); see :func:`lr_factor`.
        warmup_steps: Linear warmup length in optimizer steps. Exclusive with ``warmup_fraction``.
        warmup_fraction: Warmup length as a fraction of the total steps, rounded to the nearest step.
        warmup_start_factor: Warmup starts at this multiple of the base LR.
        min_lr_factor: The decay ends at this multiple of the base LR (floor of ``"step"``).
        power: Exponent of ``"polynomial"`` (default 1).
        milestones: Absolute optimizer steps at which ``"step"`` multiplies the LR by ``gamma`` (default 0.1).
        gamma: See ``milestones``.
        period: Length in steps of the first ``"cosine_restarts"`` cycle; later cycles are ``period_mult``
            (default 1) times longer than the one before.
        period_mult: See ``period``.
        decay_fraction: Share of the total steps spent decaying at the end of ``"wsd"`` (default 0.2).
        total_steps: Schedule length in optimizer steps; default: from the Trainer.
        reference_batch_size: If set, the linear scaling rule multiplies every base LR by
            ``global batch / reference_batch_size``, with global batch = micro batch x
            ``accumulate_grad_batches`` x data-parallel world size.
        micro_batch_size: Per-process batch size for the scaling rule; default: the train dataloader's.

    Logs ``lr/<group name>`` (a group's ``"name"`` key, else ``group<i>``) every
    ``Trainer(log_every_n_steps)`` optimizer steps.
    """

    def __init__(
        self,
        *,
        decay: str = "cosine",
        warmup_steps: Optional[int] = None,
        warmup_fraction: Optional[float] = None,
        warmup_start_factor: float = 0.0,
        min_lr_factor: float = 0.0,
        power: Optional[float] = None,
        milestones: Optional[list[int]] = None,
        gamma: Optional[float] = None,
        period: Optional[int] = None,
        period_mult: Optional[float] = None,
        decay_fraction: Optional[float] = None,
        total_steps: Optional[int] = None,
        reference_batch_size: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if warmup_steps is not None and warmup_fraction is not None:
            raise ValueError(
                f"Pass either `warmup_steps` or `warmup_fraction`, not both; got warmup_steps={warmup_steps!r}"
                f" and warmup_fraction={warmup_fraction!r}"
            )
        if warmup_fraction is not None and (not _is_real(warmup_fraction) or not 0.0 <= warmup_fraction < 1.0):
            raise ValueError(f"`warmup_fraction` must be a number in [0, 1), got {warmup_fraction!r}")
        for name, value in (("reference_batch_size", reference_batch_size), ("micro_batch_size", micro_batch_size)):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if micro_batch_size is not None and reference_batch_size is None:
            raise ValueError(
                f"`micro_batch_size={micro_batch_size!r}` is only used by the scaling rule; set `reference_batch_size`"
            )
        self._schedule_args = dict(
            warmup_start_factor=warmup_start_factor,
            decay=decay,
            min_lr_factor=min_lr_factor,
            power=power,
            milestones=list(milestones) if isinstance(milestones, (list, tuple)) else milestones,
            gamma=gamma,
            period=period,
            period_mult=period_mult,
            decay_fraction=decay_fraction,
        )
        _check_schedule(total_steps=total_steps, warmup_steps=warmup_steps, **self._schedule_args)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.warmup_fraction = warmup_fraction
        self.total_steps = total_steps
        self.reference_batch_size = reference_batch_size
        self.micro_batch_size = micro_batch_size
        # Resolved when training starts: the schedule length and the per-group base LRs (after scaling).
        self.resolved_total_steps: Optional[int] = None
        self.resolved_warmup_steps: Optional[int] = None
        self.base_lrs: Optional[list[float]] = None
        self._loaded_state: Optional[dict[str, Any]] = None

    def factor(self, step: int) -> float:
        """The base-LR multiplier at ``step`` for this callback's resolved configuration."""
        if self.resolved_total_steps is None:
            raise RuntimeError("LRSchedule.factor() needs the schedule length: call it after training has started")
        return lr_factor(
            step,
            total_steps=self.resolved_total_steps,
            warmup_steps=self.resolved_warmup_steps or 0,
            **self._schedule_args,
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.total_steps is None and trainer.max_steps == -1 and trainer.max_epochs == -1:
            raise MisconfigurationException(
                "LRSchedule needs a finite schedule length, but Trainer(max_steps=-1, max_epochs=-1) trains forever:"
                " set Trainer(max_steps=...) or Trainer(max_epochs=...), or LRSchedule(total_steps=...)"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Optimizers and schedulers exist only after `setup()` (Lightning 2.6 creates them in
        # `strategy.setup`), so the checks that need them run here, before the first batch.
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                f"LRSchedule drives exactly one optimizer, but {type(pl_module).__name__}.configure_optimizers"
                f" returned {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer:
                raise MisconfigurationException(
                    f"LRSchedule and the {type(config.scheduler).__name__} returned by"
                    f" {type(pl_module).__name__}.configure_optimizers both set the LR of the"
                    f" {type(optimizer).__name__} optimizer: remove one of them"
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total, source = self._total_steps(trainer)
        warmup = self.warmup_steps
        if self.warmup_fraction is not None:
            warmup = round(self.warmup_fraction * total)
        try:
            _check_schedule(total_steps=total, warmup_steps=warmup, **self._schedule_args)
        except ValueError as err:
            raise MisconfigurationException(f"LRSchedule with total_steps={total} from {source}: {err}") from err
        self.resolved_total_steps, self.resolved_warmup_steps = total, warmup

        groups = trainer.optimizers[0].param_groups
        loaded, self._loaded_state = self._loaded_state, None
        if loaded is not None:
            # Resume: the optimizer's LRs are the last scheduled values, not the base, so the base comes
            # from the checkpoint. That makes the LR at step t equal to the uninterrupted run's.
            self.base_lrs = list(loaded["base_lrs"])
            if (loaded["total_steps"], loaded["warmup_steps"]) != (total, warmup):
                rank_zero_warn(
                    f"LRSchedule resumed with total_steps={total}, warmup_steps={warmup}, but the checkpoint was"
                    f" written with total_steps={loaded['total_steps']}, warmup_steps={loaded['warmup_steps']}:"
                    " the LR curve changes from here on"
                )
        else:
            scale = self._batch_scale(trainer)
            self.base_lrs = [float(group["lr"]) * scale for group in groups]
            if scale != 1.0:
                scaled = ", ".join(
                    f"{name}: {float(g['lr']):.6g} -> {lr:.6g}"
                    for name, g, lr in zip(self._group_names(groups), groups, self.base_lrs)
                )
                rank_zero_info(f"LRSchedule: linear scaling rule multiplies the base LRs by {scale:.6g} ({scaled})")
        self._apply(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Early, for optimizers that read their LR before running the closure (LBFGS) and for code
        # that reads the LR in `training_step`. Idempotent within an accumulation window.
        self._apply(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        lrs = self._apply(trainer)
        every = trainer.log_every_n_steps
        step = trainer.global_step
        if lrs and every > 0 and (step + 1) % every == 0 and trainer.is_global_zero:
            # Same step axis as Lightning's own step metrics: the index of the optimizer step.
            for logger in trainer.loggers:
                logger.log_metrics(lrs, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.base_lrs is None:
            return {}
        return {
            "base_lrs": list(self.base_lrs),
            "total_steps": self.resolved_total_steps,
            "warmup_steps": self.resolved_warmup_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict) if state_dict else None

    def _apply(self, trainer: pl.Trainer) -> dict[str, float]:
        """Writes base LR x factor(global_step) into every group; returns ``{metric name: LR}``."""
        if self.base_lrs is None or not trainer.optimizers:
            return {}
        factor = self.factor(trainer.global_step)
        groups = trainer.optimizers[0].param_groups
        for group in groups[len(self.base_lrs) :]:
            # A group added mid-training (e.g. by BaseFinetuning, relative to the scheduled LR of the
            # other groups) gets the base that reproduces its current LR at this step.
            lr = float(group["lr"])
            self.base_lrs.append(lr / factor if factor > 0 else lr)
        logged = {}
        for name, group, base in zip(self._group_names(groups), groups, self.base_lrs):
            lr = base * factor
            if isinstance(group["lr"], torch.Tensor):  # tensor LRs (capturable / compiled optimizers)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            logged[f"lr/{name}"] = lr
        return logged

    @staticmethod
    def _group_names(groups: list[dict[str, Any]]) -> list[str]:
        return [str(group.get("name", f"group{i}")) for i, group in enumerate(groups)]

    def _total_steps(self, trainer: pl.Trainer) -> tuple[int, str]:
        if self.total_steps is not None:
            return self.total_steps, "LRSchedule(total_steps)"
        estimated = trainer.estimated_stepping_batches
        source = (
            f"Trainer(max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs},"
            f" accumulate_grad_batches={trainer.accumulate_grad_batches})"
        )
        if not math.isfinite(estimated) or estimated < 1:
            raise MisconfigurationException(
                f"LRSchedule cannot infer the number of optimizer steps from {source} (got {estimated}):"
                " set Trainer(max_steps=...) or LRSchedule(total_steps=...)"
            )
        return int(estimated), source

    def _batch_scale(self, trainer: pl.Trainer) -> float:
        if self.reference_batch_size is None:
            return 1.0
        micro = self.micro_batch_size
        if micro is None:
            micro = getattr(trainer.train_dataloader, "batch_size", None)
            if not _is_int(micro):
                raise MisconfigurationException(
                    "LRSchedule(reference_batch_size=...) needs the micro batch size, but the train dataloader has"
                    f" no integer `batch_size` (got {micro!r}): pass LRSchedule(micro_batch_size=...)"
                )
        world = _data_parallel_size(trainer)
        global_batch = micro * trainer.accumulate_grad_batches * world
        rank_zero_info(
            f"LRSchedule: global batch {global_batch} = micro batch {micro} x accumulate_grad_batches"
            f" {trainer.accumulate_grad_batches} x {world} data-parallel processes;"
            f" reference_batch_size={self.reference_batch_size}"
        )
        return global_batch / self.reference_batch_size


def _init_args_from_config(path: str) -> dict[str, Any]:
    """``init_args`` of the ``trainer.callbacks`` entry whose ``class_path`` ends in ``LRSchedule``."""
    import yaml  # installed with jsonargparse; only the preview command needs it

    with open(path) as file:
        config = yaml.safe_load(file) or {}
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(entry, dict) and str(entry.get("class_path", "")).split(".")[-1] == "LRSchedule":
            init_args = dict(entry.get("init_args") or {})
            if "total_steps" not in init_args and (trainer.get("max_steps") or -1) > 0:
                init_args["total_steps"] = trainer["max_steps"]
            return init_args
    raise SystemExit(f"error: {path} has no trainer.callbacks entry whose class_path ends in LRSchedule")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Prints (and with ``--plot`` draws) the LR curve of a schedule before any training."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lightning_recipes.callbacks.lr_schedule",
        description="Preview an LRSchedule: print step -> LR factor (and LR), optionally plot it to a PNG.",
    )
    parser.add_argument("--config", help="YAML config with a trainer.callbacks entry, class_path ending in LRSchedule")
    parser.add_argument("--total-steps", type=int, help="optimizer steps (default: the config's total_steps/max_steps)")
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--warmup-fraction", type=float)
    parser.add_argument("--warmup-start-factor", type=float)
    parser.add_argument("--decay", choices=DECAY_KINDS)
    parser.add_argument("--min-lr-factor", type=float)
    parser.add_argument("--power", type=float)
    parser.add_argument("--milestones", type=int, nargs="+")
    parser.add_argument("--gamma", type=float)
    parser.add_argument("--period", type=int)
    parser.add_argument("--period-mult", type=float)
    parser.add_argument("--decay-fraction", type=float)
    parser.add_argument("--base-lr", type=float, help="also print LR = base LR x factor")
    parser.add_argument("--rows", type=int, default=11, help="evenly spaced rows besides the boundaries (default 11)")
    parser.add_argument("--plot", metavar="PNG", help="write the curve to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    config = _init_args_from_config(args.config) if args.config else {}
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "base_lr", "rows", "plot"):
            config[key] = value
    total = config.pop("total_steps", None)
    if total is None:
        parser.error("--total-steps is required (the config has no LRSchedule total_steps or trainer.max_steps)")
    for key in ("reference_batch_size", "micro_batch_size"):
        if config.pop(key, None) is not None:
            print(f"note: {key} is set; at fit time every base LR is scaled by global batch / reference_batch_size")
    warmup_fraction = config.pop("warmup_fraction", None)
    warmup = config.pop("warmup_steps", None)
    if warmup_fraction is not None and warmup is None:
        warmup = round(warmup_fraction * total)
    schedule = {"total_steps": total, "warmup_steps": warmup or 0, **config}
    try:
        factors = [lr_factor(step, **schedule) for step in range(total + 1)]
    except (TypeError, ValueError) as err:
        parser.error(str(err))

    kind = schedule.get("decay", "cosine")
    w = schedule["warmup_steps"]
    marks = {0, total - 1, total}
    if w:
        marks |= {w - 1, w}
    if kind == "step":
        marks |= {m for milestone in schedule["milestones"] for m in (milestone - 1, milestone)}
    if kind == "wsd":
        start = total - round((schedule.get("decay_fraction") or 0.2) * total)
        marks |= {start - 1, start}
    rows = max(args.rows, 2)
    marks |= {round(i * total / (rows - 1)) for i in range(rows)}
    described = ", ".join(f"{k}={v}" for k, v in schedule.items() if v is not None)
    print(f"LRSchedule preview: {described}")
    print(f"{'step':>8}  {'factor':>10}" + (f"  {'lr':>12}" if args.base_lr is not None else ""))
    for step in sorted(m for m in marks if 0 <= m <= total):
        line = f"{step:>8}  {factors[step]:>10.6f}"
        if args.base_lr is not None:
            line += f"  {args.base_lr * factors[step]:>12.4e}"
        print(line)

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = [f * args.base_lr for f in factors] if args.base_lr is not None else factors
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
        ax.plot(range(total + 1), values, lw=1.8)
        if w:
            ax.axvline(w, color="gray", ls="--", lw=0.8, label=f"end of warmup (step {w})")
            ax.legend(loc="upper right", frameon=False)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate" if args.base_lr is not None else "LR / base LR")
        ax.set_title(f"LRSchedule(decay={kind!r}), {total} steps", fontsize=10)
        ax.set_xlim(0, total)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot)
        plt.close(fig)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
