"""`dynray report` from a run log: the three PNGs, and what a log without data is told."""

import json
from types import SimpleNamespace

import pytest

from dynray.errors import ConfigError
from dynray.report import write_report
from dynray.runlog import RunLog, read_runlog


def _record(i: int, tier: str, exit_: int, ok: bool = True):
    return SimpleNamespace(started_s=i * 0.01, latency_ms=20.0 + 10 * (tier == "cloud"), status=200 if ok else 429, ok=ok,
                           body={"exit": [exit_], "tier": [tier], "model_version": "m:v1"} if ok else {"error": "rate"})


def _log(path, *, drift: bool = True) -> RunLog:
    log = RunLog(path, fresh=True)
    recs = [_record(i, "cloud" if i % 4 == 0 else "edge", 2 if i % 4 == 0 else i % 2) for i in range(200)] + [_record(200, "edge", 0, ok=False)]
    log.requests(recs, wall_s=2.5, phase="test split", end_t=1000.0)
    if drift:
        for k in range(10):  # a replica whose score rises past the threshold at the 8th reading
            score = 0.2 if k < 7 else 0.8
            log.drift({"drift": {"replica": "abc123", "versions": {"m:v1": {"score": score, "threshold": 0.4, "status": "ok", "alarms": int(k >= 7)}}}}, t=998.0 + 0.2 * k)
    return log


def test_the_report_writes_three_pngs_and_the_numbers_behind_them(tmp_path):
    log = _log(tmp_path / "run.jsonl")
    data = read_runlog(log.path)
    assert len(data.requests) == 201 and len(data.answered) == 200 and len(data.drift) == 10
    rep = write_report(data, tmp_path / "report")
    assert set(rep.plots) == {"exit_mix", "latency_tiers", "drift"}
    for p in rep.plots.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert rep.exit_mix["cloud exit 2"] == pytest.approx(0.25) and sum(rep.exit_mix.values()) == pytest.approx(1.0)
    assert rep.latency_ms["edge"]["p50"] == pytest.approx(20.0) and rep.latency_ms["cloud"]["requests"] == 50
    assert "drift" not in " ".join(rep.notes)


def test_a_log_without_drift_readings_still_plots_the_rest_and_says_what_the_drift_plot_needs(tmp_path):
    rep = write_report(read_runlog(_log(tmp_path / "run.jsonl", drift=False).path), tmp_path / "r")
    assert set(rep.plots) == {"exit_mix", "latency_tiers"} and "drift reference" in rep.notes[0]


@pytest.mark.parametrize("content, message", [
    (None, "no run log"),
    ("", "no requests"),
    ('{"kind": "drift", "t": 1, "replica": "a", "version": "m", "score": 0.1}\n', "no requests"),
    ("not json\n", "not a run log line"),
])
def test_a_report_of_a_run_with_no_data_names_what_it_needs(tmp_path, content, message):
    p = tmp_path / "run.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError) as e:
        read_runlog(p)
    assert message in e.value.message and "dynray demo" in str(e.value.fix) and "drift_runlog.jsonl" in str(e.value.fix)


def test_log_lines_are_json_with_wall_clock_times(tmp_path):
    log = _log(tmp_path / "run.jsonl")
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    req = [x for x in lines if x["kind"] == "request"]
    assert req[0]["t"] == pytest.approx(1000.0 - 2.5 + 0.03, abs=1e-3)  # answered at start + send offset + latency (30 ms: a cloud answer) and req[-1]["exit"] is None and req[0]["phase"] == "test split"
