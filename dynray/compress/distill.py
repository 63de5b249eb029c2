"""Knowledge distillation from a teacher DynamicNet into a smaller student.

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): the student's loss is
``(1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``. Here
every exit of the student learns from the teacher's final exit (the most accurate answer
it has), on top of the student's own multi-exit loss; the recipe (optimiser, schedule,
augmentation) is training's own (:func:`dynray.training.train_local`), so a student trained
from scratch with ``alpha = 0`` is the fair comparison.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynray.errors import ConfigError
from dynray.models.config import DynamicNetConfig
from dynray.models.dynamic import DynamicNet

__all__ = ["Distillation", "student_config"]


def student_config(teacher: DynamicNetConfig, width_mult: float = 0.5) -> DynamicNetConfig:
    """The teacher's architecture with every stage ``width_mult`` as wide (at least 4 channels)."""
    if not 0.0 < width_mult <= 1.0:
        raise ConfigError("the student width multiplier must be in (0, 1]", got=width_mult, fix="e.g. --student-width 0.5")
    return dataclasses.replace(teacher, widths=tuple(max(4, round(w * width_mult)) for w in teacher.widths))


@dataclass(frozen=True, kw_only=True)
class Distillation:
    """A ``train_epoch`` extra loss: distil ``teacher``'s final exit into every student exit."""

    teacher: DynamicNet
    alpha: float = 0.7
    """Share of the loss that comes from the teacher (0 = the student alone, from scratch)."""
    temperature: float = 4.0
    """Softening temperature of both distributions."""
    last_exit_only: bool = False
    """Distil into the student's last exit only (its early exits still self-distil); False = every exit."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("the distillation weight alpha must be in [0, 1]", got=self.alpha, fix="e.g. --alpha 0.7")
        if self.temperature <= 0:
            raise ConfigError("the distillation temperature must be positive", got=self.temperature, fix="e.g. --temperature 4")
        self.teacher.eval()

    def __call__(self, xb: torch.Tensor, exit_logits: list[torch.Tensor], yb: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        # xb: [b, C, H, W] the augmented batch the student saw; exit_logits: K x [b, classes]
        if self.alpha == 0.0:
            return loss
        with torch.no_grad():
            target = F.softmax(self.teacher(xb)[-1] / self.temperature, dim=1)  # [b, classes]
        t2 = self.temperature**2
        zs = exit_logits[-1:] if self.last_exit_only else exit_logits
        kd = sum(F.kl_div(F.log_softmax(z / self.temperature, dim=1), target, reduction="batchmean") for z in zs) / len(zs)
        return (1.0 - self.alpha) * loss + self.alpha * t2 * kd
