"""Start 2 real CPU processes for a distributed test (gloo on 127.0.0.1).

The tests start the processes themselves: Lightning's DDP / ModelParallel launchers would re-run pytest.
Each worker is called as ``worker(rank, port, *args)`` and sets MASTER_ADDR / MASTER_PORT from ``port``.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def run_two_processes(worker: Callable[..., None], *args: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(worker, args=(port, *args), nprocs=2, join=True, start_method="spawn")
