"""Ensemble distillation into a BatchEnsemble student, weight averaging, diversifying perturbation (Nam, Lee, Heo &
Lee, "Improving Ensemble Distillation With Weight Averaging and Diversifying Perturbation", ICML 2022).

A deep ensemble of ``M`` teachers is distilled into one student that is a **BatchEnsemble** (BE) over the whole
network; at inference the members are **averaged in weight space** ("LatentBE") into a single plain network of the
same cost as one member, and during training a **diversifying input perturbation** moves each batch to where the
teachers disagree but the student's members still agree. Algorithm as in the official code
(cs-giung/distill-latentbe); this module is the PyTorch/Monarch version.

BatchEnsemble layer (:class:`BatchEnsemble`), for any wrapped ``nn.Linear``, ``nn.Conv2d``, :class:`MonarchLinear`
or :class:`BlockdiagLinear` with shared ("slow") weight ``W`` and bias ``b`` and per-member ("fast") vectors
``r_m ∈ R^{in}``, ``s_m ∈ R^{out}`` (``m = 1..M``, initialised to 1 as in the official config)::

    y_m = s_m ∘ (W (r_m ∘ x) + b)                 (conv: per channel; W(·) the layer without its bias)

The batch is member-major: rows ``[m·B, (m+1)·B)`` belong to member ``m`` (tile the input with
:func:`tile_members`).

**What "folding equals the member-averaged layer" means (exactly).** :meth:`BatchEnsemble.fold_mean_` averages the
members in *latent (factor) space*, ``r̄ = mean_m r_m``, ``s̄ = mean_m s_m``, and writes the plain layer::

    W' = diag(s̄) · W · diag(r̄),      b' = s̄ ∘ b

which is, for every input, *exactly* the BE layer whose members all carry ``(r̄, s̄)``. It is **not** the average of
the members' maps: ``mean_m diag(s_m) W diag(r_m) = W ∘ (mean_m s_m r_mᵀ) ≠ W ∘ (s̄ r̄ᵀ)`` unless the members agree
(and for a Monarch ``W`` the Hadamard product with a rank-``M`` matrix is in general not Monarch any more). For a
``MonarchLinear`` ``W = P2·BD(w2)·P1·BD(w1)`` the input scale acts on the columns of the *first* factor and the
output scale on the rows of the *second* factor after undoing ``P2``::

    w1'[kk, :, pp] = w1[kk, :, pp] · r̄[kk·p + pp]          (input index kk·p + pp)
    w2'[ll, ss, :] = s̄[ss·l + ll] · w2[ll, ss, :]          (P2: output index ss·l + ll)

so the folded layer is again a ``MonarchLinear`` with the same factor shapes and cost. Each folded factor is
*linear in one scale vector only*, hence folding every member separately and then averaging ``w1`` and ``w2``
**factor by factor** gives exactly the same layer as folding the averaged scales (tested); what must not be done is
averaging the members' *products* (dense maps). Padding positions of ragged sizes are never read, so their scale is
irrelevant.

Losses. Member ``m`` is distilled to teacher ``m`` (one-to-one pairing, not the ensemble mean), pure KD (α = 1)::

    L_KD = T² · mean_{m,b} CE(softmax(z_t^m / T), log_softmax(z_s^m / T)),    T = 4

The KD baseline (a plain student) uses the average over teachers of the same soft CE. Fast weights decay toward 1
(``0.5·||1 − r||²/M``, :func:`fast_weight_decay`) and their gradients are multiplied by ``M``
(:func:`scale_fast_grads_`) to undo the ``1/M`` share each member gets of the tiled batch.

Diversifying perturbation (:func:`diversifying_perturbation`, the official "TDiv-SDiv"): pick two distinct member
indices ``a ≠ b`` (the same for teachers and student members), then::

    TDiv(x) = mean_b CE(sg(p_{t_b}(x)), log p_{t_a}(x)),   SDiv(x) = mean_b CE(sg(p_{s_b}(x)), log p_{s_a}(x))
    δ = ∇_x (TDiv − SDiv);   δ ← δ / ||δ||₂ · ε·√D  (per example, D input entries: RMS step ε);   x ← clip(x + δ, 0, 1)

one normalised gradient-*ascent* step; the KD loss of that step is computed on the perturbed batch only (teachers
re-evaluated on it). The official ε is 1/255 on CIFAR in [0, 1]; digits are quantised at 1/16, so the recipe
sweeps ε.

Deviations from the official code: MLPs on 8×8 digits instead of WRN-28-4 on CIFAR-100 (so no BatchNorm), Adam
instead of SGD + cosine schedule, and weight decay applied only to the fast weights (toward 1).

Modules: :mod:`.batch_ensemble` (the BatchEnsemble wrapper and exact latent folding), :mod:`.distillation`
(losses, the diversifying perturbation), :mod:`.recipe` (``python -m methods ensemble_distill``).
"""
from .batch_ensemble import (BatchEnsemble,
    batch_ensemble_, fast_parameters, fast_weight_decay, fold_batch_ensembles_, fold_scales_, member_logits,
    scale_fast_grads_, tile_members)
from .distillation import (diversifying_perturbation,
    ensemble_kd_loss, kl_to_ensemble, member_kd_loss, random_pair, teacher_logits)
from .recipe import RECIPE

__all__ = [
    "BatchEnsemble", "batch_ensemble_", "fast_parameters", "fast_weight_decay", "fold_batch_ensembles_",
    "fold_scales_", "member_logits", "scale_fast_grads_", "tile_members", "diversifying_perturbation",
    "ensemble_kd_loss", "kl_to_ensemble", "member_kd_loss", "random_pair", "teacher_logits", "RECIPE",
]
