"""DepthShrinker (Fu et al., "DepthShrinker: A New Compression Paradigm Towards Boosting Real-Hardware Efficiency of
Compact Neural Networks", ICML 2022): remove the activations of whole inverted residual blocks, fine-tune, merge.

The paper's stages, on offline MNIST (5000 images) or sklearn digits, over :mod:`monarch_kernels.layers.depthshrinker`:

1. **Train** a small MobileNetV2 (:class:`~monarch_kernels.layers.depthshrinker.MobileNetV2Mini`, Monarch 1×1
   convs by default) with all activations.
2. **Search** which ``R = N − ⌊keep_ratio·N⌋`` of the ``N`` block activations to remove (:func:`search_removal`).
   Default ``"relax"``: each block's gate is a leaky ReLU6 ``σ(x) + s·(x − σ(x))`` whose slope ``s`` is learned
   jointly with the weights, and after every step the slopes are projected onto the removal budget
   ``{s ∈ [0, 1]^N : Σ s = R}`` (the convex hull of the masks removing ``R`` activations). The gradient
   ``∂L/∂s = Σ (x − σ(x)) ∂L/∂y`` is the paper's; the budget is its top-k sparsity constraint made continuous.
   ``"hard"`` is the paper's gate itself (official ``learnable_relu6_hard``): a hard top-k mask in the forward
   pass, recomputed from the scores before every step. The mask is the top-``R`` of the final scores.
3. **Fine-tune** with the activations removed, starting again from the *trained* weights (the official code
   re-loads ``DS.PRETRAINED``; the search only supplies the mask), with self-distillation from the original net
   (:func:`distillation_loss`, α = 0.7, T = 1, the official config). Removed blocks get a ReLU6 after the residual
   sum (official ``ADD_FINAL_ACT='relu6'``).
4. **Merge** each removed block into one dense ``Conv2d`` (:func:`monarch_kernels.layers.depthshrinker.depthshrink`)
   — exact, unlike the official ``merge_block()`` which swaps in a random conv to time it — and report parameters
   and latency before and after.

Protocol (the baseline of the paper's ablation: a random mask removing as many activations): ``seeds``
independent replicates. Replicate ``r`` trains its own original network, runs its own search, draws its own random
mask, and fine-tunes the learned mask, the random mask and the all-kept network (control: the extra epochs alone)
with the same data order and budget. Learned − random is reported per replicate and as mean ± sample std over
the ``n`` replicates, before fine-tuning (BatchNorm statistics recomputed for the new mask, :func:`recalibrate_bn`,
else every removal reads as chance) and after.

Simplified against the official recipe (small-scale CPU reproduction): Adam + cosine decay instead of SGD-Nesterov
for 180 epochs; no label smoothing, RandAugment or EMA; no latency term in the search loss (the official
``LAT_COST_WEIGHT`` term looks sign-inverted); no Gumbel ranking; KL instead of the official soft cross-entropy
(same gradient); candidates are the blocks only (not the stem/head activations, whose removal merges nothing).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monarch_kernels.layers.depthshrinker import (
    MBV2_MINI_BLOCKS,
    MobileNetV2Mini,
    count_layers,
    depthshrink,
    gate_scores,
    project_scores,
    removal_count,
    set_relaxed,
    set_removed,
    set_search,
    shrink_blocks,
    topk_keep,
    update_search_flags,
)

from .data import load_image_dataset
from .recipe import Recipe
from .train import evaluate_classifier, minibatches, predict_logits

#: the 4-block network of the quick setting
QUICK_BLOCKS = ((1, 8, 1, 3), (3, 12, 2, 3), (3, 12, 1, 3), (3, 16, 2, 3))
SEARCH_METHODS = ("relax", "hard")


# ------------------------------------------------------------------------------------------------ the API
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      alpha: float = 0.7, temperature: float = 1.0) -> torch.Tensor:
    """``α T² KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) CE(y, z_s)`` (DepthShrinker's self-distillation;
    ``z (B, classes)``, ``y (B,)``)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"distillation_loss: student_logits and teacher_logits must both be (B, classes), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"distillation_loss: need 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")
    T = temperature
    kd = F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(teacher_logits.detach() / T, -1),
                  reduction="batchmean", log_target=True)
    return alpha * T * T * kd + (1 - alpha) * F.cross_entropy(student_logits, target)


def _cosine(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, total_steps) / total_steps)))


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
         generator: torch.Generator, loss_fn, params=None, before_step=None, after_step=None, epoch_end=None,
         progress=None, desc="") -> list:
    """Adam on ``params`` (default: all) with per-step cosine decay; ``loss_fn(model, xb, yb) -> loss``;
    ``before_step()`` runs before each step, ``after_step()`` after the optimizer step, ``epoch_end()`` after
    each epoch."""
    device = next(model.parameters()).device
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    sched = _cosine(opt, max(epochs * math.ceil(len(x) / batch_size), 1))
    losses = []
    for _ in (progress(range(epochs), desc=desc) if progress else range(epochs)):
        model.train()
        for idx in minibatches(len(x), batch_size, generator):
            if before_step is not None:
                before_step()
            loss = loss_fn(model, x[idx].to(device), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
        if epoch_end is not None:
            epoch_end()
    return losses


def _cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(xb), yb)


def search_removal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, keep_ratio: float, epochs: int,
                   method: str = "relax", batch_size: int = 64, lr: float = 1e-3, score_lr: float = 0.2,
                   generator: torch.Generator, progress=None) -> tuple[torch.Tensor, list]:
    """Stage 2 on a copy of ``model``: weights (Adam, ``lr``, cosine) and gate scores (plain SGD, ``score_lr``:
    the scores' relative gradient sizes are the signal, which a per-coordinate Adam scaling would erase) train
    jointly on the task loss. ``method="relax"``: relaxed gates, scores projected onto the removal budget after
    every step; ``"hard"``: the paper's hard top-k gates, flags recomputed before every step. Every score starts
    at ``R/N``. Returns (``removed`` flags: the ``R`` largest final scores, per-epoch score history ``[N]``)."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"search_removal: method must be one of {SEARCH_METHODS}, got {method!r}")
    net = copy.deepcopy(model)
    set_relaxed(net, keep_ratio)  # all scores at R/N: the centre of the budget
    if method == "hard":
        set_search(net, keep_ratio)
    scores = [b.gate.score for b in shrink_blocks(net)]
    ids = {id(p) for p in scores}
    score_opt = torch.optim.SGD(scores, lr=score_lr)
    history = [gate_scores(net).tolist()]

    def after_step():
        score_opt.step()
        score_opt.zero_grad(set_to_none=True)
        if method == "relax":
            project_scores(net, keep_ratio)

    _fit(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator, loss_fn=_cross_entropy,
         params=[p for p in net.parameters() if id(p) not in ids],
         before_step=(lambda: update_search_flags(net, keep_ratio)) if method == "hard" else None,
         after_step=after_step, epoch_end=lambda: history.append(gate_scores(net).tolist()), progress=progress,
         desc=f"search ({method})")
    return topk_keep(gate_scores(net), keep_ratio), history


def cut_margin(scores: Sequence[float], removed: Sequence[bool]) -> float:
    """Score gap at the cut: the smallest removed score minus the largest kept one (> 0 when the mask is the
    strict top-k of the scores; near 0 when the cut is a coin toss)."""
    s, r = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(removed, dtype=torch.bool)
    if r.all() or not r.any():
        return float("inf")
    return float(s[r].min() - s[~r].max())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on ``x``: the plain average of the statistics of the
    train-mode forward passes over ``x`` in batches of ``batch_size`` (no gradient), then switch to eval mode. Removing activations shifts every later layer's input
    distribution; with the stale statistics any removal of several activations reads as chance accuracy."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: equal weight per batch
    model.train()
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model.eval()


def finetune_removed(original: nn.Module, removed: Sequence[bool], x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                     batch_size: int = 64, lr: float = 1e-3, alpha: float = 0.7, temperature: float = 1.0,
                     generator: torch.Generator, progress=None) -> nn.Module:
    """Stage 3: a copy of ``original`` with ``removed`` activations, fine-tuned with distillation from
    ``original`` (frozen, eval mode)."""
    teacher = copy.deepcopy(original).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(original)
    set_removed(student, removed)

    def loss_fn(m, xb, yb):
        with torch.no_grad():
            zt = teacher(xb)
        return distillation_loss(m(xb), zt, yb, alpha, temperature)

    if epochs > 0:
        _fit(student, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator, loss_fn=loss_fn,
             progress=progress, desc="finetune")
    return student.eval()


def random_removal(n_blocks: int, n_removed: int, generator: torch.Generator) -> torch.Tensor:
    """``n_removed`` of ``n_blocks`` flags set, uniformly at random."""
    removed = torch.zeros(n_blocks, dtype=torch.bool)
    removed[torch.randperm(n_blocks, generator=generator)[:n_removed]] = True
    return removed


@torch.no_grad()
def paired_latency_ms(models: dict, x: torch.Tensor, *, rounds: int = 30, inner: int = 3) -> dict:
    """Median forward latency (ms) of each model on ``x``, measured interleaved (A, B, A, B, …) in one process so
    that machine load hits every model alike."""
    for m in models.values():
        m.eval()
        m(x)
    times = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                m(x)
            times[k].append((time.perf_counter() - t0) / inner * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ the recipe
def add_arguments(p) -> None:
    p.add_argument("--dataset", default=None, choices=["mnist", "digits"], help="default mnist (digits with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="stage-1 training epochs (default 10; quick 4)")
    p.add_argument("--search", default="relax", choices=SEARCH_METHODS, help="relaxed budget search or the paper's hard gate")
    p.add_argument("--search-epochs", type=int, default=None, help="stage-2 search epochs (default 2; quick 2)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="stage-3 epochs (default 4; quick 2)")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="fraction of block activations kept")
    p.add_argument("--seeds", type=int, default=None, help="independent replicates (default 3; quick 1)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of every stage (default 5e-3; quick 1e-2)")
    p.add_argument("--score-lr", type=float, default=0.2, help="search score LR (plain SGD)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.7, help="distillation weight α")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--pointwise", default="monarch", choices=["dense", "monarch"],
                   help="1×1 convs as nn.Conv2d or MonarchLinear over channels")
    p.add_argument("--nblocks", type=int, default=4, help="Monarch blocks for --pointwise monarch")
    p.add_argument("--no-final-act", action="store_true", help="no ReLU6 after removed blocks (ADD_FINAL_ACT off)")
    p.add_argument("--recal-images", type=int, default=1000, help="training images for BatchNorm recalibration")
    p.add_argument("--latency-batch", type=int, default=64)


def _acc(model: nn.Module, split) -> float:
    return evaluate_classifier(model, split.x_test, split.y_test)["accuracy"]


def _mean_std(v: list) -> tuple[float, float]:
    return float(statistics.mean(v)), float(statistics.stdev(v)) if len(v) > 1 else 0.0


def _replicate(r: int, split, args, ctx, build, n_removed: int) -> dict:
    """One independent replicate: train, search, then fine-tune the learned mask, a random mask and the all-kept
    control with the same generator (same data order) and budget."""
    base = 1000 * (100 * args.seed + r)
    gen = lambda offset: torch.Generator().manual_seed(base + offset)  # noqa: E731
    xtr, ytr = split.x_train, split.y_train
    torch.manual_seed(base)
    model = build().to(ctx.device)
    _fit(model, xtr, ytr, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, generator=gen(1),
         loss_fn=_cross_entropy, progress=ctx.progress, desc="train")
    model.eval()
    out = {"original": model, "acc_original": _acc(model, split)}
    learned, history = search_removal(model, xtr, ytr, keep_ratio=args.keep_ratio, epochs=args.search_epochs,
                                      method=args.search, batch_size=args.batch_size, lr=args.lr,
                                      score_lr=args.score_lr, generator=gen(2), progress=ctx.progress)
    n = len(learned)
    masks = {"learned": learned, "random": random_removal(n, n_removed, gen(3)),
             "control": torch.zeros(n, dtype=torch.bool)}
    out.update(mask_learned=learned.int().tolist(), mask_random=masks["random"].int().tolist(),
               score_history=history, cut_margin=cut_margin(history[-1], learned))
    recal = split.x_train[: args.recal_images]
    for kind, mask in masks.items():
        if kind != "control":
            removed_only = copy.deepcopy(model)
            set_removed(removed_only, mask.tolist())
            out[f"acc_{kind}_no_ft"] = _acc(recalibrate_bn(removed_only, recal), split)
        ft = finetune_removed(model, mask.tolist(), xtr, ytr, epochs=args.finetune_epochs,
                              batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
                              temperature=args.temperature, generator=gen(4), progress=ctx.progress)
        out[f"acc_{kind}_finetuned"], out[f"net_{kind}"] = _acc(ft, split), ft
    ctx.log(f"[depthshrinker] replicate {r}: original {out['acc_original']:.4f}; learned {out['mask_learned']} "
            f"(scores {[round(s, 3) for s in history[-1]]}, cut margin {out['cut_margin']:.3f}) "
            f"{out['acc_learned_no_ft']:.4f} -> {out['acc_learned_finetuned']:.4f}; random {out['mask_random']} "
            f"{out['acc_random_no_ft']:.4f} -> {out['acc_random_finetuned']:.4f}; "
            f"all kept {out['acc_control_finetuned']:.4f}")
    return out


def run(args, ctx) -> dict:
    quick = args.quick
    for name, full, small in (("dataset", "mnist", "digits"), ("epochs", 10, 4), ("search_epochs", 2, 2),
                              ("finetune_epochs", 4, 2), ("seeds", 3, 1), ("lr", 5e-3, 1e-2)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if not 0.0 <= args.keep_ratio < 1.0:
        raise ValueError(f"--keep-ratio must be in [0, 1), got {args.keep_ratio}")
    split = load_image_dataset(args.dataset, seed=args.seed)
    big = split.input_shape[-1] >= 16

    def build() -> MobileNetV2Mini:
        return MobileNetV2Mini(split.input_shape[0], split.num_classes, QUICK_BLOCKS if quick else MBV2_MINI_BLOCKS,
                               stem_channels=8 if quick else 12, stem_stride=2 if big else 1,
                               head_channels=32 if quick else 64, pointwise=args.pointwise, nblocks=args.nblocks,
                               final_act=not args.no_final_act)

    n_blocks = len(shrink_blocks(build()))
    n_removed = removal_count(n_blocks, args.keep_ratio)
    ctx.log(f"[depthshrinker] {args.dataset}: {len(split.x_train)} train / {len(split.x_test)} test, {n_blocks} "
            f"blocks, remove {n_removed}, pointwise={args.pointwise}, search={args.search}, {args.seeds} replicates")
    reps = [_replicate(r, split, args, ctx, build, n_removed) for r in range(args.seeds)]

    # stage 4 on replicate 0: merge the fine-tuned learned and random networks, parameters and latency
    r0 = reps[0]
    merged = depthshrink(r0["net_learned"])
    merged_random = depthshrink(r0["net_random"])
    with torch.no_grad():
        z_ft = predict_logits(r0["net_learned"], split.x_test)
        z_merged = predict_logits(merged, split.x_test)
    xb = split.x_test[: args.latency_batch].to(ctx.device)
    variants = {"original": r0["original"], "learned_unmerged": r0["net_learned"], "learned_merged": merged,
                "random_merged": merged_random}
    lat = paired_latency_ms(variants, xb, rounds=10 if quick else 20, inner=2)
    ctx.log(f"[depthshrinker] merged: max |Δlogit| {float((z_ft - z_merged).abs().max()):.2e}, params "
            f"{n_params(r0['net_learned'])} -> {n_params(merged)}, latency {lat['learned_unmerged']:.2f} -> "
            f"{lat['learned_merged']:.2f} ms")

    metrics = {
        "dataset": args.dataset, "n_train": len(split.x_train), "n_test": len(split.x_test), "n_blocks": n_blocks,
        "n_removed": n_removed, "keep_ratio": args.keep_ratio, "pointwise": args.pointwise, "search": args.search,
        "seeds": args.seeds,
    }
    per_rep = ("acc_original", "mask_learned", "mask_random", "cut_margin", "acc_learned_no_ft",
               "acc_random_no_ft", "acc_learned_finetuned", "acc_random_finetuned", "acc_control_finetuned")
    for key in per_rep:
        metrics[key] = [rep[key] for rep in reps]
    metrics["search_scores"] = [rep["score_history"][-1] for rep in reps]
    metrics["search_score_history"] = [rep["score_history"] for rep in reps]
    for key in ("acc_original", "acc_learned_no_ft", "acc_random_no_ft", "acc_learned_finetuned",
                "acc_random_finetuned", "acc_control_finetuned"):
        metrics[f"{key}_mean"], metrics[f"{key}_std"] = _mean_std(metrics[key])
    for when in ("no_ft", "finetuned"):
        diff = [a - b for a, b in zip(metrics[f"acc_learned_{when}"], metrics[f"acc_random_{when}"])]
        metrics[f"learned_minus_random_{when}"] = diff
        metrics[f"learned_minus_random_{when}_mean"], metrics[f"learned_minus_random_{when}_std"] = _mean_std(diff)
        metrics[f"learned_wins_{when}"] = sum(d > 0 for d in diff)
    metrics["distinct_learned_masks"] = len({tuple(m) for m in metrics["mask_learned"]})
    metrics["removal_frequency_per_block"] = [statistics.mean(col) for col in zip(*metrics["mask_learned"])]
    metrics.update({
        "acc_merged": float((z_merged.argmax(-1) == split.y_test).float().mean()),
        "merge_max_abs_logit_diff": float((z_ft - z_merged).abs().max()),
        "layers_unmerged": count_layers(r0["net_learned"]), "layers_merged": count_layers(merged),
        "params": {k: n_params(m) for k, m in variants.items()},
        "latency_ms": lat,
        "latency_device": str(ctx.device), "latency_threads": torch.get_num_threads(), "latency_dtype": "float32",
        "latency_input_shape": list(xb.shape),
        "speedup_merged_vs_unmerged": lat["learned_unmerged"] / lat["learned_merged"],
        "speedup_merged_vs_original": lat["original"] / lat["learned_merged"],
    })
    _plot(metrics, ctx.plot_path("depthshrinker.png"))
    return metrics


def _plot(m: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    reps = range(m["seeds"])
    for ax, when, title in ((axes[0], "no_ft", "removed, BN recalibrated (before fine-tuning)"),
                            (axes[1], "finetuned", "after fine-tuning (same budget)")):
        ax.plot(reps, m[f"acc_learned_{when}"], "o-", color="C0", label="learned mask")
        ax.plot(reps, m[f"acc_random_{when}"], "o-", color="C1", label="random mask")
        if when == "finetuned":
            ax.plot(reps, m["acc_control_finetuned"], "s--", color="0.4", label="all kept, same fine-tuning")
            ax.plot(reps, m["acc_original"], "k_", ms=14, label="original")
        ax.set_xticks(list(reps))
        ax.set_xlabel("replicate (own training, search, random mask)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{title}\nlearned − random {100 * m[f'learned_minus_random_{when}_mean']:+.2f} ± "
                     f"{100 * m[f'learned_minus_random_{when}_std']:.2f} pts (n={m['seeds']})", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    n, width = m["n_blocks"], 0.8 / m["seeds"]
    for r, (scores, mask) in enumerate(zip(m["search_scores"], m["mask_learned"])):
        xs = [i + (r - (m["seeds"] - 1) / 2) * width for i in range(n)]
        ax.bar(xs, scores, width, color=[f"C{r}" if k else "none" for k in mask], edgecolor=f"C{r}",
               label=f"replicate {r}")
    ax.set_xticks(range(n), [f"block {i}" for i in range(n)], fontsize=7)
    ax.set_ylabel("final score s (1 = linear)")
    ax.set_title(f"{m['dataset']}, search={m['search']}: remove {m['n_removed']} of {m['n_blocks']} (filled)\n"
                 f"{m['distinct_learned_masks']} distinct mask(s) over {m['seeds']} searches", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[3]
    names = list(m["latency_ms"])
    bars = ax.bar([k.replace("_", "\n") for k in names], [m["latency_ms"][k] for k in names],
                  color=["k", "C0", "C2", "C1"])
    ax.bar_label(bars, labels=[f"{m['params'][k]:,} params" for k in names], fontsize=7)
    ax.set_ylabel(f"latency (ms), batch {m['latency_input_shape'][0]}, {m['latency_device']}, "
                  f"{m['latency_threads']} thread(s)", fontsize=8)
    ax.set_title(f"replicate 0: merged vs unmerged {m['speedup_merged_vs_unmerged']:.2f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RECIPE = Recipe("depthshrinker", add_arguments, run,
                "DepthShrinker: train a MobileNetV2-mini, search which block activations to remove, fine-tune with "
                "distillation, merge the linear blocks into dense convs; learned vs random removal")
