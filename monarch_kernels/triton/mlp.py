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
padded to 256), 16-byte loads and stores. :func:`fusable` says which pairs of layers it takes (:func:`.plan.mlp_fusable`).
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
from .blockdiag import _finish, _load, bd_forward


def fusable(sh1: MonarchShape, sh2: MonarchShape, n_in: int, n_hidden: int, dtype: torch.dtype) -> bool:
    """Whether :func:`mlp_forward` runs the fused hidden layer for fc1 ``sh1`` (input width ``n_in``) and fc2
    ``sh2`` with ``n_hidden`` hidden features (:func:`.plan.mlp_fusable`: fp16/bf16, no ragged widths, ``p2 % l1
    == 0``, ``q2 ≤ 256``)."""
    return dtype in (torch.float16, torch.bfloat16) and _plan.mlp_fusable(sh1, sh2, n_in, n_hidden, 2)


@triton.jit
def _hidden_kernel(Z1, W2A, B1, W1B, Z2, T, S, R1, Q2, L1, L2, R2,
                   sz1t, sz1f, swa0, swa1, swa2, swb0, swb1, swb2, sz2t, sz2f,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Program (token tile, fc2 block kk): fc1's stage 2 + bias + activation for the hidden rows fc2's block kk
    reads, chained into fc2's stage 1. ``W1B`` is fc2's ``w1`` regrouped ``(k2, l1, q2, S)``, element ``(kk, ll,
    qq, s')`` = ``w1b[kk, qq, s'·l1 + ll]`` with unit stride along ``s'`` (strides ``swb0, swb1, swb2``)."""
    kk = tl.program_id(1)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < T
    rq = tl.arange(0, BLOCK_Q)
    q_ok = rq < Q2
    acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
    for ll in range(0, L1):
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            s_ok = rs < S
            pre = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
            for k0 in range(0, R1, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < R1
                a = _load(Z1 + rm[:, None] * sz1t + (ll * R1 + rk)[None, :] * sz1f, m_ok[:, None] & k_ok[None, :],
                          UPCAST)
                b = _load(W2A + ll * swa0 + (kk * S + rs)[None, :] * swa1 + rk[:, None] * swa2,
                          s_ok[None, :] & k_ok[:, None], UPCAST)
                pre = tl.dot(a, b, pre, input_precision=PRECISION)
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
    tl.store(Z2 + rm[:, None] * sz2t + col[None, :] * sz2f, acc.to(Z2.dtype.element_ty),
             mask=m_ok[:, None] & q_ok[None, :])


def hidden_layer(z1: torch.Tensor, w2a: torch.Tensor, bias1: Optional[torch.Tensor], w1b: torch.Tensor,
                 sh2: MonarchShape, activation: str) -> torch.Tensor:
    """fc2's stage-1 output, token-major ``(T, k2·q2)`` in fc2's stage-2 order, from fc1's token-major stage-1
    output ``z1 (T, l1·r1)`` (stage-2 order) through fc1's stage 2, ``bias1``, ``activation`` and fc2's stage 1
    (module docstring); the hidden activation stays in registers. fc2's ``w1b`` is regrouped once per call (a
    copy of its ``k2·q2·p2`` elements) so that every weight load is a unit-stride run."""
    T = z1.shape[0]
    l1, _, r1 = w2a.shape
    S = sh2.p // l1
    z2 = _common.empty_token_major(T, sh2.n_mid, device=z1.device, dtype=z1.dtype)
    if T == 0:
        return z2
    tile = _plan.MLP_TILE
    # fc2's w1 regrouped so that each (kk, ll) slice is a (q2, S) matrix of unit-stride rows: one small copy
    w1v = w1b.reshape(sh2.k, sh2.q, S, l1).permute(0, 3, 1, 2).contiguous()
    grid = (triton.cdiv(T, tile.block_m), sh2.k)
    _hidden_kernel[grid](
        z1, w2a, bias1 if bias1 is not None else z2, w1v, z2, T, S, r1, sh2.q, l1, sh2.l, sh2.r,
        z1.stride(0), z1.stride(1), *w2a.stride(), *w1v.stride()[:3],
        z2.stride(0), z2.stride(1),
        HAS_BIAS=bias1 is not None, ACT=ACT_CODES[activation], BLOCK_M=tile.block_m, BLOCK_S=_plan.mlp_block_s(S),
        BLOCK_K=tile.block_k, BLOCK_Q=_plan.mlp_block_q(sh2.q), UPCAST=interpreting(), PRECISION=precision(z1.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return z2


def mlp_forward(x, w1a, w2a, bias1, w1b, w2b, bias2, n_out: int, activation: str = "gelu"):
    """``fc2(act(fc1(x)))`` for ``x (T, n_in)`` with the hidden layer fused (:func:`hidden_layer`); the caller
    checks :func:`fusable` first. Three launches and a transposing copy where the cost model stores fc2's output
    token-major first, as the two-kernel forward does."""
    from .monarch import stage2_forward

    sh1 = MonarchShape.from_factors(w1a.shape, w2a.shape)
    sh2 = MonarchShape.from_factors(w1b.shape, w2b.shape)
    z1 = _common.empty_token_major(x.shape[0], sh1.n_mid, device=x.device, dtype=x.dtype)
    bd_forward(x, w1a, out_perm=(sh1.l, sh1.r), out=z1)
    z2 = hidden_layer(z1, w2a, bias1, w1b, sh2, activation)
    return stage2_forward(z2, w2b, bias2, n_out, "none", sh2, n_in=sh1.n_out)
