"""The cluster section's arithmetic on a hand-written timeline: no Ray, every number checked by hand."""

from __future__ import annotations

import pytest

from dynray.bench import BUILT_SECTIONS, SECTIONS
from dynray.bench.cluster import autoscale_summary, first_time, format_cluster, plot_timeline, targets


def _s(t: float, edge_nodes: int, edge_replicas: int) -> dict:
    return {"t": t, "nodes": {"ray.head.default": 1, "edge.worker": edge_nodes}, "replicas": {"Edge": edge_replicas, "Ingress": 2}}


# 1 replica on 1 node; burst from t=10 to t=30: replicas 2 at 12, 4 at 18 (the second node at 16);
# after it, back to 1 replica at 35 and to 1 node at 66
TIMELINE = [_s(0, 1, 1), _s(10, 1, 1), _s(12, 1, 2), _s(16, 2, 3), _s(18, 2, 4), _s(30, 2, 4), _s(35, 2, 1), _s(50, 2, 1), _s(66, 1, 1), _s(70, 1, 1)]


def test_first_time_counts_from_after_and_says_none_when_it_never_holds():
    assert first_time(TIMELINE, lambda s: s["replicas"]["Edge"] >= 4, after=10) == 8
    assert first_time(TIMELINE, lambda s: s["replicas"]["Edge"] <= 1, after=30) == 5
    assert first_time(TIMELINE, lambda s: s["replicas"]["Edge"] > 4) is None


def test_autoscale_summary_reads_replicas_and_nodes_up_and_down():
    a = autoscale_summary(TIMELINE, deployment="Edge", node_type="edge.worker", burst_start=10, burst_end=30, replicas_min=1, replicas_max=4)
    assert (a["replicas_start"], a["replicas_peak"], a["up_s"], a["down_s"]) == (1, 4, 8, 5)
    assert (a["nodes_start"], a["nodes_peak"], a["nodes_up_s"], a["nodes_end"], a["nodes_down_s"]) == (1, 2, 6, 1, 36)
    assert a["burst_s"] == 20


def test_a_burst_that_adds_no_replica_has_no_up_time():
    flat = [_s(t, 1, 1) for t in range(0, 40, 5)]
    a = autoscale_summary(flat, deployment="Edge", node_type="edge.worker", burst_start=10, burst_end=30, replicas_min=1, replicas_max=4)
    assert a["replicas_peak"] == 1 and a["up_s"] is None and a["nodes_up_s"] is None


def _kill(answered: int, recovery: float) -> dict:
    return {"requests": 400, "answered": answered, "answered_no_retry": answered, "degraded": 0, "errors": 400 - answered, "recovery_s": recovery, "answered_by_tier": {"edge": answered}}


@pytest.mark.parametrize(("field", "value", "missed"), [
    ("scale_up_s", 61.0, "scale_up_s (0 -> 2 edge nodes)"),
    ("scale_down_s", 90.5, "scale_down_s (to 0 worker nodes)"),
    ("node_kill", _kill(399, 10), "node_kill answered / requests"),
    ("ingress_kill", _kill(400, 31), "ingress_kill recovery_s"),
])
def test_targets_are_met_at_their_bounds_and_missed_past_them(field, value, missed):
    ok = {"idle_timeout_s": 30, "scale_up_s": 60.0, "scale_down_s": 90.0, "node_kill": _kill(400, 30), "ingress_kill": _kill(400, 5)}
    assert all(t.met for t in targets(ok))
    bad = {t.name for t in targets({**ok, field: value}) if not t.met}
    assert bad == {missed}


def test_the_section_prints_and_plots(tmp_path):
    s = {"config": "cluster/local-autoscale.yaml", "cluster_up_s": 12.0, "idle_timeout_s": 30, "model": "m:v1", "scale_up_replicas": 4,
         "scale_up_s": 20.0, "serve_up_s": 50.0, "scale_down_s": 40.0, "job_roundtrip_s": 55.0,
         "serve_autoscale": autoscale_summary(TIMELINE, deployment="Edge", node_type="edge.worker", burst_start=10, burst_end=30, replicas_min=1, replicas_max=4),
         "node_kill": {**_kill(400, 22), "node": {"node_type": "edge.worker", "node_id": "abcdef123456", "replicas_on_it": 2, "node_replaced_s": 17.0}},
         "ingress_kill": _kill(400, 6)}
    text = format_cluster(s)
    assert "0 -> 2 edge nodes for 4 edge replicas: 20.0 s" in text and "MISSED" not in text and "1 -> 4 replicas in 8 s" in text
    png = plot_timeline(TIMELINE, [{"name": "burst", "start": 10, "end": 30}], tmp_path / "t.png", title="t")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.endswith("t.png")


def test_cluster_is_a_built_section_of_the_contract():
    assert "cluster" in SECTIONS and "cluster" in BUILT_SECTIONS and "drift" in SECTIONS
