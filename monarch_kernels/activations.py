"""Activations that kernels can fuse into their epilogue: ``none``, ``relu``, ``gelu`` (erf), ``gelu_tanh``.

``apply(name, pre)`` is the activation and ``backward(name, pre, g)`` the vector-Jacobian product
``g · act'(pre)``; both are plain torch (ATen's own ``threshold_backward`` / ``gelu_backward``, which are
differentiable again), so a fused call propagates NaN/Inf and derivatives exactly as the unfused
``act(F.linear(...))`` would, and double backward works. ``CODES`` maps names to the integer the
Triton/C++/CUDA epilogues switch on.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}

#: ``approximate=`` argument of ``F.gelu`` / ``aten.gelu_backward`` per activation
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def canonical(name: Optional[str], fn: str) -> str:
    if name is None:
        return "none"
    if not isinstance(name, str) or name not in CODES:
        raise ValueError(f"{fn}: activation must be None or one of {sorted(CODES)}, got {name!r}")
    return name


def module(name: str) -> torch.nn.Module:
    """The ``torch.nn`` module computing activation ``name`` (``nn.Identity`` for ``"none"``)."""
    if name == "none":
        return torch.nn.Identity()
    if name == "relu":
        return torch.nn.ReLU()
    return torch.nn.GELU(approximate=_GELU_APPROXIMATE[name])


def of_module(mod: torch.nn.Module) -> Optional[str]:
    """The fusable activation a module computes (``nn.ReLU``, ``nn.GELU`` of either approximation, exactly those
    classes), or ``None``."""
    if type(mod) is torch.nn.ReLU:
        return "relu"
    if type(mod) is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(mod.approximate)
    return None


def apply(name: str, pre: torch.Tensor) -> torch.Tensor:
    if name == "none":
        return pre
    if name == "relu":
        return F.relu(pre)
    return F.gelu(pre, approximate=_GELU_APPROXIMATE[name])


def backward(name: str, pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g · act'(pre)`` in ``g``'s dtype, evaluated in float32 for float16/bfloat16 storage.

    In the storage dtype the tails go wrong: fp16 ``gelu_tanh'`` at ``pre = 1000`` overflows ``pre³`` into
    ``inf · 0 = NaN`` and ``gelu'(-4) = -3.4e-4`` rounds to 0. ReLU's derivative at 0 is 0 and at NaN passes
    ``g`` through (``pre <= 0`` is false), as ``torch.relu``'s backward does.
    """
    if name == "none":
        return g
    wide = torch.float32 if pre.dtype in (torch.float16, torch.bfloat16) else pre.dtype
    gw, pw = g.to(wide), pre.to(wide)
    if name == "relu":
        out = torch.ops.aten.threshold_backward(gw, pw, 0)
    elif name in _GELU_APPROXIMATE:
        out = torch.ops.aten.gelu_backward(gw, pw, approximate=_GELU_APPROXIMATE[name])
    else:
        raise ValueError(f"no derivative for activation {name!r}")
    return out.to(g.dtype)
