"""Start 2 real CPU processes for a distributed test (gloo on 127.0.0.1): the benchmarks' launcher.

The tests start the processes themselves: Lightning's DDP / ModelParallel launchers would re-run pytest.
Each worker is called as ``worker(rank, port, *args)`` and sets MASTER_ADDR / MASTER_PORT from ``port``.
They fork from one forkserver that imported torch and Lightning once (see benchmarks/report.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from report import run_two_processes  # noqa: E402

__all__ = ["run_two_processes"]
