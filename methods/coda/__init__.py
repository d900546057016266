"""CoDA (Kirchmeyer, Yin, Donà, Baskiotis, Rakotomamonjy & Gallinari, "Generalizing to New Physical Systems via
Context-Informed Dynamics Model", ICML 2022): context-informed dynamics adaptation, with a Monarch-parameterised
dynamics network.

Model (paper §3; official code yuan-yin/CoDA, ``ode_model.py``/``network.py``)::

    du/dt = f(u; θ^e),       θ^e = θ_c + W ξ^e,      e = 1..E environments
    θ_c ∈ R^P   shared parameters of the dynamics network (``net_root``)
    W   ∈ R^{P×d_ξ}  linear hypernetwork without bias (``net_hyper = Linear(d_ξ, P, bias=False)``)
    ξ^e ∈ R^{d_ξ}    per-environment context, zero-initialised (``codes``, default d_ξ = 2)

    L = Σ_e MSE(û^e, u^e) + λ_m · Σ_i ‖W_{i,:}‖₂ + λ_c · ‖Ξ‖_F²        (``-r l12m-l2c``: λ_m = 1e-6, λ_c = 1e-4)

So every environment lives in an affine rank-d_ξ subspace of parameter space; the row group lasso makes most
parameters context-independent. Adaptation to a new environment freezes θ_c and W and fits a fresh ξ (zero
init) on **one** trajectory.

Monarch parameterisation. The dynamics MLP is ``state → h → h → h → state`` (official: 2→64→64→64→2 with a
learnable swish) whose hidden ``h → h`` layers are :class:`monarch_kernels.layers.MonarchLinear`. θ (and so each
row of W) covers the *Monarch factors* ``w1, w2`` (plus biases, the dense end layers and the swish slopes): the adapted
factors of environment e are ``w = w_c + reshape(W ξ^e)`` and the layer is applied functionally with
:func:`monarch_kernels.monarch_linear` on those factors, so W has as many rows as the Monarch network has
parameters (≈ half of the dense network's at h = 64, nblocks = 4).

Two numerically identical ways to apply the adapted Monarch layers (``apply=``):

* ``"factors"``: ``monarch_linear(h_e, w1_e, w2_e, b_e)`` per environment at every right-hand-side evaluation;
* ``"dense"`` (recipe default on CPU): the Monarch matrix of each environment is materialised once per forecast
  (``monarch_linear`` on an identity), then every evaluation is one batched matmul over environments. A forecast
  evaluates the RHS 4·(T−1) = 76 times on 4–32 states per environment, so the per-call overhead of the custom op
  dominates on CPU (≈ 0.2 ms per call here); materialising the 64×64 matrix once is both fewer FLOPs and ≈ 10×
  faster per training step here (measured side by side). The two paths agree to float64 round-off (tested).

Integration: ``torchdiffeq.odeint(method="rk4")`` on the observation grid (one RK4 step per dt), as the
official code. Teacher forcing (official ``Forecaster.forward``): with probability ε each observation time is a
restart point where integration restarts from the ground truth; ε starts at 0.99 and is multiplied by 0.99
every ``eps_every`` iterations (official: 30, over up to 120k iterations); below 1e-3 it is a free rollout.
Adaptation starts at ε = 0.95 (official ``adaptation.py``).

Deviations from the official code (documented, small-scale CPU budget):

* ε schedule compressed: the same 0.99 factor, but ``eps_every`` is chosen so that training reaches the free
  rollout at ~60 % of the iterations (official: after ~20.6k of 120k iterations);
* the final model is evaluated (the official code checkpoints the best in-distribution *test* MSE);
* ground truth from ``torchdiffeq`` dopri5 in float64 at rtol 1e-9 (official: scipy RK45 at default rtol 1e-3);
* all environments run as one batch of per-environment weights (official: a "ghost" group-conv network);
* the hypernetwork W is initialised like ``nn.Linear`` (as official), biases of θ_c at zero (official
  ``init_weights(init_type="default")``), Monarch factors with :class:`monarch_kernels.layers.MonarchLinear`'s init.

Lotka–Volterra (official ``data.py``/``train.py``/``adaptation.py``): ``dx/dt = αx − βxy``,
``dy/dt = δxy − γy``; α = γ = 0.5, β, δ ∈ {0.5, 0.75, 1.0} (9 training environments, 4 train / 32 test
trajectories each), horizon 10, dt 0.5 (20 points), x₀ ~ U[1, 2]² (the same initial conditions in every
environment); adaptation to β, δ ∈ {0.625, 1.125} (4 environments, 1 trajectory each).

Modules: :mod:`.lotka_volterra` (the system and its official parameter grids), :mod:`.dynamics` (the
hyper-parameterised Monarch dynamics network and the regulariser), :mod:`.training` (teacher-forced forecasting,
training, adaptation), :mod:`.recipe` (``python -m methods coda``).
"""
from .lotka_volterra import (LV_ADAPT_PARAMS,
    LV_TRAIN_PARAMS, lotka_volterra_invariant, lotka_volterra_rhs, simulate_lotka_volterra)
from .dynamics import HyperMonarchDynamics, code_l2, coda_regulariser, group_lasso_rows, swish
from .training import adapt_codes, evaluate_mse, forecast, linear_r2, restart_points, train_dynamics
from .recipe import RECIPE

__all__ = [
    "LV_ADAPT_PARAMS", "LV_TRAIN_PARAMS", "lotka_volterra_invariant", "lotka_volterra_rhs",
    "simulate_lotka_volterra", "HyperMonarchDynamics", "code_l2", "coda_regulariser", "group_lasso_rows", "swish",
    "adapt_codes", "evaluate_mse", "forecast", "linear_r2", "restart_points", "train_dynamics", "RECIPE",
]
