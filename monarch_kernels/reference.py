"""Pure-PyTorch reference implementation of the primitive kernels (the ``torch`` backend).

Every backend implements the same five primitives on 2-D inputs ``(T, features)``; the custom ops in
:mod:`monarch_kernels.ops` flatten leading dims and add autograd on top. The reference is always
available, supports float64 (it is the test oracle) and complex dtypes, and follows fly's two-``bmm``
formulation: strided views feed ``torch.bmm`` directly; the two permutations are the only copies.

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
  the stage-1 intermediate is recomputed, not saved.
* ``monarch_bwd(x, g, w1, w2, n_in) -> (dx, dw1, dw2)``: both of the above, sharing ``dy = BD(w2)ᵀ P2ᵀ g``
  (optional for a backend: :mod:`monarch_kernels.ops` composes the two when a backend lacks it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import activations
from .shapes import MonarchShape


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _blocks_in(x: torch.Tensor, k: int, p: int) -> torch.Tensor:
    """``(T, n_in)`` -> ``(k, T, p)`` view (zero-padded to ``k·p`` first if needed)."""
    return _pad_last(x, k * p).view(x.shape[0], k, p).transpose(0, 1)


def _stage1(x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """``BD(w1) x`` then ``P1``: returns ``z (l, T, r)`` with ``z[ll, t, rr] = y[t, rr·l + ll]``."""
    return torch.bmm(_blocks_in(x, w1.shape[0], w1.shape[2]), w1.transpose(1, 2))


def _to_stage2(y: torch.Tensor, l: int, r: int) -> torch.Tensor:
    """Stage-1 output ``y (k, T, q)`` -> stage-2 input ``z (l, T, r)`` (permutation P1), materialised:
    the permuted view has batch stride 1, on which ``bmm`` falls off its fast path (≈ 50× slower on CPU)."""
    T = y.shape[1]
    return y.transpose(0, 1).reshape(T, r, l).permute(2, 0, 1).contiguous()


def _from_stage2(dz: torch.Tensor, k: int, q: int) -> torch.Tensor:
    """Inverse of :func:`_to_stage2`: ``dz (l, T, r)`` -> ``(k, T, q)`` (permutation P1ᵀ)."""
    T = dz.shape[1]
    return dz.permute(1, 2, 0).reshape(T, k, q).transpose(0, 1)


def _out_grad_blocks(g: torch.Tensor, l: int, s: int) -> torch.Tensor:
    """Output gradient ``g (T, n_out)`` -> ``(l, T, s)`` with ``[ll, t, ss] = g[t, ss·l + ll]`` (P2ᵀ),
    materialised for the same reason as :func:`_to_stage2`."""
    return _pad_last(g, l * s).reshape(g.shape[0], s, l).permute(2, 0, 1).contiguous()


def _epilogue(out, bias, activation: str):
    out = out + bias if bias is not None else out.contiguous()
    return activations.apply(activation, out)


def blockdiag_fwd(x, w, bias, n_out: int, activation: str = "none"):
    k, q, p = w.shape
    y = torch.bmm(_blocks_in(x, k, p), w.transpose(1, 2))  # (k, T, q)
    return _epilogue(y.transpose(0, 1).reshape(x.shape[0], k * q)[:, :n_out], bias, activation)


def blockdiag_wgrad(x, g, k: int, q: int, p: int):
    gk = _pad_last(g, k * q).view(g.shape[0], k, q).transpose(0, 1)  # (k, T, q)
    return torch.bmm(gk.transpose(1, 2), _blocks_in(x, k, p))


def monarch_fwd(x, w1, w2, bias, n_out: int, activation: str = "none"):
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    z = _to_stage2(_stage1(x, w1), sh.l, sh.r)
    o = torch.bmm(z, w2.transpose(1, 2))  # (l, T, s)
    out = o.permute(1, 2, 0).reshape(x.shape[0], sh.n_out)[:, :n_out]  # out[t, ss·l + ll]
    return _epilogue(out, bias, activation)


def monarch_bwd_input(g, w1, w2, n_in: int):
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    dz = torch.bmm(_out_grad_blocks(g, sh.l, sh.s), w2)  # (l, T, r)
    dx = torch.bmm(_from_stage2(dz, sh.k, sh.q), w1)  # (k, T, p)
    return dx.transpose(0, 1).reshape(g.shape[0], sh.n_in)[:, :n_in].contiguous()


def monarch_bwd_weight(x, g, w1, w2):
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    go = _out_grad_blocks(g, sh.l, sh.s)  # (l, T, s)
    z = _to_stage2(_stage1(x, w1), sh.l, sh.r)  # recomputed, not saved
    dw2 = torch.bmm(go.transpose(1, 2), z)
    dy = _from_stage2(torch.bmm(go, w2), sh.k, sh.q)  # (k, T, q)
    dw1 = torch.bmm(dy.transpose(1, 2), _blocks_in(x, sh.k, sh.p))
    return dw1, dw2


def monarch_bwd(x, g, w1, w2, n_in: int):
    sh = MonarchShape.from_factors(w1.shape, w2.shape)
    go = _out_grad_blocks(g, sh.l, sh.s)  # (l, T, s)
    z = _to_stage2(_stage1(x, w1), sh.l, sh.r)  # recomputed, not saved
    dw2 = torch.bmm(go.transpose(1, 2), z)
    dy = _from_stage2(torch.bmm(go, w2), sh.k, sh.q)  # (k, T, q), shared by dx and dw1
    dw1 = torch.bmm(dy.transpose(1, 2), _blocks_in(x, sh.k, sh.p))
    dx = torch.bmm(dy, w1).transpose(0, 1).reshape(g.shape[0], sh.n_in)[:, :n_in].contiguous()
    return dx, dw1, dw2
