"""cluster/grafana-dashboard.json queries exactly the series of dynray/serving/metrics.py.
(tests/ray/test_serving.py checks the same queries against a live Prometheus scrape.)"""

from pathlib import Path

import pytest

from dynray.errors import ConfigError
from dynray.serving import metrics as M
from dynray.serving.prometheus import dashboard_series, parse, required_missing

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana-dashboard.json"


def test_every_dashboard_query_names_known_series_and_labels_and_every_series_has_a_panel():
    queries = dashboard_series(DASHBOARD)
    assert len(queries) >= 15 and all(q.series for q in queries), [q.expr for q in queries if not q.series]
    by_family = {M.exported_name(n): n for n in M.SPECS}
    used = set()
    for q in queries:
        for fam in q.families():
            assert fam in by_family, (q.panel, fam)
            used.add(by_family[fam])
        allowed = {"le", M.TAG_NODE}.union(*(M.SPECS[by_family[f]].tags for f in q.families()))
        assert set(q.labels) <= allowed, (q.panel, q.labels, allowed)
    assert used == set(M.SPECS), set(M.SPECS) - used


def test_a_query_of_an_unknown_series_is_caught(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text('{"panels": [{"title": "t", "targets": [{"expr": "sum by (tier) (rate(ray_dynray_no_such_total[1m]))"}]}]}')
    (q,) = dashboard_series(bad)
    assert q.families() == {"ray_dynray_no_such"} and q.labels == ("tier",)
    with pytest.raises(ConfigError):
        dashboard_series(tmp_path / "missing.json")


def test_the_parser_reads_counters_histograms_and_gauges_and_names_the_missing():
    text = """# HELP ray_dynray_responses_total x
# TYPE ray_dynray_responses_total counter
ray_dynray_responses_total{status="200",node="ab"} 5.0
# HELP ray_dynray_batch_size h
# TYPE ray_dynray_batch_size histogram
ray_dynray_batch_size_bucket{le="1.0",tier="edge",node="ab"} 1.0
ray_dynray_batch_size_bucket{le="+Inf",tier="edge",node="ab"} 3.0
ray_dynray_batch_size_count{tier="edge",node="ab"} 3.0
ray_dynray_batch_size_sum{tier="edge",node="ab"} 9.0
# HELP ray_dynray_drift_score g
# TYPE ray_dynray_drift_score gauge
ray_dynray_drift_score{model_version="m:v1",node="ab"} 0.0
"""
    fams = parse(text)
    assert fams["ray_dynray_responses"].total() == 5 and fams["ray_dynray_batch_size"].total() == 3
    assert required_missing(fams, [M.RESPONSES, M.BATCH_SIZE, M.DRIFT_SCORE, M.EXITS]) == [M.DRIFT_SCORE, M.EXITS]
