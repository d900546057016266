"""A ProWD client: its Monarch MLP, forward passes through quantised weights, and quantisation-aware local
training from the received global model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..models import MLP
from .quantization import FP_BITS, _check_bits, is_quantized_param, quantize, quantize_state


def make_client_model(in_features: int, n_classes: int = 10, hidden: int = 256, nblocks: int = 4) -> nn.Module:
    """``in → hidden (dense) → hidden (Monarch) → classes (dense)``: :class:`methods.models.MLP` with Monarch
    hidden layers (the Monarch factors ``w1, w2`` are quantised like any weight)."""
    return MLP(in_features, hidden, n_classes, depth=2, layer="monarch", nblocks=nblocks)


def forward_with(model: nn.Module, state: dict[str, Tensor], x: Tensor, bits: int = FP_BITS) -> Tensor:
    """``model(x)`` with parameters ``state``, weight tensors passed through ``Q_bits`` (STE) if ``bits < 32``."""
    params = {n: quantize(p, bits) if (bits != FP_BITS and is_quantized_param(n, p)) else p
              for n, p in state.items()}
    return functional_call(model, params, (x,))


def client_generator(seed: int, rnd: int, cid: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rnd) * 1009 + int(cid))


def local_train(model: nn.Module, received: dict[str, Tensor], x: Tensor, y: Tensor, bits: int, *, epochs: int = 2,
                lr: float = 1e-3, batch_size: int = 32,
                generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Local training of one client from the received global weights.

    A low-bit client stores the received model at its bitwidth, trains latent weights from it with
    quantisation-aware training (forward through the deterministic ``Q_b``, STE backward) and uploads its weights
    at its bitwidth again; both storage steps use unbiased stochastic rounding (with deterministic rounding a
    2-bit client whose local updates are smaller than half a step would round them all away every round).
    An FP client trains and uploads plain FP32 weights. Adam, cross-entropy, ``epochs`` mini-batch passes."""
    _check_bits(bits)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must have the same non-zero length, got {tuple(x.shape)} and {tuple(y.shape)}")
    generator = generator or torch.Generator().manual_seed(0)
    start = quantize_state(received, bits, generator)
    latent = {n: p.detach().clone().requires_grad_(True) for n, p in start.items()}
    opt = torch.optim.Adam(latent.values(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(forward_with(model, latent, x[idx], bits), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return quantize_state({n: p.detach() for n, p in latent.items()}, bits, generator)


@dataclass
class ClientUpdate:
    """What a client uploads: its weights (quantised for low-bit clients), sample count, bitwidth and id."""

    state: dict[str, Tensor]
    n_samples: int
    bits: int
    cid: int = 0
