"""SSS: set-based stochastic subsampling (Andreis, Lee, Nguyen, Lee, Yang & Hwang, "Set Based Stochastic Subsampling",
ICML 2022).

The input is a set ``D = {d_1..d_n}`` (here: the pixels ``(row, col, value)`` of an image, or the points
``(x, f(x))`` of a 1-D function); a subsampler picks ``k ≪ n`` elements ``D_s`` that a task network ``T``
consumes, and both are trained jointly end to end::

    L = E_{D_s ~ q(·|D)} [ ℓ_task(T(D_s), y) ] + β · (1/n) Σ_i KL(Ber(ρ_i) ‖ Ber(r₀))            (1)

Two stages (no official code exists; the details below follow the paper's description and are marked as
this module's choices where the paper is not specific):

* **Stage 1, candidate selection** (conditionally independent): a DeepSets encoder ``h_i = φ(d_i)``,
  ``r = mean_i h_i``, ``ρ_i = σ(ψ([h_i, r]))`` and ``z_i ~ Ber(ρ_i)``, relaxed during training by the binary
  Concrete / relaxed Bernoulli ``z̃_i = σ((logit ρ_i + log u − log(1−u)) / τ₁)`` with a straight-through
  hard ``z_i = 1[z̃_i > ½]`` (:func:`relaxed_bernoulli`). The KL term of (1) pulls ``ρ`` towards the sparse
  prior rate ``r₀`` (:func:`bernoulli_kl`). *Choice:* the candidate set is ``{z_i = 1} ∪ top-k(ρ)``, so it
  always holds at least ``k`` elements. At test the candidates are the ``m = max(k, round(Σ_i ρ_i))``
  elements of highest ``ρ`` (deterministic, the expected size of a sample: thresholding ``ρ > ½`` would
  leave only the top-k once the prior pulls ``ρ`` towards ``r₀ < ½``, and stage 2 would have no choice).
* **Stage 2, autoregressive selection** (conditionally dependent, on the candidates only): for
  ``t = 1..k`` every remaining candidate attends (a Set-Transformer MAB: multi-head attention, residual,
  LayerNorm) to the already selected set ``Q_{t−1}`` plus a learned seed, a head scores it from
  ``[MAB(h_i, Q_{t−1}), r]``, and one element is drawn from the softmax over the remaining candidates with
  a straight-through **Gumbel-softmax** (τ₂) during training, argmax at test, then masked out
  (:func:`autoregressive_select`): no element is picked twice and exactly ``k`` are picked.
  The two stages are coupled as a product: stage 2 draws from ``π_t(i) ∝ z_i · exp(s_{t,i})``, i.e. its
  logits are ``s_{t,i} + log z_i`` with ``z`` the straight-through stage-1 mask (forward ``log 1 = 0`` on
  candidates, ``−∞`` elsewhere; backward ``∂/∂z̃_i``), so the task gradient reaches ``ρ`` through the
  probability of selecting each element. The picked element enters the task network as
  ``e_t = Σ_i w_{t,i} d_i`` with ``w_t`` the (hard, straight-through) one-hot.
  *Implementation note:* candidates are handled with masks on all ``n`` elements (batched), so the
  compute saving of scoring only the candidates is not realised here.

Baselines compared in the recipe (``mode`` of :class:`SetSubsampler`):

* ``"stage1"``: the stage-1 scores alone; ``k`` draws without replacement from ``softmax(logit ρ)``
  (straight-through Gumbel-softmax, i.e. Gumbel-top-k, no interaction between picks), top-k of ``ρ`` at test;
* ``"fixed"``: one learned, input-independent score per position (a learned fixed subset, trained the
  same way), top-k at test;
* ``"random"``: ``k`` uniformly random elements (the task network is trained on random subsets).

Test protocol: hard samples from each subsampler (mean of 5 draws; the primary figures) and the
deterministic selection (``*_greedy``); both are reported.

The recipe (``python -m methods sss``) pre-trains each task network on random subsets (30 epochs, Adam 3e-3,
batch 32), then trains every subsampler jointly with a copy of it for the same number of epochs (15, Adam 1e-3,
batch 64):
pixel selection for classification of sklearn digits (``n = 64``, k = 2/4/8; ``--dataset mnist`` for 784
MNIST pixels) and reconstruction of 1-D GP functions (``n = 50`` grid points, k = 3/5/8) by a conditional
neural process from the ``k`` selected points (Gaussian NLL on all ``n`` points; MSE reported).
Monarch layers: the hidden layers of the element encoder φ, the Q/K/V/O projections of the set attention,
and the hidden layers of the task networks (masked-pixel MLP classifier, CNP encoder/decoder).

Modules: :mod:`.relaxations` (relaxed Bernoulli, Gumbel-softmax, the KL, autoregressive selection),
:mod:`.subsampler` (the two-stage subsampler and its baselines), :mod:`.tasks` (task networks and data),
:mod:`.recipe` (``python -m methods sss``).
"""
from .relaxations import MODES, autoregressive_select, bernoulli_kl, gumbel_softmax, relaxed_bernoulli
from .subsampler import SetAttentionScorer, SetEncoder, SetSubsampler, Subset
from .tasks import CNP, MaskedSetClassifier, gp_functions, image_to_set
from .recipe import RECIPE

__all__ = [
    "MODES", "autoregressive_select", "bernoulli_kl", "gumbel_softmax", "relaxed_bernoulli", "SetAttentionScorer",
    "SetEncoder", "SetSubsampler", "Subset", "CNP", "MaskedSetClassifier", "gp_functions", "image_to_set", "RECIPE",
]
