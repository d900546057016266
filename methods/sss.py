"""SSS: set-based stochastic subsampling (Andreis, Lee, Nguyen, Lee, Yang, Hwang, ICML 2022).

The input is a set ``D = {d_1..d_n}`` (here: the pixels ``(row, col, value)`` of an image, or the points
``(x, f(x))`` of a 1-D function); a subsampler picks ``k ≪ n`` elements ``D_s`` that a task network ``T``
consumes, and both are trained jointly end to end::

    L = E_{D_s ~ q(·|D)} [ ℓ_task(T(D_s), y) ] + β · (1/n) Σ_i KL(Ber(ρ_i) ‖ Ber(r₀))            (1)

Two stages (no official code exists; the details below follow the paper's description and are marked as
this module's choices where the paper is not specific):

* **Stage 1, candidate selection** (conditionally independent): a DeepSets encoder ``h_i = φ(d_i)``,
  ``r = mean_i h_i``, ``ρ_i = σ(ψ([h_i, r]))`` and ``z_i ~ Ber(ρ_i)``, relaxed during training by the binary
  Concrete / relaxed Bernoulli ``z̃_i = σ((logit ρ_i + log u − log(1−u)) / τ₁)`` with a straight-through
  hard ``z_i = 1[z̃_i > ½]`` (:func:`relaxed_bernoulli`). The KL term of (1) pulls ``ρ`` towards the sparse
  prior rate ``r₀`` (:func:`bernoulli_kl`). *Choice:* the candidate set is ``{z_i = 1} ∪ top-k(ρ)``, so it
  always holds at least ``k`` elements. At test the candidates are the ``m = max(k, round(Σ_i ρ_i))``
  elements of highest ``ρ`` (deterministic, the expected size of a sample: thresholding ``ρ > ½`` would
  leave only the top-k once the prior pulls ``ρ`` towards ``r₀ < ½``, and stage 2 would have no choice).
* **Stage 2, autoregressive selection** (conditionally dependent, on the candidates only): for
  ``t = 1..k`` every remaining candidate attends (a Set-Transformer MAB: multi-head attention, residual,
  LayerNorm) to the already selected set ``Q_{t−1}`` plus a learned seed, a head scores it from
  ``[MAB(h_i, Q_{t−1}), r]``, and one element is drawn from the softmax over the remaining candidates with
  a straight-through **Gumbel-softmax** (τ₂) during training, argmax at test, then masked out
  (:func:`autoregressive_select`): no element is picked twice and exactly ``k`` are picked.
  The two stages are coupled as a product: stage 2 draws from ``π_t(i) ∝ z_i · exp(s_{t,i})``, i.e. its
  logits are ``s_{t,i} + log z_i`` with ``z`` the straight-through stage-1 mask (forward ``log 1 = 0`` on
  candidates, ``−∞`` elsewhere; backward ``∂/∂z̃_i``), so the task gradient reaches ``ρ`` through the
  probability of selecting each element. The picked element enters the task network as
  ``e_t = Σ_i w_{t,i} d_i`` with ``w_t`` the (hard, straight-through) one-hot.
  *Implementation note:* candidates are handled with masks on all ``n`` elements (batched), so the
  compute saving of scoring only the candidates is not realised here.

Baselines compared in the recipe (``mode`` of :class:`SetSubsampler`):

* ``"stage1"``: the stage-1 scores alone; ``k`` draws without replacement from ``softmax(logit ρ)``
  (straight-through Gumbel-softmax, i.e. Gumbel-top-k, no interaction between picks), top-k of ``ρ`` at test;
* ``"fixed"``: one learned, input-independent score per position (a learned fixed subset, trained the
  same way), top-k at test;
* ``"random"``: ``k`` uniformly random elements (the task network is trained on random subsets).

Test protocol: hard samples from each subsampler (mean of 5 draws; the primary figures) and the
deterministic selection (``*_greedy``); both are reported.

The recipe (``python -m methods sss``) pre-trains each task network on random subsets (30 epochs, Adam 3e-3,
batch 32), then trains every subsampler jointly with a copy of it for the same number of epochs (15, Adam 1e-3,
batch 64):
pixel selection for classification of sklearn digits (``n = 64``, k = 2/4/8; ``--dataset mnist`` for 784
MNIST pixels) and reconstruction of 1-D GP functions (``n = 50`` grid points, k = 3/5/8) by a conditional
neural process from the ``k`` selected points (Gaussian NLL on all ``n`` points; MSE reported).
Monarch layers: the hidden layers of the element encoder φ, the Q/K/V/O projections of the set attention,
and the hidden layers of the task networks (masked-pixel MLP classifier, CNP encoder/decoder).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_image_dataset
from .models import MLP, linear
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, paired, plot_curves
from .train import epoch_batches, fit

__all__ = [
    "relaxed_bernoulli",
    "gumbel_softmax",
    "bernoulli_kl",
    "autoregressive_select",
    "SetEncoder",
    "SetAttentionScorer",
    "SetSubsampler",
    "Subset",
    "MaskedSetClassifier",
    "CNP",
    "image_to_set",
    "gp_functions",
    "RECIPE",
]

MODES = ("sss", "stage1", "fixed", "random")


# --------------------------------------------------------------------------------------------------
# relaxations
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# subsampler modules
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# task networks
# --------------------------------------------------------------------------------------------------


class MaskedSetClassifier(nn.Module):
    """Classifier of a subset of an aligned set (pixels): the selected values are put back in place,
    ``m = Σ_t w_t`` (the selection mask, ``(B, n)``), input ``[m ⊙ v, m]`` (``2n``) -> MLP -> logits.

    ``forward(weights (B, k, n), values (B, n))``. Differentiable in ``weights`` (straight-through one-hot
    rows), so the subsampler gets the task gradient. (A DeepSets classifier over the ``(row, col, value)``
    elements learned far more slowly on 8×8 digits in our trials; any task network fits the method.)
    """

    def __init__(self, n: int, num_classes: int, hidden: int = 128, layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        self.n = n
        self.net = MLP(2 * n, hidden, num_classes, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU)

    def forward(self, weights: Tensor, values: Tensor) -> Tensor:
        if weights.dim() != 3 or weights.shape[-1] != self.n or values.shape != (weights.shape[0], self.n):
            raise ValueError(f"MaskedSetClassifier: need weights (B, k, {self.n}) and values (B, {self.n}), got "
                             f"{tuple(weights.shape)} and {tuple(values.shape)}")
        m = weights.sum(1)
        return self.net(torch.cat([m * values, m], -1))


class CNP(nn.Module):
    """Conditional neural process: ``r = mean_c enc([x_c, y_c])``, ``(μ, σ)(x) = dec([x, r])`` with
    ``σ = 0.05 + 0.95·softplus(·)``. ``forward(context (B, k, 2), x_target (B, m, 1)) -> (μ, σ)``, each ``(B, m)``."""

    def __init__(self, hidden: int = 128, layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        self.enc = MLP(2, hidden, hidden, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU)
        self.dec = MLP(1 + hidden, hidden, 2, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU)

    def forward(self, context: Tensor, x_target: Tensor) -> tuple[Tensor, Tensor]:
        _check_set(context, 2, "CNP")
        _check_set(x_target, 1, "CNP")
        r = _per_element(self.enc, context).mean(1)
        out = _per_element(self.dec, torch.cat([x_target, r[:, None].expand(-1, x_target.shape[1], -1)], -1))
        return out[..., 0], 0.05 + 0.95 * F.softplus(out[..., 1])

    @staticmethod
    def nll(mu: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        """Mean Gaussian negative log-likelihood per target point."""
        return (torch.log(sigma) + 0.5 * ((y - mu) / sigma) ** 2 + 0.5 * math.log(2 * math.pi)).mean()


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def image_to_set(images: Tensor) -> Tensor:
    """``(N, 1, H, W)`` or ``(N, H, W)`` images in [0, 1] -> pixel sets ``(N, H·W, 3)`` of
    ``(row/(H−1), col/(W−1), value)``, row-major."""
    if images.dim() == 4:
        images = images[:, 0]
    if images.dim() != 3:
        raise ValueError(f"image_to_set: images must be (N, 1, H, W) or (N, H, W), got {tuple(images.shape)}")
    n, hh, ww = images.shape
    rows, cols = torch.meshgrid(torch.arange(hh) / max(hh - 1, 1), torch.arange(ww) / max(ww - 1, 1), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, hh * ww, 2).expand(n, -1, -1).to(images.dtype)
    return torch.cat([coords, images.reshape(n, hh * ww, 1)], -1)


def gp_functions(num: int, points: int = 100, *, generator: Optional[torch.Generator] = None,
                 lengthscale=(0.5, 1.0)) -> Tensor:
    """``num`` samples of a GP with RBF kernel (unit variance, lengthscale ~ U(lengthscale)) on an even grid
    of ``points`` in [-2, 2]: sets ``(num, points, 2)`` of ``(x, f(x))``."""
    x = torch.linspace(-2, 2, points, dtype=torch.float64)
    ell = torch.empty(num, 1, 1, dtype=torch.float64).uniform_(*lengthscale, generator=generator)
    cov = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell ** 2) + 1e-5 * torch.eye(points, dtype=torch.float64)
    f = (torch.linalg.cholesky(cov) @ torch.randn(num, points, 1, generator=generator, dtype=torch.float64))[..., 0]
    return torch.stack([x.expand(num, -1), f], -1).float()


# --------------------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = option(("classify", "function"), "which experiments", choices=("classify", "function"))
    dataset: str = option("digits", "images of the classify task", choices=("digits", "mnist"))
    ks: tuple[int, ...] = option((2, 4, 8), "pixel subset sizes of the classify task (for mnist e.g. 10 20 40)")
    function_ks: tuple[int, ...] = option((3, 5, 8), "subset sizes of the function task")
    modes: tuple[str, ...] = option(MODES, "subsamplers to compare", choices=MODES)
    hidden: int = option(64, "subsampler width")
    task_hidden: int = option(128, "task network width")
    layer: str = option("monarch", "hidden layers", choices=("monarch", "dense", "blockdiag"))
    nblocks: int = option(4, "Monarch blocks")
    pretrain_epochs: int = option(30, "task network on random subsets")
    pretrain_lr: float = option(3e-3, "Adam step of the pre-training")
    pretrain_batch_size: int = option(32, "batch of the pre-training")
    epochs: int = option(15, "joint training per method and k")
    batch_size: int = option(64, "batch of the joint training")
    lr: float = option(1e-3, "Adam step of the joint training")
    fixed_lr: float = option(0.05, "Adam step of the 'fixed' baseline's position logits")
    beta: float = option(0.1, "weight of the sparse-prior KL")
    r0: float = option(0.3, "prior candidate rate")
    tau: float = option(0.5, "τ₁ = τ₂")
    functions: int = option(2000, "GP training functions")
    test_functions: int = option(500, "GP test functions")
    points: int = option(50, "grid points per function (the set size n)")
    train_limit: Optional[int] = option(None, "use only the first N training images")
    test_limit: Optional[int] = option(None, "use N test images drawn at random (the split is class-ordered)")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")


QUICK = {"pretrain_epochs": 10, "epochs": 3, "functions": 300, "test_functions": 100, "hidden": 32, "task_hidden": 64,
         "train_limit": 400, "test_limit": 200, "ks": (8,), "function_ks": (3,), "seeds": 1}


def train_jointly(sampler: Optional[SetSubsampler], task: nn.Module, sets: Tensor, targets: Optional[Tensor], loss_fn,
                  *, epochs: int, cfg: Config, gen: torch.Generator, k_range=None, lr: Optional[float] = None,
                  batch_size: Optional[int] = None, progress=None, desc: str = "") -> int:
    """Train ``task`` (and ``sampler``) end to end on eq. (1): task loss of the selected subset + β·KL. Without a
    sampler: pre-training of the task network on random subsets of random size in ``k_range``. Returns the
    number of epochs run."""
    groups = [{"params": list(task.parameters())}]
    if sampler is not None:
        groups.append({"params": [p for name, p in sampler.named_parameters() if name != "position_logits"]})
        if sampler.mode == "fixed":  # one free logit per position: a larger step than the networks'
            groups.append({"params": [sampler.position_logits], "lr": cfg.fixed_lr})
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr or cfg.lr)

    def step(_m, batch):
        d, y = batch if targets is not None else (batch[0], None)
        if sampler is None:
            k = int(torch.randint(k_range[0], k_range[1] + 1, (1,), generator=gen))
            sel = torch.rand(d.shape[:2], generator=gen).topk(k, -1).indices
            weights, kl = F.one_hot(sel, d.shape[1]).to(d.dtype), 0.0
        else:
            sub = sampler(d, generator=gen)
            weights, kl = sub.weights, sub.kl
        loss = loss_fn(task, weights, d, y) + cfg.beta * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    both = nn.ModuleList([task] + ([sampler] if sampler is not None else []))
    data = (sets,) if targets is None else (sets, targets)
    return fit(both, opt, epoch_batches(*data, batch_size=batch_size or cfg.batch_size, generator=gen), epochs=epochs,
               step=step, prepare=lambda b: b, progress=progress, desc=desc).epochs


@torch.no_grad()
def evaluate(sampler: SetSubsampler, task: nn.Module, sets: Tensor, targets, metric_fn, gen, repeats: int = 5):
    """Test metrics of hard samples (the paper's protocol; mean over ``repeats`` draws) and, for the learned
    subsamplers, of the deterministic selection (suffix ``_greedy``)."""
    sampler.eval()
    task.eval()

    def once(sample: bool) -> dict:
        outs = []
        for i in range(0, len(sets), 500):
            d = sets[i:i + 500]
            sub = sampler(d, generator=gen, sample=sample)
            outs.append(metric_fn(task, sub, d, targets[i:i + 500] if targets is not None else None))
        return {k: sum(o[k] * o["n"] for o in outs) / sum(o["n"] for o in outs) for k in outs[0] if k != "n"}

    vals = [once(True) for _ in range(repeats)]
    res = {k: sum(v[k] for v in vals) / len(vals) for k in vals[0]}
    if sampler.mode != "random":
        res.update({f"{k}_greedy": v for k, v in once(False).items()})
    return res


def _classify_loss(task, weights, d, y):
    return F.cross_entropy(task(weights, d[..., 2]), y)


def _classify_metric(task, sub, d, y):
    return {"accuracy": float((task(sub.weights, d[..., 2]).argmax(-1) == y).float().mean()), "n": len(d)}


def _function_loss(task, weights, d, _):
    mu, sigma = task(weights @ d, d[..., :1])
    return CNP.nll(mu, sigma, d[..., 1])


def _function_metric(task, sub, d, _):
    mu, sigma = task(sub.elements, d[..., :1])
    return {"mse": float((mu - d[..., 1]).pow(2).mean()), "nll": float(CNP.nll(mu, sigma, d[..., 1])), "n": len(d)}


def compare(name: str, train_sets, train_y, test_sets, test_y, make_task, loss_fn, metric_fn, ks, cfg: Config, ctx,
            seed: int) -> dict:
    """Pre-train one task network on random subsets, then for every k and subsampler train a copy of it jointly
    with the subsampler and evaluate on the test sets."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = make_task()
    epochs = train_jointly(None, base, train_sets, train_y, loss_fn, epochs=cfg.pretrain_epochs, cfg=cfg, gen=gen,
                           k_range=(min(ks), max(ks)), lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size,
                           progress=ctx.progress, desc=f"{name}: pre-train on random subsets")
    ctx.observe(pretrain_epochs=epochs, task_hidden=next(m for m in base.modules() if isinstance(m, nn.Linear))
                .out_features)
    n, d_in = train_sets.shape[1:]
    res = {}
    for k in ks:
        res[k] = {}
        for mode in cfg.modes:
            torch.manual_seed(seed * 1000 + k)
            sampler = SetSubsampler(d_in, k, mode, n=n, hidden=cfg.hidden, r0=cfg.r0, tau1=cfg.tau, tau2=cfg.tau,
                                    layer=cfg.layer, nblocks=cfg.nblocks)
            task = copy.deepcopy(base)
            epochs = train_jointly(sampler, task, train_sets, train_y, loss_fn, epochs=cfg.epochs, cfg=cfg, gen=gen,
                                   progress=ctx.progress, desc=f"{name}: k={k} {mode}")
            ctx.observe(epochs=epochs)
            m = evaluate(sampler, task, test_sets, test_y, metric_fn, torch.Generator().manual_seed(seed + 7))
            if mode == "sss":
                with torch.no_grad():
                    sub = sampler(test_sets[:500], generator=torch.Generator().manual_seed(seed), sample=True)
                m["candidates_per_set"] = float(sub.candidates.float().sum(-1).mean())
                ctx.observe(hidden=sampler.encoder.psi.net[0].out_features)
            res[k][mode] = m
            ctx.log(f"[sss] seed {seed} {name} k={k} {mode}: " + " ".join(f"{a}={v:.4f}" for a, v in m.items()))
    return res


def classify_data(cfg: Config, ctx):
    split = load_image_dataset(cfg.dataset, seed=ctx.seed)
    xtr, ytr, xte, yte = split.x_train[:cfg.train_limit], split.y_train[:cfg.train_limit], split.x_test, split.y_test
    if cfg.test_limit is not None:  # the test split is ordered by class: subsample it at random
        keep = torch.randperm(len(xte), generator=torch.Generator().manual_seed(ctx.seed))[:cfg.test_limit]
        xte, yte = xte[keep], yte[keep]
    ctx.observe(train_limit=len(xtr) if cfg.train_limit is not None else None,
                test_limit=len(xte) if cfg.test_limit is not None else None)
    return image_to_set(xtr), ytr, image_to_set(xte), yte, split.num_classes


def run(cfg: Config, ctx: RunContext) -> dict:
    results, seeds = {}, seed_list(ctx.seed, cfg.seeds)
    if "classify" in cfg.tasks:
        sets_tr, ytr, sets_te, yte, classes = classify_data(cfg, ctx)
        make = lambda: MaskedSetClassifier(sets_tr.shape[1], classes, cfg.task_hidden, cfg.layer, cfg.nblocks)  # noqa
        per_seed = [compare("classify", sets_tr, ytr, sets_te, yte, make, _classify_loss, _classify_metric, cfg.ks,
                            cfg, ctx, s) for s in seeds]
        results["classify"] = {"data": cfg.dataset, "n": sets_tr.shape[1], "metric": "accuracy",
                               "summary": aggregate_k(per_seed), "per_seed": per_seed}
        ctx.observe(ks=list(per_seed[0]))
    if "function" in cfg.tasks:
        g = torch.Generator().manual_seed(ctx.seed)
        train_f = gp_functions(cfg.functions, cfg.points, generator=g)
        test_f = gp_functions(cfg.test_functions, cfg.points, generator=g)
        ctx.observe(functions=len(train_f), test_functions=len(test_f))
        make = lambda: CNP(cfg.task_hidden, cfg.layer, cfg.nblocks)  # noqa: E731
        per_seed = [compare("function", train_f, None, test_f, None, make, _function_loss, _function_metric,
                            cfg.function_ks, cfg, ctx, s) for s in seeds]
        results["function"] = {"data": f"GP (RBF, lengthscale U(0.5, 1)) on {cfg.points} points", "n": cfg.points,
                               "metric": "mse", "summary": aggregate_k(per_seed), "per_seed": per_seed}
        ctx.observe(function_ks=list(per_seed[0]))
    ctx.observe(seeds=len(per_seed))
    plot_rates(results, ctx.plot_path("sss_rates.png"))
    return {"results": results, "seeds": seeds, "modes": list(cfg.modes), "layer": cfg.layer,
            "paired": {t: {k: {f"sss_minus_{b}": paired([s[k]["sss"][r["metric"]] for s in r["per_seed"]],
                                                         [s[k][b][r["metric"]] for s in r["per_seed"]])
                               for b in cfg.modes if b != "sss"} for k in r["per_seed"][0]}
                       for t, r in results.items() if "sss" in cfg.modes}}


def aggregate_k(per_seed: list[dict]) -> dict:
    """:func:`methods.report.aggregate` per subset size ``k`` and subsampler."""
    return {k: {mode: aggregate([s[k][mode] for s in per_seed]) for mode in per_seed[0][k]} for k in per_seed[0]}


def plot_rates(results: dict, path: str) -> None:
    panels = []
    for task, r in results.items():
        metric, ks = r["metric"], sorted(r["summary"], key=int)
        series = {}
        for mode in r["summary"][ks[0]]:
            for key, suffix in ((metric, ""), (f"{metric}_greedy", " (greedy)")):
                if key in r["summary"][ks[0]][mode]:
                    stats = [r["summary"][k][mode][key] for k in ks]
                    series[mode + suffix] = ([int(k) / r["n"] for k in ks], [s["mean"] for s in stats],
                                             [s["std"] or 0.0 for s in stats])
        panels.append(Panel(f"{task} ({r['data']})", series, xlabel=f"subsampling rate k/n (n={r['n']})",
                            ylabel=f"test {metric}", logy=metric == "mse", markers=True))
    plot_curves(path, panels, panel_size=(5.5, 4.0))


RECIPE = Recipe("sss", Config, run, quick=QUICK, description=__doc__.splitlines()[0])
