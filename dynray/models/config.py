"""The DynamicNet configuration: a frozen dataclass saved with the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dynray.errors import ConfigError
from dynray.models.gating import MoEConfig

__all__ = ["DynamicNetConfig", "config_to_dict", "config_from_dict"]


@dataclass(frozen=True, kw_only=True)
class DynamicNetConfig:
    """A staged backbone with one exit head after every stage."""

    backbone: str = "cnn"
    """Backbone family from the backbone registry: "cnn" (images) or "mlp" (flat inputs)."""
    input_shape: tuple[int, ...] = (1, 28, 28)
    """Input shape without the batch axis: (C, H, W) for images, or (D,) for the MLP."""
    num_classes: int = 10
    """Number of output classes of every exit."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Per stage: conv channels (cnn) or hidden units (mlp). One stage and one exit per entry."""
    layers: tuple[int, ...] = (1, 1, 2)
    """Per stage: number of conv (or linear) layers."""
    kernel_size: int = 3
    """Convolution kernel size (cnn only); padding keeps the spatial size."""
    kernel_sizes: tuple[int, ...] | None = None
    """Per stage (cnn only): kernel size of the stage's convolutions (and its MoE experts);
    None = ``kernel_size`` everywhere. Architecture search picks these per stage."""
    stem_kernel: int = 5
    """Kernel size of the first convolution (cnn only)."""
    strides: tuple[int, ...] = (2, 2, 1)
    """Per stage (cnn only): stride (1 or 2) of the stage's first conv. Every stage but the last
    halves the resolution: by that strided conv when the stride is 2, else by a 2x2 max-pool at
    its end. The strided stem keeps the cheapest exit off full-resolution activation maps, which
    are memory-bound on CPU."""
    exit_pool: int = 7
    """Early exit heads average-pool the feature map to at most exit_pool x exit_pool (cnn only)."""
    exit_hidden: int = 64
    """Hidden units of the early exit heads' MLP; 0 makes them a single linear layer."""
    dropout: float = 0.0
    """Dropout before each exit head's last linear layer (training only)."""
    moe: MoEConfig | None = None
    """Mixture-of-experts stages (dynray.models.moe); None = a dense network."""

    def __post_init__(self) -> None:
        if len(self.widths) < 2:
            raise ConfigError("a DynamicNet needs at least 2 stages", got=self.widths, fix="give widths=(16, 32, 64)")
        if len(self.layers) != len(self.widths):
            raise ConfigError(
                "layers must have one entry per stage",
                got={"widths": self.widths, "layers": self.layers},
                fix=f"give {len(self.widths)} layer counts",
            )
        if min(self.widths) < 1 or min(self.layers) < 1:
            raise ConfigError("widths and layers must be positive", got=(self.widths, self.layers), fix="use values >= 1")
        if self.num_classes < 2:
            raise ConfigError("num_classes must be at least 2", got=self.num_classes, fix="set the dataset's class count")
        if self.backbone == "cnn" and len(self.input_shape) != 3:
            raise ConfigError("the cnn backbone needs input_shape (C, H, W)", got=self.input_shape, fix="use backbone='mlp' for flat inputs")
        if len(self.strides) != len(self.widths) or not set(self.strides) <= {1, 2}:
            raise ConfigError("strides need one value (1 or 2) per stage", got=self.strides, fix=f"give {len(self.widths)} values, e.g. (2, 2, 1)")
        if self.stem_kernel < 1 or self.stem_kernel % 2 == 0:
            raise ConfigError("stem_kernel must be odd and positive", got=self.stem_kernel, fix="use 3 or 5")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError("kernel_size must be odd and positive", got=self.kernel_size, fix="use 3 or 5")
        if self.kernel_sizes is not None and (len(self.kernel_sizes) != len(self.widths) or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes)):
            raise ConfigError("kernel_sizes need one odd, positive value per stage", got=self.kernel_sizes, fix=f"give {len(self.widths)} values, e.g. (3, 5, 3), or None")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout must be in [0, 1)", got=self.dropout, fix="use e.g. 0.1")
        if self.moe is not None and max(self.moe.stages) >= len(self.widths):
            raise ConfigError("an MoE stage index is past the last stage", got=self.moe.stages, fix=f"use 0-based stage indices below {len(self.widths)}")

    @property
    def num_exits(self) -> int:
        return len(self.widths)

    def stage_kernel(self, k: int) -> int:
        """Kernel size of stage ``k``'s convolutions (the stem excepted)."""
        return self.kernel_sizes[k] if self.kernel_sizes is not None else self.kernel_size


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_to_dict(cfg: DynamicNetConfig) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists; ``moe`` a nested dict or None)."""
    return _jsonable(dataclasses.asdict(cfg))


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields", got=sorted(unknown), fix=f"valid fields: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def config_from_dict(d: dict[str, Any]) -> DynamicNetConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are refused with the valid ones."""
    d = dict(d)
    if d.get("moe") is not None:
        d["moe"] = _from_dict(MoEConfig, d["moe"])
    return _from_dict(DynamicNetConfig, d)
