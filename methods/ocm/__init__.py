"""OCM: online continual learning through mutual information maximisation (Guo, Liu & Zhao, "Online Continual Learning
through Mutual Information Maximization", ICML 2022).

Online class-incremental learning: the tasks (disjoint class pairs) arrive as one stream, each sample is seen once
in batches of 10, a single head covers all classes and no task id is given at test time. A reservoir buffer
(:class:`methods.buffers.ReplayBuffer`, ``policy="reservoir"``) keeps a uniform sample of the stream. OCM learns
the representation by maximising mutual information with InfoNCE losses, and preserves old knowledge by
maximising the MI between the current and the previous model's representations. Algorithm as in the official code
(gydpku/OCM, ``test_mnist.py`` and
``InfoNCE/contrastive_learning.py``), with the deviations listed at the end.

Views (:func:`rotation_views`). Each image gives 16 views: 4 "local rotations" (split the image into its left and
right halves and rotate none / the left / both / the right half by 180° in place) × 4 global rotations by
0°, 90°, 180°, 270°. View ``v = 4·g + l`` (``g`` the global quarter turns, ``l`` the local variant, the official
order) of an image of class ``y`` gets the **pseudo-class** ``ỹ = y + C·v`` (``C`` = number of classes; the
official code uses 100 for MNIST): the views are separate classes, not positives of each other. A second copy of
the views is augmented with a random resized crop (scale 0.3–1, the official MNIST augmentation).

Losses (τ = 0.07; ``z`` are L2-normalised projections ``g(h(x))``; ``S = z zᵀ``):

* supervised NT-Xent (:func:`sup_nt_xent`) over rows ``i`` with positives ``P_ij = 1[ỹ_i = ỹ_j] / Σ_k 1[ỹ_i = ỹ_k]``::

      ℓ_ij = −log( exp(S_ij/τ) / Σ_{k∈A(i)} exp(S_ik/τ) ),     L = mean_i Σ_j P_ij ℓ_ij

  with ``A(i) = {k ≠ i}`` and ``P_ii = 0`` when ``mask_diagonal`` (new data), or ``A(i)`` = all ``k`` and ``P_ii`` kept
  (buffer data and preservation, exactly the official ``Supervised_NT_xent_uni``/``_pre``);
* new data (:func:`ocm_new_loss`), on ``z`` of ``[V; A(V)]`` (2N rows for N = 16·B views):
  ``L_new = 2·L_sup + (1/2N)·Σ_{i<N} (ℓ_{i,i+N} + ℓ_{i+N,i})`` (the official weighting: supervised term plus the
  SimCLR pair term);
* buffer data: ``L_buf = sup_nt_xent(S_M, mask_diagonal=False)`` on the views of a buffer batch;
* knowledge preservation = MI between the current and the frozen previous model (:func:`preservation_loss`):
  ``S_pre = z_cur(Rot x_M) · z_prev(Rot x_M)ᵀ``, ``L_pre = mean_i Σ_j P_ij (−log softmax_j(S_pre_i / τ))``, where
  ``z_prev`` comes from a copy of the model frozen at the end of the previous task (no gradient);
* classification: task 1 ``CE(c(h(A x)), y)``; from task 2 on **CE only on buffer samples**
  ``CE(c(h(A x_M)), y_M)`` — new data only shape the representation.

Total from task 2 on: ``L = CE_M + L_new + L_buf + L_pre``. Adam (lr 1e-3, betas (0.9, 0.99), wd 1e-4), one step
per incoming batch, buffer batch ``min(64, 7·#classes seen)``, the buffer updated after every step.

Note on the preservation term: it is an InfoNCE *bound* on the MI, not a distance, so it is **not zero** when the
two models are equal; at equal models it equals the buffer loss ``sup_nt_xent(z zᵀ, mask_diagonal=False)``, and it is
bounded below by ``mean_i H(P_i)`` (the entropy of each row's positive distribution), which it reaches when the
softmax of every row equals ``P_i`` (tested).

Deviations from the official code: the official similarity for MNIST is ``0.5·z zᵀ + 0.5·z f[:, o:o+128]ᵀ``
with ``f`` the normalised penultimate features and ``o`` a random offset (an undocumented mix); here ``S = z zᵀ``.
In ``L_new`` the official code keeps the diagonal in ``P`` (its ``ℓ_ii = −log eps`` is a constant, so only the
weights of the positives differ by ``n_i/(n_i − 1)``); here the diagonal is removed (standard SupCon). Pseudo-label
stride ``C`` instead of 100. No apex AMP. Encoder: MLP ``in → 400 → 400`` (the official MNIST width) with Monarch
layers (``methods.models.MLP(..., layer="monarch")``), Monarch projection head ``400 → 128``, dense classifier.

Scale. The recipe streams the 4,000 training images of ``methods.data.load_mnist`` (80 steps per task) instead of
MNIST's 60,000 (1,200 steps per task). Because the classifier only sees buffer samples from task 2 on, it needs many
steps to pick up the newest classes; in a stream this short it lags behind the representation. Besides the
classifier's accuracy the recipe therefore also reports a nearest-class-mean read-out on the buffer
(:func:`ncm_predict`; a diagnostic, not part of OCM) and the accuracy on the old and the last task separately.

Modules: :mod:`.views` (rotation views and pseudo-classes, the crop augmentation), :mod:`.losses` (InfoNCE
terms), :mod:`.stream` (the network, the loss terms per batch, the online class-incremental loop),
:mod:`.recipe` (``python -m methods ocm``); the reservoir is :class:`methods.buffers.ReplayBuffer`.
"""
from .views import N_VIEWS, local_rotations, random_resized_crop, rotation_views
from .losses import ocm_new_loss, positive_entropy, preservation_loss, sup_nt_xent
from .stream import METHODS, OCMNet, buffer_batch_size, forgetting, ncm_predict, ocm_losses, run_stream
from .recipe import RECIPE

__all__ = [
    "N_VIEWS", "local_rotations", "random_resized_crop", "rotation_views", "ocm_new_loss", "positive_entropy",
    "preservation_loss", "sup_nt_xent", "METHODS", "OCMNet", "buffer_batch_size", "forgetting", "ncm_predict",
    "ocm_losses", "run_stream", "RECIPE",
]
