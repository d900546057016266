"""Helpers shared by the Triton kernels: interpreter detection, tile sizes, launch configs."""
from __future__ import annotations

import os

import torch
import triton

from ..activations import CODES as ACT_CODES  # noqa: F401  (re-exported for the kernels' hosts)


def empty(*shape, device, dtype) -> torch.Tensor:
    """Output/partial buffer allocation (one place, so tests can poison every buffer a kernel must fill)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two ≥ max(n, lo) (tile sizes must be powers of two; GPU dots need ≥ 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (tf32 would cost ~3e-4 relative
    error), native tensor-core precision for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_count(rows: int, tiles: int, device: torch.device, min_rows: int = 256) -> int:
    """Split-K factor for weight-gradient kernels: enough programs to fill the GPU (about 4 per SM), never
    fewer than ``min_rows`` rows per split."""
    want = max(1, (4 * num_sms(device)) // max(tiles, 1))
    return max(1, min(want, triton.cdiv(max(rows, 1), min_rows)))
