"""ProWD (Yoon, Park, Jeong & Hwang, ICML 2022): bitwidth-heterogeneous federated learning with progressive
weight dequantisation, on Flower (``flwr``) and on an in-process loop.

Setting (BHFL). Client k trains and stores its model at bitwidth b_k (here: half the clients at full precision,
half at a low bitwidth, e.g. 2–4 bits). Low-bit clients do quantisation-aware local training with a
straight-through estimator (STE) and upload quantised weights. Naive FedAvg of mixed bitwidths drags the
full-precision (FP) weights towards the few quantisation levels, which hurts the FP clients most.

Quantiser (symmetric, per tensor, uniform; the paper's exact quantiser is [unverified])::

    n_b = 2^{b−1} − 1,   s = min(max|w| / n_b, k_b·std(w)),   Q_b(w) = s · clamp(round(w / s), −n_b, n_b)
    (2^b − 1 ≤ 2^b levels; k_b ≈ the Gaussian MSE-optimal step, e.g. 1.22 for ternary b = 2, 0.34 for b = 4)
    ∂Q_b(w)/∂w := 1 inside the clipping range |w| ≤ n_b·s, 0 outside (STE)            b = 1: Q(w) = mean|w|·sign(w)

Weight tensors (``dim ≥ 2``: dense weights and Monarch factors ``w1, w2``) are quantised; biases stay FP32.

Server side, two components (no official code exists; the details below are our reading of the paper and are
marked [unverified]):

* **Progressive dequantiser** D = D_{b_{m−1}→32} ∘ … ∘ D_{b_1→b_2}: a chain of residual blocks
  ``x ↦ x + g_i(x)`` over fixed-size chunks of a weight tensor expressed in units of its quantisation step
  (``x = w / s``). A b_i-bit tensor enters the chain at block i. Each g_i is a small MLP with a Monarch hidden
  layer whose last layer is zero-initialised, so D starts as the identity. Trained on the server, concurrently
  with the rounds, on the FP clients' uploads w_k::

      L_rec = Σ_i ‖D_i(Q_{b_i}(w_k)/s) − Q_{b_{i+1}}(w_k)/s‖² + ‖D(Q_{b_1}(w_k)/s) − w_k/s‖²    (stage + end-to-end)
      L_kd  = KL( f(x; w_k) ‖ f(x; D(Q_{b_1}(w_k))) )   on a small server buffer x (100 samples by default)

  (``Q_{b_1}`` of the chain input is stochastically rounded, as the low-bit uploads are; one FP client per
  Adam step, ``deq_steps`` steps per round.)

* **Selective weight aggregation (SWA)**: for every weight tensor and low-bit client j, a binary mask m_j keeps
  the elements whose update agrees with the FP clients', chosen to maximise ``cos(m_j ⊙ Δ_j, Δ_FP)``: Δ_FP is
  the sample-weighted mean update of the FP clients from the previous global model w_g⁻ and Δ_j = w̃_j − w_g⁻
  the (dequantised) update of client j (its stored start is an unbiased rounding of w_g⁻). The paper learns the
  mask from per-element scores with a straight-through estimator; we take the exact maximiser over score
  thresholds (:func:`swa_masks`). Only the kept elements of low-bit clients enter the FP average::

      w_g = (Σ_{k∈FP} n_k w_k + Σ_{j∈low} n_j m_j ⊙ w̃_j) / (Σ_{k∈FP} n_k + Σ_{j∈low} n_j m_j)   (element-wise)

  with w̃_j = D(w_j) (ProWD) or w_j (SWA only). Low-bit clients then receive w_g and store it at their bitwidth.

Baselines: **FedAvg** (all clients, m ≡ 1, w̃ = w) and **GroupedAvg** (FedAvg inside each bitwidth group,
one model per group). Ablations: **DEQ only** (w̃ = D(w_j), m ≡ 1) and **SWA only** (w̃ = w_j, SWA masks).

Engines. :class:`ProWDServer` holds the algorithm; :func:`run_inprocess` drives it with a plain loop (tests,
fast sweeps) and :func:`run_flower` drives the same server through a Flower ``Strategy``
(:class:`FlowerProWDStrategy`) in a Ray simulation (``flwr.simulation.run_simulation``). Clients get
deterministic per-(seed, round, client) generators, so both engines give the same numbers.
"""
from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .data import dirichlet_split, load_image_dataset
from .models import MLP
from .recipe import Recipe, RunContext, option, seed_list
from .report import Panel, aggregate, curve_band, paired, plot_curves

FP_BITS = 32
METHODS = ("fedavg", "grouped", "deq", "swa", "prowd")
METHOD_LABELS = {"fedavg": "FedAvg", "grouped": "GroupedAvg", "deq": "DEQ only", "swa": "SWA only",
                 "prowd": "ProWD"}


# --------------------------------------------------------------------------------------------------
# Non-IID split
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Quantisation with a straight-through estimator
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Clients: model and quantisation-aware local training
# --------------------------------------------------------------------------------------------------
def make_client_model(in_features: int, n_classes: int = 10, hidden: int = 256, nblocks: int = 4) -> nn.Module:
    """``in → hidden (dense) → hidden (Monarch) → classes (dense)``: :class:`methods.models.MLP` with Monarch
    hidden layers (the Monarch factors ``w1, w2`` are quantised like any weight)."""
    return MLP(in_features, hidden, n_classes, depth=2, layer="monarch", nblocks=nblocks)


def forward_with(model: nn.Module, state: dict[str, Tensor], x: Tensor, bits: int = FP_BITS) -> Tensor:
    """``model(x)`` with parameters ``state``, weight tensors passed through ``Q_bits`` (STE) if ``bits < 32``."""
    params = {n: quantize(p, bits) if (bits != FP_BITS and is_quantized_param(n, p)) else p
              for n, p in state.items()}
    return functional_call(model, params, (x,))


def client_generator(seed: int, rnd: int, cid: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rnd) * 1009 + int(cid))


def local_train(model: nn.Module, received: dict[str, Tensor], x: Tensor, y: Tensor, bits: int, *, epochs: int = 2,
                lr: float = 1e-3, batch_size: int = 32, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Local training of one client from the received global weights.

    A low-bit client stores the received model at its bitwidth, trains latent weights from it with
    quantisation-aware training (forward through the deterministic ``Q_b``, STE backward) and uploads its weights
    at its bitwidth again; both storage steps use unbiased stochastic rounding (with deterministic rounding a
    2-bit client whose local updates are smaller than half a step would round them all away every round).
    An FP client trains and uploads plain FP32 weights. Adam, cross-entropy, ``epochs`` mini-batch passes."""
    _check_bits(bits)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must have the same non-zero length, got {tuple(x.shape)} and {tuple(y.shape)}")
    generator = generator or torch.Generator().manual_seed(0)
    start = quantize_state(received, bits, generator)
    latent = {n: p.detach().clone().requires_grad_(True) for n, p in start.items()}
    opt = torch.optim.Adam(latent.values(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(forward_with(model, latent, x[idx], bits), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return quantize_state({n: p.detach() for n, p in latent.items()}, bits, generator)


@dataclass
class ClientUpdate:
    """What a client uploads: its weights (quantised for low-bit clients), sample count, bitwidth and id."""

    state: dict[str, Tensor]
    n_samples: int
    bits: int
    cid: int = 0


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------
def weighted_average(states: list[dict[str, Tensor]], weights) -> dict[str, Tensor]:
    """``Σ_k n_k w_k / Σ_k n_k`` per tensor (FedAvg); ``weights`` are sample counts."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    w = w / w.sum()
    return {n: sum(wk.to(states[0][n].dtype) * s[n] for wk, s in zip(w, states)) for n in states[0]}


def masked_average(fp: list[tuple[dict, float]], low: list[tuple[dict, float, dict]]) -> dict[str, Tensor]:
    """Element-wise ``(Σ_FP n_k w_k + Σ_low n_j m_j ⊙ w_j) / (Σ_FP n_k + Σ_low n_j m_j)``.

    ``fp``: (state, n) pairs; ``low``: (state, n, masks) with masks {name: 0/1 tensor} (missing name: all ones).
    Elements with zero total weight (no FP client and every mask 0) fall back to the plain low-bit average."""
    names = (fp or low)[0][0].keys()
    out = {}
    for n in names:
        num = sum(float(c) * s[n] for s, c in fp) if fp else 0.0
        den = sum(float(c) for _, c in fp) if fp else 0.0
        plain = 0.0
        for s, c, masks in low:
            m = masks.get(n)
            m = torch.ones_like(s[n]) if m is None else m.to(s[n])
            num = num + float(c) * m * s[n]
            den = den + float(c) * m
            plain = plain + float(c) * s[n]
        den = den if isinstance(den, Tensor) else torch.full_like(next(iter(fp or low))[0][n], den)
        fallback = plain / sum(float(c) for _, c, _ in low) if low else torch.zeros_like(den)
        out[n] = torch.where(den > 0, num / den.clamp_min(1e-30), fallback)
    return out


def swa_masks(delta_low: Tensor, delta_high: Tensor) -> Tensor:
    """Binary masks ``m_j`` maximising ``cos(m_j ⊙ Δ_low[j], Δ_high)`` for a stack ``delta_low (J, *shape)`` of
    low-bit updates against one high-bit update ``delta_high (*shape)``.

    Score of an element: ``r_i = Δ_high,i / Δ_low,i``. Only sign-agreeing elements (``r_i > 0``) can raise the
    cosine; with ``x_i = Δ_low,i²`` the cosine of a kept set is ``Σ x_i r_i / √(Σ x_i) / ‖Δ_high‖``, so the masks
    keep the top-k elements by score, with k chosen by scanning the cosine of every prefix (exact in the
    continuous relaxation; the paper learns the mask from scores with a straight-through estimator [unverified],
    which approximates the same maximiser). Elements with a zero low-bit update are kept (they do not change the
    cosine); a client with a zero update, or a zero high-bit update, keeps everything (plain FedAvg)."""
    if delta_low.dim() < 1 or tuple(delta_low.shape[1:]) != tuple(delta_high.shape):
        raise ValueError(f"delta_low must be (J, *{tuple(delta_high.shape)}), got {tuple(delta_low.shape)}")
    J = delta_low.shape[0]
    a = delta_low.detach().reshape(J, -1).double()
    b = delta_high.detach().reshape(1, -1).double().expand_as(a)
    masks = torch.ones_like(a)
    if float(b[0].norm()) == 0:
        return masks.to(delta_low.dtype).view_as(delta_low)
    prod = a * b
    score = torch.where(prod > 0, b / torch.where(a == 0, torch.ones_like(a), a), torch.full_like(a, -1.0))
    order = score.argsort(dim=1, descending=True)
    num = prod.gather(1, order).clamp_min(0).cumsum(1)
    den = (a * a).gather(1, order).cumsum(1).clamp_min(1e-300).sqrt()
    valid = score.gather(1, order) > 0
    cos = torch.where(valid, num / den, torch.full_like(num, -math.inf))
    k = cos.argmax(dim=1) + 1  # best prefix length (≥ 1)
    keep_sorted = torch.arange(a.shape[1]).unsqueeze(0) < k.unsqueeze(1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted) & (prod > 0)
    masks = (keep | (a == 0)).double()
    masks[a.norm(dim=1) == 0] = 1
    return masks.to(delta_low.dtype).view_as(delta_low)


def swa_mask(delta_low: Tensor, delta_high: Tensor) -> Tensor:
    """:func:`swa_masks` for a single low-bit update (same shape as ``delta_high``)."""
    if delta_low.shape != delta_high.shape:
        raise ValueError(f"delta_low {tuple(delta_low.shape)} and delta_high {tuple(delta_high.shape)} must match")
    return swa_masks(delta_low.unsqueeze(0), delta_high)[0]


# --------------------------------------------------------------------------------------------------
# Progressive dequantiser
# --------------------------------------------------------------------------------------------------
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
    client's weights from their ``bits``-bit quantisation, plus ``kd_weight`` × distillation on the buffer.

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
        teacher = F.softmax(forward_with(model, {n: p.detach() for n, p in fp_state.items()}, buffer_x) / temperature, -1)
    student = F.log_softmax(forward_with(model, student_state, buffer_x) / temperature, -1)
    return rec + kd_weight * F.kl_div(student, teacher, reduction="batchmean") * temperature ** 2


# --------------------------------------------------------------------------------------------------
# The server (algorithm), shared by both engines
# --------------------------------------------------------------------------------------------------
class ProWDServer:
    """Server state and aggregation of one method in :data:`METHODS`.

    ``payload(bits)``: the model a client of that bitwidth receives (the group model for GroupedAvg, else the FP
    global; low-bit clients quantise it on receipt). ``aggregate(updates)``: one round. ``group_models()``: the
    deployed model of every bitwidth (``Q_b`` of the global for low-bit groups)."""

    def __init__(self, method: str, model: nn.Module, init_state: dict[str, Tensor], bits_present, *,
                 buffer_x: Optional[Tensor] = None, bit_chain=(2, 4, 8, 32), deq_steps: int = 10,
                 deq_lr: float = 1e-3, kd_weight: float = 1.0, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.model = method, model
        self.bits_present = sorted(set(int(b) for b in bits_present))
        self.global_state = {n: p.detach().clone() for n, p in init_state.items()}
        self.group_state = {b: dict(self.global_state) for b in self.bits_present}
        self.buffer_x, self.deq_steps, self.kd_weight = buffer_x, deq_steps, kd_weight
        self.uses_deq = method in ("deq", "prowd")
        self.uses_swa = method in ("swa", "prowd")
        self.deq = None
        if self.uses_deq:
            low = [b for b in self.bits_present if b != FP_BITS]
            chain = tuple(b for b in bit_chain)
            missing = [b for b in low if b not in chain]
            if missing:
                raise ValueError(f"low bitwidths {missing} are not in bit_chain {chain}")
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.deq = ProgressiveDequantizer(chain)
            self.deq_opt = torch.optim.Adam(self.deq.parameters(), lr=deq_lr)
            self._deq_counter = 0
            self.gen = torch.Generator().manual_seed(seed)
        self.stats: dict[str, list] = {"mask_keep": [], "deq_loss": []}

    def payload(self, bits: int) -> dict[str, Tensor]:
        if self.method == "grouped":
            return self.group_state.get(bits, self.global_state)
        return self.global_state

    def group_models(self) -> dict[int, dict[str, Tensor]]:
        if self.method == "grouped":
            return {b: quantize_state(self.group_state[b], b) for b in self.bits_present}
        return {b: quantize_state(self.global_state, b) for b in self.bits_present}

    def _train_dequantizer(self, fp_states, low_bits) -> None:
        # one FP client's weights per step, cycling through the FP clients of the round
        for step in range(self.deq_steps):
            st = fp_states[(self._deq_counter + step) % len(fp_states)]
            loss = sum(dequantizer_loss(self.deq, self.model, st, b, self.buffer_x, self.kd_weight,
                                        generator=self.gen) for b in low_bits)
            self.deq_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.deq_opt.step()
        self._deq_counter += self.deq_steps
        self.stats["deq_loss"].append(loss.item())

    def aggregate(self, updates: list[ClientUpdate]) -> dict[str, Tensor]:
        if not updates:
            raise ValueError("aggregate needs at least one client update")
        updates = sorted(updates, key=lambda u: u.cid)
        prev = self.global_state
        fp = [u for u in updates if u.bits == FP_BITS]
        low = [u for u in updates if u.bits != FP_BITS]
        if self.method == "grouped":
            for b in self.bits_present:
                grp = [u for u in updates if u.bits == b]
                if grp:
                    self.group_state[b] = weighted_average([u.state for u in grp], [u.n_samples for u in grp])
            self.global_state = self.group_state.get(FP_BITS, self.group_state[self.bits_present[0]])
            return self.global_state
        if self.method == "fedavg" or not fp or not low:  # single-bitwidth rounds reduce to FedAvg
            self.global_state = weighted_average([u.state for u in updates], [u.n_samples for u in updates])
            return self.global_state
        low_bits = sorted(set(u.bits for u in low))
        if self.uses_deq:
            self._train_dequantizer([u.state for u in fp], low_bits)
            low_states = [self.deq.dequantize_state(u.state, u.bits) for u in low]
        else:
            low_states = [u.state for u in low]
        masks_all = [{} for _ in low]
        if self.uses_swa:
            d_fp = weighted_average([u.state for u in fp], [u.n_samples for u in fp])
            kept, total = 0.0, 0
            for n, w in prev.items():
                if not is_quantized_param(n, w):
                    continue
                # a low-bit client starts from an unbiased (stochastic) rounding of the previous global model
                d_low = torch.stack([st[n] - w for st in low_states])
                masks = swa_masks(d_low, d_fp[n] - w)
                for j in range(len(low)):
                    masks_all[j][n] = masks[j]
                kept += float(masks.sum())
                total += masks.numel()
            self.stats["mask_keep"].append(kept / max(total, 1))
        self.global_state = masked_average([(u.state, u.n_samples) for u in fp],
                                           [(st, u.n_samples, mk) for u, st, mk in zip(low, low_states, masks_all)])
        return self.global_state


@torch.no_grad()
def accuracy(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((forward_with(model, state, x).argmax(-1) == y).float().mean())


def evaluate_groups(server: ProWDServer, x: Tensor, y: Tensor) -> dict[int, float]:
    """Test accuracy of the model deployed to every bitwidth group."""
    return {b: accuracy(server.model, st, x, y) for b, st in server.group_models().items()}


# --------------------------------------------------------------------------------------------------
# Federation setup and engines
# --------------------------------------------------------------------------------------------------
@dataclass
class Federation:
    """Client data (flattened inputs), bitwidths, the server buffer and the test set."""

    client_x: list[Tensor]
    client_y: list[Tensor]
    client_bits: list[int]
    buffer_x: Tensor
    test_x: Tensor
    test_y: Tensor
    in_features: int
    hidden: int = 256
    nblocks: int = 4

    def new_model(self) -> nn.Module:
        return make_client_model(self.in_features, 10, self.hidden, self.nblocks)


def make_federation(dataset: str = "digits", n_clients: int = 10, alpha: float = 0.5, low_bits: int = 2,
                    low_fraction: float = 0.5, buffer_size: int = 100, seed: int = 0, hidden: int = 256,
                    nblocks: int = 4) -> Federation:
    """Dirichlet(α) split of the training set over ``n_clients``; the first ``round(low_fraction·K)`` clients
    (by id) are low-bit, the rest FP32. The server buffer is ``buffer_size`` training samples held out from the
    clients (stratified draw from the same split)."""
    data = load_image_dataset(dataset, seed).flat()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.x_train), generator=gen)
    buf, rest = perm[:buffer_size], perm[buffer_size:]
    parts = dirichlet_split(data.y_train[rest], n_clients, alpha, gen)
    n_low = int(round(low_fraction * n_clients))
    bits = [low_bits] * n_low + [FP_BITS] * (n_clients - n_low)
    return Federation([data.x_train[rest[p]] for p in parts], [data.y_train[rest[p]] for p in parts], bits,
                      data.x_train[buf], data.x_test, data.y_test, data.x_train.shape[1], hidden, nblocks)


def _init_state(fed: Federation, seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return {n: p.detach().clone() for n, p in fed.new_model().named_parameters()}


def _make_server(method: str, fed: Federation, seed: int, **server_kw) -> ProWDServer:
    return ProWDServer(method, fed.new_model(), _init_state(fed, seed), fed.client_bits, buffer_x=fed.buffer_x,
                       seed=seed, **server_kw)


def _settings(server: ProWDServer, local_epochs: int, lr: float) -> dict:
    """What an engine ran with: client model width, server buffer, dequantiser steps (read from the server) and
    the local training settings it passed to every client."""
    return {"hidden": server.model.net[0].out_features, "buffer": len(server.buffer_x),
            "deq_steps": server.deq_steps, "local_epochs": local_epochs, "lr": lr}


def run_inprocess(method: str, fed: Federation, rounds: int, *, seed: int = 0, local_epochs: int = 2,
                  lr: float = 1e-3, batch_size: int = 32, progress=None, **server_kw) -> dict:
    """The plain FL loop: every round every client trains locally from its payload, the server aggregates.
    Returns ``{"server", "history": [{bits: acc}] per round}``."""
    server = _make_server(method, fed, seed, **server_kw)
    model = fed.new_model()
    history = []
    rng = progress(range(rounds), desc=METHOD_LABELS[method]) if progress else range(rounds)
    for rnd in rng:
        updates = []
        for cid, (x, y, b) in enumerate(zip(fed.client_x, fed.client_y, fed.client_bits)):
            st = local_train(model, server.payload(b), x, y, b, epochs=local_epochs, lr=lr, batch_size=batch_size,
                             generator=client_generator(seed, rnd + 1, cid))
            updates.append(ClientUpdate(st, len(x), b, cid))
        server.aggregate(updates)
        history.append(evaluate_groups(server, fed.test_x, fed.test_y))
    return {"server": server, "history": history, "settings": _settings(server, local_epochs, lr)}


# ---- Flower ------------------------------------------------------------------------------------------------
def _state_to_ndarrays(state: dict[str, Tensor]) -> list[np.ndarray]:
    return [p.detach().cpu().numpy() for p in state.values()]


def _ndarrays_to_state(names: list[str], arrays) -> dict[str, Tensor]:
    return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)}


def _flower_client_fn(spec: dict, context):
    """Flower ``ClientApp`` factory: client ``partition-id`` with its data and bitwidth (runs in a Ray actor)."""
    from flwr.client import NumPyClient

    torch.set_num_threads(1)
    cid = int(context.node_config["partition-id"])
    x, y, bits = spec["x"][cid], spec["y"][cid], spec["bits"][cid]
    torch.manual_seed(0)
    model = make_client_model(spec["in_features"], 10, spec["hidden"], spec["nblocks"])
    names = [n for n, _ in model.named_parameters()]

    class _Client(NumPyClient):
        def fit(self, parameters, config):
            st = local_train(model, _ndarrays_to_state(names, parameters), torch.from_numpy(x), torch.from_numpy(y),
                             bits, epochs=int(config["epochs"]), lr=float(config["lr"]),
                             batch_size=int(config["batch_size"]),
                             generator=client_generator(int(config["seed"]), int(config["round"]), cid))
            return _state_to_ndarrays(st), len(x), {"cid": cid, "bits": bits}

    return _Client().to_client()


def _flower_strategy_class():
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class FlowerProWDStrategy(Strategy):
        """A Flower ``Strategy`` around :class:`ProWDServer`: every round samples all clients, sends each the
        payload of its bitwidth group (known from its first upload; round 1 sends the common initial model),
        aggregates with the server's method and evaluates every group centrally on the test set."""

        def __init__(self, server: ProWDServer, fed: Federation, n_clients: int, fit_config: dict):
            self.server, self.fed, self.n_clients, self.fit_config = server, fed, n_clients, fit_config
            self.names = list(server.global_state)
            self.bits_of: dict[str, int] = {}
            self.history: list[dict[int, float]] = []

        def initialize_parameters(self, client_manager):
            return ndarrays_to_parameters(_state_to_ndarrays(self.server.global_state))

        def configure_fit(self, server_round, parameters, client_manager):
            clients = client_manager.sample(num_clients=self.n_clients, min_num_clients=self.n_clients)
            cfg = {**self.fit_config, "round": server_round}
            out = []
            for c in clients:
                st = self.server.payload(self.bits_of.get(c.cid, FP_BITS))
                out.append((c, FitIns(ndarrays_to_parameters(_state_to_ndarrays(st)), cfg)))
            return out

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"ProWD: {len(failures)} clients failed in round {server_round}: {failures[:1]}")
            updates = []
            for proxy, res in results:
                bits = int(res.metrics["bits"])
                self.bits_of[proxy.cid] = bits
                updates.append(ClientUpdate(_ndarrays_to_state(self.names, parameters_to_ndarrays(res.parameters)),
                                            int(res.num_examples), bits, int(res.metrics["cid"])))
            self.server.aggregate(updates)
            return ndarrays_to_parameters(_state_to_ndarrays(self.server.global_state)), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            if server_round == 0:
                return None
            accs = evaluate_groups(self.server, self.fed.test_x, self.fed.test_y)
            self.history.append(accs)
            return 0.0, {f"acc_{b}bit": a for b, a in accs.items()}

    return FlowerProWDStrategy


def run_flower(method: str, fed: Federation, rounds: int, *, seed: int = 0, local_epochs: int = 2, lr: float = 1e-3,
               batch_size: int = 32, **server_kw) -> dict:
    """The same federation on Flower: ``flwr.simulation.run_simulation`` with one Ray actor on one CPU, the
    ProWD server as a Flower ``Strategy`` and every client a ``NumPyClient`` doing :func:`local_train`."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        from flwr.client import ClientApp
        from flwr.server import ServerApp, ServerAppComponents, ServerConfig
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise ImportError("the Flower engine needs flwr with simulation: pip install 'flwr[simulation]'") from exc
    server = _make_server(method, fed, seed, **server_kw)
    n = len(fed.client_x)
    strategy = _flower_strategy_class()(server, fed, n, {"epochs": local_epochs, "lr": lr, "batch_size": batch_size,
                                                         "seed": seed})
    spec = {"x": [x.numpy() for x in fed.client_x], "y": [y.numpy() for y in fed.client_y],
            "bits": list(fed.client_bits), "in_features": fed.in_features, "hidden": fed.hidden,
            "nblocks": fed.nblocks}

    def server_fn(context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    run_simulation(ServerApp(server_fn=server_fn), ClientApp(client_fn=functools.partial(_flower_client_fn, spec)),
                   num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1, "include_dashboard": False,
                                                 "log_to_driver": False}})
    if len(strategy.history) != rounds:
        raise RuntimeError(f"Flower simulation finished {len(strategy.history)} of {rounds} rounds")
    return {"server": server, "history": strategy.history, "settings": _settings(server, local_epochs, lr)}


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    dataset: str = option("digits", "image dataset", choices=("digits", "mnist"))
    engine: str = option("inprocess", "run the federation in-process or on Flower (Ray simulation)",
                         choices=("inprocess", "flower"))
    flower_check: bool = option(True, "also run ProWD (first seed) on Flower and compare with the in-process run")
    methods: tuple[str, ...] = option(METHODS, "methods to compare", choices=METHODS)
    clients: int = option(10, "number of clients")
    alpha: float = option(0.5, "Dirichlet concentration of the label split")
    low_bits: int = option(2, "bitwidth of the low-precision clients")
    low_fraction: float = option(0.5, "share of low-precision clients")
    bit_chain: tuple[int, ...] = option((2, 4, 8, 32), "dequantiser chain (must contain --low-bits)")
    rounds: int = option(25, "FL rounds")
    local_epochs: int = option(2, "local epochs per round")
    lr: float = option(3e-3, "local Adam learning rate")
    hidden: int = option(128, "client MLP width (Monarch hidden layer)")
    buffer: int = option(100, "server buffer size (distillation)")
    deq_steps: int = option(10, "dequantiser Adam steps per round")
    kd_weight: float = option(1.0, "weight of the dequantiser's distillation term")
    seeds: int = option(3, "number of seeds (seed, seed+1, ...)")

    def __post_init__(self):
        if self.low_bits not in self.bit_chain:
            raise ValueError(f"--low-bits {self.low_bits} must be in --bit-chain {self.bit_chain}")


QUICK = {"rounds": 4, "seeds": 1, "flower_check": False, "hidden": 64, "buffer": 30, "deq_steps": 2, "lr": 1e-2}


def run(cfg: Config, ctx: RunContext) -> dict:
    server_kw = dict(bit_chain=cfg.bit_chain, deq_steps=cfg.deq_steps, kd_weight=cfg.kd_weight)
    train_kw = dict(local_epochs=cfg.local_epochs, lr=cfg.lr)
    engine = run_flower if cfg.engine == "flower" else run_inprocess
    lb, k_last = cfg.low_bits, min(5, cfg.rounds)
    per_seed, histories = [], {m: [] for m in cfg.methods}
    for seed in seed_list(ctx.seed, cfg.seeds):
        fed = make_federation(cfg.dataset, cfg.clients, cfg.alpha, cfg.low_bits, cfg.low_fraction, cfg.buffer, seed,
                              cfg.hidden)
        ctx.log(f"[prowd] seed {seed}: {cfg.clients} clients (Dirichlet α={cfg.alpha}), bits {fed.client_bits}, "
                f"samples {[len(x) for x in fed.client_x]}; {cfg.rounds} rounds, engine {cfg.engine}")
        row = {}
        for method in cfg.methods:
            res = engine(method, fed, cfg.rounds, seed=seed, **train_kw, **server_kw,
                         **({} if engine is run_flower else {"progress": ctx.progress}))
            h = histories[method]
            h.append(res["history"])
            # accuracies averaged over the last k_last rounds (single rounds fluctuate under non-IID mixing)
            fp, lo = (statistics.fmean(r[b] for r in res["history"][-k_last:]) for b in (FP_BITS, lb))
            row[METHOD_LABELS[method]] = {"fp32_acc": fp, f"{lb}bit_acc": lo, "mean_acc": (fp + lo) / 2,
                                          "final_round_fp32_acc": res["history"][-1][FP_BITS],
                                          f"final_round_{lb}bit_acc": res["history"][-1][lb],
                                          **{k: statistics.fmean(v) for k, v in res["server"].stats.items() if v}}
            ctx.observe(rounds=len(res["history"]), **res["settings"])
            ctx.log(f"[prowd] seed {seed} {METHOD_LABELS[method]:10s} FP32 {fp:.3f}  {lb}-bit {lo:.3f}")
        per_seed.append(row)
    ctx.observe(seeds=len(per_seed))
    summary = {m: aggregate([r[m] for r in per_seed]) for m in per_seed[0]}
    comparisons = {f"{a}_minus_{b}": {k: paired([r[a][k] for r in per_seed], [r[b][k] for r in per_seed])
                                      for k in ("fp32_acc", f"{lb}bit_acc", "mean_acc")}
                   for a, b in (("ProWD", "FedAvg"), ("ProWD", "GroupedAvg")) if {a, b} <= set(summary)}
    metrics = {"dataset": cfg.dataset, "engine": cfg.engine, "seeds": seed_list(ctx.seed, cfg.seeds),
               "accuracy_over_last_rounds": k_last, "summary": summary, "paired": comparisons, "per_seed": per_seed}
    if cfg.flower_check and cfg.engine == "inprocess" and "prowd" in cfg.methods:
        fed = make_federation(cfg.dataset, cfg.clients, cfg.alpha, cfg.low_bits, cfg.low_fraction, cfg.buffer,
                              ctx.seed, cfg.hidden)
        fl = run_flower("prowd", fed, cfg.rounds, seed=ctx.seed, **train_kw, **server_kw)
        ref = histories["prowd"][0]
        diff = max(abs(g[b] - r[b]) for g, r in zip(fl["history"], ref) for b in r)
        metrics["flower_check"] = {"method": "ProWD", "seed": ctx.seed, "rounds_compared": len(fl["history"]),
                                   "max_abs_accuracy_diff_all_rounds": diff}
        ctx.log(f"[prowd] Flower check (ProWD, seed {ctx.seed}): max |Δacc| over rounds and groups = {diff:.4f}")
    ctx.observe(flower_check="flower_check" in metrics)
    plot_curves(ctx.plot_path("prowd.png"), [
        Panel(f"{'FP32' if b == FP_BITS else f'{b}-bit'} clients: test accuracy of their model",
              {METHOD_LABELS[m]: curve_band([[r[b] for r in run] for run in runs]) for m, runs in histories.items()},
              xlabel="round", ylabel="accuracy") for b in (FP_BITS, lb)])
    return metrics


RECIPE = Recipe("prowd", Config, run, quick=QUICK,
                description="ProWD: bitwidth-heterogeneous FL (QAT low-bit clients), progressive dequantiser + "
                            "selective weight aggregation vs FedAvg / GroupedAvg, on Flower or in-process")
