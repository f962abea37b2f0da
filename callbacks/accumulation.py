"""Gradient accumulation set by the global batch size, with every window weighted exactly, as a Lightning callback.

Copy this one file into your project: it needs torch and lightning only.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr

__all__ = ["GradientAccumulation"]

SCHEDULE_UNITS = ("epoch", "step")
PARTIAL_WINDOWS = ("mean", "drop")
WEIGHTS = ("samples", "tokens")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")


def _accumulation(global_batch_size: int, micro_batch_size: int, replicas: int, what: str) -> int:
    """``k = global / (micro x replicas)``, or a ``MisconfigurationException`` that names the nearest valid choices."""
    per_step = micro_batch_size * replicas
    if global_batch_size % per_step == 0:
        return global_batch_size // per_step
    below = (global_batch_size // per_step) * per_step
    choices = [str(n) for n in (below, below + per_step) if n > 0]
    micro_hint = ""
    if global_batch_size % replicas == 0:  # micro batch sizes m with m x replicas dividing the global batch
        q = global_batch_size // replicas
        micros = {d for i in range(1, math.isqrt(q) + 1) if q % i == 0 for d in (i, q // i)}
        near = sorted(sorted(micros, key=lambda m: (abs(m - micro_batch_size), m))[:2])
        micro_hint = (
            f", or a micro batch size m with m x {replicas} dividing {global_batch_size}"
            f" (e.g. {' or '.join(map(str, near))})"
        )
    raise MisconfigurationException(
        f"GradientAccumulation: {what} = {global_batch_size} is not a multiple of micro batch {micro_batch_size} x"
        f" {replicas} data-parallel processes = {per_step}. Nearest valid global batch sizes: {' or '.join(choices)}"
        f"{micro_hint}"
    )


def _planned_steps(
    num_batches: int, max_epochs: int, max_steps: int, ks: list[tuple[int, int]], unit: str
) -> int:
    """The number of optimizer steps of a run, by the same rule the callback applies at every window start.

    ``ks`` lists ``(start, k)`` sorted by ``start`` (epochs or optimizer steps). A new ``k`` takes effect at the first
    window start, at or after its ``start``, whose batch index in the epoch is a multiple of the new ``k``: windows
    then stay aligned to Lightning's ``batch_idx % k`` rule and never straddle a change.
    """

    def k_at(t: int) -> int:
        return [k for start, k in ks if start <= t][-1]

    step, k = 0, ks[0][1]
    for epoch in range(max_epochs):
        b = 0
        while b < num_batches:
            target = k_at(epoch if unit == "epoch" else step)
            if target != k and b % target == 0:
                k = target
            b = min(num_batches, (b // k + 1) * k)
            step += 1
            if 0 <= max_steps <= step:
                return step
    return step



def _data_parallel_size(trainer: "pl.Trainer") -> int:
    """Processes that each train on their own batch: the strategy's sampler replicas (the definition
    ``GradientAccumulation`` and ``ResumableDataLoader`` share), not the world size: tensor-parallel ranks share one
    batch; 1 for a single-process strategy."""
    return int((getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1))

class GradientAccumulation(Callback):
    """Accumulates gradients to reach a global batch size, weighting every sample of a window equally.

    **k from the global batch size.** At ``setup`` the callback sets ``Trainer.accumulate_grad_batches`` to
    ``k = global_batch_size / (micro batch x data-parallel processes)``. The micro batch is ``micro_batch_size``,
    else the ``batch_size`` attribute of the LightningModule, its ``hparams`` or the data module, else the
    ``batch_size`` of the train dataloader (``trainer.fit(model, train_dataloaders=loader)``) or of its batch
    sampler. The loader exists only after ``configure_optimizers``, so in that last case k is set at
    ``on_fit_start``: pass ``micro_batch_size`` if ``configure_optimizers`` reads ``estimated_stepping_batches``.

    **Exact windows.** Lightning divides every micro-batch loss by ``k``. That is the window mean only when the
    window holds ``k`` batches of equal size: the last window of an epoch whose length is not a multiple of ``k``
    is under-weighted, and a smaller last batch is over-weighted. This callback scales each micro-batch loss by
    its size relative to the window's first batch and, at the window's last backward, the gradients by
    ``k x first batch / samples in the window``, so that the accumulated gradient is the mean over all samples of
    the window, whatever its size. Full windows of equal batches (all but at most one window per epoch) are left
    untouched: no extra work. ``partial_window="drop"`` instead discards the gradient of a window with fewer than
    ``k`` micro-batches: the optimizer step still counts (the LR schedule and ``estimated_stepping_batches`` stay
    aligned) but parameters and optimizer state are not changed. The loss must be a mean over the batch's first
    dimension (the size Lightning's ``extract_batch_size`` finds); under DDP every process must see the same number
    of samples per window, as ``DistributedSampler`` ensures.

    **Per-token windows** (``weight_by="tokens"``, for language models). A token-level loss is a mean over the
    micro-batch's loss-bearing tokens, and micro-batches carry different numbers of them (padding / ``ignore_index``
    targets, ragged documents): the mean of micro-batch means is then not the mean over the window's tokens (the
    "gradient accumulation bug" Hugging Face's Trainer fixed in 2024). In this mode every window's gradient is the
    mean over all its loss-bearing tokens, on every process together: each micro-batch's loss is weighted by its
    token count, and before the window's last backward one all-reduce of the window's token total (under DDP)
    fixes the scale. Contract: ``training_step`` returns the mean over the micro-batch's loss-bearing tokens (what
    ``F.cross_entropy(logits, targets, ignore_index=...)`` returns), and ``count_tokens(batch)`` counts them: by
    default the targets (``batch["labels"]`` or ``batch["targets"]`` of a dict, else the last element of a tuple
    or list) that are not ``ignore_index``; override ``count_tokens`` in a subclass for other batches. Runs in a
    single process and under DDP (which defers the all-reduce to the window's last backward); other multi-process
    strategies are refused. ``global_batch_size`` still counts samples (it sets ``k``).

    **Schedule.** ``schedule={start: global batch size}`` grows the global batch from epoch (``schedule_unit=
    "epoch"``) or optimizer step (``"step"``) ``start``; sizes must not decrease. A step-based change takes effect at
    the first window start at or after ``start`` whose batch index is a multiple of the new ``k``. With a schedule
    the callback sets ``Trainer(max_steps)`` to the planned number of optimizer steps (when that is the tighter
    limit) at ``on_fit_start``, so that ``trainer.estimated_stepping_batches`` and an ``LRSchedule`` read there or
    later are exact; a scheduler built in ``configure_optimizers`` runs before and sees the first ``k`` only.

    **BatchNorm** normalises over the micro-batch, not the global batch: with ``k > 1`` the callback warns once with
    the effective BatchNorm batch size and the alternatives. Under DDP Lightning all-reduces once per optimizer step
    (``no_sync`` during accumulation); this callback keeps it so.

    Logs every ``log_every_n_steps`` optimizer steps (default: the Trainer's), from rank zero:
    ``accumulation/global_batch_size`` (samples in the window that stepped, over all processes),
    ``accumulation/samples_seen`` (cumulative) and ``accumulation/micro_batches`` (the window's micro-batches).

    Args:
        global_batch_size: Samples per optimizer step over all data-parallel processes, from the start of training.
            None: one micro-batch per process per step (k = 1): nothing is accumulated, the callback only logs, so
            a config can carry it and a user sets the size when they want accumulation.
        micro_batch_size: Samples per process per forward pass; default: the ``batch_size`` attribute found by
            Lightning's ``lightning_getattr``, else the train dataloader's (or its batch sampler's) ``batch_size``.
        schedule: ``{start: global batch size}`` for ``start >= 1``, non-decreasing sizes ``>= global_batch_size``.
        schedule_unit: ``"epoch"`` or ``"step"``: what the schedule's keys count.
        partial_window: ``"mean"`` (exact mean over the window's samples) or ``"drop"``.
        log_every_n_steps: Log every this many optimizer steps; default: ``Trainer(log_every_n_steps)``.
        weight_by: ``"samples"`` (every sample of a window weighs the same) or ``"tokens"`` (every loss-bearing
            token does; see above).
        ignore_index: With ``weight_by="tokens"``: the target value that bears no loss (``count_tokens``).
    """

    def __init__(
        self,
        *,
        global_batch_size: Optional[int] = None,
        micro_batch_size: Optional[int] = None,
        schedule: Optional[dict[int, int]] = None,
        schedule_unit: str = "epoch",
        partial_window: str = "mean",
        log_every_n_steps: Optional[int] = None,
        weight_by: str = "samples",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if weight_by not in WEIGHTS:
            raise ValueError(f"`weight_by` must be one of {', '.join(map(repr, WEIGHTS))}, got {weight_by!r}")
        if not _is_int(ignore_index):
            raise ValueError(f"`ignore_index` must be an integer (a target value that bears no loss), got {ignore_index!r}")
        for name, value in (
            ("global_batch_size", global_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("log_every_n_steps", log_every_n_steps),
        ):
            if value is not None:
                _check_positive_int(name, value)
        if schedule_unit not in SCHEDULE_UNITS:
            raise ValueError(
                f"`schedule_unit` must be one of {', '.join(map(repr, SCHEDULE_UNITS))}, got {schedule_unit!r}"
            )
        if partial_window not in PARTIAL_WINDOWS:
            raise ValueError(
                f"`partial_window` must be one of {', '.join(map(repr, PARTIAL_WINDOWS))}, got {partial_window!r}"
            )
        schedule = dict(schedule or {})
        valid_keys = all(_is_int(k) and k >= 1 for k in schedule)
        if not valid_keys or not all(_is_int(v) and v >= 1 for v in schedule.values()):
            raise ValueError(
                f"`schedule` must map integer starts >= 1 (the size at 0 is `global_batch_size`) to integer global"
                f" batch sizes >= 1, got {schedule!r}"
            )
        if schedule and global_batch_size is None:
            raise ValueError(
                f"`schedule={schedule!r}` grows the global batch from `global_batch_size`, which is None: set"
                " global_batch_size to the size at the start of training"
            )
        sizes = [global_batch_size] + [schedule[k] for k in sorted(schedule)]
        if any(b < a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(
                f"`schedule` must not decrease the global batch size: global_batch_size={global_batch_size} then"
                f" {dict(sorted(schedule.items()))!r}"
            )
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.schedule = dict(sorted(schedule.items()))
        self.schedule_unit = schedule_unit
        self.partial_window = partial_window
        self.log_every_n_steps = log_every_n_steps
        self.weight_by = weight_by
        self.ignore_index = ignore_index
        #: ``(start, k)`` resolved at setup, sorted by start.
        self.ks: list[tuple[int, int]] = []
        self.samples_seen = 0
        self._k: Optional[int] = None  # accumulation of the window in progress (restored on resume)
        self._replicas = 1
        self._micro: Optional[int] = None  # resolved at setup, or at on_fit_start from the train dataloader
        self._trainer_k: Optional[int] = None  # the value we found on the Trainer, restored at teardown
        self._trainer_max_steps: Optional[int] = None
        self._window = _Window()
        self._loss_factor: Any = 1.0  # a float, or a tensor (per-token windows: no host sync)
        self._loaded: Optional[dict[str, Any]] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(global_batch_size=self.global_batch_size)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A fit that ended in an exception got no `teardown` (and checkpoints saved on the exception needed our k):
        # hand back the Trainer's own settings now.
        self.teardown(trainer, pl_module, stage)
        mine = f"GradientAccumulation(global_batch_size={self.global_batch_size})"
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"{mine} sets the accumulation itself, but Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}) is set too: remove one of them"
            )
        for callback in trainer.callbacks:
            if isinstance(callback, GradientAccumulationScheduler):
                raise MisconfigurationException(
                    f"{mine} and GradientAccumulationScheduler(scheduling={callback.scheduling}) both set"
                    " Trainer.accumulate_grad_batches: use GradientAccumulation(schedule=...) instead"
                )
        if trainer.strategy.handles_gradient_accumulation:
            raise MisconfigurationException(
                f"{mine} cannot drive {type(trainer.strategy).__name__}, which accumulates gradients itself"
            )
        if self.weight_by == "tokens" and trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise MisconfigurationException(
                f"GradientAccumulation(weight_by='tokens') with {type(trainer.strategy).__name__}: per-token windows"
                " need gradients that stay local until the window's last backward, as under DDP; use"
                " weight_by='samples' or DDP"
            )
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{mine} needs automatic optimization, but {type(pl_module).__name__}.automatic_optimization is False"
            )
        micro = self.micro_batch_size
        if micro is None and lightning_hasattr(pl_module, "batch_size"):
            micro = lightning_getattr(pl_module, "batch_size")
            if not _is_int(micro) or micro < 1:
                raise MisconfigurationException(
                    f"{mine}: the `batch_size` attribute found by lightning_getattr is {micro!r}, not an integer >= 1:"
                    " pass GradientAccumulation(micro_batch_size=...)"
                )
        self._trainer_k = trainer.accumulate_grad_batches
        self._micro = None
        if micro is not None:
            self._set_k(trainer, micro)
        # Else only the train dataloader knows the micro batch (a DataLoader given to `fit`, or built by the
        # module's `train_dataloader`): Lightning builds it after `setup`, so k is set at `on_fit_start`.

    def _set_k(self, trainer: pl.Trainer, micro: int) -> None:
        replicas = _data_parallel_size(trainer)
        self._replicas = replicas
        first = micro * replicas if self.global_batch_size is None else self.global_batch_size
        self.ks = [(0, _accumulation(first, micro, replicas, "global_batch_size"))]
        for start, size in self.schedule.items():
            self.ks.append((start, _accumulation(size, micro, replicas, f"schedule[{start}]")))
        self._micro = micro
        self._k = self.ks[0][1]
        trainer.accumulate_grad_batches = self._k

    def _loader_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The micro batch size of the train dataloader: its ``batch_size``, else its batch sampler's."""
        # `fit_loop.setup_data()` is what `trainer.estimated_stepping_batches` calls to load the train dataloader
        # before the loop does (Lightning 2.5 and 2.6); once loaded, the loop's own call does nothing.
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        micro = getattr(loader, "batch_size", None)
        if micro is None:  # DataLoader(batch_sampler=...) leaves batch_size None
            micro = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if not _is_int(micro) or micro < 1:
            raise MisconfigurationException(
                f"GradientAccumulation(global_batch_size={self.global_batch_size}) needs the micro batch size, but"
                f" neither {type(pl_module).__name__}, its hparams, the data module nor the train dataloader"
                f" ({type(loader).__name__}) or its batch sampler has an integer `batch_size`: pass"
                " GradientAccumulation(micro_batch_size=...)"
            )
        return micro

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._micro is None:
            self._set_k(trainer, self._loader_batch_size(trainer, pl_module))
            if trainer.lr_scheduler_configs and max(k for _, k in self.ks) > 1:
                rank_zero_warn(
                    f"GradientAccumulation: the micro batch size {self._micro} comes from the train dataloader, which"
                    " exists only after configure_optimizers: a scheduler built there from"
                    " trainer.estimated_stepping_batches counted 1 micro-batch per step instead of"
                    f" {self.ks[0][1]}. Pass GradientAccumulation(micro_batch_size={self._micro}) to set k at setup."
                )
        # Optimizers, `configure_model` and `sync_batchnorm` are in place from here on.
        if max(k for _, k in self.ks) > 1:
            self._warn_batchnorm(trainer, pl_module)
        if len(self.ks) > 1 and trainer.max_epochs is not None and trainer.max_epochs >= 0:
            estimated = trainer.estimated_stepping_batches  # loads the train dataloader if needed
            batches = trainer.num_training_batches
            if batches != float("inf") and batches > 0:
                planned = _planned_steps(
                    int(batches), trainer.max_epochs, trainer.max_steps, self.ks, self.schedule_unit
                )
                if planned < estimated:
                    self._trainer_max_steps = trainer.max_steps
                    # Lightning 2.6: `Trainer.max_steps` has no setter; the epoch loop holds the limit.
                    trainer.fit_loop.epoch_loop.max_steps = planned

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded:
            self._k = int(loaded["k"])
            self.samples_seen = int(loaded["samples_seen"])
            window = dict(loaded["window"])
            for key in ("first_tokens", "tokens"):
                if isinstance(window.get(key), torch.Tensor):
                    window[key] = window[key].to(pl_module.device)
            self._window = _Window(**window)
        trainer.accumulate_grad_batches = self._k

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        k = trainer.accumulate_grad_batches
        if batch_idx % k == 0:  # Lightning zeroes the gradients here: a window starts
            t = trainer.current_epoch if self.schedule_unit == "epoch" else trainer.global_step
            target = [k for start, k in self.ks if start <= t][-1]
            if target != k and batch_idx % target == 0:
                k = trainer.accumulate_grad_batches = target
            self._k = k
            self._window = _Window()
        size = int(extract_batch_size(batch))
        window = self._window
        if window.first == 0:
            window.first = size
        window.samples += size
        window.micro_batches += 1
        if self.weight_by == "tokens":
            self._loss_factor = self._token_factor(trainer, pl_module, batch, batch_idx, k)
        else:
            self._loss_factor = size / window.first

    def count_tokens(self, batch: Any) -> torch.Tensor:
        """The loss-bearing tokens of a micro-batch (``weight_by="tokens"``): targets that are not ``ignore_index``.

        The targets are ``batch["labels"]`` or ``batch["targets"]`` of a dict, else the last element of a tuple or
        list. Override this in a subclass for another batch layout; return an integer tensor (or an int).
        """
        if isinstance(batch, dict):
            key = next((key for key in ("labels", "targets") if key in batch), None)
            if key is None:
                raise MisconfigurationException(
                    f"GradientAccumulation.count_tokens: a dict batch needs 'labels' or 'targets', got {sorted(batch)};"
                    " override count_tokens for this layout"
                )
            targets = batch[key]
        elif isinstance(batch, (list, tuple)) and batch:
            targets = batch[-1]
        else:
            raise MisconfigurationException(
                f"GradientAccumulation.count_tokens: cannot find the targets in a {type(batch).__name__}; override"
                " count_tokens for this layout"
            )
        return (targets != self.ignore_index).sum()

    def _token_factor(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                      k: int) -> torch.Tensor:  # fmt: skip
        """What this micro-batch's loss (Lightning divided it by ``k``) is multiplied by.

        Until the window's last micro-batch the gradients hold ``sum_i n_i g_i / c`` (``n_i`` tokens of micro-batch
        ``i``, ``g_i`` its mean gradient, ``c`` the window's first count on this process: a local scale that keeps
        them near unit size). Before the last backward, the window's token total over all processes ``N`` is
        all-reduced, the gradients are rescaled by ``c W / N`` and the last loss weighted ``n W / N``: DDP's mean over
        the ``W`` processes then yields ``sum n g / N`` over every token of the window.
        """
        window = self._window
        count = torch.as_tensor(self.count_tokens(batch), device=pl_module.device).to(torch.float64)
        if window.tokens is None:
            window.first_tokens, window.tokens = count.clamp(min=1), torch.zeros_like(count)
        window.tokens = window.tokens + count
        last = (batch_idx + 1) % k == 0 or batch_idx + 1 == trainer.num_training_batches
        if not last:
            return k * count / window.first_tokens
        total = trainer.strategy.reduce(window.tokens.clone(), reduce_op="sum") if trainer.world_size > 1 else window.tokens
        scale = self._replicas / total.clamp(min=1)
        if window.micro_batches > 1:
            correction = window.first_tokens * scale
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(correction.to(p.grad.dtype))
        window.global_tokens = total
        return k * count * scale

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if isinstance(self._loss_factor, torch.Tensor):
            loss.mul_(self._loss_factor.to(loss.dtype))  # per-token windows; see `_token_factor`
        elif self._loss_factor != 1.0:
            # Lightning divided the loss by k; a batch of a different size than the window's first one gets its
            # share of the window mean instead. In place: Lightning backpropagates through this very tensor, and
            # nothing saved its value for the graph (it is the output of the division by k).
            loss.mul_(self._loss_factor)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning 2.6: the loop's own decision whether this batch ends the window (public hooks do not expose it).
        if trainer.fit_loop._should_accumulate():
            return
        window, k = self._window, trainer.accumulate_grad_batches
        params = [p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]]
        if self.partial_window == "drop" and window.micro_batches < k:
            for p in params:
                p.grad = None  # torch optimizers skip parameters without a gradient: no update, state untouched
        elif self.weight_by == "samples":
            correction = k * window.first / window.samples
            if correction != 1.0:
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(correction)
        global_size = window.samples * self._replicas
        self.samples_seen += global_size
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step  # the index of the optimizer step about to run, as LRSchedule logs it
        if every > 0 and (step + 1) % every == 0 and trainer.is_global_zero:
            metrics = {
                "accumulation/global_batch_size": float(global_size),
                "accumulation/samples_seen": float(self.samples_seen),
                "accumulation/micro_batches": float(window.micro_batches),
            }
            if window.global_tokens is not None:  # a host sync, on logging steps only
                metrics["accumulation/global_tokens"] = float(window.global_tokens)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._trainer_k is not None:
            trainer.accumulate_grad_batches = self._trainer_k
            self._trainer_k = None
        if self._trainer_max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self._trainer_max_steps
            self._trainer_max_steps = None

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._k is None:
            return {}
        window = self._window
        return {
            "k": self._k,
            "samples_seen": self.samples_seen,
            "window": {"first": window.first, "samples": window.samples, "micro_batches": window.micro_batches,
                       "first_tokens": window.first_tokens, "tokens": window.tokens},  # fmt: skip
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict) if state_dict else None

    def _warn_batchnorm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `_BatchNorm` is torch's common base of BatchNorm1d/2d/3d, their Lazy variants and SyncBatchNorm.
        norms = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        synced = all(isinstance(m, torch.nn.SyncBatchNorm) for _, m in norms)
        bn_batch = self._micro * (self._replicas if synced else 1)
        k = max(k for _, k in self.ks)
        names = ", ".join(n for n, _ in norms[:3]) + (f" and {len(norms) - 3} more" if len(norms) > 3 else "")
        largest = max([self.global_batch_size, *self.schedule.values()])
        rank_zero_warn(
            f"GradientAccumulation: the model has {len(norms)} BatchNorm layer(s) ({names}). With up to {k}"
            f" micro-batches per optimizer step they normalise over {bn_batch} samples (the"
            f" {'synchronised ' if synced else ''}micro batch), not over the global batch of {largest},"
            " so accumulation does not reproduce large-batch training. Alternatives: SyncBatchNorm"
            " (Trainer(sync_batchnorm=True): BatchNorm batch = micro batch x processes), GroupNorm or LayerNorm"
            " (independent of the batch; `--model.norm group` in the ResNet recipe), or a larger micro batch."
        )


class _Window:
    """Samples and micro-batches of the accumulation window in progress; ``first`` is its first batch's size."""

    def __init__(self, first: int = 0, samples: int = 0, micro_batches: int = 0,
                 first_tokens: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> None:  # fmt: skip
        self.first, self.samples, self.micro_batches = first, samples, micro_batches
        # Per-token windows: the first micro-batch's and the running token count on this process, and the
        # window's total over all processes once its last micro-batch started.
        self.first_tokens, self.tokens = first_tokens, tokens
        self.global_tokens: Optional[torch.Tensor] = None
