"""``BlockdiagLinear``: a drop-in ``nn.Linear`` whose weight is a single block-diagonal matrix (M2-BERT style).

Not a Monarch layer: one factor, no permutation, so features never mix across blocks unless
``shuffle=True`` applies ShuffleNet's channel shuffle to the input first (fly issue #9 asked which is which).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels import blockdiag_linear

from .calibrate import fit_blockdiag
from .structured import StructuredLinear, _check_dense


class BlockdiagLinear(StructuredLinear):
    """``y = BD(weight) · S x + bias`` with ``weight (nblocks, ceil(out/nblocks), ceil(in/nblocks))``.

    ``S`` is the identity, or with ``shuffle=True`` the channel shuffle
    ``(Sx)[cc·nblocks + g] = x[g·p + cc]`` over the zero-padded input (fly's ``'(group c) -> (c group)'``).
    Parameter name and layout match fly's ``BlockdiagLinear.weight``. Init ``U(±1/√p)``: output variance
    equals ``nn.Linear``'s default.

    Args:
        in_features: input width (any positive int; padded to ``nblocks·ceil(in/nblocks)`` inside the op).
        out_features: output width (any positive int).
        bias: whether the layer has a learnable ``bias (out_features,)`` (default ``True``).
        nblocks: number of diagonal blocks, ``1 <= nblocks <= min(in_features, out_features)`` (default 4).
        shuffle: apply the channel shuffle ``S`` to the input first (default ``False``).
        activation: ``None`` (default), ``"relu"``, ``"gelu"`` or ``"gelu_tanh"``, fused into the kernels'
            epilogue: ``act(x Wᵀ + bias)`` in one pass, as ``nn.ReLU()`` / ``nn.GELU()`` /
            ``nn.GELU(approximate="tanh")`` after the layer would compute it.
        backend: kernel backend of every forward call, or ``None`` (default) for the process-wide choice.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        shuffle: bool = False,
        *,
        activation: Optional[str] = None,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, backend, factory, activation)
        if not isinstance(nblocks, int) or not 1 <= nblocks <= min(in_features, out_features):
            raise ValueError(
                f"BlockdiagLinear: nblocks must be an int in [1, {min(in_features, out_features)}], got {nblocks!r}"
            )
        self.nblocks, self.shuffle = nblocks, bool(shuffle)
        q, p = math.ceil(out_features / nblocks), math.ceil(in_features / nblocks)
        self.weight = nn.Parameter(torch.empty(nblocks, q, p, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default initialisation: ``weight ~ U(±1/√p)``, bias like ``nn.Linear``."""
        bound = 1.0 / math.sqrt(self.weight.shape[2])
        nn.init.uniform_(self.weight, -bound, bound)
        self._reset_bias()

    @property
    def structured_numel(self) -> int:
        return self.weight.numel()

    def _weights(self) -> tuple:
        return (self.weight,)

    def _shuffle(self, x: Tensor) -> Tensor:
        k, _, p = self.weight.shape
        x = F.pad(x, (0, k * p - x.shape[-1]))
        return x.unflatten(-1, (k, p)).transpose(-1, -2).flatten(-2)

    def _forward(self, x: Tensor, weights: tuple, bias: Optional[Tensor]) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"BlockdiagLinear: input has last dimension {x.shape[-1]}, expected (..., {self.in_features})"
            )
        if self.shuffle:
            x = self._shuffle(x)
        return blockdiag_linear(x, weights[0], bias, out_features=self.out_features, activation=self.activation,
                                backend=self.backend)

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
    ) -> "BlockdiagLinear":
        """The block-diagonal layer (no shuffle) closest to a dense ``y = x Wᵀ + bias``.

        Without ``second_moment``: the diagonal blocks of the zero-padded ``W`` (the Frobenius-optimal choice).
        With it: the per-block regression that minimises the output error on inputs of that second moment
        (:func:`monarch_kernels.layers.calibrate.fit_blockdiag`).

        Args:
            weight: dense ``(out_features, in_features)`` floating-point weight (device and dtype are kept).
            bias: optional ``(out_features,)`` bias, copied.
            nblocks: number of diagonal blocks.
            second_moment: optional ``(in_features, in_features)`` input second moment ``X Xᵀ / T``.
            activation: activation fused into the new layer (see the class), default none.
            backend: kernel backend of the new layer.
        """
        out_f, in_f = _check_dense(weight, bias, "BlockdiagLinear.from_dense")
        layer = cls(in_f, out_f, bias is not None, nblocks, activation=activation, backend=backend,
                    device=weight.device, dtype=weight.dtype)
        k, q, p = layer.weight.shape
        if second_moment is None:
            padded = F.pad(weight.detach(), (0, k * p - in_f, 0, k * q - out_f))
            blocks = padded.view(k, q, k, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        else:
            blocks = fit_blockdiag(weight, second_moment, nblocks)
        with torch.no_grad():
            layer.weight.copy_(blocks)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def dense_weight(self) -> Tensor:
        """The equivalent dense ``(out_features, in_features)`` weight (differentiable)."""
        eye = torch.eye(self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        if self.shuffle:
            eye = self._shuffle(eye)
        return blockdiag_linear(eye, self.weight, out_features=self.out_features, backend=self.backend).T

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"shuffle={self.shuffle}, bias={self.bias is not None}, params={self.param_fraction:.3f}x dense"
            + (f", activation={self.activation!r}" if self.activation != "none" else "")
        )
