"""Triton Monarch product ``out = act(P2 · BD(w2) · P1 · BD(w1) · x + bias)``: forward, dX, dW, fused backward.

Layout (fly): ``x (T, k·p)``, ``w1 (k, q, p)``, ``w2 (l, s, r)``, ``l·r = k·q``; ``out[t, ss·l + ll]``.

Forward paths (``path="auto"``: the fused one where it applies and the cost model predicts it faster, else the
two-kernel one, :func:`choose_path`):

* **fused** (square, rank ``c = q / l = 1``; research/monarch.md §5.3 design D2): a program owns a row tile and
  a group of 16 stage-2 blocks. Stage 1 computes only the outputs that group consumes (each exactly once, no
  recompute): ``k`` dots ``X_kk @ W1[kk, ll0:ll0+16]ᵀ``, interleaved by a ``tl.join`` tree; P1 is a register
  transpose (``tl.permute``, staged through shared memory by the compiler); a ``tl.split`` tree hands stage-2
  block ``ll`` its ``Z_ll``; the 16 stage-2 results are joined back so that column ``ss·16 + j`` is output
  column ``ss·l + ll0 + j``: P2 becomes 32-byte runs (whole rows when the group is every block). HBM traffic
  is ``x + out``: the intermediate never leaves the chip; ``x`` is re-read ``l / 16`` times, from L2. Applies
  while a row tile of the group's intermediate fits in registers (``k ≤ 64`` and power-of-two ``k, l ≥ 16``:
  1024 wide with 32 blocks, 256 with 16).
* **two_kernel** (design D0 with coalesced permutations), any shape: the block-diagonal kernel of
  :mod:`.blockdiag` twice, P1 folded into the first kernel's store and P2 (with bias and activation) into the
  second's. The intermediate is stored token-major (transposed, :func:`._common.empty_token_major`): the P1
  store writes every column as a run of the row tile's tokens, so stage 1 needs no block group (a 128-row
  tile, weights re-read half as often) and every sector is whole. Where the cost model predicts it faster
  (:func:`monarch_kernels.cost_model.stage2_store`) the second kernel stores token-major too, so P2 is a
  permutation of whole token runs, and one transposing copy (:func:`.token_major.copy_into`) writes the
  row-major output: two more passes over the output, but every kernel stores full sectors (measured on an
  H200, the grouped P2 store — 16-byte runs of 8 interleaved blocks — wasted half of each store sector and
  ran at 1.0-1.4 TB/s). Otherwise (a pre-activation kept for
  the backward, or chunks) the P2 store into the row-major output uses ≥ 16-byte runs of grouped blocks.
  With :data:`.plan.CHUNK_IN_L2` (off: measured slower) tokens go in chunks whose intermediate fits in a
  share of the L2 (:func:`.plan.chunk_tokens`), so the second kernel reads it back from L2 rather than HBM;
  stage 1 of each chunk runs in one launch with stage 2 of the previous chunk
  (:func:`.blockdiag.bd_forward_pair`, two intermediate buffers), and with several chunks that whole schedule
  is one launch (:func:`.blockdiag.bd_forward_chain`: programs take tickets and wait on per-chunk counters
  instead of launch boundaries, :data:`.plan.ONE_LAUNCH`).

Backward: ``backward`` (the backend's fused ``monarch_bwd``) computes ``dy = P1ᵀ BD(w2)ᵀ P2ᵀ g`` once (P2ᵀ as
grouped 16-byte gathers, P1ᵀ in a token-major store) and shares it between ``dx`` and ``dw1``, which one kernel
produces together (both read ``dy``; ``dw1`` reads ``x`` too) — or, where that kernel's whole-``q`` tile is
narrow and the cost model predicts two kernels faster, the block-diagonal and weight-gradient kernels — then
recomputes ``z = P1 BD(w1) x`` once for ``dw2 = Σ_t (P2ᵀ g)ᵀ z``. ``dy`` and ``dw2`` both read ``g`` through
P2ᵀ; where the cost model predicts it faster (few wide blocks: their grouped gathers keep interleaved fp32
accumulators that cap the tiles), ``g`` is first copied token-major (:mod:`.token_major`) and both take plain
tiles. On the token-major layouts every block GEMM of the backward is a plain strided batched GEMM, so where the
cost model predicts cuBLAS faster than the Triton tiles (few wide blocks, e.g. GPT-2's 4-block layers: cuBLAS
reads each operand once where the capped tiles re-read them from L2) ``dy``/``dw2`` and ``dx``/``dw1`` run as
``torch.bmm`` on strided views, no copies. ``backward_input`` alone is ``dy`` then the stage-1 transpose.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import activations
from ..shapes import MonarchShape
from . import _common
from . import plan as _plan
from ._common import ACT_CODES, interpreting, precision
from .blockdiag import _at, _finish, _load, bd_forward, bd_forward_chain, bd_forward_pair, bd_weight_grad
from .token_major import activation_grad_token_major, copy_into, to_token_major

PATHS = _plan.PATHS


def _dims(sh: MonarchShape) -> tuple:
    return sh.k, sh.q, sh.p, sh.l, sh.s, sh.r


def path_applies(sh: MonarchShape, path: str) -> bool:
    return path in ("auto", "two_kernel") or (path == "fused" and _plan.fused_applies(*_dims(sh)))


def choose_path(sh: MonarchShape, path: str = "auto", x=None, activation: str = "none") -> str:
    """``path`` validated; ``"auto"``: the two-kernel path, or the fused one where it applies and the cost model
    predicts it faster for ``x``'s token count and dtype (:func:`monarch_kernels.cost_model.triton_path`)."""
    chosen = _plan.choose_path(*_dims(sh), path=path)
    if path == "auto" and chosen == "fused" and x is not None:
        chosen = _model_choice("triton_path", x.shape[0], sh.n_in, sh.n_out, sh, x.dtype, activation)
    return chosen


def _idtype(dtype: torch.dtype):
    """Element type of an on-chip intermediate: the input dtype (fly rounds it the same way); fp32 in the
    interpreter, whose bf16 arithmetic is broken."""
    if interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


# ------------------------------------------------------------------------------------ fused square forward


@triton.jit
def _stage1_join(X, W1, KK, STEP, ll0, rm, m_ok, N_IN, P, sxt, sxf, s1k, s1q, s1p, G2: tl.constexpr,
                 G: tl.constexpr, BLOCK_P: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 IDTYPE: tl.constexpr):
    """``Y[t, j·G + g] = Σ_pp x[t, kk·p + pp] · w1[kk, ll0 + j, pp]`` for blocks ``kk = KK + g·STEP``: the
    stage-1 outputs that stage-2 blocks ``ll0 .. ll0+G2-1`` consume, interleaved by a ``tl.join`` tree."""
    if G == 1:
        pp = tl.arange(0, BLOCK_P)
        col = KK * P + pp
        a = _load(_at(X, rm, col, sxt, sxf), m_ok[:, None] & ((pp < P) & (col < N_IN))[None, :], UPCAST)
        b = _load(W1 + KK * s1k + (ll0 + tl.arange(0, G2))[None, :] * s1q + pp[:, None] * s1p, (pp < P)[:, None],
                  UPCAST)
        return tl.dot(a, b, input_precision=PRECISION).to(IDTYPE)
    else:
        even = _stage1_join(X, W1, KK, STEP * 2, ll0, rm, m_ok, N_IN, P, sxt, sxf, s1k, s1q, s1p, G2, G // 2, BLOCK_P,
                            UPCAST, PRECISION, IDTYPE)
        odd = _stage1_join(X, W1, KK + STEP, STEP * 2, ll0, rm, m_ok, N_IN, P, sxt, sxf, s1k, s1q, s1p, G2, G // 2,
                           BLOCK_P, UPCAST, PRECISION, IDTYPE)
        return tl.reshape(tl.join(even, odd), (rm.shape[0], G2 * G))


@triton.jit
def _stage2_split(z, W2, BIAS, LL, STEP, rs, N_OUT, S, s2l, s2s, s2r, L: tl.constexpr, K: tl.constexpr,
                  G: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr, ODTYPE: tl.constexpr):
    """Stage 2 of blocks ``LL + g·STEP`` from ``z (BLOCK_M, K·G)`` (column ``kk·G + g`` = ``Z_(LL+g·STEP)[:, kk]``,
    taken apart with ``tl.split``); epilogue applied; result column ``ss·G + g`` (``tl.join``)."""
    if G == 1:
        kk = tl.arange(0, K)
        b = _load(W2 + LL * s2l + rs[None, :] * s2s + kk[:, None] * s2r, (rs < S)[None, :], UPCAST)
        o = tl.dot(z, b, input_precision=PRECISION)
        if HAS_BIAS:
            col = rs * L + LL
            o += _load(BIAS + col, (rs < S) & (col < N_OUT), True)[None, :]
        return _finish(o, ACT, ODTYPE)
    else:
        even, odd = tl.split(tl.reshape(z, (z.shape[0], z.shape[1] // 2, 2)))
        re = _stage2_split(even, W2, BIAS, LL, STEP * 2, rs, N_OUT, S, s2l, s2s, s2r, L, K, G // 2, HAS_BIAS, ACT,
                           UPCAST, PRECISION, ODTYPE)
        ro = _stage2_split(odd, W2, BIAS, LL + STEP, STEP * 2, rs, N_OUT, S, s2l, s2s, s2r, L, K, G // 2, HAS_BIAS,
                           ACT, UPCAST, PRECISION, ODTYPE)
        return tl.reshape(tl.join(re, ro), (re.shape[0], re.shape[1] * 2))


@triton.jit
def _fused_fwd_kernel(
    X, W1, W2, BIAS, OUT, Z,
    T, T_Z, N_IN, N_OUT, P, S,
    sxt, sxf, s1k, s1q, s1p, s2l, s2s, s2r, sot, sof, szt, szf,
    K: tl.constexpr, L: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    KEEP_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, IDTYPE: tl.constexpr,
):
    # program: a row tile and stage-2 blocks ll0 .. ll0+GROUP-1 (design D2: each stage-1 output is computed
    # by exactly one program; x is read L/GROUP times, from L2 after the first). The kept Z is stored up to T_Z
    # rows (_common.touch_rows: a padding row of Z takes what the zero-filled rows of X give)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ll0 = tl.program_id(1) * GROUP
    m_ok = rm < T
    y = _stage1_join(X, W1, 0, 1, ll0, rm, m_ok, N_IN, P, sxt, sxf, s1k, s1q, s1p, GROUP, K, BLOCK_P, UPCAST,
                     PRECISION, IDTYPE)
    if KEEP_Z:  # Y[t, j·K + kk] is the two-kernel intermediate's column (ll0 + j)·K + kk: one contiguous range
        zc = ll0 * K + tl.arange(0, GROUP * K)
        tl.store(_at(Z, rm, zc, szt, szf), y, mask=(rm < T_Z)[:, None])
    # P1 on chip: Y[t, j·K + kk] -> Z[t, kk·GROUP + j], so that the split tree over the last index gives Z_ll
    z = tl.reshape(tl.permute(tl.reshape(y, (BLOCK_M, GROUP, K)), (0, 2, 1)), (BLOCK_M, K * GROUP))
    o = _stage2_split(z, W2, BIAS, ll0, 1, tl.arange(0, BLOCK_S), N_OUT, S, s2l, s2s, s2r, L, K, GROUP, HAS_BIAS,
                      ACT, UPCAST, PRECISION, OUT.dtype.element_ty)
    # P2 in the store: result column ss·GROUP + j is output column ss·L + ll0 + j (runs of GROUP elements)
    idx = tl.arange(0, BLOCK_S * GROUP)
    if GROUP == L:
        col = idx
    else:
        col = (idx // GROUP) * L + ll0 + idx % GROUP
    tl.store(_at(OUT, rm, col, sot, sof), o,
             mask=m_ok[:, None] & ((idx // GROUP < S) & (col < N_OUT))[None, :])


def _fused_forward(x, w1, w2, bias, n_out, activation, sh: MonarchShape, out, z=None):
    """The fused square forward into ``out``; with ``z`` (a token-major ``(T, l·r)`` buffer) each program also
    stores the stage-1 outputs it computed there: the two-kernel path's intermediate, for the backward."""
    T = x.shape[0]
    grid, options = _fused_plan(T, sh, x.dtype, activation, bias is not None, z is not None)
    zb = out if z is None else z
    _fused_fwd_kernel[grid](
        x, w1, w2, bias if bias is not None else out, out, zb,
        T, T if z is None else _common.touch_rows(z), x.shape[1], n_out, sh.p, sh.s,
        x.stride(0), x.stride(1), *w1.stride(), *w2.stride(), out.stride(0), out.stride(1), zb.stride(0),
        zb.stride(1), **options,
    )
    return out


@_plan.memo
def _fused_plan(T: int, sh: MonarchShape, dtype: torch.dtype, activation: str, has_bias: bool, keep: bool) -> tuple:
    """``(grid, compile-time arguments and launch options)`` of :func:`_fused_fwd_kernel` (memoised, as
    :func:`_dxw_plan`; the options are shared: unpack, do not modify)."""
    tile = _plan.fused_tile(T, sh.k, sh.l)
    return (_plan.cdiv(T, tile.block_m), sh.l // tile.group), dict(
        K=sh.k, L=sh.l, HAS_BIAS=has_bias, ACT=ACT_CODES[activation], KEEP_Z=keep,
        BLOCK_P=_plan.pow2(sh.p), BLOCK_S=_plan.pow2(sh.s),
        UPCAST=interpreting(), PRECISION=precision(dtype), IDTYPE=_idtype(dtype),
        **_common.launch_meta(tile, ("BLOCK_M", "GROUP")))


def _two_kernel_forward(x, w1, w2, bias, n_out, activation, sh: MonarchShape, out, keep: bool = False):
    """``(out, z | None, pre | None)``: with ``keep``, the whole token-major intermediate ``z`` and, with an
    activation, the pre-activation (stage 2 stores it beside the output); else one chunk's buffer is reused
    and nothing is kept. Stage 2's store: :data:`.plan.STAGE2_STORES`, the cost model's pick."""
    T = x.shape[0]
    chunk = _plan.forward_chunk(T, sh.n_mid, x.element_size(), _common.device_info(x.device).l2_bytes)
    pre = _common.empty(T, n_out, device=x.device, dtype=x.dtype) if keep and activation != "none" else None
    stage2 = dict(w=w2, bias=bias, n_out=n_out, activation=activation, out_perm=(sh.s, sh.l))
    if chunk >= T:
        # stage 1, P1 in the store (y[f] lands at z[(f mod l)·r + f div l], token-major runs of tokens), then
        # stage 2 and the epilogue, P2 in the store (o[f] lands at out[(f mod s)·l + f div s])
        z = _common.empty_token_major(T, sh.n_mid, device=x.device, dtype=x.dtype)
        bd_forward(x, w1, out_perm=(sh.l, sh.r), out=z)
        question = "stage2_store_saving" if keep else "stage2_store"
        if (len(_plan.stage2_stores(chunk, T, pre is not None)) > 1
                and _model_choice(question, T, x.shape[1], n_out, sh, x.dtype, activation) == "token_major"):
            # P2 as a permutation of token runs, then one transposing pass into the row-major output
            yt = _common.empty_token_major(T, n_out, device=x.device, dtype=x.dtype)
            copy_into(bd_forward(z, **stage2, out=yt), out)
        else:
            bd_forward(z, **stage2, out=out, pre_out=pre)
        return out, (z if keep else None), pre
    return _chunked_forward(x, w1, stage2, sh, out, pre, chunk, keep)


def _chunked_forward(x, w1, stage2: dict, sh: MonarchShape, out, pre, chunk: int, keep: bool):
    """:func:`_two_kernel_forward` over token chunks of ``chunk`` rows (:data:`.plan.CHUNK_IN_L2`): the grouped P2
    store, stage 1 of one chunk beside stage 2 of the previous (:data:`.plan.PAIR_STAGES`; as one launch with
    :data:`.plan.ONE_LAUNCH`) or one chunk after another."""
    T = x.shape[0]
    pair = _plan.PAIR_STAGES
    buffers = 1 if keep else (2 if pair else 1)
    z = _common.empty_token_major(T if keep else buffers * chunk, sh.n_mid, device=x.device, dtype=x.dtype)
    # a kept z's chunks (and the buffers) start at multiples of the 128-row tile: every column stays 16-byte
    # aligned
    starts = range(0, T, chunk)

    def stage1(i):
        t0, t1 = starts[i], min(T, starts[i] + chunk)
        zc = z[t0:t1] if keep else z[(i % buffers) * chunk:][: t1 - t0]
        return dict(x=x[t0:t1], w=w1, out_perm=(sh.l, sh.r), out=zc)

    def stage2_of(i, zc):
        t0, t1 = starts[i], min(T, starts[i] + chunk)
        return dict(x=zc, **stage2, out=out[t0:t1], pre_out=None if pre is None else pre[t0:t1])

    if not pair:
        for i in range(len(starts)):
            bd_forward(**stage2_of(i, bd_forward(**stage1(i))))
    elif _plan.ONE_LAUNCH:  # the paired schedule below as one launch, its steps ordered by in-kernel waits
        bd_forward_chain(dict(x=x, w=w1, out_perm=(sh.l, sh.r), out=z), dict(x=z, **stage2, out=out, pre_out=pre),
                         chunk=chunk, buffers=len(starts) if keep else buffers)
    else:  # paired: launch i runs stage 1 of chunk i beside stage 2 of chunk i - 1 (two buffers in L2)
        zc = bd_forward(**stage1(0))
        for i in range(1, len(starts)):
            zc, _ = bd_forward_pair(stage1(i), stage2_of(i - 1, zc))
        bd_forward(**stage2_of(len(starts) - 1, zc))
    return out, (z if keep else None), pre


def stage2_forward(z, w2, bias, n_out: int, activation: str, sh: MonarchShape, n_in: Optional[int] = None):
    """``act(P2 BD(w2) z + bias)`` from a whole token-major intermediate ``z (T, l·r)`` into a fresh row-major
    ``(T, n_out)``: the grouped P2 store, or (where the cost model picks it, as in :func:`_two_kernel_forward`)
    a token-major store and one transposing copy. ``n_in``: the layer's input width the model prices
    (default ``k·p``)."""
    T = z.shape[0]
    out = _common.empty(T, n_out, device=z.device, dtype=z.dtype)
    call = dict(bias=bias, n_out=n_out, activation=activation, out_perm=(sh.s, sh.l))
    if T > 0 and _model_choice("stage2_store", T, sh.n_in if n_in is None else n_in, n_out, sh, z.dtype,
                               activation) == "token_major":
        yt = _common.empty_token_major(T, n_out, device=z.device, dtype=z.dtype)
        copy_into(bd_forward(z, w2, out=yt, **call), out)
        return out
    return bd_forward(z, w2, out=out, **call)


def forward_saving(x, w1, w2, bias=None, n_out=None, activation="none", *, path="auto"):
    """``(out, z, pre)``: :func:`forward` that also keeps the stage-1 intermediate ``z`` (token-major
    ``(T, l·r)``: ``T·k·q`` elements; the fused square path stores the part each program computed) and, on the
    two-kernel path with an activation, the pre-activation ``(T, n_out)`` (stored by stage 2 beside the output:
    an L2-bound kernel's extra write) for :func:`backward_epilogue`, which then recomputes nothing (the fused
    path's pre-activation: stage 2 of ``z``); ``(out, None, None)`` for no tokens."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    n_out = sh.n_out if n_out is None else n_out
    out = _common.empty(x.shape[0], n_out, device=x.device, dtype=x.dtype)
    chosen = choose_path(sh, path, x, activation)
    if x.shape[0] == 0:
        return out, None, None
    if chosen == "fused":
        z = _common.empty_token_major(x.shape[0], sh.n_mid, device=x.device, dtype=x.dtype)
        return _fused_forward(x, w1, w2, bias, n_out, activation, sh, out, z), z, None
    return _two_kernel_forward(x, w1, w2, bias, n_out, activation, sh, out, keep=True)


def forward(x, w1, w2, bias=None, n_out=None, activation="none", *, path="auto"):
    """``act(M x + bias)`` for ``x (T, n_in)``; ``n_out ≤ l·s`` truncates."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    n_out = sh.n_out if n_out is None else n_out
    out = _common.empty(x.shape[0], n_out, device=x.device, dtype=x.dtype)
    chosen = choose_path(sh, path, x, activation)
    if x.shape[0] == 0:
        return out
    if chosen == "fused":
        return _fused_forward(x, w1, w2, bias, n_out, activation, sh, out)
    return _two_kernel_forward(x, w1, w2, bias, n_out, activation, sh, out)[0]


def backward_input(g, w1, w2, n_in=None, *, path="auto"):
    """``Mᵀ g`` for ``g (T, n_out)``, truncated to ``n_in`` columns: ``dy`` (P2ᵀ gathered, P1ᵀ scattered, both
    grouped) then the stage-1 transpose. Every path runs these kernels (``path`` is validated)."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    n_in = sh.n_in if n_in is None else n_in
    choose_path(sh, path)
    return bd_forward(_dy(g, w2, sh), w1.transpose(1, 2), None, n_in)


# ------------------------------------------------------------------------------------------------ backward


def _dy(g, w2, sh: MonarchShape):
    """``dy = P1ᵀ BD(w2)ᵀ P2ᵀ g`` in stage-1 layout ``(T, k·q)``, stored token-major: P2ᵀ as grouped gathers,
    P1ᵀ in the store as runs of tokens."""
    dy = _common.empty_token_major(g.shape[0], sh.k * sh.q, device=g.device, dtype=g.dtype)
    return bd_forward(g, w2.transpose(1, 2), in_perm=(sh.s, sh.l), out_perm=(sh.r, sh.l), out=dy)


def _z(x, w1, sh: MonarchShape):
    """``z = P1 BD(w1) x`` in stage-2 layout ``(T, l·r)``, stored token-major, recomputed instead of saved."""
    z = _common.empty_token_major(x.shape[0], sh.n_mid, device=x.device, dtype=x.dtype)
    return bd_forward(x, w1, out_perm=(sh.l, sh.r), out=z)


def _dw2(z, g, sh: MonarchShape):
    return bd_weight_grad(z, g, sh.l, sh.s, sh.r, g_perm=(sh.s, sh.l))


# The backward's block GEMMs as cuBLAS batched GEMMs (torch.bmm) where every operand is a strided view with a unit
# stride in one of its two matrix dimensions (no copy): g and dy token-major, z token-major, x and dx row-major.
# Block ll of P2ᵀ g is g[:, ss·l + ll] (ss = 0..s-1); dz[ll, rr] lands at dy column rr·l + ll (P1ᵀ); block kk of
# dy / x / dx is columns kk·q.. / kk·p.. of the natural order.


def _bmm_dy(g, w2, sh: MonarchShape):
    """``dy = P1ᵀ BD(w2)ᵀ P2ᵀ g`` from a token-major ``g (T, l·s)``, into a token-major ``dy (T, k·q)``."""
    dy = _common.empty_token_major(g.shape[0], sh.k * sh.q, device=g.device, dtype=g.dtype)
    torch.bmm(g.unflatten(1, (sh.s, sh.l)).permute(2, 0, 1), w2, out=dy.unflatten(1, (sh.r, sh.l)).permute(2, 0, 1))
    return dy


def _bmm_dw2(z, g, sh: MonarchShape):
    """``dw2[ll] = (P2ᵀ g)_llᵀ z_ll`` from a token-major ``g (T, l·s)`` and the stage-2-ordered ``z (T, l·r)``."""
    return torch.bmm(g.unflatten(1, (sh.s, sh.l)).permute(2, 1, 0), z.unflatten(1, (sh.l, sh.r)).permute(1, 0, 2))


def _bmm_dw1(dy, x, sh: MonarchShape):
    """``dw1[kk] = dy_kkᵀ x_kk`` from a token-major ``dy (T, k·q)`` and ``x (T, k·p)`` of any strides."""
    return torch.bmm(dy.unflatten(1, (sh.k, sh.q)).permute(1, 2, 0), x.unflatten(1, (sh.k, sh.p)).permute(1, 0, 2))


def _bmm_dxw(dy, x, w1, sh: MonarchShape):
    """``(dx, dw1)``: ``dx_kk = dy_kk W1[kk]`` into a row-major ``(T, k·p)`` and ``dw1[kk] = dy_kkᵀ x_kk``."""
    dx = _common.empty(x.shape[0], sh.k * sh.p, device=x.device, dtype=x.dtype)
    torch.bmm(dy.unflatten(1, (sh.k, sh.q)).permute(1, 0, 2), w1, out=dx.unflatten(1, (sh.k, sh.p)).permute(1, 0, 2))
    return dx, _bmm_dw1(dy, x, sh)


def backward_weight(x, g, w1, w2, *, path="auto", g_layout="auto", z=None):
    """``(dw1, dw2)`` of ``⟨g, M x⟩`` for ``x (T, n_in)``, ``g (T, n_out)``; the intermediate is ``z`` (from
    :func:`forward_saving` or :func:`_z`) or recomputed. Every path runs the same grouped kernels (``path`` is
    validated for symmetry with the other calls); ``g_layout`` as in :func:`backward`."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    choose_path(sh, path)
    g, how = _g_for_readers(g, x.shape[1], sh, g_layout)
    if x.shape[0] == 0:
        return torch.zeros_like(w1), torch.zeros_like(w2)
    z = _z(x, w1, sh) if z is None else z
    if how == "bmm":
        return bd_weight_grad(x, _bmm_dy(g, w2, sh), sh.k, sh.q, sh.p), _bmm_dw2(z, g, sh)
    return bd_weight_grad(x, _dy(g, w2, sh), sh.k, sh.q, sh.p), _dw2(z, g, sh)


@triton.jit
def _dxw_step(DY, X, DX, w, acc, rt, t_ok, kk, rq, col, x_ok, Q, syt, syf, sxt, sxf, sdt, sdf, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    """One token tile ``rt`` (``t_ok``: its real tokens) of :func:`_dxw_kernel`: ``dx`` stored, ``dw1``'s
    accumulator returned."""
    dy = _load(_at(DY, rt, kk * Q + rq, syt, syf), t_ok[:, None] & (rq < Q)[None, :], UPCAST)
    xt = _load(_at(X, rt, col, sxt, sxf), t_ok[:, None] & x_ok[None, :], UPCAST)
    dx = tl.dot(dy, w, input_precision=PRECISION)
    tl.store(_at(DX, rt, col, sdt, sdf), dx.to(DX.dtype.element_ty), mask=t_ok[:, None] & x_ok[None, :])
    return tl.dot(tl.trans(dy), xt, acc, input_precision=PRECISION)


@triton.jit
def _dxw_kernel(
    DY, X, W1, DX, DW1,
    T, N_IN, Q, P, ROWS_PER_SPLIT,
    syt, syf, sxt, sxf, s1k, s1q, s1p, sdt, sdf, sws, swk, swq, swp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # program: block kk, p-tile of width BLOCK_N, one token split. Per token tile it reads dy_kk (all q) and
    # x_kk once and uses them twice: dx_kk = dy_kk @ W1[kk] (stored) and dw1[kk] += dy_kkᵀ x_kk (accumulated).
    # Whole token tiles without a token mask, then the split's ragged last tile, if any (as _bd_wgrad_kernel)
    tiles_p = tl.cdiv(P, BLOCK_N)
    kk = tl.program_id(0) // tiles_p
    rp = (tl.program_id(0) % tiles_p) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rq = tl.arange(0, BLOCK_K)
    col = kk * P + rp
    x_ok = (rp < P) & (col < N_IN)
    w = _load(W1 + kk * s1k + rq[:, None] * s1q + rp[None, :] * s1p, (rq < Q)[:, None] & (rp < P)[None, :], UPCAST)
    t_start = split.to(tl.int64) * ROWS_PER_SPLIT
    rows = tl.minimum(ROWS_PER_SPLIT, T - t_start)  # splits are whole token steps: only the last is ragged
    whole = rows - rows % BLOCK_M
    rt0 = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, whole, BLOCK_M):
        acc = _dxw_step(DY, X, DX, w, acc, t_start + t0 + rt0, tl.full((BLOCK_M,), 1, tl.int1), kk, rq, col, x_ok,
                        Q, syt, syf, sxt, sxf, sdt, sdf, UPCAST, PRECISION)
    for t0 in range(whole, rows, BLOCK_M):  # at most one tile (a loop: as an `if`, fp32 spilled 3x as much)
        rt = t_start + t0 + rt0
        acc = _dxw_step(DY, X, DX, w, acc, rt, rt < T, kk, rq, col, x_ok, Q, syt, syf, sxt, sxf, sdt, sdf, UPCAST,
                        PRECISION)
    tl.store(DW1 + split * sws + kk * swk + rq[:, None] * swq + rp[None, :] * swp, acc,
             mask=(rq < Q)[:, None] & (rp < P)[None, :])


DXW = ("auto", "fused", "separate", "bmm")
G_LAYOUTS = ("auto", "row_major", "token_major", "bmm")
_G_READERS = {"row_major": "grouped", "token_major": "token_major", "bmm": "bmm"}
_G_LAYOUT_OF = {how: layout for layout, how in _G_READERS.items()}


def _model_choice(question: str, T: int, n_in: int, n_out: int, sh: MonarchShape, dtype: torch.dtype,
                  activation: str = "none", bias: bool = False) -> str:
    """The cost model's pick (``"dxw_choice"``: :func:`monarch_kernels.cost_model.dxw_choice`; ``"g_readers"``:
    :func:`monarch_kernels.cost_model.g_readers`, for a ``g`` that comes from ``activation``'s derivative unless
    ``"none"``, of a layer with a ``bias`` gradient to compute or not; ``"stage2_store"`` /
    ``"stage2_store_saving"``: :func:`monarch_kernels.cost_model.stage2_store` without / with the intermediate
    kept) for this call's shape and dtype, at the GPU's constants (:func:`monarch_kernels.cost_model.device_for`;
    about 0.1 ms of arithmetic, so remembered per shape)."""
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    return _model_choice_cached(question, max(T, 1), n_in, n_out, sh, name, activation, bias)


@functools.lru_cache(maxsize=1024)
def _model_choice_cached(question: str, T: int, n_in: int, n_out: int, sh: MonarchShape, dtype: str,
                         activation: str, bias: bool) -> str:
    from .. import cost_model as cm  # imported here: cost_model imports this package's plan module

    problem = cm.Problem(T, n_in, n_out, sh, activation, bias)
    # the device's constants (the H200's measured ones where that is the GPU); H100 ones in the interpreter
    dev = cm.device_for(torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    if question.startswith("stage2_store"):
        return cm.stage2_store(problem, dtype, dev, keep=question.endswith("_saving"))
    if question == "g_readers":
        return cm.g_readers(problem, dtype, dev, arrives_token_major=activation != "none")
    return getattr(cm, question)(problem, dtype, dev)


def _check_bmm(what: str, width: int, blocks: int, name: str) -> None:
    if width != blocks:
        raise ValueError(f"{what}='bmm' needs whole blocks: {name} = {width} columns, the factors need {blocks}")


def _g_for_readers(g, n_in: int, sh: MonarchShape, g_layout: str):
    """``(g, how)``: ``g`` as ``dy`` and ``dw2`` read it and how they read it (:data:`.cost_model.G_READERS`):
    ``"grouped"`` gathers of ``g`` as given, or ``"token_major"`` / ``"bmm"`` (Triton tiles / cuBLAS) on a
    token-major copy (:func:`.token_major.to_token_major`); ``g_layout="auto"`` takes the cost model's pick."""
    if g_layout not in G_LAYOUTS:
        raise ValueError(f"g_layout must be one of {G_LAYOUTS}, got {g_layout!r}")
    if g_layout == "auto":
        how = (_model_choice("g_readers", g.shape[0], n_in, g.shape[1], sh, g.dtype) if g.shape[0] > 0
               else "grouped")
    else:
        how = _G_READERS[g_layout]
        if how == "bmm":
            _check_bmm("g_layout", g.shape[1], sh.l * sh.s, "g")
    return (g if how == "grouped" else to_token_major(g)), how


def _g_pick(g, n_in: int, sh: MonarchShape, activation: str, bias: bool) -> str:
    """The ``g_layout`` under which ``dy`` and ``dw2`` read ``g (T > 0, n_out)`` in a layer's backward: the cost
    model's pick for ``g`` from ``activation``'s derivative (``"none"``: as given), with the ``bias`` gradient
    priced where each option computes it. The caller makes the token-major ``g`` a non-grouped pick wants and
    passes the result as ``g_layout`` to :func:`backward` (whose ``"auto"`` knows neither)."""
    how = _model_choice("g_readers", g.shape[0], n_in, g.shape[1], sh, g.dtype, activation, bias)
    return _G_LAYOUT_OF[how]


def backward(x, g, w1, w2, n_in=None, *, path="auto", dxw="auto", g_layout="auto", z=None):
    """``(dx, dw1, dw2)`` in one call: ``dy`` computed once (token-major) and shared by ``dx`` and ``dw1`` —
    one kernel for both (``dxw="fused"``), the block-diagonal and weight-gradient kernels with their own tiles
    (``"separate"``) or two cuBLAS batched GEMMs on strided views (``"bmm"``; needs ``n_in = k·p``); ``"auto"``:
    the cost model's pick — and the intermediate ``z`` (from :func:`forward_saving`) or, without it,
    recomputed once for ``dw2``. ``g`` is read through P2ᵀ by ``dy`` and ``dw2``: as given (``g_layout=
    "row_major"``: grouped gathers), or copied token-major first and read by Triton tiles (``"token_major"``)
    or cuBLAS (``"bmm"``; needs ``n_out = l·s``); ``"auto"``: the cost model's pick."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    n_in = sh.n_in if n_in is None else n_in
    choose_path(sh, path)
    if dxw not in DXW:
        raise ValueError(f"dxw must be one of {DXW}, got {dxw!r}")
    if dxw == "bmm":
        _check_bmm("dxw", n_in, sh.k * sh.p, "n_in")
    T = x.shape[0]
    if T == 0:
        _g_for_readers(g, n_in, sh, g_layout)  # g_layout validated
        return _common.empty(T, n_in, device=x.device, dtype=x.dtype), torch.zeros_like(w1), torch.zeros_like(w2)
    dy, dw2 = output_grads(g, _z(x, w1, sh) if z is None else z, w2, sh, n_in, g_layout)
    return (*input_grads(dy, x, w1, sh, n_in, g.shape[1], dxw), dw2)


def output_grads(g, z, w2, sh: MonarchShape, n_in: int, g_layout: str = "auto", want_dw2: bool = True):
    """``(dy, dw2 | None)`` for ``g (T > 0, n_out)`` and the stage-1 intermediate ``z`` (token-major, stage-2
    order): ``dy = P1ᵀ BD(w2)ᵀ P2ᵀ g`` token-major in stage-1 order ``(T, k·q)`` and, if ``want_dw2``,
    ``dw2[ll] = (P2ᵀ g)_llᵀ z_ll``; ``g`` read as :func:`_g_for_readers` decides (``n_in``: the layer's input
    width the model prices)."""
    g, how = _g_for_readers(g, n_in, sh, g_layout)
    dy, dw2 = (_bmm_dy, _bmm_dw2) if how == "bmm" else (_dy, _dw2)
    return dy(g, w2, sh), dw2(z, g, sh) if want_dw2 else None


def input_grads(dy, x, w1, sh: MonarchShape, n_in: int, n_out: int, dxw: str = "auto", want_dx: bool = True,
                want_dw1: bool = True):
    """``(dx, dw1)`` from ``dy`` (token-major, stage-1 order) and ``x (T > 0, n_in)``: ``dx = BD(w1)ᵀ dy``
    truncated to ``n_in`` and ``dw1[kk] = dy_kkᵀ x_kk``, by ``dxw`` (:data:`DXW`, as in :func:`backward`). With
    one of them not wanted (``None`` in its place) the other alone: ``dx`` by the block-diagonal kernel,
    ``dw1`` by a batched GEMM on the strided views."""
    if not (want_dx and want_dw1):
        return (bd_forward(dy, w1.transpose(1, 2), None, n_in) if want_dx else None,
                _bmm_dw1(dy, x, sh) if want_dw1 else None)
    T = x.shape[0]
    if dxw == "auto":
        dxw = _model_choice("dxw_choice", T, n_in, n_out, sh, x.dtype)
    if dxw == "bmm":
        return _bmm_dxw(dy, x, w1, sh)
    if dxw == "separate":
        return bd_forward(dy, w1.transpose(1, 2), None, n_in), bd_weight_grad(x, dy, sh.k, sh.q, sh.p)
    dx = _common.empty(T, n_in, device=x.device, dtype=x.dtype)
    lp, options = _dxw_plan(T, sh.k, sh.q, sh.p, x.dtype, _common.device_info(x.device).num_sms)
    part1 = _common.empty(lp.splits, *w1.shape, device=x.device, dtype=torch.float32)
    _dxw_kernel[(lp.tiles, lp.splits)](
        dy, x, w1, dx, part1,
        T, n_in, sh.q, sh.p, lp.rows_per_split,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), *w1.stride(), dx.stride(0), dx.stride(1), *part1.stride(),
        **options,
    )
    return dx, part1.sum(0).to(w1.dtype)


@_plan.memo
def _dxw_plan(T: int, k: int, q: int, p: int, dtype: torch.dtype, num_sms: int) -> tuple:
    """``(plan, compile-time arguments and launch options)`` of :func:`_dxw_kernel` (memoised, as
    :func:`.blockdiag._wgrad_plan`; the options are shared: unpack, do not modify)."""
    lp = _plan.dxw_launch(T, k, q, p, num_sms)
    return lp, dict(UPCAST=interpreting(), PRECISION=precision(dtype),
                    **_common.launch_meta(lp.tile, ("BLOCK_M", "BLOCK_N", "BLOCK_K")))


def backward_epilogue(x, g, w1, w2, bias, n_in, activation, want_dx, z=None, want_dw=True, pre=None):
    """First-order backward of ``out = act(M x + bias)``: ``(dx | None, dw1 | None, dw2 | None, db | None)``,
    ``db = Σ_t g·act'(pre)`` (``None`` without a bias); where ``dy`` and ``dw2`` read a token-major ``g``
    (:func:`monarch_kernels.cost_model.g_readers`), ``g·act'(pre)`` is written token-major by the derivative's
    own pass (:func:`.token_major.activation_grad_token_major`), and ``db`` summed there (without an activation:
    by the copy of ``g``, :func:`.token_major.to_token_major`). ``z``, ``pre``: what :func:`forward_saving` kept;
    without them ``z`` is computed once here and shared: an activation's pre-activation is stage 2 of ``z``
    (no epilogue) and ``dw2`` reads the same ``z``, where composing a forward with :func:`backward` would run
    stage 1 twice."""
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    if z is None and (want_dw or (activation != "none" and pre is None)):
        z = _z(x, w1, sh)
    # where the readers of g take a token-major copy, the pass that makes it (the activation's derivative, or
    # the copy itself) writes it so and sums it for the bias gradient: no copy later, no separate reduction
    want_db, db = bias is not None, None
    layout = _g_pick(g, x.shape[1], sh, activation, want_db) if want_dw and g.shape[0] > 0 else "row_major"
    copied = layout != "row_major"
    if activation != "none":
        if pre is None:
            pre = bd_forward(z, w2, bias, g.shape[1], "none", out_perm=(sh.s, sh.l))
        if copied and want_db:
            g, db = activation_grad_token_major(activation, pre, g, with_sum=True)
        elif copied:
            g = activation_grad_token_major(activation, pre, g)
        else:
            g = activations.backward(activation, pre, g)
    elif copied and want_db:
        g, db = to_token_major(g, with_sum=True)
    if want_db and db is None:
        db = g.sum(0)
    if not want_dw:
        return (backward_input(g, w1, w2, n_in) if want_dx else None), None, None, db
    if not want_dx:
        return (None, *backward_weight(x, g, w1, w2, g_layout=layout, z=z), db)
    return (*backward(x, g, w1, w2, n_in, g_layout=layout, z=z), db)
