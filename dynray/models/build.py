"""Config -> model, and model <-> registry record."""

from __future__ import annotations

import torch

from dynray.errors import IntegrityError
from dynray.models.config import DynamicNetConfig, config_from_dict
from dynray.models.dynamic import DynamicNet

__all__ = ["build", "model_from_state"]


def build(cfg: DynamicNetConfig) -> DynamicNet:
    """Build an untrained DynamicNet from its config."""
    return DynamicNet(cfg)


def model_from_state(config: dict, tensors: dict[str, torch.Tensor]) -> DynamicNet:
    """Rebuild a trained model from a saved config dict and its state dict (eval mode)."""
    model = build(config_from_dict(config))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise IntegrityError(
            "stored weights do not match the stored config",
            got={"missing": missing[:5], "unexpected": unexpected[:5]},
            fix="re-register the model with `dynray train`",
        )
    return model.eval()
