"""Gradient-norm, clipping and AMP-health monitoring, as a drop-in Lightning callback.

Copy this one file into your project: it needs torch and lightning only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["GradNormMonitor"]

_NONFINITE_POLICIES = ("warn", "raise", "skip")
_MAX_NAMES = 5  # offending parameters named in a non-finite report


def _l2_norms(tensors: list[Tensor]) -> tuple[Tensor, list[int]]:
    """The L2 norm of each tensor as one float32 vector, and the tensor index of each entry.

    One fused ``torch._foreach_norm`` per (mesh, placements, device, dtype) group, as in
    ``torch.nn.utils.get_total_norm``. Sharded DTensors (FSDP2, tensor parallel) give partial norms:
    ``full_tensor()`` reduces them across ranks (one small collective, no host sync), so every rank
    holds the norms of the unsharded tensors.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, tensor in enumerate(tensors):
        if DTensor is not None and isinstance(tensor, DTensor):
            key: tuple[Any, ...] = (id(tensor.device_mesh), tuple(tensor.placements), tensor.device, tensor.dtype)
        else:
            key = (None, None, tensor.device, tensor.dtype)
        groups.setdefault(key, []).append(i)
    device = tensors[0].device
    parts, order = [], []
    for indices in groups.values():
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in indices]))
        if DTensor is not None and isinstance(norms, DTensor):
            norms = norms.full_tensor()
        parts.append(norms.to(device=device, dtype=torch.float32))
        order.extend(indices)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), order


@dataclass
class _Step:
    """What ``on_before_optimizer_step`` measured, kept until the step is done."""

    step: int
    optimizer: torch.optim.Optimizer
    norms: Tensor  # per-parameter pre-clip norms, in `order`
    order: list[int]  # index into `with_grad` of each entry of `norms`
    total: Tensor
    finite: Tensor
    with_grad: list[torch.nn.Parameter]
    params: list[torch.nn.Parameter]
    log: bool
    snapshot: Optional[list[Tensor]] = None
    loss_scale: Optional[float] = None


class GradNormMonitor(Callback):
    """Logs gradient norms before and after clipping, the clipping rate and AMP health, cheaply.

    Every ``log_every_n_steps`` optimizer steps (default: ``Trainer(log_every_n_steps)``) it logs, on the
    same step axis as Lightning's step metrics:

    - ``grad_norm/total``: L2 norm of all gradients before clipping; under ``16-mixed`` on the unscaled
      gradients (Lightning 2.6 unscales before ``on_before_optimizer_step`` and clips after it).
    - ``grad_norm/total_post_clip``: the same after the Trainer's clipping (by norm or by value, or your
      ``configure_gradient_clipping``), measured from an optimizer step post-hook: the public torch point
      that sees the final gradients, because the Trainer has no hook between clipping and ``step()``.
    - ``grad_norm/clip_fraction``: share of the optimizer steps since the last log whose gradients the
      clipping changed (post-clip norm < pre-clip norm).
    - ``grad_norm/nonfinite_steps``: steps since the last log whose gradient norm was inf or NaN.
    - ``grad_norm/layer/<prefix>`` if ``layer_depth`` is set: norm of the gradients of the parameters
      whose name starts with the first ``layer_depth`` module names (``torch.compile``'s ``_orig_mod``
      is left out).
    - ``param/norm`` if ``log_param_norm``; ``param/update_ratio`` if ``log_update_ratio``: norm of the
      update the optimizer applied at the logged step over the parameter norm. It copies the parameters
      on logged steps only.
    - ``amp/loss_scale`` and ``amp/skipped_steps`` (steps since the last log the GradScaler skipped)
      when a GradScaler is in use (``16-mixed``).

    Steps with nothing to log do no host-device sync: counts stay on the device until the next log,
    which reads everything with one transfer. Under DDP every rank computes the same numbers and rank
    zero logs them; with FSDP2 / DTensor gradients the norms are those of the unsharded model.

    Args:
        log_every_n_steps: Log every this many optimizer steps; default: ``Trainer(log_every_n_steps)``.
        layer_depth: Also log per-layer norms grouped by this many leading module names.
        log_param_norm: Log the parameter norm.
        log_update_ratio: Log the update-to-parameter norm ratio.
        on_nonfinite: What to do when the gradient norm is inf or NaN (without a GradScaler, which
            already skips such steps and reports them as ``amp/skipped_steps``). ``"warn"``: at the next
            log, name the offending parameters of the first such step; no extra sync. ``"raise"``: raise
            ``FloatingPointError`` naming them. ``"skip"``: set every gradient of the optimizer to ``None``
            so that the optimizer leaves the parameters and its state untouched, and warn. ``"raise"``
            and ``"skip"`` must read one boolean from the device every step, as the GradScaler does.
    """

    def __init__(
        self,
        *,
        log_every_n_steps: Optional[int] = None,
        layer_depth: Optional[int] = None,
        log_param_norm: bool = True,
        log_update_ratio: bool = False,
        on_nonfinite: str = "warn",
    ) -> None:
        super().__init__()
        for name, value in (("log_every_n_steps", log_every_n_steps), ("layer_depth", layer_depth)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be an integer >= 1 or None, got {value!r}")
        for name, value in (("log_param_norm", log_param_norm), ("log_update_ratio", log_update_ratio)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}")
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(
                f"`on_nonfinite` must be one of {', '.join(map(repr, _NONFINITE_POLICIES))}, got {on_nonfinite!r}"
            )
        self.log_every_n_steps = log_every_n_steps
        self.layer_depth = layer_depth
        self.log_param_norm = log_param_norm
        self.log_update_ratio = log_update_ratio
        self.on_nonfinite = on_nonfinite
        #: The metrics of the latest log, on every rank (rank zero also sends them to the loggers).
        self.last_logged: dict[str, float] = {}
        self._every = 0
        self._trainer: Optional[pl.Trainer] = None
        self._scaler: Optional[Any] = None
        self._measure_post_clip = True
        self._norm_clip_val: Optional[float] = None
        self._hooks: dict[int, Any] = {}
        self._names: dict[int, str] = {}
        self._pending: Optional[_Step] = None
        self._reset_window()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._scaler is not None and self.on_nonfinite != "warn":
            raise MisconfigurationException(
                f"GradNormMonitor(on_nonfinite={self.on_nonfinite!r}) conflicts with the GradScaler of"
                f" Trainer(precision={trainer.precision!r}), which already skips steps with non-finite gradients"
                " (reported as amp/skipped_steps): use on_nonfinite='warn'"
            )
        # Without clipping the post-clip norm is the pre-clip one: save a norm computation per step.
        self._measure_post_clip = bool(trainer.gradient_clip_val) or is_overridden(
            "configure_gradient_clipping", pl_module
        )
        # Lightning's own clipping by norm is torch's clip_grad_norm_ (Precision.clip_grad_by_norm; MixedPrecision
        # only adds a check, Lightning 2.6): whether it clipped follows from the pre-clip norm, so a step that logs
        # nothing needs no second pass over the gradients. Anything else (by value, a custom
        # configure_gradient_clipping, a plugin that clips its own way: FSDP1, DeepSpeed) is measured every step.
        plugin = type(trainer.precision_plugin)
        by_norm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
        self._norm_clip_val = None
        if (
            trainer.gradient_clip_val
            and by_norm == "norm"
            and not is_overridden("configure_gradient_clipping", pl_module)
            and plugin.clip_gradients in (Precision.clip_gradients, MixedPrecision.clip_gradients)
            and plugin.clip_grad_by_norm is Precision.clip_grad_by_norm
        ):
            self._norm_clip_val = float(trainer.gradient_clip_val)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._pending is not None:  # the previous step never reached `optimizer.step()`
            self._finish(stepped=False)
        self._trainer = trainer
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_post_hook(self._after_step)
            # torch's marker (2.x) for optimizers that unscale inside step() (fused Adam/AdamW/SGD):
            # Lightning then skips `scaler.unscale_`, so this hook sees scaled gradients.
            if self._scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
                rank_zero_warn(
                    f"GradNormMonitor: {type(optimizer).__name__} unscales its gradients inside step() (fused), so"
                    " under the GradScaler the logged gradient norms are multiplied by amp/loss_scale"
                )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        norms, order = _l2_norms([p.grad for p in with_grad])
        total = torch.linalg.vector_norm(norms)
        finite = torch.isfinite(total)
        self._nonfinite_steps += ~finite
        step = trainer.global_step
        if self._scaler is None:
            self._handle_nonfinite(pl_module, step, norms, order, with_grad, params, finite)
        log = self._every > 0 and (step + 1) % self._every == 0
        pending = _Step(step, optimizer, norms, order, total, finite, with_grad, params, log)
        if log and self.log_update_ratio:
            pending.snapshot = [p.detach().clone() for p in params]
        if log and self._scaler is not None:
            pending.loss_scale = float(self._scaler.get_scale())  # the scale this step's backward used
        self._pending = pending

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Still pending after the batch: the GradScaler skipped `optimizer.step()` (inf/NaN gradients).
        if self._pending is not None:
            self._finish(stepped=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._names.clear()
        self._pending = None
        self._trainer = None
        self._reset_window()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if pending is not None and pending.optimizer is optimizer:
            self._finish(stepped=True)

    def _reset_window(self) -> None:
        self._window_steps = 0
        self._skipped_steps = 0
        self._clipped_steps: Any = 0  # device tensors after the first step; Python 0 until then
        self._nonfinite_steps: Any = 0
        # Per-parameter norms and step of the window's first non-finite step, with the name mapping.
        self._first_bad: Optional[tuple[Tensor, Tensor, list[int], list[torch.nn.Parameter]]] = None
        self._seen_bad: Optional[Tensor] = None

    def _handle_nonfinite(
        self,
        pl_module: pl.LightningModule,
        step: int,
        norms: Tensor,
        order: list[int],
        with_grad: list[torch.nn.Parameter],
        params: list[torch.nn.Parameter],
        finite: Tensor,
    ) -> None:
        if self.on_nonfinite == "warn":
            # Remember the per-parameter norms of the first bad step of the window on the device;
            # they are read, and the parameters named, only at the next log.
            step_t = torch.full((), step, device=norms.device)
            if self._first_bad is None or self._first_bad[0].shape != norms.shape:
                self._first_bad = (norms, step_t, order, with_grad)
                self._seen_bad = ~finite
            else:
                keep = self._seen_bad | finite
                old_norms, old_step = self._first_bad[:2]
                first_norms, first_step = torch.where(keep, old_norms, norms), torch.where(keep, old_step, step_t)
                self._first_bad = (first_norms, first_step, order, with_grad)
                self._seen_bad = self._seen_bad | ~finite
            return
        if bool(finite):  # host sync, by the documented choice of on_nonfinite='raise' / 'skip'
            return
        bad = self._bad_names(norms, [self._name(pl_module, with_grad[i]) for i in order])
        message = f"non-finite gradient norm at optimizer step {step}; first offending parameters: {bad}"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"GradNormMonitor: {message}")
        for p in params:
            p.grad = None  # torch optimizers skip parameters without a gradient: no update, state untouched
        rank_zero_warn(f"GradNormMonitor: {message}; skipped the optimizer step (on_nonfinite='skip')")

    def _finish(self, stepped: bool) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        self._window_steps += 1
        if not stepped:
            self._skipped_steps += 1
        post = pending.total
        if self._measure_post_clip and not pending.log and self._norm_clip_val is not None:
            # clip_grad_norm_ multiplies the gradients by max_norm / (total + 1e-6) where that is below 1.
            self._clipped_steps += pending.finite & (self._norm_clip_val / (pending.total + 1e-6) < 1)
        elif self._measure_post_clip:
            grads = [p.grad for p in pending.with_grad if p.grad is not None]
            post = torch.linalg.vector_norm(_l2_norms(grads)[0]) if grads else torch.zeros_like(pending.total)
            self._clipped_steps += pending.finite & (post < pending.total)
        if pending.log:
            self._log(pending, post)

    def _log(self, pending: _Step, post: Tensor) -> None:
        trainer = self._trainer
        assert trainer is not None
        pl_module = trainer.lightning_module
        device = pending.total.device
        counts = [self._clipped_steps, self._nonfinite_steps]
        scalars = [pending.total, post] + [torch.as_tensor(c, device=device, dtype=torch.float32) for c in counts]
        if self.log_param_norm or self.log_update_ratio:
            detached = [p.detach() for p in pending.params]
            scalars.append(torch.linalg.vector_norm(_l2_norms(detached)[0]))
            if pending.snapshot is not None:
                torch._foreach_sub_(pending.snapshot, detached)  # snapshot := -(update applied at this step)
                scalars.append(torch.linalg.vector_norm(_l2_norms(pending.snapshot)[0]))
        per_param = [pending.norms] if self.layer_depth is not None else []
        values = torch.cat([torch.stack([s.float() for s in scalars]), *per_param]).tolist()  # the one sync
        total, post_clip, clipped, nonfinite, *rest = values[: len(scalars)]
        metrics = {
            "grad_norm/total": total,
            "grad_norm/total_post_clip": post_clip,
            "grad_norm/clip_fraction": clipped / self._window_steps,
            "grad_norm/nonfinite_steps": nonfinite,
        }
        if self.log_param_norm:
            metrics["param/norm"] = rest[0]
        if pending.snapshot is not None:
            metrics["param/update_ratio"] = rest[1] / rest[0] if rest[0] > 0 else math.nan
        if self.layer_depth is not None:
            squares: dict[str, float] = {}
            for i, norm in zip(pending.order, values[len(scalars) :]):
                prefix = self._prefix(self._name(pl_module, pending.with_grad[i]))
                squares[prefix] = squares.get(prefix, 0.0) + norm * norm
            metrics.update({f"grad_norm/layer/{k}": math.sqrt(v) for k, v in squares.items()})
        if self._scaler is not None:
            metrics["amp/loss_scale"] = pending.loss_scale if pending.loss_scale is not None else math.nan
            metrics["amp/skipped_steps"] = float(self._skipped_steps)
        elif nonfinite > 0 and self._first_bad is not None and self.on_nonfinite == "warn":
            norms, first_step, order, with_grad = self._first_bad
            names = [self._name(pl_module, with_grad[i]) for i in order]
            rank_zero_warn(
                f"GradNormMonitor: {int(nonfinite)} of the last {self._window_steps} optimizer steps had a"
                f" non-finite gradient norm; first at step {int(first_step)}, offending parameters:"
                f" {self._bad_names(norms, names)}"
            )
        self.last_logged = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=pending.step)
        self._reset_window()

    @staticmethod
    def _bad_names(norms: Tensor, names: list[str]) -> str:
        bad = [names[i] for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist()]
        listed = ", ".join(bad[:_MAX_NAMES])
        return listed + (f" and {len(bad) - _MAX_NAMES} more" if len(bad) > _MAX_NAMES else "")

    def _name(self, pl_module: pl.LightningModule, param: torch.nn.Parameter) -> str:
        if id(param) not in self._names:
            self._names.update({id(p): name for name, p in pl_module.named_parameters()})
        return self._names.get(id(param), f"<unnamed {tuple(param.shape)}>")

    def _prefix(self, name: str) -> str:
        parts = [part for part in name.split(".") if part != "_orig_mod"]
        modules = parts[:-1] or parts  # a parameter of the root module is its own group
        return ".".join(modules[: self.layer_depth])
