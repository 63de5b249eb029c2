"""Structured (channel) pruning of a dense CNN DynamicNet.

Each convolution keeps the output channels whose BatchNorm-folded filters have the largest
L1 norm (the filter the network really applies in eval mode is ``gamma / sqrt(var + eps) * W``,
so the raw norm alone would rank a channel that BN scales to nothing as important; Li et al.,
"Pruning Filters for Efficient ConvNets", ICLR 2017, rank by the raw L1 norm). The next
convolution and the exit head after the stage lose the matching input channels. The result
is a smaller *plain* DynamicNet (its config has the narrower widths), so it trains, calibrates,
registers and serves like any other; fine-tune it afterwards (:mod:`dynray.compress.finetune`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dynray.errors import ConfigError
from dynray.models.build import build
from dynray.models.dynamic import DynamicNet

__all__ = ["pruned_widths", "prune_channels", "channel_importance"]


def pruned_widths(widths: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """Widths after removing ``ratio`` of each stage's channels (at least one channel kept)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError("the pruning ratio must be in (0, 1)", got=ratio, fix="e.g. --ratio 0.5 removes half of every stage's channels")
    return tuple(max(1, round(w * (1.0 - ratio))) for w in widths)


def channel_importance(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """[C_out] L1 norm of each BN-folded filter."""
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()  # [C_out]
    return conv.weight.detach().abs().flatten(1).sum(1) * scale.detach()


def _conv_bn_pairs(stage: nn.Sequential) -> list[tuple[int, nn.Conv2d, nn.BatchNorm2d]]:
    mods = list(stage)
    pairs = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            if i + 1 >= len(mods) or not isinstance(mods[i + 1], nn.BatchNorm2d) or m.groups != 1:
                raise ConfigError("channel pruning needs every conv followed by a BatchNorm", got=type(mods[i + 1]).__name__ if i + 1 < len(mods) else None, fix="prune a dense cnn DynamicNet")
            pairs.append((i, m, mods[i + 1]))
    return pairs


def _copy_head(src: nn.Sequential, dst: nn.Sequential, keep: torch.Tensor, per_channel: int) -> None:
    """Copy an exit head, keeping the input features of the kept channels (flatten order C, H, W)."""
    cols = (keep[:, None] * per_channel + torch.arange(per_channel)[None, :]).flatten()  # [kept * P*P]
    first = True
    for s, d in zip(src.modules(), dst.modules(), strict=True):
        if isinstance(s, nn.Linear):
            w = s.weight.detach()[:, cols] if first else s.weight.detach()
            d.weight.copy_(w)
            d.bias.copy_(s.bias.detach())
            first = False


@torch.no_grad()
def prune_channels(model: DynamicNet, ratio: float = 0.5) -> DynamicNet:
    """A copy of ``model`` with ``ratio`` of every conv's output channels removed (eval mode).

    Only dense ``cnn`` models: MoE blocks and MLP stages are refused with the fix.
    """
    cfg = model.cfg
    if cfg.backbone != "cnn" or cfg.moe is not None:
        raise ConfigError("channel pruning supports dense cnn models", got={"backbone": cfg.backbone, "moe": cfg.moe is not None}, fix="prune a dense model (`dynray train --arch dense`), or use int8 or distillation for this one")
    new_cfg = dataclasses.replace(cfg, widths=pruned_widths(cfg.widths, ratio))
    small = build(new_cfg).eval()
    small.complexity.load_state_dict(model.complexity.state_dict())
    keep_in = torch.arange(cfg.input_shape[0])
    for k, (stage, sstage) in enumerate(zip(model.stages, small.stages, strict=True)):
        s_mods = list(sstage)
        for i, conv, bn in _conv_bn_pairs(stage):
            n_keep = new_cfg.widths[k]
            keep = torch.topk(channel_importance(conv, bn), n_keep).indices.sort().values  # [n_keep]
            sconv, sbn = s_mods[i], s_mods[i + 1]
            sconv.weight.copy_(conv.weight[keep][:, keep_in])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(sbn, name).copy_(getattr(bn, name)[keep])
            sbn.num_batches_tracked.copy_(bn.num_batches_tracked)
            keep_in = keep
        head, shead = model.exits[k], small.exits[k]
        lin = next(m for m in head.modules() if isinstance(m, nn.Linear))
        per_channel = lin.in_features // cfg.widths[k]
        _copy_head(head, shead, keep_in, per_channel)
    return small
