"""When ``auto`` takes the compiled C++ kernels over the torch reference on CPU.

The rule comes from side-by-side timings of both backends (``python -m bench.cpu_dispatch --op monarch|blockdiag
--dtype ...`` re-measures it; the tables are in bench/RESULTS.md). The reference runs each stage as one
MKL/oneDNN batched GEMM plus permutation copies; the C++ kernels fuse the stages (intermediate in cache, no
copies) around a portable register-blocked micro-kernel that reaches about 60% of MKL's GEMM rate. So:

* float16: the reference's CPU fp16 GEMM is an unvectorised fallback, and the C++ kernels (fp32 accumulation)
  win 2-40x from 16 tokens on;
* bfloat16: oneDNN's bf16 GEMM is faster than the C++ kernels at every measured shape: never;
* float32/float64 Monarch products: the fusion pays only when the blocks are small (the reference's small
  GEMMs are inefficient and its permutation copies dominate) and the tokens many: block ≤ 64 and T ≥ 256;
* float32/float64 block-diagonal products (one GEMM, nothing to fuse): never.
"""
from __future__ import annotations

import torch

#: fewest tokens for which fp16 calls go to the C++ kernels
FP16_MIN_TOKENS = 16
#: fp32/fp64 Monarch calls go to the C++ kernels with at least this many tokens and blocks no larger than below
FP32_MIN_TOKENS = 256
FP32_MAX_BLOCK = 64


def prefers_cpu_kernel(op: str, dtype: torch.dtype, dims: tuple) -> bool:
    """``op`` is ``"monarch"`` or ``"blockdiag"``; ``dims = (T, n_in, n_out, block)`` with ``block`` the largest
    block side of the factors."""
    tokens, block = dims[0], dims[3]
    if dtype == torch.float16:
        return tokens >= FP16_MIN_TOKENS
    if dtype in (torch.float32, torch.float64) and op == "monarch":
        return tokens >= FP32_MIN_TOKENS and block <= FP32_MAX_BLOCK
    return False
