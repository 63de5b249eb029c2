"""Dynamic networks: config, backbones (registered explicitly here), MAC accounting."""

from dynray.models import backbones as backbones  # registers "cnn" and "mlp"
from dynray.models.build import build, model_from_state
from dynray.models.config import DynamicNetConfig, config_from_dict, config_to_dict
from dynray.models.dynamic import DynamicNet, ExitOutput, StopAtExit, StopRule
from dynray.models.losses import MultiExitLoss
from dynray.models.macs import MacProfile

__all__ = [
    "DynamicNetConfig",
    "DynamicNet",
    "ExitOutput",
    "MacProfile",
    "MultiExitLoss",
    "StopAtExit",
    "StopRule",
    "build",
    "config_from_dict",
    "config_to_dict",
    "model_from_state",
]
