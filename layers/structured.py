"""Shared base of the structured drop-in replacements for ``nn.Linear``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class StructuredLinear(nn.Module):
    """Base for linear layers whose weight is a structured ``(out_features, in_features)`` matrix.

    Subclasses implement :meth:`dense_weight` and :meth:`_forward` and report :attr:`structured_numel`
    (their number of weight entries). The base holds ``in_features``, ``out_features``, the optional
    ``bias`` (initialised like ``nn.Linear``), the ``backend`` used by every forward call, autocast
    handling (inputs and weights are cast to the autocast dtype, bf16 is never forced to fp16), reverse
    sparsification (:meth:`to_linear`) and parameter/FLOP accounting.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, backend: Optional[str], factory: dict):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{type(self).__name__}: backend must be a str or None, got {type(backend).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def _reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # -- to be provided by subclasses ------------------------------------------------------------
    @property
    def structured_numel(self) -> int:
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``(out_features, in_features)`` weight (differentiable)."""
        raise NotImplementedError

    def _forward(self, x: Tensor, weights: tuple, bias: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def _weights(self) -> tuple:
        raise NotImplementedError

    # -- shared behaviour ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        weights, bias = self._weights(), self.bias
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            weights = tuple(w.to(dtype) for w in weights)
            bias = bias.to(dtype) if bias is not None else None
        return self._forward(x, weights, bias)

    @property
    def param_fraction(self) -> float:
        """Weight entries relative to a dense ``nn.Linear`` of the same size (fly's ``saving``)."""
        return self.structured_numel / (self.in_features * self.out_features)

    def flops_per_token(self) -> int:
        """Multiply-add FLOPs (2 per MAC) of one forward token, weights only (bias excluded)."""
        return 2 * self.structured_numel

    def dense_flops_per_token(self) -> int:
        """FLOPs per token of the dense ``nn.Linear`` this layer replaces."""
        return 2 * self.in_features * self.out_features

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Reverse sparsification: an ``nn.Linear`` computing exactly the same map."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear
