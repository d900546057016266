"""OCM's InfoNCE terms: supervised NT-Xent, the new-data loss, and the MI preservation against the previous model."""
from __future__ import annotations

import torch
from torch import Tensor



def sup_nt_xent(sim: Tensor, labels: Tensor, temperature: float = 0.07, mask_diagonal: bool = True) -> Tensor:
    """Supervised NT-Xent ``mean_i Σ_j P_ij ℓ_ij`` on a similarity matrix ``sim (n, n)`` with labels ``(n,)``.

    ``mask_diagonal=True``: the softmax runs over ``k ≠ i`` and ``P_ii = 0`` (rows without a positive add 0);
    ``False``: every ``k`` and ``P_ii`` kept (the official buffer and preservation losses).
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or labels.shape != (sim.shape[0],):
        raise ValueError(f"sup_nt_xent: sim must be (n, n) and labels (n,), got {tuple(sim.shape)} and "
                         f"{tuple(labels.shape)}")
    logits = sim / temperature
    pos = labels[:, None] == labels[None, :]
    if mask_diagonal:
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        logits = logits.masked_fill(eye, float("-inf"))
        pos = pos & ~eye
    logp = logits.log_softmax(1)
    per_row = torch.where(pos, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(1)
    return -(per_row / pos.sum(1).clamp_min(1)).mean()


def ocm_new_loss(z: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Loss on the new batch: ``z (2N, d)`` normalised projections of ``[views; augmented views]``, ``labels (N,)``
    the views' pseudo-classes. ``2·sup_nt_xent(z zᵀ) + (1/2N)Σ_{i<N}(ℓ_{i,i+N} + ℓ_{i+N,i})``."""
    n = labels.shape[0]
    if z.dim() != 2 or z.shape[0] != 2 * n:
        raise ValueError(f"ocm_new_loss: z must be (2N, d) with N = len(labels) = {n}, got {tuple(z.shape)}")
    sim = z @ z.T
    sup = sup_nt_xent(sim, labels.repeat(2), temperature, mask_diagonal=True)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logp = (sim / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    idx = torch.arange(n, device=z.device)
    pair = -(logp[idx, idx + n].sum() + logp[idx + n, idx].sum()) / (2 * n)
    return 2 * sup + pair


def preservation_loss(z_cur: Tensor, z_prev: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """MI preservation ``mean_i Σ_j P_ij (−log softmax_j(z_cur_i · z_prev_j / τ))``; ``z_prev`` is detached.

    ``z_cur``, ``z_prev``: ``(n, d)`` normalised projections of the same views by the current and the frozen
    previous model; ``labels (n,)`` the views' pseudo-classes (``P_ii`` kept: view ``i`` under both models is a
    positive pair)."""
    if z_cur.shape != z_prev.shape or z_cur.dim() != 2 or labels.shape != (z_cur.shape[0],):
        raise ValueError(f"preservation_loss: z_cur and z_prev must be the same (n, d) and labels (n,), got "
                         f"{tuple(z_cur.shape)}, {tuple(z_prev.shape)}, {tuple(labels.shape)}")
    return sup_nt_xent(z_cur @ z_prev.detach().T, labels, temperature, mask_diagonal=False)


def positive_entropy(labels: Tensor) -> Tensor:
    """``mean_i H(P_i)``: the lower bound of :func:`preservation_loss` (and of the unmasked :func:`sup_nt_xent`)."""
    counts = (labels[:, None] == labels[None, :]).sum(1)
    return counts.double().log().mean()
