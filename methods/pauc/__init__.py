"""Partial-AUC optimisation by distributionally robust optimisation (Zhu, Li, Wang, Wu & Yang, "When AUC meets DRO:
Optimizing Partial AUC for Deep Learning with Non-Convex Convergence Guarantee", ICML 2022).

A binary scorer ``h_w(x)`` (here a Monarch MLP with a sigmoid output) is trained on pairwise surrogate losses
``L_ij = ℓ(h(x_i) − h(x_j))`` over positives ``i`` and negatives ``j``; the default surrogate is the squared hinge
``ℓ(t) = max(m − t, 0)²`` with margin ``m = 1``. Three objectives focus the loss on the hard part of the ROC curve:

* **SOPA** (one-way pAUC, FPR ≤ β, exact CVaR), :class:`SOPALoss`::

      min_{w,s} (1/n+) Σ_i [ s_i + (1/(β n−)) Σ_j (L_ij − s_i)_+ ]

  ``min_s`` gives each positive the mean of its top-β fraction of negative losses (:func:`cvar`). Per-positive
  state ``s`` (0 at start); per batch ``p_ij = 1[L_ij > s_i]``, ``s_i ← s_i − η(1 − Σ_j p_ij/(β|B−|))`` and the
  model gradient ``(1/(β|B+||B−|)) Σ p_ij ∇L_ij``.
* **SOPA-s** (one-way pAUC, KL-DRO over negatives), :class:`SOPASLoss`::

      F(w) = (1/n+) Σ_i λ log( (1/n−) Σ_j exp(L_ij/λ) )     (λ → ∞: full AUC loss; λ → 0: hardest negative)

  State ``u_i ← (1−γ)u_i + γ mean_{j∈B−} exp(L_ij/λ)`` (0 at start); ``p_ij = exp(L_ij/λ)/u_i`` with the
  updated ``u``; gradient ``mean_ij p_ij ∇L_ij``.
* **SOTA-s** (two-way pAUC, KL over negatives and over positives), :class:`SOTASLoss`::

      F(w) = τ log E_i[ (E_j exp(L_ij/λ))^{λ/τ} ]

  State ``u_i`` as above (rate γ0) and a scalar ``v ← (1−γ1)v + γ1 mean_{i∈B+} u_i^{λ/τ}``;
  ``p_ij = u_i^{λ/τ−1} exp(L_ij/λ)/v``; gradient ``mean_ij p_ij ∇L_ij``.

Each loss is called like LibAUC's: ``loss(scores, labels, index)`` with ``scores (B,)`` or ``(B, 1)``, binary
``labels (B,)`` and ``index (B,)`` the dataset indices of the batch (or of its positives only); the per-positive
state is a buffer of length ``data_len`` indexed by dataset index, so it is saved in ``state_dict``. The returned
value is the p-weighted surrogate ``mean(p ⊙ L)`` (``p`` detached): its gradient is the algorithm's gradient, its
value is not the objective (use :func:`cvar_objective`, :func:`kl_dro_objective`, :func:`kl_kl_objective`).
:class:`IndexedDataset` returns ``(x, y, index)`` and :class:`DualSampler` oversamples positives to a fixed share of
every batch. Metrics: :func:`one_way_pauc` (McClish-standardised, like ``sklearn.metrics.roc_auc_score(max_fpr=)``)
and :func:`two_way_pauc` (LibAUC's ``pauc_roc_score(min_tpr=, max_fpr=)``).

Follows LibAUC 2.0.1 (``pAUC_CVaR_Loss``, ``pAUC_DRO_Loss``, ``tpAUC_KL_Loss``; state starts at 0, ``s`` moves by
``η`` not ``η/n+``); the LibAUC optimisers ``SOPA``/``SOPAs``/``SOTAs`` are Adam with every gradient element clamped
to ``±clip_value`` before weight decay, which the recipe reproduces with ``clip_grad_value_`` + ``torch.optim.Adam``.

Modules: :mod:`.losses` (surrogates, exact objectives, the stateful losses), :mod:`.sampling` (indexed dataset,
positive oversampling), :mod:`.metrics` (one- and two-way pAUC), :mod:`.recipe` (``python -m methods pauc``).
"""
from .losses import (AUCLoss,
    SOPALoss, SOPASLoss, SOTASLoss, cvar, cvar_objective, kl_dro_objective, kl_kl_objective, pairwise_surrogate,
    pauc_loss)
from .sampling import DualSampler, IndexedDataset
from .metrics import one_way_pauc, two_way_pauc
from .recipe import METHODS, RECIPE

__all__ = [
    "AUCLoss", "SOPALoss", "SOPASLoss", "SOTASLoss", "cvar", "cvar_objective", "kl_dro_objective",
    "kl_kl_objective", "pairwise_surrogate", "pauc_loss", "DualSampler", "IndexedDataset", "one_way_pauc",
    "two_way_pauc", "METHODS", "RECIPE",
]
