"""Ray Train: one epoch on mnist-5k with 2 data-parallel workers, then the pipeline steps."""

from __future__ import annotations

import pytest
import torch

from dynray.errors import UnknownNameError
from dynray.bench.core import CoreBenchConfig
from dynray.pipeline import bench_and_write, calibrate_and_register, train_and_register
from dynray.registry import ModelRegistry
from dynray.store import load_model
from dynray.thresholds import CalibrationTarget
from dynray.training import TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    registry = ModelRegistry(home)
    cfg = TrainConfig(epochs=1, workers=2, batch_size=8, augment=False, storage_path=str(home / "runs"))
    info, outcome = train_and_register(cfg, registry)
    return registry, info, outcome


def test_one_epoch_reaches_90_percent_test_accuracy(trained, mnist5k):
    _, info, outcome = trained
    test = mnist5k["test"]
    with torch.no_grad():
        acc = float((outcome.model.forward_full(test.images).argmax(1) == test.labels).float().mean())
    assert acc >= 0.9, f"test accuracy after one epoch: {acc:.4f}"
    assert len(outcome.history) == 1 and outcome.history[0]["steps"] > 0
    assert info.meta["training"]["workers"] == 2


def test_registered_model_round_trips(trained, mnist5k):
    registry, info, outcome = trained
    back = load_model(registry, info.ref)
    x = mnist5k["val"].images[:64]
    assert torch.equal(back.model.forward_full(x), outcome.model.forward_full(x))
    assert back.rule is not None and info.meta["complexity"]["entropy"]["hi"] > 0


def test_calibrate_then_bench(trained, mnist5k, tmp_path):
    registry, info, _ = trained
    cal, res = calibrate_and_register(registry, info.ref, CalibrationTarget(max_drop=0.01))
    assert cal.meta["parent"] == info.ref and cal.meta["thresholds_source"] == "calibrated"
    assert res.val.accuracy >= res.reference_accuracy - 0.01 - 1e-9
    registry.promote(cal.ref, "production")
    quick = CoreBenchConfig(batches=3, singles=20, warmup_s=0.1)  # behaviour, not speed
    s = bench_and_write(registry, None, dataset=None, json_path=tmp_path / "b.json", cfg=quick)
    assert s["model"] == cal.ref and s["macs_adaptive"] < s["macs_full"]


def test_unknown_dataset_is_refused_before_any_worker_starts():
    with pytest.raises(UnknownNameError, match="mnist-5k"):
        TrainConfig(dataset="mnist-5kk", epochs=1)
