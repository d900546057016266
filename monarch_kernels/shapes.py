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
        if w is not None:
            check_like(fn, name, w, "x", x)


def check_like(fn: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


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


def check_out_features(fn: str, out_features, full: int, name: str = "out_features") -> int:
    """An output width (argument ``name``) in ``[1, full]``, ``full`` when ``None``."""
    if out_features is None:
        return full
    if not isinstance(out_features, int) or isinstance(out_features, bool):
        raise TypeError(f"{fn}: {name} must be an int or None, got {type(out_features).__name__}")
    if not 1 <= out_features <= full:
        raise ValueError(
            f"{fn}: {name}={out_features} must lie in [1, {full}] for factors whose padded output "
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


# ------------------------------------------------------------------------------------------------------
# Arguments of the raw ops (the torch.library custom ops of ops.py and the compiled ops of ext.py). The
# public functions check with friendlier messages first; these run in every op body and fake
# implementation, so they stay O(1): shapes, dtypes and devices only, never tensor data.
# ------------------------------------------------------------------------------------------------------


def check_size(fn: str, name: str, value, lo: int, hi: int) -> int:
    """An ``int`` argument in ``[lo, hi]`` (a ``SymInt`` while tracing with dynamic shapes)."""
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{fn}: {name}={value} must lie in [{lo}, {hi}]")
    return value


def check_features(fn: str, name: str, t, width: int) -> None:
    """``t`` is a tensor of shape ``(..., n)`` with ``1 ≤ n ≤ width`` (narrower inputs act as zero-padded)."""
    check_tensor(name, t, fn)
    if t.dim() < 1 or not 1 <= t.shape[-1] <= width:
        raise ValueError(f"{fn}: {name} has shape {_fmt(t.shape)}; expected (..., n) with 1 <= n <= {width}")


def check_same_tokens(fn: str, x: torch.Tensor, g: torch.Tensor) -> None:
    """``x (..., n_in)`` and ``g (..., n_out)`` share their leading (token) dimensions."""
    if x.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"{fn}: x of shape {_fmt(x.shape)} and g of shape {_fmt(g.shape)} must have the same leading "
            f"dimensions (one gradient row per input row)"
        )


def check_blockdiag_op(fn: str, x, w, bias, n_out) -> None:
    """``blockdiag_fwd``: ``x (..., ≤ k·p)``, ``w (k, q, p)``, ``n_out ∈ [1, k·q]``, ``bias (n_out,)`` or None."""
    check_factor("w", w, fn)
    k, q, p = w.shape
    check_features(fn, "x", x, k * p)
    check_like(fn, "x", x, "w", w)
    check_size(fn, "n_out", n_out, 1, k * q)
    check_bias(fn, bias, x, n_out)


def check_blockdiag_wgrad_op(fn: str, x, g, k, q, p) -> None:
    """``blockdiag_wgrad``: ``x (..., ≤ k·p)``, ``g (..., ≤ k·q)`` with the same leading dimensions."""
    for name, value in (("k", k), ("q", q), ("p", p)):
        check_size(fn, name, value, 1, 2**62)
    check_features(fn, "x", x, k * p)
    check_features(fn, "g", g, k * q)
    check_like(fn, "g", g, "x", x)
    check_same_tokens(fn, x, g)


def check_monarch_op(fn: str, w1, w2, *, x=None, g=None, bias=None, n_out=None, n_in=None) -> MonarchShape:
    """Monarch ops: factors ``w1 (k, q, p)``, ``w2 (l, s, r)`` with ``l·r = k·q``; then whichever of
    ``x (..., ≤ k·p)``, ``g (..., ≤ l·s)`` (same leading dims as ``x``), ``n_out ∈ [1, l·s]`` with
    ``bias (n_out,)``, ``n_in ∈ [1, k·p]`` the op takes, all of ``w1``'s dtype and device."""
    sh = check_monarch_factors(fn, w1, w2)
    if x is not None:
        check_features(fn, "x", x, sh.n_in)
        check_like(fn, "x", x, "w1", w1)
    if g is not None:
        check_features(fn, "g", g, sh.n_out)
        check_like(fn, "g", g, "w1", w1)
        if x is not None:
            check_same_tokens(fn, x, g)
    if n_out is not None:
        check_size(fn, "n_out", n_out, 1, sh.n_out)
        if bias is not None:
            check_tensor("bias", bias, fn)
            if bias.shape != (n_out,):
                raise ValueError(f"{fn}: bias has shape {_fmt(bias.shape)}, expected ({n_out},)")
            check_like(fn, "bias", bias, "w1", w1)
    if n_in is not None:
        check_size(fn, "n_in", n_in, 1, sh.n_in)
    return sh
