"""Shared base of the structured drop-in replacements for ``nn.Linear``."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from monarch_kernels import activations, available_backends


def _warn_if_reference_only(device: torch.device) -> None:
    """Warn once per device type when no compiled backend can run there, so the layers fall back to the
    (correct but slower) PyTorch reference: usually an install that could not build the C++/CUDA extension."""
    if torch.compiler.is_compiling():  # first: under Dynamo the set lookup below would become a guard (a recompile)
        return
    if device.type in _CHECKED_DEVICES or device.type not in ("cpu", "cuda"):
        return
    _CHECKED_DEVICES.add(device.type)
    compiled = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    status = available_backends()
    if any(status.get(name) == "available" for name in compiled):
        return
    reasons = "; ".join(f"{name}: {status.get(name, 'not registered')}" for name in compiled)
    warnings.warn(
        f"monarch_kernels: no compiled kernels for {device.type} tensors ({reasons}); Monarch and block-diagonal "
        "layers run on the PyTorch reference backend (correct, slower). To build the C++ extension, reinstall "
        "with a C++ compiler and the environment's torch visible to the build: "
        "pip install --no-build-isolation monarch-kernels (or -e . in a checkout)",
        RuntimeWarning, stacklevel=3,
    )


_CHECKED_DEVICES: set = set()


def _check_dense(weight, bias, fn: str) -> tuple[int, int]:
    """Validate a dense ``(out, in)`` floating-point weight and optional ``(out,)`` bias; returns ``(out, in)``."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be a 2-D (out_features, in_features) tensor, "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"{fn}: bias must be a ({weight.shape[0]},) tensor (out_features,), got {shape}")
        if not bias.is_floating_point():
            raise TypeError(f"{fn}: bias must be a floating-point tensor, got {bias.dtype}")
    return weight.shape[0], weight.shape[1]


class StructuredLinear(nn.Module):
    """Base for linear layers whose weight is a structured ``(out_features, in_features)`` matrix.

    Subclasses implement :meth:`dense_weight` and :meth:`_forward` and report :attr:`structured_numel`
    (their number of weight entries). The base holds ``in_features``, ``out_features``, the optional
    ``bias`` (initialised like ``nn.Linear``), the ``backend`` used by every forward call, autocast
    handling (inputs and weights are cast to the autocast dtype, bf16 is never forced to fp16), reverse
    sparsification (:meth:`to_linear`, :meth:`to_dense`), an optional activation fused into the kernels'
    epilogue (``y = act(x Wᵀ + bias)``) and parameter/FLOP accounting.

    Args:
        in_features: input width (a positive int).
        out_features: output width (a positive int).
        bias: whether the layer has a learnable ``bias (out_features,)``.
        backend: kernel backend of every forward call (``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``), or
            ``None`` for the process-wide choice (:func:`monarch_kernels.use_backend`, ``"auto"`` by default).
        factory: ``{"device": ..., "dtype": ...}`` for the parameters.
        activation: ``None`` (default), ``"relu"``, ``"gelu"`` or ``"gelu_tanh"``: applied to the output inside
            the op (the kernels' epilogue; the backward recomputes or keeps the pre-activation), exactly as
            ``nn.ReLU()`` / ``nn.GELU()`` / ``nn.GELU(approximate="tanh")`` after the layer would.

    Attributes:
        dense_type: the dense module class this layer stands for (``nn.Linear`` unless it was converted from
            another class, e.g. a GPT-2 ``Conv1D`` by :func:`monarch_kernels.layers.monarchify`);
            :func:`monarch_kernels.layers.densify` restores that class. Not part of the state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, backend: Optional[str], factory: dict,
                 activation: Optional[str] = None):
        super().__init__()
        self.dense_type: type = nn.Linear
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{type(self).__name__}: backend must be a str or None, got {type(backend).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.activation = activations.canonical(activation, type(self).__name__)
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
        """The equivalent dense ``(out_features, in_features)`` weight (differentiable; the map before any
        fused activation)."""
        raise NotImplementedError

    def _forward(self, x: Tensor, weights: tuple, bias: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def _weights(self) -> tuple:
        raise NotImplementedError

    # -- shared behaviour ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in_features)`` -> ``(..., out_features)``: ``act(x Wᵀ + bias)`` with the structured ``W``
        (``act`` the identity unless the layer has an ``activation``)."""
        return self._forward(*self._op_arguments(x))

    def _op_arguments(self, x: Tensor) -> tuple:
        """``(x, weights, bias)`` as the op receives them: under autocast all cast to the autocast dtype (the
        weights as :meth:`_weights` gives them)."""
        if self.backend != "torch":
            _warn_if_reference_only(x.device)
        weights, bias = self._weights(), self.bias
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
            weights = tuple(w.to(dtype) for w in weights)
            bias = bias.to(dtype) if bias is not None else None
        return x, weights, bias

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

    def _linear(self) -> nn.Linear:
        """The ``nn.Linear`` of the weight and bias (the map before any activation)."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """Reverse sparsification: an ``nn.Linear`` computing exactly the same map (a layer with a fused
        activation has no such ``nn.Linear``: :meth:`to_dense`)."""
        if self.activation != "none":
            raise ValueError(
                f"{type(self).__name__}.to_linear: the layer applies activation {self.activation!r}, which an "
                "nn.Linear cannot; use to_dense() (nn.Sequential(nn.Linear, the activation))")
        return self._linear()

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """Reverse sparsification including the fused activation: :meth:`to_linear`'s ``nn.Linear``, followed in
        an ``nn.Sequential`` by the activation's module when the layer has one."""
        if self.activation == "none":
            return self._linear()
        return nn.Sequential(self._linear(), activations.module(self.activation))
