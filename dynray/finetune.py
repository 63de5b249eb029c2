"""Fine-tuning helpers: which stages train when, and learning rates per part.

Freezing works through per-parameter-group learning-rate masks rather than
``requires_grad``: DistributedDataParallel fixes its set of gradient buckets when it
wraps the model, so toggling ``requires_grad`` later (gradual unfreezing) would break it.
A group with learning rate 0 under AdamW gets neither an update nor weight decay. Frozen
stages also stay in eval mode, so their BatchNorm statistics do not drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dynray.errors import ConfigError

__all__ = ["FinetuneConfig", "trainable_stages", "param_groups", "set_frozen_modes"]


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How to fine-tune a registered model."""

    freeze_backbone: bool = False
    """Train only the exit heads (every stage frozen)."""
    unfreeze_last: int = 0
    """Train the last N stages with the heads; 0 with freeze_backbone=False trains all stages."""
    gradual: bool = False
    """Gradual unfreezing (ULMFiT): start with the heads only, unfreeze one more stage, from the last, every epoch."""
    head_lr: float = 1e-3
    """Learning rate of the exit heads."""
    backbone_lr: float = 1e-4
    """Learning rate of the unfrozen backbone stages (discriminative fine-tuning)."""

    def __post_init__(self) -> None:
        if self.unfreeze_last < 0:
            raise ConfigError("unfreeze_last must be >= 0", got=self.unfreeze_last, fix="give the number of final stages to train")
        if self.freeze_backbone and (self.unfreeze_last or self.gradual):
            raise ConfigError("freeze_backbone contradicts unfreeze_last/gradual", got=self, fix="use one of them")
        if self.head_lr <= 0 or self.backbone_lr < 0:
            raise ConfigError("learning rates must be positive", got=(self.head_lr, self.backbone_lr), fix="e.g. --head-lr 1e-3 --backbone-lr 1e-4")


def trainable_stages(ft: FinetuneConfig | None, num_stages: int, epoch: int) -> frozenset[int]:
    """Indices of the stages that train at ``epoch`` (exit heads always train)."""
    every = frozenset(range(num_stages))
    if ft is None:
        return every
    if ft.freeze_backbone:
        return frozenset()
    if ft.gradual:
        limit = ft.unfreeze_last or num_stages
        n = min(epoch, limit)  # epoch 0: heads only, then one more stage per epoch
        return frozenset(range(num_stages - n, num_stages))
    if ft.unfreeze_last:
        return frozenset(range(max(0, num_stages - ft.unfreeze_last), num_stages))
    return every


def param_groups(stages: nn.ModuleList, exits: nn.ModuleList, *, head_lr: float, backbone_lr: float) -> list[dict]:
    """One optimizer group per stage (tagged ``stage=k``) plus one for all exit heads."""
    groups = [{"params": list(s.parameters()), "lr": backbone_lr, "stage": k} for k, s in enumerate(stages)]
    groups.append({"params": list(exits.parameters()), "lr": head_lr, "stage": None})
    return groups


def set_frozen_modes(stages: nn.ModuleList, trainable: frozenset[int]) -> None:
    """Put frozen stages in eval mode (BatchNorm statistics stay fixed)."""
    for k, s in enumerate(stages):
        s.train(k in trainable)
