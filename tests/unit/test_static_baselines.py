"""The core bench's static baselines: plain CNNs with the project's recipe, their frontier, the cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynray.bench.static import StaticCNN, StaticSweepConfig, macs_at_accuracy, static_frontier, sweep, train_static
from dynray.data import subsample
from dynray.errors import ConfigError
from dynray.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPE = TrainConfig(dataset="mnist-5k", workers=1, epochs=3)


def test_the_static_sweep_is_deterministic_under_a_seed(mnist5k):
    train, test = subsample(mnist5k["train"], 0.2), mnist5k["test"]
    a, b = (train_static(8, 2, train, test, RECIPE, seed=1) for _ in range(2))
    c = train_static(8, 2, train, test, RECIPE, seed=2)
    assert a["accuracy"] == b["accuracy"] and a["macs"] == b["macs"] == StaticCNN((1, 28, 28), 10, 8, 2).macs
    assert c["accuracy"] != a["accuracy"]  # the seed matters
    assert a["accuracy"] > 0.5  # it learns: 700 digits, 3 epochs


def test_the_sweep_reuses_its_cache_and_retrains_when_the_data_change(mnist5k, tmp_path):
    train, test = subsample(mnist5k["train"], 0.1), mnist5k["test"]
    cfg = StaticSweepConfig(widths=(4,), convs=(2,), seeds=(0,), epochs=1)
    cache = tmp_path / "static.json"
    first = sweep(train, test, RECIPE, cfg, cache=cache)
    again = sweep(train, test, RECIPE, cfg, cache=cache)
    assert again == first and len(first) == 1
    other = dataclasses.replace(train, images=train.images.flip(3))
    fresh = sweep(other, test, RECIPE, cfg, cache=cache)
    assert fresh[0]["seconds"] != first[0]["seconds"]  # trained again, not read back


def test_frontier_and_macs_at_accuracy():
    rows = [{"width": 4, "convs": 2, "macs": 100, "accuracy": 0.90}, {"width": 4, "convs": 2, "macs": 100, "accuracy": 0.92},
            {"width": 8, "convs": 2, "macs": 400, "accuracy": 0.97}, {"width": 8, "convs": 3, "macs": 500, "accuracy": 0.96},
            {"width": 16, "convs": 2, "macs": 1000, "accuracy": 0.99}]
    front = static_frontier(rows)
    assert [(p["macs"], round(p["accuracy"], 4)) for p in front] == [(100, 0.91), (400, 0.97), (1000, 0.99)]  # seed means; (500, 0.96) is dominated
    assert macs_at_accuracy(front, 0.91) == 100.0 and macs_at_accuracy(front, 0.98) == pytest.approx(700.0)
    assert macs_at_accuracy(front, 0.995) is None


def test_bad_sweeps_are_refused():
    with pytest.raises(ConfigError, match="convs of 2 or 3"):
        StaticSweepConfig(convs=(4,))
    with pytest.raises(ConfigError, match="widths >= 1"):
        StaticSweepConfig(widths=())
    assert StaticCNN((3, 32, 32), 100, 8, 3)(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
