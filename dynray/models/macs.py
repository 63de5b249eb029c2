"""Exact multiply-accumulate (MAC) counts per stage and per exit head.

Counted analytically from the shapes seen in one probe forward pass, for the layers that
carry the arithmetic: Conv2d (out_elems · in_ch/groups · kh · kw) and Linear (in · out per
row). BatchNorm, ReLU, pooling and bias adds are not MACs; this is the same convention as
``torch.utils.flop_counter.FlopCounterMode`` (which reports 2 FLOPs per MAC), and the tests
cross-check the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MacProfile", "module_macs"]


@dataclass(frozen=True)
class MacProfile:
    """MACs per sample of each stage and exit head, and the cumulative cost of each exit."""

    stage: tuple[int, ...]
    exit: tuple[int, ...]

    @property
    def cumulative(self) -> tuple[int, ...]:
        """Cost of leaving at exit k: stages 0..k plus exit heads 0..k (all were evaluated)."""
        out, total = [], 0
        for s, e in zip(self.stage, self.exit, strict=True):
            total += s + e
            out.append(total)
        return tuple(out)

    @property
    def full(self) -> int:
        """The plain network: every stage and only the last exit head."""
        return sum(self.stage) + self.exit[-1]


def module_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """MACs per sample of ``module`` on input ``x`` [B, ...], and its output."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out[0].numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out[0].numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            y = module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total, y
