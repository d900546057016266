"""The one training loop (:func:`fit`), its schedules and batch sources, and the evaluation helpers the recipes share.

:func:`fit` runs ``epochs`` epochs of optimizer steps; an epoch is whatever ``batches(epoch)`` yields (mini-batches
of a dataset via :func:`epoch_batches`, or a single freshly drawn batch for step-based training via
:func:`step_batches`, where an epoch *is* a step). Its hooks:

* ``step(model, batch) -> loss`` takes over the whole update (zero_grad, backward, optimizer step) for recipes
  with their own update rule (SAM/GNP, distillation, PoF…); by default ``loss_fn(model, *batch)`` is minimised
  with ``optimizer`` (gradients clipped at norm ``clip_grad_norm`` or element-wise at ``clip_grad_value`` if
  given). With a custom ``step`` the
  ``optimizer`` is optional (given, its learning rate is scheduled and recorded);
* ``schedule``: a function ``step index -> learning rate`` set on every parameter group before each step (a pure
  function of the step, so a resumed run continues it exactly), or a ``torch.optim.lr_scheduler`` stepped after
  every optimizer step; epoch-level schedulers go in ``on_epoch_end``;
* ``evaluate(model) -> dict`` every ``eval_every`` epochs and after the last one (model put back in train mode);
* ``on_epoch_end(epoch)`` (checkpoints, epoch-level LR schedulers);
* ``progress``: a ``tqdm``-like factory (``RunContext.progress``) for the epoch bar;
* ``prepare(batch)`` (default: move the tensors to the model's device; distributed training shards the global
  batch here) and ``reduce(loss) -> float`` (default ``float(loss)``; distributed training averages over ranks).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

Batch = Sequence[Any]
Schedule = Union[Callable[[int], float], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class History:
    """What :func:`fit` measured: the number of epochs run, per optimizer step its global index, loss, wall time
    (seconds, batch creation included) and learning rate (of the first parameter group, when ``fit`` was given
    the optimizer), and ``(epochs done, metrics)`` of every evaluation."""

    epochs: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)

    def __add__(self, other: "History") -> "History":
        return History(self.epochs + other.epochs, self.steps + other.steps, self.losses + other.losses,
                       self.step_times + other.step_times, self.lrs + other.lrs, self.evals + other.evals)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fit(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], batches: Callable[[int], Iterable[Batch]], *,
        epochs: int, loss_fn: Optional[Callable[..., torch.Tensor]] = None,
        step: Optional[Callable[[nn.Module, Batch], Any]] = None, schedule: Optional[Schedule] = None,
        clip_grad_norm: Optional[float] = None, clip_grad_value: Optional[float] = None,
        evaluate: Optional[Callable[[nn.Module], dict]] = None,
        eval_every: int = 0, on_epoch_end: Optional[Callable[[int], None]] = None,
        prepare: Optional[Callable[[Batch], Batch]] = None, reduce: Optional[Callable[[Any], float]] = None,
        start_epoch: int = 0, start_step: Optional[int] = None, progress: Optional[Callable] = None,
        desc: str = "train") -> History:
    """Train ``model`` for epochs ``start_epoch .. epochs-1`` (see the module docstring for the hooks).

    The global step index (passed to a ``schedule`` function and recorded in :attr:`History.steps`) starts at
    ``start_step`` (default ``start_epoch``: exact for step-based training, where an epoch is one step).
    """
    if not isinstance(epochs, int) or not 0 <= start_epoch <= epochs:
        raise ValueError(f"fit: need 0 <= start_epoch <= epochs, got start_epoch={start_epoch}, epochs={epochs}")
    if (step is None) == (loss_fn is None):
        raise ValueError("fit: give exactly one of loss_fn (default update with optimizer) or step (custom update)")
    if step is None and optimizer is None:
        raise ValueError("fit: the default update (loss_fn) needs an optimizer")
    device = _model_device(model)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    prepare = prepare or (lambda b: tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b))
    reduce = reduce or float
    per_step_scheduler = schedule if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler) else None
    lr_at = None if per_step_scheduler is not None else schedule

    def default_step(m: nn.Module, batch: Batch) -> torch.Tensor:
        loss = loss_fn(m, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip_grad_norm)
        if clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(m.parameters(), clip_grad_value)
        optimizer.step()
        return loss

    update = step or default_step
    hist = History()
    index = start_epoch if start_step is None else start_step
    epoch_range = range(start_epoch, epochs)
    model.train()
    for epoch in progress(epoch_range, total=len(epoch_range), desc=desc) if progress else epoch_range:
        it = iter(batches(epoch))
        while True:
            sync()
            t0 = time.perf_counter()
            try:
                batch = prepare(next(it))
            except StopIteration:
                break
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(index)
            if optimizer is not None:
                hist.lrs.append(optimizer.param_groups[0]["lr"])
            loss = update(model, batch)
            if per_step_scheduler is not None:
                per_step_scheduler.step()
            sync()
            hist.step_times.append(time.perf_counter() - t0)
            hist.losses.append(reduce(loss.detach() if isinstance(loss, torch.Tensor) else loss))
            hist.steps.append(index)
            index += 1
        hist.epochs += 1
        if evaluate is not None and eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            hist.evals.append((epoch + 1, evaluate(model)))
            model.train()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return hist


# ------------------------------------------------------------------------------------------------- batch sources
def minibatches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors covering ``range(n)`` in batches (the last one may be smaller)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def epoch_batches(*tensors: torch.Tensor, batch_size: int, generator: torch.Generator) -> Callable[[int], Iterator]:
    """``batches`` for :func:`fit`: every epoch, shuffled mini-batches ``(t[idx] for t in tensors)`` of tensors that
    share their first dimension."""
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"epoch_batches: tensors must share dim 0, got {[tuple(t.shape) for t in tensors]}")

    def batches(_epoch: int) -> Iterator:
        for idx in minibatches(n, batch_size, generator):
            yield tuple(t[idx] for t in tensors)

    return batches


def step_batches(draw: Callable[[], Batch]) -> Callable[[int], list]:
    """``batches`` for step-based training with :func:`fit`: every epoch is one step on the batch ``draw()``."""
    return lambda _epoch: [draw()]


# ------------------------------------------------------------------------------------------------- schedules
def cosine_lr(base_lr: float, total_steps: int, warmup: int = 0, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_ratio · base_lr`` at ``total_steps``."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return base_lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return lr_at


def make_optimizer(params, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected adam, adamw or sgd")


# ------------------------------------------------------------------------------------------------- losses
def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` of plain classification: ``CE(model(x), y)``."""
    return F.cross_entropy(model(x), y)


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``mean_rows CE(softmax(target/T), log_softmax(logits/T))`` over the last dim (no ``T²``; target detached).
    Its gradient in ``logits`` equals that of ``KL(softmax(target/T) ‖ softmax(logits/T))`` (they differ by the
    target's entropy), so it is the distillation loss of Hinton et al., "Distilling the Knowledge in a Neural
    Network" (2015), eq. (2), up to the ``T²`` factor."""
    if target_logits.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: target_logits {tuple(target_logits.shape)} and logits "
                         f"{tuple(logits.shape)} must have the same shape (..., C)")
    p = (target_logits.detach() / temperature).softmax(-1)
    return -(p * (logits / temperature).log_softmax(-1)).sum(-1).mean()


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy for a model returning logits ``(B, T, V)`` or an object with ``.logits``."""
    out = model(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def lm_batches(tokens: torch.Tensor, block: int, batch_size: int, generator: torch.Generator):
    """Random contiguous windows ``(inputs, targets)`` of length ``block`` from a token stream."""
    starts = torch.randint(0, len(tokens) - block - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block + 1)
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    device = _model_device(model)
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: ``Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|``."""
    conf, pred = probs.max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(ece)


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, negative log-likelihood and ECE of ``logits`` for labels ``y``."""
    probs = logits.softmax(-1)
    return {
        "accuracy": float((logits.argmax(-1) == y).float().mean()),
        "nll": float(F.cross_entropy(logits, y)),
        "ece": expected_calibration_error(probs, y),
    }


def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    return classification_metrics(predict_logits(model, x), y)


@torch.no_grad()
def lm_eval_loss(model: nn.Module, tokens: torch.Tensor, block: int, batches: int = 8, batch_size: int = 16,
                 seed: int = 0) -> float:
    """Mean next-token loss on ``batches`` fixed random windows of ``tokens``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = _model_device(model)
    total = 0.0
    for _ in range(batches):
        xb, yb = lm_batches(tokens, block, batch_size, gen)
        total += float(lm_loss(model, xb.to(device), yb.to(device)))
    model.train()
    return total / batches
