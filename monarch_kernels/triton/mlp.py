"""A Monarch MLP forward ``fc2(act(fc1(x)))`` whose hidden activation never leaves the chip.

Two Monarch layers ``fc1: n_in -> n_h`` (factors ``w1a (k1, q1, p1)``, ``w2a (l1, s1, r1)``, ``n_h = l1·s1``) and
``fc2: n_h -> n_out`` (``w1b (k2, q2, p2)``, ``w2b (l2, s2, r2)``, ``k2·p2 = n_h``) composed with an activation run,
layer by layer, four Monarch stages and write the ``T × n_h`` hidden activation (4× the model width in a
transformer MLP) to HBM and read it back. But fc2's first stage reads its input in blocks of ``p2`` consecutive
hidden columns, and hidden column ``ss·l1 + ll`` is fc1's stage-2 block ``ll``, row ``ss`` (P2). When
``p2 % l1 == 0``, fc2's block ``kk`` reads exactly fc1's stage-2 rows ``ss ∈ [kk·S, (kk+1)·S)`` of every block
``ll`` (``S = p2 / l1``), element ``s'·l1 + ll`` being row ``kk·S + s'`` of block ``ll``. So one program per
(token tile, ``kk``) computes, for each ``ll``, the hidden tile

    h_ll[t, s'] = act( Σ_rr w2a[ll, kk·S + s', rr] · z1[t, ll·r1 + rr] + bias1[(kk·S + s')·l1 + ll] )

(rounded to the input dtype, as the layer-by-layer path stores it) and accumulates fc2's stage-1 output

    y[t, qq] += Σ_s' w1b[kk, qq, s'·l1 + ll] · h_ll[t, s']

in fp32 registers: the two chained GEMMs of a flash-attention-like loop, no FLOP repeated, the hidden tile in
registers only. ``y`` is stored through fc2's P1 (column ``kk·q2 + qq`` at ``((kk·q2 + qq) mod l2)·r2 + (kk·q2 +
qq) div l2``) into a token-major buffer: 16-byte runs of tokens whatever the column order. fc1's stage 1 before
and fc2's stage 2 after are the two-kernel path's own launches (:func:`.blockdiag.bd_forward`). HBM sees ``x``,
fc1's stage-1 output ``z1`` (written and read), fc2's ``z2`` (likewise) and the output: ``n_in + 2·k1·q1 +
2·k2·q2 + n_out`` elements per token instead of ``… + 2·n_h`` more for the hidden activation and its two
extra intermediates.

Tiles (:data:`.plan.MLP_TILE`): 128 tokens, 32-wide chunks of ``s'``, 64-deep steps of ``r1``, all of ``q2``
(padded to a power of two, at most 256) as the fp32 accumulator; 16 warps. Compiled offline for sm_90
(``bench.kernel_audit``): ``wgmma`` for both dots, 128 registers and no spills at the GPT-2 shape (``q2 = 192``
padded to 256), 16-byte loads and stores. :func:`fusable` says which pairs of layers it takes
(:func:`.plan.mlp_fusable`).

Training (:func:`mlp_forward_saving`, :func:`mlp_backward`). The forward keeps ``z1`` and ``z2``, which it writes
anyway, and no ``T × n_h`` tensor. Backward, with ``dy2 = P1ᵀ BD(w2b)ᵀ P2ᵀ g`` from fc2's stage 2 (as in
:func:`.monarch.backward`), hidden column ``h = (kk·S + s')·l1 + ll`` has

    da[t, h]   = Σ_qq w1b[kk, qq, s'·l1 + ll] · dy2[t, kk·q2 + qq]
    dpre[t, h] = da[t, h] · act'(pre[t, h])
    dz1[t, ll·r1 + rr] = Σ_{kk, s'} w2a[ll, kk·S + s', rr] · dpre[t, h]

so one program per (token tile, ``ll``) recomputes the pre-activation tile by tile, chains ``da``, the
derivative and the ``dz1`` accumulation (three dots per chunk, :func:`_hidden_bwd_kernel`), and stores ``a`` and
``dpre`` token-major for the two weight gradients that sum over tokens (``dw1b[kk] = dy2_kkᵀ a_kk``, ``dw2a[ll]
= (P2ᵀ dpre)_llᵀ z1_ll``: cuBLAS batched GEMMs on strided views). Tiles (:data:`.plan.MLP_BWD_TILE`): 128 tokens,
16-row chunks of ``s'``, 8 warps, fc1's ``r1`` in ≤ 4 chunks of 64 (the program's ``z1`` tile in registers, one fp32
``dz1`` accumulator per chunk, each ``w2a`` chunk loaded once for both its dots). Offline for sm_90 at the GPT-2
shape: ``wgmma``, 199 registers (triton 3.9; 242 on 3.6), no spills, 16-byte loads of ``z1`` and ``dy2`` and
16-byte stores, 8-byte weight loads (from L2).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..shapes import MonarchShape
from . import _common
from . import plan as _plan
from ._common import ACT_CODES, interpreting, precision
from .blockdiag import _activation_grad, _at, _finish, _load, bd_forward
from .token_major import to_token_major


def fusable(sh1: MonarchShape, sh2: MonarchShape, n_in: int, n_hidden: int, dtype: torch.dtype,
            training: bool = False) -> bool:
    """Whether :func:`mlp_forward` (with ``training``: :func:`mlp_forward_saving` and :func:`mlp_backward`) runs
    the fused hidden layer for fc1 ``sh1`` (input width ``n_in``) and fc2 ``sh2`` with ``n_hidden`` hidden
    features (:func:`.plan.mlp_fusable`: fp16/bf16, no ragged widths, ``p2 % l1 == 0``, ``q2 ≤ 256``; training:
    ``r1 ≤ 256``)."""
    return dtype in (torch.float16, torch.bfloat16) and _plan.mlp_fusable(sh1, sh2, n_in, n_hidden, 2, training)


@triton.jit
def _tile_dot(A, rm, m_ok, a_col0, K, sat, saf, W, w_cols, w_ok, swk, swc, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``Σ_k A[rm, a_col0 + k] · W[k, w_cols]`` over ``k < K`` in fp32, ``BLOCK_K`` at a time: a token tile of an
    activation (strides ``sat, saf``) times a weight block (``k`` stride ``swk``, column stride ``swc``)."""
    acc = tl.zeros((rm.shape[0], w_cols.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = _load(_at(A, rm, a_col0 + rk, sat, saf), m_ok[:, None] & k_ok[None, :], UPCAST)
        w = _load(W + rk[:, None] * swk + w_cols[None, :] * swc, k_ok[:, None] & w_ok[None, :], UPCAST)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _hidden_kernel(Z1, W2A, B1, W1B, Z2, ROWS, S, R1, Q2, L1, L2, R2,
                   sz1t, sz1f, swa0, swa1, swa2, swb0, swb1, swb2, sz2t, sz2f,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (token tile, fc2 block kk): fc1's stage 2 + bias + activation for the hidden rows fc2's block kk
    reads, chained into fc2's stage 1. ``W1B`` is fc2's ``w1`` regrouped ``(k2, l1, q2, S)``, element ``(kk, ll,
    qq, s')`` = ``w1b[kk, qq, s'·l1 + ll]`` with unit stride along ``s'`` (strides ``swb0, swb1, swb2``).
    ``ROWS``: the token rows of ``Z1`` and ``Z2`` it touches (:func:`._common.touch_rows`; each row its own)."""
    kk = tl.program_id(1)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < ROWS
    rq = tl.arange(0, BLOCK_Q)
    q_ok = rq < Q2
    acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
    for ll in range(0, L1):
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            s_ok = rs < S
            pre = _tile_dot(Z1, rm, m_ok, ll * R1, R1, sz1t, sz1f, W2A + ll * swa0, kk * S + rs, s_ok, swa2, swa1,
                            BLOCK_K, UPCAST, PRECISION)
            if HAS_BIAS:
                pre += _load(B1 + (kk * S + rs) * L1 + ll, s_ok, True)[None, :]
            h = _finish(pre, ACT, Z2.dtype.element_ty)
            if UPCAST:
                h = h.to(tl.float32)
            w = _load(W1B + kk * swb0 + ll * swb1 + rq[None, :] * swb2 + rs[:, None], q_ok[None, :] & s_ok[:, None],
                      UPCAST)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
    f = kk * Q2 + rq
    col = (f % L2) * R2 + f // L2
    tl.store(_at(Z2, rm, col, sz2t, sz2f), acc.to(Z2.dtype.element_ty),
             mask=m_ok[:, None] & q_ok[None, :])


def regroup(w1b: torch.Tensor, sh2: MonarchShape, l1: int) -> torch.Tensor:
    """fc2's ``w1 (k2, q2, p2)`` as ``(k2, l1, q2, S)``, element ``(kk, ll, qq, s')`` = ``w1b[kk, qq, s'·l1 + ll]``:
    each ``(kk, ll)`` slice a ``(q2, S)`` matrix of unit-stride rows (one small copy)."""
    return w1b.reshape(sh2.k, sh2.q, sh2.p // l1, l1).permute(0, 3, 1, 2).contiguous()


def hidden_layer(z1: torch.Tensor, w2a: torch.Tensor, bias1: Optional[torch.Tensor], w1v: torch.Tensor,
                 sh2: MonarchShape, activation: str) -> torch.Tensor:
    """fc2's stage-1 output, token-major ``(T, k2·q2)`` in fc2's stage-2 order, from fc1's token-major stage-1
    output ``z1 (T, l1·r1)`` (stage-2 order) through fc1's stage 2, ``bias1``, ``activation`` and fc2's stage 1
    (module docstring); the hidden activation stays in registers. ``w1v``: fc2's ``w1`` regrouped
    (:func:`regroup`) so that every weight load is a unit-stride run."""
    T = z1.shape[0]
    l1, _, r1 = w2a.shape
    S = sh2.p // l1
    z2 = _common.empty_token_major(T, sh2.n_mid, device=z1.device, dtype=z1.dtype)
    if T == 0:
        return z2
    tile = _plan.MLP_TILE
    grid = (_plan.cdiv(T, tile.block_m), sh2.k)
    _hidden_kernel[grid](
        z1, w2a, bias1 if bias1 is not None else z2, w1v, z2, min(_common.touch_rows(z1), _common.touch_rows(z2)),
        S, r1, sh2.q, l1, sh2.l, sh2.r,
        z1.stride(0), z1.stride(1), *w2a.stride(), *w1v.stride()[:3],
        z2.stride(0), z2.stride(1),
        HAS_BIAS=bias1 is not None, ACT=ACT_CODES[activation], BLOCK_M=tile.block_m, BLOCK_S=_plan.mlp_block_s(S),
        BLOCK_K=tile.block_k, BLOCK_Q=_plan.mlp_block_q(sh2.q), UPCAST=interpreting(), PRECISION=precision(z1.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return z2


def mlp_forward_saving(x, w1a, w2a, bias1, w1b, w2b, bias2, n_out: int, activation: str = "gelu"):
    """``(out, z1, z2, w1v)``: ``fc2(act(fc1(x)))`` for ``x (T, n_in)`` with the hidden layer fused
    (:func:`hidden_layer`), the two stage-1 intermediates it wrote anyway (token-major, stage-2 order: fc1's
    ``z1 (T, l1·r1)``, fc2's ``z2 (T, l2·r2)``) and fc2's regrouped ``w1``, which :func:`mlp_backward` takes. The
    caller checks :func:`fusable` first. Three launches and a transposing copy where the cost model stores fc2's
    output token-major first, as the two-kernel forward does."""
    from .monarch import stage2_forward

    sh1 = MonarchShape.from_factors(w1a.shape, w2a.shape)
    sh2 = MonarchShape.from_factors(w1b.shape, w2b.shape)
    z1 = _common.empty_token_major(x.shape[0], sh1.n_mid, device=x.device, dtype=x.dtype)
    bd_forward(x, w1a, out_perm=(sh1.l, sh1.r), out=z1)
    w1v = regroup(w1b, sh2, sh1.l)
    z2 = hidden_layer(z1, w2a, bias1, w1v, sh2, activation)
    return stage2_forward(z2, w2b, bias2, n_out, "none", sh2, n_in=sh1.n_out), z1, z2, w1v


def mlp_forward(x, w1a, w2a, bias1, w1b, w2b, bias2, n_out: int, activation: str = "gelu"):
    """``fc2(act(fc1(x)))`` (:func:`mlp_forward_saving`, the intermediates dropped)."""
    return mlp_forward_saving(x, w1a, w2a, bias1, w1b, w2b, bias2, n_out, activation)[0]


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def _r_chunk(PTR, c0, rows, rows_ok, j, R1, srow, sr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """The ``rows × BLOCK_K`` tile of columns ``c0 + j·BLOCK_K ..`` (``j·BLOCK_K + i < R1``) of a matrix at
    ``PTR``."""
    rk = j * BLOCK_K + tl.arange(0, BLOCK_K)
    return _load(_at(PTR, rows, c0 + rk, srow, sr), rows_ok[:, None] & (rk < R1)[None, :], UPCAST)


@triton.jit
def _dz1_store(DZ1, dz, rm, m_ok, ll, j, R1, L1, sdzt, sdzf, BLOCK_K: tl.constexpr):
    rr = j * BLOCK_K + tl.arange(0, BLOCK_K)  # dz1 element (ll, rr) is fc1's stage-1 column rr·l1 + ll (P1ᵀ)
    tl.store(_at(DZ1, rm, rr * L1 + ll, sdzt, sdzf), dz.to(DZ1.dtype.element_ty),
             mask=m_ok[:, None] & (rr < R1)[None, :])


@triton.jit
def _hidden_bwd_kernel(Z1, W2A, B1, W1B, DY2, A, DPRE, DZ1, DB1, T, ROWS, S, R1, Q2, L1, K2,
                       sz1t, sz1f, swa0, swa1, swa2, swb0, swb1, swb2, sdyt, sdyf, sat, saf, sdpt, sdpf,
                       sdzt, sdzf, sdb0,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_K: tl.constexpr, NR: tl.constexpr, STORE_A: tl.constexpr, STORE_DPRE: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (token tile, fc1 block ll), for every fc2 block kk and chunk of ``s'``: the pre-activation again
    (fc1's stage 2 of ``z1``, + bias), ``da = dy2_kk · w1b`` for those hidden columns, ``a = act(pre)`` and
    ``dpre = da · act'(pre)`` stored (token-major, natural hidden order; each only where ``STORE_A`` /
    ``STORE_DPRE``: a frozen factor's weight gradient does not read it) with the bias gradient's per-tile sums,
    and ``dz1_ll += dpre · w2a[ll, rows]`` in fp32 registers, stored through P1ᵀ (token-major, fc1's stage-1
    order). fc1's ``r1`` is ``NR ≤ 4`` column chunks of ``BLOCK_K``: the program's ``z1`` tile is loaded once
    (a register operand of every pre-activation dot), each chunk of ``w2a`` rows once and used by both dots
    that need it (transposed for the pre-activation, as is for ``dz1``), and ``dz1`` is ``NR`` accumulators, so
    nothing is padded beyond ``BLOCK_K``. ``W1B``: fc2's ``w1`` regrouped as in :func:`_hidden_kernel`. ``ROWS``:
    the token rows of the token-major tensors it touches (:func:`._common.touch_rows`); the bias gradient's sums
    take the ``T`` real ones."""
    ll = tl.program_id(1)
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < ROWS
    z_col = ll * R1  # the program's z1 columns: z_col .. z_col + R1 - 1
    W2A_LL = W2A + ll * swa0
    za = _r_chunk(Z1, z_col, rm, m_ok, 0, R1, sz1t, sz1f, BLOCK_K, UPCAST)
    dza = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if NR > 1:
        zb = _r_chunk(Z1, z_col, rm, m_ok, 1, R1, sz1t, sz1f, BLOCK_K, UPCAST)
        dzb = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if NR > 2:
        zc = _r_chunk(Z1, z_col, rm, m_ok, 2, R1, sz1t, sz1f, BLOCK_K, UPCAST)
        dzc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if NR > 3:
        zd = _r_chunk(Z1, z_col, rm, m_ok, 3, R1, sz1t, sz1f, BLOCK_K, UPCAST)
        dzd = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for kk in range(0, K2):
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            s_ok = rs < S
            rows = kk * S + rs
            wa = _r_chunk(W2A_LL, 0, rows, s_ok, 0, R1, swa1, swa2, BLOCK_K, UPCAST)
            pre = tl.dot(za, tl.trans(wa), input_precision=PRECISION)
            if NR > 1:
                wb = _r_chunk(W2A_LL, 0, rows, s_ok, 1, R1, swa1, swa2, BLOCK_K, UPCAST)
                pre = tl.dot(zb, tl.trans(wb), pre, input_precision=PRECISION)
            if NR > 2:
                wc = _r_chunk(W2A_LL, 0, rows, s_ok, 2, R1, swa1, swa2, BLOCK_K, UPCAST)
                pre = tl.dot(zc, tl.trans(wc), pre, input_precision=PRECISION)
            if NR > 3:
                wd = _r_chunk(W2A_LL, 0, rows, s_ok, 3, R1, swa1, swa2, BLOCK_K, UPCAST)
                pre = tl.dot(zd, tl.trans(wd), pre, input_precision=PRECISION)
            col = rows * L1 + ll
            if HAS_BIAS:
                pre += _load(B1 + col, s_ok, True)[None, :]
            da = _tile_dot(DY2, rm, m_ok, kk * Q2, Q2, sdyt, sdyf, W1B + kk * swb0 + ll * swb1, rs, s_ok, swb2, 1,
                           BLOCK_K, UPCAST, PRECISION)
            # the forward's rounding: the pre-activation to the dtype, then act in fp32 (blockdiag._finish)
            if STORE_A:
                act = _finish(pre, ACT, A.dtype.element_ty)
            dp = _activation_grad(pre.to(DZ1.dtype.element_ty).to(tl.float32), da, ACT).to(DZ1.dtype.element_ty)
            ok = m_ok[:, None] & s_ok[None, :]
            if STORE_A:
                tl.store(_at(A, rm, col, sat, saf), act, mask=ok)
            if STORE_DPRE:
                tl.store(_at(DPRE, rm, col, sdpt, sdpf), dp, mask=ok)
            if HAS_BIAS:
                real = (rm < T)[:, None] & s_ok[None, :]
                tl.store(DB1 + pid_m * sdb0 + col, tl.sum(tl.where(real, dp.to(tl.float32), 0.0), 0), mask=s_ok)
            if UPCAST:
                dp = dp.to(tl.float32)
            dza = tl.dot(dp, wa, dza, input_precision=PRECISION)
            if NR > 1:
                dzb = tl.dot(dp, wb, dzb, input_precision=PRECISION)
            if NR > 2:
                dzc = tl.dot(dp, wc, dzc, input_precision=PRECISION)
            if NR > 3:
                dzd = tl.dot(dp, wd, dzd, input_precision=PRECISION)
    _dz1_store(DZ1, dza, rm, m_ok, ll, 0, R1, L1, sdzt, sdzf, BLOCK_K)
    if NR > 1:
        _dz1_store(DZ1, dzb, rm, m_ok, ll, 1, R1, L1, sdzt, sdzf, BLOCK_K)
    if NR > 2:
        _dz1_store(DZ1, dzc, rm, m_ok, ll, 2, R1, L1, sdzt, sdzf, BLOCK_K)
    if NR > 3:
        _dz1_store(DZ1, dzd, rm, m_ok, ll, 3, R1, L1, sdzt, sdzf, BLOCK_K)


def hidden_layer_backward(z1, w2a, bias1, w1v, dy2, sh2: MonarchShape, activation: str, want_a: bool = True,
                          want_dpre: bool = True):
    """``(a | None, dpre | None, dz1, db1 | None)`` of the fused hidden layer for fc2's stage-1 gradient ``dy2
    (T, k2·q2)`` (token-major, stage-1 order): the activation ``a`` and ``dpre = (w1bᵀ dy2) · act'(pre)``, both
    ``(T, n_h)`` token-major in natural hidden order (what fc2's ``dw1`` and fc1's ``dw2`` read; each stored only
    if wanted: a frozen factor spares the ``T × n_h`` write), ``dz1 = BD(w2a)ᵀ P2ᵀ dpre`` token-major in fc1's
    stage-1 order ``(T, l1·r1)``, and ``db1 = Σ_t dpre`` (fp32 per-tile sums added up) with ``bias1``. The
    pre-activation is recomputed from ``z1`` (:func:`_hidden_bwd_kernel`); ``w1v``: fc2's ``w1`` regrouped
    (:func:`regroup`)."""
    T = z1.shape[0]
    l1, s1, r1 = w2a.shape
    S, n_h = sh2.p // l1, l1 * s1
    kw = dict(device=z1.device, dtype=z1.dtype)
    a = _common.empty_token_major(T, n_h, **kw) if want_a else None
    dpre = _common.empty_token_major(T, n_h, **kw) if want_dpre else None
    dz1 = _common.empty_token_major(T, l1 * r1, **kw)
    tile = _plan.MLP_BWD_TILE
    tiles = _plan.cdiv(T, tile.block_m)
    db1 = None if bias1 is None else _common.empty(tiles, n_h, device=z1.device, dtype=torch.float32)
    if T == 0:
        return a, dpre, dz1, None if bias1 is None else torch.zeros(n_h, device=z1.device, dtype=z1.dtype)
    # an output not stored is given dz1's pointer and zero strides (its stores are compiled out)
    a_, dpre_ = (dz1 if a is None else a), (dz1 if dpre is None else dpre)
    _hidden_bwd_kernel[(tiles, l1)](
        z1, w2a, bias1 if bias1 is not None else dz1, w1v, dy2, a_, dpre_, dz1, db1 if db1 is not None else dz1,
        T, min(_common.touch_rows(t) for t in (z1, dy2, a_, dpre_, dz1)), S, r1, sh2.q, l1, sh2.k,
        z1.stride(0), z1.stride(1), *w2a.stride(), *w1v.stride()[:3], dy2.stride(0), dy2.stride(1),
        *_strides(a), *_strides(dpre), dz1.stride(0), dz1.stride(1), 0 if db1 is None else db1.stride(0),
        HAS_BIAS=bias1 is not None, ACT=ACT_CODES[activation], BLOCK_M=tile.block_m,
        BLOCK_S=_plan.mlp_block_s(S, tile), BLOCK_K=tile.block_k, NR=_plan.mlp_r_chunks(r1), STORE_A=want_a,
        STORE_DPRE=want_dpre, UPCAST=interpreting(), PRECISION=precision(z1.dtype), num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return a, dpre, dz1, None if db1 is None else db1.sum(0).to(z1.dtype)


def _strides(t: Optional[torch.Tensor]) -> tuple:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def mlp_backward(x, g, w1a, w2a, bias1, w1b, w2b, z1, z2, w1v, activation: str, fc2_bias: bool,
                 want_dx: bool = True, want_dw: tuple = (True, True, True, True)):
    """First-order backward of :func:`mlp_forward_saving` (what it kept: ``z1, z2, w1v``) at ``g (T, n_out)``:
    ``(dx, dw1a, dw2a, db1, dw1b, dw2b, db2)``, ``None`` for what is not wanted (``dx`` without ``want_dx``, the
    factors' gradients where ``want_dw = (w1a, w2a, w1b, w2b)`` says so: a frozen parameter costs no GEMM),
    ``db1`` without ``bias1``, ``db2`` without ``fc2_bias``. fc2's stage 2 as in :func:`.monarch.backward`
    (``dy2``, ``dw2b``; ``db2`` summed by the token-major copy of ``g`` where those two read one); the hidden
    layer in one kernel (:func:`hidden_layer_backward`), then the two weight gradients on what it stored
    (cuBLAS batched GEMMs on token-major views: ``dw1b[kk] = dy2_kkᵀ a_kk``, ``dw2a[ll] = (P2ᵀ dpre)_llᵀ
    z1_ll``); fc1's stage 1 as in :func:`.monarch.backward`. The ``T × n_h`` hidden tensors exist only inside
    the backward."""
    from .monarch import _bmm_dw1, _bmm_dw2, _g_pick, input_grads, output_grads

    sh1 = MonarchShape.from_factors(w1a.shape, w2a.shape)
    sh2 = MonarchShape.from_factors(w1b.shape, w2b.shape)
    T, n_in, n_h = x.shape[0], x.shape[1], sh1.n_out
    want_w1a, want_w2a, want_w1b, want_w2b = want_dw
    if T == 0:
        zero = lambda t, want: torch.zeros_like(t) if want else None
        dx = _common.empty(0, n_in, device=x.device, dtype=x.dtype) if want_dx else None
        return (dx, zero(w1a, want_w1a), zero(w2a, want_w2a), None if bias1 is None else torch.zeros_like(bias1),
                zero(w1b, want_w1b), zero(w2b, want_w2b), g.sum(0) if fc2_bias else None)
    db2, layout = None, _g_pick(g, n_h, sh2, "none", fc2_bias)
    if fc2_bias:  # on the token-major copy of g, where fc2's readers take one (no separate pass over g)
        g, db2 = to_token_major(g, with_sum=True) if layout != "row_major" else (g, g.sum(0))
    dy2, dw2b = output_grads(g, z2, w2b, sh2, n_h, layout, want_dw2=want_w2b)
    a, dpre, dz1, db1 = hidden_layer_backward(z1, w2a, bias1, w1v, dy2, sh2, activation, want_a=want_w1b,
                                              want_dpre=want_w2a)
    dw1b = _bmm_dw1(dy2, a, sh2) if want_w1b else None
    dw2a = _bmm_dw2(z1, dpre, sh1) if want_w2a else None
    dx, dw1a = input_grads(dz1, x, w1a, sh1, n_in, n_h, want_dx=want_dx, want_dw1=want_w1a)
    return dx, dw1a, dw2a, db1, dw1b, dw2b, db2
