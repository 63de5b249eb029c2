"""DynamicNet <-> model registry: what a stored model holds and how it comes back."""

from __future__ import annotations

from dataclasses import dataclass

from dynray.compress.quant import int8_from_state, int8_state, is_int8
from dynray.errors import IntegrityError
from dynray.models.build import build
from dynray.models.build import model_from_state
from dynray.models.config import config_from_dict, config_to_dict
from dynray.models.dynamic import DynamicNet
from dynray.registry import ModelInfo, ModelRegistry, RegistryReader
from dynray.thresholds import ThresholdRule

__all__ = ["INT8_FORMAT", "StoredModel", "save_model", "load_model"]

INT8_FORMAT = "int8-torch.ao"
"""``meta["weights_format"]`` of an int8 variant (:mod:`dynray.compress.quant`); absent = float32 state dict."""


@dataclass(frozen=True)
class StoredModel:
    model: DynamicNet  # eval mode, complexity statistics restored
    rule: ThresholdRule | None  # calibrated (or training-default) stop rule
    info: ModelInfo

    @property
    def dataset(self) -> str:
        return self.info.meta["dataset"]


def save_model(
    registry: ModelRegistry,
    name: str,
    model: DynamicNet,
    *,
    dataset: str,
    rule: ThresholdRule | None,
    metrics: dict,
    extra: dict | None = None,
    parent: str | None = None,
) -> ModelInfo:
    """Register weights (incl. complexity buffers) with config, thresholds and stats."""
    meta = {
        "kind": "dynamic_net",
        "config": config_to_dict(model.cfg),
        "dataset": dataset,
        "metrics": metrics,
        "thresholds": rule.to_dict() if rule else None,
        "complexity": model.complexity.stats(),
        "macs": {"stage": list(model.mac_profile.stage), "exit": list(model.mac_profile.exit), "full": model.mac_profile.full},
        **(extra or {}),
    }
    if is_int8(model):  # int8 values, scales and zero points as plain tensors (safetensors holds no quantised dtype)
        meta["weights_format"] = INT8_FORMAT
        meta["int8_engine"] = getattr(model, "int8_engine", "x86")
        return registry.register(name, int8_state(model), meta, parent=parent)
    return registry.register(name, {k: v.detach().cpu() for k, v in model.state_dict().items()}, meta, parent=parent)


def load_model(registry: RegistryReader, ref: str | None = None) -> StoredModel:
    """Load and verify a registered DynamicNet (``ref=None``: production, else newest)."""
    loaded = registry.load(ref)
    meta = loaded.info.meta
    if meta.get("kind") != "dynamic_net" or "config" not in meta:
        raise IntegrityError("registry entry is not a DynamicNet", got=loaded.info.ref, fix="pick a model registered by `dynray train`")
    if meta.get("weights_format") == INT8_FORMAT:
        try:
            model = int8_from_state(build(config_from_dict(meta["config"])), loaded.tensors, engine=meta.get("int8_engine", "x86"))
        except (KeyError, RuntimeError) as e:
            raise IntegrityError("stored int8 weights do not match the stored config", got=str(e)[:200], fix="re-create the variant with `dynray compress int8`") from e
    else:
        model = model_from_state(meta["config"], loaded.tensors)
    rule = ThresholdRule.from_dict(meta["thresholds"]) if meta.get("thresholds") else None
    return StoredModel(model=model, rule=rule, info=loaded.info)
