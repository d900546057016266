"""``python -m methods irem``: IREM vs a feed-forward baseline on the official matrix tasks, in and out of
distribution, over reasoning steps and seeds."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..buffers import ReplayBuffer
from ..models import MLP
from ..recipe import Recipe, RunContext, option, seed_list
from ..report import Panel, aggregate, plot_curves
from ..train import fit, step_batches
from .energy import EnergyMLP, evaluate_irem, irem_train_step


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
        Panel(f"{task}: mean energy along the trajectory",
              {sp: (range(len(first[task][sp]["energy_curve"])), first[task][sp]["energy_curve"])
               for sp in ("id", "ood")},
              xlabel="step", ylabel="E(x, y^t)") for task in cfg.tasks])
    return {"seeds": seed_list(ctx.seed, cfg.seeds), "layer": cfg.layer, "train_steps_K": cfg.steps,
            "summary": summary, "per_seed": per_seed}


RECIPE = Recipe("irem", Config, run, quick=QUICK, description=__doc__.splitlines()[0])
