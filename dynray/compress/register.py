"""Register an edge variant as a child version: thresholds calibrated to the parent's target
on val, a drift reference, and its size, latency and accuracy next to the parent's."""

from __future__ import annotations

import dataclasses

from dynray.compress.variants import VariantStats
from dynray.data import Split
from dynray.drift import REFERENCE_KEY
from dynray.evaluation import collect_exit_outputs
from dynray.models.dynamic import DynamicNet
from dynray.pipeline import drift_reference
from dynray.registry import ModelInfo, ModelRegistry
from dynray.store import StoredModel, save_model
from dynray.thresholds import CalibrationTarget, calibrate

__all__ = ["register_variant"]


def register_variant(registry: ModelRegistry, parent: StoredModel, model: DynamicNet, *, method: str, val: Split, stats: VariantStats, details: dict) -> ModelInfo:
    """Calibrate ``model`` to the parent's calibration target on val and register it as a child."""
    target = CalibrationTarget(**parent.info.meta.get("calibration", {}).get("target", {"max_drop": 0.005}))
    rec = collect_exit_outputs(model, val.images, val.labels)
    res = calibrate(rec, target)
    compression = {"method": method, "parent": parent.info.ref, **stats.to_dict(), **details}
    calibration = {"target": dataclasses.asdict(target), "val_accuracy": res.val.accuracy, "val_reference_accuracy": res.reference_accuracy,
                   "val_mean_macs": res.val.mean_macs, "val_macs_saving": rec.full_macs / res.val.mean_macs, "val_exit_fractions": list(res.val.exit_fractions)}
    return save_model(
        registry, f"{parent.info.name}-{method}", model, dataset=parent.dataset, rule=res.rule,
        metrics={"val_accuracy_full": rec.exit_accuracy()[-1], "val_exit_accuracy": rec.exit_accuracy()},
        extra={"compression": compression, "calibration": calibration, "thresholds_source": "calibrated", REFERENCE_KEY: drift_reference(model, res.rule, val).to_dict()},
        parent=parent.info.ref,
    )
