"""Teacher-forced RK4 forecasting, the official training loop with its ε schedule, adaptation of fresh contexts
with θ_c and W frozen, and the R² of system parameters regressed on the contexts."""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torchdiffeq import odeint

from ..train import History, fit, step_batches
from .dynamics import HyperMonarchDynamics, coda_regulariser


def restart_points(n_times: int, epsilon: float, generator: torch.Generator) -> list[int]:
    """Indices ``0 < i < T−1`` where integration restarts from the ground truth, each with probability ε
    (official: ``eval_points = rand(T) < ε`` with the last and first points excluded); none if ε < 1e-3."""
    if epsilon < 1e-3:
        return []
    draw = torch.rand(n_times, generator=generator) < epsilon
    return [i for i in range(1, n_times - 1) if bool(draw[i])]


def forecast(rhs: Callable, y: Tensor, t: Tensor, epsilon: float = 0.0, generator: Optional[torch.Generator] = None,
             restarts: Optional[list[int]] = None) -> Tensor:
    """Integrate the autonomous ``rhs`` (torchdiffeq RK4 on the grid ``t``) from ``y[:, :, 0]``; ``y (E, B, T, D)``
    is the ground truth. Returns ``(E, B, T, D)``.

    With teacher forcing (``epsilon > 0`` or explicit ``restarts``) the trajectory is integrated in segments
    ``[r_k, r_{k+1}]`` that restart from the true ``y[:, :, r_k]`` (official ``Forecaster.forward``; the value at
    a restart time is the previous segment's prediction). On a uniform grid the segments are integrated together
    as one batch of start states for ``max_k (r_{k+1} − r_k)`` steps, which is exactly the per-segment loop for an
    autonomous right-hand side (tested) with fewer sequential steps.
    """
    if not isinstance(y, Tensor) or y.dim() != 4:
        raise ValueError(f"y must have shape (E, B, T, D), got {getattr(y, 'shape', y)}")
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != y.shape[2] or len(t) < 2:
        raise ValueError(f"t must have shape (T,) = ({y.shape[2]},) with T >= 2, got {getattr(t, 'shape', t)}")
    if restarts is None:
        restarts = restart_points(len(t), epsilon, generator or torch.Generator().manual_seed(0)) if epsilon else []
    bounds = [0] + sorted(set(int(r) for r in restarts)) + [len(t) - 1]
    if bounds[1] <= 0 or bounds[-2] >= len(t) - 1:
        raise ValueError(f"restarts must lie strictly inside (0, T-1) = (0, {len(t) - 1}), got {restarts}")
    if len(bounds) == 2:
        return odeint(rhs, y[:, :, 0], t, method="rk4").permute(1, 2, 0, 3)
    steps = t[1:] - t[:-1]
    if not torch.allclose(steps, steps[0].expand_as(steps)):  # non-uniform grid: the official segment loop
        segs = []
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            sol = odeint(rhs, y[:, :, a], t[a:b + 1], method="rk4")
            segs.append(sol if k == 0 else sol[1:])
        return torch.cat(segs, 0).permute(1, 2, 0, 3)
    E, B = y.shape[:2]
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    y0 = torch.cat([y[:, :, a] for a in bounds[:-1]], dim=1)  # (E, K·B, D)
    sol = odeint(rhs, y0, t[:max(lens) + 1], method="rk4").view(max(lens) + 1, E, len(lens), B, -1)
    segs = [sol[:lens[0] + 1, :, 0]] + [sol[1:n + 1, :, k] for k, n in enumerate(lens) if k > 0]
    return torch.cat(segs, 0).permute(1, 2, 0, 3)


@torch.no_grad()
def evaluate_mse(model: HyperMonarchDynamics, y: Tensor, t: Tensor, codes: Optional[Tensor] = None) -> Tensor:
    """Free-rollout MSE per environment, shape ``(E,)``."""
    pred = forecast(model.bind(codes), y, t)
    return (pred - y).pow(2).mean(dim=(1, 2, 3))


def _eps_every(iters: int, eps_every: Optional[int]) -> int:
    if eps_every:
        return eps_every
    updates_to_free = math.ceil(math.log(1e-3) / math.log(0.99))  # 688 multiplications by 0.99
    return max(1, round(0.6 * iters / updates_to_free))


class EpsilonSchedule:
    """Teacher-forcing rate: starts at ``eps0`` and is multiplied by ``decay`` every ``every`` iterations (official
    ``Forecaster``); :meth:`tick` advances one iteration."""

    def __init__(self, eps0: float, decay: float, every: int):
        self.value, self.decay, self.every, self.iteration = eps0, decay, every, 0

    def tick(self) -> None:
        self.iteration += 1
        if self.iteration % self.every == 0:
            self.value *= self.decay


def train_dynamics(model: HyperMonarchDynamics, y: Tensor, t: Tensor, *, iters: int, lr: float = 1e-3,
                   lambda_m: float = 1e-6, lambda_c: float = 1e-4, eps0: float = 0.99, eps_decay: float = 0.99,
                   eps_every: Optional[int] = None, clip: float = 1.0, generator: Optional[torch.Generator] = None,
                   progress=None, desc: str = "train") -> History:
    """Official training loop on all trajectories ``y (E, N, T, D)`` at once: Adam, MSE (+ CoDA regulariser),
    grad-norm clip 1.0, teacher forcing ε ← ε·0.99 every ``eps_every`` iterations. Returns the
    :class:`methods.train.History` (``losses``: the MSE per step)."""
    model._check_state(y[:, :, 0])
    generator = generator or torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    eps = EpsilonSchedule(eps0, eps_decay, _eps_every(iters, eps_every))

    def step(m, _batch):
        mse = (forecast(m.bind(), y, t, eps.value, generator) - y).pow(2).mean()
        loss = mse + coda_regulariser(m, lambda_m, lambda_c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        eps.tick()
        return mse

    return fit(model, opt, step_batches(tuple), epochs=iters, step=step, progress=progress, desc=desc)


def adapt_codes(model: HyperMonarchDynamics, y: Tensor, t: Tensor, *, iters: int, lr: float = 1e-3,
                eps0: float = 0.95, eps_decay: float = 0.99, eps_every: Optional[int] = None,
                generator: Optional[torch.Generator] = None, progress=None) -> tuple[Tensor, History]:
    """Adaptation (official ``adaptation.py``): θ_c and W frozen, fresh contexts ξ (zero init, one per new
    environment of ``y (E', N, T, D)``, typically N = 1) trained alone with Adam on the MSE.

    Returns the adapted contexts ``(E', d_ξ)`` and the :class:`methods.train.History`; the model is not modified.
    """
    if model.mode != "coda":
        raise ValueError(f"adapt_codes needs mode='coda', got {model.mode!r}")
    if not isinstance(y, Tensor) or y.dim() != 4 or y.shape[-1] != model.state_dim:
        raise ValueError(f"y must have shape (E', N, T, {model.state_dim}), got {getattr(y, 'shape', y)}")
    generator = generator or torch.Generator().manual_seed(0)
    codes = torch.zeros(y.shape[0], model.codes.shape[1], dtype=model.codes.dtype, requires_grad=True)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([codes], lr=lr)
    eps = EpsilonSchedule(eps0, eps_decay, _eps_every(iters, eps_every))

    def step(m, _batch):
        loss = (forecast(m.bind(codes), y, t, eps.value, generator) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        eps.tick()
        return loss

    try:
        hist = fit(model, opt, step_batches(tuple), epochs=iters, step=step, progress=progress, desc="adapt ξ")
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
    return codes.detach(), hist


def linear_r2(features: np.ndarray, targets: np.ndarray, eval_features: Optional[np.ndarray] = None,
              eval_targets: Optional[np.ndarray] = None) -> dict:
    """Least-squares regression ``targets ≈ [features, 1] B``; R² per target column on the fit set (and on an
    optional held-out set, with the same B)."""
    X = np.concatenate([features, np.ones((len(features), 1))], 1)
    B, *_ = np.linalg.lstsq(X, targets, rcond=None)

    def r2(Xf, Y):
        res = ((Y - Xf @ B) ** 2).sum(0)
        tot = ((Y - Y.mean(0)) ** 2).sum(0)
        return (1 - res / np.maximum(tot, 1e-300)).tolist()

    out = {"r2_fit": r2(X, targets), "coef": B.tolist()}
    if eval_features is not None:
        Xe = np.concatenate([eval_features, np.ones((len(eval_features), 1))], 1)
        out["r2_heldout"] = r2(Xe, eval_targets)
        out["pred_heldout"] = (Xe @ B).tolist()
    return out
