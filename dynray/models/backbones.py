"""Backbone registry: each entry turns a config into stages and exit heads.

A backbone returns ``(stages, exits)``, two ``nn.ModuleList`` of equal length: stage k maps
the running features to the next ones, and exit k maps stage k's output to class logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dynray.errors import ConfigError, UnknownNameError
from dynray.models.config import DynamicNetConfig
from dynray.models.moe import MoEBlock

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


class _Pool(nn.Module):
    """Average pooling by an integer factor, as a sum of strided slices.

    Same result as ``nn.AvgPool2d(f)``; on this CPU the NCHW pooling kernel is ~5x slower
    than these adds of contiguous views, and this pooling sits on the cheapest exit's hot path.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> [B, C, H/f, W/f]; sum neighbours along W, then along H, through
        # views whose innermost reads stay contiguous
        b, c, h, w = x.shape
        f = self.factor
        xw = x.reshape(b, c, h, w // f, f)
        acc = xw[..., 0]
        for j in range(1, f):
            acc = acc + xw[..., j]  # [B, C, H, W/f]
        xh = acc.view(b, c, h // f, f, w // f)
        out = xh[:, :, :, 0]
        for i in range(1, f):
            out = out + xh[:, :, :, i]  # [B, C, H/f, W/f]
        return out * (1.0 / (f * f))


def _pool(size: int, target: int) -> nn.Module:
    if size == target:
        return nn.Identity()
    if size % target == 0:
        return _Pool(size // target)
    return nn.AdaptiveAvgPool2d(target)


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
    """Conv-BN-ReLU stages; every stage but the last halves the resolution (a strided first
    conv, or a 2x2 max-pool at the end). An MoE stage ends its convs with an MoE block.

    Early exits average-pool to ``exit_pool``² and run a small MLP; the last exit is global
    average pooling plus a linear layer, as in ResNet.
    """
    c_in, h, w = cfg.input_shape
    stages, exits = nn.ModuleList(), nn.ModuleList()
    for k, (width, n_layers) in enumerate(zip(cfg.widths, cfg.layers, strict=True)):
        final = k == cfg.num_exits - 1
        body: list[nn.Module] = []
        for i in range(n_layers):
            ks = cfg.stem_kernel if k == 0 and i == 0 else cfg.stage_kernel(k)
            stride = cfg.strides[k] if i == 0 else 1
            body += [
                nn.Conv2d(c_in, width, ks, stride=stride, padding=ks // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            c_in = width
            if stride > 1:
                h, w = (h + 1) // 2, (w + 1) // 2
        if cfg.moe is not None and k in cfg.moe.stages:
            body.append(MoEBlock(cfg.moe, kind="cnn", width=width, block=k, spatial=(h, w), kernel_size=cfg.stage_kernel(k)))
        if not final and cfg.strides[k] == 1:
            body.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        stages.append(nn.Sequential(*body))
        if final:
            exits.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), _head(width, cfg, final=True)))
        else:
            pool = min(cfg.exit_pool, h, w)
            pooler = _pool(h, pool) if h == w else nn.AdaptiveAvgPool2d(pool)
            exits.append(nn.Sequential(pooler, _head(width * pool * pool, cfg, final=False)))
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
        if cfg.moe is not None and k in cfg.moe.stages:
            body.append(MoEBlock(cfg.moe, kind="mlp", width=width, block=k))
        stages.append(nn.Sequential(*body))
        exits.append(_head(width, cfg, final=k == cfg.num_exits - 1))
    return stages, exits
