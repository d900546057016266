"""The task networks that consume a subset (a masked-pixel classifier, a conditional neural process) and their
data (images as pixel sets, GP functions), with their losses and metrics."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MLP
from .subsampler import _check_set, _per_element


class MaskedSetClassifier(nn.Module):
    """Classifier of a subset of an aligned set (pixels): the selected values are put back in place,
    ``m = Σ_t w_t`` (the selection mask, ``(B, n)``), input ``[m ⊙ v, m]`` (``2n``) -> MLP -> logits.

    ``forward(weights (B, k, n), values (B, n))``. Differentiable in ``weights`` (straight-through one-hot
    rows), so the subsampler gets the task gradient. (A DeepSets classifier over the ``(row, col, value)``
    elements learned far more slowly on 8×8 digits in our trials; any task network fits the method.)
    """

    def __init__(self, n: int, num_classes: int, hidden: int = 128, layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        self.n = n
        self.net = MLP(2 * n, hidden, num_classes, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU)

    def forward(self, weights: Tensor, values: Tensor) -> Tensor:
        if weights.dim() != 3 or weights.shape[-1] != self.n or values.shape != (weights.shape[0], self.n):
            raise ValueError(f"MaskedSetClassifier: need weights (B, k, {self.n}) and values (B, {self.n}), got "
                             f"{tuple(weights.shape)} and {tuple(values.shape)}")
        m = weights.sum(1)
        return self.net(torch.cat([m * values, m], -1))


class CNP(nn.Module):
    """Conditional neural process: ``r = mean_c enc([x_c, y_c])``, ``(μ, σ)(x) = dec([x, r])`` with
    ``σ = 0.05 + 0.95·softplus(·)``. ``forward(context (B, k, 2), x_target (B, m, 1)) -> (μ, σ)``, each ``(B, m)``."""

    def __init__(self, hidden: int = 128, layer: str = "monarch", nblocks: int = 4):
        super().__init__()
        self.enc = MLP(2, hidden, hidden, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU)
        self.dec = MLP(1 + hidden, hidden, 2, depth=2, layer=layer, nblocks=nblocks, activation=nn.GELU)

    def forward(self, context: Tensor, x_target: Tensor) -> tuple[Tensor, Tensor]:
        _check_set(context, 2, "CNP")
        _check_set(x_target, 1, "CNP")
        r = _per_element(self.enc, context).mean(1)
        out = _per_element(self.dec, torch.cat([x_target, r[:, None].expand(-1, x_target.shape[1], -1)], -1))
        return out[..., 0], 0.05 + 0.95 * F.softplus(out[..., 1])

    @staticmethod
    def nll(mu: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        """Mean Gaussian negative log-likelihood per target point."""
        return (torch.log(sigma) + 0.5 * ((y - mu) / sigma) ** 2 + 0.5 * math.log(2 * math.pi)).mean()


def image_to_set(images: Tensor) -> Tensor:
    """``(N, 1, H, W)`` or ``(N, H, W)`` images in [0, 1] -> pixel sets ``(N, H·W, 3)`` of
    ``(row/(H−1), col/(W−1), value)``, row-major."""
    if images.dim() == 4:
        images = images[:, 0]
    if images.dim() != 3:
        raise ValueError(f"image_to_set: images must be (N, 1, H, W) or (N, H, W), got {tuple(images.shape)}")
    n, hh, ww = images.shape
    rows, cols = torch.meshgrid(torch.arange(hh) / max(hh - 1, 1), torch.arange(ww) / max(ww - 1, 1), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, hh * ww, 2).expand(n, -1, -1).to(images.dtype)
    return torch.cat([coords, images.reshape(n, hh * ww, 1)], -1)


def gp_functions(num: int, points: int = 100, *, generator: Optional[torch.Generator] = None,
                 lengthscale=(0.5, 1.0)) -> Tensor:
    """``num`` samples of a GP with RBF kernel (unit variance, lengthscale ~ U(lengthscale)) on an even grid
    of ``points`` in [-2, 2]: sets ``(num, points, 2)`` of ``(x, f(x))``."""
    x = torch.linspace(-2, 2, points, dtype=torch.float64)
    ell = torch.empty(num, 1, 1, dtype=torch.float64).uniform_(*lengthscale, generator=generator)
    cov = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / ell ** 2) + 1e-5 * torch.eye(points, dtype=torch.float64)
    f = (torch.linalg.cholesky(cov) @ torch.randn(num, points, 1, generator=generator, dtype=torch.float64))[..., 0]
    return torch.stack([x.expand(num, -1), f], -1).float()


def classify_loss(task, weights, d, y):
    return F.cross_entropy(task(weights, d[..., 2]), y)


def classify_metric(task, sub, d, y):
    return {"accuracy": float((task(sub.weights, d[..., 2]).argmax(-1) == y).float().mean()), "n": len(d)}


def function_loss(task, weights, d, _):
    mu, sigma = task(weights @ d, d[..., :1])
    return CNP.nll(mu, sigma, d[..., 1])


def function_metric(task, sub, d, _):
    mu, sigma = task(sub.elements, d[..., :1])
    return {"mse": float((mu - d[..., 1]).pow(2).mean()), "nll": float(CNP.nll(mu, sigma, d[..., 1])), "n": len(d)}
