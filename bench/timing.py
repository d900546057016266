"""Timing helpers: medians of many runs, CUDA-synchronised on GPU, wall-clock on CPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_us(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5,
                   min_reps: int = 5, max_reps: int = 1000, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in microseconds.

    On CUDA uses ``triton.testing.do_bench`` when available (L2 flushed between runs); otherwise repeats
    ``fn`` until ``budget_s`` is spent (at least ``min_reps`` times) and takes the median of per-call times.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return 1e3 * do_bench(fn, warmup=25, rep=max(int(budget_s * 1e3), 20), return_mode="median")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device-memory copy bandwidth (read + write bytes per second, in GB/s)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    us = median_time_us(lambda: dst.copy_(src), device, budget_s=0.3)
    return 2 * nbytes / (us * 1e-6) / 1e9


def pick_device(name: str | None) -> torch.device:
    """The benchmark device: ``name`` if given (``cuda`` without CUDA raises ``SystemExit`` with a message),
    else CUDA when available, else the CPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
