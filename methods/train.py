"""Training and evaluation loops shared by the recipes (one loop, written once)."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


def minibatches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors covering ``range(n)`` in batches (the last one may be smaller)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def make_optimizer(params, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected adam, adamw or sgd")


StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    step: Optional[Callable] = None,
    progress: Optional[Callable] = None,
    desc: str = "train",
) -> list[float]:
    """Mini-batch training; returns the per-step losses.

    By default each step minimises cross-entropy with ``optimizer`` (Adam at ``lr`` if not given). A custom
    ``step(model, xb, yb) -> loss`` takes over the whole update (zero_grad, backward, optimizer step) for
    recipes with their own update rule (SAM/GNP, distillation, ...).
    """
    generator = generator or torch.Generator().manual_seed(0)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    losses = []
    epochs_iter = progress(range(epochs), desc=desc) if progress else range(epochs)
    for _ in epochs_iter:
        model.train()
        for idx in minibatches(len(x), batch_size, generator):
            xb, yb = x[idx].to(device), y[idx].to(device)
            if step is not None:
                loss = step(model, xb, yb)
            else:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
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


def lm_batches(tokens: torch.Tensor, block: int, batch_size: int, generator: torch.Generator):
    """Random contiguous windows ``(inputs, targets)`` of length ``block`` from a token stream."""
    starts = torch.randint(0, len(tokens) - block - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block + 1)
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy for a model returning logits ``(B, T, V)`` or an object with ``.logits``."""
    out = model(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def lm_eval_loss(model: nn.Module, tokens: torch.Tensor, block: int, batches: int = 8, batch_size: int = 16,
                 seed: int = 0) -> float:
    """Mean next-token loss on ``batches`` fixed random windows of ``tokens``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(batches):
        xb, yb = lm_batches(tokens, block, batch_size, gen)
        total += float(lm_loss(model, xb.to(device), yb.to(device)))
    model.train()
    return total / batches
