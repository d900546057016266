"""When ``auto`` takes the compiled C++ kernels over the torch reference on CPU.

The rule comes from side-by-side timings of both backends (``python -m bench.cpu_dispatch --op monarch|blockdiag
--dtype ...`` re-measures it; the tables are in bench/RESULTS.md, 2-core AMD Zen 4). The reference runs each stage
as one MKL/oneDNN batched GEMM plus permutation copies; the C++ kernels fuse the stages (intermediate in cache, no
copies) around their own AVX-512 kernels, and with few tokens stream the weights once in place. Measured:

* float16: the reference's CPU fp16 GEMM is an unvectorised fallback; the C++ kernels (fp32 accumulation) win
  2-60x from 4 tokens on;
* float32 Monarch: with blocks ≤ 64 the C++ kernels win at every token count (1.1-4x); with blocks of 128-768
  they win below 64 tokens (weights streamed in place); from 64 tokens on the reference's batched GEMMs are as
  fast or faster, except with blocks of 128 from 512-1024 tokens (1.0-1.4x). Blocks of 192-768 lose up to 2048
  tokens on a quiet machine (0.56-0.98x, re-measured 2026-11-29; the earlier, loaded-machine table had them
  winning from 1024 tokens: under load MKL's threaded GEMMs suffer more than the row tiles). With 2048-wide
  blocks (2048<->8192 in 4 blocks) they win the forward below 32 tokens and lose from 64 (0.5-0.9x: a block no
  longer fits in L2, and MKL's blocking beats the row tiles);
* float32 block-diagonal (one GEMM, nothing to fuse): only with blocks ≤ 64;
* float64 Monarch: the portable (non-AVX-512) double kernels win with blocks ≤ 64, and with blocks ≤ 128 from
  256 tokens;
* bfloat16: oneDNN's bf16 GEMM beats the C++ kernels' training step at nearly every shape: never.
"""
from __future__ import annotations

import math

import torch

#: fewest tokens for which fp16 calls go to the C++ kernels
FP16_MIN_TOKENS = 4
#: fp32 Monarch products with blocks up to FP32_MAX_BLOCK go to the C++ kernels below FP32_FEW_TOKENS tokens, and
#: with blocks up to FP32_MANY_TOKENS_BLOCK also from FP32_MANY_TOKENS on; larger blocks only below
#: FP32_BIG_BLOCK_TOKENS
FP32_MAX_BLOCK, FP32_FEW_TOKENS, FP32_BIG_BLOCK_TOKENS = 1024, 64, 32
FP32_MANY_TOKENS_BLOCK, FP32_MANY_TOKENS = 128, 1024
#: blocks this small (largest side) go to the C++ kernels in fp32 block-diagonal and fp64 Monarch products
SMALL_BLOCK = 64
#: fp64 Monarch products with blocks up to this size go to the C++ kernels from FP64_MID_TOKENS tokens
FP64_MID_BLOCK, FP64_MID_TOKENS = 128, 256


def prefers_cpu_kernel(op: str, dtype: torch.dtype, dims: tuple) -> bool:
    """``op`` is ``"monarch"`` or ``"blockdiag"``; ``dims = (T, n_in, n_out, block)`` with ``block`` the largest
    block side of the factors. A size given as ``None`` (not consulted: ``torch.compile`` decides once per
    graph, for any batch) counts as unbounded: the rule takes its large-batch branch."""
    tokens, block = (math.inf if d is None else d for d in (dims[0], dims[3]))
    if dtype == torch.float16:
        return tokens >= FP16_MIN_TOKENS
    if dtype == torch.float32:
        if block <= SMALL_BLOCK:
            return True
        if op != "monarch":
            return False
        if block <= FP32_MAX_BLOCK:
            return tokens < FP32_FEW_TOKENS or (block <= FP32_MANY_TOKENS_BLOCK and tokens >= FP32_MANY_TOKENS)
        return tokens < FP32_BIG_BLOCK_TOKENS
    if dtype == torch.float64 and op == "monarch":
        return block <= SMALL_BLOCK or (block <= FP64_MID_BLOCK and tokens >= FP64_MID_TOKENS)
    return False
