"""Curvature tools shared by the flatness recipes (GNP, PoF): Hessian-vector products, power iteration for
the top Hessian eigenvalue, Hutchinson's trace estimator and the gradient norm.

Every function takes a ``loss_fn`` closure (no arguments, returns a scalar loss, e.g. the full-batch training
loss with the model in eval mode) and the list of parameters ``params`` that span the space in which the
Hessian ``H = ∇²_θ L(θ)`` is taken (e.g. all trainable parameters for GNP; only the last layer ``(W, b)`` for
PoF's classifier-space Hessian). Vectors are lists of tensors shaped like ``params``.

The HVP is exact (double back-propagation, Pearlmutter's trick): ``H v = ∇_θ ⟨∇_θ L(θ), v⟩``. The gradient graph
is built once per :class:`HessianOperator`, so power iteration and Hutchinson cost one extra backward per
product. All Monarch ops support double backward, so Monarch factors can be in ``params``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

LossFn = Callable[[], Tensor]


def _check_params(params) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params must be a sequence of tensors (e.g. list(model.parameters())), got a single Tensor")
    params = list(params)
    if not params:
        raise ValueError("params must contain at least one tensor")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) must require grad")
    return params


def _check_vector(v, params: Sequence[Tensor], name: str = "v") -> list[Tensor]:
    v = list(v)
    if len(v) != len(params):
        raise ValueError(f"{name} must have one tensor per parameter ({len(params)}), got {len(v)}")
    for i, (a, p) in enumerate(zip(v, params)):
        if a.shape != p.shape:
            raise ValueError(f"{name}[{i}] must have shape {tuple(p.shape)}, got {tuple(a.shape)}")
    return v


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``Σ_i ⟨a_i, b_i⟩`` over lists of tensors."""
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(a: Sequence[Tensor]) -> Tensor:
    """Global 2-norm of a list of tensors."""
    return torch.sqrt(sum((x.detach() ** 2).sum() for x in a))


def _scalar_loss(loss_fn: LossFn) -> Tensor:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable returning a scalar loss, got {type(loss_fn).__name__}")
    loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a 0-d tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
    return loss


def gradient(loss_fn: LossFn, params) -> list[Tensor]:
    """``∇_θ L`` (detached), ``None`` gradients (unused parameters) replaced by zeros."""
    params = _check_params(params)
    grads = torch.autograd.grad(_scalar_loss(loss_fn), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def gradient_norm(loss_fn: LossFn, params) -> float:
    """``‖∇_θ L‖₂``."""
    return float(norm(gradient(loss_fn, params)))


class HessianOperator:
    """The Hessian of ``loss_fn()`` w.r.t. ``params`` as a linear operator (HVPs by double backprop).

    ``loss_fn`` is evaluated once, at construction; :meth:`matvec` then costs one backward pass.
    """

    def __init__(self, loss_fn: LossFn, params):
        self.params = _check_params(params)
        self.loss = _scalar_loss(loss_fn)
        grads = torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True)
        self.grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        self.numel = sum(p.numel() for p in self.params)

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for a list of tensors ``v`` shaped like ``params``."""
        v = _check_vector(v, self.params)
        inner = dot(self.grads, [x.detach() for x in v])
        if not inner.requires_grad:  # loss is linear in params: H = 0
            return [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad(inner, self.params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, self.params)]

    def dense(self) -> Tensor:
        """The full ``(n, n)`` Hessian (n = number of entries of ``params``); only for small problems/tests."""
        cols = []
        for j in range(self.numel):
            e = torch.zeros(self.numel, dtype=self.params[0].dtype, device=self.params[0].device)
            e[j] = 1
            cols.append(flatten(self.matvec(unflatten(e, self.params))))
        return torch.stack(cols, 1)


def flatten(v: Sequence[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1) for x in v])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in like:
        out.append(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    if i != flat.numel():
        raise ValueError(f"flat must have {i} entries, got {flat.numel()}")
    return out


def hvp(loss_fn: LossFn, params, v: Sequence[Tensor]) -> list[Tensor]:
    """One Hessian-vector product ``∇²L · v``."""
    return HessianOperator(loss_fn, params).matvec(v)


def _random_like(params: Sequence[Tensor], generator: Optional[torch.Generator], rademacher: bool) -> list[Tensor]:
    out = []
    for p in params:
        if rademacher:
            r = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).to(p.dtype) * 2 - 1
        else:
            r = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        out.append(r.to(p.device))
    return out


def top_eigenvalue(loss_fn: LossFn, params, iters: int = 50, tol: float = 1e-4,
                   generator: Optional[torch.Generator] = None) -> tuple[float, list[Tensor]]:
    """Dominant eigenvalue ``λ`` (largest |λ|) of the Hessian and its unit eigenvector, by power iteration.

    ``v ← Hv/‖Hv‖`` from a Gaussian start, stopping when the Rayleigh quotient ``vᵀHv`` changes by less than
    ``tol`` (relative) or after ``iters`` products. At a (near-)minimum the dominant eigenvalue is the top
    one, λ_max, the usual sharpness measure. Returns ``(λ, v)``.
    """
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    op = HessianOperator(loss_fn, params)
    v = _random_like(op.params, generator, rademacher=False)
    n = norm(v)
    v = [x / n for x in v]
    eig = None
    for _ in range(iters):
        hv = op.matvec(v)
        new = float(dot(v, hv))
        n = float(norm(hv))
        if n == 0.0:
            return 0.0, v
        v = [x / n for x in hv]
        if eig is not None and abs(new - eig) <= tol * max(abs(eig), 1e-12):
            eig = new
            break
        eig = new
    return eig, v


def hutchinson_trace(loss_fn: LossFn, params, samples: int = 64,
                     generator: Optional[torch.Generator] = None) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``zᵀHz`` over Rademacher ``z`` (unbiased; exact for a
    diagonal ``H``). Returns ``(estimate, standard error)``."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    op = HessianOperator(loss_fn, params)
    vals = []
    for _ in range(samples):
        z = _random_like(op.params, generator, rademacher=True)
        vals.append(float(dot(z, op.matvec(z))))
    t = torch.tensor(vals, dtype=torch.float64)
    stderr = float(t.std() / math.sqrt(samples)) if samples > 1 else float("nan")
    return float(t.mean()), stderr
