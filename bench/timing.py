"""Timing helpers: the latency timers (one implementation each, in :mod:`methods.report`:
:func:`~methods.report.median_time_us`, medians of many runs, CUDA-synchronised on GPU, wall-clock on CPU;
:func:`~methods.report.interleaved_times_ms`, variants timed in alternation round by round), memory bandwidth and
device naming."""
from __future__ import annotations

import torch

from methods.report import interleaved_times_ms, median_time_us

__all__ = ["median_time_us", "interleaved_times_ms", "copy_bandwidth_gbs", "pick_device", "device_name"]


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
