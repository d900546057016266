"""The progressive dequantiser: a chain of residual Monarch-MLP blocks mapping b_i-bit weights towards
full precision, and its reconstruction + distillation loss."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MLP
from ..train import soft_cross_entropy
from .quantization import FP_BITS, _check_bits, is_quantized_param, quantize, quantized_step, stochastic_quantize
from .client import forward_with


class DequantBlock(nn.Module):
    """``x ↦ x + g(x)`` on chunks ``(N, chunk)``; g = MLP(chunk → hidden (Monarch) → chunk), last layer zero."""

    def __init__(self, chunk: int = 16, hidden: int = 64, nblocks: int = 4):
        super().__init__()
        self.g = MLP(chunk, hidden, chunk, depth=2, layer="monarch", nblocks=nblocks)
        last = self.g.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.g(x)


class ProgressiveDequantizer(nn.Module):
    """Chain ``bit_chain = (b_1 < b_2 < … < 32)`` of :class:`DequantBlock` s; block i maps b_i → b_{i+1}.

    ``forward(w, bits)`` dequantises a ``bits``-bit weight tensor of any shape: it is expressed in units of its
    quantisation step (``x = w / s``, ``s = max|w| / n_bits``), cut into ``chunk``-sized pieces (each tensor
    zero-padded on its own), passed through the blocks from ``bits`` on, and scaled back. ``bits = 32`` is
    returned unchanged. :meth:`dequantize_state` does all weight tensors of a state dict in one batch."""

    def __init__(self, bit_chain=(2, 4, 8, 32), chunk: int = 16, hidden: int = 64, nblocks: int = 4):
        super().__init__()
        chain = tuple(int(b) for b in bit_chain)
        if len(chain) < 2 or chain[-1] != FP_BITS or any(a >= b for a, b in zip(chain[:-1], chain[1:])):
            raise ValueError(f"bit_chain must increase strictly and end at {FP_BITS}, got {bit_chain}")
        for b in chain:
            _check_bits(b)
        self.bit_chain, self.chunk = chain, chunk
        self.blocks = nn.ModuleList([DequantBlock(chunk, hidden, nblocks) for _ in chain[:-1]])

    def stage_index(self, bits: int) -> int:
        if bits not in self.bit_chain:
            raise ValueError(f"bits={bits} is not in the dequantiser chain {self.bit_chain}")
        return self.bit_chain.index(bits)

    def chunks(self, tensors: list[Tensor], scales: list[Tensor]) -> Tensor:
        """``(N, chunk)``: every ``tensor / scale`` flattened, zero-padded to a multiple of ``chunk``, stacked."""
        rows = []
        for w, s in zip(tensors, scales):
            flat = (w / s).reshape(-1)
            rows.append(F.pad(flat, (0, (-flat.numel()) % self.chunk)).view(-1, self.chunk))
        return torch.cat(rows, 0)

    def unchunk(self, x: Tensor, like: list[Tensor], scales: list[Tensor]) -> list[Tensor]:
        out, r = [], 0
        for w, s in zip(like, scales):
            n = math.ceil(w.numel() / self.chunk)
            out.append((x[r:r + n].reshape(-1)[:w.numel()] * s).view_as(w))
            r += n
        return out

    def run_chain(self, x: Tensor, bits: int, stop: Optional[int] = None) -> Tensor:
        """Blocks ``stage_index(bits) .. stop−1`` applied to chunks ``x`` (in units of the step)."""
        for block in self.blocks[self.stage_index(bits):stop]:
            x = block(x)
        return x

    def forward(self, w: Tensor, bits: int, scale: Optional[Tensor] = None) -> Tensor:
        self.stage_index(bits)
        if bits == FP_BITS:
            return w
        scale = quantized_step(w, bits) if scale is None else scale
        return self.unchunk(self.run_chain(self.chunks([w], [scale]), bits), [w], [scale])[0]

    def dequantize_state(self, state: dict[str, Tensor], bits: int) -> dict[str, Tensor]:
        """``D`` applied to every weight tensor of a ``bits``-bit state dict (biases untouched), no grad."""
        if bits == FP_BITS:
            return dict(state)
        names = [n for n, p in state.items() if is_quantized_param(n, p)]
        ws = [state[n] for n in names]
        scales = [quantized_step(w, bits) for w in ws]
        with torch.no_grad():
            outs = self.unchunk(self.run_chain(self.chunks(ws, scales), bits), ws, scales)
        return {**state, **dict(zip(names, outs))}


def dequantizer_loss(deq: ProgressiveDequantizer, model: nn.Module, fp_state: dict[str, Tensor], bits: int,
                     buffer_x: Optional[Tensor] = None, kd_weight: float = 1.0, temperature: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Reconstruction (each stage b_i → b_{i+1} and end to end, in units of the ``bits`` step ``s``) of an FP
    client's weights from their ``bits``-bit quantisation, plus ``kd_weight`` × distillation on the buffer:
    ``T²·CE(softmax(f(x; w)/T), log_softmax(f(x; D(Q(w)))/T))`` (:func:`methods.train.soft_cross_entropy`, the
    KL of the module docstring plus the teacher's entropy: the same gradient).

    The chain input is ``Q_bits(w)`` stochastically rounded with ``generator`` (as low-bit clients store their
    uploads; deterministic without one); the stage targets are the deterministic ``Q_{b_{i+1}}(w)``."""
    i0 = deq.stage_index(bits)
    names = [n for n, p in fp_state.items() if is_quantized_param(n, p)]
    ws = [fp_state[n].detach() for n in names]
    q_in = [stochastic_quantize(w, bits, generator) if generator is not None else quantize(w, bits) for w in ws]
    scales = [quantized_step(q, bits) for q in q_in]  # the step D sees at inference
    levels = [deq.chunks(q_in, scales)] + [deq.chunks([quantize(w, b) for w in ws], scales)
                                           for b in deq.bit_chain[i0 + 1:]]  # last: FP / s
    rec = sum(F.mse_loss(deq.blocks[i0 + k](levels[k]), levels[k + 1]) for k in range(len(levels) - 1))
    out = deq.run_chain(levels[0], bits)
    rec = (rec + F.mse_loss(out, levels[-1])) / len(levels)
    if buffer_x is None or kd_weight == 0:
        return rec
    student_state = {**{n: p.detach() for n, p in fp_state.items()}, **dict(zip(names, deq.unchunk(out, ws, scales)))}
    with torch.no_grad():
        teacher = forward_with(model, {n: p.detach() for n, p in fp_state.items()}, buffer_x)
    student = forward_with(model, student_state, buffer_x)
    return rec + kd_weight * soft_cross_entropy(teacher, student, temperature) * temperature ** 2
