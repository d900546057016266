"""Distillation of a converted model (student) towards the original dense model (teacher).

After :func:`monarch_kernels.layers.monarchify` the student has the teacher's architecture with some layers
structured; a few hundred steps of matching the teacher recover much of what the projection lost (the
hidden-state distillation of "TinyBERT: Distilling BERT for Natural Language Understanding", Jiao et al.,
Findings of EMNLP 2020, §3.1, Eq. 8, with the teacher's own layers as targets). Per batch:

    L = hidden_weight · mean_i ‖h_i^S − h_i^T‖² / ‖h_i^T‖²
        + pooled_weight · mean_b (1 − cos(pool(y^S)_b, pool(y^T)_b))

``h_i``: outputs of the modules selected by ``hidden`` (same paths in both models; by default the blocks of
every ``nn.ModuleList``, i.e. the transformer layers of Hugging Face models), relative squared error;
``pool(y)``: the pooled model output (by default the attention-masked mean over tokens of the main output
tensor, the sentence embedding of mean-pooling encoders such as all-MiniLM-L6-v2), cosine distance.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .calibrate import call_model
from .patterns import Patterns, as_patterns, path_matches

BLOCKS = "blocks"


def main_tensor(output: Any) -> Tensor:
    """The main tensor of a module or model output: the tensor itself, the first tensor of a tuple/list, or the
    first tensor value of a mapping (Hugging Face ``ModelOutput``: ``last_hidden_state``, ``logits``)."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise TypeError(f"distill: cannot find a tensor in an output of type {type(output).__name__}")


def mean_pool(output: Any, batch: Any) -> Tensor:
    """Sentence embedding ``(batch, hidden)``: the mean over tokens of the main output tensor ``(batch, tokens,
    hidden)``, weighted by ``batch["attention_mask"]`` when the batch is a mapping that has one; a 2-D output
    is returned as is.

    Args:
        output: the model output.
        batch: the batch that produced it.
    """
    x = main_tensor(output)
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"mean_pool: expected a (batch, tokens, hidden) output, got shape {tuple(x.shape)}; "
                         "pass pool= to distill")
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1e-9)


def block_paths(model: nn.Module) -> list[str]:
    """Paths of the modules held in an ``nn.ModuleList`` (the transformer blocks of most models)."""
    lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    return [name for name, _ in model.named_modules() if name.rpartition(".")[0] in lists and name]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int,
    *,
    lr: float = 1e-4,
    hidden: Patterns = BLOCKS,
    hidden_weight: float = 1.0,
    pool: Optional[Callable[[Any, Any], Tensor]] = mean_pool,
    pooled_weight: float = 1.0,
    params: Optional[Iterable[nn.Parameter]] = None,
    max_grad_norm: Optional[float] = 1.0,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train ``student`` for ``steps`` AdamW steps to reproduce ``teacher`` (loss in the module docstring).

    Both models run in eval mode (no dropout) and get their modes back afterwards; the teacher is not changed.
    The learning rate decays from ``lr`` to 0 on a cosine.

    Args:
        student: the model to train (e.g. a monarchified copy of ``teacher``), on the batches' device.
        teacher: the reference model.
        batches: model inputs (see :func:`monarch_kernels.layers.calibrate.call_model`); cycled when shorter than
            ``steps`` (a one-shot iterator must yield at least ``steps`` batches).
        steps: number of optimisation steps (>= 1).
        lr: peak learning rate.
        hidden: module-path patterns whose outputs are matched, ``"blocks"`` (default) for every module held in
            an ``nn.ModuleList``, or ``None`` for no hidden-state loss.
        hidden_weight: weight of the hidden-state loss.
        pool: ``pool(output, batch) -> (batch, d)`` for the pooled-output loss (default :func:`mean_pool`), or
            ``None`` for none.
        pooled_weight: weight of the pooled-output loss.
        params: parameters to train (default: every student parameter that requires grad).
        max_grad_norm: gradient-norm clipping (``None``: none).
        progress: show a tqdm progress bar with the running loss.

    Returns:
        History, one entry per step: ``{"step", "loss", "hidden", "pooled", "lr"}`` (lists of floats).

    Raises:
        ValueError: bad ``steps``, no loss term left, ``hidden`` patterns that match nothing in the teacher or
            paths the student lacks, or batches that run out.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"distill: steps must be a positive int, got {steps!r}")
    names = block_paths(teacher) if hidden == BLOCKS else _matching(teacher, as_patterns(hidden, "hidden"))
    if (not names or not hidden_weight) and (pool is None or not pooled_weight):
        raise ValueError("distill: no loss term: give hidden patterns (or a model with nn.ModuleList blocks) "
                         "with hidden_weight > 0, or pool with pooled_weight > 0")
    student_modules = dict(student.named_modules())
    missing = [n for n in names if n not in student_modules]
    if missing:
        raise ValueError(f"distill: the student has no modules {missing[:5]} that the teacher has; the student "
                         "must keep the teacher's module paths")
    params = [p for p in (student.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("distill: no trainable parameters (all have requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    captured: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
    handles = [m.register_forward_hook(_capture(captured[side], n))
               for side, model in (("student", student), ("teacher", teacher))
               for n, m in model.named_modules() if n in names]
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    history: dict[str, list[float]] = {k: [] for k in ("step", "loss", "hidden", "pooled", "lr")}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(range(steps), desc="distill", disable=not progress)
        for step, batch in zip(bar, _cycle(batches, steps)):
            with torch.no_grad():
                t_out = call_model(teacher, batch)
            s_out = call_model(student, batch)
            h_loss = s_out_loss = torch.zeros((), device=main_tensor(s_out).device)
            if names and hidden_weight:
                h_loss = torch.stack([_relative_mse(captured["student"][n], captured["teacher"][n])
                                      for n in names]).mean()
            if pool is not None and pooled_weight:
                cos = torch.cosine_similarity(pool(s_out, batch).float(), pool(t_out, batch).float(), dim=-1)
                s_out_loss = (1 - cos).mean()
            loss = hidden_weight * h_loss + pooled_weight * s_out_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            history["lr"].append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
            for key, value in (("step", step), ("loss", loss), ("hidden", h_loss), ("pooled", s_out_loss)):
                history[key].append(float(value.detach()) if isinstance(value, Tensor) else float(value))
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    finally:
        for h in handles:
            h.remove()
        student.train(modes[0])
        teacher.train(modes[1])
    return history


def _matching(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and any(path_matches(n, p) for p in patterns)]
    if patterns and not names:
        raise ValueError(f"distill: hidden patterns {patterns} match no module of the teacher")
    return names


def _capture(store: dict, name: str):
    def hook(module, args, output):
        store[name] = main_tensor(output)
    return hook


def _relative_mse(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = student.float(), teacher.detach().float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def _cycle(batches: Iterable, steps: int):
    """Yield ``steps`` batches, restarting ``batches`` when it is re-iterable (a list, a DataLoader)."""
    produced = 0
    while True:
        fresh = 0
        for batch in batches:
            yield batch
            produced += 1
            fresh += 1
            if produced == steps:
                return
        if fresh == 0 or iter(batches) is batches:
            raise ValueError(f"distill: the batches ran out after {produced} of {steps} steps; pass a list or a "
                             "re-iterable loader, or enough batches")
