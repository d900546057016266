"""Timing helpers: the latency timers (one implementation each, in :mod:`methods.report`:
:func:`~methods.report.median_time_us`, medians of many runs, CUDA-synchronised on GPU, wall-clock on CPU;
:func:`~methods.report.interleaved_times_ms`, variants timed in alternation round by round), the GPU's own kernel
time (:func:`device_time_us`), memory bandwidth and device naming."""
from __future__ import annotations

from typing import Callable

import torch

from methods.report import interleaved_times_ms, median_time_us

__all__ = ["median_time_us", "interleaved_times_ms", "device_time_us", "copy_bandwidth_gbs", "pick_device",
           "device_name"]


def device_time_us(fn: Callable[[], object], reps: int = 5) -> float:
    """Kernel time per call of ``fn`` on the GPU (``torch.profiler``, CUDA activity: every kernel's device time
    summed, averaged over ``reps`` calls), without the host's share. On an H200 (2026-11-30) a Triton Monarch
    forward cost ~300 µs of host time per call, so wall-clock timers (:func:`median_time_us`, which waits for
    the host too) measured the host below ~16K tokens; this is what the cost model predicts."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.key_averages():
        dev = getattr(ev, "self_device_time_total", None)
        total += max(dev if dev is not None else ev.self_cuda_time_total, 0.0)
    return total / reps


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
