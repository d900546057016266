"""Lotka–Volterra dynamics with the official training and adaptation parameter grids, its invariant, and the
float64 dopri5 ground truth."""
from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint



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
