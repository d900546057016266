"""Pure-PyTorch reference implementation of the primitive kernels (the ``torch`` backend).

Every backend implements the same primitives on 2-D inputs ``(T, features)``; the custom ops in
:mod:`monarch_kernels.ops` flatten leading dims and add autograd on top. The reference is always available,
supports float64 (it is the test oracle) and complex dtypes, and is the fallback on every device, so it is
written for speed with ``torch.bmm`` alone (the two-``bmm`` formulation of Dao et al., "Monarch: Expressive
Structured Matrices for Efficient and Accurate Training", ICML 2022, §3):

* **Token-major buffers, block-major views.** Each stage is one batched GEMM over blocks, ``(b, T, ·)``.
  Its output is allocated token-major, ``(T, b, ·)``, and ``bmm`` writes into the transposed *view*
  (``out=``): every block's rows then have stride ``b·width`` and unit column stride, which BLAS takes as a
  leading dimension, so the stage-1 output lands directly in the natural ``(T, k·q)`` order and no copy is
  needed to undo the batching.
* **One copy per permutation, and only there.** ``P1`` views the natural ``(T, k·q)`` stage-1 output as
  ``(T, r, l)`` and swaps the last two dims: one ``contiguous()`` makes ``(T, l, r)``, whose ``(l, T, r)``
  view feeds stage 2 with unit column stride (a view of the unpermuted data would have column stride ``l``,
  which BLAS cannot take, and ``bmm`` would copy anyway). ``P2`` reads the token-major ``(T, l, s)``
  stage-2 output through a ``(T, s, l)`` view in one copy, fused with the bias add.
* **Backward.** The same two tricks in reverse: ``P2ᵀ`` and ``P1ᵀ`` are one copy each; the gradients of
  both stages come from ``bmm`` on views (``dw = gᵀ z`` reads transposed views, which BLAS takes as
  transposed operands).

Shapes (``T`` tokens):

* ``blockdiag_fwd(x (T, n_in), w (k, q, p), bias (n_out,) | None, n_out, activation) -> (T, n_out)`` with
  ``y[t, kk·q + qq] = act(Σ_pp w[kk, qq, pp] · x[t, kk·p + pp] + bias)``; ``n_in ≤ k·p`` (missing inputs are
  zero), ``n_out ≤ k·q`` (output truncated).
* ``blockdiag_wgrad(x (T, n_in), g (T, n_out), k, q, p) -> (k, q, p)``:
  ``dw[kk, qq, pp] = Σ_t g[t, kk·q + qq] · x[t, kk·p + pp]``.
* ``monarch_fwd(x (T, n_in), w1 (k, q, p), w2 (l, s, r), bias, n_out, activation) -> (T, n_out)``:
  ``out = act(P2 · BD(w2) · P1 · BD(w1) · x + bias)``, where ``P1`` views the ``k·q`` stage-1 outputs as
  ``(r, l)`` and transposes, and ``P2`` views the ``l·s`` stage-2 outputs as ``(l, s)`` and transposes.
* ``monarch_bwd_input(g (T, n_out), w1, w2, n_in) -> (T, n_in)``: ``Mᵀ g``.
* ``monarch_bwd_weight(x (T, n_in), g (T, n_out), w1, w2) -> (dw1, dw2)``: gradients of ``⟨g, M x⟩``;
  the stage-1 intermediate is recomputed.
* ``monarch_bwd(x, g, w1, w2, n_in) -> (dx, dw1, dw2)``: both of the above, sharing the recomputed intermediate
  and ``dy = P1ᵀ BD(w2)ᵀ P2ᵀ g`` (optional for a backend: :mod:`monarch_kernels.ops` composes the two when a
  backend lacks it).

Optional, for the first-order backward of eager training calls (:mod:`monarch_kernels.ops`):

* ``monarch_bwd_epilogue(x, g, w1, w2, bias, n_in, activation, want_dx, z=None, want_dw=True, pre=None)
  -> (dx | None, dw1 | None, dw2 | None, db | None)``: the backward of ``act(M x + bias)`` including the
  activation's derivative and the bias gradient (``None`` instead of the tuple where the backend has no such
  kernel for these tensors: the caller composes it; a backend may return weight gradients it was not asked for);
  ``z``/``pre``: what ``monarch_fwd_saving`` kept, else recomputed;
* ``monarch_fwd_saving(x, w1, w2, bias, n_out, activation) -> (out, z | None, pre | None)``: the forward that
  also hands the stage-1 intermediate ``z`` (in the backend's own layout) and, with an activation, the
  pre-activation ``(T, n_out)`` to ``monarch_bwd_epilogue`` (``None`` for what it keeps none of). The
  reference keeps ``z`` only: ``T·k·q`` elements of activation memory for one ``bmm`` and one copy fewer in
  backward, as fly's ``BlockdiagButterflyMultiply`` does (its pre-activation is recomputed from ``z``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import activations


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _blocks_in(x: torch.Tensor, k: int, p: int) -> torch.Tensor:
    """``(T, n_in)`` -> ``(k, T, p)`` view (zero-padded to ``k·p`` first if needed)."""
    return _pad_last(x, k * p).reshape(x.shape[0], k, p).transpose(0, 1)


def _stage1(x: torch.Tensor, w1: torch.Tensor, l: int, r: int) -> torch.Tensor:
    """``P1 · BD(w1) x``: ``z (l, T, r)``, a view of a token-major ``(T, l, r)`` tensor, with
    ``z[ll, t, rr] = y[t, rr·l + ll]``."""
    T = x.shape[0]
    k, q, p = w1.shape
    y = x.new_empty(T, k, q)  # natural order: row t is the k·q stage-1 outputs of token t
    torch.bmm(_blocks_in(x, k, p), w1.transpose(1, 2), out=y.transpose(0, 1))
    return y.view(T, r, l).transpose(1, 2).contiguous().transpose(0, 1)  # P1: the one copy


def _stage2(z: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``BD(w2) z`` for ``z (l, T, r)``: token-major ``(T, l, s)`` (block order, before ``P2``)."""
    l, s, _ = w2.shape
    o = z.new_empty(z.shape[1], l, s)
    torch.bmm(z, w2.transpose(1, 2), out=o.transpose(0, 1))
    return o


def _permute_out(o: torch.Tensor, bias, n_out: int) -> torch.Tensor:
    """``P2`` and the bias: ``(T, l, s)`` block order -> ``(T, n_out)`` with ``out[t, ss·l + ll] = o[t, ll, ss]``,
    in one copy (the bias add writes the permuted view) unless the output is truncated."""
    T, l, s = o.shape
    if n_out == l * s:
        out = o.new_empty(T, s, l)
        if bias is None:
            out.copy_(o.transpose(1, 2))
        else:
            torch.add(o.transpose(1, 2), bias.reshape(s, l), out=out)
        return out.view(T, n_out)
    out = o.transpose(1, 2).reshape(T, l * s)[:, :n_out]
    return out + bias if bias is not None else out.contiguous()


def _epilogue(out, bias, activation: str):
    out = out + bias if bias is not None else out.contiguous()
    return activations.apply(activation, out)


def blockdiag_fwd(x, w, bias, n_out: int, activation: str = "none"):
    k, q, p = w.shape
    T = x.shape[0]
    y = x.new_empty(T, k, q)  # natural order straight from bmm (out= a transposed view)
    torch.bmm(_blocks_in(x, k, p), w.transpose(1, 2), out=y.transpose(0, 1))
    y = y.view(T, k * q)
    return _epilogue(y if n_out == k * q else y[:, :n_out], bias, activation)


def blockdiag_wgrad(x, g, k: int, q: int, p: int):
    gk = _pad_last(g, k * q).reshape(g.shape[0], k, q).transpose(0, 1)  # (k, T, q)
    return torch.bmm(gk.transpose(1, 2), _blocks_in(x, k, p))


def monarch_fwd(x, w1, w2, bias, n_out: int, activation: str = "none"):
    l, _, r = w2.shape
    pre = _permute_out(_stage2(_stage1(x, w1, l, r), w2), bias, n_out)
    return _activate_(activation, pre)  # in place: pre is this call's own fresh tensor


def monarch_fwd_saving(x, w1, w2, bias, n_out: int, activation: str = "none"):
    """:func:`monarch_fwd` that also returns the stage-1 intermediate ``z`` (the ``(l, T, r)`` view stage 2
    read) for :func:`monarch_bwd_epilogue`: ``(out, z, None)`` (no pre-activation kept). Keeping ``z`` costs
    ``T·k·q`` elements of activation memory and saves the backward one ``bmm`` and one copy (fly's choice;
    Triton keeps its own, and so does the CUDA backend where a resident kernel runs the forward; the C++ kernels
    recompute it)."""
    l, _, r = w2.shape
    z = _stage1(x, w1, l, r)
    return _activate_(activation, _permute_out(_stage2(z, w2), bias, n_out)), z, None


def monarch_bwd_epilogue(x, g, w1, w2, bias, n_in: int, activation: str, want_dx: bool, z=None,
                         want_dw: bool = True, pre=None):
    """First-order backward of ``out = act(M x + bias)``: ``(dx | None, dw1 | None, dw2 | None, db)``,
    ``db = Σ_t g·act'(pre)`` (``None`` without a bias). ``z``: the intermediate :func:`monarch_fwd_saving` kept
    (conjugated like ``x``), else recomputed; an activation's pre-activation is ``pre`` when given, else
    comes from ``z`` through stage 2 alone, so with frozen weights (``want_dw`` false) the saved ``z`` spares
    the whole stage-1 recompute."""
    l, _, r = w2.shape
    if z is None and (want_dw or (activation != "none" and pre is None)):
        z = _stage1(x, w1, l, r)
    if activation != "none":
        if pre is None:
            pre = _permute_out(_stage2(z, w2), bias, g.shape[1])
        g = activations.backward(activation, pre, g)
    dx, dw1, dw2 = _backward(x, g, w1, w2, n_in, want_dx, want_dw, z)
    return dx, dw1, dw2, None if bias is None else g.sum(0)


def _activate_(activation: str, t: torch.Tensor) -> torch.Tensor:
    if activation == "none":
        return t
    if activation == "relu":
        return t.relu_()
    return torch.ops.aten.gelu_(t, approximate="tanh" if activation == "gelu_tanh" else "none")


def _backward(x, g, w1, w2, n_in: int, want_dx: bool, want_dw: bool, z=None):
    """The shared body of the backward primitives: ``(dx, dw1, dw2)``, ``None`` for what is not wanted;
    ``z``: the stage-1 intermediate from :func:`monarch_fwd_saving` (conjugated like ``x``), else recomputed."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    T = g.shape[0]
    # P2ᵀ: (l, T, s) view of a token-major (T, l, s) copy
    go = _pad_last(g, l * s).reshape(T, s, l).transpose(1, 2).contiguous().transpose(0, 1)
    dw1 = dw2 = dx = None
    if want_dw:
        dw2 = torch.bmm(go.transpose(1, 2), _stage1(x, w1, l, r) if z is None else z)
    dz = g.new_empty(T, l, r)
    torch.bmm(go, w2, out=dz.transpose(0, 1))
    # P1ᵀ: one explicit copy into natural order, then a (k, T, q) view with unit column stride. (A reshape
    # instead would be a view when r = k and l = q, whose column stride l makes every later bmm copy it.)
    dy = dz.transpose(1, 2).contiguous().view(T, k, q).transpose(0, 1)
    if want_dw:
        dw1 = torch.bmm(dy.transpose(1, 2), _blocks_in(x, k, p))
    if want_dx:
        dxb = g.new_empty(T, k, p)
        torch.bmm(dy, w1, out=dxb.transpose(0, 1))
        dx = dxb.view(T, k * p)
        dx = dx if n_in == k * p else dx[:, :n_in].contiguous()
    return dx, dw1, dw2


def monarch_bwd_input(g, w1, w2, n_in: int):
    return _backward(None, g, w1, w2, n_in, True, False)[0]


def monarch_bwd_weight(x, g, w1, w2):
    _, dw1, dw2 = _backward(x, g, w1, w2, x.shape[1], False, True)
    return dw1, dw2


def monarch_bwd(x, g, w1, w2, n_in: int):
    return _backward(x, g, w1, w2, n_in, True, True)
