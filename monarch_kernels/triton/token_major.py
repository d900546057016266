"""Copies between row-major ``(T, n)`` tensors and token-major buffers (:func:`._common.empty_token_major`).

The backward reads the output gradient ``g`` through the Monarch permutation P2ᵀ twice (for ``dy`` and for
``dw2``). Read row-major, a block's columns are runs of ``c`` elements, so both kernels need groups of
interleaved blocks whose fp32 accumulators cap their tiles (4 blocks of 768 × 192 in GPT-2's fc1: 32 × 32
tiles, the weights re-read every 32 tokens). Read token-major, every column is a run of tokens and both take
plain tiles; where the cost model predicts the copy (one read and one write of ``g``) cheaper than the L2
traffic it saves, :func:`.monarch.backward` makes it first (:func:`monarch_kernels.cost_model.g_readers`).

A program moves a ``BLOCK_T × BLOCK_N`` tile: loaded along the features (16-byte vectors of the row-major
source), stored along the tokens (16-byte vectors of the token-major destination); the compiler converts the
register layout between the two through shared memory.

:func:`activation_grad_token_major` is the same copy with an activation's derivative on the way: the first-order
backward of ``act(M x + b)`` computes ``g · act'(pre)`` elementwise anyway (:func:`..activations.backward`), so
where ``g`` is to be copied token-major, that pass writes it token-major and the copy disappears.

Both passes can also sum what they move over the tokens (``with_sum``): a layer's bias gradient ``Σ_t g`` (or
``Σ_t g · act'(pre)``) from per-tile fp32 partials, where it was a pass of its own over ``g``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from . import plan as _plan
from .blockdiag import _activation_grad, _at


@triton.jit
def _column_partials(PART_ROW, v, ok, rn, n_ok):
    """The tile ``v``'s fp32 column sums (lanes outside ``ok`` left out) at ``PART_ROW + rn``, this token tile's
    row of the ``(token tiles, N)`` partials."""
    tl.store(PART_ROW + rn, tl.sum(tl.where(ok, v.to(tl.float32), 0.0), 0), mask=n_ok)


# In both kernels ``SUM`` is a runtime flag (``PART`` always fp32, a placeholder when it is 0): one compile serves
# layers with and without a bias (a few more registers, no spills: the kernel audit). ``T`` is the token count;
# ``T_X``, ``T_Y``, ... the rows each operand is loaded or stored up to (:func:`._common.touch_rows`): a padding
# row moves to a padding row or is masked off, and the column sums take the ``T`` real rows only.


@triton.jit(do_not_specialize=["SUM"])
def _token_major_copy_kernel(X, Y, T, T_X, T_Y, N, sxt, sxf, syt, syf, PART, spt, SUM, BLOCK_T: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (rn < N)[None, :]
    v = tl.load(_at(X, rt, rn, sxt, sxf), mask=(rt < T_X)[:, None] & n_ok)
    tl.store(_at(Y, rt, rn, syt, syf), v, mask=(rt < T_Y)[:, None] & n_ok)
    if SUM:
        _column_partials(PART + tl.program_id(0) * spt, v, (rt < T)[:, None] & n_ok, rn, rn < N)


@triton.jit(do_not_specialize=["SUM"])
def _activation_grad_kernel(PRE, G, Y, T, T_PRE, T_G, T_Y, N, spt, spf, sgt, sgf, syt, syf, PART, sqt, SUM,
                            ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    # g · act'(pre) in fp32 (blockdiag._activation_grad), rounded to Y's dtype
    rt = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = (rn < N)[None, :]
    x = tl.load(_at(PRE, rt, rn, spt, spf), mask=(rt < T_PRE)[:, None] & n_ok).to(tl.float32)
    g = tl.load(_at(G, rt, rn, sgt, sgf), mask=(rt < T_G)[:, None] & n_ok).to(tl.float32)
    d = _activation_grad(x, g, ACT).to(Y.dtype.element_ty)
    tl.store(_at(Y, rt, rn, syt, syf), d, mask=(rt < T_Y)[:, None] & n_ok)
    if SUM:
        _column_partials(PART + tl.program_id(0) * sqt, d, (rt < T)[:, None] & n_ok, rn, rn < N)


def activation_grad_token_major(name: str, pre: torch.Tensor, g: torch.Tensor, with_sum: bool = False):
    """``g · act'(pre)`` (as :func:`..activations.backward`: fp32 arithmetic, ``g``'s dtype) for ``pre``, ``g``
    ``(T, n)`` of any strides, stored token-major: one read of each, one write, no separate copy. With
    ``with_sum``: ``(result, Σ_t result)``, the bias gradient from the same pass (:func:`_summed`)."""
    if name not in ("relu", "gelu", "gelu_tanh"):
        raise ValueError(f"activation_grad_token_major: activation must be relu, gelu or gelu_tanh, got {name!r}")
    if g.dim() != 2 or pre.shape != g.shape:
        raise ValueError(f"activation_grad_token_major: pre and g must be 2-D (T, n) of one shape, got "
                         f"{tuple(pre.shape)} and {tuple(g.shape)}")
    T, n = g.shape
    y = _common.empty_token_major(T, n, device=g.device, dtype=g.dtype)
    part = _partials(y, with_sum)
    if T and n:
        grid, meta = _tiles(T, n)
        rows = _common.touch_rows
        _activation_grad_kernel[grid](pre, g, y, T, rows(pre), rows(g), rows(y), n, *pre.stride(), *g.stride(),
                                      *y.stride(), *_sum_args(part, g.device), ACT=_common.ACT_CODES[name], **meta)
    return _summed(y, part)


@_plan.memo
def _tiles(T: int, n: int) -> tuple:
    """Grid and compile-time arguments of the two kernels above over a ``(T, n)`` tensor (:data:`.plan.COPY_TILE`;
    memoised, like the other launches' plans). The compile-time arguments are shared: unpack, do not modify."""
    tile = _plan.COPY_TILE
    return ((_plan.cdiv(T, tile.block_m), _plan.cdiv(n, tile.block_n)),
            dict(BLOCK_T=tile.block_m, BLOCK_N=tile.block_n, **_common.launch_meta(tile, ())))


def _partials(y: torch.Tensor, wanted: bool):
    """The fp32 ``(token tiles, n)`` buffer of the column sums' per-tile partials for a result ``y (T, n)``, if
    ``wanted``."""
    if not wanted:
        return None
    return _common.empty(_plan.cdiv(y.shape[0], _plan.COPY_TILE.block_m), y.shape[1], device=y.device,
                         dtype=torch.float32)


def _sum_args(part, device) -> tuple:
    """The kernels' last three runtime arguments (``PART``, its row stride, ``SUM``) for the partials ``part``
    (:func:`_partials`), or for none."""
    return (_common.unused_f32(device), 0, 0) if part is None else (part, part.stride(0), 1)


def _summed(y: torch.Tensor, part):
    """``y``, or with ``part`` (:func:`_partials`, filled by the kernel) ``(y, Σ_t y)``: the partials added in fp32
    and rounded to ``y``'s dtype once, as ``y.sum(0)`` rounds. Where ``g`` passes through a copy (or the
    activation's derivative) anyway, its bias gradient rides on that pass: one read of ``T × n`` fewer."""
    return y if part is None else (y, part.sum(0).to(y.dtype))


def to_token_major(x: torch.Tensor, with_sum: bool = False):
    """``x (T, n)`` (any strides) as a token-major tensor with the same values; ``x`` itself when it is
    token-major already. With ``with_sum``: ``(result, Σ_t x)``, the column sums from the copy's own pass."""
    if x.dim() != 2:
        raise ValueError(f"to_token_major: x must be 2-D (T, n), got shape {tuple(x.shape)}")
    if _common.is_token_major(x):
        return (x, x.sum(0)) if with_sum else x
    T, n = x.shape
    y = _common.empty_token_major(T, n, device=x.device, dtype=x.dtype)
    part = _partials(y, with_sum)
    if T and n:
        grid, meta = _tiles(T, n)
        _token_major_copy_kernel[grid](x, y, T, _common.touch_rows(x), _common.touch_rows(y), n, *x.stride(),
                                       *y.stride(), *_sum_args(part, x.device), **meta)
    return _summed(y, part)


def copy_into(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = src`` for 2-D tensors of one shape and dtype, any strides (a token-major result into a
    row-major output): one read, one write, 16-byte vectors on both sides. Returns ``out``."""
    if src.dim() != 2 or src.shape != out.shape or src.dtype != out.dtype:
        raise ValueError(f"copy_into: src and out must be 2-D of one shape and dtype, got {tuple(src.shape)} "
                         f"{src.dtype} and {tuple(out.shape)} {out.dtype}")
    T, n = src.shape
    if T and n:
        grid, meta = _tiles(T, n)
        _token_major_copy_kernel[grid](src, out, T, _common.touch_rows(src), _common.touch_rows(out), n,
                                       *src.stride(), *out.stride(), *_sum_args(None, src.device), **meta)
    return out
