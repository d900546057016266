"""``MonarchLinear``: a drop-in ``nn.Linear`` whose weight is a Monarch matrix ``P2 · BD(w2) · P1 · BD(w1)``."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels import monarch_factor_shapes, monarch_linear, project

from .calibrate import fit_monarch
from .structured import StructuredLinear, _check_dense

#: fly's parameter names for the two factors (``src/models/layers/monarch_linear.py``)
FLY_KEYS = {"blkdiag1": "w1", "blkdiag2": "w2"}


class MonarchLinear(StructuredLinear):
    """Monarch replacement for ``nn.Linear(in_features, out_features, bias)``.

    ``y = P2 · BD(w2) · P1 · BD(w1) · x + bias`` with block sizes ``ceil(in/nblocks)`` and
    ``ceil(out/nblocks)`` and factor shapes identical to fly's ``blkdiag1``/``blkdiag2``
    (:func:`monarch_kernels.monarch_factor_shapes`). Sizes not divisible by ``nblocks`` work: inputs are
    treated as zero-padded and outputs truncated inside the op (no padded copy on kernel backends).

    Initialisation: ``w1 ~ U(±√(3/p))`` (variance ``1/p``, unit gain) and ``w2 ~ U(±1/√r)`` (variance
    ``1/(3r)``), so the output variance equals ``nn.Linear``'s default (``Var(x)/3``) at any size. fly
    initialises both factors like ``nn.Linear``, which gives ``Var(x)/9``, three times smaller; the bias is
    ``U(±1/√in_features)`` like ``nn.Linear`` (fly uses ``out_features``).

    Checkpoints written by fly (keys ``blkdiag1``/``blkdiag2``) load directly with ``load_state_dict``.

    Args:
        in_features: input width ``n_in`` (any positive int).
        out_features: output width ``n_out`` (any positive int).
        bias: whether the layer has a learnable ``bias (out_features,)`` (default ``True``).
        nblocks: blocks per factor, ``1 <= nblocks <= min(in_features, out_features)`` (default 4): the layer has
            about ``(n_in + n_out)·max(n_in, n_out)/nblocks`` weights instead of ``n_in·n_out``.
        activation: ``None`` (default), ``"relu"``, ``"gelu"`` or ``"gelu_tanh"``, fused into the kernels'
            epilogue: ``act(x Wᵀ + bias)`` in one pass, as ``nn.ReLU()`` / ``nn.GELU()`` /
            ``nn.GELU(approximate="tanh")`` after the layer would compute it.
        backend: kernel backend of every forward call (``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``) or
            ``None`` (default) for the process-wide choice, ``"auto"`` unless set with
            :func:`monarch_kernels.use_backend`.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Attributes:
        w1: ``(k, q, p)`` first block-diagonal factor (fly's ``blkdiag1``).
        w2: ``(l, s, r)`` second block-diagonal factor (fly's ``blkdiag2``).
        bias: ``(out_features,)`` or ``None``.
        shape: the :class:`monarch_kernels.MonarchShape` of the factors.

    Example::

        layer = MonarchLinear(768, 3072, nblocks=4)           # 0.31x the weights of nn.Linear(768, 3072)
        y = layer(torch.randn(8, 128, 768))                   # (8, 128, 3072)
        layer = MonarchLinear.from_linear(nn.Linear(768, 3072), nblocks=4)   # projection of a dense layer
        fc1 = MonarchLinear(768, 3072, nblocks=4, activation="gelu")   # GELU in the kernels' epilogue
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        *,
        activation: Optional[str] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, backend, factory, activation)
        self.shape = monarch_factor_shapes(in_features, out_features, nblocks)
        self.nblocks = nblocks
        self.w1 = nn.Parameter(torch.empty(self.shape.w1_shape, **factory))
        self.w2 = nn.Parameter(torch.empty(self.shape.w2_shape, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default initialisation: ``w1 ~ U(±√(3/p))``, ``w2 ~ U(±1/√r)``, bias like ``nn.Linear``."""
        bound1 = math.sqrt(3.0 / self.shape.p)
        bound2 = 1.0 / math.sqrt(self.shape.r)
        nn.init.uniform_(self.w1, -bound1, bound1)
        nn.init.uniform_(self.w2, -bound2, bound2)
        self._reset_bias()

    @property
    def structured_numel(self) -> int:
        return self.w1.numel() + self.w2.numel()

    def _weights(self) -> tuple:
        return (self.w1, self.w2)

    def _forward(self, x: Tensor, weights: tuple, bias: Optional[Tensor]) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MonarchLinear: input has last dimension {x.shape[-1]}, expected (..., {self.in_features})"
            )
        w1, w2 = weights
        return monarch_linear(x, w1, w2, bias, out_features=self.out_features, activation=self.activation,
                              backend=self.backend)

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``(out_features, in_features)`` weight ``M`` (differentiable)."""
        eye = torch.eye(self.in_features, device=self.w1.device, dtype=self.w1.dtype)
        return monarch_linear(eye, self.w1, self.w2, out_features=self.out_features, backend=self.backend).T

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        nblocks: int = 4,
        *,
        second_moment: Optional[Tensor] = None,
        activation: Optional[str] = None,
        backend: Optional[str] = None,
    ) -> "MonarchLinear":
        """The Monarch layer closest to a dense ``y = x Wᵀ + bias``.

        Without ``second_moment``: the Frobenius-optimal projection (:func:`monarch_kernels.project`; optimal
        for the zero-padded weight when ``nblocks`` does not divide the sizes). With it: the activation-aware
        fit that minimises the output error on inputs of that second moment
        (:func:`monarch_kernels.layers.calibrate.fit_monarch`).

        Args:
            weight: dense ``(out_features, in_features)`` floating-point weight (device and dtype are kept).
            bias: optional ``(out_features,)`` bias, copied.
            nblocks: number of blocks of each factor, ``1 <= nblocks <= min(in_features, out_features)``.
            second_moment: optional ``(in_features, in_features)`` input second moment ``X Xᵀ / T``
                (:func:`monarch_kernels.layers.calibrate.input_second_moments`).
            activation: activation fused into the new layer (see the class), default none.
            backend: kernel backend of the new layer (see :class:`MonarchLinear`).
        """
        fn = "MonarchLinear.from_dense"
        out_f, in_f = _check_dense(weight, bias, fn)
        layer = cls(in_f, out_f, bias is not None, nblocks, activation=activation, backend=backend,
                    device=weight.device, dtype=weight.dtype)
        sh = layer.shape
        if second_moment is None:
            padded = F.pad(weight.detach(), (0, sh.n_in - in_f, 0, sh.n_out - out_f))
            w1, w2 = project(padded, w1_shape=sh.w1_shape, w2_shape=sh.w2_shape)
        else:
            w1, w2 = fit_monarch(weight, second_moment, nblocks)
        with torch.no_grad():
            layer.w1.copy_(w1)
            layer.w2.copy_(w2)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, nblocks: int = 4, *, activation: Optional[str] = None,
                    backend: Optional[str] = None) -> "MonarchLinear":
        """Dense-to-sparse: the Monarch layer closest (Frobenius) to ``linear``'s weight, same bias.

        Args:
            linear: the ``nn.Linear`` to project (left unchanged).
            nblocks: number of blocks of each factor.
            activation: activation fused into the new layer (see the class), default none.
            backend: kernel backend of the new layer.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MonarchLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight, linear.bias, nblocks, activation=activation, backend=backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for fly, ours in FLY_KEYS.items():
            if prefix + fly in state_dict and prefix + ours not in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + fly)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}, w1={tuple(self.w1.shape)}, w2={tuple(self.w2.shape)}, "
            f"params={self.param_fraction:.3f}x dense"
            + (f", activation={self.activation!r}" if self.activation != "none" else "")
        )
