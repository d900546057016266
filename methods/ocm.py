"""OCM: online continual learning through mutual information maximisation (Guo, Liu, Zhao, ICML 2022).

Online class-incremental learning: the tasks (disjoint class pairs) arrive as one stream, each sample is seen once
in batches of 10, a single head covers all classes and no task id is given at test time. A reservoir buffer
(:class:`methods.buffers.ReplayBuffer`, ``policy="reservoir"``) keeps a uniform sample of the stream. OCM learns the representation by maximising mutual
information with InfoNCE losses, and preserves old knowledge by maximising the MI between the current and the
previous model's representations. Algorithm as in the official code (gydpku/OCM, ``test_mnist.py`` and
``InfoNCE/contrastive_learning.py``), with the deviations listed at the end.

Views (:func:`rotation_views`). Each image gives 16 views: 4 "local rotations" (split the image into its left and
right halves and rotate none / the left / both / the right half by 180° in place) × 4 global rotations by
0°, 90°, 180°, 270°. View ``v = 4·g + l`` (``g`` the global quarter turns, ``l`` the local variant, the official
order) of an image of class ``y`` gets the **pseudo-class** ``ỹ = y + C·v`` (``C`` = number of classes; the
official code uses 100 for MNIST): the views are separate classes, not positives of each other. A second copy of
the views is augmented with a random resized crop (scale 0.3–1, the official MNIST augmentation).

Losses (τ = 0.07; ``z`` are L2-normalised projections ``g(h(x))``; ``S = z zᵀ``):

* supervised NT-Xent (:func:`sup_nt_xent`) over rows ``i`` with positives ``P_ij = 1[ỹ_i = ỹ_j] / Σ_k 1[ỹ_i = ỹ_k]``::

      ℓ_ij = −log( exp(S_ij/τ) / Σ_{k∈A(i)} exp(S_ik/τ) ),     L = mean_i Σ_j P_ij ℓ_ij

  with ``A(i) = {k ≠ i}`` and ``P_ii = 0`` when ``mask_diagonal`` (new data), or ``A(i)`` = all ``k`` and ``P_ii`` kept
  (buffer data and preservation, exactly the official ``Supervised_NT_xent_uni``/``_pre``);
* new data (:func:`ocm_new_loss`), on ``z`` of ``[V; A(V)]`` (2N rows for N = 16·B views):
  ``L_new = 2·L_sup + (1/2N)·Σ_{i<N} (ℓ_{i,i+N} + ℓ_{i+N,i})`` (the official weighting: supervised term plus the
  SimCLR pair term);
* buffer data: ``L_buf = sup_nt_xent(S_M, mask_diagonal=False)`` on the views of a buffer batch;
* knowledge preservation = MI between the current and the frozen previous model (:func:`preservation_loss`):
  ``S_pre = z_cur(Rot x_M) · z_prev(Rot x_M)ᵀ``, ``L_pre = mean_i Σ_j P_ij (−log softmax_j(S_pre_i / τ))``, where
  ``z_prev`` comes from a copy of the model frozen at the end of the previous task (no gradient);
* classification: task 1 ``CE(c(h(A x)), y)``; from task 2 on **CE only on buffer samples**
  ``CE(c(h(A x_M)), y_M)`` — new data only shape the representation.

Total from task 2 on: ``L = CE_M + L_new + L_buf + L_pre``. Adam (lr 1e-3, betas (0.9, 0.99), wd 1e-4), one step
per incoming batch, buffer batch ``min(64, 7·#classes seen)``, the buffer updated after every step.

Note on the preservation term: it is an InfoNCE *bound* on the MI, not a distance, so it is **not zero** when the
two models are equal; at equal models it equals the buffer loss ``sup_nt_xent(z zᵀ, mask_diagonal=False)``, and it is
bounded below by ``mean_i H(P_i)`` (the entropy of each row's positive distribution), which it reaches when the
softmax of every row equals ``P_i`` (tested).

Deviations from the official code: the official similarity for MNIST is ``0.5·z zᵀ + 0.5·z f[:, o:o+128]ᵀ``
with ``f`` the normalised penultimate features and ``o`` a random offset (an undocumented mix); here ``S = z zᵀ``.
In ``L_new`` the official code keeps the diagonal in ``P`` (its ``ℓ_ii = −log eps`` is a constant, so only the
weights of the positives differ by ``n_i/(n_i − 1)``); here the diagonal is removed (standard SupCon). Pseudo-label
stride ``C`` instead of 100. No apex AMP. Encoder: MLP ``in → 400 → 400`` (the official MNIST width) with Monarch
layers (``methods.models.MLP(..., layer="monarch")``), Monarch projection head ``400 → 128``, dense classifier.

Scale. The recipe streams the 4,000 training images of ``methods.data.load_mnist`` (80 steps per task) instead of
MNIST's 60,000 (1,200 steps per task). Because the classifier only sees buffer samples from task 2 on, it needs many
steps to pick up the newest classes; in a stream this short it lags behind the representation. Besides the
classifier's accuracy the recipe therefore also reports a nearest-class-mean read-out on the buffer
(:func:`ncm_predict`; a diagnostic, not part of OCM) and the accuracy on the old and the last task separately.
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .buffers import ReplayBuffer
from .data import load_image_dataset
from .models import MLP, linear
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, format_mean_std, paired, plot_curves

N_VIEWS = 16


# ----------------------------------------------------------------------------------------------------------------
# Views, augmentation, buffer
# ----------------------------------------------------------------------------------------------------------------
def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) image tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[2] != x.shape[3] or x.shape[3] % 2:
        raise ValueError(f"{name} must hold square images with an even side (N, C, H, H), got {tuple(x.shape)}")


def local_rotations(x: Tensor) -> Tensor:
    """The 4 local variants of ``x (N, C, H, W)``, stacked as ``(4N, C, H, W)`` in the official order:
    none, left half rotated by 180°, both halves rotated, right half rotated (each half ``H × W/2`` in place)."""
    _check_images(x)
    w2 = x.shape[3] // 2
    left, right = x[..., :w2], x[..., w2:]
    left_r, right_r = torch.rot90(left, 2, (2, 3)), torch.rot90(right, 2, (2, 3))
    return torch.cat([x, torch.cat([left_r, right], 3), torch.cat([left_r, right_r], 3),
                      torch.cat([left, right_r], 3)])


def rotation_views(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The 16 views of every image and their pseudo-classes.

    ``x (N, C, H, H)``, ``y (N,)`` in ``[0, num_classes)`` -> views ``(16N, C, H, H)`` and labels ``(16N,)``.
    Block ``v = 4·g + l`` (rows ``v·N .. v·N + N − 1``) is local variant ``l`` (:func:`local_rotations`) turned by
    ``g`` quarter turns; its label is ``y + num_classes·v``.
    """
    _check_images(x)
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape) if isinstance(y, Tensor) else y!r}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must lie in [0, num_classes={num_classes})")
    local = local_rotations(x)
    views = torch.cat([torch.rot90(local, g, (2, 3)) for g in range(4)])
    labels = y.repeat(N_VIEWS) + num_classes * torch.arange(N_VIEWS, device=y.device).repeat_interleave(len(y))
    return views, labels


def random_resized_crop(x: Tensor, generator: torch.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """Per-image random resized crop back to the same size (bilinear, like the official ``RandomResizedCropLayer``):
    area fraction ``U(scale)``, log aspect ratio ``U(log ratio)``, uniform position."""
    _check_images(x)
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=generator)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def sup_nt_xent(sim: Tensor, labels: Tensor, temperature: float = 0.07, mask_diagonal: bool = True) -> Tensor:
    """Supervised NT-Xent ``mean_i Σ_j P_ij ℓ_ij`` on a similarity matrix ``sim (n, n)`` with labels ``(n,)``.

    ``mask_diagonal=True``: the softmax runs over ``k ≠ i`` and ``P_ii = 0`` (rows without a positive add 0);
    ``False``: every ``k`` and ``P_ii`` kept (the official buffer and preservation losses).
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or labels.shape != (sim.shape[0],):
        raise ValueError(f"sup_nt_xent: sim must be (n, n) and labels (n,), got {tuple(sim.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = sim / temperature
    pos = labels[:, None] == labels[None, :]
    if mask_diagonal:
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        logits = logits.masked_fill(eye, float("-inf"))
        pos = pos & ~eye
    logp = logits.log_softmax(1)
    per_row = torch.where(pos, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(1)
    return -(per_row / pos.sum(1).clamp_min(1)).mean()


def ocm_new_loss(z: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Loss on the new batch: ``z (2N, d)`` normalised projections of ``[views; augmented views]``, ``labels (N,)``
    the views' pseudo-classes. ``2·sup_nt_xent(z zᵀ) + (1/2N)Σ_{i<N}(ℓ_{i,i+N} + ℓ_{i+N,i})``."""
    n = labels.shape[0]
    if z.dim() != 2 or z.shape[0] != 2 * n:
        raise ValueError(f"ocm_new_loss: z must be (2N, d) with N = len(labels) = {n}, got {tuple(z.shape)}")
    sim = z @ z.T
    sup = sup_nt_xent(sim, labels.repeat(2), temperature, mask_diagonal=True)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logp = (sim / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    idx = torch.arange(n, device=z.device)
    pair = -(logp[idx, idx + n].sum() + logp[idx + n, idx].sum()) / (2 * n)
    return 2 * sup + pair


def preservation_loss(z_cur: Tensor, z_prev: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """MI preservation ``mean_i Σ_j P_ij (−log softmax_j(z_cur_i · z_prev_j / τ))``; ``z_prev`` is detached.

    ``z_cur``, ``z_prev``: ``(n, d)`` normalised projections of the same views by the current and the frozen
    previous model; ``labels (n,)`` the views' pseudo-classes (``P_ii`` kept: view ``i`` under both models is a
    positive pair)."""
    if z_cur.shape != z_prev.shape or z_cur.dim() != 2 or labels.shape != (z_cur.shape[0],):
        raise ValueError(f"preservation_loss: z_cur and z_prev must be the same (n, d) and labels (n,), got "
                         f"{tuple(z_cur.shape)}, {tuple(z_prev.shape)}, {tuple(labels.shape)}")
    return sup_nt_xent(z_cur @ z_prev.detach().T, labels, temperature, mask_diagonal=False)


def positive_entropy(labels: Tensor) -> Tensor:
    """``mean_i H(P_i)``: the lower bound of :func:`preservation_loss` (and of the unmasked :func:`sup_nt_xent`)."""
    counts = (labels[:, None] == labels[None, :]).sum(1)
    return counts.double().log().mean()


# ----------------------------------------------------------------------------------------------------------------
# Model and training steps
# ----------------------------------------------------------------------------------------------------------------
class OCMNet(nn.Module):
    """Encoder ``h`` (MLP ``in → hidden → hidden``, ReLU, Monarch layers by default), projection head
    ``g: hidden → proj`` and classifier ``c: hidden → classes`` (dense). ``forward`` returns class logits;
    :meth:`project` returns the normalised projection ``z = g(h(x))/||·||``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 400, proj: int = 128,
                 layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(
            MLP(in_features, hidden, hidden, depth=1, layer=layer, nblocks=nblocks, activation=nn.ReLU,
                dense_ends=False), nn.ReLU())
        self.head = linear(hidden, proj, layer, nblocks)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder(x.flatten(1)))

    def project(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.encoder(x.flatten(1))), dim=1)


def ocm_losses(model: OCMNet, prev: Optional[OCMNet], x: Tensor, y: Tensor, mem: Optional[tuple[Tensor, Tensor]],
               num_classes: int, generator: torch.Generator, temperature: float = 0.07,
               use_preservation: bool = True, crop_scale: tuple = (0.3, 1.0)) -> dict[str, Tensor]:
    """The OCM loss terms for one incoming batch ``x (B, C, H, H)``, ``y (B,)``.

    ``mem``: a buffer batch ``(x_M, y_M)`` or ``None`` (task 1). Returns ``{"ce", "new"}`` and, with a buffer batch,
    ``"buf"``, plus ``"pre"`` when ``use_preservation`` and a previous model is given. Task 1 (``mem is None``):
    CE on the augmented new batch; otherwise CE on the augmented buffer batch only. ``crop_scale``: area range of
    the random resized crop (the augmentation ``A``).
    """
    def aug(v):
        return random_resized_crop(v, generator, scale=crop_scale)

    views, labels = rotation_views(x, y, num_classes)
    pair = torch.cat([views, aug(views)])
    terms = {}
    if mem is None:
        terms["new"] = ocm_new_loss(model.project(pair), labels, temperature)
        terms["ce"] = F.cross_entropy(model(aug(x)), y)
        return terms
    xm, ym = mem
    views_m, labels_m = rotation_views(xm, ym, num_classes)
    pair_m = torch.cat([views_m, aug(views_m)])
    z = model.project(torch.cat([pair, pair_m]))
    z_new, z_m = z[: len(pair)], z[len(pair):]
    terms["new"] = ocm_new_loss(z_new, labels, temperature)
    terms["buf"] = sup_nt_xent(z_m @ z_m.T, labels_m.repeat(2), temperature, mask_diagonal=False)
    if use_preservation and prev is not None:
        with torch.no_grad():
            z_prev = prev.project(views_m)
        terms["pre"] = preservation_loss(z_m[: len(views_m)], z_prev, labels_m, temperature)
    terms["ce"] = F.cross_entropy(model(aug(xm)), ym)
    return terms


METHODS = ("finetune", "er", "ocm", "ocm_no_pre")


@torch.no_grad()
def ncm_predict(model: OCMNet, memory_x: Tensor, memory_y: Tensor, x: Tensor) -> Tensor:
    """Nearest-class-mean prediction on the normalised encoder features ``f = h(x)/||h(x)||``: class means from
    the memory (buffer) examples, prediction ``argmax_c cos(f(x), μ_c)`` over the classes present in the memory.
    A diagnostic of the representation that does not depend on the linear classifier (not part of OCM)."""
    f_mem = F.normalize(model.encoder(memory_x.flatten(1)), dim=1)
    classes = memory_y.unique()
    means = F.normalize(torch.stack([f_mem[memory_y == c].mean(0) for c in classes]), dim=1)
    f = F.normalize(model.encoder(x.flatten(1)), dim=1)
    return classes[(f @ means.T).argmax(1)]


def buffer_batch_size(classes_seen: int, cap: int = 64, per_class: int = 7) -> int:
    """The official buffer batch ``min(64, 7·#classes seen)``."""
    return min(cap, per_class * classes_seen)


def run_stream(method: str, split, tasks: Sequence[Sequence[int]], *, seed: int, buffer_size: int = 1000,
               stream_batch: int = 10, hidden: int = 400, layer: str = "monarch", lr: float = 1e-3,
               temperature: float = 0.07, max_per_task: Optional[int] = None, buffer_batch_cap: int = 64,
               crop_scale: tuple = (0.3, 1.0), progress=None) -> dict:
    """One online class-incremental run; returns the accuracy matrix ``acc[t][j]`` (task ``j`` after task ``t``),
    the final accuracy on the whole test set (classifier and NCM read-out), forgetting, and the ``settings`` the
    model, buffer and stream were built with."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = split.num_classes
    model = OCMNet(int(torch.tensor(split.input_shape).prod()), num_classes, hidden=hidden, layer=layer)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    buffer = ReplayBuffer(buffer_size, gen, policy="reservoir")
    prev, seen = None, set()
    test_sets = [(split.x_test[torch.isin(split.y_test, torch.tensor(t))],
                  split.y_test[torch.isin(split.y_test, torch.tensor(t))]) for t in tasks]
    acc, acc_ncm = [], []
    for ti, classes in enumerate(tasks):
        idx = torch.isin(split.y_train, torch.tensor(classes)).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)][:max_per_task]
        model.train()
        for start in range(0, len(idx), stream_batch):
            b = idx[start:start + stream_batch]
            x, y = split.x_train[b], split.y_train[b]
            seen.update(y.tolist())
            mem = None
            if len(buffer) and method != "finetune":
                mem = buffer.sample(buffer_batch_size(len(seen), buffer_batch_cap), replace=False)
            if method == "finetune":
                loss = F.cross_entropy(model(x), y)
            elif method == "er":
                xs, ys = (torch.cat([x, mem[0]]), torch.cat([y, mem[1]])) if mem is not None else (x, y)
                loss = F.cross_entropy(model(xs), ys)
            else:
                terms = ocm_losses(model, prev, x, y, mem if ti > 0 else None, num_classes, gen, temperature,
                                   use_preservation=method == "ocm", crop_scale=crop_scale)
                loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            buffer.add(x, y)
            if progress is not None:
                progress.update(1)
        prev = copy.deepcopy(model).eval().requires_grad_(False)
        model.eval()
        with torch.no_grad():
            acc.append([float((model(xt).argmax(1) == yt).float().mean()) for xt, yt in test_sets])
            mx, my = buffer.stored()
            acc_ncm.append([float((ncm_predict(model, mx, my, xt) == yt).float().mean()) for xt, yt in test_sets])
        final_ncm = float((ncm_predict(model, mx, my, split.x_test) == split.y_test).float().mean())
        final = float((model(split.x_test).argmax(1) == split.y_test).float().mean())
    settings = {"buffer_size": buffer.capacity, "hidden": model.classifier.in_features, "stream_batch": stream_batch,
                "buffer_batch": buffer_batch_cap, "max_per_task": max_per_task}
    return {"settings": settings, "acc_matrix": acc, "final_accuracy": final, "forgetting": forgetting(acc),
            "acc_matrix_ncm": acc_ncm, "final_accuracy_ncm": final_ncm, "forgetting_ncm": forgetting(acc_ncm)}


def forgetting(acc: Sequence[Sequence[float]]) -> float:
    """Average forgetting ``mean_{j<T} max_{t<T} acc[t][j] − acc[T][j]`` over all but the last task (``T`` the
    last task index; Chaudhry et al. 2018)."""
    T = len(acc) - 1
    if T < 1:
        return 0.0
    return sum(max(acc[t][j] for t in range(j, T)) - acc[T][j] for j in range(T)) / T


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    dataset: str = option("mnist", "image dataset", choices=("mnist", "digits"))
    tasks: int = option(5, "class-incremental tasks (classes split evenly)")
    buffer_size: int = option(1000, "reservoir memory (official MNIST: 1000)")
    stream_batch: int = option(10, "incoming batch size")
    hidden: int = option(400, "encoder width (official MNIST: 400)")
    layer: str = option("monarch", "encoder and projection layers", choices=("dense", "monarch", "blockdiag"))
    lr: float = option(1e-3, "Adam learning rate")
    temperature: float = option(0.07, "InfoNCE temperature τ")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")
    methods: tuple[str, ...] = option(METHODS, "methods to compare", choices=METHODS)
    buffer_batch: int = option(64, "cap of the buffer batch min(cap, 7·classes seen)")
    crop_scale: float = option(0.3, "min area of the random resized crop")
    max_per_task: Optional[int] = option(None, "cap on stream samples per task")


QUICK = {"dataset": "digits", "seeds": 1, "hidden": 128, "max_per_task": 40, "buffer_size": 100, "buffer_batch": 16}
KEYS = ("final_accuracy", "forgetting", "old_tasks_accuracy", "last_task_accuracy", "final_accuracy_ncm",
        "forgetting_ncm")


def run(cfg: Config, ctx: RunContext) -> dict:
    split = load_image_dataset(cfg.dataset, ctx.seed)
    per = split.num_classes // cfg.tasks
    if per < 1:
        raise ValueError(f"--tasks must be <= {split.num_classes}")
    tasks = [list(range(t * per, (t + 1) * per)) for t in range(cfg.tasks)]
    n_steps = sum(math.ceil(min(int(torch.isin(split.y_train, torch.tensor(t)).sum()),
                                cfg.max_per_task or 10**9) / cfg.stream_batch) for t in tasks)
    bar = ctx.progress(total=n_steps * cfg.seeds * len(cfg.methods), desc="ocm")
    runs = {m: [] for m in cfg.methods}
    for seed in seed_list(ctx.seed, cfg.seeds):
        for m in cfg.methods:
            r = run_stream(m, split, tasks, seed=seed, buffer_size=cfg.buffer_size, stream_batch=cfg.stream_batch,
                           hidden=cfg.hidden, layer=cfg.layer, lr=cfg.lr, temperature=cfg.temperature,
                           max_per_task=cfg.max_per_task, buffer_batch_cap=cfg.buffer_batch,
                           crop_scale=(cfg.crop_scale, 1.0), progress=bar)
            r["old_tasks_accuracy"] = statistics.fmean(r["acc_matrix"][-1][:-1])
            r["last_task_accuracy"] = r["acc_matrix"][-1][-1]
            runs[m].append(r)
            ctx.observe(**r.pop("settings"), dataset=split.name)
            ctx.log(f"seed {seed} {m:11s} final acc {r['final_accuracy']:.3f} forgetting {r['forgetting']:.3f} "
                    f"(NCM {r['final_accuracy_ncm']:.3f} / {r['forgetting_ncm']:.3f})")
    bar.close()
    ctx.observe(seeds=len(runs[cfg.methods[0]]))
    summary = {m: aggregate([{k: r[k] for k in KEYS} for r in rs]) for m, rs in runs.items()}
    comparisons = {f"{a}_minus_{b}": {k: paired([r[k] for r in runs[a]], [r[k] for r in runs[b]]) for k in KEYS}
                   for a, b in (("ocm", "er"), ("ocm", "ocm_no_pre"), ("er", "finetune")) if {a, b} <= set(runs)}
    for m in runs:
        ctx.log(f"{m:11s} final accuracy {format_mean_std(summary[m]['final_accuracy'])}")
    seen_acc = {m: [statistics.fmean(statistics.fmean(r["acc_matrix"][t][: t + 1]) for r in rs)
                    for t in range(len(tasks))] for m, rs in runs.items()}
    plot_curves(ctx.plot_path("ocm.png"), [
        Panel("mean accuracy over the tasks seen", {m: (range(1, len(tasks) + 1), v) for m, v in seen_acc.items()},
              xlabel="tasks learned", ylabel="accuracy", markers=True),
        Panel("at the end of the stream", kind="bar", groups={
            label: {m: summary[m][k] for m in runs} for k, label in (("final_accuracy", "final accuracy"),
                                                                   ("final_accuracy_ncm", "final acc. (NCM)"),
                                                                   ("forgetting", "forgetting"))})],
        title=f"online class-incremental split {cfg.dataset} ({cfg.tasks} tasks, buffer {cfg.buffer_size}, "
              f"{cfg.seeds} seeds, {cfg.layer} MLP)")
    return {"dataset": cfg.dataset, "tasks": tasks, "seeds": seed_list(ctx.seed, cfg.seeds), "summary": summary,
            "paired": comparisons, "runs": runs}


RECIPE = Recipe("ocm", Config, run, quick=QUICK,
                description="OCM (Guo et al. 2022): online class-incremental learning with 16-view rotation "
                            "pseudo-classes, InfoNCE and MI preservation, vs fine-tuning and experience replay")
