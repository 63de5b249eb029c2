"""Multi-exit training loss: weighted cross-entropy per exit, optional self-distillation.

Self-distillation follows Zhang et al., "Be Your Own Teacher" (ICCV 2019): each early exit
also matches the last exit's softened distribution (teacher detached), scaled by T².
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MultiExitLoss", "LossParts"]


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor  # scalar, what backward() sees
    per_exit: tuple[float, ...]  # cross-entropy of each exit (for logging)


@dataclass(frozen=True, kw_only=True)
class MultiExitLoss:
    distill_alpha: float = 0.0
    """Share of each early exit's loss that comes from distilling the last exit (0 = off)."""
    temperature: float = 3.0
    """Softening temperature of the distillation targets."""

    def __call__(self, exit_logits: Sequence[torch.Tensor], y: torch.Tensor, weights: Sequence[float]) -> LossParts:
        """exit_logits: K x [B, C]; y: [B]; weights: K per-exit weights (annealed by training)."""
        if len(weights) != len(exit_logits):
            raise ValueError(f"need {len(exit_logits)} exit weights, got {len(weights)}")
        last = len(exit_logits) - 1
        teacher = F.softmax(exit_logits[last].detach() / self.temperature, dim=1)  # [B, C]
        total = exit_logits[0].new_zeros(())
        ces = []
        for k, z in enumerate(exit_logits):
            ce = F.cross_entropy(z, y)
            ces.append(float(ce.detach()))
            term = ce
            if self.distill_alpha and k < last:
                kd = F.kl_div(F.log_softmax(z / self.temperature, dim=1), teacher, reduction="batchmean")
                term = (1 - self.distill_alpha) * ce + self.distill_alpha * self.temperature**2 * kd
            total = total + weights[k] * term
        return LossParts(total=total / sum(weights), per_exit=tuple(ces))
