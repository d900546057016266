"""Activations that kernels can fuse into their epilogue: ``none``, ``relu``, ``gelu`` (erf), ``gelu_tanh``.

``apply(name, pre)`` and ``grad(name, pre)`` (the elementwise derivative ``act'(pre)``) are plain torch, so
the backward ``g · act'(pre)`` stays differentiable for double backward. ``CODES`` maps names to the integer
the Triton/CUDA epilogues switch on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}


def canonical(name: Optional[str], fn: str) -> str:
    if name is None:
        return "none"
    if name not in CODES:
        raise ValueError(f"{fn}: activation must be None or one of {sorted(CODES)}, got {name!r}")
    return name


def apply(name: str, pre: torch.Tensor) -> torch.Tensor:
    if name == "none":
        return pre
    if name == "relu":
        return F.relu(pre)
    if name == "gelu":
        return F.gelu(pre)
    return F.gelu(pre, approximate="tanh")


def grad(name: str, pre: torch.Tensor) -> torch.Tensor:
    """``act'(pre)`` (at 0 the ReLU derivative is taken as 0, as in PyTorch)."""
    if name == "relu":
        return (pre > 0).to(pre.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + pre * pdf
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (pre + 0.044715 * pre ** 3)
        th = torch.tanh(inner)
        return 0.5 * (1.0 + th) + 0.5 * pre * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * pre * pre)
    raise ValueError(f"no derivative for activation {name!r}")
