"""The core bench's baselines: static CNNs with the project's recipe, the cache, both frontiers and their comparison."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynray.bench.baselines import adaptive_frontier, compare_frontiers
from dynray.bench.static import StaticCNN, StaticSweepConfig, macs_at_accuracy, pareto, static_frontier, sweep, train_serially, train_static
from dynray.data import subsample
from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords
from dynray.thresholds import ThresholdRule
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


def _records(n: int, seed: int, skill=(0.9, 0.97, 0.99)) -> ExitRecords:
    """3 exits whose accuracy rises with depth; right answers are more confident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    logits = []
    for p in skill:
        ok = torch.rand(n, generator=g) < p
        pred = torch.where(ok, labels, (labels + 1) % 10)
        z = torch.randn(n, 10, generator=g) * 0.3
        z[torch.arange(n), pred] += torch.where(ok, 3.0 + 3.0 * torch.rand(n, generator=g), 1.0 + 1.5 * torch.rand(n, generator=g))
        logits.append(z)
    return ExitRecords(logits=torch.stack(logits), complexity=torch.rand(n, 4, generator=g), labels=labels,
                       cum_macs=torch.tensor([1e5, 4e5, 3e6], dtype=torch.float64), full_macs=3_000_000)


def test_the_adaptive_frontier_is_calibrated_on_val_and_spans_the_exits():
    val, test = _records(2000, 1), _records(2000, 2)
    front = adaptive_frontier(val, test, ThresholdRule(thresholds=(0.5, 0.5)))
    macs, acc = [p["macs"] for p in front], [p["accuracy"] for p in front]
    assert len(front) >= 5 and macs == sorted(macs) and acc == sorted(acc) and len(set(acc)) == len(acc)  # a Pareto front
    assert macs[0] < 1.3e5 and acc[-1] >= test.exit_accuracy()[-1] - 0.002  # from about the first exit's cost to the last exit's accuracy
    assert all(p["target"] for p in front)
    assert pareto([{"macs": 2, "accuracy": 0.5}, {"macs": 1, "accuracy": 0.6}, {"macs": 3, "accuracy": 0.7}]) == [{"macs": 1, "accuracy": 0.6}, {"macs": 3, "accuracy": 0.7}]


def test_compare_frontiers_reads_both_frontiers_at_every_accuracy_up_to_the_operating_point():
    static = [{"width": w, "convs": 2, "seed": 0, "macs": m, "accuracy": a} for w, m, a in ((4, 200_000, 0.97), (8, 400_000, 0.98), (16, 1_000_000, 0.99))]
    adaptive = [{"macs": 100_000, "accuracy": 0.975}, {"macs": 150_000, "accuracy": 0.985}]
    out = compare_frontiers(static, adaptive, accuracy=0.985, macs=150_000)
    assert out["macs_static_equal_accuracy"] == pytest.approx(700_000) and out["static_equal_accuracy_ratio"] == pytest.approx(700_000 / 150_000)
    accs = [r["accuracy"] for r in out["frontier"]]
    assert accs[0] == 0.975 and accs[-1] == pytest.approx(0.985) and len(accs) == 11
    first = out["frontier"][0]
    assert first["macs_static"] == pytest.approx(300_000) and first["macs_adaptive"] == 100_000 and first["ratio"] == pytest.approx(1 / 3)
    assert out["frontier_worst_ratio"] == pytest.approx(max(r["ratio"] for r in out["frontier"]))
    assert out["static_max_accuracy"] == 0.99 and out["static_sweep"] == static
    beyond = compare_frontiers(static, adaptive, accuracy=0.995, macs=150_000)
    assert beyond["macs_static_equal_accuracy"] is None and beyond["static_equal_accuracy_ratio"] is None  # no static net is that accurate
    assert compare_frontiers(static, adaptive, accuracy=0.96, macs=90_000)["frontier"] == []  # below 0.975: nothing to compare


def test_the_sweep_trains_only_what_the_cache_lacks(mnist5k, tmp_path):
    train, test = subsample(mnist5k["train"], 0.05), subsample(mnist5k["test"], 0.2)
    asked: list = []

    def recording(tr, te, recipe, jobs):
        asked.append(list(jobs))
        return train_serially(tr, te, recipe, jobs)

    cache = tmp_path / "static.json"
    sweep(train, test, RECIPE, StaticSweepConfig(widths=(2,), convs=(2,), seeds=(0,), epochs=1), cache=cache, map_fn=recording)
    rows = sweep(train, test, RECIPE, StaticSweepConfig(widths=(2, 3), convs=(2,), seeds=(0,), epochs=1), cache=cache, map_fn=recording)
    assert asked == [[(2, 2, 0)], [(3, 2, 0)]] and [(r["width"], r["seed"]) for r in rows] == [(2, 0), (3, 0)]
