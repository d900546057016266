"""Shape conventions and argument validation for block-diagonal and Monarch products.

Conventions (fly-compatible, see SPEC §3):

* A block-diagonal factor ``w`` has shape ``(k, q, p)``: ``k`` blocks, each mapping ``p`` inputs to ``q``
  outputs, contraction dim contiguous (like ``nn.Linear.weight``).
* A Monarch product uses ``w1 (k, q, p)`` then ``w2 (l, s, r)`` with ``l * r == k * q``; it maps
  ``n_in = k * p`` features to ``n_out = l * s`` features.

Every public entry point validates its arguments here so that bad input raises a ``ValueError`` or
``TypeError`` naming the argument and the expected shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
)


@dataclass(frozen=True)
class MonarchShape:
    """Sizes of a Monarch product ``P2 · BD(w2) · P1 · BD(w1)``.

    ``w1: (k, q, p)``, ``w2: (l, s, r)``; ``n_in = k·p`` (padded input width), ``n_mid = k·q = l·r``,
    ``n_out = l·s`` (padded output width).
    """

    k: int
    q: int
    p: int
    l: int
    s: int
    r: int

    @property
    def n_in(self) -> int:
        return self.k * self.p

    @property
    def n_mid(self) -> int:
        return self.k * self.q

    @property
    def n_out(self) -> int:
        return self.l * self.s

    @property
    def w1_shape(self) -> tuple[int, int, int]:
        return (self.k, self.q, self.p)

    @property
    def w2_shape(self) -> tuple[int, int, int]:
        return (self.l, self.s, self.r)

    @classmethod
    def from_factors(cls, w1_shape, w2_shape) -> "MonarchShape":
        k, q, p = w1_shape
        l, s, r = w2_shape
        return cls(k, q, p, l, s, r)


def monarch_factor_shapes(in_features: int, out_features: int, nblocks: int) -> MonarchShape:
    """Factor shapes used by ``MonarchLinear`` (identical to fly's ``blkdiag1``/``blkdiag2``).

    Block sizes are ``ceil(in/nblocks)`` and ``ceil(out/nblocks)``. If the padded input is narrower than
    the padded output, ``w1: (nb, in_blk, in_blk)``, ``w2: (nb, out_blk, in_blk)``; otherwise
    ``w1: (nb, out_blk, in_blk)``, ``w2: (nb, out_blk, out_blk)``. The intermediate width is
    ``nb · min(in_blk, out_blk)``.
    """
    for name, value in (("in_features", in_features), ("out_features", out_features), ("nblocks", nblocks)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if nblocks > min(in_features, out_features):
        raise ValueError(
            f"nblocks={nblocks} must not exceed min(in_features, out_features)="
            f"{min(in_features, out_features)}"
        )
    in_blk = math.ceil(in_features / nblocks)
    out_blk = math.ceil(out_features / nblocks)
    if in_blk * nblocks < out_blk * nblocks:
        return MonarchShape(nblocks, in_blk, in_blk, nblocks, out_blk, in_blk)
    return MonarchShape(nblocks, out_blk, in_blk, nblocks, out_blk, out_blk)


def _fmt(shape) -> str:
    return str(tuple(int(d) for d in shape))


def check_tensor(name: str, t, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{fn}: {name} has dtype {t.dtype}; expected a floating or complex dtype "
            f"(float16, bfloat16, float32, float64, complex64, complex128)"
        )


def check_factor(name: str, w, fn: str) -> None:
    check_tensor(name, w, fn)
    if w.dim() != 3:
        raise ValueError(
            f"{fn}: {name} must be 3-D (nblocks, out_block, in_block), got shape {_fmt(w.shape)}"
        )
    if min(w.shape) < 1:
        raise ValueError(f"{fn}: {name} must have no empty dimension, got shape {_fmt(w.shape)}")


def check_same(fn: str, x: torch.Tensor, **weights) -> None:
    """All tensors share ``x``'s dtype and device."""
    for name, w in weights.items():
        if w is None:
            continue
        if w.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} has dtype {w.dtype} but x has dtype {x.dtype}; they must match")
        if w.device != x.device:
            raise ValueError(f"{fn}: {name} is on {w.device} but x is on {x.device}; they must match")


def check_input_width(fn: str, x: torch.Tensor, full: int, allow_partial: bool, what: str) -> None:
    """``x.shape[-1]`` must equal ``full`` (or, if ``allow_partial``, lie in ``[1, full]``: shorter inputs
    are zero-padded, which ``MonarchLinear``'s rounded-up block sizes need, e.g. 6 inputs in 4 blocks of 2)."""
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension (..., {full}), got a 0-d tensor")
    n = x.shape[-1]
    if n == full or (allow_partial and 1 <= n < full):
        return
    if allow_partial:
        raise ValueError(
            f"{fn}: x has last dimension {n}; {what} expects between 1 and {full} "
            f"(shape (..., {full}), shorter inputs are zero-padded)"
        )
    raise ValueError(f"{fn}: x has last dimension {n} but {what} expects shape (..., {full})")


def check_out_features(fn: str, out_features, full: int) -> int:
    if out_features is None:
        return full
    if not isinstance(out_features, int) or isinstance(out_features, bool):
        raise TypeError(f"{fn}: out_features must be an int or None, got {type(out_features).__name__}")
    if not 1 <= out_features <= full:
        raise ValueError(
            f"{fn}: out_features={out_features} must lie in [1, {full}] for factors whose padded output "
            f"width is {full}"
        )
    return out_features


def check_bias(fn: str, bias, x: torch.Tensor, n_out: int) -> None:
    if bias is None:
        return
    check_tensor("bias", bias, fn)
    if bias.shape != (n_out,):
        raise ValueError(f"{fn}: bias has shape {_fmt(bias.shape)}, expected ({n_out},)")
    check_same(fn, x, bias=bias)


def check_monarch_factors(fn: str, w1, w2) -> MonarchShape:
    check_factor("w1", w1, fn)
    check_factor("w2", w2, fn)
    shape = MonarchShape.from_factors(w1.shape, w2.shape)
    if shape.l * shape.r != shape.k * shape.q:
        raise ValueError(
            f"{fn}: w1 of shape {_fmt(w1.shape)} produces k·q = {shape.n_mid} intermediate features but "
            f"w2 of shape {_fmt(w2.shape)} consumes l·r = {shape.l * shape.r}; they must be equal"
        )
    if w1.dtype != w2.dtype:
        raise TypeError(f"{fn}: w2 has dtype {w2.dtype} but w1 has dtype {w1.dtype}; they must match")
    if w1.device != w2.device:
        raise ValueError(f"{fn}: w2 is on {w2.device} but w1 is on {w1.device}; they must match")
    return shape
