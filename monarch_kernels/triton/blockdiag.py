"""Triton block-diagonal kernels with the Monarch permutations folded into coalesced loads and stores.

Forward (:func:`bd_forward`), logical shapes ``x (T, k·p)``, ``w (k, q, p)``, ``y (T, k·q)``::

    y[t, kk·q + qq] = act( Σ_pp w[kk, qq, pp] · x[t, kk·p + pp] + bias[phys] )

Weight gradient (:func:`bd_weight_grad`): ``dw[kk, qq, pp] = Σ_t g[t, kk·q + qq] · x[t, kk·p + pp]``, split over
``T`` into fp32 partials that the host sums (deterministic, no atomics).

Where the logical columns physically live is a *mode* per operand (``plan.py`` explains the layout rule):

* ``NATURAL``: block ``kk``'s column ``j`` at ``kk·width + j``;
* ``GROUPED``: a Monarch view-transpose aligned with the blocks. Output: dot column ``n`` of block ``kk`` is
  block row ``(n mod C)·A + n div C`` and lands at ``(n div C)·B + kk·C + n mod C`` — ``A`` runs of ``C``
  columns per block. Input (``C = 1``): block ``kk``'s contraction index ``j`` comes from ``j·B + kk``. A
  program covers ``GROUP`` consecutive blocks and moves each run of ``GROUP·C`` columns as one vector:
  results of the blocks are interleaved with ``tl.join`` (a gathered input tile is taken apart with
  ``tl.split``) before one store (load), so every permuted access is ``≥ 16`` contiguous bytes;
* ``SCATTERED``: any view-transpose ``f ↦ (f mod A)·B + f div A`` element by element (blocks not aligned
  with the transpose; correct, not coalesced; never chosen for ``MonarchLinear`` layouts).

Physical widths ``N_IN``/``N_OUT`` mask ragged sizes: a load past ``N_IN`` reads 0 (implicit zero padding), a
store past ``N_OUT`` is dropped (truncation). Padded tile lanes multiply zeros by zeros, never a real input by a
padded zero weight that is consumed afterwards, so ±inf inputs give exactly the reference's inf/NaN pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from . import plan as _plan
from ._common import ACT_CODES, interpreting, precision

@triton.jit
def _activation(v, ACT: tl.constexpr):
    """Epilogue activation in fp32; NaN propagates exactly as in ``torch.relu`` / ``F.gelu``."""
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)  # not tl.maximum: its max.f32 maps NaN to 0
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh via exp(-2|u|) ≤ 1: no overflow
        th = (1.0 - e) / (1.0 + e)
        v = 0.5 * v * (1.0 + tl.where(inner >= 0, th, -th))
    return v


@triton.jit
def _activation_grad(x, g, ACT: tl.constexpr):
    """``g · act'(x)`` in fp32, the formulas of aten's ``threshold_backward`` / ``gelu_backward`` (a NaN ``x``
    passes ``g`` through relu's, as there); ``g`` itself without an activation."""
    if ACT == 1:  # relu: 0 where x <= 0, g elsewhere
        g = tl.where(x <= 0.0, 0.0, g)
    elif ACT == 2:  # gelu (erf): cdf + x · pdf
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        g = g * (cdf + x * pdf)
    elif ACT == 3:  # gelu_tanh: 0.5 (1 + tanh u) + 0.5 x (1 - tanh² u) u', u = √(2/π) (x + 0.044715 x³)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh via exp(-2|u|) ≤ 1: no overflow
        th = tl.where(inner >= 0, (1.0 - e) / (1.0 + e), -(1.0 - e) / (1.0 + e))
        right = 0.5 * x * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        g = g * (0.5 * (1.0 + th) + right)
    return g


@triton.jit
def _in_cols(kk, j, WIDTH, A, B, MODE: tl.constexpr):
    """Physical columns of block ``kk``'s logical input columns ``j`` (see the module docstring)."""
    if MODE == 1:
        return j * B + kk
    elif MODE == 2:
        f = kk * WIDTH + j
        return (f % A) * B + f // A
    else:
        return kk * WIDTH + j


@triton.jit
def _block_rows(n, A, MODE: tl.constexpr, C: tl.constexpr):
    """Weight row (block output index) that dot column ``n`` computes."""
    if MODE == 1:
        return (n % C) * A + n // C
    return n


@triton.jit
def _out_cols(kk, n, WIDTH, A, B, MODE: tl.constexpr, C: tl.constexpr):
    """Physical output columns of dot columns ``n`` of block ``kk``."""
    if MODE == 1:
        return (n // C) * B + kk * C + n % C
    elif MODE == 2:
        f = kk * WIDTH + n
        return (f % A) * B + f // A
    else:
        return kk * WIDTH + n


@triton.jit
def _finish(v, ACT: tl.constexpr, ODTYPE: tl.constexpr):
    """fp32 pre-activation ``v`` -> output: rounded to ``ODTYPE`` first, then activated in fp32 and rounded
    again, exactly as ``act(F.linear(...))`` in torch (an fp16 pre-activation that overflows to -inf gives
    ``gelu(-inf) = NaN`` there too)."""
    if ACT != 0:
        v = _activation(v.to(ODTYPE).to(tl.float32), ACT)
    return v.to(ODTYPE)


@triton.jit
def _at(PTR, rows, cols, s_row, s_col):
    """Pointers to the ``rows × cols`` tile of a 2-D tensor at ``PTR`` with strides ``(s_row, s_col)``, offsets
    in int64: a column index times a token-major (or transposed) tensor's column stride ``≈ T`` passes 2^31 on
    a tensor of 2^31 elements (T ≈ 700K tokens at 3072 wide) while both factors still fit in int32."""
    return PTR + rows.to(tl.int64)[:, None] * s_row + cols.to(tl.int64)[None, :] * s_col


@triton.jit
def _load(ptr, mask, UPCAST: tl.constexpr):
    v = tl.load(ptr, mask=mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is broken: compute in fp32 there
        v = v.to(tl.float32)
    return v


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _epilogue(acc, BIAS, kk, n, Q, N_OUT, OUT_A, OUT_B, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ODTYPE: tl.constexpr):
    """Bias (indexed by the physical output column), activation, cast — on one block's dot columns ``n``."""
    if HAS_BIAS:
        col = _out_cols(kk, n, Q, OUT_A, OUT_B, OUT_MODE, OUT_C)
        acc += _load(BIAS + col, (n < Q) & (col < N_OUT), True)[None, :]
    return _finish(acc, ACT, ODTYPE)


@triton.jit
def _fwd_block(X, W, BIAS, kk, rm, m_ok, rn, Q, P, N_IN, N_OUT, sxt, sxf, swk, swq, swp, IN_A, IN_B, OUT_A, OUT_B,
               IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr, HAS_BIAS: tl.constexpr,
               ACT: tl.constexpr, ODTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Block ``kk``'s ``(BLOCK_M, BLOCK_N)`` output tile over the whole contraction (pipelined K loop), with
    the epilogue applied (groups divide the block count: no block index past the last)."""
    rk = tl.arange(0, BLOCK_K)
    wrow = _block_rows(rn, OUT_A, OUT_MODE, OUT_C)
    acc = tl.zeros((rm.shape[0], BLOCK_N), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        kidx = k0 + rk
        col = _in_cols(kk, kidx, P, IN_A, IN_B, IN_MODE)
        a = _load(_at(X, rm, col, sxt, sxf), m_ok[:, None] & ((kidx < P) & (col < N_IN))[None, :],
                  UPCAST)
        b = _load(W + kk * swk + wrow[None, :] * swq + kidx[:, None] * swp, (rn < Q)[None, :] & (kidx < P)[:, None],
                  UPCAST)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return _epilogue(acc, BIAS, kk, rn, Q, N_OUT, OUT_A, OUT_B, OUT_MODE, OUT_C, HAS_BIAS, ACT, ODTYPE)


@triton.jit
def _fwd_group(X, W, BIAS, KK, STEP, rm, m_ok, rn, Q, P, N_IN, N_OUT, sxt, sxf, swk, swq, swp, IN_A, IN_B, OUT_A,
               OUT_B, IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr, HAS_BIAS: tl.constexpr,
               ACT: tl.constexpr, ODTYPE: tl.constexpr, G: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Blocks ``KK, KK+STEP, ...`` (``G`` of them), interleaved: column ``n·G + g`` is block ``KK + g·STEP``'s
    column ``n`` (a ``tl.join`` tree; with ``STEP`` doubling per level the leaves come out in block order)."""
    if G == 1:
        return _fwd_block(X, W, BIAS, KK, rm, m_ok, rn, Q, P, N_IN, N_OUT, sxt, sxf, swk, swq, swp, IN_A, IN_B,
                          OUT_A, OUT_B, IN_MODE, OUT_MODE, OUT_C, HAS_BIAS, ACT, ODTYPE, BLOCK_K, BLOCK_N, UPCAST,
                          PRECISION)
    else:
        even = _fwd_group(X, W, BIAS, KK, STEP * 2, rm, m_ok, rn, Q, P, N_IN, N_OUT, sxt, sxf, swk, swq, swp,
                          IN_A, IN_B, OUT_A, OUT_B, IN_MODE, OUT_MODE, OUT_C, HAS_BIAS, ACT, ODTYPE, G // 2, BLOCK_K,
                          BLOCK_N, UPCAST, PRECISION)
        odd = _fwd_group(X, W, BIAS, KK + STEP, STEP * 2, rm, m_ok, rn, Q, P, N_IN, N_OUT, sxt, sxf, swk, swq,
                         swp, IN_A, IN_B, OUT_A, OUT_B, IN_MODE, OUT_MODE, OUT_C, HAS_BIAS, ACT, ODTYPE, G // 2,
                         BLOCK_K, BLOCK_N, UPCAST, PRECISION)
        return tl.reshape(tl.join(even, odd), (rm.shape[0], BLOCK_N * G))


@triton.jit
def _gathered_group(a, W, BIAS, KK, STEP, rn, kidx, Q, P, N_OUT, swk, swq, swp, OUT_A, OUT_B,
                    OUT_MODE: tl.constexpr, OUT_C: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    EPILOGUE: tl.constexpr, ODTYPE: tl.constexpr, G: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Per-block products of a gathered input tile ``a (BLOCK_M, BLOCK_K·G)`` (column ``j·G + g`` belongs to
    block ``KK + g·STEP``), taken apart with a ``tl.split`` tree; result interleaved as in :func:`_fwd_group`
    (finished by the epilogue when ``EPILOGUE``, else fp32 partial sums)."""
    if G == 1:
        wrow = _block_rows(rn, OUT_A, OUT_MODE, OUT_C)
        out = tl.zeros((a.shape[0], rn.shape[0]), dtype=tl.float32)
        # one trip (the tile holds this K step): the loop keeps each block's weight load next to its dot, where
        # straight-line code let the compiler hoist every block's weights at once (registers spilled)
        for _ in range(0, tl.minimum(P, 1)):
            b = _load(W + KK * swk + wrow[None, :] * swq + kidx[:, None] * swp,
                      (rn < Q)[None, :] & (kidx < P)[:, None], UPCAST)
            out = tl.dot(a, b, out, input_precision=PRECISION)
        if EPILOGUE:
            out = _epilogue(out, BIAS, KK, rn, Q, N_OUT, OUT_A, OUT_B, OUT_MODE, OUT_C, HAS_BIAS, ACT, ODTYPE)
        return out
    else:
        even, odd = tl.split(tl.reshape(a, (a.shape[0], a.shape[1] // 2, 2)))
        re = _gathered_group(even, W, BIAS, KK, STEP * 2, rn, kidx, Q, P, N_OUT, swk, swq, swp, OUT_A, OUT_B,
                             OUT_MODE, OUT_C, HAS_BIAS, ACT, EPILOGUE, ODTYPE, G // 2, UPCAST, PRECISION)
        ro = _gathered_group(odd, W, BIAS, KK + STEP, STEP * 2, rn, kidx, Q, P, N_OUT, swk, swq, swp, OUT_A, OUT_B,
                             OUT_MODE, OUT_C, HAS_BIAS, ACT, EPILOGUE, ODTYPE, G // 2, UPCAST, PRECISION)
        return tl.reshape(tl.join(re, ro), (re.shape[0], re.shape[1] * 2))


@triton.jit
def _gathered_tile(X, rm, m_ok, k0, kk0, P, N_IN, sxt, sxf, IN_B, IN_FULL: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP: tl.constexpr, UPCAST: tl.constexpr):
    """``x[t, j·B + kk0 + g]`` as a ``(BLOCK_M, BLOCK_K·GROUP)`` tile, column ``(j - k0)·GROUP + g``: runs of
    ``GROUP`` contiguous elements (the whole row segment when the group is every block, ``B = GROUP``)."""
    rkg = tl.arange(0, BLOCK_K * GROUP)
    if IN_FULL:
        col = k0 * GROUP + rkg
        ok = (col < N_IN) & (col < P * GROUP)  # two bounds, not a minimum: each keeps its divisibility
    else:
        col = (k0 + rkg // GROUP) * IN_B + kk0 + rkg % GROUP
        ok = (k0 + rkg // GROUP < P) & (col < N_IN)
    return _load(_at(X, rm, col, sxt, sxf), m_ok[:, None] & ok[None, :], UPCAST)


@triton.jit
def _bd_fwd_tile(
    pid0, pid1,
    X, W, BIAS, Y, PRE,
    T_X, T_Y, N_IN, N_OUT, Q, P,
    sxt, sxf, swk, swq, swp, syt, syf,
    IN_A, IN_B, OUT_A, OUT_B,
    IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr,
    IN_FULL: tl.constexpr, OUT_FULL: tl.constexpr, MULTI_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program of the block-diagonal forward: block group and N tile ``pid0``, row tile ``pid1`` (the
    grid of :func:`_bd_fwd_kernel`; :func:`_bd_pair_kernel` runs two such grids in one launch). ``T_X`` / ``T_Y``:
    the rows it loads of ``X`` and stores of ``Y`` and ``PRE`` (:func:`._common.touch_rows`: the tokens, or a
    token-major buffer's rows up to a multiple of 16; each output row depends on its own input row only, so
    what padding rows of ``X`` give lands in padding rows of ``Y`` or is masked off)."""
    # SAVE_PRE: the blocks' epilogues stop at the rounded pre-activation, which is stored to PRE (same layout
    # as Y); the activation is then applied to the whole interleaved tile (identical values: _finish rounds
    # the pre-activation before activating it too)
    BLOCK_ACT: tl.constexpr = ACT * (1 - SAVE_PRE)
    tiles_n = tl.cdiv(Q, BLOCK_N)
    kk0 = (pid0 // tiles_n) * GROUP
    pid_n = pid0 % tiles_n
    pid_m = pid1.to(tl.int64)  # int64 row offsets: no 32-bit overflow on huge T·n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < T_X
    y_ok = rm < T_Y
    idx = tl.arange(0, BLOCK_N * GROUP)
    if OUT_MODE == 1 and OUT_C > 1 and GROUP > 1:  # runs of GROUP·C: block index between v and jj
        g = (idx // OUT_C) % GROUP
        n = pid_n * BLOCK_N + (idx // (OUT_C * GROUP)) * OUT_C + idx % OUT_C
    else:
        g = idx % GROUP
        n = pid_n * BLOCK_N + idx // GROUP
    kk = kk0 + g
    if OUT_FULL:  # every block in the group and C = 1: column n·B + kk is one contiguous row segment
        col = pid_n * BLOCK_N * GROUP + idx
        ok = (col < N_OUT) & (col < Q * GROUP)  # (a minimum hid it: 2-byte stores, kernel audit)
    elif OUT_MODE == 1 and OUT_C > 1 and GROUP > 1:
        # = _out_cols(kk, n, ...) written so the compiler sees runs of GROUP·C contiguous columns
        v = pid_n * (BLOCK_N // OUT_C) + idx // (OUT_C * GROUP)
        col = v * OUT_B + kk0 * OUT_C + idx % (OUT_C * GROUP)
        ok = (v < OUT_A) & (col < N_OUT)  # n < Q, as Q = C·A
    else:
        col = _out_cols(kk, n, Q, OUT_A, OUT_B, OUT_MODE, OUT_C)
        ok = (n < Q) & (col < N_OUT)
    if IN_MODE == 1 and MULTI_K:
        # gathered input, several K steps: one fp32 accumulator per block until the end
        acc = tl.zeros((BLOCK_M, BLOCK_N * GROUP), dtype=tl.float32)
        for k0 in range(0, P, BLOCK_K):
            a = _gathered_tile(X, rm, m_ok, k0, kk0, P, N_IN, sxt, sxf, IN_B, IN_FULL, BLOCK_K, GROUP,
                               UPCAST)
            acc += _gathered_group(a, W, BIAS, kk0, 1, rn, k0 + tl.arange(0, BLOCK_K), Q, P, N_OUT, swk, swq, swp,
                                   OUT_A, OUT_B, OUT_MODE, OUT_C, HAS_BIAS, BLOCK_ACT, False, Y.dtype.element_ty, GROUP,
                                   UPCAST, PRECISION)
        out = acc
    elif IN_MODE == 1:
        a = _gathered_tile(X, rm, m_ok, 0, kk0, P, N_IN, sxt, sxf, IN_B, IN_FULL, BLOCK_K, GROUP,
                           UPCAST)
        out = _gathered_group(a, W, BIAS, kk0, 1, rn, tl.arange(0, BLOCK_K), Q, P, N_OUT, swk, swq, swp, OUT_A,
                              OUT_B, OUT_MODE, OUT_C, HAS_BIAS, BLOCK_ACT, True, Y.dtype.element_ty, GROUP, UPCAST,
                              PRECISION)
    else:
        out = _fwd_group(X, W, BIAS, kk0, 1, rm, m_ok, rn, Q, P, N_IN, N_OUT, sxt, sxf, swk, swq, swp, IN_A, IN_B,
                         OUT_A, OUT_B, IN_MODE, OUT_MODE, OUT_C, HAS_BIAS, BLOCK_ACT, Y.dtype.element_ty, GROUP,
                         BLOCK_K, BLOCK_N, UPCAST, PRECISION)
    # out column n·GROUP + g = dot column n of block kk0 + g; with C > 1 reorder to (v, g, jj) runs
    if OUT_MODE == 1 and OUT_C > 1 and GROUP > 1:
        out = tl.reshape(tl.permute(tl.reshape(out, (BLOCK_M, BLOCK_N // OUT_C, OUT_C, GROUP)), (0, 1, 3, 2)),
                         (BLOCK_M, BLOCK_N * GROUP))
    if IN_MODE == 1 and MULTI_K:
        if HAS_BIAS:
            out += _load(BIAS + col, ok, True)[None, :]
        out = _finish(out, BLOCK_ACT, Y.dtype.element_ty)
    if SAVE_PRE:
        tl.store(_at(PRE, rm, col, syt, syf), out, mask=y_ok[:, None] & ok[None, :])
        out = _activation(out.to(tl.float32), ACT).to(Y.dtype.element_ty)
    tl.store(_at(Y, rm, col, syt, syf), out, mask=y_ok[:, None] & ok[None, :])


@triton.jit
def _bd_fwd_kernel(
    X, W, BIAS, Y, PRE,
    T_X, T_Y, N_IN, N_OUT, Q, P,
    sxt, sxf, swk, swq, swp, syt, syf,
    IN_A, IN_B, OUT_A, OUT_B,
    IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr,
    IN_FULL: tl.constexpr, OUT_FULL: tl.constexpr, MULTI_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    _bd_fwd_tile(tl.program_id(0), tl.program_id(1), X, W, BIAS, Y, PRE, T_X, T_Y, N_IN, N_OUT, Q, P,
                 sxt, sxf, swk, swq, swp, syt, syf, IN_A, IN_B, OUT_A, OUT_B,
                 IN_MODE, OUT_MODE, OUT_C, IN_FULL, OUT_FULL, MULTI_K, HAS_BIAS, ACT, SAVE_PRE,
                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP, UPCAST, PRECISION)


@triton.jit
def _bd_pair_kernel(
    X, W, BIAS, Y, PRE,
    T_X, T_Y, N_IN, N_OUT, Q, P,
    sxt, sxf, swk, swq, swp, syt, syf,
    IN_A, IN_B, OUT_A, OUT_B,
    X2, W2, BIAS2, Y2, PRE2,
    T_X2, T_Y2, N_IN2, N_OUT2, Q2, P2,
    sxt2, sxf2, swk2, swq2, swp2, syt2, syf2,
    IN_A2, IN_B2, OUT_A2, OUT_B2,
    GRID0, GRID0_2, N_FIRST, N_SECOND,
    IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr,
    IN_FULL: tl.constexpr, OUT_FULL: tl.constexpr, MULTI_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    IN_MODE2: tl.constexpr, OUT_MODE2: tl.constexpr, OUT_C2: tl.constexpr,
    IN_FULL2: tl.constexpr, OUT_FULL2: tl.constexpr, MULTI_K2: tl.constexpr,
    HAS_BIAS2: tl.constexpr, ACT2: tl.constexpr, SAVE_PRE2: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP2: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # two independent block-diagonal launches as one grid of N_FIRST + N_SECOND programs, interleaved in
    # proportion: program p belongs to the second when floor((p+1)·N2 / N) > floor(p·N2 / N), and is then its
    # program floor(p·N2 / N) (else the first's p − that). The block scheduler issues programs in order, so
    # both kinds run side by side and their different limits (HBM, L2) overlap
    pid = tl.program_id(0).to(tl.int64)
    total = N_FIRST + N_SECOND
    before = pid * N_SECOND // total
    if (pid + 1) * N_SECOND // total > before:
        _bd_fwd_tile(before % GRID0_2, before // GRID0_2, X2, W2, BIAS2, Y2, PRE2, T_X2, T_Y2, N_IN2, N_OUT2, Q2,
                     P2,
                     sxt2, sxf2, swk2, swq2, swp2, syt2, syf2, IN_A2, IN_B2, OUT_A2, OUT_B2,
                     IN_MODE2, OUT_MODE2, OUT_C2, IN_FULL2, OUT_FULL2, MULTI_K2, HAS_BIAS2, ACT2, SAVE_PRE2,
                     BLOCK_M2, BLOCK_N2, BLOCK_K2, GROUP2, UPCAST, PRECISION)
    else:
        first = pid - before
        _bd_fwd_tile(first % GRID0, first // GRID0, X, W, BIAS, Y, PRE, T_X, T_Y, N_IN, N_OUT, Q, P,
                     sxt, sxf, swk, swq, swp, syt, syf, IN_A, IN_B, OUT_A, OUT_B,
                     IN_MODE, OUT_MODE, OUT_C, IN_FULL, OUT_FULL, MULTI_K, HAS_BIAS, ACT, SAVE_PRE,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP, UPCAST, PRECISION)


@dataclass(frozen=True)
class _Plan:
    """What one :func:`bd_forward` call launches, derived once per shape, strides and options (:func:`_plan_for`):
    the launch plan, the runtime arguments after the five tensors and the two row counts (those depend on the
    buffers' storage: :func:`_prepare` adds them per call), the compile-time arguments (``meta``) and
    everything a launch of :func:`_bd_fwd_kernel` takes besides its arguments (``options``: ``meta`` plus
    ``UPCAST``, ``PRECISION``, warps and stages). Shared by every call of that kind: unpack, do not modify."""

    lp: _plan.BDLaunch
    scalars: tuple
    meta: dict
    options: dict


@_plan.memo
def _plan_for(T: int, n_x: int, n_out: int, k: int, q: int, p: int, dtype: torch.dtype, xs: tuple, ws: tuple,
              ys: tuple, in_perm, out_perm, activation: str, has_bias: bool, save_pre: bool) -> _Plan:
    """:class:`_Plan` of ``x (T, n_x)`` (strides ``xs``) times ``w (k, q, p)`` (``ws``) into ``y (T, n_out)``
    (``ys``); memoised (at ~20 µs, deriving it was most of a launch's own host time)."""
    lp = _plan.bd_launch(T, k, q, p, dtype.itemsize, in_perm, out_perm, activation != "none",
                         _common.token_major_layout(n_x, xs), _common.token_major_layout(n_out, ys), save_pre)
    scalars = (n_x, n_out, q, p, *xs, *ws, *ys, lp.inp.a, lp.inp.b, lp.out.a, lp.out.b)
    meta = dict(IN_MODE=lp.inp.mode, OUT_MODE=lp.out.mode, OUT_C=lp.out.c, IN_FULL=lp.in_full,
                OUT_FULL=lp.out_full, MULTI_K=lp.multi_k, HAS_BIAS=has_bias, ACT=ACT_CODES[activation],
                SAVE_PRE=save_pre, **{k: v for k, v in lp.tile.meta().items() if not k.startswith("num_")})
    options = dict(meta, UPCAST=interpreting(), PRECISION=precision(dtype), **_common.launch_meta(lp.tile, ()))
    return _Plan(lp, scalars, meta, options)


def _prepare(x, w, bias, n_out, activation, in_perm, out_perm, out, pre_out):
    """``(y, plan | None, args)``: the output buffer, what to launch (``None`` for no tokens) and the launch's
    runtime arguments."""
    T = x.shape[0]
    k, q, p = w.shape
    n_out = k * q if n_out is None else n_out
    y = _common.empty(T, n_out, device=x.device, dtype=x.dtype) if out is None else out
    if pre_out is not None:
        if activation == "none":
            raise ValueError("bd_forward: pre_out is only written with an activation (it would equal the output)")
        if pre_out.shape != y.shape or pre_out.stride() != y.stride() or pre_out.dtype != y.dtype:
            raise ValueError(f"bd_forward: pre_out must match the output: shape {tuple(y.shape)}, strides "
                             f"{y.stride()}, {y.dtype}; got {tuple(pre_out.shape)}, {pre_out.stride()}, "
                             f"{pre_out.dtype}")
    if T == 0:
        return y, None, ()
    plan = _plan_for(T, x.shape[1], n_out, k, q, p, x.dtype, x.stride(), w.stride(), y.stride(), in_perm, out_perm,
                     activation, bias is not None, pre_out is not None)
    rows_y = _common.touch_rows(y) if pre_out is None else min(_common.touch_rows(y), _common.touch_rows(pre_out))
    args = (x, w, y if bias is None else bias, y, y if pre_out is None else pre_out, _common.touch_rows(x), rows_y,
            *plan.scalars)
    return y, plan, args


def bd_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    n_out: Optional[int] = None,
    activation: str = "none",
    *,
    in_perm: Optional[tuple[int, int]] = None,
    out_perm: Optional[tuple[int, int]] = None,
    out: Optional[torch.Tensor] = None,
    pre_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x (T, N_IN)`` physical, ``w (k, q, p)`` any strides -> ``(T, n_out)`` (into ``out`` if given).

    ``in_perm``/``out_perm`` ``(A, B)``: the view-transposes the input is read through and the output written
    through (module docstring); the grouped layout is used whenever the blocks align with them, and no block
    group is formed for an operand stored token-major (its accesses are runs of tokens already).
    ``pre_out``: also store the pre-activation ``BD(w) x + bias`` there (an activation's backward needs it;
    same shape and strides as the output).
    """
    y, plan, args = _prepare(x, w, bias, n_out, activation, in_perm, out_perm, out, pre_out)
    if plan is not None:
        _bd_fwd_kernel[plan.lp.grid](*args, **plan.options)
    return y


#: the keyword arguments of one :func:`bd_forward` call in :func:`bd_forward_pair` / :func:`bd_forward_chain`
_CALL_KEYS = ("x", "w", "bias", "n_out", "activation", "in_perm", "out_perm", "out", "pre_out")
_CALL_DEFAULTS = dict(bias=None, n_out=None, activation="none", in_perm=None, out_perm=None, out=None, pre_out=None)


def _two_calls(fn: str, first: dict, second: dict) -> tuple:
    """Two :func:`bd_forward` keyword-argument dicts with the defaults filled in; ``ValueError`` (naming ``fn``)
    for an unknown key or two dtypes."""
    a, b = ({**_CALL_DEFAULTS, **call} for call in (first, second))
    for call in (a, b):
        if set(call) - set(_CALL_KEYS) or call["x"].dtype != a["x"].dtype:
            raise ValueError(f"{fn}: each call takes {_CALL_KEYS} and one dtype; got {sorted(call)}")
    return a, b


def bd_forward_pair(first: dict, second: dict) -> tuple:
    """Two independent :func:`bd_forward` calls (keyword arguments ``x``, ``w`` and optionally ``bias``,
    ``n_out``, ``activation``, ``in_perm``, ``out_perm``, ``out``, ``pre_out``) in one launch
    (:func:`_bd_pair_kernel`); they must not read what the other writes. Returns both outputs. One launch
    instead of two saves a launch gap, and when one call is bound by HBM and the other by L2 (the two-kernel
    Monarch forward's stage 1 of one token chunk and stage 2 of the previous one) their programs share the
    GPU and the two limits overlap (:func:`monarch_kernels.cost_model.paired`)."""
    a, b = _two_calls("bd_forward_pair", first, second)
    ya, la, args_a = _prepare(*(a[k] for k in _CALL_KEYS))
    yb, lb, args_b = _prepare(*(b[k] for k in _CALL_KEYS))
    if la is None or lb is None:  # one has no tokens: the other alone
        for plan, args in ((la, args_a), (lb, args_b)):
            if plan is not None:
                _bd_fwd_kernel[plan.lp.grid](*args, **plan.options)
        return ya, yb
    n_a, n_b = la.lp.grid[0] * la.lp.grid[1], lb.lp.grid[0] * lb.lp.grid[1]
    tile = _plan.pair_tile(la.lp.tile, lb.lp.tile)
    meta = {**la.meta, **{k + "2": v for k, v in lb.meta.items()}}
    _bd_pair_kernel[(n_a + n_b,)](*args_a, *args_b, la.lp.grid[0], lb.lp.grid[0], n_a, n_b, **meta,
                                  UPCAST=interpreting(), PRECISION=precision(a["x"].dtype),
                                  **_common.launch_meta(tile, ()))
    return ya, yb


# ------------------------------------------------------------------------------------------------ chained stages


@triton.jit
def _wait_for(COUNT, target, FAILED, SPIN: tl.constexpr):
    """Acquire: hold this program until ``*COUNT ≥ target``. On a GPU every thread spins on a volatile load,
    then one acquire load orders the program's later reads after the releases it counted (``bar.sync`` passes
    that order to every thread). The interpreter runs programs one at a time in launch order, which is ticket
    order here, so the count must be complete already; where it is not, ``*FAILED`` counts it (the host
    raises): a schedule whose ticket order is not a valid execution order fails there instead of hanging."""
    if SPIN:
        while tl.load(COUNT, volatile=True) < target:
            pass
        # the acquire: a loop that runs once, on an RMW whose result is used (an unused one is dropped by some
        # Triton versions: 3.6 emitted no acquire at all)
        while tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()
    else:
        tl.atomic_add(FAILED, (tl.load(COUNT) < target).to(tl.int32))


@triton.jit
def _signal(COUNT):
    """Release: count this program's tile done once every thread has issued its stores (``bar.sync``, then one
    cumulative release add by one thread)."""
    tl.debug_barrier()
    tl.atomic_add(COUNT, 1, sem="release", scope="gpu")


@triton.jit
def _bd_chain_kernel(
    X, W, BIAS, Y, PRE,
    T_X, T_Y, N_IN, N_OUT, Q, P,
    sxt, sxf, swk, swq, swp, syt, syf,
    IN_A, IN_B, OUT_A, OUT_B,
    X2, W2, BIAS2, Y2, PRE2,
    T_X2, T_Y2, N_IN2, N_OUT2, Q2, P2,
    sxt2, sxf2, swk2, swq2, swp2, syt2, syf2,
    IN_A2, IN_B2, OUT_A2, OUT_B2,
    COUNTERS, T_ALL, CHUNK, NCHUNK, BUFFERS, GRID0, GRID0_2, N_FIRST, N_SECOND,
    IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, OUT_C: tl.constexpr,
    IN_FULL: tl.constexpr, OUT_FULL: tl.constexpr, MULTI_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    IN_MODE2: tl.constexpr, OUT_MODE2: tl.constexpr, OUT_C2: tl.constexpr,
    IN_FULL2: tl.constexpr, OUT_FULL2: tl.constexpr, MULTI_K2: tl.constexpr,
    HAS_BIAS2: tl.constexpr, ACT2: tl.constexpr, SAVE_PRE2: tl.constexpr,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K2: tl.constexpr, GROUP2: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPIN: tl.constexpr,
):
    # The paired two-kernel schedule of NCHUNK token chunks as one grid of NCHUNK·(N_FIRST + N_SECOND)
    # programs. Each program takes a ticket (the order programs start in, whatever the scheduler does) and
    # the ticket picks its work: tickets [0, N_FIRST) stage 1 of chunk 0; then, per chunk c, N_FIRST +
    # N_SECOND tickets of stage 2 of chunk c interleaved in proportion with stage 1 of chunk c + 1 (as
    # _bd_pair_kernel); the last chunk's stage 2 alone. Stage 2 of chunk c waits for every stage-1 tile of
    # chunk c; stage 1 of chunk c waits for stage 2 of chunk c - BUFFERS, which read the intermediate slot it
    # overwrites. Both have smaller tickets, so they started before: no program waits on one that cannot run.
    # COUNTERS: [0] tickets, [1 + c] stage-1 tiles of chunk c done, [1 + NCHUNK + c] its stage-2 tiles done,
    # [1 + 2·NCHUNK] dependencies found missing (interpreter).
    ticket = tl.atomic_add(COUNTERS, 1, sem="relaxed", scope="gpu").to(tl.int64)
    failed = COUNTERS + 1 + 2 * NCHUNK
    per = N_FIRST + N_SECOND
    phase0 = ticket < N_FIRST
    rest = tl.maximum(ticket - N_FIRST, 0)
    c = rest // per
    j = rest % per
    before = j * N_SECOND // per
    last = c == NCHUNK - 1
    if (not phase0) & (last | ((j + 1) * N_SECOND // per > before)):
        prog = tl.where(last, j, before)
        t0 = c * CHUNK
        _wait_for(COUNTERS + 1 + c, N_FIRST, failed, SPIN)
        rows = tl.minimum(CHUNK, T_ALL - t0)
        _bd_fwd_tile(prog % GRID0_2, prog // GRID0_2, X2 + (c % BUFFERS) * CHUNK * sxt2, W2, BIAS2,
                     Y2 + t0 * syt2, PRE2 + t0 * syt2, rows, rows, N_IN2, N_OUT2, Q2, P2,
                     sxt2, sxf2, swk2, swq2, swp2, syt2, syf2, IN_A2, IN_B2, OUT_A2, OUT_B2,
                     IN_MODE2, OUT_MODE2, OUT_C2, IN_FULL2, OUT_FULL2, MULTI_K2, HAS_BIAS2, ACT2, SAVE_PRE2,
                     BLOCK_M2, BLOCK_N2, BLOCK_K2, GROUP2, UPCAST, PRECISION)
        _signal(COUNTERS + 1 + NCHUNK + c)
    else:
        c1 = tl.where(phase0, 0, c + 1)
        prog = tl.where(phase0, ticket, j - before)
        t0 = c1 * CHUNK
        if c1 >= BUFFERS:
            _wait_for(COUNTERS + 1 + NCHUNK + c1 - BUFFERS, N_SECOND, failed, SPIN)
        rows = tl.minimum(CHUNK, T_ALL - t0)
        _bd_fwd_tile(prog % GRID0, prog // GRID0, X + t0 * sxt, W, BIAS, Y + (c1 % BUFFERS) * CHUNK * syt, PRE,
                     rows, rows, N_IN, N_OUT, Q, P,
                     sxt, sxf, swk, swq, swp, syt, syf, IN_A, IN_B, OUT_A, OUT_B,
                     IN_MODE, OUT_MODE, OUT_C, IN_FULL, OUT_FULL, MULTI_K, HAS_BIAS, ACT, SAVE_PRE,
                     BLOCK_M, BLOCK_N, BLOCK_K, GROUP, UPCAST, PRECISION)
        _signal(COUNTERS + 1 + c1)


def chain_counters(nchunks: int, device) -> torch.Tensor:
    """Zeroed dependency counters of one :func:`bd_forward_chain` launch (layout in :func:`_bd_chain_kernel`);
    one place, so tests can inspect them."""
    return torch.zeros(2 + 2 * nchunks, dtype=torch.int32, device=device)


def bd_forward_chain(first: dict, second: dict, *, chunk: int, buffers: int) -> None:
    """Two dependent :func:`bd_forward` calls over token chunks, as one launch (:func:`_bd_chain_kernel`).

    ``first`` (keyword arguments of :func:`bd_forward`; ``out`` required) maps ``x (T, ·)`` to the intermediate:
    chunk ``c`` (tokens ``[c·chunk, (c+1)·chunk)``) goes to rows ``(c mod buffers)·chunk`` onwards of
    ``first["out"]`` (``buffers ≥`` the chunk count: every chunk its own rows, the whole intermediate kept).
    ``second`` reads those rows (``second["x"]`` must be ``first["out"]``) and writes rows ``c·chunk`` onwards of
    its ``out (T, ·)`` (and ``pre_out``). The schedule is :func:`bd_forward_pair`'s — stage 1 of chunk 0, then
    stage 1 of chunk c + 1 beside stage 2 of chunk c, then the last stage 2 — with the launch gaps between the
    steps replaced by in-kernel waits on per-chunk counters (cost model: one launch plus a counter reset
    instead of ``chunks + 1`` launches)."""
    a, b = _two_calls("bd_forward_chain", first, second)
    if a["pre_out"] is not None:
        raise ValueError("bd_forward_chain: the first call cannot keep a pre-activation")
    z, T = a["out"], a["x"].shape[0]
    nchunks = _plan.cdiv(T, chunk) if chunk > 0 else 0
    if z is None or b["x"] is not z or b["out"] is None or b["out"].shape[0] != T or chunk < 1 or buffers < 1:
        raise ValueError("bd_forward_chain: first['out'] must be the buffer second['x'] reads, second['out'] "
                         f"must have the input's {T} rows, chunk and buffers ≥ 1; got chunk={chunk}, "
                         f"buffers={buffers}")
    if z.shape[0] < min(buffers, nchunks) * chunk and z.shape[0] < T:
        raise ValueError(f"bd_forward_chain: the intermediate has {z.shape[0]} rows, {buffers} slots of "
                         f"{chunk} tokens need {min(buffers, nchunks) * chunk}")
    if T == 0:
        return
    rows = min(chunk, T)
    sub = lambda t: None if t is None else t[:rows]
    _, la, args_a = _prepare(a["x"][:rows], a["w"], a["bias"], a["n_out"], a["activation"], a["in_perm"],
                             a["out_perm"], z[:rows], None)
    _, lb, args_b = _prepare(z[:rows], b["w"], b["bias"], b["n_out"], b["activation"], b["in_perm"],
                             b["out_perm"], b["out"][:rows], sub(b["pre_out"]))
    n_a, n_b = la.lp.grid[0] * la.lp.grid[1], lb.lp.grid[0] * lb.lp.grid[1]
    counters = chain_counters(nchunks, a["x"].device)
    meta = {**la.meta, **{k + "2": v for k, v in lb.meta.items()}}
    _bd_chain_kernel[(nchunks * (n_a + n_b),)](
        *args_a, *args_b, counters, T, chunk, nchunks, min(buffers, nchunks), la.lp.grid[0], lb.lp.grid[0],
        n_a, n_b, **meta, UPCAST=interpreting(), PRECISION=precision(a["x"].dtype), SPIN=not interpreting(),
        **_common.launch_meta(_plan.pair_tile(la.lp.tile, lb.lp.tile), ()))
    if interpreting() and counters[-1].item():
        raise RuntimeError(f"bd_forward_chain: {counters[-1].item()} programs found a dependency unfinished in "
                           "launch order (the schedule would deadlock or race on a GPU)")


# ------------------------------------------------------------------------------------------------ weight grad


@triton.jit
def _wgrad_group(gt, X, KK, STEP, rt, t_ok, rp, P, N_X, sxt, sxf, G: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``gᵀ x`` per block for a gathered ``gt (BLOCK_K, BLOCK_M·G)`` token-by-row tile (column ``i·G + g`` =
    block ``KK + g·STEP``'s row ``i``), split per block; result ``(BLOCK_M, BLOCK_N·G)`` interleaved."""
    if G == 1:
        col = KK * P + rp
        xt = _load(_at(X, rt, col, sxt, sxf), t_ok[:, None] & ((rp < P) & (col < N_X))[None, :], UPCAST)
        return tl.dot(tl.trans(gt), xt, input_precision=PRECISION)
    else:
        even, odd = tl.split(tl.reshape(gt, (gt.shape[0], gt.shape[1] // 2, 2)))
        re = _wgrad_group(even, X, KK, STEP * 2, rt, t_ok, rp, P, N_X, sxt, sxf, G // 2, UPCAST, PRECISION)
        ro = _wgrad_group(odd, X, KK + STEP, STEP * 2, rt, t_ok, rp, P, N_X, sxt, sxf, G // 2, UPCAST, PRECISION)
        return tl.reshape(tl.join(re, ro), (re.shape[0], re.shape[1] * 2))


@triton.jit
def _wgrad_step(G_, X, kk0, gcol, g_ok, rt, t_ok, rp, P, N_X, sgt, sgf, sxt, sxf, GROUP: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One token step of the weight gradient: the ``g`` tile of tokens ``rt`` (``t_ok``) gathered at columns
    ``gcol`` (``g_ok``), then ``gᵀ x`` per block of the group (:func:`_wgrad_group`)."""
    gt = _load(_at(G_, rt, gcol, sgt, sgf), t_ok[:, None] & g_ok[None, :], UPCAST)
    return _wgrad_group(gt, X, kk0, 1, rt, t_ok, rp, P, N_X, sxt, sxf, GROUP, UPCAST, PRECISION)


@triton.jit
def _bd_wgrad_kernel(
    X, G_, DW,
    T, N_X, N_G, Q, P, ROWS_PER_SPLIT,
    sxt, sxf, sgt, sgf, sds, sdk, sdq, sdp,
    G_A, G_B,
    G_MODE: tl.constexpr, G_FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # dw[kk, qq, pp] over this program's token split; BLOCK_M = q-tile, BLOCK_N = p-tile, BLOCK_K = token step.
    # The split's whole token steps load without a token mask (a mask bounded by a T that is not a multiple of
    # 16 would make every token-major load one element wide), then its ragged last step, if any, masked
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_q = tl.cdiv(Q, BLOCK_M)
    tiles_p = tl.cdiv(P, BLOCK_N)
    kk0 = (tile // (tiles_q * tiles_p)) * GROUP
    rem = tile % (tiles_q * tiles_p)
    rqg = tl.arange(0, BLOCK_M * GROUP)
    rq = (rem // tiles_p) * BLOCK_M + rqg // GROUP  # row of the g tile's column i·GROUP + g
    kg = kk0 + rqg % GROUP
    rp = (rem % tiles_p) * BLOCK_N + tl.arange(0, BLOCK_N)
    if G_FULL:  # the group is every block and B = GROUP: row i·GROUP + g of the tile is one contiguous segment
        gcol = (rem // tiles_p) * BLOCK_M * GROUP + rqg
        g_ok = (gcol < N_G) & (gcol < Q * GROUP)
    else:
        gcol = _in_cols(kg, rq, Q, G_A, G_B, G_MODE)
        g_ok = (rq < Q) & (gcol < N_G)
    t_start = split.to(tl.int64) * ROWS_PER_SPLIT
    rows = tl.minimum(ROWS_PER_SPLIT, T - t_start)  # splits are whole token steps: only the last is ragged
    whole = rows - rows % BLOCK_K
    rt0 = tl.arange(0, BLOCK_K)
    every = tl.full((BLOCK_K,), 1, tl.int1)
    acc = tl.zeros((BLOCK_M, BLOCK_N * GROUP), dtype=tl.float32)
    for t0 in range(0, whole, BLOCK_K):
        acc += _wgrad_step(G_, X, kk0, gcol, g_ok, t_start + t0 + rt0, every, rp, P, N_X, sgt, sgf, sxt, sxf, GROUP,
                           UPCAST, PRECISION)
    for t0 in range(whole, rows, BLOCK_K):  # at most one step
        rt = t_start + t0 + rt0
        acc += _wgrad_step(G_, X, kk0, gcol, g_ok, rt, rt < T, rp, P, N_X, sgt, sgf, sxt, sxf, GROUP, UPCAST,
                           PRECISION)
    # acc[i, n·GROUP + g] -> dw[kk0 + g, row i, col n]: one (GROUP, BLOCK_M, BLOCK_N) tile, contiguous in p
    acc3 = tl.permute(tl.reshape(acc, (BLOCK_M, BLOCK_N, GROUP)), (2, 0, 1))
    gi = tl.arange(0, GROUP)
    qi = (rem // tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)
    ptr = DW + split * sds + (kk0 + gi)[:, None, None] * sdk + qi[None, :, None] * sdq + rp[None, None, :] * sdp
    ok = (qi < Q)[None, :, None] & (rp < P)[None, None, :]
    tl.store(ptr, acc3, mask=ok)


def bd_weight_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    k: int,
    q: int,
    p: int,
    *,
    g_perm: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """``dw (k, q, p)`` in ``x``'s dtype from ``x (T, N_X)`` (natural blocks) and ``g (T, N_G)`` read through
    ``g_perm`` (grouped 16-byte gathers when the blocks align with it; no group when ``g`` is token-major)."""
    T = x.shape[0]
    if T == 0:
        return torch.zeros(k, q, p, device=x.device, dtype=x.dtype)
    lp, options = _wgrad_plan(T, k, q, p, x.dtype, g_perm, _common.device_info(x.device).num_sms,
                              _common.is_token_major(g))
    partial = _common.empty(lp.splits, k, q, p, device=x.device, dtype=torch.float32)
    _bd_wgrad_kernel[(lp.tiles, lp.splits)](
        x, g, partial,
        T, x.shape[1], g.shape[1], q, p, lp.rows_per_split,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), *partial.stride(),
        lp.g.a, lp.g.b, **options,
    )
    return partial.sum(0).to(x.dtype)


@_plan.memo
def _wgrad_plan(T: int, k: int, q: int, p: int, dtype: torch.dtype, g_perm, num_sms: int,
                g_token_major: bool) -> tuple:
    """``(plan, compile-time arguments and launch options)`` of :func:`bd_weight_grad` (memoised; the options are
    shared: unpack, do not modify)."""
    lp = _plan.wgrad_launch(T, k, q, p, dtype.itemsize, g_perm, num_sms, g_token_major)
    return lp, dict(G_MODE=lp.g.mode, G_FULL=lp.g_full, UPCAST=interpreting(), PRECISION=precision(dtype),
                    **_common.launch_meta(lp.tile))
