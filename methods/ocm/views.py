"""The 16 views of an image (4 local × 4 global rotations) with their pseudo-classes, and the random resized crop."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor



N_VIEWS = 16


def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a (N, C, H, W) image tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[2] != x.shape[3] or x.shape[3] % 2:
        raise ValueError(f"{name} must hold square images with an even side (N, C, H, H), got {tuple(x.shape)}")


def local_rotations(x: Tensor) -> Tensor:
    """The 4 local variants of ``x (N, C, H, W)``, stacked as ``(4N, C, H, W)`` in the official order:
    none, left half rotated by 180°, both halves rotated, right half rotated (each half ``H × W/2`` in place)."""
    _check_images(x)
    w2 = x.shape[3] // 2
    left, right = x[..., :w2], x[..., w2:]
    left_r, right_r = torch.rot90(left, 2, (2, 3)), torch.rot90(right, 2, (2, 3))
    return torch.cat([x, torch.cat([left_r, right], 3), torch.cat([left_r, right_r], 3),
                      torch.cat([left, right_r], 3)])


def rotation_views(x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The 16 views of every image and their pseudo-classes.

    ``x (N, C, H, H)``, ``y (N,)`` in ``[0, num_classes)`` -> views ``(16N, C, H, H)`` and labels ``(16N,)``.
    Block ``v = 4·g + l`` (rows ``v·N .. v·N + N − 1``) is local variant ``l`` (:func:`local_rotations`) turned by
    ``g`` quarter turns; its label is ``y + num_classes·v``.
    """
    _check_images(x)
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape) if isinstance(y, Tensor) else y!r}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must lie in [0, num_classes={num_classes})")
    local = local_rotations(x)
    views = torch.cat([torch.rot90(local, g, (2, 3)) for g in range(4)])
    labels = y.repeat(N_VIEWS) + num_classes * torch.arange(N_VIEWS, device=y.device).repeat_interleave(len(y))
    return views, labels


def random_resized_crop(x: Tensor, generator: torch.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """Per-image random resized crop back to the same size (bilinear, like the official ``RandomResizedCropLayer``):
    area fraction ``U(scale)``, log aspect ratio ``U(log ratio)``, uniform position."""
    _check_images(x)
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=generator)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * logr.exp()).sqrt().clamp(max=1.0)
    h = (area / logr.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
