"""The one timing helper of the benchmarks (``tools/bench*.py``, ``tools/gpu_check.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, sync: bool = False) -> float:
    """Best wall time in seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs; ``sync``: CUDA synchronised
    before and after each timed run (kernels are asynchronous)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best
