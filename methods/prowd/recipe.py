"""``python -m methods prowd``: FedAvg, GroupedAvg, DEQ only, SWA only and ProWD on a Dirichlet split of
digits with half the clients at 2 bits, over seeds, with an optional Flower cross-check."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..recipe import Recipe, RunContext, option, seed_list
from ..report import Panel, aggregate, curve_band, paired, plot_curves
from .quantization import FP_BITS
from .server import METHODS, METHOD_LABELS
from .engines import make_federation, run_flower, run_inprocess


@dataclass(frozen=True)
class Config:
    dataset: str = option("digits", "image dataset", choices=("digits", "mnist"))
    engine: str = option("inprocess", "run the federation in-process or on Flower (Ray simulation)",
                         choices=("inprocess", "flower"))
    flower_check: bool = option(True, "also run ProWD (first seed) on Flower and compare with the in-process run")
    methods: tuple[str, ...] = option(METHODS, "methods to compare", choices=METHODS)
    clients: int = option(10, "number of clients")
    alpha: float = option(0.5, "Dirichlet concentration of the label split")
    low_bits: int = option(2, "bitwidth of the low-precision clients")
    low_fraction: float = option(0.5, "share of low-precision clients")
    bit_chain: tuple[int, ...] = option((2, 4, 8, 32), "dequantiser chain (must contain --low-bits)")
    rounds: int = option(25, "FL rounds")
    local_epochs: int = option(2, "local epochs per round")
    lr: float = option(3e-3, "local Adam learning rate")
    hidden: int = option(128, "client MLP width (Monarch hidden layer)")
    buffer: int = option(100, "server buffer size (distillation)")
    deq_steps: int = option(10, "dequantiser Adam steps per round")
    kd_weight: float = option(1.0, "weight of the dequantiser's distillation term")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")

    def __post_init__(self):
        if self.low_bits not in self.bit_chain:
            raise ValueError(f"--low-bits {self.low_bits} must be in --bit-chain {self.bit_chain}")


QUICK = {"rounds": 4, "seeds": 1, "flower_check": False, "hidden": 64, "buffer": 30, "deq_steps": 2, "lr": 1e-2}


def run(cfg: Config, ctx: RunContext) -> dict:
    server_kw = dict(bit_chain=cfg.bit_chain, deq_steps=cfg.deq_steps, kd_weight=cfg.kd_weight)
    train_kw = dict(local_epochs=cfg.local_epochs, lr=cfg.lr)
    engine = run_flower if cfg.engine == "flower" else run_inprocess
    lb, k_last = cfg.low_bits, min(5, cfg.rounds)
    per_seed, histories = [], {m: [] for m in cfg.methods}
    for seed in seed_list(ctx.seed, cfg.seeds):
        fed = make_federation(cfg.dataset, cfg.clients, cfg.alpha, cfg.low_bits, cfg.low_fraction, cfg.buffer, seed,
                              cfg.hidden)
        ctx.log(f"[prowd] seed {seed}: {cfg.clients} clients (Dirichlet α={cfg.alpha}), bits {fed.client_bits}, "
                f"samples {[len(x) for x in fed.client_x]}; {cfg.rounds} rounds, engine {cfg.engine}")
        row = {}
        for method in cfg.methods:
            res = engine(method, fed, cfg.rounds, seed=seed, **train_kw, **server_kw,
                         **({} if engine is run_flower else {"progress": ctx.progress}))
            h = histories[method]
            h.append(res["history"])
            # accuracies averaged over the last k_last rounds (single rounds fluctuate under non-IID mixing)
            fp, lo = (statistics.fmean(r[b] for r in res["history"][-k_last:]) for b in (FP_BITS, lb))
            row[METHOD_LABELS[method]] = {"fp32_acc": fp, f"{lb}bit_acc": lo, "mean_acc": (fp + lo) / 2,
                                          "final_round_fp32_acc": res["history"][-1][FP_BITS],
                                          f"final_round_{lb}bit_acc": res["history"][-1][lb],
                                          **{k: statistics.fmean(v) for k, v in res["server"].stats.items() if v}}
            ctx.observe(rounds=len(res["history"]), **res["settings"])
            ctx.log(f"[prowd] seed {seed} {METHOD_LABELS[method]:10s} FP32 {fp:.3f}  {lb}-bit {lo:.3f}")
        per_seed.append(row)
    ctx.observe(seeds=len(per_seed))
    summary = {m: aggregate([r[m] for r in per_seed]) for m in per_seed[0]}
    comparisons = {f"{a}_minus_{b}": {k: paired([r[a][k] for r in per_seed], [r[b][k] for r in per_seed])
                                      for k in ("fp32_acc", f"{lb}bit_acc", "mean_acc")}
                   for a, b in (("ProWD", "FedAvg"), ("ProWD", "GroupedAvg")) if {a, b} <= set(summary)}
    metrics = {"dataset": cfg.dataset, "engine": cfg.engine, "seeds": seed_list(ctx.seed, cfg.seeds),
               "accuracy_over_last_rounds": k_last, "summary": summary, "paired": comparisons, "per_seed": per_seed}
    if cfg.flower_check and cfg.engine == "inprocess" and "prowd" in cfg.methods:
        fed = make_federation(cfg.dataset, cfg.clients, cfg.alpha, cfg.low_bits, cfg.low_fraction, cfg.buffer,
                              ctx.seed, cfg.hidden)
        fl = run_flower("prowd", fed, cfg.rounds, seed=ctx.seed, **train_kw, **server_kw)
        ref = histories["prowd"][0]
        diff = max(abs(g[b] - r[b]) for g, r in zip(fl["history"], ref) for b in r)
        metrics["flower_check"] = {"method": "ProWD", "seed": ctx.seed, "rounds_compared": len(fl["history"]),
                                   "max_abs_accuracy_diff_all_rounds": diff}
        ctx.log(f"[prowd] Flower check (ProWD, seed {ctx.seed}): max |Δacc| over rounds and groups = {diff:.4f}")
    if cfg.engine == "inprocess" and "prowd" in cfg.methods:  # where the check applies, it ran or not as asked
        ctx.observe(flower_check="flower_check" in metrics)
    plot_curves(ctx.plot_path("prowd.png"), [
        Panel(f"{'FP32' if b == FP_BITS else f'{b}-bit'} clients: test accuracy of their model",
              {METHOD_LABELS[m]: curve_band([[r[b] for r in run] for run in runs]) for m, runs in histories.items()},
              xlabel="round", ylabel="accuracy") for b in (FP_BITS, lb)])
    return metrics


RECIPE = Recipe("prowd", Config, run, quick=QUICK,
                description="ProWD: bitwidth-heterogeneous FL (QAT low-bit clients), progressive dequantiser + "
                            "selective weight aggregation vs FedAvg / GroupedAvg, on Flower or in-process")
