"""A Lightning logger for tests: keeps every ``log_metrics`` call it receives, on whichever rank it runs."""

from __future__ import annotations

from lightning.pytorch.loggers import Logger


class RecordingLogger(Logger):
    """Records ``(step, metrics)`` rows; unlike Lightning's loggers it is not rank-zero-only."""

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
