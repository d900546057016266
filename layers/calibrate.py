"""Activation-aware conversion: structured factors fitted to a dense layer's outputs on real inputs.

Projection (:func:`monarch_kernels.project`) minimises ``‖M − W‖_F``, which weighs every input direction
alike. A trained layer only ever sees its inputs ``X (in, T)``, whose energy sits in a few directions, so what
matters is the output error

    E(M) = ‖(M − W) X‖_F² / T = tr((M − W) C (M − W)ᵀ),      C = X Xᵀ / T   (in × in, the inputs' second moment).

The fit minimises the *damped* error ``tr((M − W) C_δ (M − W)ᵀ)`` with ``C_δ = C + δ·mean(diag C)·I``, i.e. the
output error plus ``δ·mean(diag C)·‖M − W‖_F²``: ``δ → ∞`` gives back the Frobenius projection, ``δ = 0`` trusts
the calibration inputs completely; the ridge keeps directions the calibration text never excited close to
the pretrained weight (the damped second moment of "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Frantar et al., ICLR 2023, §4, and the data whitening of "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression", Wang et al., ICLR 2025, §3.1, applied to Monarch factors).

Monarch ``M = P2 · BD(w2) · P1 · BD(w1)`` (SPEC layout, ``w1 (k, q, p)``, ``w2 (l, s, r)``):

1. **Start**: whiten by the block-diagonal part of ``C_δ``. With ``C_kk = L_k L_kᵀ`` (Cholesky of the ``p × p``
   diagonal blocks), ``M · BD(L)`` is again Monarch (``BD(w1)·BD(L) = BD(w1 L)``), so
   ``(v1, v2) = project(W · BD(L))`` and ``w1[kk] = v1[kk] L_k⁻¹``, ``w2 = v2``. This is the exact optimum when
   ``C_δ`` is block diagonal (Dao et al., ICML 2022, "Monarch", §3.3 for the projection it builds on).
2. **Alternating least squares** on the full ``C_δ``; every step is an exact minimisation, so the error never
   increases:
   * ``w2`` given ``w1``: output block ``ll`` is ``w2[ll] · A_ll`` with ``A_ll`` the rows of ``BD(w1)`` that P1
     routes to stage-2 block ``ll``; ``w2[ll] = W_ll C_δ A_llᵀ (A_ll C_δ A_llᵀ)⁻¹`` (``W_ll``: the output rows
     ``ss·l + ll``).
   * ``w1`` one block at a time given the rest: with ``B = P2 · BD(w2) · P1`` and ``B_k`` its columns of stage-1
     block ``kk``, the residual ``E = M − W`` changes by ``B_k Δ S_k`` and the minimiser is
     ``Δ = −(B_kᵀ B_k)⁻¹ B_kᵀ E C_δ[:, kk] (C_δ[kk, kk])⁻¹`` (block Gauss–Seidel).

Block-diagonal ``BD(w)`` (``BlockdiagLinear``): output block ``kk`` sees input block ``kk`` only, so the optimum is
the regression ``w[kk] = W_kk C_δ[:, kk] (C_δ[kk, kk])⁻¹`` in closed form (``W_kk``: output rows of block ``kk``).

Ragged sizes follow ``MonarchLinear``: inputs are zero-padded (zero rows and columns of ``C``, kept positive by
the ridge) and padded outputs are left out of the error.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monarch_kernels import monarch_factor_shapes, project

#: default ridge ``δ`` (relative to the mean input energy ``mean(diag C)``)
DAMPING = 0.01
#: default number of alternating-least-squares sweeps for Monarch factors
SWEEPS = 5


def call_model(model: nn.Module, batch: Any):
    """Run ``model`` on one batch: a mapping is passed as keyword arguments (``model(**batch)``, e.g. a
    tokenizer's output), a tuple or list as positional arguments, anything else as the single argument.

    Args:
        model: the model to call.
        batch: one batch of inputs.
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def input_second_moments(model: nn.Module, names: Iterable[str], batches: Iterable, *, progress: bool = False
                         ) -> dict[str, Tensor]:
    """Second moment ``C = X Xᵀ / T`` (float64, ``(in, in)``) of the inputs each named submodule receives while
    ``model`` runs on ``batches`` in eval mode (its mode is restored afterwards), without gradients.

    Every token position counts (padding included: calibrate on unpadded batches for the cleanest statistics).

    Args:
        model: the model to run.
        names: module paths (as ``model.get_submodule`` takes them) whose inputs are recorded.
        batches: iterable of model inputs (see :func:`call_model`), read once.
        progress: show a tqdm progress bar.

    Returns:
        ``{name: C}``.

    Raises:
        ValueError: a module received no input.
    """
    names = list(names)
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def pre(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            sums[name] = flat.T @ flat + (sums[name] if name in sums else 0)
            counts[name] += flat.shape[0]
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    empty = [n for n in names if counts[n] == 0]
    if empty:
        raise ValueError(f"calibrate: layers {empty} received no input from the calibration batches "
                         "(empty batches, or the layers are not used by forward)")
    return {n: sums[n] / counts[n] for n in names}


def damped(second_moment: Tensor, size: int, damping: float) -> Tensor:
    """The damped second moment ``C_δ``: ``C`` zero-padded to ``size × size`` plus ``damping · mean(diag C) · I``
    (float64).

    Args:
        second_moment: ``C (n, n)``.
        size: padded size ``>= n``.
        damping: ``δ > 0``.
    """
    if damping <= 0:
        raise ValueError(f"damping must be > 0 (the ridge keeps the fit well posed), got {damping}")
    C = second_moment.double()
    pad = size - C.shape[0]
    scale = C.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    return F.pad(C, (0, pad, 0, pad)) + damping * scale * torch.eye(size, dtype=C.dtype, device=C.device)


def output_error(approx: Tensor, weight: Tensor, second_moment: Tensor) -> float:
    """Relative output error ``sqrt(tr(E C Eᵀ) / tr(W C Wᵀ))`` with ``E = approx − weight``: that is
    ``‖(M − W) X‖_F / ‖W X‖_F`` on the inputs whose second moment is ``C``.

    Args:
        approx: ``M (out, in)``.
        weight: ``W (out, in)``.
        second_moment: ``C (in, in)``.
    """
    C = second_moment.double()
    E, W = approx.detach().double() - weight.detach().double(), weight.detach().double()
    return float(((E @ C) * E).sum().clamp_min(0).sqrt() / ((W @ C) * W).sum().clamp_min(1e-300).sqrt())


def _check(weight: Tensor, second_moment: Tensor, fn: str) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be a floating-point 2-D (out, in) tensor, got {weight!r:.80}")
    n = weight.shape[1]
    if not isinstance(second_moment, Tensor) or tuple(second_moment.shape) != (n, n):
        raise ValueError(f"{fn}: second_moment must be an ({n}, {n}) tensor (in × in), got "
                         f"{tuple(second_moment.shape) if isinstance(second_moment, Tensor) else type(second_moment)}")
    if not torch.isfinite(second_moment).all():
        raise ValueError(f"{fn}: second_moment has NaN/Inf entries (the calibration inputs were not finite)")


def _solve_sym(G: Tensor, rhs: Tensor, *, left: bool) -> Tensor:
    """``G⁻¹ rhs`` (``left``) or ``rhs G⁻¹`` for a batch of symmetric positive semi-definite ``G``; a tiny relative
    jitter makes exactly singular ``G`` (zero rank slots of the factors) solvable and leaves those slots at zero."""
    n = G.shape[-1]
    # floored after scaling: an all-zero G (a block of padding columns) must get a normal, not a subnormal, jitter
    # (solve(1e-310·I, 0) is NaN, and the next sweep spreads it to every block)
    jitter = (1e-10 * G.diagonal(dim1=-2, dim2=-1).mean(-1)).clamp_min(torch.finfo(G.dtype).tiny ** 0.5)
    G = G + jitter[..., None, None] * torch.eye(n, dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, rhs, left=left)


def fit_monarch(weight: Tensor, second_moment: Tensor, nblocks: int, *, sweeps: int = SWEEPS,
                damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """Monarch factors ``(w1, w2)`` in ``MonarchLinear(in, out, nblocks=nblocks)``'s layout that minimise the
    damped output error (module docstring). The fit runs in float64.

    Args:
        weight: dense ``(out, in)`` floating-point weight; the factors come back in its dtype and device.
        second_moment: ``(in, in)`` input second moment (:func:`input_second_moments`).
        nblocks: blocks per factor, ``1 <= nblocks <= min(in, out)``.
        sweeps: alternating-least-squares sweeps after the whitened start (0: the start only).
        damping: the ridge ``δ > 0``, relative to ``mean(diag C)``.

    Returns:
        ``(w1 (k, q, p), w2 (l, s, r))``.
    """
    _check(weight, second_moment, "fit_monarch")
    if not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"fit_monarch: sweeps must be an int >= 0, got {sweeps!r}")
    out_f, in_f = weight.shape
    sh = monarch_factor_shapes(in_f, out_f, nblocks)
    k, q, p, l, s, r = sh.k, sh.q, sh.p, sh.l, sh.s, sh.r
    W = F.pad(weight.detach().double(), (0, sh.n_in - in_f, 0, sh.n_out - out_f))
    C = damped(second_moment.to(W.device), sh.n_in, damping)

    # 1. whitened start: w1[kk] = v1[kk] L_k^-1 with (v1, v2) the projection of W·BD(L)
    diag_blocks = C.view(k, p, k, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (k, p, p): C[kk, kk]
    L = torch.linalg.cholesky(diag_blocks)
    whitened = torch.einsum("okp,kpj->okj", W.view(sh.n_out, k, p), L).reshape(sh.n_out, sh.n_in)
    v1, w2 = project(whitened, w1_shape=sh.w1_shape, w2_shape=sh.w2_shape)
    w1 = torch.linalg.solve_triangular(L, v1, upper=False, left=False)

    # 2. alternating least squares on the full second moment
    W_blocks = W.view(s, l, sh.n_in).transpose(0, 1)  # (l, s, in): output rows ss·l + ll
    real_rows = torch.arange(sh.n_out, device=W.device) < out_f
    ll = torch.arange(l, device=W.device)
    for _ in range(sweeps):
        # w2 given w1
        A = torch.block_diag(*w1).view(r, l, sh.n_in).transpose(0, 1)  # (l, r, in): rows rr·l + ll of BD(w1)
        CA = A @ C
        w2 = _solve_sym(CA @ A.transpose(1, 2), W_blocks @ CA.transpose(1, 2), left=False)
        # w1 block by block given w2 (B = P2·BD(w2)·P1 as an (out, mid) matrix, padded output rows left out)
        B = torch.zeros(s, l, r, l, dtype=W.dtype, device=W.device)
        B[:, ll, :, ll] = w2
        B = B.reshape(sh.n_out, sh.n_mid) * real_rows[:, None]
        E = B @ torch.block_diag(*w1) - W * real_rows[:, None]
        for kk in range(k):
            Bk, cols = B[:, kk * q:(kk + 1) * q], slice(kk * p, (kk + 1) * p)
            step = _solve_sym(Bk.T @ Bk, Bk.T @ (E @ C[:, cols]), left=True)
            delta = -torch.linalg.solve(C[cols, cols], step, left=False)
            w1[kk] += delta
            E[:, cols] += Bk @ delta
    return w1.to(weight.dtype), w2.to(weight.dtype)


def fit_blockdiag(weight: Tensor, second_moment: Tensor, nblocks: int, *, damping: float = DAMPING) -> Tensor:
    """Block-diagonal factor ``w (nblocks, ceil(out/nblocks), ceil(in/nblocks))`` (``BlockdiagLinear`` without
    shuffle) minimising the damped output error: ``w[kk] = W_kk C_δ[:, kk] (C_δ[kk, kk])⁻¹`` per block.

    Args:
        weight: dense ``(out, in)`` floating-point weight; the factor comes back in its dtype and device.
        second_moment: ``(in, in)`` input second moment.
        nblocks: number of diagonal blocks, ``1 <= nblocks <= min(in, out)``.
        damping: the ridge ``δ > 0``, relative to ``mean(diag C)``.
    """
    _check(weight, second_moment, "fit_blockdiag")
    out_f, in_f = weight.shape
    if not isinstance(nblocks, int) or not 1 <= nblocks <= min(in_f, out_f):
        raise ValueError(f"fit_blockdiag: nblocks must be an int in [1, {min(in_f, out_f)}], got {nblocks!r}")
    q, p = -(-out_f // nblocks), -(-in_f // nblocks)
    W = F.pad(weight.detach().double(), (0, nblocks * p - in_f, 0, nblocks * q - out_f))
    C = damped(second_moment.to(W.device), nblocks * p, damping)
    blocks = []
    for kk in range(nblocks):
        cols = slice(kk * p, (kk + 1) * p)
        blocks.append(torch.linalg.solve(C[cols, cols], W[kk * q:(kk + 1) * q] @ C[:, cols], left=False))
    return torch.stack(blocks).to(weight.dtype)
