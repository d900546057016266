"""IREM: iterative reasoning as energy minimisation (Du, Li, Tenenbaum & Mordatch, "Learning Iterative Reasoning
through Energy Minimization", ICML 2022).

An energy network ``E_θ(x, y) -> R`` scores a candidate answer ``y`` for a problem ``x``; the answer is
found by gradient descent on the energy, starting from noise::

    y⁰ ~ U(-1, 1),     y^{t+1} = y^t − λ ∇_y E_θ(x, y^t),    t = 0 .. K−1            (1)

and θ is trained so that the K-th iterate solves the problem, ``L(θ) = mean ‖y^K − y*‖²`` (MSE on the final
step only). Harder problems are solved by running (1) for more steps at test time, and the energy itself
says when to stop (the iterate of minimum energy).

What the official code (yilundu/irem_code_release, ``train.py``/``models.py``) does beyond the abstract,
and what this module follows:

* **energy network**: an MLP on ``[y, x]`` with swish (SiLU) activations, ``(dy+dx) → h → h → h → 1``
  (h = 512 there). Here the first and hidden layers are :class:`monarch_kernels.layers.MonarchLinear` (built through
  :class:`methods.models.MLP`), the scalar head is dense. Gradient descent on E with ``create_graph=True``
  therefore runs double backward through the Monarch ops.
* **truncated backprop** (``grad_steps=1``, the official default): steps ``1..K−1`` compute ``∇_y E``
  without a graph, so θ receives gradient only through the last step ``−λ ∇_y E_θ(x, y^{K−1})``.
  ``grad_steps=K`` is the official ``--no_truncate`` (full unroll). Here the iterate entering the first
  differentiable step is *detached*: no gradient reaches ``y⁰`` or the truncated steps (in the official
  code ``y^{K−1}`` stays connected to ``y⁰`` through the identity path, which carries no gradient to θ,
  so θ's gradient is the same). The truncated steps also run with detached parameters, so the Monarch
  backward computes no weight gradients there (the ops decide from ``requires_grad`` alone).
* **step size** ``λ = step_lr`` is large (100 in the paper's 20×20 runs): the network learns the scale.
  No Langevin noise (the official code creates a noise tensor and never uses it).
* **replay buffer of optimisation states** (FIFO ring, 10 000 entries): once it holds ≥ B entries, every
  batch is B fresh problems (from ``y⁰ ~ U(-1,1)``) plus B stored ``(x, y_state, y*)`` that continue from
  their stored iterate; afterwards the whole batch is pushed back with its new ``y^K``. Replayed problems
  thus see many more steps than K without backprop through them.
* **test**: run many steps (80 there) from ``y⁰ ~ U(-1,1)``; report the error at a few step counts and at
  the step of **minimum energy**. The official test picks the iterate after the step at which the
  energy *before* the step was lowest (an off-by-one); :func:`min_energy_select` evaluates the energy
  at every iterate ``y⁰..y^T`` and picks the argmin iterate itself.
* **tasks** (official ``dataset.py``): inverse of ``A = 2RRᵀ + 0.5 I`` with ``R ~ U(-1,1)``, harder OOD
  ``A = 2RRᵀ + 0.1 I`` (worse conditioned, larger answers); addition ``y = A + B`` with entries
  ``U(-1,1)``, OOD ``U(-2.5, 2.5)``. The baseline is a feed-forward MLP ``x → y`` trained with MSE.

The recipe (``python -m methods irem``) trains IREM (hidden 256, K = 10, truncated backprop, replay buffer,
Adam 1e-3, 4000 iterations of 128 fresh + 128 replayed problems; λ = 1 for inverse and 10 for addition, chosen
from {1, 10, 100} at this scale) and the feed-forward baseline (same MLP shape and iterations, MSE) on 5×5
inverse (``--tasks inverse,addition`` adds 4×4 addition) with fresh samples every step, and reports the MSE at
5/10/20/40 steps and at the minimum-energy step, in distribution and out of distribution, with the energy along
the trajectory. (With 1500 iterations IREM was still behind the baseline out of distribution on inverse; the
OOD advantage of more reasoning steps appeared with longer training.)

Modules: :mod:`.energy` (the energy network, energy descent, the training step, evaluation), :mod:`.recipe`
(``python -m methods irem``, with the matrix tasks); the replay buffer is :class:`methods.buffers.ReplayBuffer`.
"""
from .energy import (EnergyMLP,
    Trajectory, energy_descent, energy_grad, energy_step, evaluate_irem, irem_train_step, min_energy_select)
from .recipe import TASKS, RECIPE, make_task

__all__ = [
    "EnergyMLP", "Trajectory", "energy_descent", "energy_grad", "energy_step", "evaluate_irem", "irem_train_step",
    "min_energy_select", "TASKS", "RECIPE", "make_task",
]
