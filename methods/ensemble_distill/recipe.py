"""``python -m methods ensemble_distill``: a deep ensemble of Monarch MLPs distilled into a plain student (KD), a
folded BatchEnsemble student, and with the diversifying perturbation, on clean and corrupted digits."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import load_digits
from ..models import MLP
from ..recipe import Recipe, RunContext, option, seed_list
from ..report import Panel, aggregate, paired, plot_curves
from ..train import cross_entropy_loss, epoch_batches, fit, make_optimizer
from .batch_ensemble import (batch_ensemble_, fast_parameters, fast_weight_decay, fold_batch_ensembles_, member_logits,
                             scale_fast_grads_)
from .distillation import (diversifying_perturbation, ensemble_kd_loss, member_kd_loss, probs_metrics, random_pair,
                           teacher_logits)


@dataclass(frozen=True)
class Config:
    members: int = option(4, "teachers = BE members")
    teacher_hidden: int = option(256, "teacher MLP width")
    student_hidden: int = option(128, "student MLP width")
    layer: str = option("monarch", "hidden layers of teachers and students", choices=("dense", "monarch", "blockdiag"))
    teacher_epochs: int = option(40, "teacher epochs")
    epochs: int = option(60, "student epochs")
    batch_size: int = option(64, "mini-batch size")
    lr: float = option(1e-3, "Adam learning rate")
    temperature: float = option(4.0, "KD temperature T")
    fast_wd: float = option(5e-4, "decay of the fast weights toward 1")
    eps: tuple[float, ...] = option((1 / 64, 1 / 16), "RMS perturbation steps (one KD+avg+perturb variant each)")
    noise: float = option(0.3, "std of the Gaussian corruption of test inputs")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")


QUICK = {"teacher_epochs": 5, "epochs": 5, "seeds": 1, "eps": (1 / 16,)}


def train_teacher(split, cfg: Config, gen: torch.Generator) -> tuple[nn.Module, int]:
    """One ensemble member: a Monarch MLP trained with cross-entropy (returns it in eval mode, and its epochs)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = MLP(split.x_train.shape[1], cfg.teacher_hidden, split.num_classes, depth=2, layer=cfg.layer)
    hist = fit(model, make_optimizer(model.parameters(), "adam", lr=cfg.lr),
               epoch_batches(split.x_train, split.y_train, batch_size=cfg.batch_size, generator=gen),
               epochs=cfg.teacher_epochs, loss_fn=cross_entropy_loss)
    return model.eval(), hist.epochs


def train_student(variant: str, split, teachers, cfg: Config, gen: torch.Generator, eps: float = 0.0,
                  progress=None) -> tuple[nn.Module, dict]:
    """variant: 'kd' (plain student, ensemble KD) or 'be' (BE student, member KD, folded); eps > 0 adds the
    diversifying perturbation. Returns the deployed plain model and diagnostics."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    M = len(teachers)
    model = MLP(split.x_train.shape[1], cfg.student_hidden, split.num_classes, depth=2, layer=cfg.layer)
    if variant == "be":
        batch_ensemble_(model, M)
    fast = {id(p) for p in fast_parameters(model)}
    opt = make_optimizer(model.parameters(), "adam", lr=cfg.lr)
    for p in teachers:
        p.requires_grad_(False)

    def step(m, batch):
        (xb,) = batch
        if eps > 0:
            xb = diversifying_perturbation(xb, teachers, m, eps, random_pair(M, gen))
        with torch.no_grad():
            t = teacher_logits(teachers, xb)
        if variant == "be":
            loss = member_kd_loss(member_logits(m, xb, M), t, cfg.temperature) + cfg.fast_wd * fast_weight_decay(m)
        else:
            loss = ensemble_kd_loss(m(xb), t, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if variant == "be":
            scale_fast_grads_(m)
        opt.step()
        return loss

    hist = fit(model, None, epoch_batches(split.x_train, batch_size=cfg.batch_size, generator=gen),
               epochs=cfg.epochs, step=step, on_epoch_end=lambda _e: progress.update(1) if progress else None)
    diag = {"epochs": hist.epochs, "eps": eps, "hidden": model.net[0].layer.out_features if variant == "be"
            else model.net[0].out_features}
    if variant == "be":
        model.eval()
        with torch.no_grad():
            s = member_logits(model, split.x_test, M).softmax(-1)
            diag["member_disagreement"] = float((s.argmax(-1) != s.mean(0).argmax(-1)).float().mean())
            diag["be_ensemble_probs"] = s.mean(0)
        fold_batch_ensembles_(model)
        assert not fast & {id(p) for p in model.parameters()}
    return model.eval(), diag


def run_seed(seed: int, cfg: Config, ctx: RunContext, bar) -> dict:
    """Teachers, then every student variant, evaluated on clean and Gaussian-corrupted test inputs."""
    gen = torch.Generator().manual_seed(seed)
    split = load_digits(seed).flat()
    noise_gen = torch.Generator().manual_seed(10_000 + seed)
    x_noisy = (split.x_test + cfg.noise * torch.randn(split.x_test.shape, generator=noise_gen)).clamp(0, 1)
    tests = {"clean": split.x_test, "noisy": x_noisy}
    teachers, epochs = zip(*[train_teacher(split, cfg, gen) for _ in range(cfg.members)])
    ctx.observe(teacher_epochs=epochs[0], members=len(teachers))
    with torch.no_grad():
        ens = {c: teacher_logits(teachers, x).softmax(-1).mean(0) for c, x in tests.items()}
    res = {"teachers(DE)": {c: probs_metrics(ens[c], ens[c], split.y_test) for c in tests}}
    perturbed = []
    for v, variant, eps in [("kd", "kd", 0.0), ("kd+avg", "be", 0.0)] + [
            (f"kd+avg+perturb(eps={e:.3g})", "be", e) for e in cfg.eps]:
        model, diag = train_student(variant, split, teachers, cfg, gen, eps=eps, progress=bar)
        ctx.observe(epochs=diag["epochs"], student_hidden=diag["hidden"])
        with torch.no_grad():
            res[v] = {c: probs_metrics(model(x).softmax(-1), ens[c], split.y_test) for c, x in tests.items()}
        if variant == "be":
            res[v]["member_disagreement_before_fold"] = diag["member_disagreement"]
        if diag["eps"] > 0:
            perturbed.append(diag["eps"])
        if v == "kd+avg":  # the unfolded BE ensemble (M× inference cost) as a reference, clean inputs only
            res["be_ensemble(unfolded)"] = {"clean": probs_metrics(diag["be_ensemble_probs"], ens["clean"],
                                                                   split.y_test)}
    ctx.observe(eps=perturbed)
    return res


def run(cfg: Config, ctx: RunContext) -> dict:
    variants = ["kd", "kd+avg"] + [f"kd+avg+perturb(eps={e:.3g})" for e in cfg.eps]
    bar = ctx.progress(total=cfg.seeds * len(variants) * cfg.epochs, desc="ensemble_distill")
    per_seed = []
    for seed in seed_list(ctx.seed, cfg.seeds):
        per_seed.append(run_seed(seed, cfg, ctx, bar))
        ctx.log(f"seed {seed}: " + ", ".join(f"{v} nll={per_seed[-1][v]['clean']['nll']:.3f}/"
                                              f"{per_seed[-1][v]['noisy']['nll']:.3f}" for v in variants))
    bar.close()
    ctx.observe(seeds=len(per_seed))
    table = {v: aggregate([r[v] for r in per_seed]) for v in per_seed[0]}
    # paired over seeds (same teachers): does averaging / the perturbation lower NLL and KL vs plain KD?
    comparisons = {f"{a}_minus_{b}": {c: {k: paired([r[a][c][k] for r in per_seed], [r[b][c][k] for r in per_seed])
                                          for k in ("nll", "kl_to_ensemble", "accuracy")} for c in ("clean", "noisy")}
                   for a, b in [("kd+avg", "kd")] + [(v, "kd+avg") for v in variants[2:]]}
    names = ["teachers(DE)"] + variants
    plot_curves(ctx.plot_path("ensemble_distill.png"), [
        Panel(k, kind="bar", groups={c: {n: table[n][c][k] for n in names} for c in ("clean", "noisy")})
        for k in ("accuracy", "nll", "kl_to_ensemble")],
        title=f"ensemble distillation on digits ({cfg.members} teachers, {cfg.seeds} seeds, {cfg.layer} MLPs)")
    return {"dataset": "digits", "members": cfg.members, "seeds": seed_list(ctx.seed, cfg.seeds), "eps": list(cfg.eps),
            "table": table, "paired": comparisons,
            "per_seed": [{v: {c: r[v][c] for c in ("clean", "noisy") if c in r[v]} for v in r} for r in per_seed]}


RECIPE = Recipe("ensemble_distill", Config, run, quick=QUICK,
                description="Ensemble distillation into a BatchEnsemble student, latent weight averaging and "
                            "diversifying perturbation (Nam et al. 2022) on digits")
