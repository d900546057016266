"""When ``auto`` takes the compiled C++ kernels over the torch reference on CPU.

The rule comes from side-by-side timings of both backends (``python -m bench.cpu_dispatch --op monarch|blockdiag
--dtype ...`` re-measures it; the tables are in bench/RESULTS.md). The reference runs each stage as one
MKL/oneDNN batched GEMM plus permutation copies; the C++ kernels fuse the stages (intermediate in cache, no
copies) around their own register-blocked micro-kernel (AVX-512 where the host has it). So:

* float16: the reference's CPU fp16 GEMM is an unvectorised fallback, and the C++ kernels (fp32 accumulation)
  win 2-40x from 16 tokens on;
* bfloat16: oneDNN's bf16 GEMM is as fast or faster than the C++ kernels at the measured shapes: never;
* float32/float64 Monarch products: the fusion pays when the blocks are small (the reference's small GEMMs are
  inefficient and its permutation copies dominate) and there are enough tokens to amortise packing the weights:
  blocks ≤ 64 from 64 tokens, blocks ≤ 128 from 1024 tokens; with larger blocks MKL's GEMM matches the fusion;
* float32/float64 block-diagonal products (one GEMM, nothing to fuse): never.
"""
from __future__ import annotations

import torch

#: fewest tokens for which fp16 calls go to the C++ kernels
FP16_MIN_TOKENS = 16
#: fp32/fp64 Monarch calls go to the C++ kernels when block <= max_block and tokens >= min_tokens for a pair here
FP32_BLOCK_TOKENS = ((64, 64), (128, 1024))


def prefers_cpu_kernel(op: str, dtype: torch.dtype, dims: tuple) -> bool:
    """``op`` is ``"monarch"`` or ``"blockdiag"``; ``dims = (T, n_in, n_out, block)`` with ``block`` the largest
    block side of the factors."""
    tokens, block = dims[0], dims[3]
    if dtype == torch.float16:
        return tokens >= FP16_MIN_TOKENS
    if dtype in (torch.float32, torch.float64) and op == "monarch":
        return any(block <= max_block and tokens >= min_tokens for max_block, min_tokens in FP32_BLOCK_TOKENS)
    return False
