"""``python -m methods sss``: SSS vs stage 1 only, a learned fixed subset and random subsets on digit-pixel
classification and GP function reconstruction, over seeds."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_image_dataset
from ..recipe import Recipe, RunContext, option, seed_list
from ..report import Panel, aggregate, paired, plot_curves
from ..train import epoch_batches, fit
from .relaxations import MODES
from .subsampler import SetSubsampler
from .tasks import (CNP, MaskedSetClassifier, classify_loss, classify_metric, function_loss, function_metric,
                    gp_functions, image_to_set)


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
    if cfg.train_limit is not None and len(split.x_train) >= cfg.train_limit:  # a cap beyond the data is no cap
        ctx.observe(train_limit=len(xtr))
    if cfg.test_limit is not None and len(split.x_test) >= cfg.test_limit:
        ctx.observe(test_limit=len(xte))
    return image_to_set(xtr), ytr, image_to_set(xte), yte, split.num_classes


def run(cfg: Config, ctx: RunContext) -> dict:
    results, seeds = {}, seed_list(ctx.seed, cfg.seeds)
    if "classify" in cfg.tasks:
        sets_tr, ytr, sets_te, yte, classes = classify_data(cfg, ctx)
        make = lambda: MaskedSetClassifier(sets_tr.shape[1], classes, cfg.task_hidden, cfg.layer, cfg.nblocks)  # noqa
        per_seed = [compare("classify", sets_tr, ytr, sets_te, yte, make, classify_loss, classify_metric, cfg.ks,
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
        per_seed = [compare("function", train_f, None, test_f, None, make, function_loss, function_metric,
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
