"""When ``auto`` takes the compiled C++ kernels over the torch reference on CPU.

The rule comes from side-by-side timings of both backends (``python -m bench.cpu_dispatch`` re-measures it
and prints the table; results in bench/RESULTS.md): the C++ kernels keep the Monarch intermediate in cache
and skip the reference's permutation copies, which wins once there are enough tokens to amortise packing
the weights; for a handful of tokens MKL's batched GEMM on the unpacked weights is as fast or faster.
"""
from __future__ import annotations

import torch

#: fewest tokens for which the C++ kernels are preferred, per op family
MIN_TOKENS = {"monarch": 64, "blockdiag": 64}


def prefers_cpu_kernel(op: str, dtype: torch.dtype, dims: tuple) -> bool:
    """``dims = (T, n_in, n_out, block)``. fp16 always goes to the C++ kernels (the reference's CPU fp16
    GEMM is an unvectorised fallback)."""
    tokens = dims[0]
    if dtype == torch.float16:
        return True
    return tokens >= MIN_TOKENS[op]
