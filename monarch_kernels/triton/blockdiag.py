"""Triton block-diagonal matmul, forward (with fused bias/activation) and weight gradient.

Both kernels read and write through optional *view-transpose* permutations so that the Monarch
permutations P1, P2 (and their transposes in backward) are folded into loads and stores — no copy kernels.
A view-transpose with parameters ``(A, B)`` sends logical column ``f`` of a width-``A·B`` row to physical
column ``(f mod A)·B + ⌊f / A⌋`` (view the row as ``(B, A)``, transpose to ``(A, B)``, flatten).

Forward, logical shapes: ``x (T, k·p)``, ``w (k, q, p)``, ``y (T, k·q)``:

    y[t, kk·q + qq] = act( Σ_pp w[kk, qq, pp] · x[t, kk·p + pp] + bias[phys] )

Physical widths ``N_IN`` and ``N_OUT`` mask ragged sizes: a load from a physical column ≥ ``N_IN`` reads 0
(implicit zero padding), a store to a physical column ≥ ``N_OUT`` is dropped (truncation).

Weight gradient: ``dw[kk, qq, pp] = Σ_t g[t, kk·q + qq] · x[t, kk·p + pp]`` (both through optional gathers),
split over ``T`` into fp32 partials that the host sums (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import ACT_CODES, interpreting, pow2, precision, split_count


@triton.jit
def _view_transpose(f, A, B, ENABLED: tl.constexpr):
    if ENABLED:
        return (f % A) * B + f // A
    return f


@triton.jit
def _activation(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 3:
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        e = tl.exp(-2.0 * tl.abs(inner))  # tanh via exp(-2|u|) ≤ 1: no overflow
        th = (1.0 - e) / (1.0 + e)
        v = 0.5 * v * (1.0 + tl.where(inner >= 0, th, -th))
    return v


def _fwd_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bm, w, s in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (256, 8, 3))
    ]


@triton.autotune(configs=_fwd_configs(), key=["T_BUCKET", "Q", "P", "N_IN", "N_OUT", "IN_PERM", "OUT_PERM"])
@triton.jit
def _bd_fwd_kernel(
    X, W, BIAS, Y,
    T, N_IN, N_OUT, Q, P,
    stride_xt, stride_xf, stride_wk, stride_wq, stride_wp, stride_yt, stride_yf,
    IN_A, IN_B, OUT_A, OUT_B, T_BUCKET,
    IN_PERM: tl.constexpr, OUT_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)  # int64 row offsets: no 32-bit overflow on huge T·n
    kk = tl.program_id(1)
    pid_n = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < T
    n_ok = rn < Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        kidx = k0 + rk
        col = _view_transpose(kk * P + kidx, IN_A, IN_B, IN_PERM)
        a = tl.load(X + rm[:, None] * stride_xt + col[None, :] * stride_xf,
                    mask=m_ok[:, None] & (kidx[None, :] < P) & (col[None, :] < N_IN), other=0.0)
        b = tl.load(W + kk * stride_wk + rn[None, :] * stride_wq + kidx[:, None] * stride_wp,
                    mask=n_ok[None, :] & (kidx[:, None] < P), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    col_out = _view_transpose(kk * Q + rn, OUT_A, OUT_B, OUT_PERM)
    out_ok = n_ok & (col_out < N_OUT)
    if HAS_BIAS:
        acc += tl.load(BIAS + col_out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    tl.store(Y + rm[:, None] * stride_yt + col_out[None, :] * stride_yf, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & out_ok[None, :])


def blockdiag_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    n_out: Optional[int] = None,
    activation: str = "none",
    *,
    in_perm: Optional[tuple[int, int]] = None,
    out_perm: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """``x (T, N_IN)`` physical, ``w (k, q, p)`` any strides -> ``(T, n_out)``; see the module docstring."""
    T = x.shape[0]
    k, q, p = w.shape
    n_out = k * q if n_out is None else n_out
    y = _common.empty(T, n_out, device=x.device, dtype=x.dtype)
    if T == 0:
        return y
    ia, ib = in_perm or (1, 1)
    oa, ob = out_perm or (1, 1)
    block_n = min(pow2(q), 128)
    block_k = min(pow2(p), 64)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), k, triton.cdiv(q, block_n))
    _bd_fwd_kernel[grid](
        x, w, bias if bias is not None else y, y,
        T, x.shape[1], n_out, q, p,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        ia, ib, oa, ob, triton.next_power_of_2(T),
        IN_PERM=in_perm is not None, OUT_PERM=out_perm is not None, HAS_BIAS=bias is not None,
        ACT=ACT_CODES[activation], BLOCK_N=block_n, BLOCK_K=block_k,
        UPCAST=interpreting(), PRECISION=precision(x.dtype),
    )
    return y


def _wgrad_configs():
    if interpreting():
        return [triton.Config({"BLOCK_T": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bt, w, s in ((32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3))]


@triton.autotune(configs=_wgrad_configs(), key=["T_BUCKET", "Q", "P", "X_PERM", "G_PERM"])
@triton.jit
def _bd_wgrad_kernel(
    X, G, DW,
    T, N_X, N_G, Q, P, ROWS_PER_SPLIT,
    stride_xt, stride_xf, stride_gt, stride_gf, stride_ds, stride_dk, stride_dq, stride_dp,
    X_A, X_B, G_A, G_B, T_BUCKET,
    X_PERM: tl.constexpr, G_PERM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    tiles_p = tl.cdiv(P, BLOCK_P)
    kk = tile // (tiles_q * tiles_p)
    rem = tile % (tiles_q * tiles_p)
    rq = (rem // tiles_p) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rp = (rem % tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    gcol = _view_transpose(kk * Q + rq, G_A, G_B, G_PERM)
    xcol = _view_transpose(kk * P + rp, X_A, X_B, X_PERM)
    g_ok = (rq < Q) & (gcol < N_G)
    x_ok = (rp < P) & (xcol < N_X)
    t_start = split.to(tl.int64) * ROWS_PER_SPLIT
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for t0 in range(0, ROWS_PER_SPLIT, BLOCK_T):
        rt = t_start + t0 + tl.arange(0, BLOCK_T)
        t_ok = (rt < T) & (t0 + tl.arange(0, BLOCK_T) < ROWS_PER_SPLIT)
        gt = tl.load(G + rt[None, :] * stride_gt + gcol[:, None] * stride_gf,
                     mask=t_ok[None, :] & g_ok[:, None], other=0.0)  # (BLOCK_Q, BLOCK_T) = gᵀ
        xt = tl.load(X + rt[:, None] * stride_xt + xcol[None, :] * stride_xf,
                     mask=t_ok[:, None] & x_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_P)
        if UPCAST:
            gt = gt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(gt, xt, acc, input_precision=PRECISION)
    tl.store(DW + split * stride_ds + kk * stride_dk + rq[:, None] * stride_dq + rp[None, :] * stride_dp, acc,
             mask=(rq[:, None] < Q) & (rp[None, :] < P))


def blockdiag_weight_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    k: int,
    q: int,
    p: int,
    *,
    x_perm: Optional[tuple[int, int]] = None,
    g_perm: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """``dw (k, q, p)`` in ``x``'s dtype from ``x (T, N_X)`` and ``g (T, N_G)`` (physical widths)."""
    T = x.shape[0]
    if T == 0:
        return torch.zeros(k, q, p, device=x.device, dtype=x.dtype)
    block_q, block_p = min(pow2(q), 64), min(pow2(p), 64)
    tiles = k * triton.cdiv(q, block_q) * triton.cdiv(p, block_p)
    splits = split_count(T, tiles, x.device)
    rows = triton.cdiv(T, splits)
    partial = _common.empty(splits, k, q, p, device=x.device, dtype=torch.float32)
    xa, xb = x_perm or (1, 1)
    ga, gb = g_perm or (1, 1)
    _bd_wgrad_kernel[(tiles, splits)](
        x, g, partial,
        T, x.shape[1], g.shape[1], q, p, rows,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), *partial.stride(),
        xa, xb, ga, gb, triton.next_power_of_2(T),
        X_PERM=x_perm is not None, G_PERM=g_perm is not None, BLOCK_Q=block_q, BLOCK_P=block_p,
        UPCAST=interpreting(), PRECISION=precision(x.dtype),
    )
    return partial.sum(0).to(x.dtype)
