"""The set subsampler ``q(D_s | D)``: stage-1 candidate selection (DeepSets encoder), stage-2 autoregressive
selection (Set-Transformer scorer), and the stage-1-only, fixed-subset and random baselines."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MLP, linear
from .relaxations import MODES, autoregressive_select, bernoulli_kl, relaxed_bernoulli


def _per_element(mlp: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2-D MLP to every element of a ``(B, n, d)`` set (``methods.models.MLP`` flattens 3-D inputs)."""
    return mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def _check_set(x: Tensor, d: Optional[int], fn: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: the set must be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or (d is not None and x.shape[-1] != d):
        raise ValueError(f"{fn}: the set must have shape (B, n, {d if d is not None else 'd'}), got {tuple(x.shape)}")


class SetEncoder(nn.Module):
    """Stage 1: ``h_i = φ(d_i)``, ``r = mean_i h_i``, ``logit_i = ψ([h_i, r])``.

    ``forward(D (B, n, d_in)) -> (logits (B, n), h (B, n, hidden), r (B, hidden))``; permutation-equivariant
    in ``n`` (``logits``, ``h``) and invariant (``r``).
    """

    def __init__(self, d_in: int, hidden: int = 64, layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        self.d_in = d_in
        self.phi = MLP(d_in, hidden, hidden, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU,
                       dense_ends=True)
        self.psi = MLP(2 * hidden, hidden, 1, depth=1, layer=layer, nblocks=nblocks, activation=nn.GELU)

    def forward(self, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_set(d, self.d_in, "SetEncoder")
        h = _per_element(self.phi, d)
        r = h.mean(1)
        logits = _per_element(self.psi, torch.cat([h, r[:, None].expand_as(h)], -1)).squeeze(-1)
        return logits, h, r


class SetAttentionScorer(nn.Module):
    """Stage 2 scorer: ``score_i = head([MAB(h_i, {seed} ∪ Q), r])`` with
    ``MAB(X, Y) = LN(X + O·MultiHead(Q·X, K·Y, V·Y))`` (Set Transformer), Q/K/V/O ``layer``-type linears."""

    def __init__(self, hidden: int = 64, heads: int = 4, layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"SetAttentionScorer: hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (linear(hidden, hidden, layer, nblocks) for _ in range(4))
        self.seed = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
        self.norm = nn.LayerNorm(hidden)
        self.head = MLP(2 * hidden, hidden, 1, depth=1, layer=layer, nblocks=nblocks, activation=nn.GELU)

    def forward(self, h: Tensor, r: Tensor, selected: Tensor, queries: Optional[Tensor] = None) -> Tensor:
        """``h (B, n, H)``, ``r (B, H)``, ``selected (B, t, H)`` (embeddings of the picks so far) -> ``(B, n)``.
        ``queries``: ``self.q(h)``, if already computed (it does not change between the autoregressive steps)."""
        b, n, hid = h.shape
        keys = torch.cat([self.seed.expand(b, 1, hid), selected], 1)  # (B, t+1, H)
        nh, dh = self.heads, hid // self.heads
        q = (self.q(h) if queries is None else queries).view(b, n, nh, dh).transpose(1, 2)
        kk = self.k(keys).view(b, -1, nh, dh).transpose(1, 2)
        vv = self.v(keys).view(b, -1, nh, dh).transpose(1, 2)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dh), -1) @ vv  # (B, nh, n, dh)
        out = self.norm(h + self.o(att.transpose(1, 2).reshape(b, n, hid)))
        return _per_element(self.head, torch.cat([out, r[:, None].expand_as(out)], -1)).squeeze(-1)


@dataclass
class Subset:
    """A selection: ``index (B, k)``, ``weights (B, k, n)`` (straight-through one-hot rows),
    ``elements (B, k, d)`` (``weights @ D``, differentiable), ``kl`` (scalar, the β-free KL term of (1)),
    ``rho (B, n)`` (stage-1 probabilities, or None), ``candidates (B, n)`` (bool)."""

    index: Tensor
    weights: Tensor
    elements: Tensor
    kl: Tensor
    rho: Optional[Tensor]
    candidates: Tensor


class SetSubsampler(nn.Module):
    """The subsampler ``q(D_s | D)`` in one of :data:`MODES` (``"sss"`` two-stage, ``"stage1"``, ``"fixed"``,
    ``"random"``), choosing exactly ``k`` of the ``n`` elements of ``D (B, n, d_in)``.

    Defaults: ``hidden=64``, 4 attention heads, ``r0=0.3`` (prior candidate rate), ``tau1=0.5`` (relaxed
    Bernoulli), ``tau2=0.5`` (Gumbel-softmax). ``n`` is needed for ``"fixed"`` (one score per position).
    ``forward(D, generator=None, sample=None) -> Subset``. With ``sample`` (default: ``self.training``) the
    selection is a hard sample with straight-through gradients (stage 1 ``z ~ Ber(ρ)``, stage 2 Gumbel-max
    draws); without, it is deterministic (stage 1 the ``max(k, round(Σρ))`` highest ``ρ``, stage 2 argmax;
    top-k for ``stage1``/``fixed``). The recipe evaluates both.
    """

    def __init__(self, d_in: int, k: int, mode: str = "sss", *, n: Optional[int] = None, hidden: int = 64,
                 heads: int = 4, r0: float = 0.3, tau1: float = 0.5, tau2: float = 0.5, layer: str = "monarch",
                 nblocks: int = 4):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"SetSubsampler: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"SetSubsampler: k must be a positive int, got {k!r}")
        if not 0 < r0 < 1:
            raise ValueError(f"SetSubsampler: r0 must be in (0, 1), got {r0!r}")
        self.d_in, self.k, self.mode, self.n = d_in, k, mode, n
        self.r0, self.tau1, self.tau2 = r0, tau1, tau2
        if mode in ("sss", "stage1"):
            self.encoder = SetEncoder(d_in, hidden, layer, nblocks)
        if mode == "sss":
            self.scorer = SetAttentionScorer(hidden, heads, layer, nblocks)
        if mode == "fixed":
            if not isinstance(n, int) or n < k:
                raise ValueError(f"SetSubsampler: mode 'fixed' needs the set size n >= k, got n={n!r}")
            self.position_logits = nn.Parameter(torch.zeros(n))

    def forward(self, d: Tensor, generator: Optional[torch.Generator] = None, sample: Optional[bool] = None) -> Subset:
        _check_set(d, self.d_in, "SetSubsampler")
        sample = self.training if sample is None else sample
        b, n, _ = d.shape
        if n < self.k:
            raise ValueError(f"SetSubsampler: the set has n={n} elements, fewer than k={self.k}")
        zero = d.new_zeros(())
        all_ = torch.ones(b, n, dtype=torch.bool, device=d.device)
        if self.mode == "random":
            scores = torch.rand(b, n, generator=generator).to(d)
            index = scores.topk(self.k, -1).indices
            w = F.one_hot(index, n).to(d.dtype)
            return Subset(index, w, w @ d, zero, None, all_)
        if self.mode == "fixed":
            if n != self.n:
                raise ValueError(f"SetSubsampler: mode 'fixed' was built for n={self.n}, got a set of {n}")
            logits = self.position_logits.expand(b, n)
            index, w = autoregressive_select(lambda t, prev: logits, self.k, all_, tau=self.tau2,
                                             training=sample, generator=generator)
            return Subset(index, w, w @ d, zero, None, all_)
        logits, h, r = self.encoder(d)
        rho = torch.sigmoid(logits)
        if self.mode == "stage1":
            index, w = autoregressive_select(lambda t, prev: logits, self.k, all_, tau=self.tau2,
                                             training=sample, generator=generator)
            return Subset(index, w, w @ d, zero, rho, all_)
        # stage 1: candidates (always at least k: the top-k of rho are added)
        top = F.one_hot(logits.topk(self.k, -1).indices, n).sum(1).bool()
        if sample:
            z = relaxed_bernoulli(logits, self.tau1, hard=True, generator=generator)
            candidates = (z.detach() > 0.5) | top
        else:  # deterministic: the m most probable, m = max(k, round(Σ ρ)) (a sample's expected size)
            m = rho.sum(-1).round().long().clamp(self.k, n)
            rank = logits.argsort(-1, descending=True).argsort(-1)
            candidates = rank < m[:, None]
            z = candidates.to(d.dtype)
        z_st = candidates.to(d.dtype) - z.detach() + z  # forward: the candidate mask; backward: through z̃
        log_z = torch.where(candidates, torch.log(z_st.clamp_min(1e-6)), torch.zeros_like(z_st))  # value 0
        kl = bernoulli_kl(rho, self.r0).mean()
        # stage 2: autoregressive set-attention selection among the candidates, π_t(i) ∝ z_i exp(s_t,i)
        queries = self.scorer.q(h)
        index, w = autoregressive_select(lambda t, prev: self.scorer(h, r, prev @ h, queries) + log_z, self.k,
                                         candidates, tau=self.tau2, training=sample, generator=generator)
        return Subset(index, w, w @ d, kl, rho, candidates)
