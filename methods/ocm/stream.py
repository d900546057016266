"""The OCM network, its loss terms for one incoming batch, and the online class-incremental run (OCM and the
fine-tuning and experience-replay baselines) with the NCM read-out and forgetting."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..buffers import ReplayBuffer
from ..models import MLP, linear
from .views import random_resized_crop, rotation_views
from .losses import ocm_new_loss, preservation_loss, sup_nt_xent


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
