"""Sampling from a (possibly forced) causal LM and measuring its generations."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .expertise import _check_ids, _logits


def _max_context(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def generate(model: nn.Module, prompt: Tensor, n_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample ``n_tokens`` continuations of ``prompt (B, T0)``; returns ``(B, T0 + n_tokens)``.

    Every step recomputes the whole (cropped) context, so units forced through :func:`force_units` are
    forced at every position, prompt included. Sampling runs on the CPU ``generator``.
    """
    _check_ids("prompt", prompt)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    ctx = _max_context(model)
    was_training = model.training
    model.eval()
    ids = prompt.clone()
    try:
        for _ in range(n_tokens):
            window = ids if ctx is None else ids[:, -ctx:]
            logits = _logits(model(window.to(device)))[:, -1].float().cpu() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p is not None:
                sorted_logits, order = logits.sort(dim=-1, descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass ≥ top_p
                logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        model.train(was_training)
    return ids


@torch.no_grad()
def generated_perplexity(model: nn.Module, ids: Tensor, prompt_len: int) -> float:
    """``exp`` of the mean next-token NLL of the generated part ``ids[:, prompt_len:]`` under ``model``
    (call it outside :func:`force_units` to score under the unforced model)."""
    _check_ids("ids", ids)
    if not 1 <= prompt_len < ids.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {ids.shape[1]}), got {prompt_len}")
    device = next(model.parameters()).device
    ctx = _max_context(model)
    if ctx is not None and ids.shape[1] > ctx:
        raise ValueError(f"ids are longer ({ids.shape[1]}) than the model's context ({ctx})")
    was_training = model.training
    model.eval()
    logits = _logits(model(ids.to(device))).float().cpu()
    model.train(was_training)
    nll = F.cross_entropy(logits[:, prompt_len - 1:-1].reshape(-1, logits.shape[-1]), ids[:, prompt_len:].reshape(-1))
    return float(torch.exp(nll))


@torch.no_grad()
def concept_probability(model: nn.Module, ids: Tensor, concept_ids: Tensor, prompt_len: int) -> float:
    """Mean next-token probability mass on the concept tokens over the generated positions of ``ids``
    (under whatever forcing is active)."""
    device = next(model.parameters()).device
    probs = _logits(model(ids.to(device))).float().softmax(-1)[:, prompt_len - 1:-1]
    return float(probs[..., concept_ids.to(device)].sum(-1).mean())
