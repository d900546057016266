"""``python -m methods coda``: ERM vs per-environment models vs CoDA on Lotka–Volterra, adaptation from one
trajectory, over seeds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..recipe import Recipe, RunContext, option, seed_list
from ..report import Panel, aggregate, format_mean_std, paired, plot_curves
from .lotka_volterra import LV_ADAPT_PARAMS, LV_TRAIN_PARAMS, simulate_lotka_volterra
from .dynamics import APPLY, HyperMonarchDynamics
from .training import adapt_codes, evaluate_mse, forecast, linear_r2, train_dynamics


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
            "curves": {k: h.losses for k, h in hists.items()},
            "trajectories": {"truth": y_ad_te[0, 0], **{k: v[0, 0] for k, v in preds.items()}}}


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
        "scratch_minus_coda_adaptation": paired(
            [r["adaptation_mse"]["per-env from scratch (1 traj)"] for r in per_seed],
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
