"""Symmetric uniform b-bit quantisation of weight tensors with a straight-through estimator, and the
unbiased stochastic rounding low-bit clients store their weights with."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor



FP_BITS = 32


def _check_bits(bits) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not (1 <= bits <= 16 or bits == FP_BITS):
        raise ValueError(f"bits must be an int in [1, 16] or {FP_BITS} (full precision), got {bits!r}")
    return bits


def quant_levels(bits: int) -> int:
    """``n_b = 2^{b−1} − 1``: the largest integer level of the symmetric b-bit quantiser (1 for b = 1)."""
    return max(1, 2 ** (_check_bits(bits) - 1) - 1)


#: approximately MSE-optimal step of the symmetric (2^b − 1)-level uniform quantiser for a Gaussian, in units
#: of its standard deviation (ternary: threshold ≈ 0.6σ); above 8 bits the max-abs step is used
_STD_STEP = {2: 1.22, 3: 0.59, 4: 0.34, 5: 0.19, 6: 0.11, 7: 0.06, 8: 0.034}


def quant_scale(w: Tensor, bits: int) -> Tensor:
    """The step ``s = min(max|w| / n_b, k_b · std(w))`` (a 0-d tensor, never 0): max-abs unless that is much
    coarser than the Gaussian MSE-optimal step ``k_b σ`` (low bitwidths), in which case the range is clipped
    at ``n_b · s < max|w|``. For b = 1 the level is ``mean|w|`` (``Q = mean|w| · sign(w)``).

    A tensor already on a b-bit grid (``w / (max|w|/n_b)`` integer) keeps its step, so ``Q_b`` is idempotent."""
    w = w.detach()
    if _check_bits(bits) == 1:
        return w.abs().mean().clamp_min(1e-12)
    s = (w.abs().max() / quant_levels(bits)).clamp_min(1e-12)
    if bits in _STD_STEP and w.numel() > 1:
        k = w / s
        if not torch.allclose(k, k.round(), rtol=0, atol=1e-5):
            s = torch.minimum(s, _STD_STEP[bits] * w.std())
    return s.clamp_min(1e-12)


def quantized_step(q: Tensor, bits: int) -> Tensor:
    """The step of an already ``bits``-bit quantised tensor, ``max|q| / n_b`` (its top level is always used:
    the max-abs element, or the clipped ones, sit on ±n_b·s)."""
    return (q.detach().abs().max() / quant_levels(bits)).clamp_min(1e-12)


class _STEQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, scale):
        n = quant_levels(bits)
        if bits == 1:
            q = torch.where(w >= 0, 1.0, -1.0).to(w) * scale
        else:
            q = torch.clamp(torch.round(w / scale), -n, n) * scale
        ctx.save_for_backward(w.abs() <= n * scale * (1 + 1e-6))
        return q

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None


def quantize(w: Tensor, bits: int, scale: Optional[Tensor] = None) -> Tensor:
    """``Q_b(w)`` with the STE gradient (identity inside the clipping range ``|w| ≤ n_b·s``, zero outside).

    ``scale`` defaults to :func:`quant_scale`; ``bits = 32`` returns ``w`` itself."""
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {type(w).__name__}")
    if _check_bits(bits) == FP_BITS:
        return w
    scale = quant_scale(w, bits) if scale is None else scale
    return _STEQuantize.apply(w, bits, scale)


@torch.no_grad()
def stochastic_quantize(w: Tensor, bits: int, generator: torch.Generator, scale: Optional[Tensor] = None) -> Tensor:
    """Unbiased storage rounding: ``s · clamp(⌊w/s + u⌋, −n_b, n_b)``, ``u ~ U[0, 1)``, so ``E[Q(w)] = w`` inside
    the range (b = 1: ``±mean|w|`` with ``P(+) = (1 + w/mean|w|)/2``, clipped). No gradient (storage only)."""
    if _check_bits(bits) == FP_BITS:
        return w
    scale = quant_scale(w, bits) if scale is None else scale
    u = torch.rand(w.shape, generator=generator, dtype=w.dtype, device=w.device)
    if bits == 1:
        p_plus = ((1 + w / scale) / 2).clamp(0, 1)
        return torch.where(u < p_plus, scale, -scale).to(w)
    n = quant_levels(bits)
    return torch.clamp(torch.floor(w / scale + u), -n, n) * scale


def is_quantized_param(name: str, p: Tensor) -> bool:
    """Weight tensors (dense weights, Monarch factors) are quantised; biases (1-D) stay FP32."""
    return p.dim() >= 2


def quantize_state(state: dict[str, Tensor], bits: int, generator: Optional[torch.Generator] = None
                   ) -> dict[str, Tensor]:
    """``Q_b`` applied to every weight tensor of a state dict (biases untouched); with a ``generator`` the
    unbiased :func:`stochastic_quantize` (how a low-bit client stores what it receives and what it uploads)."""
    if _check_bits(bits) == FP_BITS:
        return dict(state)
    if generator is not None:
        return {n: stochastic_quantize(p.detach(), bits, generator) if is_quantized_param(n, p) else p
                for n, p in state.items()}
    return {n: quantize(p.detach(), bits) if is_quantized_param(n, p) else p for n, p in state.items()}
