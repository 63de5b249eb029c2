"""Batch-level data augmentation: one vectorised random affine warp per batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["random_affine"]


def random_affine(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
    hflip: bool = False,
) -> torch.Tensor:
    """Random rotation, scale, shift (and optional horizontal flip) per sample.

    x: [B, C, H, W] -> [B, C, H, W]. ``translate`` is a fraction of the image size.
    """
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen)  # [B, 4] uniform draws
    ang = (u[:, 0] * 2 - 1) * math.radians(degrees)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx, ty = (u[:, 2] * 2 - 1) * 2 * translate, (u[:, 3] * 2 - 1) * 2 * translate  # grid coords span 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    flip = torch.ones(b)
    if hflip:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
