"""CoDA (Kirchmeyer, Yin, Donà, Baskiotis, Rakotomamonjy & Gallinari, ICML 2022): context-informed dynamics
adaptation, with a Monarch-parameterised dynamics network.

Model (paper §3; official code yuan-yin/CoDA, ``ode_model.py``/``network.py``)::

    du/dt = f(u; θ^e),       θ^e = θ_c + W ξ^e,      e = 1..E environments
    θ_c ∈ R^P   shared parameters of the dynamics network (``net_root``)
    W   ∈ R^{P×d_ξ}  linear hypernetwork without bias (``net_hyper = Linear(d_ξ, P, bias=False)``)
    ξ^e ∈ R^{d_ξ}    per-environment context, zero-initialised (``codes``, default d_ξ = 2)

    L = Σ_e MSE(û^e, u^e) + λ_m · Σ_i ‖W_{i,:}‖₂ + λ_c · ‖Ξ‖_F²        (``-r l12m-l2c``: λ_m = 1e-6, λ_c = 1e-4)

So every environment lives in an affine rank-d_ξ subspace of parameter space; the row group lasso makes most
parameters context-independent. Adaptation to a new environment freezes θ_c and W and fits a fresh ξ (zero
init) on **one** trajectory.

Monarch parameterisation. The dynamics MLP is ``state → h → h → h → state`` (official: 2→64→64→64→2 with a
learnable swish) whose hidden ``h → h`` layers are :class:`monarch_kernels.layers.MonarchLinear`. θ (and so each row of W)
covers the *Monarch factors* ``w1, w2`` (plus biases, the dense end layers and the swish slopes): the adapted
factors of environment e are ``w = w_c + reshape(W ξ^e)`` and the layer is applied functionally with
:func:`monarch_kernels.monarch_linear` on those factors, so W has as many rows as the Monarch network has
parameters (≈ half of the dense network's at h = 64, nblocks = 4).

Two numerically identical ways to apply the adapted Monarch layers (``apply=``):

* ``"factors"``: ``monarch_linear(h_e, w1_e, w2_e, b_e)`` per environment at every right-hand-side evaluation;
* ``"dense"`` (recipe default on CPU): the Monarch matrix of each environment is materialised once per forecast
  (``monarch_linear`` on an identity), then every evaluation is one batched matmul over environments. A forecast
  evaluates the RHS 4·(T−1) = 76 times on 4–32 states per environment, so the per-call overhead of the custom op
  dominates on CPU (≈ 0.2 ms per call here); materialising the 64×64 matrix once is both fewer FLOPs and ≈ 10×
  faster per training step here (measured side by side). The two paths agree to float64 round-off (tested).

Integration: ``torchdiffeq.odeint(method="rk4")`` on the observation grid (one RK4 step per dt), as the
official code. Teacher forcing (official ``Forecaster.forward``): with probability ε each observation time is a
restart point where integration restarts from the ground truth; ε starts at 0.99 and is multiplied by 0.99
every ``eps_every`` iterations (official: 30, over up to 120k iterations); below 1e-3 it is a free rollout.
Adaptation starts at ε = 0.95 (official ``adaptation.py``).

Deviations from the official code (documented, small-scale CPU budget):

* ε schedule compressed: the same 0.99 factor, but ``eps_every`` is chosen so that training reaches the free
  rollout at ~60 % of the iterations (official: after ~20.6k of 120k iterations);
* the final model is evaluated (the official code checkpoints the best in-distribution *test* MSE);
* ground truth from ``torchdiffeq`` dopri5 in float64 at rtol 1e-9 (official: scipy RK45 at default rtol 1e-3);
* all environments run as one batch of per-environment weights (official: a "ghost" group-conv network);
* the hypernetwork W is initialised like ``nn.Linear`` (as official), biases of θ_c at zero (official
  ``init_weights(init_type="default")``), Monarch factors with :class:`monarch_kernels.layers.MonarchLinear`'s init.

Lotka–Volterra (official ``data.py``/``train.py``/``adaptation.py``): ``dx/dt = αx − βxy``,
``dy/dt = δxy − γy``; α = γ = 0.5, β, δ ∈ {0.5, 0.75, 1.0} (9 training environments, 4 train / 32 test
trajectories each), horizon 10, dt 0.5 (20 points), x₀ ~ U[1, 2]² (the same initial conditions in every
environment); adaptation to β, δ ∈ {0.625, 1.125} (4 environments, 1 trajectory each).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint

from monarch_kernels import monarch_linear
from monarch_kernels.layers import MonarchLinear

from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, format_mean_std, paired, plot_curves
from .train import History, fit, step_batches

# --------------------------------------------------------------------------------------------------
# Lotka–Volterra (official parameter grids)
# --------------------------------------------------------------------------------------------------
#: training environments, in the official order (``train.py``)
LV_TRAIN_PARAMS = [
    {"alpha": 0.5, "beta": b, "gamma": 0.5, "delta": d}
    for b, d in [(0.5, 0.5), (0.75, 0.5), (1.0, 0.5), (0.5, 0.75), (0.5, 1.0), (0.75, 0.75), (0.75, 1.0),
                 (1.0, 0.75), (1.0, 1.0)]
]
#: new environments for adaptation (``adaptation.py``)
LV_ADAPT_PARAMS = [
    {"alpha": 0.5, "beta": b, "gamma": 0.5, "delta": d}
    for b, d in [(0.625, 0.625), (0.625, 1.125), (1.125, 0.625), (1.125, 1.125)]
]
LV_KEYS = ("alpha", "beta", "gamma", "delta")


def _lv_param_tensor(params, like: Tensor) -> Tensor:
    if isinstance(params, Tensor):
        p = params.to(like)
    else:
        if not isinstance(params, (list, tuple)) or not all(isinstance(d, dict) for d in params):
            raise TypeError("params must be a list of dicts with keys alpha, beta, gamma, delta, or an (E, 4) tensor")
        missing = [k for d in params for k in LV_KEYS if k not in d]
        if missing:
            raise ValueError(f"params: every dict needs keys {LV_KEYS}, missing {sorted(set(missing))}")
        p = torch.tensor([[d[k] for k in LV_KEYS] for d in params], dtype=like.dtype, device=like.device)
    if p.dim() != 2 or p.shape[1] != 4:
        raise ValueError(f"params must have shape (E, 4) = (envs, [alpha, beta, gamma, delta]), got {tuple(p.shape)}")
    return p


def lotka_volterra_rhs(u: Tensor, params) -> Tensor:
    """``d(x, y)/dt = (αx − βxy, δxy − γy)`` for states ``u (E, ..., 2)`` and ``params`` (E dicts or ``(E, 4)``)."""
    if not isinstance(u, Tensor) or u.dim() < 2 or u.shape[-1] != 2:
        raise ValueError(f"u must be a tensor of shape (E, ..., 2), got {getattr(u, 'shape', u)}")
    p = _lv_param_tensor(params, u)
    if p.shape[0] != u.shape[0]:
        raise ValueError(f"params has {p.shape[0]} environments but u has {u.shape[0]} (u: (E, ..., 2))")
    a, b, g, d = (p[:, i].view(-1, *([1] * (u.dim() - 2))) for i in range(4))
    x, y = u[..., 0], u[..., 1]
    return torch.stack([a * x - b * x * y, d * x * y - g * y], dim=-1)


def lotka_volterra_invariant(u: Tensor, params) -> Tensor:
    """The conserved quantity ``V = δx − γ ln x + βy − α ln y`` of each state, shape ``u.shape[:-1]``."""
    p = _lv_param_tensor(params, u)
    a, b, g, d = (p[:, i].view(-1, *([1] * (u.dim() - 2))) for i in range(4))
    x, y = u[..., 0], u[..., 1]
    return d * x - g * torch.log(x) + b * y - a * torch.log(y)


def simulate_lotka_volterra(params, n_traj: int, *, t_horizon: float = 10.0, dt: float = 0.5, seed: int = 0,
                            dtype: torch.dtype = torch.float32, rtol: float = 1e-9,
                            atol: float = 1e-11) -> tuple[Tensor, Tensor]:
    """Trajectories ``(E, n_traj, T, 2)`` on ``t = arange(0, t_horizon, dt)`` (T = 20 by default) and ``t``.

    Initial conditions ``x₀ ~ U[1, 2]²`` from ``seed``, shared by all environments (as the official code,
    which seeds each trajectory by its index). Integrated with torchdiffeq dopri5 in float64.
    """
    if not isinstance(n_traj, int) or n_traj < 1:
        raise ValueError(f"n_traj must be a positive int, got {n_traj!r}")
    if dt <= 0 or t_horizon <= dt:
        raise ValueError(f"need 0 < dt < t_horizon, got dt={dt}, t_horizon={t_horizon}")
    gen = torch.Generator().manual_seed(seed)
    u0 = 1.0 + torch.rand(n_traj, 2, generator=gen, dtype=torch.float64)
    t = torch.arange(0.0, t_horizon, dt, dtype=torch.float64)
    p = _lv_param_tensor(params, u0)
    y0 = u0.unsqueeze(0).expand(p.shape[0], n_traj, 2).contiguous()
    sol = odeint(lambda _t, u: lotka_volterra_rhs(u, p), y0, t, method="dopri5", rtol=rtol, atol=atol)
    return sol.permute(1, 2, 0, 3).to(dtype).contiguous(), t.to(dtype)


# --------------------------------------------------------------------------------------------------
# The hyper-parameterised Monarch dynamics network
# --------------------------------------------------------------------------------------------------
def swish(x: Tensor, beta: Tensor) -> Tensor:
    """Official learnable swish: ``x · sigmoid(x · softplus(β)) / 1.1``."""
    return x * torch.sigmoid(x * F.softplus(beta)) / 1.1


class _RootNet(nn.Module):
    """θ_c: ``state → h (dense) → h (Monarch) ×(depth−1) → state (dense)`` with one swish slope per hidden layer."""

    def __init__(self, state_dim: int, hidden: int, depth: int, nblocks: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(state_dim, hidden)])
        for _ in range(depth - 1):
            self.layers.append(MonarchLinear(hidden, hidden, nblocks=nblocks))
        self.layers.append(nn.Linear(hidden, state_dim))
        self.betas = nn.Parameter(torch.full((depth,), 0.5))
        with torch.no_grad():  # official init_weights(init_type="default"): weights default, biases 0
            for layer in self.layers:
                layer.bias.zero_()


MODES = ("coda", "shared", "independent")
APPLY = ("dense", "factors")


class HyperMonarchDynamics(nn.Module):
    """``f(u; θ^e)`` for ``n_env`` environments at once, θ^e from one of three parameterisations:

    * ``mode="coda"``: ``θ^e = θ_c + W ξ^e`` (``self.hyper.weight`` is W of shape ``(P, code_dim)``,
      ``self.codes`` is Ξ of shape ``(n_env, code_dim)``, zero-initialised);
    * ``mode="shared"``: ``θ^e = θ_c`` (one model for all environments: ERM, no context);
    * ``mode="independent"``: one independently initialised θ^e per environment (trained from scratch).

    ``forward(t, u)`` takes ``u (n_env, B, state_dim)`` and returns ``du/dt`` of the same shape, so an instance is
    a torchdiffeq RHS; :meth:`bind` precomputes the per-environment weights once per forecast (much faster).
    """

    def __init__(self, n_env: int, state_dim: int = 2, hidden: int = 64, depth: int = 3, nblocks: int = 4,
                 code_dim: int = 2, mode: str = "coda", apply: str = "dense", factor: float = 1.0):
        super().__init__()
        for name, v in (("n_env", n_env), ("state_dim", state_dim), ("hidden", hidden), ("depth", depth),
                        ("nblocks", nblocks), ("code_dim", code_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"HyperMonarchDynamics: {name} must be a positive int, got {v!r}")
        if depth < 2:
            raise ValueError(f"HyperMonarchDynamics: depth (hidden layers) must be >= 2, got {depth}")
        if mode not in MODES:
            raise ValueError(f"HyperMonarchDynamics: mode must be one of {MODES}, got {mode!r}")
        if apply not in APPLY:
            raise ValueError(f"HyperMonarchDynamics: apply must be one of {APPLY}, got {apply!r}")
        self.n_env, self.state_dim, self.mode, self.apply, self.factor = n_env, state_dim, mode, apply, factor
        self.root = _RootNet(state_dim, hidden, depth, nblocks)
        self.param_names = [n for n, _ in self.root.named_parameters()]
        self.param_shapes = [p.shape for _, p in self.root.named_parameters()]
        self.n_params = sum(p.numel() for p in self.root.parameters())
        if mode == "coda":
            self.codes = nn.Parameter(torch.zeros(n_env, code_dim))
            self.hyper = nn.Linear(code_dim, self.n_params, bias=False)
        elif mode == "independent":  # E independently initialised copies of θ, stacked on a leading env dim
            copies = [self.root] + [_RootNet(state_dim, hidden, depth, nblocks) for _ in range(n_env - 1)]
            self.env_theta = nn.ParameterList(
                [nn.Parameter(torch.stack([dict(c.named_parameters())[n].detach() for c in copies]))
                 for n in self.param_names])
            self.root.requires_grad_(False)

    # -- parameters ---------------------------------------------------------------------------------
    def theta_c(self) -> Tensor:
        """θ_c flattened, shape ``(P,)`` (the order of ``param_names``)."""
        return torch.cat([p.reshape(-1) for p in self.root.parameters()])

    def hyper_delta(self, codes: Optional[Tensor] = None) -> Tensor:
        """``W ξ^e`` for every environment, shape ``(E, P)``."""
        if self.mode != "coda":
            raise ValueError(f"hyper_delta needs mode='coda', this model has mode={self.mode!r}")
        codes = self.codes if codes is None else codes
        if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.shape[1] != self.hyper.in_features:
            raise ValueError(f"codes must have shape (E, {self.hyper.in_features}), got {getattr(codes, 'shape', codes)}")
        return self.hyper(codes)

    def env_params(self, codes: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``{name: (E or 1, *shape)}``: the parameters θ^e of every environment (leading dim 1 = shared).

        For ``mode="coda"``: ``θ_c + reshape(W ξ^e)``; ``codes`` replaces Ξ (e.g. fresh contexts for adaptation).
        """
        if self.mode == "shared":
            return {n: p.unsqueeze(0) for n, p in self.root.named_parameters()}
        if self.mode == "independent":
            return dict(zip(self.param_names, self.env_theta))
        delta = self.hyper_delta(codes)
        out, start = {}, 0
        for (n, p), shape in zip(self.root.named_parameters(), self.param_shapes):
            k = p.numel()
            out[n] = p.unsqueeze(0) + delta[:, start:start + k].reshape(-1, *shape)
            start += k
        return out

    # -- the right-hand side ------------------------------------------------------------------------
    def bind(self, codes: Optional[Tensor] = None, apply: Optional[str] = None) -> Callable[[Tensor, Tensor], Tensor]:
        """A torchdiffeq RHS ``f(t, u)`` for ``u (E, B, state_dim)`` with θ^e computed once (and, for
        ``apply="dense"``, the Monarch matrices materialised once per environment)."""
        apply = apply or self.apply
        if apply not in APPLY:
            raise ValueError(f"apply must be one of {APPLY}, got {apply!r}")
        th = self.env_params(codes)
        n_layers = len(self.root.layers)
        mats, biases = [], []
        for i, layer in enumerate(self.root.layers):
            b = th[f"layers.{i}.bias"]
            biases.append(b.unsqueeze(1))  # (E, 1, out)
            if isinstance(layer, MonarchLinear):
                w1, w2 = th[f"layers.{i}.w1"], th[f"layers.{i}.w2"]
                if apply == "dense":
                    eye = torch.eye(layer.in_features, dtype=w1.dtype, device=w1.device)
                    mats.append(torch.stack([monarch_linear(eye, w1[e], w2[e], out_features=layer.out_features)
                                             for e in range(w1.shape[0])]))  # (E, in, out) = M_eᵀ
                else:
                    mats.append((w1, w2, layer.out_features))
            else:
                mats.append(th[f"layers.{i}.weight"].transpose(1, 2))  # (E, in, out)
        slopes = F.softplus(th["betas"])  # (E, depth), once per forecast
        factor = self.factor
        if apply == "dense":
            # swish(z) = z·σ(a z)/1.1 = silu(a z)/(1.1 a): fold a into this layer's weight and bias and 1/(1.1 a)
            # into the next layer's weight, so every evaluation is baddbmm + silu per layer (7 ops in all)
            fused_w, fused_b = [], []
            for i in range(n_layers):
                w, bias = mats[i], biases[i]
                if i > 0:
                    w = w / (1.1 * slopes[:, i - 1]).view(-1, 1, 1)
                if i < n_layers - 1:
                    w, bias = w * slopes[:, i].view(-1, 1, 1), bias * slopes[:, i].view(-1, 1, 1)
                fused_w.append(w)
                fused_b.append(bias)

            def rhs(_t, u: Tensor) -> Tensor:
                h = u
                for i in range(n_layers):
                    w = fused_w[i]
                    h = torch.baddbmm(fused_b[i], h, w if w.shape[0] == h.shape[0] else w.expand(h.shape[0], -1, -1))
                    if i < n_layers - 1:
                        h = F.silu(h)
                return h * factor if factor != 1.0 else h

            return rhs

        def rhs(_t, u: Tensor) -> Tensor:  # apply="factors": monarch_linear on the adapted factors, per env
            h = u
            for i in range(n_layers):
                m = mats[i]
                if isinstance(m, tuple):
                    w1, w2, n_out = m
                    b = biases[i]
                    h = torch.stack([monarch_linear(h[e], w1[e if w1.shape[0] > 1 else 0],
                                                    w2[e if w2.shape[0] > 1 else 0],
                                                    b[e if b.shape[0] > 1 else 0, 0], out_features=n_out)
                                     for e in range(h.shape[0])])
                else:
                    h = torch.matmul(h, m) + biases[i]
                if i < n_layers - 1:
                    h = h * torch.sigmoid(h * slopes[:, i].view(-1, 1, 1)) / 1.1  # swish(h, β_i)
            return h * factor if factor != 1.0 else h

        return rhs

    def forward(self, t: Tensor, u: Tensor) -> Tensor:
        self._check_state(u)
        return self.bind()(t, u)

    def _check_state(self, u: Tensor) -> None:
        if not isinstance(u, Tensor) or u.dim() != 3 or u.shape[0] != self.n_env or u.shape[2] != self.state_dim:
            raise ValueError(f"u must have shape (n_env={self.n_env}, B, {self.state_dim}), "
                             f"got {getattr(u, 'shape', u)}")


# --------------------------------------------------------------------------------------------------
# Regularisers, forecasting with teacher forcing, training and adaptation
# --------------------------------------------------------------------------------------------------
def group_lasso_rows(weight: Tensor) -> Tensor:
    """``Σ_i ‖W_{i,:}‖₂`` over the rows of the hypernetwork weight ``(P, d_ξ)`` (official ``l12m``).

    The gradient of a zero row is 0 (the minimum-norm subgradient), never NaN."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (P, code_dim) tensor, got {getattr(weight, 'shape', weight)}")
    sq = weight.pow(2).sum(1)
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq)).sum()


def code_l2(codes: Tensor) -> Tensor:
    """``‖Ξ‖_F²`` (official ``l2c``)."""
    return codes.pow(2).sum()


def coda_regulariser(model: HyperMonarchDynamics, lambda_m: float = 1e-6, lambda_c: float = 1e-4) -> Tensor:
    """``λ_m Σ_i ‖W_{i,:}‖₂ + λ_c ‖Ξ‖_F²`` (zero for the non-CoDA modes)."""
    if model.mode != "coda":
        return torch.zeros(())
    return lambda_m * group_lasso_rows(model.hyper.weight) + lambda_c * code_l2(model.codes)


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


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    seeds: int = option(3, "number of seeds (seed, seed+1, ...): initial conditions and initialisation")
    iters: int = option(1500, "training iterations")
    adapt_iters: int = option(500, "adaptation iterations")
    hidden: int = option(64, "dynamics MLP width")
    nblocks: int = option(4, "Monarch blocks of the hidden layers")
    code_dim: int = option(2, "context dimension d_ξ")
    lr: float = option(1e-3, "Adam learning rate")
    lambda_m: float = option(1e-6, "row group lasso on W (official l12m)")
    lambda_c: float = option(1e-4, "L2 on the contexts (official l2c)")
    eps_every: Optional[int] = option(None, "iterations between ε ← 0.99 ε (default: free rollout from ~60% of "
                                            "training)")
    apply: str = option("dense", "how adapted Monarch layers are applied", choices=APPLY)
    n_test: int = option(32, "test trajectories per environment")


QUICK = {"seeds": 1, "iters": 40, "adapt_iters": 10, "n_test": 4, "lr": 1e-2}


def run_seed(cfg: Config, seed: int, ctx: RunContext) -> dict:
    """ERM, per-environment models and CoDA on the 9 training environments; adaptation to the 4 new ones from one
    trajectory each (CoDA fits ξ alone; baselines: a new model per environment from scratch on the same
    trajectory with the training budget, and the ERM model as is); R² of (β, δ) regressed on the contexts."""
    y_tr, t = simulate_lotka_volterra(LV_TRAIN_PARAMS, 4, seed=seed)
    y_te, _ = simulate_lotka_volterra(LV_TRAIN_PARAMS, cfg.n_test, seed=seed + 10_000)
    y_ad, _ = simulate_lotka_volterra(LV_ADAPT_PARAMS, 1, seed=seed + 20_000)
    y_ad_te, _ = simulate_lotka_volterra(LV_ADAPT_PARAMS, cfg.n_test, seed=seed + 30_000)
    E, E_new = len(LV_TRAIN_PARAMS), len(LV_ADAPT_PARAMS)
    kw = dict(hidden=cfg.hidden, nblocks=cfg.nblocks, code_dim=cfg.code_dim, apply=cfg.apply)
    common = dict(lr=cfg.lr, lambda_m=cfg.lambda_m, lambda_c=cfg.lambda_c, eps_every=cfg.eps_every)

    def gen(k):
        return torch.Generator().manual_seed(seed * 1000 + k)

    torch.manual_seed(seed)
    models = {"shared (ERM)": HyperMonarchDynamics(E, mode="shared", **kw),
              "per-env from scratch": HyperMonarchDynamics(E, mode="independent", **kw),
              "CoDA": HyperMonarchDynamics(E, mode="coda", **kw)}
    hists = {name: train_dynamics(m, y_tr, t, iters=cfg.iters, generator=gen(k), progress=ctx.progress, desc=name,
                                  **common) for k, (name, m) in enumerate(models.items())}
    in_domain = {name: evaluate_mse(m, y_te, t) for name, m in models.items()}
    coda = models["CoDA"]
    codes_new, hists["CoDA adapt ξ"] = adapt_codes(coda, y_ad, t, iters=cfg.adapt_iters, lr=cfg.lr, generator=gen(7),
                                                   progress=ctx.progress, eps_every=cfg.eps_every)
    torch.manual_seed(seed + 1)
    scratch = HyperMonarchDynamics(E_new, mode="independent", **kw)
    hists["from scratch (1 traj)"] = train_dynamics(scratch, y_ad, t, iters=cfg.iters, generator=gen(8),
                                                    progress=ctx.progress, desc="scratch 1 traj", **common)
    erm_new = HyperMonarchDynamics(E_new, mode="shared", **kw)
    erm_new.root.load_state_dict(models["shared (ERM)"].root.state_dict())
    adapt = {"CoDA (ξ only)": evaluate_mse(coda, y_ad_te, t, codes_new),
             "per-env from scratch (1 traj)": evaluate_mse(scratch, y_ad_te, t),
             "shared (ERM), no adaptation": evaluate_mse(erm_new, y_ad_te, t)}
    ctx.observe(iters=hists["CoDA"].epochs, adapt_iters=hists["CoDA adapt ξ"].epochs, n_test=y_te.shape[1],
                hidden=coda.root.layers[0].out_features, lr=hists["CoDA"].lrs[0])
    codes = coda.codes.detach().numpy()
    reg = linear_r2(codes, np.array([[p["beta"], p["delta"]] for p in LV_TRAIN_PARAMS]), codes_new.numpy(),
                    np.array([[p["beta"], p["delta"]] for p in LV_ADAPT_PARAMS]))
    with torch.no_grad():
        preds = {"CoDA": forecast(coda.bind(codes_new), y_ad_te, t), "scratch": forecast(scratch.bind(), y_ad_te, t),
                 "ERM": forecast(erm_new.bind(), y_ad_te, t)}
    # reference: a model without dynamics that holds the initial state (du/dt = 0)
    in_domain["initial state held"] = (y_te - y_te[:, :, :1]).pow(2).mean(dim=(1, 2, 3))
    adapt["initial state held"] = (y_ad_te - y_ad_te[:, :, :1]).pow(2).mean(dim=(1, 2, 3))
    return {"in_domain_mse": {k: float(v.mean()) for k, v in in_domain.items()},
            "adaptation_mse": {k: float(v.mean()) for k, v in adapt.items()},
            "context_r2": dict(zip(("beta", "delta"), reg["r2_fit"])),
            "adapted_context_r2": dict(zip(("beta", "delta"), reg["r2_heldout"])),
            "diagnostics": {"in_domain_mse_per_env": {k: v.tolist() for k, v in in_domain.items()},
                            "adaptation_mse_per_env": {k: v.tolist() for k, v in adapt.items()},
                            "codes": codes.tolist(), "adapted_codes": codes_new.tolist(),
                            "adapted_context_pred_beta_delta": reg["pred_heldout"],
                            "hyper_row_norm_quantiles": torch.quantile(coda.hyper.weight.detach().norm(dim=1),
                                                                       torch.tensor([0.1, 0.5, 0.9])).tolist(),
                            "n_params_theta": coda.n_params, "hypernet_shape": list(coda.hyper.weight.shape)},
            "curves": {k: h.losses for k, h in hists.items()}, "trajectories": {"truth": y_ad_te[0, 0], **{k: v[0, 0] for k, v in preds.items()}}}


def run(cfg: Config, ctx: RunContext) -> dict:
    ctx.log(f"[coda] LV: {len(LV_TRAIN_PARAMS)} train envs × 4 traj, {len(LV_ADAPT_PARAMS)} new envs × 1 traj; "
            f"{cfg.iters} iters, {cfg.adapt_iters} adaptation iters, {cfg.seeds} seeds")
    per_seed = [run_seed(cfg, seed, ctx) for seed in seed_list(ctx.seed, cfg.seeds)]
    ctx.observe(seeds=len(per_seed))
    keys = ("in_domain_mse", "adaptation_mse", "context_r2", "adapted_context_r2")
    summary = aggregate([{k: r[k] for k in keys} for r in per_seed])
    comparisons = {
        "erm_minus_coda_in_domain": paired([r["in_domain_mse"]["shared (ERM)"] for r in per_seed],
                                           [r["in_domain_mse"]["CoDA"] for r in per_seed]),
        "scratch_minus_coda_adaptation": paired([r["adaptation_mse"]["per-env from scratch (1 traj)"] for r in per_seed],
                                                [r["adaptation_mse"]["CoDA (ξ only)"] for r in per_seed])}
    for k in ("in_domain_mse", "adaptation_mse"):
        ctx.log(f"[coda] {k}: " + "; ".join(f"{n} {format_mean_std(v, 6)}" for n, v in summary[k].items()))
    first = per_seed[0]
    tr = first["trajectories"]
    plot_curves(ctx.plot_path("coda.png"), [
        Panel("training MSE (teacher-forced early)", {k: (range(len(c)), c) for k, c in first["curves"].items()},
              xlabel="iteration", logy=True),
        Panel("learned contexts ξ (train: β, δ of each environment)", kind="scatter", series={
            "train": ([c[0] for c in first["diagnostics"]["codes"]],
                      [c[-1] for c in first["diagnostics"]["codes"]],
                      [f"β{p['beta']:.2g},δ{p['delta']:.2g}" for p in LV_TRAIN_PARAMS]),
            "adapted": ([c[0] for c in first["diagnostics"]["adapted_codes"]],
                        [c[-1] for c in first["diagnostics"]["adapted_codes"]],
                        [f"β{p['beta']:.3g},δ{p['delta']:.3g}" for p in LV_ADAPT_PARAMS])}),
        Panel("new environment 0, test trajectory 0 (prey x)",
              {k: (range(len(v)), [float(p[0]) for p in v]) for k, v in tr.items()}, xlabel="time step")],
        title=f"CoDA on Lotka–Volterra (seed {ctx.seed})")
    return {"system": "lotka_volterra", "seeds": seed_list(ctx.seed, cfg.seeds), "summary": summary,
            "paired": comparisons, "per_seed": [{k: r[k] for k in keys + ("diagnostics",)} for r in per_seed]}


RECIPE = Recipe("coda", Config, run, quick=QUICK,
                description="CoDA: θ^e = θ_c + Wξ^e over a Monarch dynamics MLP on Lotka–Volterra; ERM vs per-env vs "
                            "CoDA, adaptation of ξ on one trajectory, R² of (β, δ) on the contexts")
