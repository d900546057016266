"""IREM: iterative reasoning as energy minimisation (Du, Li, Tenenbaum, Mordatch, ICML 2022).

An energy network ``E_θ(x, y) -> R`` scores a candidate answer ``y`` for a problem ``x``; the answer is
found by gradient descent on the energy, starting from noise::

    y⁰ ~ U(-1, 1),     y^{t+1} = y^t − λ ∇_y E_θ(x, y^t),    t = 0 .. K−1            (1)

and θ is trained so that the K-th iterate solves the problem, ``L(θ) = mean ‖y^K − y*‖²`` (MSE on the final
step only). Harder problems are solved by running (1) for more steps at test time, and the energy itself
says when to stop (the iterate of minimum energy).

What the official code (yilundu/irem_code_release, ``train.py``/``models.py``) does beyond the abstract,
and what this module follows:

* **energy network**: an MLP on ``[y, x]`` with swish (SiLU) activations, ``(dy+dx) → h → h → h → 1``
  (h = 512 there). Here the first and hidden layers are :class:`monarch_kernels.layers.MonarchLinear` (built through
  :class:`methods.models.MLP`), the scalar head is dense. Gradient descent on E with ``create_graph=True``
  therefore runs double backward through the Monarch ops.
* **truncated backprop** (``grad_steps=1``, the official default): steps ``1..K−1`` compute ``∇_y E``
  without a graph, so θ receives gradient only through the last step ``−λ ∇_y E_θ(x, y^{K−1})``.
  ``grad_steps=K`` is the official ``--no_truncate`` (full unroll). Here the iterate entering the first
  differentiable step is *detached*: no gradient reaches ``y⁰`` or the truncated steps (in the official
  code ``y^{K−1}`` stays connected to ``y⁰`` through the identity path, which carries no gradient to θ,
  so θ's gradient is the same). The truncated steps also run with detached parameters, so the Monarch
  backward computes no weight gradients there (the ops decide from ``requires_grad`` alone).
* **step size** ``λ = step_lr`` is large (100 in the paper's 20×20 runs): the network learns the scale.
  No Langevin noise (the official code creates a noise tensor and never uses it).
* **replay buffer of optimisation states** (FIFO ring, 10 000 entries): once it holds ≥ B entries, every
  batch is B fresh problems (from ``y⁰ ~ U(-1,1)``) plus B stored ``(x, y_state, y*)`` that continue from
  their stored iterate; afterwards the whole batch is pushed back with its new ``y^K``. Replayed problems
  thus see many more steps than K without backprop through them.
* **test**: run many steps (80 there) from ``y⁰ ~ U(-1,1)``; report the error at a few step counts and at
  the step of **minimum energy**. The official test picks the iterate after the step at which the
  energy *before* the step was lowest (an off-by-one); :func:`min_energy_select` evaluates the energy
  at every iterate ``y⁰..y^T`` and picks the argmin iterate itself.
* **tasks** (official ``dataset.py``): inverse of ``A = 2RRᵀ + 0.5 I`` with ``R ~ U(-1,1)``, harder OOD
  ``A = 2RRᵀ + 0.1 I`` (worse conditioned, larger answers); addition ``y = A + B`` with entries
  ``U(-1,1)``, OOD ``U(-2.5, 2.5)``. The baseline is a feed-forward MLP ``x → y`` trained with MSE.

The recipe (``python -m methods irem``) trains IREM (hidden 256, K = 10, truncated backprop, replay buffer,
Adam 1e-3, 4000 iterations of 128 fresh + 128 replayed problems; λ = 1 for inverse and 10 for addition, chosen
from {1, 10, 100} at this scale) and the feed-forward baseline (same MLP shape and iterations, MSE) on 5×5
inverse (``--tasks inverse,addition`` adds 4×4 addition) with fresh samples every step, and reports the MSE at
5/10/20/40 steps and at the minimum-energy step, in distribution and out of distribution, with the energy along
the trajectory. (With 1500 iterations IREM was still behind the baseline out of distribution on inverse; the
OOD advantage of more reasoning steps appeared with longer training.)
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .buffers import ReplayBuffer
from .models import MLP
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, plot_curves
from .train import fit, step_batches

__all__ = [
    "EnergyMLP",
    "Trajectory",
    "energy_grad",
    "energy_step",
    "energy_descent",
    "min_energy_select",
    "irem_train_step",
    "evaluate_irem",
    "make_task",
    "RECIPE",
]


# --------------------------------------------------------------------------------------------------
# energy network
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# energy descent (the reasoning)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# training and evaluation
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------

TASKS = ("inverse", "addition")
#: λ per task, chosen from {1, 10, 100} at this small scale (5×5 inverse, 4×4 addition, 1000-1500 iterations)
DEFAULT_STEP_LR = {"inverse": 1.0, "addition": 10.0}


def make_task(name: str, n: int, size: int, *, ood: bool = False,
              generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """``n`` problems ``(x (n, dim_x), y* (n, dim_y))`` (float32) of the official matrix tasks.

    ``inverse``: ``x = A``, ``y* = A⁻¹`` with ``A = 2RRᵀ + c I``, ``R ~ U(-1,1)^{size×size}``, ``c = 0.5``
    (``0.1`` when ``ood``). ``addition``: ``x = [A, B]``, ``y* = A + B`` with entries ``U(-s, s)``, ``s = 1``
    (``2.5`` when ``ood``).
    """
    if name not in TASKS:
        raise ValueError(f"make_task: name must be one of {TASKS}, got {name!r}")
    if name == "inverse":
        r = torch.rand(n, size, size, generator=generator, dtype=torch.float64) * 2 - 1
        a = 2 * r @ r.transpose(1, 2) + (0.1 if ood else 0.5) * torch.eye(size, dtype=torch.float64)
        return a.flatten(1).float(), torch.linalg.inv(a).flatten(1).float()
    s = 2.5 if ood else 1.0
    a = (torch.rand(n, 2, size * size, generator=generator) * 2 - 1) * s
    return a.flatten(1), a.sum(1)


# --------------------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    tasks: tuple[str, ...] = option(("inverse",), "matrix tasks", choices=TASKS)
    size: Optional[int] = option(None, "matrix side (default: 5 for inverse, 4 for addition)")
    hidden: int = option(256, "energy MLP width (official 512)")
    nblocks: int = option(4, "Monarch blocks")
    layer: str = option("monarch", "hidden layers", choices=("monarch", "dense", "blockdiag"))
    iters: int = option(4000, "training iterations (IREM and the baseline)")
    batch_size: int = option(128, "fresh problems per batch (IREM adds as many replayed)")
    steps: int = option(10, "K, reasoning steps during training (official 10)")
    step_lr: Optional[float] = option(None, f"λ, step size of the energy descent (default: {DEFAULT_STEP_LR}; "
                                            "official 100)")
    grad_steps: int = option(1, "differentiable last steps (1: truncated; K: full)")
    replay: bool = option(True, "replay buffer of optimisation states")
    buffer: int = option(10_000, "replay buffer capacity")
    lr: float = option(1e-3, "Adam learning rate")
    test_size: int = option(1000, "test problems per split")
    eval_steps: int = option(40, "reasoning steps at test time")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")

    def __post_init__(self):
        if not 0 <= self.grad_steps <= self.steps:
            raise ValueError(f"--grad-steps must be in [0, --steps={self.steps}], got {self.grad_steps}")


QUICK = {"iters": 200, "hidden": 64, "test_size": 200, "eval_steps": 20, "batch_size": 64, "steps": 5,
         "tasks": ("addition",), "seeds": 1}


def train_models(task: str, size: int, dim_x: int, dim_y: int, step_lr: float, cfg: Config, ctx: RunContext,
                 gen: torch.Generator) -> tuple[EnergyMLP, nn.Module, list]:
    """IREM (truncated energy descent, replay buffer) and the feed-forward baseline (same MLP shape and
    iterations, MSE), both on fresh problems every iteration."""
    energy = EnergyMLP(dim_x, dim_y, hidden=cfg.hidden, depth=3, layer=cfg.layer, nblocks=cfg.nblocks)
    opt = torch.optim.Adam(energy.parameters(), lr=cfg.lr)
    buffer = ReplayBuffer(cfg.buffer, gen) if cfg.replay else None

    def irem_step(m, batch):
        st = irem_train_step(m, opt, *batch, steps=cfg.steps, step_lr=step_lr, grad_steps=cfg.grad_steps,
                             buffer=buffer, generator=gen)
        ctx.observe(batch_size=batch[0].shape[0], steps=st["steps"])
        return st["loss_fresh"]

    draw = step_batches(lambda: make_task(task, cfg.batch_size, size, generator=gen))
    hist = fit(energy, opt, draw, epochs=cfg.iters, step=irem_step, progress=ctx.progress, desc=f"{task}: IREM")
    ff = MLP(dim_x, cfg.hidden, dim_y, depth=3, layer=cfg.layer, nblocks=cfg.nblocks, activation=nn.ReLU,
             dense_ends=False)
    fit(ff, torch.optim.Adam(ff.parameters(), lr=cfg.lr), draw, epochs=cfg.iters,
        loss_fn=lambda m, x, y: (m(x) - y).pow(2).mean(), progress=ctx.progress, desc=f"{task}: feed-forward")
    ctx.observe(iters=hist.epochs, hidden=energy.net.net[0].out_features)
    return energy, ff, hist.losses


def run_task(task: str, cfg: Config, seed: int, gen: torch.Generator, ctx: RunContext) -> dict:
    size = cfg.size or (5 if task == "inverse" else 4)
    x_probe, y_probe = make_task(task, 1, size, generator=torch.Generator().manual_seed(0))
    dim_x, dim_y = x_probe.shape[1], y_probe.shape[1]
    test_gen = torch.Generator().manual_seed(10_000 + seed)
    tests = {split: make_task(task, cfg.test_size, size, ood=split == "ood", generator=test_gen)
             for split in ("id", "ood")}
    ctx.observe(test_size=len(tests["id"][0]))
    step_lr = cfg.step_lr if cfg.step_lr is not None else DEFAULT_STEP_LR[task]
    energy, ff, losses = train_models(task, size, dim_x, dim_y, step_lr, cfg, ctx, gen)
    out = {"dim_x": dim_x, "dim_y": dim_y, "size": size, "step_lr": step_lr,
           "train_loss_fresh_last100": statistics.fmean(losses[-100:])}
    report = tuple(t for t in (1, 5, 10, 20, 40, 80) if t <= cfg.eval_steps)
    for split, (x, y) in tests.items():
        ev = evaluate_irem(energy, x, y, steps=cfg.eval_steps, step_lr=step_lr, report_steps=report,
                           generator=torch.Generator().manual_seed(20_000 + seed))
        ctx.observe(eval_steps=len(ev["mse_curve"]) - 1)
        with torch.no_grad():
            ff.eval()
            ff_mse = float((ff(x) - y).pow(2).mean())
        curve_e = ev["energy_curve"]
        out[split] = {
            "irem_mse_at_step": ev["mse_at"], "irem_mse_min_energy": ev["mse_min_energy"],
            "irem_mean_min_energy_step": ev["mean_min_energy_step"], "feedforward_mse": ff_mse,
            "zero_predictor_mse": float(y.pow(2).mean()), "energy_decrease_frac": ev["energy_decrease_frac"],
            "energy_end_below_start_frac": ev["energy_end_below_start_frac"],
            "mean_energy_monotone": all(b <= a for a, b in zip(curve_e[:-1], curve_e[1:])),
            "mse_curve": ev["mse_curve"], "energy_curve": curve_e}
    return out


def run(cfg: Config, ctx: RunContext) -> dict:
    per_seed = []
    for seed in seed_list(ctx.seed, cfg.seeds):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # problems, replay sampling and descent starts of this seed
        per_seed.append({task: run_task(task, cfg, seed, gen, ctx) for task in cfg.tasks})
        for task, r in per_seed[-1].items():
            for split in ("id", "ood"):
                at = " ".join(f"{t}:{v:.4f}" for t, v in r[split]["irem_mse_at_step"].items())
                ctx.log(f"[irem] seed {seed} {task} {split}: IREM MSE at steps {at} | min-energy "
                        f"{r[split]['irem_mse_min_energy']:.4f} | feed-forward {r[split]['feedforward_mse']:.4f} | "
                        f"energy decreases {r[split]['energy_decrease_frac']:.2f}")
    ctx.observe(seeds=len(per_seed), tasks=list(per_seed[0]))
    summary = {t: {sp: aggregate([r[t][sp] for r in per_seed]) for sp in ("id", "ood")} for t in cfg.tasks}
    first = per_seed[0]
    plot_curves(ctx.plot_path("irem_steps.png"), [
        Panel(f"{task}: test MSE vs reasoning steps (seed {ctx.seed})",
              {f"IREM {sp}": (range(len(first[task][sp]["mse_curve"])), first[task][sp]["mse_curve"])
               for sp in ("id", "ood")}, xlabel="step", ylabel="MSE", logy=True,
              hline={f"feed-forward {sp}": first[task][sp]["feedforward_mse"] for sp in ("id", "ood")})
        for task in cfg.tasks] + [
        Panel(f"{task}: mean energy along the trajectory", {sp: (range(len(first[task][sp]["energy_curve"])),
                                                                  first[task][sp]["energy_curve"]) for sp in ("id", "ood")},
              xlabel="step", ylabel="E(x, y^t)") for task in cfg.tasks])
    return {"seeds": seed_list(ctx.seed, cfg.seeds), "layer": cfg.layer, "train_steps_K": cfg.steps,
            "summary": summary, "per_seed": per_seed}


RECIPE = Recipe("irem", Config, run, quick=QUICK, description=__doc__.splitlines()[0])
