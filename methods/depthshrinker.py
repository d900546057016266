"""DepthShrinker (Fu et al., ICML 2022): remove activations of inverted residual blocks, fine-tune, merge.

The three stages of the paper, on offline MNIST (5000 images) or sklearn digits, over the layers in
:mod:`monarch_kernels.layers.depthshrinker`:

1. **Train** a small MobileNetV2-like net (:class:`MobileNetV2Mini`) with all activations.
2. **Search** which block activations to remove: every block gets a score ``s`` (init 0) behind the hard
   straight-through gate of :class:`monarch_kernels.layers.ShrinkGate`; before every step the ``⌊keep_ratio·N⌋`` smallest scores
   are kept, the rest are linear (:func:`monarch_kernels.layers.update_search_flags`); weights and scores train jointly on the
   task loss. Output: the keep/remove mask of the final scores.
3. **Fine-tune** with the activations removed, starting again from the *trained* weights (the official code
   re-loads ``DS.PRETRAINED``; the search only supplies the mask), with self-distillation from the original net::

       L = α T² KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α) CE(y, z_s),     α = 0.7, T = 1   (official config)

   (KL instead of the official soft cross-entropy: same gradient, differs by the teacher entropy). Removed blocks
   get a ReLU6 after the residual sum (official ``ADD_FINAL_ACT='relu6'``, on in every released config).
4. **Merge** each removed block into one dense ``Conv2d`` (:func:`monarch_kernels.layers.depthshrink`) — exact, unlike the official
   ``merge_block()`` which only swaps in a random conv to time it — and time the network before and after.

Baseline (in the same run): a random mask removing the same number of activations, fine-tuned the same way;
learned vs random is reported as mean ± std over ``--seeds`` fine-tuning seeds (each random seed draws its own mask;
the learned mask comes from one search). Control: the original fine-tuned the same way with every activation kept,
which separates the effect of removal from that of the extra epochs.

Deviations from the official recipe (small-scale CPU reproduction): Adam + cosine decay instead of SGD-Nesterov
for 180 epochs, no label smoothing / RandAugment / EMA, no latency term in the search loss (the official
``LAT_COST_WEIGHT`` term looks sign-inverted, research/methods-a.md §1), no Gumbel ranking, candidates are the
blocks only (not the stem/head activations, which would not make a block mergeable).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monarch_kernels.layers.depthshrinker import (
    ShrinkableInvertedResidual,
    count_layers,
    depthshrink,
    gate_scores,
    set_removed,
    set_search,
    shrink_blocks,
    topk_keep,
    update_search_flags,
)

from .data import load_image_dataset
from .recipe import Recipe, option
from .train import evaluate_classifier, minibatches, predict_logits

#: (expand ratio t, output channels c, stride s, kernel k) per block — MobileNetV2's pattern at toy width
MBV2_MINI_BLOCKS = (
    (1, 12, 1, 3),
    (3, 16, 2, 3),
    (3, 16, 1, 3),
    (3, 24, 1, 5),
    (3, 24, 1, 3),
    (3, 32, 2, 3),
    (3, 32, 1, 3),
    (3, 32, 1, 3),
)
QUICK_BLOCKS = ((1, 8, 1, 3), (3, 12, 2, 3), (3, 12, 1, 3), (3, 16, 2, 3))


class MobileNetV2Mini(nn.Module):
    """``stem 3×3 (→ stem_channels) → BN → ReLU6 → shrinkable IRBs → 1×1 head → BN → ReLU6 → GAP → Linear``.

    ``blocks``: ``(t, c, s, k)`` per block. ``pointwise="monarch"`` makes the blocks' 1×1 convs ``MonarchLinear``
    over channels. ``final_act``: ReLU6 after the sum of a block whose activation is removed (official
    ``ADD_FINAL_ACT``). Input ``(N, in_channels, H, W)``, output logits ``(N, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks: Sequence = MBV2_MINI_BLOCKS,
                 stem_channels: int = 16, stem_stride: int = 2, head_channels: int = 96, pointwise: str = "dense",
                 nblocks: int = 4, final_act: bool = True):
        super().__init__()
        if not blocks:
            raise ValueError("MobileNetV2Mini: blocks must be a non-empty sequence of (t, c, s, k)")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU6())
        layers, c_in = [], stem_channels
        for t, c, s, k in blocks:
            layers.append(ShrinkableInvertedResidual(c_in, c, s, t, k, pointwise=pointwise, nblocks=nblocks,
                                                     final_act=nn.ReLU6() if final_act else None))
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(c_in, head_channels, 1, bias=False), nn.BatchNorm2d(head_channels),
                                  nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


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
         generator: torch.Generator, loss_fn, before_step=None, epoch_end=None, param_groups=None, progress=None,
         desc="") -> list:
    """Adam + per-step cosine decay; ``loss_fn(model, xb, yb) -> loss``; ``before_step()`` runs before each step,
    ``epoch_end()`` after each epoch."""
    device = next(model.parameters()).device
    opt = torch.optim.Adam(param_groups if param_groups is not None else model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = _cosine(opt, max(steps, 1))
    losses = []
    it = progress(range(epochs), desc=desc) if progress else range(epochs)
    for _ in it:
        model.train()
        for idx in minibatches(len(x), batch_size, generator):
            if before_step is not None:
                before_step()
            loss = loss_fn(model, x[idx].to(device), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if epoch_end is not None:
            epoch_end()
    return losses


def search_removal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, keep_ratio: float, epochs: int,
                   batch_size: int = 64, lr: float = 1e-3, score_lr: Optional[float] = None,
                   score_init: float = 0.5, generator: torch.Generator, progress=None) -> tuple[torch.Tensor, list]:
    """Stage 2: train a copy of ``model`` with searchable gates; returns (``removed`` flags from the final scores,
    per-epoch score history ``[N]`` lists). Scores use ``score_lr`` (default ``lr``, as in the official code) and
    start at ``score_init``. The official code starts at 0 with SGD; with Adam a score whose first step goes
    below 0 is frozen at "keep" for good (the clamp passes no gradient there), so we start mid-range (0.5)."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for b in shrink_blocks(net):
            b.gate.score.fill_(score_init)
    set_search(net, keep_ratio)
    scores = [b.gate.score for b in shrink_blocks(net)]
    ids = {id(p) for p in scores}
    groups = [{"params": [p for p in net.parameters() if id(p) not in ids]},
              {"params": scores, "lr": score_lr if score_lr is not None else lr}]
    history = [gate_scores(net).tolist()]

    def loss_fn(m, xb, yb):
        return F.cross_entropy(m(xb), yb)

    _fit(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator, loss_fn=loss_fn,
         before_step=lambda: update_search_flags(net, keep_ratio),
         epoch_end=lambda: history.append(gate_scores(net).tolist()), param_groups=groups, progress=progress,
         desc="search")
    return topk_keep(gate_scores(net), keep_ratio), history


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
    removed = torch.zeros(n_blocks, dtype=torch.bool)
    removed[torch.randperm(n_blocks, generator=generator)[:n_removed]] = True
    return removed


@torch.no_grad()
def paired_latency_ms(models: dict, x: torch.Tensor, *, rounds: int = 30, inner: int = 3) -> dict:
    """Median forward latency (ms) of each model on ``x``, measured interleaved (A, B, A, B, …) in one process so
    that machine load hits every model alike. (Private helper: ``bench.timing`` is not importable from methods.)"""
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


# ------------------------------------------------------------------------------------------------ the recipe
@dataclass(frozen=True)
class Config:
    dataset: str = option("mnist", "image dataset", choices=("mnist", "digits"))
    epochs: int = option(10, "stage-1 training epochs")
    search_epochs: int = option(3, "stage-2 search epochs")
    finetune_epochs: int = option(4, "stage-3 epochs")
    keep_ratio: float = option(0.5, "fraction of block activations kept")
    seeds: int = option(3, "fine-tuning seeds for learned vs random")
    lr: float = option(2e-3, "Adam learning rate")
    score_lr: Optional[float] = option(None, "search score LR (default: --lr, as official)")
    score_init: float = option(0.5, "initial search score (official: 0, see docs)")
    batch_size: int = option(64, "mini-batch size")
    alpha: float = option(0.7, "distillation weight α")
    temperature: float = option(1.0, "distillation temperature")
    pointwise: str = option("dense", "1×1 convs as nn.Conv2d or MonarchLinear over channels",
                            choices=("dense", "monarch"))
    nblocks: int = option(4, "Monarch blocks for --pointwise monarch")
    final_act: bool = option(True, "ReLU6 after removed blocks (official ADD_FINAL_ACT)")
    small_model: bool = option(False, "the 4-block model with narrow stem and head (QUICK_BLOCKS)")
    latency_batch: int = option(64, "batch of the latency measurement")
    latency_rounds: int = option(40, "rounds of the interleaved latency measurement")

    def __post_init__(self):
        if not 0.0 <= self.keep_ratio < 1.0:
            raise ValueError(f"--keep-ratio must be in [0, 1), got {self.keep_ratio}")


QUICK = {"dataset": "digits", "epochs": 4, "search_epochs": 1, "finetune_epochs": 2, "seeds": 1,
         "small_model": True, "latency_rounds": 10}


def _acc(model, split) -> float:
    return evaluate_classifier(model, split.x_test, split.y_test)["accuracy"]


def _mean_std(v: list) -> tuple[float, float]:
    return float(statistics.mean(v)), float(statistics.stdev(v)) if len(v) > 1 else 0.0


def run(args: Config, ctx) -> dict:
    quick, seed = args.small_model, ctx.seed
    dataset, epochs, search_epochs, ft_epochs, seeds = (args.dataset, args.epochs, args.search_epochs,
                                                        args.finetune_epochs, args.seeds)
    split = load_image_dataset(dataset, seed=seed)
    device = ctx.device
    big = split.input_shape[-1] >= 16
    blocks = QUICK_BLOCKS if quick else MBV2_MINI_BLOCKS
    torch.manual_seed(seed)
    model = MobileNetV2Mini(split.input_shape[0], split.num_classes, blocks,
                            stem_channels=8 if quick else 12, stem_stride=2 if big else 1,
                            head_channels=32 if quick else 64, pointwise=args.pointwise, nblocks=args.nblocks,
                            final_act=args.final_act).to(device)
    n_blocks = len(shrink_blocks(model))
    n_removed = n_blocks - int(math.floor(args.keep_ratio * n_blocks + 1e-9))
    ctx.log(f"[depthshrinker] {dataset}: {len(split.x_train)} train / {len(split.x_test)} test, {n_blocks} blocks, "
            f"remove {n_removed}, pointwise={args.pointwise}")
    xtr, ytr = split.x_train, split.y_train

    def gen(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1000 + offset)

    # stage 1: train the original network
    ce = lambda m, xb, yb: F.cross_entropy(m(xb), yb)  # noqa: E731
    train_losses = _fit(model, xtr, ytr, epochs=epochs, batch_size=args.batch_size, lr=args.lr, generator=gen(1),
                        loss_fn=ce, progress=ctx.progress, desc="train")
    model.eval()
    acc_original = _acc(model, split)
    ctx.log(f"[depthshrinker] original accuracy {acc_original:.4f}")

    # stage 2: search
    learned, history = search_removal(model, xtr, ytr, keep_ratio=args.keep_ratio, epochs=search_epochs,
                                      batch_size=args.batch_size, lr=args.lr, score_lr=args.score_lr,
                                      score_init=args.score_init,
                                      generator=gen(2), progress=ctx.progress)
    ctx.log(f"[depthshrinker] learned mask (1 = removed): {learned.int().tolist()}, scores {history[-1]}")

    # stage 3: fine-tune learned vs random masks, several seeds
    results = {"learned": {"before": [], "after": []}, "random": {"before": [], "after": []}}
    random_masks, finetuned = [], None
    for s in range(seeds):
        rmask = random_removal(n_blocks, n_removed, gen(100 + s))
        random_masks.append(rmask.int().tolist())
        for kind, mask in (("learned", learned), ("random", rmask)):
            removed_only = copy.deepcopy(model)
            set_removed(removed_only, mask.tolist())
            results[kind]["before"].append(_acc(removed_only, split))
            ft = finetune_removed(model, mask.tolist(), xtr, ytr, epochs=ft_epochs, batch_size=args.batch_size,
                                  lr=args.lr, alpha=args.alpha, temperature=args.temperature, generator=gen(200 + s),
                                  progress=ctx.progress)
            results[kind]["after"].append(_acc(ft, split))
            if kind == "learned" and s == 0:
                finetuned = ft
        ctx.log(f"[depthshrinker] seed {s}: learned {results['learned']['before'][-1]:.4f} -> "
                f"{results['learned']['after'][-1]:.4f}, random {rmask.int().tolist()} "
                f"{results['random']['before'][-1]:.4f} -> {results['random']['after'][-1]:.4f}")

    # control: the original fine-tuned the same way with every activation kept (the extra epochs alone)
    control = finetune_removed(model, [False] * n_blocks, xtr, ytr, epochs=ft_epochs, batch_size=args.batch_size,
                               lr=args.lr, alpha=args.alpha, temperature=args.temperature, generator=gen(200),
                               progress=ctx.progress)
    acc_control = _acc(control, split)
    ctx.log(f"[depthshrinker] control (all activations kept, same fine-tuning): {acc_control:.4f}")

    # stage 4: merge the (seed-0) fine-tuned learned network
    merged = depthshrink(finetuned)
    with torch.no_grad():
        z_ft = predict_logits(finetuned, split.x_test)
        z_merged = predict_logits(merged, split.x_test)
    merge_err = float((z_ft - z_merged).abs().max())
    acc_merged = float((z_merged.argmax(-1) == split.y_test).float().mean())
    xb = split.x_test[: args.latency_batch].to(device)
    lat = paired_latency_ms({"original": model, "finetuned_unmerged": finetuned, "merged": merged}, xb,
                            rounds=args.latency_rounds)
    layers_before, layers_after = count_layers(finetuned), count_layers(merged)
    params_before = sum(p.numel() for p in finetuned.parameters())
    params_after = sum(p.numel() for p in merged.parameters())
    ctx.log(f"[depthshrinker] merged: max |Δlogit| {merge_err:.2e}, conv layers {layers_before['conv']} -> "
            f"{layers_after['conv']}, latency {lat['finetuned_unmerged']:.2f} -> {lat['merged']:.2f} ms")

    la, ra = results["learned"], results["random"]
    metrics = {
        "dataset": dataset, "n_train": len(xtr), "n_test": len(split.x_test), "n_blocks": n_blocks,
        "n_removed": n_removed, "keep_ratio": args.keep_ratio, "pointwise": args.pointwise, "seeds": seeds,
        "acc_original": acc_original, "acc_original_same_finetuning": acc_control,
        "learned_mask_removed": learned.int().tolist(), "search_scores": history[-1], "search_score_history": history,
        "random_masks_removed": random_masks,
        "acc_learned_removed_no_ft": la["before"], "acc_learned_finetuned": la["after"],
        "acc_random_removed_no_ft": ra["before"], "acc_random_finetuned": ra["after"],
        "acc_merged": acc_merged, "merge_max_abs_logit_diff": merge_err,
        "conv_layers_before": layers_before["conv"], "conv_layers_after": layers_after["conv"],
        "layers_before": layers_before, "layers_after": layers_after,
        "params_before": params_before, "params_after": params_after,
        "latency_device": str(device), "latency_threads": torch.get_num_threads(), "latency_dtype": "float32",
        "latency_input_shape": list(xb.shape),
        "latency_ms_original": lat["original"], "latency_ms_unmerged": lat["finetuned_unmerged"],
        "latency_ms_merged": lat["merged"], "speedup_merged_vs_unmerged": lat["finetuned_unmerged"] / lat["merged"],
        "speedup_merged_vs_original": lat["original"] / lat["merged"],
        "train_loss_final": train_losses[-1],
    }
    for kind, r in results.items():
        for when in ("before", "after"):
            m, sd = _mean_std(r[when])
            tag = "no_ft" if when == "before" else "finetuned"
            metrics[f"acc_{kind}_{tag}_mean"], metrics[f"acc_{kind}_{tag}_std"] = m, sd
    metrics["finetuned_gap_to_original"] = acc_original - metrics["acc_learned_finetuned_mean"]
    metrics["finetuned_gap_to_same_finetuning"] = acc_control - metrics["acc_learned_finetuned_mean"]
    metrics["learned_minus_random_finetuned"] = metrics["acc_learned_finetuned_mean"] - metrics["acc_random_finetuned_mean"]
    metrics["learned_minus_random_no_ft"] = metrics["acc_learned_no_ft_mean"] - metrics["acc_random_no_ft_mean"]
    metrics["learned_beats_random"] = metrics["learned_minus_random_finetuned"] > 0
    _plot(metrics, ctx.plot_path("depthshrinker.png"))
    return metrics


def _plot(m: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    names = ["original", "orig.+FT\n(all acts)", "learned\nno FT", "learned\nFT", "random\nno FT", "random\nFT",
             "merged"]
    vals = [m["acc_original"], m["acc_original_same_finetuning"], m["acc_learned_no_ft_mean"],
            m["acc_learned_finetuned_mean"], m["acc_random_no_ft_mean"], m["acc_random_finetuned_mean"], m["acc_merged"]]
    errs = [0, 0, m["acc_learned_no_ft_std"], m["acc_learned_finetuned_std"], m["acc_random_no_ft_std"],
            m["acc_random_finetuned_std"], 0]
    bars = ax.bar(names, vals, yerr=errs, color=["k", "0.5", "C0", "C0", "C1", "C1", "C2"])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{m['dataset']}: remove {m['n_removed']}/{m['n_blocks']} activations ({m['seeds']} seeds)")
    ax = axes[1]
    hist = torch.tensor(m["search_score_history"])
    for i in range(hist.shape[1]):
        ax.plot(hist[:, i], label=f"block {i}" + (" (removed)" if m["learned_mask_removed"][i] else ""),
                ls="-" if m["learned_mask_removed"][i] else "--")
    ax.set_xlabel("search epoch")
    ax.set_ylabel("score s (large = remove)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.bar(["original", "unmerged\n(FT)", "merged"],
           [m["latency_ms_original"], m["latency_ms_unmerged"], m["latency_ms_merged"]], color=["k", "C0", "C2"])
    ax.set_ylabel(f"latency (ms), batch {m['latency_input_shape'][0]}, {m['latency_device']}")
    ax.set_title(f"conv layers {m['conv_layers_before']} -> {m['conv_layers_after']}, "
                 f"speedup {m['speedup_merged_vs_unmerged']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


RECIPE = Recipe("depthshrinker", Config, run, quick=QUICK, description=
                "DepthShrinker: train a MobileNetV2-mini, search which block activations to remove, fine-tune with "
                "distillation, merge the linear blocks into dense convs; learned vs random removal")
