"""Pairwise surrogates, the exact SOPA / SOPA-s / SOTA-s objectives, and the losses with per-positive state
that implement the stochastic algorithms (plus the full-AUC baseline)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn



SURROGATES = ("squared_hinge", "squared", "hinge", "logistic")


def pairwise_surrogate(f_pos: Tensor, f_neg: Tensor, margin: float = 1.0, surrogate: str = "squared_hinge") -> Tensor:
    """``L_ij = ℓ(f_pos[i] − f_neg[j])`` of shape ``(P, N)`` for scores ``f_pos (P,)`` and ``f_neg (N,)``.

    ``squared_hinge``: ``max(m − t, 0)²``; ``squared``: ``(m − t)²``; ``hinge``: ``max(m − t, 0)``;
    ``logistic``: ``log(1 + exp(−m t))`` (``m`` is a scale there, as in LibAUC)."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if f_pos.dim() != 1 or f_neg.dim() != 1:
        raise ValueError(f"f_pos and f_neg must be 1-D, got shapes {tuple(f_pos.shape)} and {tuple(f_neg.shape)}")
    t = f_pos[:, None] - f_neg[None, :]
    if surrogate == "squared_hinge":
        return (margin - t).clamp_min(0) ** 2
    if surrogate == "squared":
        return (margin - t) ** 2
    if surrogate == "hinge":
        return (margin - t).clamp_min(0)
    return F.softplus(-margin * t)


def cvar(L: Tensor, beta: float) -> Tensor:
    """Exact CVaR of each row of ``L (P, N)``: the mean of the top ``β·N`` entries (fractional at the boundary:
    ``(1/(βN)) [Σ_{top ⌊βN⌋} L + (βN − ⌊βN⌋) L_(⌊βN⌋+1)]``), i.e. ``min_s s + (1/(βN)) Σ_j (L_j − s)_+``."""
    _check_beta(beta)
    n = L.shape[-1]
    k = beta * n
    srt = L.sort(dim=-1, descending=True).values
    kf = int(math.floor(k + 1e-12))
    total = srt[..., :kf].sum(-1)
    if kf < n and k - kf > 1e-12:
        total = total + (k - kf) * srt[..., kf]
    return total / k


def cvar_objective(L: Tensor, s: Tensor, beta: float) -> Tensor:
    """SOPA's objective for fixed state: ``mean_i [ s_i + (1/(β N)) Σ_j (L_ij − s_i)_+ ]`` for ``L (P, N)``,
    ``s (P,)``."""
    _check_beta(beta)
    return (s + (L - s[:, None]).clamp_min(0).sum(1) / (beta * L.shape[1])).mean()


def kl_dro_objective(L: Tensor, lam: float) -> Tensor:
    """SOPA-s objective ``mean_i λ log mean_j exp(L_ij/λ)`` (stable logsumexp)."""
    return (lam * (torch.logsumexp(L / lam, dim=1) - math.log(L.shape[1]))).mean()


def kl_kl_objective(L: Tensor, lam: float, tau: float) -> Tensor:
    """SOTA-s objective ``τ log mean_i (mean_j exp(L_ij/λ))^{λ/τ}``."""
    inner = torch.logsumexp(L / lam, dim=1) - math.log(L.shape[1])  # log u_i
    return tau * (torch.logsumexp(inner * (lam / tau), dim=0) - math.log(L.shape[0]))


def _check_beta(beta: float) -> None:
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")


def _split_batch(scores: Tensor, labels: Tensor, index: Optional[Tensor], data_len: Optional[int]):
    if not isinstance(scores, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("scores and labels must be tensors")
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (B,) or (B, 1), got {tuple(scores.shape)}")
    labels = labels.reshape(-1)
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},) like scores, got {tuple(labels.shape)}")
    pos = labels == 1
    if not bool(((labels == 0) | pos).all()):
        raise ValueError("labels must be binary (0/1)")
    if not bool(pos.any()) or bool(pos.all()):
        raise ValueError("the batch needs at least one positive and one negative label (use DualSampler)")
    pos_index = None
    if data_len is not None:
        if index is None:
            raise ValueError("index (dataset indices of the batch, shape (B,) or (num_pos,)) is required")
        index = torch.as_tensor(index).reshape(-1).long()
        if index.shape[0] == scores.shape[0]:
            pos_index = index[pos]
        elif index.shape[0] == int(pos.sum()):
            pos_index = index
        else:
            raise ValueError(f"index must have shape ({scores.shape[0]},) or ({int(pos.sum())},), "
                             f"got {tuple(index.shape)}")
        if pos_index.numel() and (int(pos_index.min()) < 0 or int(pos_index.max()) >= data_len):
            raise ValueError(f"index values must lie in [0, data_len={data_len})")
    return scores[pos], scores[~pos], pos_index


class AUCLoss(nn.Module):
    """Full-AUC pairwise loss ``mean_ij L_ij`` (the baseline; no state, ``index`` ignored)."""

    def __init__(self, margin: float = 1.0, surrogate: str = "squared_hinge"):
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.margin, self.surrogate = margin, surrogate

    def forward(self, scores: Tensor, labels: Tensor, index: Optional[Tensor] = None) -> Tensor:
        f_pos, f_neg, _ = _split_batch(scores, labels, None, None)
        return pairwise_surrogate(f_pos, f_neg, self.margin, self.surrogate).mean()


class _StatefulPAUCLoss(nn.Module):
    def __init__(self, data_len: int, margin: float, surrogate: str):
        super().__init__()
        if not isinstance(data_len, int) or data_len < 1:
            raise ValueError(f"data_len must be a positive int (the training-set size), got {data_len!r}")
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.data_len, self.margin, self.surrogate = data_len, margin, surrogate

    def _pairs(self, scores, labels, index):
        f_pos, f_neg, pos_index = _split_batch(scores, labels, index, self.data_len)
        return pairwise_surrogate(f_pos, f_neg, self.margin, self.surrogate), pos_index.to(scores.device)


class SOPALoss(_StatefulPAUCLoss):
    """SOPA: one-way pAUC (FPR ≤ β) as the exact CVaR, with per-positive thresholds ``s`` (buffer ``(data_len,)``).

    ``forward`` updates ``s_i ← s_i − η(1 − Σ_j p_ij/(β·num_neg))`` with ``p_ij = 1[L_ij > s_i]`` (old ``s``) and
    returns ``mean(p ⊙ L)/β``, whose gradient is ``(1/(β|B+||B−|)) Σ p_ij ∇L_ij``. ``num_neg`` defaults to the
    number of negatives in the batch (LibAUC's ``auto=True``). Defaults: β = 0.1, η = 1.0 (LibAUC example)."""

    def __init__(self, data_len: int, beta: float = 0.1, eta: float = 1.0, margin: float = 1.0,
                 surrogate: str = "squared_hinge", num_neg: Optional[int] = None):
        super().__init__(data_len, margin, surrogate)
        _check_beta(beta)
        if eta <= 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        self.beta, self.eta, self.num_neg = beta, eta, num_neg
        self.register_buffer("s", torch.zeros(data_len))

    def forward(self, scores: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        L, idx = self._pairs(scores, labels, index)
        s = self.s[idx].to(L.dtype)
        p = (L.detach() > s[:, None]).to(L.dtype)
        n_neg = self.num_neg or L.shape[1]
        self.s[idx] = (s - self.eta * (1 - p.sum(1) / (self.beta * n_neg))).to(self.s.dtype)
        return (p * L).mean() / self.beta


class SOPASLoss(_StatefulPAUCLoss):
    """SOPA-s: one-way pAUC by KL-DRO over each positive's negatives; state ``u`` (buffer ``(data_len,)``).

    ``u_i ← (1−γ)u_i + γ mean_j exp(L_ij/λ)``, ``p_ij = exp(L_ij/λ)/u_i`` (updated ``u``), returns ``mean(p ⊙ L)``.
    Defaults λ = 1, γ = 0.9 (LibAUC's; its example uses γ = 0.1 with margin 0.6)."""

    def __init__(self, data_len: int, lam: float = 1.0, gamma: float = 0.9, margin: float = 1.0,
                 surrogate: str = "squared_hinge"):
        super().__init__(data_len, margin, surrogate)
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.lam, self.gamma = lam, gamma
        self.register_buffer("u", torch.zeros(data_len))

    def forward(self, scores: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        L, idx = self._pairs(scores, labels, index)
        e = torch.exp(L.detach() / self.lam)
        u = (1 - self.gamma) * self.u[idx].to(L.dtype) + self.gamma * e.mean(1)
        self.u[idx] = u.to(self.u.dtype)
        p = e / u[:, None]
        return (p * L).mean()


class SOTASLoss(_StatefulPAUCLoss):
    """SOTA-s: two-way pAUC by KL-DRO over negatives (λ) and over positives (τ); state ``u (data_len,)``, ``v ()``.

    ``u_i ← (1−γ0)u_i + γ0 mean_j exp(L_ij/λ)``, ``v ← (1−γ1)v + γ1 mean_i u_i^{λ/τ}``,
    ``p_ij = u_i^{λ/τ−1} exp(L_ij/λ)/v``; returns ``mean(p ⊙ L)``. Defaults λ = τ = 1, γ0 = γ1 = 0.9 (LibAUC's)."""

    def __init__(self, data_len: int, lam: float = 1.0, tau: float = 1.0, gammas: Sequence[float] = (0.9, 0.9),
                 margin: float = 1.0, surrogate: str = "squared_hinge"):
        super().__init__(data_len, margin, surrogate)
        if lam <= 0 or tau <= 0:
            raise ValueError(f"lam and tau must be > 0, got {lam}, {tau}")
        if len(gammas) != 2 or not all(0 < g <= 1 for g in gammas):
            raise ValueError(f"gammas must be two rates in (0, 1], got {gammas!r}")
        self.lam, self.tau, self.gammas = lam, tau, tuple(gammas)
        self.register_buffer("u", torch.zeros(data_len))
        self.register_buffer("v", torch.zeros(()))

    def forward(self, scores: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        L, idx = self._pairs(scores, labels, index)
        g0, g1 = self.gammas
        e = torch.exp(L.detach() / self.lam)
        u = (1 - g0) * self.u[idx].to(L.dtype) + g0 * e.mean(1)
        self.u[idx] = u.to(self.u.dtype)
        r = self.lam / self.tau
        v = (1 - g1) * self.v.to(L.dtype) + g1 * u.pow(r).mean()
        self.v.copy_(v)
        p = u.pow(r - 1)[:, None] * e / v
        return (p * L).mean()


def pauc_loss(mode: str, **kwargs) -> nn.Module:
    """``"auc"`` → :class:`AUCLoss`, ``"sopa"`` → :class:`SOPALoss`, ``"sopa_s"`` → :class:`SOPASLoss`,
    ``"sota_s"`` → :class:`SOTASLoss` (LibAUC's ``pAUCLoss`` modes ``SOPA``/``SOPAs``/``SOTAs`` also accepted)."""
    m = {"sopas": "sopa_s", "sotas": "sota_s", "1w": "sopa_s", "2w": "sota_s"}.get(mode.lower(), mode.lower())
    classes = {"auc": AUCLoss, "sopa": SOPALoss, "sopa_s": SOPASLoss, "sota_s": SOTASLoss}
    if m not in classes:
        raise ValueError(f"mode must be one of {sorted(classes)}, got {mode!r}")
    return classes[m](**kwargs)
