"""The energy network, reasoning as gradient descent on the energy (truncated backprop), minimum-energy
selection, the IREM training step with replayed optimisation states, and evaluation over reasoning steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..buffers import ReplayBuffer
from ..models import MLP


class EnergyMLP(nn.Module):
    """``E_θ(x, y) = MLP([y, x])``: ``(B, dim_x), (B, dim_y) -> (B,)``.

    ``depth`` hidden layers of width ``hidden`` with SiLU (swish) between them; the input and hidden
    layers are ``layer`` (``"monarch"``: :class:`monarch_kernels.layers.MonarchLinear` with ``nblocks`` blocks), the
    scalar output layer is dense. Official: ``hidden=512, depth=3``.
    """

    def __init__(self, dim_x: int, dim_y: int, hidden: int = 256, depth: int = 3, layer: str = "monarch",
                 nblocks: int = 4):
        super().__init__()
        for name, v in (("dim_x", dim_x), ("dim_y", dim_y), ("hidden", hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"EnergyMLP: {name} must be a positive int, got {v!r}")
        self.dim_x, self.dim_y = dim_x, dim_y
        self.net = MLP(dim_y + dim_x, hidden, 1, depth=depth, layer=layer, nblocks=nblocks, activation=nn.SiLU,
                       dense_ends=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_xy(x, y, self.dim_x, self.dim_y, "EnergyMLP")
        return self.net(torch.cat([y, x], dim=-1)).squeeze(-1)


def _check_xy(x: Tensor, y: Tensor, dim_x: Optional[int], dim_y: Optional[int], fn: str) -> None:
    for name, t, d in (("x", x, dim_x), ("y", y, dim_y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2 or (d is not None and t.shape[1] != d):
            want = f"(B, {d})" if d is not None else "(B, features)"
            raise ValueError(f"{fn}: {name} must have shape {want}, got {tuple(t.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")


def energy_grad(energy: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, *,
                create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """``(E_θ(x, y) (B,), ∇_y Σ_b E_θ(x_b, y_b) (B, dim_y))``.

    With ``create_graph=True`` the gradient is itself differentiable (w.r.t. θ and y): double backward
    through the energy network. ``y`` is used as given if it already requires grad (so a differentiable
    trajectory stays connected), otherwise a grad-requiring alias is made.
    """
    _check_xy(x, y, None, None, "energy_grad")
    with torch.enable_grad():
        if not y.requires_grad:
            y = y.detach().requires_grad_(True)
        e = energy(x, y)
        if e.shape != (y.shape[0],):
            raise ValueError(f"energy_grad: energy(x, y) must return shape ({y.shape[0]},), got {tuple(e.shape)}")
        (g,) = torch.autograd.grad(e.sum(), y, create_graph=create_graph)
    return e, g


def energy_step(energy: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, step_lr: float, *,
                create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """One reasoning step ``y' = y − λ ∇_y E_θ(x, y)``; returns ``(y', E_θ(x, y))``."""
    e, g = energy_grad(energy, x, y, create_graph=create_graph)
    y_next = y - step_lr * g
    return (y_next if create_graph else y_next.detach()), e


@dataclass
class Trajectory:
    """Iterates ``ys (T+1, B, dim_y)`` (``ys[0] = y⁰``), energies ``(T+1, B)`` with ``energies[t] = E(x, y^t)``
    (the last entry is NaN unless ``final_energy``) and ``y = ys[-1]`` (differentiable when trained)."""

    y: Tensor
    ys: Tensor
    energies: Tensor


def _detached_params(module: nn.Module) -> Optional[dict]:
    return {n: p.detach() for n, p in module.named_parameters()} if isinstance(module, nn.Module) else None


def energy_descent(energy: Callable[[Tensor, Tensor], Tensor], x: Tensor, y0: Tensor, steps: int, step_lr: float, *,
                   grad_steps: int = 0, final_energy: bool = True) -> Trajectory:
    """Run ``steps`` iterations of ``y^{t+1} = y^t − λ ∇_y E_θ(x, y^t)`` from ``y0 (B, dim_y)``.

    ``grad_steps`` of the last steps are differentiable w.r.t. θ (``create_graph=True``):
    ``0`` for inference, ``1`` for the official truncated backprop, ``steps`` for a full unroll. When
    ``0 < grad_steps < steps`` the iterate entering the differentiable tail is detached and the earlier
    steps use detached parameters (no weight gradients are computed for them). With ``grad_steps=steps``
    ``y0`` is used as given (a ``y0`` that requires grad receives a gradient).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"energy_descent: steps must be a non-negative int, got {steps!r}")
    if not isinstance(grad_steps, int) or not 0 <= grad_steps <= steps:
        raise ValueError(f"energy_descent: grad_steps must be an int in [0, steps={steps}], got {grad_steps!r}")
    _check_xy(x, y0, None, None, "energy_descent")
    frozen_params = _detached_params(energy)
    frozen = (lambda a, b: functional_call(energy, frozen_params, (a, b))) if frozen_params is not None else energy
    y = y0 if grad_steps == steps else y0.detach()
    ys, es = [y.detach()], []
    for t in range(steps):
        differentiable = t >= steps - grad_steps
        if differentiable and t == steps - grad_steps and grad_steps < steps:
            y = y.detach()
        y, e = energy_step(energy if differentiable else frozen, x, y, step_lr, create_graph=differentiable)
        ys.append(y.detach())
        es.append(e.detach())
    if final_energy:
        with torch.no_grad():
            es.append(energy(x, y.detach()).detach())
    else:
        es.append(torch.full_like(ys[0][:, 0], float("nan")))
    return Trajectory(y, torch.stack(ys), torch.stack(es))


def min_energy_select(ys: Tensor, energies: Tensor) -> tuple[Tensor, Tensor]:
    """Per problem, the iterate of minimum energy: ``ys (T+1, B, D)``, ``energies (T+1, B)`` ->
    ``(y (B, D), index (B,))`` with ``index[b] = argmin_t energies[t, b]`` (NaN energies are never picked)."""
    if ys.dim() != 3 or energies.dim() != 2 or ys.shape[:2] != energies.shape:
        raise ValueError(f"min_energy_select: need ys (T+1, B, D) and energies (T+1, B), got {tuple(ys.shape)} "
                         f"and {tuple(energies.shape)}")
    idx = torch.nan_to_num(energies, nan=float("inf")).argmin(0)
    return ys[idx, torch.arange(ys.shape[1], device=ys.device)], idx


def irem_train_step(energy: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, target: Tensor, *,
                    steps: int = 10, step_lr: float = 10.0, grad_steps: int = 1,
                    buffer: Optional[ReplayBuffer] = None, generator: Optional[torch.Generator] = None) -> dict:
    """One IREM update on fresh problems ``x (B, dim_x)`` with answers ``target (B, dim_y)``.

    Fresh problems start at ``y⁰ ~ U(-1, 1)``; when ``buffer`` holds ≥ B states, B replayed
    ``(x, y_state, y*)`` are appended and continue from ``y_state``. Loss ``mean_b mean_j (y^K − y*)²``,
    one optimizer step, then the whole batch is pushed into ``buffer`` with its new ``y^K``.
    Returns ``{"loss", "loss_fresh", "energy_start", "energy_end", "steps"}`` (``steps``: the descent steps run).
    """
    _check_xy(x, target, None, None, "irem_train_step")
    b = x.shape[0]
    y0 = torch.rand(target.shape, generator=generator).to(target) * 2 - 1
    if buffer is not None and len(buffer) >= b:
        xr, yr, tr = buffer.sample(b, replace=True)
        x, y0, target = torch.cat([x, xr.to(x)]), torch.cat([y0, yr.to(y0)]), torch.cat([target, tr.to(target)])
    traj = energy_descent(energy, x, y0, steps, step_lr, grad_steps=grad_steps, final_energy=False)
    per = (traj.y - target).pow(2).mean(-1)
    loss = per.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if buffer is not None:
        buffer.add(x, traj.y.detach(), target)
    return {"loss": float(loss.detach()), "loss_fresh": float(per[:b].detach().mean()),
            "energy_start": float(traj.energies[0].mean()),
            "energy_end": float(traj.energies[-2].mean()) if steps else float("nan"), "steps": traj.ys.shape[0] - 1}


@torch.no_grad()
def evaluate_irem(energy: nn.Module, x: Tensor, target: Tensor, *, steps: int = 40, step_lr: float = 10.0,
                  report_steps=(5, 10, 20, 40), generator: Optional[torch.Generator] = None,
                  batch_size: int = 1000) -> dict:
    """Reason for ``steps`` steps from ``y⁰ ~ U(-1,1)`` and measure.

    Returns ``mse_at`` (``{t: MSE of y^t}`` for ``t`` in ``report_steps``), ``mse_curve`` (MSE of every
    iterate), ``energy_curve`` (mean energy of every iterate), ``mse_min_energy`` (MSE of the
    min-energy iterate), ``mean_min_energy_step``, ``energy_decrease_frac`` (fraction of (problem, step)
    pairs with ``E(y^{t+1}) ≤ E(y^t)``) and ``energy_end_below_start_frac`` (problems with ``E(y^T) < E(y⁰)``).
    """
    energy.eval()
    sq, en = [], []
    for i in range(0, x.shape[0], batch_size):
        xb, tb = x[i:i + batch_size], target[i:i + batch_size]
        y0 = torch.rand(tb.shape, generator=generator).to(tb) * 2 - 1
        traj = energy_descent(energy, xb, y0, steps, step_lr, grad_steps=0)
        sq.append((traj.ys - tb).pow(2).mean(-1))  # (T+1, b)
        en.append(traj.energies)
    energy.train()
    sq, en = torch.cat(sq, 1), torch.cat(en, 1)
    _, idx = min_energy_select(sq.unsqueeze(-1), en)
    mse_min = sq[idx, torch.arange(sq.shape[1])]
    return {
        "mse_at": {int(t): float(sq[t].mean()) for t in report_steps if t <= steps},
        "mse_curve": sq.mean(1).tolist(),
        "energy_curve": en.mean(1).tolist(),
        "mse_min_energy": float(mse_min.mean()),
        "mean_min_energy_step": float(idx.float().mean()),
        "energy_decrease_frac": float((en[1:] <= en[:-1]).float().mean()),
        "energy_end_below_start_frac": float((en[-1] < en[0]).float().mean()),
    }
