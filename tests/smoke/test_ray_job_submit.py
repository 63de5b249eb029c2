"""`dynray submit` round trip against a real `ray start --head`, from a shell with no RAY_* variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dynray.registry import ModelRegistry
from jobs._ray import start_local_head, stop_local_head

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]
DYNRAY = str(Path(sys.executable).with_name("dynray"))


def test_submit_runs_a_job_on_a_real_head_and_the_model_reaches_the_given_registry(tmp_path, clean_env):
    home = tmp_path / "home"
    head = start_local_head({}, cwd=ROOT)
    try:
        env = clean_env(tmp_path / "client-home")  # the client's own registry: the job must not write there
        # the README's form: --address after the step, the job's flags after --
        nas = ["--trials", "1", "--epochs", "1", "--grace", "1", "--train-limit", "256", "--searcher", "random", "--no-reference",
               "--register-top", "1", "--concurrency", "1", "--out", str(tmp_path / "nas")]
        p = subprocess.run([DYNRAY, "submit", "nas", "--address", head.dashboard, "--env", f"DYNRAY_HOME={home}", "--", *nas],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert "SUCCEEDED" in p.stdout and "Pareto front" in p.stdout
        assert [i.ref for i in ModelRegistry(home).list("nas-mnist-5k")] == ["nas-mnist-5k:v1"]
        assert not (tmp_path / "client-home" / "models").exists()
    finally:
        stop_local_head(head.pid, head.temp_dir)
