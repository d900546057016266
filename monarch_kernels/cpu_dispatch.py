"""When ``auto`` takes the compiled C++ kernels over the torch reference on CPU.

The rule comes from side-by-side timings of both backends (``python -m bench.cpu_dispatch --op monarch|blockdiag
--dtype ...`` re-measures it; the tables are in bench/RESULTS.md, 2-core AMD Zen 4). The reference runs each stage
as one MKL/oneDNN batched GEMM plus permutation copies; the C++ kernels fuse the stages (intermediate in cache, no
copies) around their own AVX-512 kernels, and with few tokens stream the weights once in place. Measured:

* float16: the reference's CPU fp16 GEMM is an unvectorised fallback; the C++ kernels (fp32 accumulation) win
  2-60x from 4 tokens on;
* float32 Monarch: the C++ kernels win or tie at every measured shape and token count with blocks up to 768
  (1.1-3x typical; 0.7-0.9x only for blocks of 768 at 64-256 tokens, within this machine's noise of parity);
  with 2048-wide blocks (2048<->8192 in 4 blocks) they win the forward below 32 tokens and lose from 64
  (0.5-0.95x: a block no longer fits in L2, and MKL's blocking beats the row tiles);
* float32 block-diagonal (one GEMM, nothing to fuse): only with blocks ≤ 64;
* float64 Monarch: the portable (non-AVX-512) double kernels win with blocks ≤ 64, and with blocks ≤ 128 from
  256 tokens;
* bfloat16: oneDNN's bf16 GEMM beats the C++ kernels' training step at nearly every shape: never.
"""
from __future__ import annotations

import torch

#: fewest tokens for which fp16 calls go to the C++ kernels
FP16_MIN_TOKENS = 4
#: fp32 Monarch products go to the C++ kernels with blocks up to this size, or with fewer than FP32_BIG_BLOCK_TOKENS
FP32_MAX_BLOCK, FP32_BIG_BLOCK_TOKENS = 1024, 32
#: blocks this small (largest side) go to the C++ kernels in fp32 block-diagonal and fp64 Monarch products
SMALL_BLOCK = 64
#: fp64 Monarch products with blocks up to this size go to the C++ kernels from FP64_MID_TOKENS tokens
FP64_MID_BLOCK, FP64_MID_TOKENS = 128, 256


def prefers_cpu_kernel(op: str, dtype: torch.dtype, dims: tuple) -> bool:
    """``op`` is ``"monarch"`` or ``"blockdiag"``; ``dims = (T, n_in, n_out, block)`` with ``block`` the largest
    block side of the factors."""
    tokens, block = dims[0], dims[3]
    if dtype == torch.float16:
        return tokens >= FP16_MIN_TOKENS
    if dtype == torch.float32:
        if op == "monarch":
            return block <= FP32_MAX_BLOCK or tokens < FP32_BIG_BLOCK_TOKENS
        return block <= SMALL_BLOCK
    if dtype == torch.float64 and op == "monarch":
        return block <= SMALL_BLOCK or (block <= FP64_MID_BLOCK and tokens >= FP64_MID_TOKENS)
    return False
