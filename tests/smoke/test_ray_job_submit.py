"""`ray job submit -- python -m jobs.train` against a real `ray start --head` cluster."""

from __future__ import annotations

import os
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_runs_as_a_submitted_ray_job(tmp_path):
    home = tmp_path / "home"
    # every port this head opens is picked free: the session's own Ray (tests/ray) holds the defaults
    port, dash, agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the job's `python` resolves through the PATH of `ray start` (RAY_NOTES §7)
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token")
    # a short temp dir: Ray's unix socket paths must stay under 107 characters
    ray_tmp = tempfile.mkdtemp(prefix="dr-", dir="/tmp")
    head_log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={ray_tmp}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"],
        cwd=ROOT, env=env, stdout=head_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", dash), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(1)
        submit = [str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir=.",
                  f'--runtime-env-json={{"env_vars": {{"DYNRAY_HOME": "{home}"}}, "excludes": [".venv", ".dynray", ".git", "out"]}}',
                  "--", "python", "-m", "jobs.train", "--epochs", "1", "--workers", "1", "--name", "submitted"]
        give_up = time.time() + 90
        while True:  # the dashboard answers before its job agent is ready
            p = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in p.stdout + p.stderr or time.time() > give_up:
                break
            time.sleep(2)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        assert "registered submitted:v1" in p.stdout
        assert (home / "models" / "submitted" / "v1" / "model.safetensors").exists()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        head_log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
