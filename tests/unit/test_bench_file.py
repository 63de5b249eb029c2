"""The bench JSON file: checked before a run, merged under a lock, replaced atomically."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from dynray.bench import check_bench_file, merge_section
from dynray.errors import ConfigError
from dynray.fileio import write_atomic


def test_a_corrupt_file_is_refused_before_the_run(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text('{"core": {')
    with pytest.raises(ConfigError, match="not valid JSON"):
        check_bench_file(out)
    out.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object of sections"):
        check_bench_file(out)
    with pytest.raises(ConfigError, match="directory"):
        check_bench_file(tmp_path)
    assert check_bench_file(tmp_path / "new" / "bench.json") == tmp_path / "new" / "bench.json"  # folders are made on write


def test_the_bench_job_checks_the_file_before_measuring(tmp_path, monkeypatch):
    """A corrupt --json fails at once: the measurement (here: loading the model) never starts."""
    from jobs import bench

    out = tmp_path / "bench.json"
    out.write_text("not json")
    monkeypatch.setenv("DYNRAY_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        bench.run(bench.CoreConfig(json=str(out)))
    assert out.read_text() == "not json"


def test_merge_keeps_other_sections_and_refuses_unknown_ones(tmp_path):
    out = tmp_path / "b.json"
    merge_section(out, "nas", {"trials": 1})
    merge_section(out, "core", {"model": "m:v1"})
    assert json.loads(out.read_text()) == {"nas": {"trials": 1}, "core": {"model": "m:v1"}}
    with pytest.raises(ConfigError, match="unknown bench section"):
        merge_section(out, "speed", {})


def test_a_merge_waits_for_a_concurrent_one(tmp_path, monkeypatch):
    """Writer A is held between reading and replacing the file while writer B merges: with the
    lock, B waits and then keeps A's section; without it, one of the two sections is lost."""
    import dynray.bench as bench_pkg

    out = tmp_path / "b.json"
    held, release = threading.Event(), threading.Event()
    real_write = bench_pkg.write_atomic

    def slow_write(path, data):
        if '"core"' in data and not held.is_set():
            held.set()
            release.wait(10)
        return real_write(path, data)

    monkeypatch.setattr(bench_pkg, "write_atomic", slow_write)
    a = threading.Thread(target=merge_section, args=(out, "core", {"x": 1}))
    a.start()
    assert held.wait(10)
    b = threading.Thread(target=merge_section, args=(out, "moe", {"y": 2}))
    b.start()
    time.sleep(0.3)  # B has had time to read the file, were it not locked out
    release.set()
    a.join(10)
    b.join(10)
    assert json.loads(out.read_text()) == {"core": {"x": 1}, "moe": {"y": 2}}


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    write_atomic(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, "new")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["state.json"]  # no temporary file left
