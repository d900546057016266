"""ProWD (Yoon, Park, Jeong & Hwang, "Bitwidth Heterogeneous Federated Learning with Progressive Weight
Dequantization", ICML 2022): bitwidth-heterogeneous federated learning with progressive weight dequantisation, on
Flower (``flwr``) and on an in-process loop.

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
              (computed as the soft cross-entropy, which adds the teacher's entropy: the same gradient)

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

Modules: :mod:`.quantization` (quantiser, STE, storage rounding), :mod:`.client` (client model and local
training), :mod:`.aggregation` (FedAvg, masked averaging, SWA masks), :mod:`.dequantizer`, :mod:`.server`
(:class:`ProWDServer`, the algorithm), :mod:`.engines` (the in-process and Flower federations), :mod:`.recipe`
(``python -m methods prowd``).
"""
from .quantization import (FP_BITS, quant_levels, quant_scale, quantize, quantize_state, quantized_step,
                           stochastic_quantize)
from .client import ClientUpdate, local_train, make_client_model
from .aggregation import masked_average, swa_mask, swa_masks, weighted_average
from .dequantizer import ProgressiveDequantizer, dequantizer_loss
from .server import METHODS, ProWDServer, evaluate_groups
from .engines import make_federation, run_flower, run_inprocess
from .recipe import RECIPE

__all__ = [
    "FP_BITS", "quant_levels", "quant_scale", "quantize", "quantize_state", "quantized_step", "stochastic_quantize",
    "ClientUpdate", "local_train", "make_client_model", "masked_average", "swa_mask", "swa_masks",
    "weighted_average", "ProgressiveDequantizer", "dequantizer_loss", "METHODS", "ProWDServer", "evaluate_groups",
    "make_federation", "run_flower", "run_inprocess", "RECIPE",
]
