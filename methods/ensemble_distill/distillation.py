"""One-to-one member distillation, the plain-KD baseline's loss, the diversifying input perturbation and the KL
to the ensemble."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..train import classification_metrics, soft_cross_entropy
from .batch_ensemble import member_logits


def member_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """One-to-one KD: ``T²·mean_{m,b} CE(softmax(z_t^m/T), log_softmax(z_s^m/T))`` (Hinton et al. 2015's loss,
    :func:`methods.train.soft_cross_entropy`); both ``(M, B, C)``."""
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"member_kd_loss: student_logits and teacher_logits must both be (M, B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return temperature ** 2 * soft_cross_entropy(teacher_logits, student_logits, temperature)


def ensemble_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """KD baseline: a single student ``(B, C)`` against every teacher ``(M, B, C)``, averaged over teachers."""
    if student_logits.dim() != 2 or teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"ensemble_kd_loss: expected student (B, C) and teachers (M, B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return member_kd_loss(student_logits.expand_as(teacher_logits), teacher_logits, temperature)


def teacher_logits(teachers: Sequence[nn.Module], x: Tensor) -> Tensor:
    return torch.stack([t(x) for t in teachers])


def diversifying_perturbation(x: Tensor, teachers: Sequence[nn.Module], student: nn.Module, eps: float,
                              pair: tuple[int, int], clip: Optional[tuple[float, float]] = (0.0, 1.0)) -> Tensor:
    """One normalised gradient-ascent step on ``TDiv − SDiv`` (see module docstring); returns the new inputs.

    ``x``: ``(B, ...)``; ``teachers``: ``M`` modules; ``student``: a BE model with ``M`` members (its members'
    logits come from :func:`member_logits`); ``pair = (a, b)``, ``a ≠ b``: member ``b`` is the (stop-gradient)
    target for member ``a``; ``eps``: RMS step per input entry (``||δ||₂ = eps·√D``); ``clip``: input range
    (``None`` for no clipping). Teachers and student are used in eval mode and are not updated.
    """
    m = len(teachers)
    a, b = pair
    if not (0 <= a < m and 0 <= b < m and a != b):
        raise ValueError(f"diversifying_perturbation: pair must be two distinct member indices in [0, {m}), got {pair}")
    if not eps > 0:
        raise ValueError(f"diversifying_perturbation: eps must be > 0, got {eps}")
    modes = [mod.training for mod in (*teachers, student)]
    for mod in (*teachers, student):
        mod.eval()
    x_adv = x.detach().clone().requires_grad_(True)
    t_a, t_b = teachers[a](x_adv), teachers[b](x_adv)
    s = member_logits(student, x_adv, m)
    objective = soft_cross_entropy(t_b, t_a) - soft_cross_entropy(s[b], s[a])
    (grad,) = torch.autograd.grad(objective, x_adv)
    for mod, mode in zip((*teachers, student), modes):
        mod.train(mode)
    flat = grad.flatten(1)
    d = flat.shape[1]
    delta = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12) * (eps * math.sqrt(d))
    out = x.detach() + delta.view_as(x)
    return out.clamp(*clip) if clip is not None else out


def random_pair(members: int, generator: torch.Generator) -> tuple[int, int]:
    """Two distinct member indices ``(a, b)`` drawn uniformly."""
    a, b = torch.randperm(members, generator=generator)[:2].tolist()
    return a, b


def kl_to_ensemble(ensemble_probs: Tensor, logits: Tensor) -> float:
    """``mean_x KL(p_DE(x) || p_student(x))``."""
    logp = logits.log_softmax(-1)
    return float((ensemble_probs * (ensemble_probs.clamp_min(1e-12).log() - logp)).sum(-1).mean())


def probs_metrics(probs: Tensor, ens_probs: Tensor, y: Tensor) -> dict:
    """Accuracy, NLL, ECE of predicted probabilities and their KL from the ensemble's."""
    m = classification_metrics(probs.clamp_min(1e-12).log(), y)
    m["kl_to_ensemble"] = kl_to_ensemble(ens_probs, probs.clamp_min(1e-12).log())
    return m
