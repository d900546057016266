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

Protocol. The paper compares the shrunk network with the original one (accuracy against measured latency); the
search is checked against a random mask removing as many activations. ``seeds`` independent replicates: replicate
``r`` trains its own original network, runs its own search, draws its own random mask, and fine-tunes the learned
mask, the random mask and the all-kept network (control: the extra epochs alone) with the same data order and
budget. Learned − random is reported per replicate and as mean ± sample std over the ``n`` replicates
(:func:`methods.report.paired`), before fine-tuning (BatchNorm statistics recomputed for the new mask,
:func:`recalibrate_bn`, else every removal of several activations reads as chance) and after. Stage 4 runs on the
first replicate: parameters and latency of the original, the unmerged and merged learned network and the merged
random network, timed interleaved in one process.

Simplified against the official recipe (small-scale CPU reproduction): Adam + cosine decay instead of SGD-Nesterov
for 180 epochs; no label smoothing, RandAugment or EMA; no latency term in the search loss (the official
``LAT_COST_WEIGHT`` term looks sign-inverted); no Gumbel ranking; candidates are the blocks only (not the stem/head
activations, whose removal merges nothing).
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

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
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, format_mean_std, interleaved_times_ms, mean_std, paired, plot_curves
from .train import (
    History,
    cosine_lr,
    cross_entropy_loss,
    epoch_batches,
    evaluate_classifier,
    fit,
    predict_logits,
    soft_cross_entropy,
)

#: the 4-block network of the quick setting
QUICK_BLOCKS = ((1, 8, 1, 3), (3, 12, 2, 3), (3, 12, 1, 3), (3, 16, 2, 3))
SEARCH_METHODS = ("relax", "hard")


# ------------------------------------------------------------------------------------------------ the API
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                      alpha: float = 0.7, temperature: float = 1.0) -> torch.Tensor:
    """DepthShrinker's self-distillation loss, as the official ``DS.DISTILL`` code computes it::

        L = α T² CE(softmax(z_t/T), log_softmax(z_s/T)) + (1 − α) CE(y, z_s)

    (soft cross-entropy, :func:`methods.train.soft_cross_entropy`; teacher detached); ``z (B, classes)``,
    ``y (B,)``."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"distillation_loss: student_logits and teacher_logits must both be (B, classes), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"distillation_loss: need 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")
    T = temperature
    kd = soft_cross_entropy(teacher_logits, student_logits, T)
    return alpha * T * T * kd + (1 - alpha) * F.cross_entropy(student_logits, target)


def train_adam(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
               generator: torch.Generator, loss_fn=cross_entropy_loss, params=None, step=None, on_epoch_end=None,
               progress=None, desc: str = "train") -> History:
    """Every stage's optimisation: Adam on ``params`` (default: all) at ``lr`` cosine-decayed to 0 over the run
    (:func:`methods.train.cosine_lr`), shuffled mini-batches of ``(x, y)`` drawn from ``generator``, through
    :func:`methods.train.fit` (``loss_fn(model, xb, yb)``, or a custom ``step(model, batch, optimizer)``;
    ``on_epoch_end(epoch)`` after every epoch)."""
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    schedule = cosine_lr(lr, max(epochs * math.ceil(len(x) / batch_size), 1), min_ratio=0.0)
    custom = None if step is None else (lambda m, batch: step(m, batch, opt))
    return fit(model, opt, epoch_batches(x, y, batch_size=batch_size, generator=generator), epochs=epochs,
               loss_fn=None if custom else loss_fn, step=custom, schedule=schedule, on_epoch_end=on_epoch_end,
               progress=progress, desc=desc)


def search_removal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, keep_ratio: float, epochs: int,
                   method: str = "relax", batch_size: int = 64, lr: float = 1e-3, score_lr: float = 0.2,
                   generator: torch.Generator, progress=None) -> tuple[torch.Tensor, list]:
    """Stage 2 on a copy of ``model``: weights (:func:`train_adam`) and gate scores (plain SGD at ``score_lr``:
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

    def step(m: nn.Module, batch, opt: torch.optim.Optimizer) -> torch.Tensor:
        if method == "hard":
            update_search_flags(m, keep_ratio)
        loss = cross_entropy_loss(m, *batch)
        opt.zero_grad(set_to_none=True)
        score_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        score_opt.step()
        if method == "relax":
            project_scores(m, keep_ratio)
        return loss

    def record(_epoch: int) -> None:
        history.append(gate_scores(net).tolist())

    train_adam(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator,
               params=[p for p in net.parameters() if id(p) not in ids], step=step, on_epoch_end=record,
               progress=progress, desc=f"search ({method})")
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
    train-mode forward passes over ``x`` in batches of ``batch_size`` (no gradient), then switch to eval mode.
    Removing activations shifts every later layer's input distribution; with the stale statistics any removal of
    several activations reads as chance accuracy."""
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
                     generator: torch.Generator, progress=None) -> tuple[nn.Module, History]:
    """Stage 3: a copy of ``original`` with ``removed`` activations, fine-tuned (:func:`train_adam`) with
    :func:`distillation_loss` from ``original`` (frozen, eval mode). Returns the student (eval mode) and its
    training history."""
    teacher = copy.deepcopy(original).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(original)
    set_removed(student, removed)

    def loss_fn(m, xb, yb):
        with torch.no_grad():
            zt = teacher(xb)
        return distillation_loss(m(xb), zt, yb, alpha, temperature)

    hist = train_adam(student, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator,
                      loss_fn=loss_fn, progress=progress, desc="finetune")
    return student.eval(), hist


def random_removal(n_blocks: int, n_removed: int, generator: torch.Generator) -> torch.Tensor:
    """``n_removed`` of ``n_blocks`` flags set, uniformly at random."""
    removed = torch.zeros(n_blocks, dtype=torch.bool)
    removed[torch.randperm(n_blocks, generator=generator)[:n_removed]] = True
    return removed


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class Config:
    dataset: str = option("mnist", "image dataset", choices=("mnist", "digits"))
    small_model: bool = option(False, "the 4-block model with narrow stem and head (QUICK_BLOCKS)")
    pointwise: str = option("monarch", "1×1 convs as MonarchLinear over channels or nn.Conv2d",
                            choices=("monarch", "dense"))
    nblocks: int = option(4, "Monarch blocks of the 1×1 convs")
    final_act: bool = option(True, "ReLU6 after removed blocks (official ADD_FINAL_ACT)")
    seeds: int = option(3, "independent replicates: own training, search, random mask and fine-tuning")
    epochs: int = option(10, "stage-1 training epochs")
    search: str = option("relax", "relaxed budget search or the paper's hard top-k gate", choices=SEARCH_METHODS)
    search_epochs: int = option(2, "stage-2 search epochs")
    score_lr: float = option(0.2, "search score learning rate (plain SGD)")
    keep_ratio: float = option(0.5, "fraction of block activations kept")
    finetune_epochs: int = option(4, "stage-3 epochs (same for learned, random and all-kept)")
    lr: float = option(5e-3, "Adam learning rate of every stage (cosine-decayed to 0)")
    batch_size: int = option(64, "mini-batch size")
    alpha: float = option(0.7, "distillation weight α")
    temperature: float = option(1.0, "distillation temperature T")
    recal_images: int = option(1000, "training images for the BatchNorm recalibration before fine-tuning")
    latency_batch: int = option(64, "batch of the latency measurement")
    latency_rounds: int = option(20, "rounds of the interleaved latency measurement")

    def __post_init__(self):
        if not 0.0 <= self.keep_ratio < 1.0:
            raise ValueError(f"--keep-ratio must be in [0, 1), got {self.keep_ratio}")
        for name in ("seeds", "nblocks", "batch_size", "recal_images", "latency_batch", "latency_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


QUICK = {"dataset": "digits", "small_model": True, "seeds": 1, "epochs": 4, "finetune_epochs": 2, "lr": 1e-2,
         "latency_rounds": 10}


def _acc(model: nn.Module, split) -> float:
    return evaluate_classifier(model, split.x_test, split.y_test)["accuracy"]


def _replicate(seed: int, split, cfg: Config, ctx: RunContext, build, n_removed: int) -> dict:
    """One independent replicate: train, search, then fine-tune the learned mask, a random mask and the all-kept
    control with the same generator (same data order) and budget."""
    gen = lambda offset: torch.Generator().manual_seed(1000 * seed + offset)  # noqa: E731
    xtr, ytr = split.x_train, split.y_train
    torch.manual_seed(1000 * seed)
    model = build().to(ctx.device)
    hist = train_adam(model, xtr, ytr, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, generator=gen(1),
                      progress=ctx.progress, desc="train")
    ctx.observe(epochs=hist.epochs, lr=hist.lrs[0], small_model=len(shrink_blocks(model)) == len(QUICK_BLOCKS))
    model.eval()
    out = {"seed": seed, "original": model, "acc_original": _acc(model, split)}
    learned, history = search_removal(model, xtr, ytr, keep_ratio=cfg.keep_ratio, epochs=cfg.search_epochs,
                                      method=cfg.search, batch_size=cfg.batch_size, lr=cfg.lr,
                                      score_lr=cfg.score_lr, generator=gen(2), progress=ctx.progress)
    ctx.observe(search_epochs=len(history) - 1)
    n = len(learned)
    masks = {"learned": learned, "random": random_removal(n, n_removed, gen(3)),
             "control": torch.zeros(n, dtype=torch.bool)}
    out.update(mask_learned=learned.int().tolist(), mask_random=masks["random"].int().tolist(),
               scores=history[-1], score_history=history, cut_margin=cut_margin(history[-1], learned))
    recal = xtr[: cfg.recal_images]
    for kind, mask in masks.items():
        if kind != "control":
            removed_only = copy.deepcopy(model)
            set_removed(removed_only, mask.tolist())
            out[f"acc_{kind}_no_ft"] = _acc(recalibrate_bn(removed_only, recal), split)
        ft, ft_hist = finetune_removed(model, mask.tolist(), xtr, ytr, epochs=cfg.finetune_epochs,
                                       batch_size=cfg.batch_size, lr=cfg.lr, alpha=cfg.alpha,
                                       temperature=cfg.temperature, generator=gen(4), progress=ctx.progress)
        ctx.observe(finetune_epochs=ft_hist.epochs)
        out[f"acc_{kind}_finetuned"], out[f"net_{kind}"] = _acc(ft, split), ft
    ctx.log(f"[depthshrinker] seed {seed}: original {out['acc_original']:.4f}; learned {out['mask_learned']} "
            f"(scores {[round(v, 3) for v in history[-1]]}, cut margin {out['cut_margin']:.3f}) "
            f"{out['acc_learned_no_ft']:.4f} -> {out['acc_learned_finetuned']:.4f}; random {out['mask_random']} "
            f"{out['acc_random_no_ft']:.4f} -> {out['acc_random_finetuned']:.4f}; "
            f"all kept {out['acc_control_finetuned']:.4f}")
    return out


def _merge_and_time(rep: dict, split, cfg: Config, ctx: RunContext) -> dict:
    """Stage 4 on one replicate: merge its fine-tuned learned and random networks (exactness, layers, parameters)
    and time original / learned unmerged / learned merged / random merged interleaved in one process."""
    merged, merged_random = depthshrink(rep["net_learned"]), depthshrink(rep["net_random"])
    z_ft, z_merged = predict_logits(rep["net_learned"], split.x_test), predict_logits(merged, split.x_test)
    variants = {"original": rep["original"], "learned_unmerged": rep["net_learned"], "learned_merged": merged,
                "random_merged": merged_random}
    xb = split.x_test[: cfg.latency_batch].to(ctx.device)
    with torch.no_grad():
        times = interleaved_times_ms({k: (lambda m=m: m(xb)) for k, m in variants.items()}, ctx.device,
                                     rounds=cfg.latency_rounds, inner=2)
    ctx.observe(latency_rounds=len(times["original"]))
    lat = {k: statistics.median(v) for k, v in times.items()}
    return {
        "merge_seed": rep["seed"], "acc_merged": float((z_merged.argmax(-1) == split.y_test).float().mean()),
        "merge_max_abs_logit_diff": float((z_ft - z_merged).abs().max()),
        "layers_unmerged": count_layers(rep["net_learned"]), "layers_merged": count_layers(merged),
        "params": {k: n_params(m) for k, m in variants.items()}, "latency_ms": lat, "latency_ms_rounds": times,
        "latency_device": str(ctx.device), "latency_threads": torch.get_num_threads(), "latency_dtype": "float32",
        "latency_input_shape": list(xb.shape),
        "speedup_merged_vs_unmerged": lat["learned_unmerged"] / lat["learned_merged"],
        "speedup_merged_vs_original": lat["original"] / lat["learned_merged"],
    }


def run(cfg: Config, ctx: RunContext) -> dict:
    split = load_image_dataset(cfg.dataset, seed=ctx.seed)
    ctx.observe(dataset="digits" if split.input_shape[-1] == 8 else "mnist")

    def build() -> MobileNetV2Mini:
        return MobileNetV2Mini(split.input_shape[0], split.num_classes,
                               QUICK_BLOCKS if cfg.small_model else MBV2_MINI_BLOCKS,
                               stem_channels=8 if cfg.small_model else 12,
                               stem_stride=2 if split.input_shape[-1] >= 16 else 1,
                               head_channels=32 if cfg.small_model else 64, pointwise=cfg.pointwise,
                               nblocks=cfg.nblocks, final_act=cfg.final_act)

    n_blocks = len(QUICK_BLOCKS if cfg.small_model else MBV2_MINI_BLOCKS)
    n_removed = removal_count(n_blocks, cfg.keep_ratio)
    ctx.log(f"[depthshrinker] {cfg.dataset}: {len(split.x_train)} train / {len(split.x_test)} test, {n_blocks} "
            f"blocks, remove {n_removed}, pointwise={cfg.pointwise}, search={cfg.search}, {cfg.seeds} replicates")
    reps = [_replicate(seed, split, cfg, ctx, build, n_removed) for seed in seed_list(ctx.seed, cfg.seeds)]
    ctx.observe(seeds=len(reps))
    keys = ("acc_original", "acc_learned_no_ft", "acc_random_no_ft", "acc_learned_finetuned", "acc_random_finetuned",
            "acc_control_finetuned")
    per_seed = [{k: v for k, v in r.items() if not k.startswith(("net_", "original"))} for r in reps]
    summary = {k: mean_std([r[k] for r in reps]) for k in keys}
    comparisons = {
        "learned_minus_random_no_ft": paired(summary["acc_learned_no_ft"]["values"],
                                             summary["acc_random_no_ft"]["values"]),
        "learned_minus_random_finetuned": paired(summary["acc_learned_finetuned"]["values"],
                                                 summary["acc_random_finetuned"]["values"]),
        "learned_minus_all_kept_finetuned": paired(summary["acc_learned_finetuned"]["values"],
                                                   summary["acc_control_finetuned"]["values"]),
    }
    masks = [tuple(r["mask_learned"]) for r in reps]
    search = {"distinct_learned_masks": len(set(masks)), "cut_margin": mean_std([r["cut_margin"] for r in reps]),
              "removal_frequency_per_block": [statistics.fmean(col) for col in zip(*masks)]}
    merge = _merge_and_time(reps[0], split, cfg, ctx)
    for k in keys:
        ctx.log(f"[depthshrinker] {k}: {format_mean_std(summary[k], 4)}")
    for k, c in comparisons.items():
        ctx.log(f"[depthshrinker] {k}: {format_mean_std(c, 4)}, positive in {c['positive']} of {c['n']}")
    ctx.log(f"[depthshrinker] merged (seed {merge['merge_seed']}): "
            f"max |Δlogit| {merge['merge_max_abs_logit_diff']:.2e}, "
            f"params {merge['params']['learned_unmerged']} -> {merge['params']['learned_merged']}, latency "
            f"{merge['latency_ms']['learned_unmerged']:.2f} -> {merge['latency_ms']['learned_merged']:.2f} ms")
    metrics = {"dataset": cfg.dataset, "n_train": len(split.x_train), "n_test": len(split.x_test),
               "n_blocks": n_blocks, "n_removed": n_removed, "seeds": [r["seed"] for r in reps],
               "per_seed": per_seed, "summary": summary, "paired": comparisons, "search": search, "merge": merge}
    _plot(metrics, cfg, ctx.plot_path("depthshrinker.png"))
    return metrics


def _plot(m: dict, cfg: Config, path: str) -> None:
    s, c, merge = m["summary"], m["paired"], m["merge"]
    fmt = lambda k: format_mean_std(c[k], 2, 100)  # noqa: E731
    after = ("acc_original", "acc_control_finetuned", "acc_learned_finetuned", "acc_random_finetuned")
    low = min(min(s[k]["values"]) for k in after) - 0.02
    blocks = list(range(m["n_blocks"]))
    names = list(merge["latency_ms"])
    plot_curves(path, [
        Panel(f"removed, BN recalibrated (before fine-tuning)\nlearned − random "
              f"{fmt('learned_minus_random_no_ft')} pts",
              {"learned mask": s["acc_learned_no_ft"], "random mask": s["acc_random_no_ft"]}, kind="bar",
              ylabel="test accuracy"),
        Panel(f"after fine-tuning ({cfg.finetune_epochs} epochs each)\nlearned − random "
              f"{fmt('learned_minus_random_finetuned')} pts",
              {"original": s["acc_original"], "all kept": s["acc_control_finetuned"],
               "learned mask": s["acc_learned_finetuned"], "random mask": s["acc_random_finetuned"]}, kind="bar",
              ylabel="test accuracy", ylim=(low, 1.0)),
        Panel(f"search={cfg.search}: final scores, {m['search']['distinct_learned_masks']} distinct mask(s) "
              f"in {len(m['seeds'])}\n" + "; ".join("".join(map(str, r["mask_learned"])) for r in m["per_seed"]),
              {f"seed {r['seed']}": (blocks, r["scores"]) for r in m["per_seed"]}, kind="line", markers=True,
              xlabel="block (mask: 1 = removed)", ylabel="score s (1 = linear)"),
        Panel(f"seed {merge['merge_seed']}: merged vs unmerged {merge['speedup_merged_vs_unmerged']:.2f}x "
              f"(batch {merge['latency_input_shape'][0]}, {merge['latency_threads']} thread(s))",
              {f"{k.replace('_', ' ')}\n{merge['params'][k]:,} p": merge["latency_ms_rounds"][k] for k in names},
              kind="bar", ylabel="latency (ms), mean ± std over rounds"),
    ], title=f"DepthShrinker on {m['dataset']}: remove {m['n_removed']} of {m['n_blocks']} block activations, "
             f"{cfg.pointwise} 1×1 convs, n={len(m['seeds'])} replicates")


RECIPE = Recipe("depthshrinker", Config, run, quick=QUICK,
                description="DepthShrinker: train a MobileNetV2-mini, search which block activations to remove, "
                            "fine-tune with distillation, merge the linear blocks into dense convs; learned vs "
                            "random removal")
