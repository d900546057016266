"""Server-side averaging: FedAvg, the element-wise masked average of selective weight aggregation, and the
SWA masks that maximise the cosine with the full-precision update."""
from __future__ import annotations

import math

import torch
from torch import Tensor



def weighted_average(states: list[dict[str, Tensor]], weights) -> dict[str, Tensor]:
    """``Σ_k n_k w_k / Σ_k n_k`` per tensor (FedAvg); ``weights`` are sample counts."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    w = w / w.sum()
    return {n: sum(wk.to(states[0][n].dtype) * s[n] for wk, s in zip(w, states)) for n in states[0]}


def masked_average(fp: list[tuple[dict, float]], low: list[tuple[dict, float, dict]]) -> dict[str, Tensor]:
    """Element-wise ``(Σ_FP n_k w_k + Σ_low n_j m_j ⊙ w_j) / (Σ_FP n_k + Σ_low n_j m_j)``.

    ``fp``: (state, n) pairs; ``low``: (state, n, masks) with masks {name: 0/1 tensor} (missing name: all ones).
    Elements with zero total weight (no FP client and every mask 0) fall back to the plain low-bit average."""
    names = (fp or low)[0][0].keys()
    out = {}
    for n in names:
        num = sum(float(c) * s[n] for s, c in fp) if fp else 0.0
        den = sum(float(c) for _, c in fp) if fp else 0.0
        plain = 0.0
        for s, c, masks in low:
            m = masks.get(n)
            m = torch.ones_like(s[n]) if m is None else m.to(s[n])
            num = num + float(c) * m * s[n]
            den = den + float(c) * m
            plain = plain + float(c) * s[n]
        den = den if isinstance(den, Tensor) else torch.full_like(next(iter(fp or low))[0][n], den)
        fallback = plain / sum(float(c) for _, c, _ in low) if low else torch.zeros_like(den)
        out[n] = torch.where(den > 0, num / den.clamp_min(1e-30), fallback)
    return out


def swa_masks(delta_low: Tensor, delta_high: Tensor) -> Tensor:
    """Binary masks ``m_j`` maximising ``cos(m_j ⊙ Δ_low[j], Δ_high)`` for a stack ``delta_low (J, *shape)`` of
    low-bit updates against one high-bit update ``delta_high (*shape)``.

    Score of an element: ``r_i = Δ_high,i / Δ_low,i``. Only sign-agreeing elements (``r_i > 0``) can raise the
    cosine; with ``x_i = Δ_low,i²`` the cosine of a kept set is ``Σ x_i r_i / √(Σ x_i) / ‖Δ_high‖``, so the masks
    keep the top-k elements by score, with k chosen by scanning the cosine of every prefix (exact in the
    continuous relaxation; the paper learns the mask from scores with a straight-through estimator [unverified],
    which approximates the same maximiser). Elements with a zero low-bit update are kept (they do not change the
    cosine); a client with a zero update, or a zero high-bit update, keeps everything (plain FedAvg)."""
    if delta_low.dim() < 1 or tuple(delta_low.shape[1:]) != tuple(delta_high.shape):
        raise ValueError(f"delta_low must be (J, *{tuple(delta_high.shape)}), got {tuple(delta_low.shape)}")
    J = delta_low.shape[0]
    a = delta_low.detach().reshape(J, -1).double()
    b = delta_high.detach().reshape(1, -1).double().expand_as(a)
    masks = torch.ones_like(a)
    if float(b[0].norm()) == 0:
        return masks.to(delta_low.dtype).view_as(delta_low)
    prod = a * b
    score = torch.where(prod > 0, b / torch.where(a == 0, torch.ones_like(a), a), torch.full_like(a, -1.0))
    order = score.argsort(dim=1, descending=True)
    num = prod.gather(1, order).clamp_min(0).cumsum(1)
    den = (a * a).gather(1, order).cumsum(1).clamp_min(1e-300).sqrt()
    valid = score.gather(1, order) > 0
    cos = torch.where(valid, num / den, torch.full_like(num, -math.inf))
    k = cos.argmax(dim=1) + 1  # best prefix length (≥ 1)
    keep_sorted = torch.arange(a.shape[1]).unsqueeze(0) < k.unsqueeze(1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted) & (prod > 0)
    masks = (keep | (a == 0)).double()
    masks[a.norm(dim=1) == 0] = 1
    return masks.to(delta_low.dtype).view_as(delta_low)


def swa_mask(delta_low: Tensor, delta_high: Tensor) -> Tensor:
    """:func:`swa_masks` for a single low-bit update (same shape as ``delta_high``)."""
    if delta_low.shape != delta_high.shape:
        raise ValueError(f"delta_low {tuple(delta_low.shape)} and delta_high {tuple(delta_high.shape)} must match")
    return swa_masks(delta_low.unsqueeze(0), delta_high)[0]
