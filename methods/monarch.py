"""Monarch (Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022,
arXiv:2204.00595): the paper's three ways of using Monarch layers, at small scale.

Every weight that the paper makes Monarch (the MLP / feed-forward weights of a transformer, §5.1) is a
:class:`monarch_kernels.layers.MonarchLinear`: ``W = P2 · BD(w2) · P1 · BD(w1)`` (§3.1, eq. (1)) with ``nblocks``
blocks per factor, i.e. ``w1 (nb, q, p)`` and ``w2 (nb, s, r)`` (``nb·p = in``, ``nb·s = out``), costing
``2·(w1.numel() + w2.numel())`` FLOPs per token instead of ``2·in·out``.

Modes (``--mode``; ``all`` runs the three, sharing the runs they have in common):

1. ``sparse`` — **end-to-end sparse training** (§5.1): a character-level GPT-2 (Hugging Face ``GPT2LMHeadModel``
   at a tiny config) on Shakespeare and a small ViT, Monarch MLPs vs dense MLPs at the same steps, batches,
   schedule and seed: validation loss (and accuracy), parameters, forward FLOPs, measured time per training step.
2. ``d2s`` — **dense-to-sparse fine-tuning** (§3.4, §5.3): the dense GPT pretrained on the plays is projected
   onto Monarch (``monarchify(..., project=True)``: per sub-block rank-r SVD, the Frobenius-optimal Monarch
   factors, §3.4 Theorem 1) and fine-tuned on a *different* text (the Sonnets); baselines fine-tuned for the same
   steps: a randomly initialised Monarch GPT, the pretrained GPT with freshly initialised Monarch MLPs (isolates
   the value of the projection itself), and the dense pretrained GPT (upper reference).
3. ``reverse`` — **reverse sparsification** (§5.2, "sparse-to-dense"): train Monarch for ``switch`` of the steps,
   ``densify`` (exact: each MonarchLinear becomes the ``nn.Linear`` computing the same map), finish dense;
   compared with dense-from-start and Monarch-only at the same step count, quality and wall time. The Monarch
   phase is shared with the Monarch-only run (same batches), so the three runs differ only where they should.

Deviations from the paper (it trains at scale on GPUs): tiny models on CPU, character-level Shakespeare instead of
WikiText-103/OpenWebText, a ViT on 5000 MNIST digits instead of ImageNet, the Sonnets as the "downstream"
fine-tuning task instead of GLUE, AdamW with a cosine schedule. Per-step times are measured with the backend
``auto`` picks for the Monarch layers (recorded as ``monarch_backend_auto``); at these widths Monarch is not
necessarily faster than one dense GEMM on CPU, and the figures are reported as measured. The paper's GPT-2
phase split for reverse sparsification is not public.

All training goes through :func:`methods.train.fit`, the loop ``torchrun -m methods.distributed`` runs too.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import monarch_kernels as mk
from monarch_kernels.layers import MonarchLinear, StructuredLinear, dense_view, densify, monarchify

from .recipe import Recipe, option
from .report import Panel, interleaved_times_ms, plot_curves
from .tasks import FINETUNE_TEXT, GPT_MLP, SIZES, ImageTask, LMTask
from .train import History, cosine_lr, fit, step_batches

MODES = ("sparse", "d2s", "reverse", "all")


# =============================================================================================== cost accounting
def model_cost(model: nn.Module, tokens: int, causal: bool = False) -> dict:
    """Parameters and forward FLOPs of one sample of ``tokens`` tokens (2 FLOPs per multiply-add).

    Linear-like layers: ``nn.Linear`` / GPT-2 ``Conv1D`` / the q,k,v projection of ``nn.MultiheadAttention``
    cost ``2·in·out`` per token, structured layers their
    :meth:`~monarch_kernels.layers.StructuredLinear.flops_per_token` (``2·(w1.numel()+w2.numel())`` for Monarch).
    Attention scores and the weighted sum add ``2·2·T·d`` per token per ``nn.MultiheadAttention`` / GPT-2 attention
    (halved on average when ``causal``). Biases, norms and activations are not counted.
    """
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"model_cost: tokens must be a positive int, got {tokens!r}")
    linear_flops, structured_params, structured_dense_params, attn_flops = 0, 0, 0, 0
    for _, m in model.named_modules():
        if isinstance(m, StructuredLinear):
            linear_flops += m.flops_per_token()
            structured_params += m.structured_numel
            structured_dense_params += m.in_features * m.out_features
        elif (view := dense_view(m)) is not None:
            linear_flops += 2 * view[0].numel()
        if isinstance(m, nn.MultiheadAttention):  # its q/k/v projection is a parameter, not a submodule
            qkv = [m.in_proj_weight] if m.in_proj_weight is not None else [m.q_proj_weight, m.k_proj_weight,
                                                                             m.v_proj_weight]
            linear_flops += 2 * sum(w.numel() for w in qkv)
            attn_flops += 4 * tokens * m.embed_dim
        elif type(m).__name__ == "GPT2Attention":
            attn_flops += 4 * tokens * m.embed_dim
    if causal:
        attn_flops = attn_flops * (tokens + 1) // (2 * tokens)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "monarch_weight_params": structured_params,
        "monarch_weight_params_if_dense": structured_dense_params,
        "linear_flops_per_token": linear_flops,
        "forward_flops_per_sample": tokens * linear_flops + tokens * attn_flops,
    }


def auto_backends(model: nn.Module, rows: int) -> list[str]:
    """The backends ``auto`` picks for the forward of every Monarch layer of ``model`` on ``rows`` token rows."""
    return sorted({mk.resolve_backend("monarch", torch.empty(rows, m.in_features, device=m.w1.device,
                                                            dtype=m.w1.dtype), m.w1, m.w2)
                   for m in model.modules() if isinstance(m, MonarchLinear)})


def train_step_ms(models: dict, batch: tuple, loss_fn, rounds: int) -> dict:
    """Wall times (ms) of one forward+backward+AdamW step of each model on the same batch, timed in alternation
    (:func:`methods.report.interleaved_times_ms`) on copies of the models: ``{name: [ms per round]}``."""
    def step_of(model):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6)

        def step():
            loss = loss_fn(m, *batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    return interleaved_times_ms({k: step_of(m) for k, m in models.items()}, batch[0].device, rounds=rounds)


def transfer_optimizer_state(old_model: nn.Module, old_opt: torch.optim.Optimizer, new_model: nn.Module,
                             new_opt: torch.optim.Optimizer) -> list[str]:
    """Copy per-parameter optimizer state (e.g. Adam moments and step) from ``old_opt`` to ``new_opt`` for every
    parameter name present in both models with the same shape (after :func:`monarch_kernels.layers.densify` that
    is everything but the new dense weights, which start with fresh state). Returns the names carried over."""
    old = {n: p for n, p in old_model.named_parameters()}
    carried = []
    for name, p in new_model.named_parameters():
        q = old.get(name)
        if q is not None and q.shape == p.shape and q in old_opt.state:
            new_opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in old_opt.state[q].items()}
            carried.append(name)
    return carried


def projection_errors(dense_model: nn.Module, monarch_model: nn.Module) -> dict:
    """Relative Frobenius error ``‖W − M‖/‖W‖`` of each projected layer, and the same for an i.i.d. Gaussian
    matrix of the same shape (the worst case: its spectrum is flat in every sub-block) for comparison."""
    errs, gauss = [], []
    g = torch.Generator().manual_seed(0)
    for name, m in monarch_model.named_modules():
        if isinstance(m, MonarchLinear):
            w = dense_view(dense_model.get_submodule(name))[0].detach()
            errs.append(float((m.dense_weight().detach() - w).norm() / w.norm()))
            r = torch.randn(w.shape, generator=g)
            gauss.append(float((MonarchLinear.from_dense(r, nblocks=m.nblocks).dense_weight().detach() - r).norm()
                               / r.norm()))
    return {"trained_mean": statistics.mean(errs), "gaussian_mean": statistics.mean(gauss), "per_layer": errs}


# =============================================================================================== training runs
@dataclass
class Run:
    """A training run: its :class:`methods.train.History` and the model, optimizer and data generator at its end
    (so a run can be continued)."""

    hist: History
    model: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator


def train_run(task, model: nn.Module, steps: int, *, seed: int, device: torch.device, start: int = 0,
              total: Optional[int] = None, optimizer=None, gen: Optional[torch.Generator] = None,
              eval_every: int = 0, progress=None, desc: str = "train") -> Run:
    """Train ``model`` on ``task`` for steps ``start..steps-1`` (AdamW, warm-up + cosine over ``total`` steps)."""
    cfg = task.train_config()
    model.to(device)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = gen or torch.Generator().manual_seed(seed + 1)
    hist = fit(model, opt, step_batches(lambda: task.batch(gen, cfg["global_batch"])), epochs=steps,
               loss_fn=task.loss, schedule=cosine_lr(cfg["lr"], total or steps, cfg["warmup"]), start_epoch=start,
               evaluate=task.evaluate, eval_every=eval_every, progress=progress, desc=desc)
    return Run(hist, model, opt, gen)


def continue_run(task, head: Run, model: nn.Module, steps: int, **kw) -> tuple[Run, list[str]]:
    """Continue ``head`` to ``steps`` with ``model`` (a copy of ``head.model``, possibly densified): AdamW state of
    every unchanged parameter carried over, the same data generator state. Returns the whole run and the names
    of the parameters whose optimizer state was carried."""
    opt = torch.optim.AdamW(model.parameters(), lr=task.train_config()["lr"], weight_decay=0.0)
    carried = transfer_optimizer_state(head.model, head.optimizer, model, opt)
    gen = torch.Generator()
    gen.set_state(head.gen.get_state())
    tail = train_run(task, model, steps, start=len(head.hist.losses), total=steps, optimizer=opt, gen=gen, **kw)
    return Run(head.hist + tail.hist, tail.model, tail.optimizer, tail.gen), carried


def summary(run: Run, final: dict) -> dict:
    h = run.hist
    return {**final, "train_loss_last": statistics.mean(h.losses[-10:]) if h.losses else float("nan"),
            "time_per_step_ms_median": 1e3 * statistics.median(h.step_times) if h.step_times else None,
            "train_time_s": sum(h.step_times), "curve": [(s, e["val_loss"]) for s, e in h.evals]}


def dense_to_sparse(lm: LMTask, pretrained: nn.Module, steps: int, nb: int, seed: int, **kw) -> dict:
    """Mode ``d2s``: project the pretrained dense GPT onto Monarch and fine-tune on the Sonnets, with baselines."""
    ft = lm.for_finetuning()
    projected = copy.deepcopy(pretrained)
    replaced = monarchify(projected, nblocks=nb, include=GPT_MLP, project=True)
    reinit = copy.deepcopy(pretrained)
    monarchify(reinit, nblocks=nb, include=GPT_MLP, project=False)
    starts = {"projected_monarch": projected,
              "random_monarch": lm.build("monarch", nb, seed=seed + 100).to(kw["device"]),
              "pretrained_attn_random_monarch_mlp": reinit, "dense_pretrained": copy.deepcopy(pretrained)}
    res = {"replaced_layers": replaced, "finetune_text": FINETUNE_TEXT, "finetune_steps": steps,
           "projection_rel_error": projection_errors(pretrained, projected),
           "dense_before_projection": {"val_loss_plays": lm.evaluate(pretrained)["val_loss"],
                                       "val_loss_sonnets": ft.evaluate(pretrained)["val_loss"]},
           "runs": {}}
    for name, model in starts.items():
        at0 = ft.evaluate(model)["val_loss"]
        run = train_run(ft, model, steps, seed=seed + 11, desc=f"ft-{name}", **kw)
        res["runs"][name] = {"val_loss_at_start": at0, **summary(run, ft.evaluate(model)),
                             "params": sum(p.numel() for p in model.parameters()), "steps": len(run.hist.losses)}
        res["runs"][name]["curve"] = [(0, at0)] + res["runs"][name]["curve"]
    r = res["runs"]
    res["start_gap_random_minus_projected"] = (r["random_monarch"]["val_loss_at_start"]
                                               - r["projected_monarch"]["val_loss_at_start"])
    res["end_gap_random_minus_projected"] = r["random_monarch"]["val_loss"] - r["projected_monarch"]["val_loss"]
    return res


def reverse_sparsification(lm: LMTask, dense: Run, mon_head: Run, mon_full: Run, steps: int, seed: int,
                           timing: dict, **kw) -> dict:
    """Mode ``reverse``: Monarch for the first ``switch`` steps (shared with the Monarch-only run), densify,
    continue dense with the optimizer state of every unchanged parameter carried over.

    Wall time is reported twice: ``train_time_s`` sums the step times measured during each run (sensitive to
    machine load changing between runs), and ``time_from_interleaved_s`` = (Monarch steps)·t_monarch + (dense
    steps)·t_dense with per-step times measured side by side (:func:`train_step_ms`)."""
    switch = len(mon_head.hist.losses)
    model = copy.deepcopy(mon_head.model)
    xb = lm.batch(torch.Generator().manual_seed(seed + 5), 4)[0].to(kw["device"])
    with torch.no_grad():
        model.eval()
        before = model(xb).logits
        names = densify(model)
        after = model(xb).logits
    rev, carried = continue_run(lm, mon_head, model, steps, seed=seed, desc="gpt-reverse", **kw)
    runs = {"dense_from_start": dense, "monarch_only": mon_full, "reverse_sparsification": rev}
    res = {"switch_step": switch, "total_steps": steps, "densified_layers": names,
           "densify_max_abs_logit_change": float((after - before).abs().max()),
           "optimizer_state_carried": len(carried),
           "params_at_end": {k: sum(p.numel() for p in r.model.parameters()) for k, r in runs.items()},
           "runs": {k: summary(r, lm.evaluate(r.model)) for k, r in runs.items()}}
    td, tm = timing["dense"] / 1e3, timing["monarch"] / 1e3
    est = {"dense_from_start": steps * td, "monarch_only": steps * tm,
           "reverse_sparsification": switch * tm + (steps - switch) * td}
    res["interleaved_step_ms"] = dict(timing)
    d = res["runs"]["dense_from_start"]
    for k, r in res["runs"].items():
        r["time_from_interleaved_s"] = est[k]
        if k != "dense_from_start":
            r["val_loss_gap_vs_dense"] = r["val_loss"] - d["val_loss"]
            r["train_time_ratio_vs_dense"] = r["train_time_s"] / d["train_time_s"]
            r["interleaved_time_ratio_vs_dense"] = est[k] / est["dense_from_start"]
    return res


def sparse_vs_dense(task, runs: dict, timing: dict, causal: bool) -> dict:
    """Mode ``sparse``: quality, cost and measured step time of the dense and the Monarch model of one task."""
    rows = task.train_config()["global_batch"] * task.tokens
    res = {k: {**summary(r, task.evaluate(r.model)), **model_cost(r.model, task.tokens, causal=causal),
               "interleaved_step_ms": timing[k], "monarch_backend_auto": auto_backends(r.model, rows)}
           for k, r in runs.items()}
    d, m = res["dense"], res["monarch"]
    res["monarch_vs_dense"] = {"val_loss_gap": m["val_loss"] - d["val_loss"], "param_ratio": m["params"] / d["params"],
                               "flop_ratio": m["forward_flops_per_sample"] / d["forward_flops_per_sample"],
                               "step_time_ratio": m["interleaved_step_ms"] / d["interleaved_step_ms"]}
    return res


# =============================================================================================== the recipe
@dataclass(frozen=True)
class Config:
    mode: str = option("all", "which experiment(s) to run", choices=MODES)
    size: str = option("small", "GPT/ViT size (tasks.LMTask.SIZES, tasks.ImageTask.SIZES)", choices=SIZES)
    nblocks: int = option(4, "Monarch blocks per factor")
    gpt_steps: int = option(800, "GPT pretraining steps")
    vit_steps: int = option(600, "ViT training steps")
    vit_data: str = option("mnist", "ViT dataset", choices=tuple(ImageTask.DATASETS))
    finetune_steps: int = option(200, "d2s fine-tuning steps")
    switch: float = option(0.8, "reverse: fraction of the steps trained Monarch")
    eval_every: int = option(100, "validation every N steps")
    timing_rounds: int = option(10, "rounds of the interleaved per-step timing")

    def __post_init__(self):
        if not 0 < self.switch < 1:
            raise ValueError(f"--switch must be in (0, 1), got {self.switch}")


QUICK = {"size": "tiny", "gpt_steps": 30, "vit_steps": 80, "vit_data": "digits", "finetune_steps": 10,
         "eval_every": 10, "timing_rounds": 3}


def run(cfg: Config, ctx) -> dict:
    nb, seed, modes = cfg.nblocks, ctx.seed, (MODES[:3] if cfg.mode == "all" else (cfg.mode,))
    kw = dict(device=ctx.device, eval_every=cfg.eval_every, progress=ctx.progress)
    torch.manual_seed(seed)
    lm = LMTask(cfg.size, seed)
    out: dict = {"mode": cfg.mode, "size": cfg.size, "nblocks": nb, "seed": seed, "device": str(ctx.device),
                 "threads": torch.get_num_threads(), "vocab_size": lm.tok.vocab_size, "train_chars": len(lm.train_ids),
                 "gpt_config": {k: lm.cfg[k] for k in ("n_layer", "n_embd", "n_head", "block", "batch", "lr")}}
    dense = train_run(lm, lm.build("dense", nb, seed=seed), cfg.gpt_steps, seed=seed, desc="gpt-dense", **kw)
    ctx.observe(size=lm.size, gpt_steps=len(dense.hist.losses))
    if len(dense.hist.evals) > 1:  # validation every eval_every steps (and after the last one)
        ctx.observe(eval_every=dense.hist.evals[0][0])
    if modes != ("d2s",):  # the Monarch GPT: up to the switch step, then continued (Monarch-only run)
        mon_head = train_run(lm, lm.build("monarch", nb, seed=seed), int(round(cfg.switch * cfg.gpt_steps)),
                             seed=seed, total=cfg.gpt_steps, desc="gpt-monarch", **kw)
        mon_full, _ = continue_run(lm, mon_head, copy.deepcopy(mon_head.model), cfg.gpt_steps, seed=seed,
                                   desc="gpt-monarch", **kw)
        ctx.observe(nblocks=mon_full.model.transformer.h[0].mlp.c_fc.nblocks)
        xb, yb = (t.to(ctx.device) for t in lm.batch(torch.Generator().manual_seed(seed + 7), lm.cfg["batch"]))
        samples = train_step_ms({"dense": dense.model, "monarch": mon_full.model}, (xb, yb), lm.loss,
                                cfg.timing_rounds)
        timing = {k: statistics.median(v) for k, v in samples.items()}
        ctx.observe(timing_rounds=len(samples["dense"]))
    plots = []
    if "sparse" in modes:
        vt = ImageTask(cfg.size, seed, cfg.vit_data)
        vruns = {mlp: train_run(vt, vt.build(mlp, nb, seed=seed), cfg.vit_steps, seed=seed, desc=f"vit-{mlp}", **kw)
                 for mlp in ("dense", "monarch")}
        ctx.observe(vit_steps=len(vruns["dense"].hist.losses), vit_data=vt.dataset)
        vx, vy = (t.to(ctx.device) for t in vt.batch(torch.Generator().manual_seed(seed + 7), vt.cfg["batch"]))
        vtiming = {k: statistics.median(v) for k, v in
                   train_step_ms({k: r.model for k, r in vruns.items()}, (vx, vy), vt.loss, cfg.timing_rounds).items()}
        out["sparse"] = {"gpt": sparse_vs_dense(lm, {"dense": dense, "monarch": mon_full}, timing, causal=True),
                         "vit": sparse_vs_dense(vt, vruns, vtiming, causal=False)}
        for k, r in vruns.items():
            out["sparse"]["vit"][k]["acc_curve"] = [(s, e["val_acc"]) for s, e in r.hist.evals]
        res = out["sparse"]
        plots.append(plot_curves(ctx.plot_path("sparse_training.png"), [
            Panel("GPT-2 char LM (Shakespeare)", {k: list(zip(*res["gpt"][k]["curve"])) for k in ("dense", "monarch")},
                  xlabel="step", ylabel="val loss", markers=True),
            Panel(f"ViT on {vt.dataset}", {k: list(zip(*res["vit"][k]["acc_curve"])) for k in ("dense", "monarch")},
                  xlabel="step", ylabel="val accuracy", markers=True)]))
    if "d2s" in modes:
        out["d2s"] = dense_to_sparse(lm, dense.model, cfg.finetune_steps, nb, seed, **kw)
        ctx.observe(finetune_steps=out["d2s"]["runs"]["projected_monarch"]["steps"])
        plots.append(plot_curves(ctx.plot_path("dense_to_sparse.png"), [Panel(
            "fine-tuning on the Sonnets", {k: list(zip(*v["curve"])) for k, v in out["d2s"]["runs"].items()},
            xlabel="step", ylabel="val loss (Sonnets)", markers=True)]))
    if "reverse" in modes:
        out["reverse"] = reverse_sparsification(lm, dense, mon_head, mon_full, cfg.gpt_steps, seed, timing, **kw)
        plots.append(plot_curves(ctx.plot_path("reverse_sparsification.png"), [Panel(
            "reverse sparsification (GPT-2 char LM)", {k: list(zip(*v["curve"])) for k, v in
                                                       out["reverse"]["runs"].items()},
            xlabel="step", ylabel="val loss", vline=out["reverse"]["switch_step"], markers=True)]))
    out["plots"] = plots
    return out


RECIPE = Recipe("monarch", Config, run, quick=QUICK, description=__doc__.split("\n\n")[0])
