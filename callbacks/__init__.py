"""Drop-in Lightning callbacks, one per file, each depending on torch and lightning only."""

from typing import TYPE_CHECKING, Any

__all__ = ["ExponentialMovingAverage", "GradNormMonitor", "GradientAccumulation", "LRSchedule", "ResumableCheckpoint"]

_MODULES = {
    "ExponentialMovingAverage": "ema",
    "GradNormMonitor": "grad_norm",
    "GradientAccumulation": "accumulation",
    "LRSchedule": "lr_schedule",
    "ResumableCheckpoint": "checkpoint",
}

if TYPE_CHECKING:
    from .accumulation import GradientAccumulation
    from .checkpoint import ResumableCheckpoint
    from .ema import ExponentialMovingAverage
    from .grad_norm import GradNormMonitor
    from .lr_schedule import LRSchedule


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m lightning_recipes.callbacks.lr_schedule` does not find
    # its own module already imported by the package (runpy's RuntimeWarning).
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
