"""Per-sample input complexity features, vectorised over the batch.

Four cheap statistics of the raw image, each normalised to [0, 1] with bounds fitted on
the training split and stored as buffers beside the model weights, so a complexity
threshold means the same thing on every dataset:

- ``variance``: pixel variance (contrast),
- ``entropy``: Shannon entropy of the 16-bin intensity histogram, divided by log(16),
- ``density``: 1 - sparsity, the share of pixels above 0.1 (how much "ink"),
- ``edge_energy``: mean squared finite-difference gradient (Sobel-free, 2 subtractions/pixel).

Images of 16x16 pixels or more are measured after 2x2 average pooling (a coarser scale, a
quarter of the cost: this runs on every request).

A DynamicNet owns one :class:`ComplexityFeatures` module; stop rules read its normalised
output. Cost is a few element-wise passes over the input (no multiply-accumulates).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynray.errors import ConfigError

__all__ = ["FEATURE_NAMES", "ComplexityFeatures", "raw_features"]

FEATURE_NAMES: tuple[str, ...] = ("variance", "entropy", "density", "edge_energy")
_BINS = 16
_INK = 0.1
# Quantiles used as the [0,1] bounds: robust to a few outliers in the training split.
_LO_Q, _HI_Q = 0.01, 0.99


def raw_features(x: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) features.

    x: [B, C, H, W] or [B, D] in [0, 1]  ->  [B, 4] float32 (images >= 16 px: at half resolution)
    """
    b = x.shape[0]
    if x.dim() == 4 and x.shape[-1] >= 16 and x.shape[-2] >= 16:
        # measure on a 2x2 average-pooled image: the statistics describe the same structure
        # at a coarser scale, and the pass costs a quarter (it runs on every request)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        x = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) * 0.25
    flat = x.reshape(b, -1).float()  # [B, P]
    mean = flat.mean(dim=1)
    # E[x²] - E[x]²: one fused pass; torch.var is ~10x slower here and this is on the hot path
    variance = ((flat * flat).mean(dim=1) - mean * mean).clamp_min(0.0)  # [B]

    sub = flat
    bins = (sub.clamp(0.0, 1.0) * (_BINS - 1e-3)).to(torch.int64)  # [B, P/2] in 0..15
    counts = torch.zeros(b, _BINS, dtype=flat.dtype, device=flat.device)
    counts.scatter_add_(1, bins, torch.ones_like(sub))  # [B, 16]
    p = counts / sub.shape[1]
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1) / math.log(_BINS)  # [B]

    density = (flat > _INK).float().mean(dim=1)  # [B]

    if x.dim() == 4:
        gx = x[..., :, 1:] - x[..., :, :-1]  # [B, C, H, W-1]
        gy = x[..., 1:, :] - x[..., :-1, :]  # [B, C, H-1, W]
        edge = gx.pow(2).flatten(1).mean(1) + gy.pow(2).flatten(1).mean(1)  # [B]
    else:
        g = flat[:, 1:] - flat[:, :-1]  # flat inputs: 1-D differences
        edge = g.pow(2).mean(dim=1)
    return torch.stack([variance, entropy, density, edge], dim=1)  # [B, 4]


class ComplexityFeatures(nn.Module):
    """Normalised complexity features with bounds fitted on training data.

    The bounds are buffers, so they are saved in the model's safetensors file and
    restored with it.
    """

    def __init__(self) -> None:
        super().__init__()
        n = len(FEATURE_NAMES)
        self.register_buffer("lo", torch.zeros(n))
        self.register_buffer("hi", torch.ones(n))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, *, batch_size: int = 4096) -> "ComplexityFeatures":
        """Fit the [0,1] bounds on a training split: images [N, ...] in [0, 1]."""
        if images.shape[0] < 2:
            raise ConfigError(
                "complexity statistics need at least 2 training images",
                got=int(images.shape[0]),
                fix="fit on the training split",
            )
        raw = torch.cat([raw_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        self.lo.copy_(torch.quantile(raw, _LO_Q, dim=0))
        hi = torch.quantile(raw, _HI_Q, dim=0)
        self.hi.copy_(torch.maximum(hi, self.lo + 1e-6))
        self.fitted.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ...] -> normalised features [B, 4] in [0, 1]."""
        return ((raw_features(x) - self.lo) / (self.hi - self.lo)).clamp_(0.0, 1.0)

    def stats(self) -> dict[str, dict[str, float]]:
        """The fitted bounds as plain JSON, for the registry metadata."""
        return {
            name: {"lo": float(self.lo[i]), "hi": float(self.hi[i])} for i, name in enumerate(FEATURE_NAMES)
        }
