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

from .structured import StructuredLinear


class BlockdiagLinear(StructuredLinear):
    """``y = BD(weight) · S x + bias`` with ``weight (nblocks, ceil(out/nblocks), ceil(in/nblocks))``.

    ``S`` is the identity, or with ``shuffle=True`` the channel shuffle
    ``(Sx)[cc·nblocks + g] = x[g·p + cc]`` over the zero-padded input (fly's ``'(group c) -> (c group)'``).
    Parameter name and layout match fly's ``BlockdiagLinear.weight``. Init ``U(±1/√p)``: output variance
    equals ``nn.Linear``'s default.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        nblocks: int = 4,
        shuffle: bool = False,
        *,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ):
        factory = {"device": device, "dtype": dtype}
        super().__init__(in_features, out_features, bias, backend, factory)
        if not isinstance(nblocks, int) or not 1 <= nblocks <= min(in_features, out_features):
            raise ValueError(
                f"BlockdiagLinear: nblocks must be an int in [1, {min(in_features, out_features)}], got {nblocks!r}"
            )
        self.nblocks, self.shuffle = nblocks, bool(shuffle)
        q, p = math.ceil(out_features / nblocks), math.ceil(in_features / nblocks)
        self.weight = nn.Parameter(torch.empty(nblocks, q, p, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
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
        return blockdiag_linear(x, weights[0], bias, out_features=self.out_features, backend=self.backend)

    def dense_weight(self) -> Tensor:
        eye = torch.eye(self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        if self.shuffle:
            eye = self._shuffle(eye)
        return blockdiag_linear(eye, self.weight, out_features=self.out_features, backend=self.backend).T

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"shuffle={self.shuffle}, bias={self.bias is not None}, params={self.param_fraction:.3f}x dense"
        )
