"""Triton Monarch product ``out = act(P2 · BD(w2) · P1 · BD(w1) · x + bias)``: forward, dX and dW.

Layout (fly): ``x (T, k·p)``, ``w1 (k, q, p)``, ``w2 (l, s, r)``, ``l·r = k·q``; ``out[t, ss·l + ll]``.

Two paths:

* **fused** (design D2 of research/monarch.md §5.3), when every stage-1 block feeds every stage-2 block with
  the same rank ``c = q / l`` (``q mod l = 0``, the ``MonarchLinear`` layouts): stage-2 block ``ll`` reads
  ``z[t, ll, kk·c + jj] = Σ_pp w1[kk, jj·l + ll, pp] · x[t, kk·p + pp]``, so one program owning
  ``(BLOCK_M tokens, block ll, BLOCK_S outputs)`` runs a K-loop of back-to-back 2-D dots

      t_kk  = X[:, kk·p:(kk+1)·p] @ W1[kk, ll::l, :]ᵀ           (BLOCK_M × c, fp32, stays on chip)
      acc  += t_kk @ W2[ll, s-tile, kk·c:(kk+1)·c]ᵀ             (BLOCK_M × BLOCK_S)

  and stores ``acc`` straight to the permuted columns ``ss·l + ll``. HBM traffic is the minimum
  ``x + out`` (+ weights from L2); the intermediate never leaves the chip. The dX kernel is the mirror
  image, and the weight gradients are two split-T kernels that recompute ``t_kk`` instead of reading a
  saved intermediate.
* **two-kernel** (design D0), any shapes: the block-diagonal kernel of :mod:`.blockdiag` twice, with P1 and
  P2 folded into the first kernel's store and the second kernel's store (and into loads in backward).

``path="auto"`` takes the fused path when it applies and either the rank ``c`` fills a tensor-core tile
(≥ 16) or there are few tokens (≤ ``SMALL_T``: the small-batch inference regime, bound by weight bytes,
where one launch streaming each factor once beats two); tests force each path.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..shapes import MonarchShape
from . import _common
from ._common import ACT_CODES, interpreting, pow2, precision, split_count
from .blockdiag import _activation, blockdiag_forward, blockdiag_weight_grad

PATHS = ("auto", "fused", "two_kernel")


def fused_applies(sh: MonarchShape) -> bool:
    return sh.q % sh.l == 0


#: up to this many tokens the fused kernels are weight-bandwidth bound, so a rank c < 16 (padded to a
#: 16-wide tile) costs nothing that matters and one launch that streams each factor once wins
SMALL_T = 256


def choose_path(sh: MonarchShape, path: str, tokens: int = 0) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "fused" and not fused_applies(sh):
        raise ValueError(f"fused Monarch path needs q % l == 0, got w1 {sh.w1_shape}, w2 {sh.w2_shape}")
    if path == "auto":
        wide_rank = sh.q // sh.l >= 16 or tokens <= SMALL_T
        return "fused" if fused_applies(sh) and wide_rank else "two_kernel"
    return path


def _configs(name: str):
    if interpreting():
        return [triton.Config({name: 32}, num_warps=4)]
    return [triton.Config({name: bm}, num_warps=w, num_stages=s)
            for bm, w, s in ((32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 3), (16, 4, 4))]


# ------------------------------------------------------------------------------------------------ forward


@triton.autotune(configs=_configs("BLOCK_M"), key=["T_BUCKET", "K", "P", "L", "S", "C"])
@triton.jit
def _fused_fwd_kernel(
    X, W1, W2, BIAS, OUT,
    T, N_IN, N_OUT, K, P, L, S, C,
    stride_xt, stride_xf, s1k, s1q, s1p, s2l, s2s, s2r, stride_ot, stride_of, T_BUCKET,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    ll = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rc = tl.arange(0, BLOCK_C)
    rp = tl.arange(0, BLOCK_P)
    m_ok, s_ok, c_ok = rm < T, rs < S, rc < C
    acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for kk in range(0, K):
        t = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + rp
            col = kk * P + pp
            a = tl.load(X + rm[:, None] * stride_xt + col[None, :] * stride_xf,
                        mask=m_ok[:, None] & (pp[None, :] < P) & (col[None, :] < N_IN), other=0.0)
            # b[pp, jj] = w1[kk, jj·l + ll, pp]
            b = tl.load(W1 + kk * s1k + (rc[None, :] * L + ll) * s1q + pp[:, None] * s1p,
                        mask=c_ok[None, :] & (pp[:, None] < P), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            t = tl.dot(a, b, t, input_precision=PRECISION)
        # b2[jj, ss] = w2[ll, ss, kk·c + jj]
        b2 = tl.load(W2 + ll * s2l + rs[None, :] * s2s + (kk * C + rc[:, None]) * s2r,
                     mask=s_ok[None, :] & c_ok[:, None], other=0.0)
        if UPCAST:
            b2 = b2.to(tl.float32)
        acc = tl.dot(t.to(b2.dtype), b2, acc, input_precision=PRECISION)
    col_out = rs * L + ll
    out_ok = s_ok & (col_out < N_OUT)
    if HAS_BIAS:
        acc += tl.load(BIAS + col_out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    tl.store(OUT + rm[:, None] * stride_ot + col_out[None, :] * stride_of, acc.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & out_ok[None, :])


def _fused_forward(x, w1, w2, bias, n_out, activation, sh: MonarchShape):
    T = x.shape[0]
    out = _common.empty(T, n_out, device=x.device, dtype=x.dtype)
    if T == 0:
        return out
    c = sh.q // sh.l
    block_s = min(pow2(sh.s), 128)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), sh.l, triton.cdiv(sh.s, block_s))
    _fused_fwd_kernel[grid](
        x, w1, w2, bias if bias is not None else out, out,
        T, x.shape[1], n_out, sh.k, sh.p, sh.l, sh.s, c,
        x.stride(0), x.stride(1), *w1.stride(), *w2.stride(), out.stride(0), out.stride(1),
        triton.next_power_of_2(T),
        HAS_BIAS=bias is not None, ACT=ACT_CODES[activation],
        BLOCK_S=block_s, BLOCK_C=pow2(c), BLOCK_P=min(pow2(sh.p), 64),
        UPCAST=interpreting(), PRECISION=precision(x.dtype),
    )
    return out


def forward(x, w1, w2, bias=None, n_out=None, activation="none", *, path="auto"):
    """``act(M x + bias)`` for ``x (T, n_in)``; ``n_out ≤ l·s`` truncates."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    n_out = sh.n_out if n_out is None else n_out
    if choose_path(sh, path, x.shape[0]) == "fused":
        return _fused_forward(x, w1, w2, bias, n_out, activation, sh)
    # D0: stage 1 stores y[f] at z[(f mod l)·r + f div l] (P1), stage 2 stores o[f] at (f mod s)·l + f div s (P2)
    z = blockdiag_forward(x, w1, out_perm=(sh.l, sh.r))
    return blockdiag_forward(z, w2, bias, n_out, activation, out_perm=(sh.s, sh.l))


# ------------------------------------------------------------------------------------------------ backward dX


@triton.autotune(configs=_configs("BLOCK_M"), key=["T_BUCKET", "K", "P", "L", "S", "C"])
@triton.jit
def _fused_dx_kernel(
    G, W1, W2, DX,
    T, N_IN, N_OUT, K, P, L, S, C,
    stride_gt, stride_gf, s1k, s1q, s1p, s2l, s2s, s2r, stride_dt, stride_df, T_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # mirror of the forward: dx[:, kk·p + pp] = Σ_ll (G_ll @ W2[ll][:, kk·c:(kk+1)·c]) @ W1[kk, ll::l, :]
    pid_m = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1)
    pid_p = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rc = tl.arange(0, BLOCK_C)
    rs = tl.arange(0, BLOCK_S)
    m_ok, p_ok, c_ok = rm < T, rp < P, rc < C
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for ll in range(0, L):
        t = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + rs
            col = ss * L + ll  # gather through P2ᵀ
            a = tl.load(G + rm[:, None] * stride_gt + col[None, :] * stride_gf,
                        mask=m_ok[:, None] & (ss[None, :] < S) & (col[None, :] < N_OUT), other=0.0)
            b = tl.load(W2 + ll * s2l + ss[:, None] * s2s + (kk * C + rc[None, :]) * s2r,
                        mask=(ss[:, None] < S) & c_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            t = tl.dot(a, b, t, input_precision=PRECISION)
        b1 = tl.load(W1 + kk * s1k + (rc[:, None] * L + ll) * s1q + rp[None, :] * s1p,
                     mask=c_ok[:, None] & p_ok[None, :], other=0.0)
        if UPCAST:
            b1 = b1.to(tl.float32)
        acc = tl.dot(t.to(b1.dtype), b1, acc, input_precision=PRECISION)
    col_out = kk * P + rp
    tl.store(DX + rm[:, None] * stride_dt + col_out[None, :] * stride_df, acc.to(DX.dtype.element_ty),
             mask=m_ok[:, None] & p_ok[None, :] & (col_out[None, :] < N_IN))


def backward_input(g, w1, w2, n_in=None, *, path="auto"):
    """``Mᵀ g`` for ``g (T, n_out)``, truncated to ``n_in`` columns."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    n_in = sh.n_in if n_in is None else n_in
    T = g.shape[0]
    if choose_path(sh, path, T) == "two_kernel":
        # dz[ll, rr] = Σ_ss w2[ll, ss, rr] g[ss·l + ll] (gather P2ᵀ), stored at dy[rr·l + ll] (P1ᵀ)
        dy = blockdiag_forward(g, w2.transpose(1, 2), in_perm=(sh.s, sh.l), out_perm=(sh.r, sh.l))
        return blockdiag_forward(dy, w1.transpose(1, 2), None, n_in)
    dx = _common.empty(T, n_in, device=g.device, dtype=g.dtype)
    if T == 0:
        return dx
    c = sh.q // sh.l
    block_p = min(pow2(sh.p), 128)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), sh.k, triton.cdiv(sh.p, block_p))
    _fused_dx_kernel[grid](
        g, w1, w2, dx,
        T, n_in, g.shape[1], sh.k, sh.p, sh.l, sh.s, c,
        g.stride(0), g.stride(1), *w1.stride(), *w2.stride(), dx.stride(0), dx.stride(1),
        triton.next_power_of_2(T),
        BLOCK_S=min(pow2(sh.s), 64), BLOCK_C=pow2(c), BLOCK_P=block_p,
        UPCAST=interpreting(), PRECISION=precision(g.dtype),
    )
    return dx


# ------------------------------------------------------------------------------------------------ backward dW


def _wgrad_configs():
    if interpreting():
        return [triton.Config({"BLOCK_T": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bt, w, s in ((32, 4, 3), (64, 4, 3), (64, 8, 3))]


@triton.autotune(configs=_wgrad_configs(), key=["T_BUCKET", "K", "P", "L", "S", "C"])
@triton.jit
def _fused_dw2_kernel(
    X, G, W1, DW2,
    T, N_IN, N_OUT, K, P, L, S, C, ROWS_PER_SPLIT,
    stride_xt, stride_xf, stride_gt, stride_gf, s1k, s1q, s1p, sds, sdl, sds_, sdr, T_BUCKET,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # dw2[ll, ss, kk·c + jj] = Σ_t g[t, ss·l + ll] · z[t, ll, kk·c + jj], z recomputed from x and w1
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_s = tl.cdiv(S, BLOCK_S)
    ll = tile // (K * tiles_s)
    kk = (tile // tiles_s) % K
    rs = (tile % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    rc = tl.arange(0, BLOCK_C)
    rp = tl.arange(0, BLOCK_P)
    rt0 = tl.arange(0, BLOCK_T)
    s_ok, c_ok = rs < S, rc < C
    gcol = rs * L + ll
    g_ok = s_ok & (gcol < N_OUT)
    t_start = split.to(tl.int64) * ROWS_PER_SPLIT
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, ROWS_PER_SPLIT, BLOCK_T):
        rt = t_start + t0 + rt0
        t_ok = (rt < T) & (t0 + rt0 < ROWS_PER_SPLIT)
        z = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + rp
            col = kk * P + pp
            a = tl.load(X + rt[:, None] * stride_xt + col[None, :] * stride_xf,
                        mask=t_ok[:, None] & (pp[None, :] < P) & (col[None, :] < N_IN), other=0.0)
            b = tl.load(W1 + kk * s1k + (rc[None, :] * L + ll) * s1q + pp[:, None] * s1p,
                        mask=c_ok[None, :] & (pp[:, None] < P), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            z = tl.dot(a, b, z, input_precision=PRECISION)
        gt = tl.load(G + rt[None, :] * stride_gt + gcol[:, None] * stride_gf,
                     mask=t_ok[None, :] & g_ok[:, None], other=0.0)  # (BLOCK_S, BLOCK_T)
        if UPCAST:
            gt = gt.to(tl.float32)
        acc = tl.dot(gt, z.to(gt.dtype), acc, input_precision=PRECISION)
    tl.store(DW2 + split * sds + ll * sdl + rs[:, None] * sds_ + (kk * C + rc[None, :]) * sdr, acc,
             mask=s_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=_wgrad_configs(), key=["T_BUCKET", "K", "P", "L", "S", "C"])
@triton.jit
def _fused_dw1_kernel(
    X, G, W2, DW1,
    T, N_IN, N_OUT, K, P, L, S, C, ROWS_PER_SPLIT,
    stride_xt, stride_xf, stride_gt, stride_gf, s2l, s2s, s2r, sds, sdk, sdq, sdp, T_BUCKET,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # dw1[kk, jj·l + ll, pp] = Σ_t dz[t, ll, kk·c + jj] · x[t, kk·p + pp], dz = G_ll @ W2[ll] recomputed
    tile = tl.program_id(0)
    split = tl.program_id(1)
    tiles_p = tl.cdiv(P, BLOCK_P)
    ll = tile // (K * tiles_p)
    kk = (tile // tiles_p) % K
    rp = (tile % tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    rc = tl.arange(0, BLOCK_C)
    rs = tl.arange(0, BLOCK_S)
    rt0 = tl.arange(0, BLOCK_T)
    p_ok, c_ok = rp < P, rc < C
    xcol = kk * P + rp
    x_ok = p_ok & (xcol < N_IN)
    t_start = split.to(tl.int64) * ROWS_PER_SPLIT
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for t0 in range(0, ROWS_PER_SPLIT, BLOCK_T):
        rt = t_start + t0 + rt0
        t_ok = (rt < T) & (t0 + rt0 < ROWS_PER_SPLIT)
        dzt = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)  # dzᵀ
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + rs
            col = ss * L + ll
            gt = tl.load(G + rt[None, :] * stride_gt + col[:, None] * stride_gf,
                         mask=t_ok[None, :] & (ss[:, None] < S) & (col[:, None] < N_OUT), other=0.0)
            w = tl.load(W2 + ll * s2l + ss[None, :] * s2s + (kk * C + rc[:, None]) * s2r,
                        mask=(ss[None, :] < S) & c_ok[:, None], other=0.0)  # (BLOCK_C, BLOCK_S)
            if UPCAST:
                gt = gt.to(tl.float32)
                w = w.to(tl.float32)
            dzt = tl.dot(w, gt, dzt, input_precision=PRECISION)
        xt = tl.load(X + rt[:, None] * stride_xt + xcol[None, :] * stride_xf,
                     mask=t_ok[:, None] & x_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(dzt.to(xt.dtype), xt, acc, input_precision=PRECISION)
    tl.store(DW1 + split * sds + kk * sdk + (rc[:, None] * L + ll) * sdq + rp[None, :] * sdp, acc,
             mask=c_ok[:, None] & p_ok[None, :])


def backward_weight(x, g, w1, w2, *, path="auto"):
    """``(dw1, dw2)`` of ``⟨g, M x⟩`` for ``x (T, n_in)``, ``g (T, n_out)``; the intermediate is recomputed."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    T = x.shape[0]
    if choose_path(sh, path, T) == "two_kernel":
        z = blockdiag_forward(x, w1, out_perm=(sh.l, sh.r))  # recomputed stage-2 input, (T, l·r)
        dw2 = blockdiag_weight_grad(z, g, sh.l, sh.s, sh.r, g_perm=(sh.s, sh.l))
        dy = blockdiag_forward(g, w2.transpose(1, 2), in_perm=(sh.s, sh.l), out_perm=(sh.r, sh.l))
        dw1 = blockdiag_weight_grad(x, dy, sh.k, sh.q, sh.p)
        return dw1, dw2
    if T == 0:
        return torch.zeros_like(w1), torch.zeros_like(w2)
    c = sh.q // sh.l
    block_s, block_p, block_c = min(pow2(sh.s), 64), min(pow2(sh.p), 64), pow2(c)
    common = dict(UPCAST=interpreting(), PRECISION=precision(x.dtype), BLOCK_C=block_c)
    tiles2 = sh.l * sh.k * triton.cdiv(sh.s, block_s)
    splits2 = split_count(T, tiles2, x.device)
    part2 = _common.empty(splits2, *w2.shape, device=x.device, dtype=torch.float32)
    _fused_dw2_kernel[(tiles2, splits2)](
        x, g, w1, part2,
        T, x.shape[1], g.shape[1], sh.k, sh.p, sh.l, sh.s, c, triton.cdiv(T, splits2),
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), *w1.stride(), *part2.stride(),
        triton.next_power_of_2(T), BLOCK_S=block_s, BLOCK_P=block_p, **common,
    )
    tiles1 = sh.l * sh.k * triton.cdiv(sh.p, block_p)
    splits1 = split_count(T, tiles1, x.device)
    part1 = _common.empty(splits1, *w1.shape, device=x.device, dtype=torch.float32)
    _fused_dw1_kernel[(tiles1, splits1)](
        x, g, w2, part1,
        T, x.shape[1], g.shape[1], sh.k, sh.p, sh.l, sh.s, c, triton.cdiv(T, splits1),
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), *w2.stride(), *part1.stride(),
        triton.next_power_of_2(T), BLOCK_S=block_s, BLOCK_P=block_p, **common,
    )
    return part1.sum(0).to(w1.dtype), part2.sum(0).to(w2.dtype)
