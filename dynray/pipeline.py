"""The main job's steps as library calls: train, calibrate, benchmark.

Jobs and the CLI call these; each one reads from and writes to the model registry, so the
steps can run in separate processes (or separate Ray jobs) one after another.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from dynray.bench import merge_section
from dynray.bench.core import CoreBenchConfig, bench_core
from dynray.bench.drift import quantise
from dynray.bench.static import MapFn, StaticSweepConfig, sweep, train_serially
from dynray.data import Split, load_dataset
from dynray.augment import random_affine
from dynray.drift import REFERENCE_KEY, DriftReference, reference_from
from dynray.evaluation import collect_exit_outputs, simulate
from dynray.store import load_model, save_model
from dynray.models.config import config_to_dict
from dynray.registry import ModelInfo, ModelRegistry
from dynray.thresholds import CalibrationResult, CalibrationTarget, ThresholdRule, calibrate
from dynray.training import TrainConfig, TrainOutcome, fit

__all__ = ["model_name", "train_and_register", "calibrate_and_register", "drift_reference", "sweep_recipe", "bench_and_write"]
log = logging.getLogger(__name__)


def model_name(dataset: str) -> str:
    return f"dynnet-{dataset}"


def _train_summary(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["model"] = config_to_dict(cfg.model_config())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def train_and_register(
    cfg: TrainConfig, registry: ModelRegistry, *, name: str | None = None, parent: str | None = None,
    init_state: dict[str, torch.Tensor] | None = None, val: Split | None = None, synthetic: Split | None = None, extra: dict | None = None,
) -> tuple[ModelInfo, TrainOutcome]:
    """Train with Ray Train, evaluate on val and register the model with default thresholds.

    ``val`` may be passed by a caller that already loaded it (as a pre-flight check);
    ``synthetic`` images join the training split (``dynray train --synthetic``); ``extra``
    goes into the registered meta.
    """
    if val is None:
        val = load_dataset(cfg.dataset, "val", root=cfg.data_root)  # missing files fail here, not in a worker
    outcome = fit(cfg, init_state=init_state, synthetic=synthetic)
    rec = collect_exit_outputs(outcome.model, val.images, val.labels)
    rule = ThresholdRule(thresholds=(cfg.threshold_end,) * (outcome.model.num_exits - 1))
    adaptive = simulate(rec, rule)
    metrics = {
        "val_exit_accuracy": rec.exit_accuracy(),
        "val_accuracy_full": rec.exit_accuracy()[-1],
        "val_accuracy_adaptive": adaptive.accuracy,
        "val_macs_adaptive": adaptive.mean_macs,
        "train_seconds": outcome.seconds,
        "epochs": cfg.epochs,
    }
    info = save_model(
        registry, name or model_name(cfg.dataset), outcome.model, dataset=cfg.dataset, rule=rule, metrics=metrics,
        extra={"training": _train_summary(cfg), "history": outcome.history, "thresholds_source": "training default (uncalibrated)", **(extra or {})},
        parent=parent,
    )
    log.info("registered %s (val accuracy %.4f at the last exit)", info.ref, metrics["val_accuracy_full"])
    return info, outcome


def calibrate_and_register(registry: ModelRegistry, ref: str | None, target: CalibrationTarget, *, data_root: str | None = None,
                           cv_folds: int = 5, cv_seed: int = 0) -> tuple[ModelInfo, CalibrationResult]:
    """Calibrate a registered model's thresholds on its val split; registers a child version.

    ``cv_folds``/``cv_seed``: the cross-validated choice of the rule family (0 folds: chosen
    on all of val); see :func:`dynray.thresholds.calibrate`.
    """
    stored = load_model(registry, ref)
    val = load_dataset(stored.dataset, "val", root=data_root)
    rec = collect_exit_outputs(stored.model, val.images, val.labels)
    res = calibrate(rec, target, cv_folds=cv_folds, cv_seed=cv_seed)
    calibration = {
        "target": dataclasses.asdict(target),
        "val_accuracy": res.val.accuracy,
        "val_reference_accuracy": res.reference_accuracy,
        "val_mean_macs": res.val.mean_macs,
        "val_macs_saving": rec.full_macs / res.val.mean_macs,
        "val_exit_fractions": list(res.val.exit_fractions),
        "sensitivity": [dataclasses.asdict(s) for s in res.sensitivity],
        "candidates": list(res.candidates),
        "cv_folds": res.cv_folds,
        "cv_seed": cv_seed,
        "cv": list(res.cv),
    }
    meta = stored.info.meta
    reference = drift_reference(stored.model, res.rule, val)
    info = save_model(
        registry, stored.info.name, stored.model, dataset=stored.dataset, rule=res.rule, metrics=meta.get("metrics", {}),
        extra={"training": meta.get("training"), "calibration": calibration, "thresholds_source": "calibrated", REFERENCE_KEY: reference.to_dict()},
        parent=stored.info.ref,
    )
    return info, res


def drift_reference(model, rule: ThresholdRule, val: Split, *, seed: int = 0) -> DriftReference:
    """What served traffic should look like, for the drift detector at the ingress: the val
    split and one copy of it under the training augmentation, answered by ``rule``."""
    gen = torch.Generator().manual_seed(seed)
    aug = quantise(random_affine(val.images, gen, hflip=val.images.shape[1] == 3))  # as a uint8 client sends it
    images = torch.cat([val.images, aug])
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model.forward_exits(images[i : i + 512], rule).logits.float(), dim=1) for i in range(0, len(images), 512)])
    return reference_from(images, probs, source=f"{val.name}/val+augmented")


def sweep_recipe(stored_meta: dict, dataset: str, data_root: str | None = None) -> TrainConfig:
    """The training recipe a model was trained with (its registry meta), for its static baselines:
    epochs, batch size, learning rate, weight decay, augmentation; one worker."""
    t = stored_meta.get("training") or {}
    keep = ("epochs", "batch_size", "lr", "weight_decay", "augment", "schedule")
    return TrainConfig(dataset=dataset, workers=1, data_root=data_root, **{k: t[k] for k in keep if k in t})


def bench_and_write(
    registry: ModelRegistry, ref: str | None, *, dataset: str | None, json_path: str | Path, plot_path: str | Path | None = None,
    cfg: CoreBenchConfig = CoreBenchConfig(), data_root: str | None = None, static: StaticSweepConfig | None = None, map_fn: MapFn = train_serially,
) -> dict:
    """Run the core bench on the test split and merge it into ``json_path``.

    With ``static``, the static-CNN sweep is trained first (``map_fn``: how; the nets already in
    ``$DYNRAY_HOME/bench/static-sweep.json`` for this recipe and data are reused) and the
    section holds both frontiers.
    """
    stored = load_model(registry, ref)
    name = dataset or stored.dataset
    test = load_dataset(name, "test", root=data_root)
    val, rows = None, None
    if static is not None:
        train, val = load_dataset(name, "train", root=data_root), load_dataset(name, "val", root=data_root)
        rows = sweep(train, test, sweep_recipe(stored.info.meta, name, data_root), static, cache=registry.home / "bench" / "static-sweep.json", map_fn=map_fn)
    plot = plot_path or Path(json_path).with_name(Path(json_path).stem + "_core.png")
    section = bench_core(stored, test, cfg=cfg, plot=plot, val=val, static_rows=rows)
    merge_section(json_path, "core", section)
    return section
