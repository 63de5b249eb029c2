"""Model store glue and the core bench on a small trained-for-seconds model."""

from __future__ import annotations

import json

import pytest
import torch

from dynray.bench import merge_section
from dynray.bench.core import CoreBenchConfig, bench_core
from dynray.errors import ConfigError, IntegrityError
from dynray.registry import ModelRegistry
from dynray.store import load_model, save_model
from dynray.thresholds import ThresholdRule


@pytest.fixture
def registry(tmp_path):
    return ModelRegistry(tmp_path / "home")


def test_store_round_trip_keeps_weights_rule_and_complexity(registry, tiny_cnn):
    tiny_cnn.complexity.fit(torch.rand(30, 1, 28, 28))
    rule = ThresholdRule(thresholds=(0.3, 0.4), complexity_weight=0.1)
    info = save_model(registry, "tiny", tiny_cnn, dataset="mnist-5k", rule=rule, metrics={"val_accuracy_full": 0.5})
    back = load_model(registry, info.ref)
    assert back.rule == rule and back.dataset == "mnist-5k"
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(back.model.forward_full(x), tiny_cnn.forward_full(x))
    assert torch.equal(back.model.complexity(x), tiny_cnn.complexity(x))
    assert info.meta["macs"]["full"] == tiny_cnn.mac_profile.full


def test_tampered_weights_are_refused_on_load(registry, tiny_cnn):
    info = save_model(registry, "tiny", tiny_cnn, dataset="mnist-5k", rule=None, metrics={})
    f = info.path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        load_model(registry, info.ref)


def test_bench_core_and_merge(registry, tiny_cnn, mnist5k, tmp_path):
    tiny_cnn.complexity.fit(mnist5k["train"].images)
    info = save_model(registry, "tiny", tiny_cnn, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.12, 0.12)), metrics={})
    stored = load_model(registry, info.ref)
    test = mnist5k["test"]
    s = bench_core(stored, test, cfg=CoreBenchConfig(batches=2, singles=5, warmup_s=0.05), plot=tmp_path / "p.png")
    for key in ("dataset", "n_test", "model", "accuracy_full", "accuracy_adaptive", "macs_full", "macs_adaptive", "macs_oracle",
                "exit_fractions", "latency_ms", "throughput_sps", "peak_rss_mb"):
        assert key in s
    assert s["n_test"] == 1000 and sum(s["exit_fractions"]) == pytest.approx(1.0)
    assert s["macs_oracle"] <= s["macs_full"] and s["macs_adaptive"] <= s["macs_per_exit"][-1]
    for path in ("full", "adaptive"):
        for b in ("b1", "b256"):
            assert set(s["latency_ms"][path][b]) == {"p50", "p95", "p99"}
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "static_sweep" not in s  # no baselines asked for
    static = [{"width": 4, "convs": 2, "seed": 0, "macs": 50_000, "accuracy": 0.05}, {"width": 8, "convs": 2, "seed": 0, "macs": 90_000, "accuracy": 0.9}]
    b = bench_core(stored, test, cfg=CoreBenchConfig(batches=2, singles=5, warmup_s=0.05), plot=tmp_path / "q.png", val=mnist5k["val"], static_rows=static)
    assert b["frontier_adaptive"] and b["static_sweep"] == static and b["frontier"] == []  # an untrained net: far below 0.975
    assert b["macs_static_equal_accuracy"] == pytest.approx(50_000 + 40_000 * (b["accuracy_adaptive"] - 0.05) / 0.85)
    assert b["static_equal_accuracy_ratio"] == pytest.approx(b["macs_static_equal_accuracy"] / b["macs_adaptive"])
    out = tmp_path / "bench.json"
    merge_section(out, "nas", {"trials": 1})
    merge_section(out, "core", s)
    doc = json.loads(out.read_text())
    assert doc["nas"] == {"trials": 1} and doc["core"]["model"] == info.ref
    with pytest.raises(ConfigError):
        merge_section(out, "speed", {})


def test_bench_without_thresholds_names_the_fix(registry, tiny_cnn, mnist5k):
    info = save_model(registry, "tiny", tiny_cnn, dataset="mnist-5k", rule=None, metrics={})
    with pytest.raises(ConfigError, match="dynray calibrate"):
        bench_core(load_model(registry, info.ref), mnist5k["test"])
