"""Inference-time BatchNorm folding.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be
folded into the convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``).
The result computes the same function (to float rounding) with one pass over the
activations fewer; MAC counts do not change (bias adds are not MACs).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dynray.models.dynamic import DynamicNet

__all__ = ["fused_copy"]


def _fuse_sequential(seq: nn.Sequential) -> None:
    mods = list(seq)
    for i in range(len(mods) - 1):
        if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
            seq[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
            seq[i + 1] = nn.Identity()
    for m in seq:
        if isinstance(m, nn.Sequential):
            _fuse_sequential(m)


def fused_copy(model: DynamicNet) -> DynamicNet:
    """An eval-mode copy of ``model`` with every Conv2d+BatchNorm2d pair folded."""
    fused = copy.deepcopy(model).eval()
    for part in (*fused.stages, *fused.exits):
        if isinstance(part, nn.Sequential):
            _fuse_sequential(part)
    return fused
