"""The relaxations of the subsampler's discrete choices: binary Concrete (stage 1), Gumbel-softmax (stage 2), the
Bernoulli KL of eq. (1), and exactly-k autoregressive selection without replacement."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor



MODES = ("sss", "stage1", "fixed", "random")


def _uniform(shape, like: Tensor, generator: Optional[torch.Generator], eps: float = 1e-6) -> Tensor:
    u = torch.rand(shape, generator=generator, dtype=like.dtype if like.is_floating_point() else torch.float32)
    return u.to(like.device).clamp(eps, 1 - eps)


def relaxed_bernoulli(logits: Tensor, tau: float, *, hard: bool = True,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Binary Concrete sample ``z̃ = σ((logits + log u − log(1−u)) / τ)``, ``u ~ U(0,1)`` (same shape as logits).

    ``P(z̃ > ½) = σ(logits)`` for every ``τ``; as ``τ → 0`` ``z̃`` becomes binary. With ``hard=True`` the
    forward value is ``1[z̃ > ½]`` (exactly 0/1) and the gradient is that of ``z̃`` (straight-through).
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"relaxed_bernoulli: logits must be a floating-point tensor, got {logits!r:.60}")
    if not tau > 0:
        raise ValueError(f"relaxed_bernoulli: tau must be > 0, got {tau!r}")
    u = _uniform(logits.shape, logits, generator)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


def gumbel_softmax(logits: Tensor, tau: float, *, hard: bool = True, mask: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Gumbel-softmax over the last dim: ``softmax((logits + g) / τ)``, ``g = −log(−log u)``.

    ``mask (same shape, bool)``: ``False`` entries get probability 0 (never picked). Returns ``(sample,
    index)``; ``index = argmax(logits + g)`` is an exact Categorical(softmax(logits)) draw, and with
    ``hard=True`` ``sample`` is its one-hot with the soft sample's gradient (straight-through).
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"gumbel_softmax: logits must be a floating-point tensor, got {logits!r:.60}")
    if not tau > 0:
        raise ValueError(f"gumbel_softmax: tau must be > 0, got {tau!r}")
    if mask is not None:
        if mask.shape != logits.shape or mask.dtype != torch.bool:
            raise ValueError(f"gumbel_softmax: mask must be a bool tensor of shape {tuple(logits.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if not mask.any(-1).all():
            raise ValueError("gumbel_softmax: every row of mask needs at least one True entry")
        logits = logits.masked_fill(~mask, float("-inf"))
    g = -torch.log(-torch.log(_uniform(logits.shape, logits, generator)))
    perturbed = logits + g
    soft = torch.softmax(perturbed / tau, dim=-1)
    index = perturbed.argmax(-1)
    if not hard:
        return soft, index
    one_hot = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft, index


def bernoulli_kl(rho: Tensor, r0: float, eps: float = 1e-6) -> Tensor:
    """Elementwise ``KL(Ber(ρ) ‖ Ber(r₀)) = ρ log(ρ/r₀) + (1−ρ) log((1−ρ)/(1−r₀))``."""
    if not 0 < r0 < 1:
        raise ValueError(f"bernoulli_kl: r0 must be in (0, 1), got {r0!r}")
    rho = rho.clamp(eps, 1 - eps)
    return rho * torch.log(rho / r0) + (1 - rho) * torch.log((1 - rho) / (1 - r0))


def autoregressive_select(score_fn: Callable[[int, Tensor], Tensor], k: int, available: Tensor, *,
                          tau: float = 0.5, training: bool = True,
                          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Pick ``k`` distinct elements one at a time.

    ``available (B, n) bool``: the elements that may be picked (each row needs ≥ k). At step ``t``
    ``score_fn(t, W_prev)`` returns logits ``(B, n)`` given the previous picks ``W_prev (B, t, n)`` (one-hot
    rows, differentiable); unavailable and already picked elements are masked out; a straight-through
    Gumbel-softmax draw (``training``) or the argmax picks one. Returns ``(index (B, k), W (B, k, n))``.
    """
    if available.dim() != 2 or available.dtype != torch.bool:
        raise ValueError(f"autoregressive_select: available must be a (B, n) bool tensor, got "
                         f"{available.dtype} {tuple(available.shape)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"autoregressive_select: k must be a positive int, got {k!r}")
    if (available.sum(-1) < k).any():
        raise ValueError(f"autoregressive_select: every row of available needs at least k={k} True entries")
    b, n = available.shape
    free = available.clone()
    weights, index = [], []
    prev = torch.zeros(b, 0, n, device=available.device)
    for t in range(k):
        logits = score_fn(t, prev)
        if logits.shape != (b, n):
            raise ValueError(f"autoregressive_select: score_fn must return ({b}, {n}), got {tuple(logits.shape)}")
        if training:
            w, i = gumbel_softmax(logits, tau, hard=True, mask=free, generator=generator)
        else:
            i = logits.masked_fill(~free, float("-inf")).argmax(-1)
            w = F.one_hot(i, n).to(logits.dtype)
        free = free.clone()
        free[torch.arange(b, device=free.device), i] = False
        weights.append(w)
        index.append(i)
        prev = torch.stack(weights, 1)
    return torch.stack(index, 1), prev
