"""Under pytest-xdist (the README's test command, ``-n auto``), the cores are shared out: each worker gets
cores // workers torch threads, and the processes its tests start inherit that through OMP_NUM_THREADS.

Two workers with two OpenMP threads each on a 2-core machine wait for each other at every parallel region (steps
5-10x slower); one thread each keeps both cores busy without that.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
