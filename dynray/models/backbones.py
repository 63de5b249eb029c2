"""Backbone registry: each entry turns a config into stages and exit heads.

A backbone returns ``(stages, exits)``, two ``nn.ModuleList`` of equal length: stage k maps
the running features to the next ones, and exit k maps stage k's output to class logits.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dynray.errors import ConfigError, UnknownNameError
from dynray.models.config import DynamicNetConfig

__all__ = ["BACKBONES", "register_backbone", "make_backbone"]

BackboneFn = Callable[[DynamicNetConfig], tuple[nn.ModuleList, nn.ModuleList]]
BACKBONES: dict[str, BackboneFn] = {}


def register_backbone(name: str) -> Callable[[BackboneFn], BackboneFn]:
    """Decorator: register a backbone builder under ``name`` (duplicates raise)."""

    def deco(fn: BackboneFn) -> BackboneFn:
        if name in BACKBONES:
            raise ConfigError("backbone registered twice", got=name, fix="pick a new name")
        BACKBONES[name] = fn
        return fn

    return deco


def make_backbone(cfg: DynamicNetConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
    if cfg.backbone not in BACKBONES:
        raise UnknownNameError("backbone", cfg.backbone, BACKBONES)
    return BACKBONES[cfg.backbone](cfg)


def _head(in_features: int, cfg: DynamicNetConfig, *, final: bool) -> nn.Sequential:
    """Exit head MLP on flattened features. The final exit is a single linear layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    if cfg.exit_hidden and not final:
        layers += [nn.Linear(in_features, cfg.exit_hidden), nn.ReLU(inplace=True)]
        in_features = cfg.exit_hidden
    if cfg.dropout:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(in_features, cfg.num_classes))
    return nn.Sequential(*layers)


@register_backbone("cnn")
def cnn_backbone(cfg: DynamicNetConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Conv-BN-ReLU stages; every stage but the last halves the resolution (max-pool 2, or the
    strided stem in stage 1).

    Early exits average-pool to ``exit_pool``² and run a small MLP; the last exit is global
    average pooling plus a linear layer, as in ResNet.
    """
    c_in, h, w = cfg.input_shape
    stages, exits = nn.ModuleList(), nn.ModuleList()
    for k, (width, n_layers) in enumerate(zip(cfg.widths, cfg.layers, strict=True)):
        final = k == cfg.num_exits - 1
        body: list[nn.Module] = []
        for i in range(n_layers):
            stem = k == 0 and i == 0
            ks, stride = (cfg.stem_kernel, cfg.stem_stride) if stem else (cfg.kernel_size, 1)
            body += [
                nn.Conv2d(c_in, width, ks, stride=stride, padding=ks // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            c_in = width
            if stride > 1:
                h, w = (h + 1) // 2, (w + 1) // 2
        if not final and not (k == 0 and cfg.stem_stride > 1):
            body.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        stages.append(nn.Sequential(*body))
        if final:
            exits.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), _head(width, cfg, final=True)))
        else:
            pool = min(cfg.exit_pool, h, w)
            exits.append(nn.Sequential(nn.AdaptiveAvgPool2d(pool), _head(width * pool * pool, cfg, final=False)))
    return stages, exits


@register_backbone("mlp")
def mlp_backbone(cfg: DynamicNetConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Linear-ReLU stages over flattened inputs; each exit is a head on the stage output."""
    d_in = 1
    for s in cfg.input_shape:
        d_in *= s
    stages, exits = nn.ModuleList(), nn.ModuleList()
    for k, (width, n_layers) in enumerate(zip(cfg.widths, cfg.layers, strict=True)):
        body: list[nn.Module] = [nn.Flatten()] if k == 0 else []
        for _ in range(n_layers):
            body += [nn.Linear(d_in, width), nn.ReLU(inplace=True)]
            d_in = width
        stages.append(nn.Sequential(*body))
        exits.append(_head(width, cfg, final=k == cfg.num_exits - 1))
    return stages, exits
