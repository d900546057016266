"""Copy of a row-major ``(T, n)`` tensor into a token-major buffer (:func:`._common.empty_token_major`).

The backward reads the output gradient ``g`` through the Monarch permutation P2ᵀ twice (for ``dy`` and for
``dw2``). Read row-major, a block's columns are runs of ``c`` elements, so both kernels need groups of
interleaved blocks whose fp32 accumulators cap their tiles (4 blocks of 768 × 192 in GPT-2's fc1: 32 × 32
tiles, the weights re-read every 32 tokens). Read token-major, every column is a run of tokens and both take
plain tiles; where the cost model predicts the copy (one read and one write of ``g``) cheaper than the L2
traffic it saves, :func:`.monarch.backward` makes it first (:func:`monarch_kernels.cost_model.g_readers`).

A program moves a ``BLOCK_T × BLOCK_N`` tile: loaded along the features (16-byte vectors of the row-major
source), stored along the tokens (16-byte vectors of the token-major destination); the compiler converts the
register layout between the two through shared memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from . import plan as _plan


@triton.jit
def _token_major_copy_kernel(X, Y, T, N, sxt, sxf, syt, syf, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rt < T)[:, None] & (rn < N)[None, :]
    v = tl.load(X + rt[:, None] * sxt + rn[None, :] * sxf, mask=ok)
    tl.store(Y + rt[:, None] * syt + rn[None, :] * syf, v, mask=ok)


def to_token_major(x: torch.Tensor) -> torch.Tensor:
    """``x (T, n)`` (any strides) as a token-major tensor with the same values; ``x`` itself when it is
    token-major already."""
    if x.dim() != 2:
        raise ValueError(f"to_token_major: x must be 2-D (T, n), got shape {tuple(x.shape)}")
    if _common.is_token_major(x):
        return x
    T, n = x.shape
    y = _common.empty_token_major(T, n, device=x.device, dtype=x.dtype)
    if T == 0 or n == 0:
        return y
    tile = _plan.COPY_TILE
    _token_major_copy_kernel[(triton.cdiv(T, tile.block_m), triton.cdiv(n, tile.block_n))](
        x, y, T, n, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BLOCK_T=tile.block_m, BLOCK_N=tile.block_n, **_common.launch_meta(tile, ()),
    )
    return y
