"""torchvision's exponential moving average of the weights, evaluated beside the raw weights, as a Lightning callback.

Copy this one file into your project: it needs torch and lightning only (and torchmetrics, which lightning installs).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = FSDPModule = distribute_tensor = None  # type: ignore[assignment,misc]

__all__ = ["ExponentialMovingAverage", "adjusted_decay"]

#: Appended to the name of every metric the EMA weights log: ``val/acc`` -> ``val/acc_ema``.
SUFFIX = "_ema"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_decay(decay: Any) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"`decay` must be a number in [0, 1) (torchvision's --model-ema-decay), got {decay!r}")


def adjusted_decay(
    decay: float, *, world_size: int, batch_size: int, update_every_n_steps: int, epochs: int
) -> float:
    """The per-update decay of torchvision's classification references (``train.py --model-ema``).

    ``alpha = min(1, (1 - decay) * world_size * batch_size * update_every_n_steps / epochs)``, returned as
    ``1 - alpha``, in torchvision's order of float operations. ``batch_size``: the samples one process feeds one
    optimizer step.
    """
    _check_decay(decay)
    for name, value in (
        ("world_size", world_size),
        ("batch_size", batch_size),
        ("update_every_n_steps", update_every_n_steps),
        ("epochs", epochs),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    adjust = world_size * batch_size * update_every_n_steps / epochs
    alpha = 1.0 - decay
    alpha = min(1.0, alpha * adjust)
    return 1.0 - alpha


def _data_parallel_size(trainer: pl.Trainer) -> int:
    """Processes that each train on their own batch (the sampler's replicas; 1 for a single-process strategy)."""
    return int((getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("num_replicas", 1))


def _local(tensor: Tensor) -> Tensor:
    """This process's part of a parameter or buffer: the local shard of a DTensor (FSDP2, tensor parallel)."""
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


class ExponentialMovingAverage(Callback):
    """Keeps torchvision's EMA of the weights and evaluates both the raw and the averaged weights at every validation.

    Follows ``references/classification/train.py`` of torchvision (``--model-ema``), whose ``ExponentialMovingAverage``
    is an ``AveragedModel`` with ``use_buffers=True``:

    - **update** after the optimizer step of every ``update_every_n_steps``-th iteration of each epoch, counting from
      the first (torchvision's ``i % model_ema_steps == 0``, ``i`` restarting at 0 every epoch). An iteration is a
      training batch on which an optimizer step happened: with ``accumulate_grad_batches=k`` every k-th batch. Each
      parameter and buffer (BatchNorm statistics included) becomes ``decay * average + (1 - decay) * weight``, the
      exact float operations of torchvision's ``ema_avg``; the first update after a (re)start copies the weights.
    - **decay adjusted to the run** (``adjust_to_run``): ``1 - min(1, (1 - decay) * processes * batch *
      update_every_n_steps / max_epochs)`` (:func:`adjusted_decay`) with ``processes`` the data-parallel size and
      ``batch`` the train loader's ``batch_size`` times ``accumulate_grad_batches`` at the start of training, so the
      average forgets at the same pace per sample on any number of devices. torchvision's ResNet-50 V2 recipe
      (decay 0.99998, 32 steps, 8 x 128, 600 epochs) gives ``1 - 2e-5 * 54.61 = 0.998908``.
    - **restart during the LR warmup**: after an update that follows optimizer step ``s`` (0-based) with
      ``s < reset_until_step``, the average restarts (torchvision's ``n_averaged.fill_(0)`` while ``epoch <
      lr_warmup_epochs``), so averaging starts from the weights at the end of warmup.
    - **both evaluated** (``evaluate_both``): after each validation (and test) batch the EMA weights are copied in,
      the module's ``validation_step`` (``test_step``) runs again on the same batch with every ``self.log`` /
      ``self.log_dict`` name suffixed ``_ema``, and the raw weights are copied back. Lightning then reduces, syncs
      and logs ``val/acc_ema``, ``val/loss_ema``, ... exactly as it does ``val/acc``, ``val/loss`` (torchvision's
      ``evaluate(model_ema, ..., log_suffix="EMA")``), on the same batches. torchmetrics objects that are submodules
      of the LightningModule (``Metric``, ``MetricCollection``) are replaced by fresh copies during the second pass,
      so the raw metrics see the raw predictions only; the RNG state is restored after it, so the raw run (metrics,
      weights) is the same as without the callback. The module keeps the raw weights: training goes on from them.

    The average is stored in this callback's checkpoint state (``checkpoint["callbacks"]["ExponentialMovingAverage"]``):
    ``"average"`` maps every parameter and buffer name to its full (unsharded) tensor, with ``"n_averaged"`` and the
    position in the epoch, so a resumed run continues the same average. To use the EMA weights elsewhere::

        average = torch.load(path, weights_only=True)["callbacks"]["ExponentialMovingAverage"]["average"]
        model.load_state_dict({k: v for k, v in average.items() if k in model.state_dict()})

    ``trainer.validate`` / ``trainer.test`` with ``ckpt_path=`` and this callback log both sets of metrics too.

    Works under a single device, DDP (every process keeps the average of its own weights; parameters are identical
    across processes, BatchNorm statistics are each process's own, as in torchvision; a checkpoint holds rank zero's)
    and FSDP2 via ``ModelParallelStrategy`` and ``fully_shard`` (the average is sharded like the parameters and
    gathered only to save). ``FSDPStrategy`` (FSDP1) and DeepSpeed are refused in ``setup``.

    Evaluating both doubles the validation forward passes, not the data loading; it holds one extra copy of the
    weights during validation. The second pass repeats all of ``validation_step``: side effects other than logging
    (appending outputs to a list, for instance) happen twice. A ``validation_step(self, dataloader_iter)`` cannot be
    repeated and is refused with ``evaluate_both=True``.

    Args:
        decay: torchvision's ``--model-ema-decay``: the decay per update before the adjustment.
        update_every_n_steps: torchvision's ``--model-ema-steps``: iterations between updates within an epoch.
        adjust_to_run: Adjust ``decay`` to the data-parallel size, batch size and ``Trainer(max_epochs)`` as
            torchvision does. ``False``: ``decay`` is used per update as given.
        reset_until_step: Restart the average at every update before this optimizer step (0: never). Default: the
            warmup length of an LR-warmup callback on the Trainer that exposes ``resolved_warmup_steps`` (this
            repository's ``LRSchedule``), else 0.
        evaluate_both: Evaluate the EMA weights too at every validation and test batch and log their metrics with
            the ``_ema`` suffix. ``False``: only the average is kept and saved.
    """

    def __init__(
        self,
        *,
        decay: float = 0.99998,
        update_every_n_steps: int = 32,
        adjust_to_run: bool = True,
        reset_until_step: Optional[int] = None,
        evaluate_both: bool = True,
    ) -> None:
        super().__init__()
        _check_decay(decay)
        if not _is_int(update_every_n_steps) or update_every_n_steps < 1:
            raise ValueError(
                f"`update_every_n_steps` must be an integer >= 1 (torchvision's --model-ema-steps), got"
                f" {update_every_n_steps!r}"
            )
        if reset_until_step is not None and (not _is_int(reset_until_step) or reset_until_step < 0):
            raise ValueError(
                f"`reset_until_step` must be an integer >= 0 (0: never restart) or None (follow the LR warmup),"
                f" got {reset_until_step!r}"
            )
        for name, value in (("adjust_to_run", adjust_to_run), ("evaluate_both", evaluate_both)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}")
        self.decay = float(decay)
        self.update_every_n_steps = update_every_n_steps
        self.adjust_to_run = adjust_to_run
        self.reset_until_step = reset_until_step
        self.evaluate_both = evaluate_both
        #: The decay applied per update (after the adjustment), known once training starts.
        self.resolved_decay: Optional[float] = None if adjust_to_run else self.decay
        #: The restart boundary in use, known after the first update.
        self.resolved_reset_until_step: Optional[int] = reset_until_step
        #: Updates averaged since the last (re)start; 0: the next update copies the weights.
        self.n_averaged = 0
        self._names: Optional[list[str]] = None
        self._average: Optional[list[Tensor]] = None  # this process's part of each parameter and buffer
        self._specs: list[Optional[tuple[Any, ...]]] = []  # DTensor (mesh, placements, shape, stride), else None
        self._fsdp_modules: list[nn.Module] = []
        self._loaded: Optional[dict[str, Any]] = None
        self._loaded_decay: Optional[float] = None
        self._epoch = -1  # the epoch whose iterations `_epoch_iteration` counts
        self._epoch_iteration = 0
        self._seen_step: Optional[int] = None
        self._eval: Optional[_SecondPass] = None
        self._warned_nothing = False

    # ----------------------------------------------------------------------------------------------------- checks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise MisconfigurationException(
                f"ExponentialMovingAverage does not support Trainer(strategy={type(trainer.strategy).__name__}): its"
                " flattened, sharded parameters cannot be averaged, swapped in or saved per parameter. Use"
                " ModelParallelStrategy with torch's fully_shard (FSDP2), DDP or a single device, or remove the"
                " callback"
            )
        if stage == "fit" and self.adjust_to_run and (trainer.max_epochs is None or trainer.max_epochs < 1):
            raise MisconfigurationException(
                f"ExponentialMovingAverage(adjust_to_run=True) scales the decay by the number of epochs, but"
                f" Trainer(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}) sets none: set"
                " Trainer(max_epochs=...), or pass ExponentialMovingAverage(adjust_to_run=False, decay=...) with the"
                " decay to apply per update"
            )
        if self.evaluate_both:
            for step in ("validation_step", "test_step"):
                if is_param_in_hook_signature(getattr(pl_module, step), "dataloader_iter", explicit=True):
                    raise MisconfigurationException(
                        f"ExponentialMovingAverage(evaluate_both=True) runs {type(pl_module).__name__}.{step} a second"
                        f" time on each batch, which `{step}(self, dataloader_iter)` does not allow: take"
                        " (batch, batch_idx), or pass ExponentialMovingAverage(evaluate_both=False)"
                    )

    # --------------------------------------------------------------------------------------------------- training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self.resolved_reset_until_step = self.reset_until_step  # resolved at the first update, after LRSchedule's start
        if self.adjust_to_run:
            batch = getattr(trainer.train_dataloader, "batch_size", None)
            if not _is_int(batch) or batch < 1:
                raise MisconfigurationException(
                    "ExponentialMovingAverage(adjust_to_run=True) scales the decay by the batch size, but the train"
                    f" dataloader has no integer `batch_size` (got {batch!r}): pass"
                    " ExponentialMovingAverage(adjust_to_run=False, decay=...) with the decay to apply per update"
                )
            world, k = _data_parallel_size(trainer), trainer.accumulate_grad_batches
            assert trainer.max_epochs is not None  # checked in setup
            self.resolved_decay = adjusted_decay(
                self.decay,
                world_size=world,
                batch_size=batch * k,
                update_every_n_steps=self.update_every_n_steps,
                epochs=trainer.max_epochs,
            )
            adjust = world * batch * k * self.update_every_n_steps / trainer.max_epochs
            how = (
                f" = 1 - min(1, (1 - {self.decay}) x {adjust:.6g})"
                f" ({world} processes x batch {batch} x accumulate_grad_batches {k} x {self.update_every_n_steps}"
                f" steps / {trainer.max_epochs} epochs)"
            )
        else:
            how = " (adjust_to_run=False)"
        decay = self.resolved_decay
        assert decay is not None
        rank_zero_info(
            f"ExponentialMovingAverage: decay {decay:.8g} per update{how}, an update every"
            f" {self.update_every_n_steps} optimizer steps of each epoch"
        )
        loaded, self._loaded_decay = self._loaded_decay, None
        if loaded is not None and loaded != decay:
            rank_zero_warn(
                f"ExponentialMovingAverage resumed with decay {decay!r}, but the checkpoint was written with decay"
                f" {loaded!r} (another number of processes, batch size or epochs): the average changes pace from here"
            )
        coarse = sorted(
            str(dtype)
            for dtype in {p.dtype for p in pl_module.parameters() if p.is_floating_point()}
            if torch.finfo(dtype).eps > 1 - decay
        )
        if coarse and decay > 0:
            rank_zero_warn(
                f"ExponentialMovingAverage: the weights are {', '.join(coarse)}, whose resolution is coarser than the"
                f" update 1 - decay = {1 - decay:.3g}: most of each update rounds away. Keep float32 weights"
                " (precision='bf16-mixed' rather than 'bf16-true')"
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._seen_step:
            return  # no optimizer step on this batch (gradient accumulation)
        self._seen_step = trainer.global_step
        if trainer.current_epoch != self._epoch:
            self._epoch, self._epoch_iteration = trainer.current_epoch, 0
        iteration = self._epoch_iteration
        self._epoch_iteration += 1
        if iteration % self.update_every_n_steps != 0:
            return
        self._ensure_average(trainer, pl_module)
        self._update(pl_module)
        if trainer.global_step <= self._reset_until_step(trainer):  # the step just taken, global_step - 1, is < it
            self.n_averaged = 0

    def _reset_until_step(self, trainer: pl.Trainer) -> int:
        if self.resolved_reset_until_step is None:
            source = next((cb for cb in trainer.callbacks if hasattr(cb, "resolved_warmup_steps")), None)
            steps = int(getattr(source, "resolved_warmup_steps", None) or 0)
            self.resolved_reset_until_step = steps
            if steps:
                rank_zero_info(
                    f"ExponentialMovingAverage: the average restarts at every update until optimizer step {steps},"
                    f" the LR warmup of {type(source).__name__}"
                )
        return self.resolved_reset_until_step

    def _update(self, pl_module: pl.LightningModule) -> None:
        assert self._average is not None and self.resolved_decay is not None
        live = self._live(pl_module)
        decay = self.resolved_decay
        with torch.no_grad():
            if self.n_averaged == 0:
                torch._foreach_copy_(self._average, live)
            else:
                for average, weight in zip(self._average, live):
                    # torchvision's ema_avg, operation for operation, so the result is bit-identical to torchvision's.
                    average.copy_(decay * average + (1 - decay) * weight)
        self.n_averaged += 1

    # ------------------------------------------------------------------------------------------------ the average
    def _ensure_average(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Creates the average on first use: from the checkpoint if one was loaded, else as a copy of the weights
        (``AveragedModel``'s starting point) when fitting. ``False`` when there is nothing to evaluate."""
        if self._average is not None:
            return True
        if self._loaded is None and trainer.state.fn != TrainerFn.FITTING:
            return False
        self._reshard(pl_module, find=True)
        names, tensors, specs = self._named_local(pl_module)
        # Lazily created, possibly inside the evaluation loop's inference mode: a normal tensor can be updated later.
        with torch.inference_mode(False), torch.no_grad():
            if self._loaded is None:
                average = [t.detach().clone() for t in tensors]
            else:
                average = self._from_checkpoint(self._loaded["average"], names, tensors, specs)
        self._names, self._average, self._specs = names, average, specs
        self._loaded = None
        return True

    def _from_checkpoint(
        self, saved: dict[str, Tensor], names: list[str], tensors: list[Tensor], specs: list[Optional[tuple]]
    ) -> list[Tensor]:
        known = set(names)
        missing, unexpected = [n for n in names if n not in saved], [n for n in saved if n not in known]
        if missing or unexpected:
            raise RuntimeError(
                "The ExponentialMovingAverage state in the checkpoint does not fit this model:"
                f" missing {missing[:5]}, unexpected {unexpected[:5]}. Remove the callback's entry from the"
                " checkpoint's 'callbacks' to start a new average"
            )
        average = []
        for name, tensor, spec in zip(names, tensors, specs):
            full = saved[name].to(device=tensor.device, dtype=tensor.dtype)
            if spec is not None:  # every process holds the full tensor: each keeps its shard, no communication
                full = distribute_tensor(full, spec[0], spec[1], src_data_rank=None).to_local()
            if full.shape != tensor.shape:
                raise RuntimeError(
                    f"The ExponentialMovingAverage state of {name!r} in the checkpoint has shape {tuple(full.shape)},"
                    f" the model's is {tuple(tensor.shape)}"
                )
            average.append(torch.empty_like(tensor).copy_(full))
        return average

    def _named_local(self, pl_module: pl.LightningModule) -> tuple[list[str], list[Tensor], list[Optional[tuple]]]:
        names, tensors, specs = [], [], []
        for name, tensor in chain(pl_module.named_parameters(), pl_module.named_buffers()):
            is_dtensor = DTensor is not None and isinstance(tensor, DTensor)
            spec = (tensor.device_mesh, tuple(tensor.placements), tensor.shape, tensor.stride()) if is_dtensor else None
            specs.append(spec)
            names.append(name)
            tensors.append(_local(tensor).detach())
        return names, tensors, specs

    def _live(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """This process's part of every parameter and buffer, in the order of the average."""
        names, tensors, _ = self._named_local(pl_module)
        if names != self._names:
            raise RuntimeError(
                "ExponentialMovingAverage: the module's parameters and buffers changed since the average was created"
                f" ({len(self._names or [])} then, {len(names)} now): the average cannot follow them"
            )
        return tensors

    def _reshard(self, pl_module: pl.LightningModule, find: bool = False) -> None:
        """Under FSDP2 the root module keeps its parameters gathered after a forward without backward
        (``fully_shard``'s root heuristic): shard them again so that the module holds its sharded parameters."""
        if find:
            fsdp = () if FSDPModule is None else (FSDPModule,)
            self._fsdp_modules = [m for m in pl_module.modules() if isinstance(m, fsdp)]
        for module in self._fsdp_modules:
            module.reshard()

    # ------------------------------------------------------------------------------------------------- evaluation
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_second_pass(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_second_pass(trainer, pl_module)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: Optional[int] = None,  # passed by Lightning only when there are several loaders
    ) -> None:
        self._evaluate_average(trainer, pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: Optional[int] = None,
    ) -> None:
        self._evaluate_average(trainer, pl_module, batch, batch_idx, dataloader_idx)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval = None  # frees the copies of the metrics and the raw weights

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval = None

    def _start_second_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval = None
        if not self.evaluate_both:
            return
        if not self._ensure_average(trainer, pl_module):
            if not self._warned_nothing:
                self._warned_nothing = True
                rank_zero_warn(
                    "ExponentialMovingAverage has no average to evaluate outside fit without a checkpoint: pass"
                    " ckpt_path= to trainer.validate / trainer.test to evaluate its EMA weights too"
                )
            return
        self._eval = _SecondPass(pl_module, "test_step" if trainer.testing else "validation_step")

    def _evaluate_average(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: Optional[int],
    ) -> None:
        second = self._eval
        if second is None:
            return
        assert self._average is not None
        args: list[Any] = [batch]
        if second.takes_batch_idx:
            args.append(batch_idx)
        if dataloader_idx is not None:
            args.append(dataloader_idx)
        self._reshard(pl_module)
        live = self._live(pl_module)
        if second.raw is None:
            second.raw = [torch.empty_like(t) for t in live]
        torch._foreach_copy_(second.raw, live)
        torch._foreach_copy_(live, self._average)
        try:
            with second.suffixed(pl_module), _forked_rng(pl_module.device):
                # Through the strategy: its precision context and the DDP wrapper's forward, as Lightning runs it.
                getattr(trainer.strategy, second.step_name)(*args)
        finally:
            self._reshard(pl_module)
            torch._foreach_copy_(self._live(pl_module), second.raw)

    # ------------------------------------------------------------------------------------------------- checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        if self._average is None:
            return dict(self._loaded) if self._loaded is not None else {}
        assert self._names is not None
        average = {}
        with torch.no_grad():
            for name, tensor, spec in zip(self._names, self._average, self._specs):
                if spec is not None:  # a collective: every process calls state_dict() when a checkpoint is saved
                    mesh, placements, shape, stride = spec
                    tensor = DTensor.from_local(
                        tensor, mesh, placements, shape=shape, stride=stride, run_check=False
                    ).full_tensor()
                # A copy: the average goes on changing while an asynchronous checkpoint is written.
                average[name] = tensor.detach().to("cpu", copy=True)
        return {
            "average": average,
            "n_averaged": self.n_averaged,
            "epoch": self._epoch,
            "epoch_iteration": self._epoch_iteration,
            "decay": self.resolved_decay,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._loaded = dict(state_dict)
        self._average = None  # rebuilt from the checkpoint on first use, once the model is on its device
        self.n_averaged = int(state_dict["n_averaged"])
        self._epoch = int(state_dict["epoch"])
        self._epoch_iteration = int(state_dict["epoch_iteration"])
        self._loaded_decay = state_dict.get("decay")


class _SecondPass:
    """What one evaluation run needs to repeat the step on the EMA weights: fresh copies of the module's torchmetrics
    objects, the wrapped ``log`` and a buffer for the raw weights."""

    def __init__(self, pl_module: pl.LightningModule, step_name: str) -> None:
        self.step_name = step_name
        # As Lightning calls the step: without `batch_idx` if its signature has none.
        self.takes_batch_idx = is_param_in_hook_signature(getattr(pl_module, step_name), "batch_idx", min_args=2)
        self.raw: Optional[list[Tensor]] = None
        self.swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        self.attribute: dict[int, str] = {}  # id of a copied Metric -> its path in the module, for `metric_attribute`
        copies: dict[int, nn.Module] = {}
        tops: list[str] = []
        for name, module in pl_module.named_modules(remove_duplicate=False):
            if not isinstance(module, (Metric, MetricCollection)) or any(name.startswith(t + ".") for t in tops):
                continue
            tops.append(name)
            if id(module) not in copies:
                clone = copy.deepcopy(module)
                clone.reset()
                copies[id(module)] = clone
                for sub_name, sub in clone.named_modules(prefix=name):
                    if isinstance(sub, Metric):
                        self.attribute[id(sub)] = sub_name + SUFFIX
            parent, _, key = name.rpartition(".")
            self.swaps.append((pl_module.get_submodule(parent), key, module, copies[id(module)]))
        self.signature = inspect.signature(pl_module.log)

    @contextlib.contextmanager
    def suffixed(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Inside: the module's metrics are the copies and ``self.log(name, ...)`` logs ``name + "_ema"``."""
        original: Callable[..., Any] = pl_module.log
        own = "log" in vars(pl_module)

        def log(*args: Any, **kwargs: Any) -> None:
            bound = self.signature.bind(*args, **kwargs)
            bound.arguments["name"] = f"{bound.arguments['name']}{SUFFIX}"
            value = bound.arguments["value"]
            if isinstance(value, Metric):
                if id(value) not in self.attribute:
                    raise MisconfigurationException(
                        f"ExponentialMovingAverage(evaluate_both=True) cannot evaluate the {type(value).__name__}"
                        f" logged as {bound.arguments['name'][: -len(SUFFIX)]!r} on the EMA weights: it is not a"
                        " submodule of the LightningModule, so its state would mix raw and EMA predictions. Assign it"
                        " to an attribute of the module, or pass ExponentialMovingAverage(evaluate_both=False)"
                    )
                bound.arguments["metric_attribute"] = self.attribute[id(value)]
            original(*bound.args, **bound.kwargs)

        for parent, key, _, clone in self.swaps:
            setattr(parent, key, clone)
        pl_module.log = log  # type: ignore[method-assign]
        try:
            yield
        finally:
            if own:
                pl_module.log = original  # type: ignore[method-assign]
            else:
                del pl_module.log
            for parent, key, module, _ in self.swaps:
                setattr(parent, key, module)


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Restores the CPU (and this CUDA device's) RNG afterwards: the second pass leaves the raw run as it was."""
    if device.type == "cuda":
        return torch.random.fork_rng(devices=[device.index or 0], device_type="cuda")
    return torch.random.fork_rng(devices=[])

