"""The default DynamicNet of each architecture family, per dataset.

``dense`` is the default staged CNN (wider stages for 3-channel data), ``moe`` the
foundation's 3-stage network whose last stage ends in a mixture-of-experts block, and
``moe-dense`` that MoE network's dense twin at equal active MACs (what the MoE bench compares against).

The 1-channel dense default has four stages, 8-16-64-128 wide: its first two exits cost 65k
and 172k MACs, so easy digits leave cheaply, and the last stage keeps the full network's
accuracy (2.65M MACs). The foundation's 3-stage net (16-32-64, first exit at 129k MACs)
reached 0.50 / 0.67 / 0.63x the static frontier's MACs at its worst point from 0.975 up,
for seeds 0 / 1 / 2 on mnist-5k; this one 0.34 / 0.27 / 0.32x, at a last-exit accuracy of
0.988 / 0.988 / 0.982 (against 0.990 / 0.984 / 0.987); ``dynray bench core`` measures it.
"""

from __future__ import annotations

from dataclasses import replace

from dynray.data import dataset_spec
from dynray.errors import ConfigError
from dynray.models.config import DynamicNetConfig
from dynray.models.moe import MoEConfig

__all__ = ["ARCHS", "default_model_config", "foundation_model_config", "default_moe_config", "model_config_for"]


def default_model_config(dataset: str) -> DynamicNetConfig:
    """The default DynamicNet for a dataset's input shape (see the module docstring)."""
    spec = dataset_spec(dataset)
    if spec.input_shape[0] == 3:  # CIFAR: wider stages
        return foundation_model_config(dataset)
    return DynamicNetConfig(input_shape=spec.input_shape, num_classes=spec.num_classes, widths=(8, 16, 64, 128), layers=(1, 1, 1, 2), strides=(2, 2, 1, 1))


def foundation_model_config(dataset: str) -> DynamicNetConfig:
    """The foundation's 3-stage DynamicNet (16-32-64; 32-64-128 for 3-channel data): the MoE family's base."""
    spec = dataset_spec(dataset)
    if spec.input_shape[0] == 3:
        return DynamicNetConfig(input_shape=spec.input_shape, num_classes=spec.num_classes, widths=(32, 64, 128), layers=(1, 2, 2), strides=(1, 1, 1), stem_kernel=3)
    return DynamicNetConfig(input_shape=spec.input_shape, num_classes=spec.num_classes)


def default_moe_config(dataset: str, moe: MoEConfig | None = None) -> DynamicNetConfig:
    """``--arch moe``: the default DynamicNet whose last stage ends in an MoE block.

    The last stage gives up one conv layer for the block: one shared expert plus the top-1
    of 4 routed experts (Switch gate), each a quarter of the stage width wide, so the active
    MACs per sample equal the dense default's (plus the gate's). On mnist-5k (5 seeds, 20
    epochs, one worker) this kept 98.60% mean test accuracy against its dense twin's 98.84%;
    noisy top-2 of 4 without a shared expert kept 98.46%.
    """
    base = foundation_model_config(dataset)
    last = base.num_exits - 1
    layers = base.layers[:last] + (max(1, base.layers[last] - 1),)
    return replace(base, layers=layers, moe=moe or MoEConfig(stages=(last,), gate="switch", top_k=1, shared_experts=1))


def model_config_for(dataset: str, arch: str) -> DynamicNetConfig:
    """The default model of an architecture family: ``dense``, ``moe`` or ``moe-dense``
    (the MoE model's dense twin at equal active MACs, what the MoE bench compares against)."""
    if arch == "dense":
        return default_model_config(dataset)
    moe_cfg = default_moe_config(dataset)
    if arch == "moe":
        return moe_cfg
    if arch == "moe-dense":
        assert moe_cfg.moe is not None
        return replace(moe_cfg, moe=moe_cfg.moe.dense_equivalent())
    raise ConfigError("unknown architecture family", got=arch, fix=f"use one of {', '.join(ARCHS)}")


ARCHS = ("dense", "moe", "moe-dense")
