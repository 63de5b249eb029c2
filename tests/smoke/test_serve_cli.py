"""`python -m jobs.deploy up|status|roll|down` (= `dynray serve …`) from a clean shell.

Every command runs by subprocess with an environment that holds no ``RAY_*`` variable at
all and a PATH without the venv (what a user's plain shell has), against a temporary
registry and a temporary HOME whose ``~/.ray/auth_token`` exists, as it does after
``make demo``: that token switches a ``ray start`` head to token auth. One ``up`` serves
the module's status, bad-roll, roll and down checks (each ``ray start`` + deploy costs
15–25 s here); the stale-state and failed-``up`` checks need no running app of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch

from dynray.models import DynamicNetConfig, build
from dynray.registry import ModelRegistry
from dynray.serving.payload import encode_array
from dynray.store import save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = [sys.executable, "-m", "jobs.deploy"]
HEAD_MARK = "DYNRAY_RAY_HEAD"  # every process of a head that `up` starts carries it (jobs/_ray.py)


def _register(reg: ModelRegistry, seed: int) -> str:
    """A tiny untrained DynamicNet with a stop rule: enough for the serving path."""
    torch.manual_seed(seed)
    model = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)).eval()
    model.complexity.fit(torch.rand(256, 1, 28, 28))
    return save_model(reg, "srv", model, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.5, 0.5)), metrics={}).ref


def _clean_env(tmp: Path, name: str) -> dict[str, str]:
    """Like ``env -i HOME=… PATH=/usr/bin:/bin``: no RAY_* variable, no venv on PATH."""
    home, registry = tmp / f"{name}-home", tmp / f"{name}-registry"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)  # what `make demo`'s ray.init leaves
    registry.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "DYNRAY_HOME": str(registry), "DYNRAY_DATA": str(tmp / "data"), "PYTHONUNBUFFERED": "1"}
    assert not any(k.startswith("RAY_") for k in env)
    return env


def _deploy(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*DEPLOY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _head_processes(temp_dir: str) -> list[int]:
    """PIDs of every live process of the head whose temp dir is ``temp_dir`` (workers too:
    they leave the head's process group but inherit its environment)."""
    mark = f"{HEAD_MARK}={temp_dir}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if mark in (d / "environ").read_bytes().split(b"\0") and (d / "stat").read_text().split()[2] != "Z":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _gone_within(temp_dir: str, seconds: float) -> list[int]:
    until = time.monotonic() + seconds
    while (left := _head_processes(temp_dir)) and time.monotonic() < until:
        time.sleep(0.2)
    return left


def _kill_head(temp_dir: str) -> None:
    """Test cleanup only: never leave a head behind, whatever the code under test did."""
    for pid in _head_processes(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _predict(url: str) -> requests.Response:
    return requests.post(f"{url}/v1/predict", json=encode_array(torch.zeros(2, 1, 28, 28)), timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `up` for the module, started over a stale serve.json whose head is dead."""
    tmp = tmp_path_factory.mktemp("serve-cli")
    env = _clean_env(tmp, "main")
    reg = ModelRegistry(env["DYNRAY_HOME"])
    v1, v2 = _register(reg, 1), _register(reg, 2)
    reg.promote(v1, "production")
    stale_tmp = tmp / "stale-ray-tmp"
    stale_tmp.mkdir()
    state_file = Path(env["DYNRAY_HOME"]) / "serve.json"
    state_file.write_text(json.dumps({"address": f"127.0.0.1:{free_port()}", "head_pid": _dead_pid(), "temp_dir": str(stale_tmp), "app": "dynray"}))
    port = free_port()
    t0 = time.monotonic()
    up = _deploy(["up", "--port", str(port)], env, timeout=400)
    up_s = time.monotonic() - t0
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        yield {"env": env, "up": up, "up_s": up_s, "url": f"http://127.0.0.1:{port}", "port": port, "v1": v1, "v2": v2, "state": state, "stale_tmp": stale_tmp, "state_file": state_file}
    finally:
        if state_file.exists():
            _deploy(["down"], env, timeout=120)
        if state.get("temp_dir"):
            _kill_head(state["temp_dir"])


def test_up_from_a_clean_shell_clears_a_dead_head_and_serves(served):
    up = served["up"]
    assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
    assert "InvalidAuthToken" not in up.stderr and "AuthenticationError" not in up.stderr
    assert re.search(rf"serving dynray at http://127\.0\.0\.1:{served['port']}/v1/predict \(Ray at 127\.0\.0\.1:\d+\)", up.stdout), up.stdout
    assert "stale" in up.stderr  # it said what it cleared
    assert not served["stale_tmp"].exists()
    state = served["state"]
    assert state["head_pid"] > 0 and _head_processes(state["temp_dir"]) and state["auth_mode"] == "token"
    r = _predict(served["url"])
    assert r.status_code == 200 and r.json()["model_version"] == served["v1"], r.text


def test_status_prints_the_running_app(served):
    st = _deploy(["status"], served["env"], timeout=120)
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    assert status["serve"]["status"] == "RUNNING" and status["health"]["ready"]
    assert status["models"]["versions"] == [served["v1"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "srv:v1", "--model", "srv:v2", "--weights", "0.9"], "one weight per --model"),
        (["--model", "srv:v9"], "unknown version"),
        (["--model", "production", "--model", "srv:v1", "--weights", "0.5", "0.5"], "versions must be distinct"),
        (["--model", "srv:v2", "--model", "srv:v1", "--weights", "0", "0"], "positive sum"),
    ],
    ids=["weights-count", "unknown-version", "duplicate-after-resolving", "zero-weights"],
)
def test_bad_roll_is_refused_before_anything_is_deployed(served, args, message):
    p = _deploy(["roll", *args], served["env"], timeout=120)
    assert p.returncode == 2, (p.stdout + p.stderr)[-2000:]
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    health = requests.get(f"{served['url']}/v1/health", timeout=10)
    assert health.status_code == 200 and health.json()["ready"]
    r = _predict(served["url"])
    assert r.status_code == 200 and r.json()["model_version"] == served["v1"]
    assert requests.get(f"{served['url']}/v1/models", timeout=10).json()["versions"] == [served["v1"]]


def test_roll_then_down_stops_the_head(served):
    state = served["state"]
    p = _deploy(["roll", "--model", served["v2"]], served["env"], timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert json.loads(p.stdout)["models"] == [served["v2"]]
    r = _predict(served["url"])
    assert r.status_code == 200 and r.json()["model_version"] == served["v2"]
    rolled = json.loads(served["state_file"].read_text())
    assert rolled["config"]["applications"][0]["deployments"][0]["user_config"]["models"] == [served["v2"]]
    t0 = time.monotonic()
    down = _deploy(["down"], served["env"], timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    out = json.loads(down.stdout)
    assert out["cluster_stopped"] is True and "stopped" in out["message"]
    assert not _gone_within(state["temp_dir"], 10), "head processes left after `down`"
    assert time.monotonic() - t0 < 60
    assert not served["state_file"].exists() and not Path(state["temp_dir"]).exists()
    with pytest.raises(requests.RequestException):
        requests.get(f"{served['url']}/v1/health", timeout=2)


def test_down_clears_a_stale_head(tmp_path):
    env = _clean_env(tmp_path, "stale")
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    state_file = Path(env["DYNRAY_HOME"]) / "serve.json"
    pid = _dead_pid()
    state_file.write_text(json.dumps({"address": f"127.0.0.1:{free_port()}", "head_pid": pid, "temp_dir": str(ray_tmp), "app": "dynray", "url": "http://127.0.0.1:1"}))
    down = _deploy(["down"], env, timeout=60)
    assert down.returncode == 0, down.stderr[-2000:]
    out = json.loads(down.stdout)
    assert out["cluster_stopped"] is False and f"pid {pid}" in out["message"] and "not running" in out["message"]
    assert not state_file.exists() and not ray_tmp.exists()
    # and with nothing recorded, down says so and still succeeds
    again = _deploy(["down"], env, timeout=60)
    assert again.returncode == 0 and "nothing" in json.loads(again.stdout)["message"], again.stderr


def test_failed_up_stops_the_head_it_started(tmp_path):
    """An app that cannot deploy (its import path does not exist) fails after the head is
    up: the head and every process it started must be gone within seconds, with no state."""
    env = _clean_env(tmp_path, "failed")
    reg = ModelRegistry(env["DYNRAY_HOME"])
    reg.promote(_register(reg, 3), "production")
    import yaml

    cfg = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    cfg["applications"][0]["import_path"] = "actors.no_such_module:build_app"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    p = _deploy(["up", "--config", str(bad), "--port", str(free_port()), "--timeout", "60"], env, timeout=300)
    started = re.search(r"started a local Ray head: pid (\d+), temp dir (\S+)", p.stderr)
    assert started, p.stderr[-3000:]
    temp_dir = started.group(2)
    try:
        assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
        assert "failed to deploy" in p.stderr and "no_such_module" in p.stderr
        left = _gone_within(temp_dir, 5)
        assert not left, f"head processes still alive after a failed up: {left}"
        assert not (Path(env["DYNRAY_HOME"]) / "serve.json").exists() and not Path(temp_dir).exists()
    finally:
        _kill_head(temp_dir)
