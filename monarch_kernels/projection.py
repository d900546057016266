"""Frobenius-optimal projection of a dense matrix onto Monarch factors (research/monarch.md §2).

For ``M = P2 · BD(w2) · P1 · BD(w1)`` with ``w1 (k, q, p)``, ``w2 (l, s, r)``, the entry formula is

    M[ss·l + ll, kk·p + pp] = Σ_{rr : ⌊(rr·l + ll) / q⌋ = kk} w2[ll, ss, rr] · w1[kk, (rr·l + ll) mod q, pp].

So the ``s × p`` sub-matrix ``A[ll, kk][ss, pp] = M[ss·l + ll, kk·p + pp]`` is a sum of ``c(ll, kk)`` rank-one
terms, one per stage-2 input ``rr`` routed from stage-1 block ``kk`` to stage-2 block ``ll``, and every column
``w2[ll, :, rr]`` and row ``w1[kk, qq, :]`` appears in exactly one sub-matrix. The problem
``min ‖W − M‖_F`` therefore separates into ``l·k`` independent Eckart–Young problems: the optimum is the
rank-``c(ll, kk)`` truncated SVD of each sub-matrix of ``W``, split as ``U√Σ`` (into ``w2``) and ``√Σ Vᴴ``
(into ``w1``). All sub-matrices share one shape, so one batched SVD solves them all.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .shapes import MonarchShape, monarch_factor_shapes


def _routing(sh: MonarchShape, device) -> tuple[Tensor, Tensor, Tensor]:
    """For every stage-2 input ``(ll, rr)``: its stage-1 block ``kk``, row ``qq`` and rank slot ``jj``.

    ``jj`` numbers the inputs that share a sub-matrix ``(ll, kk)`` in increasing ``rr``.
    """
    ll = torch.arange(sh.l, device=device)[:, None].expand(sh.l, sh.r)
    rr = torch.arange(sh.r, device=device)[None, :].expand(sh.l, sh.r)
    flat = rr * sh.l + ll
    kk, qq = flat // sh.q, flat % sh.q
    # rank slot: how many earlier rr (same ll) land in the same kk
    same = kk[:, :, None] == kk[:, None, :]
    earlier = torch.ones(sh.r, sh.r, dtype=torch.bool, device=device).tril(-1)
    jj = (same & earlier).sum(-1)
    return kk, qq, jj


def project(
    weight: Tensor,
    nblocks: Optional[int] = None,
    *,
    w1_shape: Optional[tuple] = None,
    w2_shape: Optional[tuple] = None,
) -> tuple[Tensor, Tensor]:
    """Frobenius-optimal Monarch factors ``(w1, w2)`` of a dense ``weight (out, in)``.

    Either give ``nblocks`` (the ``MonarchLinear`` layout of :func:`monarch_factor_shapes`, which needs
    ``in`` and ``out`` divisible by ``nblocks``) or explicit ``w1_shape = (k, q, p)`` and
    ``w2_shape = (l, s, r)`` with ``k·p = in``, ``l·s = out``, ``l·r = k·q``. The result satisfies
    ``monarch_to_dense(w1, w2) ≈ weight`` and no Monarch pair of those shapes is closer in Frobenius norm.
    Works for real and complex ``weight``; half-precision input is projected in float32. A ``weight`` with
    NaN or Inf entries raises ``ValueError``.
    """
    fn = "project"
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if not (weight.is_floating_point() or weight.is_complex()):
        raise TypeError(f"{fn}: weight must be floating or complex, got {weight.dtype}")
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        raise ValueError(f"{fn}: weight has {bad} NaN or Inf entries; the projection (an SVD) needs finite values")
    n_out, n_in = weight.shape
    if (nblocks is None) == (w1_shape is None and w2_shape is None):
        raise ValueError(f"{fn}: give either nblocks or both w1_shape and w2_shape")
    if nblocks is not None:
        sh = monarch_factor_shapes(n_in, n_out, nblocks)
        for name, size in (("in_features", n_in), ("out_features", n_out)):
            if size % nblocks:
                raise ValueError(
                    f"{fn}: {name}={size} is not divisible by nblocks={nblocks}; pad the weight "
                    f"(MonarchLinear.from_linear does) or choose a dividing nblocks"
                )
    else:
        if w1_shape is None or w2_shape is None or len(w1_shape) != 3 or len(w2_shape) != 3:
            raise ValueError(f"{fn}: w1_shape and w2_shape must both be 3-tuples, got {w1_shape}, {w2_shape}")
        sh = MonarchShape.from_factors(tuple(int(d) for d in w1_shape), tuple(int(d) for d in w2_shape))
        if sh.n_in != n_in or sh.n_out != n_out or sh.l * sh.r != sh.k * sh.q:
            raise ValueError(
                f"{fn}: factor shapes w1 {sh.w1_shape}, w2 {sh.w2_shape} need k·p = in ({n_in}), "
                f"l·s = out ({n_out}) and l·r = k·q; got k·p = {sh.n_in}, l·s = {sh.n_out}, "
                f"l·r = {sh.l * sh.r}, k·q = {sh.n_mid}"
            )

    work = weight if weight.dtype in (torch.float32, torch.float64) or weight.is_complex() else weight.float()
    # A[ll, kk, ss, pp] = W[ss·l + ll, kk·p + pp]
    blocks = work.reshape(sh.s, sh.l, sh.k, sh.p).permute(1, 2, 0, 3)
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)  # (l, k, s, m), (l, k, m), (l, k, m, p)
    root = S.sqrt().to(U.dtype)
    U = U * root[..., None, :]
    Vh = Vh * root[..., :, None]

    kk, qq, jj = _routing(sh, weight.device)
    m = S.shape[-1]
    keep = (jj < m).to(work.dtype)  # rank slots beyond min(s, p) stay zero
    jjc = jj.clamp(max=m - 1)
    ll = torch.arange(sh.l, device=weight.device)[:, None].expand(sh.l, sh.r)
    cols = U[ll, kk, :, jjc] * keep[..., None]  # (l, r, s): column w2[ll, :, rr]
    rows = Vh[ll, kk, jjc, :] * keep[..., None]  # (l, r, p): row w1[kk, qq, :]
    w2 = cols.permute(0, 2, 1).contiguous()
    w1 = torch.zeros(sh.k, sh.q, sh.p, dtype=work.dtype, device=weight.device)
    w1[kk.reshape(-1), qq.reshape(-1)] = rows.reshape(-1, sh.p)
    return w1.to(weight.dtype), w2.to(weight.dtype)
