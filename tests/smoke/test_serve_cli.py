"""`dynray serve up|status|roll|down` (= `python -m jobs.deploy …`) from a clean shell.

Every command runs by subprocess with an environment that holds no ``RAY_*`` variable at
all and a PATH without the venv (what a user's plain shell has), against a temporary
registry and a temporary HOME whose ``~/.ray/auth_token`` exists, as it does after
``make demo``: that token switches a ``ray start`` head to token auth. One ``up`` serves
the module's status, bad-roll, submit, roll and down checks (each ``ray start`` + deploy
costs 15–25 s here); the stale-state and failed-``up`` checks need no running app of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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
from dynray.models.config import config_to_dict
from dynray.registry import ModelRegistry
from dynray.serving.payload import encode_array
from dynray.store import save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = [sys.executable, "-m", "jobs.deploy"]
SERVE = [str(Path(sys.executable).with_name("dynray")), "serve"]  # the console script: same job, same flags
HEAD_MARK = "DYNRAY_RAY_HEAD"  # every process of a head that `up` starts carries it (jobs/_ray.py)


def _register(reg: ModelRegistry, seed: int) -> str:
    """A tiny untrained DynamicNet with a stop rule: enough for the serving path."""
    torch.manual_seed(seed)
    model = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)).eval()
    model.complexity.fit(torch.rand(256, 1, 28, 28))
    return save_model(reg, "srv", model, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.5, 0.5)), metrics={}).ref


def _register_unloadable(reg: ModelRegistry) -> str:
    """A version that passes every registry check (digests, safetensors) but cannot load:
    its config names wider stages than its weights have."""
    torch.manual_seed(4)
    small = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)).eval()
    wide = build(DynamicNetConfig(widths=(4, 8, 16), layers=(1, 1, 1), exit_hidden=8)).eval()
    meta = {"kind": "dynamic_net", "config": config_to_dict(wide.cfg), "dataset": "mnist-5k", "metrics": {}, "thresholds": ThresholdRule(thresholds=(0.5, 0.5)).to_dict(),
            "complexity": small.complexity.stats(), "macs": {"stage": list(wide.mac_profile.stage), "exit": list(wide.mac_profile.exit), "full": wide.mac_profile.full}}
    return reg.register("broken", {k: v.detach() for k, v in small.state_dict().items()}, meta).ref


def _clean_env(tmp: Path, name: str) -> dict[str, str]:
    """Like ``env -i HOME=… PATH=/usr/bin:/bin``: no RAY_* variable, no venv on PATH."""
    home, registry = tmp / f"{name}-home", tmp / f"{name}-registry"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)  # what `make demo`'s ray.init leaves
    registry.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "DYNRAY_HOME": str(registry), "DYNRAY_DATA": str(tmp / "data"), "PYTHONUNBUFFERED": "1"}
    assert not any(k.startswith("RAY_") for k in env)
    return env


def _deploy(args: list[str], env: dict, timeout: int = 300, *, via: list[str] = DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run([*via, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _in_process(args: list[str], env: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    """``python -m jobs.deploy ARGS`` in this process, for commands that fail or finish before
    any Ray call (a subprocess would only add its start-up time)."""
    from dynray.flags import guarded
    from jobs import deploy

    for k in ("DYNRAY_HOME", "DYNRAY_DATA"):
        monkeypatch.setenv(k, env[k])
    capsys.readouterr()
    rc = guarded(lambda: deploy.main(args), prog="python -m jobs.deploy")
    out = capsys.readouterr()
    return rc, out.out, out.err


def _head_processes(temp_dir: str) -> list[int]:
    """PIDs of every live process of the head whose temp dir is ``temp_dir`` (workers too:
    they leave the head's process group but inherit its environment)."""
    mark = f"{HEAD_MARK}={temp_dir}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if mark in (d / "environ").read_bytes().split(b"\0") and not _pid_gone(int(d.name)):
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
    if temp_dir.startswith("/tmp/dynray-ray-"):
        shutil.rmtree(temp_dir, ignore_errors=True)


def _pid_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _predict(url: str, key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/v1/predict", json=encode_array(torch.zeros(2, 1, 28, 28)), headers=headers, timeout=30)


def _create_key(env: dict) -> str:
    """`dynray keys create` as a user would run it; the key is the last line it prints."""
    p = subprocess.run([str(Path(sys.executable).with_name("dynray")), "keys", "create", "--name", "smoke", "--rate", "1000"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "shown only now" in p.stdout, p.stdout + p.stderr
    return p.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `up` for the module, started over a stale serve.json whose head is dead."""
    tmp = tmp_path_factory.mktemp("serve-cli")
    env = _clean_env(tmp, "main")
    reg = ModelRegistry(env["DYNRAY_HOME"])
    v1, v2 = _register(reg, 1), _register(reg, 2)
    reg.promote(v1, "production")
    broken = _register_unloadable(reg)
    stale_tmp = tmp / "stale-ray-tmp"
    stale_tmp.mkdir()
    state_file = Path(env["DYNRAY_HOME"]) / "serve.json"
    state_file.write_text(json.dumps({"address": f"127.0.0.1:{free_port()}", "head_pid": _dead_pid(), "temp_dir": str(stale_tmp), "app": "dynray"}))
    port = free_port()
    t0 = time.monotonic()
    up = _deploy(["up", "--port", str(port)], env, timeout=400, via=SERVE)
    up_s = time.monotonic() - t0
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    try:
        key = _create_key(env) if up.returncode == 0 else None
        yield {"env": env, "up": up, "up_s": up_s, "url": f"http://127.0.0.1:{port}", "port": port, "v1": v1, "v2": v2, "broken": broken, "state": state,
               "stale_tmp": stale_tmp, "state_file": state_file, "key": key}
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
    r = _predict(served["url"], served["key"])
    assert r.status_code == 200 and r.json()["model_version"] == served["v1"], r.text
    anon = _predict(served["url"], None)  # a plain `serve up` asks for a key
    assert anon.status_code == 401 and "API key" in anon.json()["error"], anon.text


def test_status_prints_the_running_app(served):
    st = _deploy(["status"], {**served["env"], "DYNRAY_API_KEY": served["key"]}, timeout=120, via=SERVE)
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    assert status["serve"]["status"] == "RUNNING" and status["health"]["ready"]
    assert status["models"]["versions"] == [served["v1"]]
    # these versions were registered without a drift reference (as before drift detection): "no reference", no crash
    assert status["drift"]["versions"][served["v1"]]["status"] == "no reference" and status["drift"]["versions"][served["v1"]]["score"] is None, status["drift"]
    st = _deploy(["status"], served["env"], timeout=120, via=SERVE)  # without a key: health, and what to set for the rest
    assert st.returncode == 0 and "DYNRAY_API_KEY" in json.loads(st.stdout)["models"]["error"], st.stdout[-2000:]
    assert "DYNRAY_API_KEY" in json.loads(st.stdout)["drift"]["error"]


def test_second_up_is_refused_while_the_head_runs(served, monkeypatch, capsys):
    rc, _, err = _in_process(["up", "--port", str(free_port())], served["env"], monkeypatch, capsys)
    assert rc == 2 and "still running" in err and "dynray serve down" in err, err
    assert json.loads(served["state_file"].read_text())["head_pid"] == served["state"]["head_pid"]


def _still_serving_v1(served: dict) -> None:
    health = requests.get(f"{served['url']}/v1/health", timeout=10)
    assert health.status_code == 200 and health.json()["ready"], health.text
    r = _predict(served["url"], served["key"])
    assert r.status_code == 200 and r.json()["model_version"] == served["v1"]
    assert requests.get(f"{served['url']}/v1/models", headers={"X-API-Key": served["key"]}, timeout=10).json()["versions"] == [served["v1"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "srv:v1", "--model", "srv:v2", "--weights", "0.9"], "one weight per --model"),  # refused by the Config
        (["--model", "production", "--model", "srv:v1", "--weights", "0.5", "0.5"], "versions must be distinct"),  # only after resolving
    ],
    ids=["weights-count", "duplicate-after-resolving"],
)
def test_bad_roll_is_refused_before_anything_is_deployed(served, args, message):
    p = _deploy(["roll", *args], served["env"], timeout=120)
    assert p.returncode == 2, (p.stdout + p.stderr)[-2000:]
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    _still_serving_v1(served)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "srv:v9"], "unknown version"),
        (["--model", "srv:v2", "--model", "srv:v1", "--weights", "0", "0"], "positive sum"),
        (["--model", "srv:v2", "--weights", "-1"], "weights must be >= 0"),
    ],
    ids=["unknown-version", "zero-weights", "negative-weight"],
)
def test_bad_roll_values_are_refused_in_process(served, args, message, monkeypatch, capsys):
    """The same path in-process: every check runs before the first Ray call."""
    rc, _, err = _in_process(["roll", *args], served["env"], monkeypatch, capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    _still_serving_v1(served)


def test_roll_that_fails_on_the_replicas_puts_the_old_versions_back(served):
    """A version that passes every check up front but cannot load on the devices: the
    roll fails (exit 2) and the previous config is applied again."""
    p = _deploy(["roll", "--model", served["broken"]], served["env"], timeout=400)
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert "previous versions serve again" in p.stderr.strip().splitlines()[-1], p.stderr[-3000:]
    _still_serving_v1(served)
    state = json.loads(served["state_file"].read_text())
    assert state["config"]["applications"][0]["deployments"][0]["user_config"]["models"] == [served["v1"]]


def test_submit_runs_a_job_on_the_head_and_the_model_reaches_the_given_registry(served, tmp_path):
    """`dynray submit` round trip against the head `up` started (a real `ray start --head`),
    from a shell with no RAY_* variables: the README's form, --address after the step and the
    job's flags after --; the job writes to the registry --env names, not the client's."""
    home = tmp_path / "job-registry"
    env = {**served["env"], "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # the console script on PATH, as after activating the venv
    nas = ["--trials", "1", "--epochs", "1", "--grace", "1", "--train-limit", "256", "--searcher", "random", "--no-reference",
           "--register-top", "1", "--concurrency", "1", "--out", str(tmp_path / "nas")]
    p = subprocess.run([SERVE[0], "submit", "nas", "--address", served["state"]["dashboard"], "--env", f"DYNRAY_HOME={home}", "--", *nas],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "SUCCEEDED" in p.stdout and "Pareto front" in p.stdout
    assert [i.ref for i in ModelRegistry(home).list("nas-mnist-5k")] == ["nas-mnist-5k:v1"]
    assert not ModelRegistry(served["env"]["DYNRAY_HOME"]).list("nas-mnist-5k")  # the client's registry is untouched


def test_roll_then_down_stops_the_head(served):
    state = served["state"]
    p = _deploy(["roll", "--model", served["v2"]], served["env"], timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert json.loads(p.stdout)["models"] == [served["v2"]]
    r = _predict(served["url"], served["key"])
    assert r.status_code == 200 and r.json()["model_version"] == served["v2"]
    rolled = json.loads(served["state_file"].read_text())
    assert rolled["config"]["applications"][0]["deployments"][0]["user_config"]["models"] == [served["v2"]]
    t0 = time.monotonic()
    down = _deploy(["down"], served["env"], timeout=120, via=SERVE)
    assert down.returncode == 0, down.stderr[-2000:]
    out = json.loads(down.stdout)
    assert out["cluster_stopped"] is True and "stopped" in out["message"]
    assert not _gone_within(state["temp_dir"], 10), "head processes left after `down`"
    assert time.monotonic() - t0 < 60
    assert not served["state_file"].exists() and not Path(state["temp_dir"]).exists()
    with pytest.raises(requests.RequestException):
        requests.get(f"{served['url']}/v1/health", timeout=2)


def test_down_clears_a_stale_head(tmp_path, monkeypatch, capsys):
    env = _clean_env(tmp_path, "stale")
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    state_file = Path(env["DYNRAY_HOME"]) / "serve.json"
    pid = _dead_pid()
    state_file.write_text(json.dumps({"address": f"127.0.0.1:{free_port()}", "head_pid": pid, "temp_dir": str(ray_tmp), "app": "dynray", "url": "http://127.0.0.1:1"}))
    rc, _, err = _in_process(["status"], env, monkeypatch, capsys)  # fails fast, naming the way out
    assert rc == 2 and "not running" in err and "dynray serve down" in err and len(err.strip().splitlines()) == 1, err
    down = _deploy(["down"], env, timeout=60)
    assert down.returncode == 0, down.stderr[-2000:]
    out = json.loads(down.stdout)
    assert out["cluster_stopped"] is False and f"pid {pid}" in out["message"] and "not running" in out["message"]
    assert not state_file.exists() and not ray_tmp.exists()
    # and with nothing recorded, down says so and still succeeds
    rc, out, err = _in_process(["down"], env, monkeypatch, capsys)
    assert rc == 0 and "nothing to stop" in json.loads(out)["message"], err


def test_auth_mode_for_a_new_head_and_for_clients(tmp_path):
    """From a HOME with no token: a client alone stays in Ray's default (unset, disabled);
    about to start a head, the token `ray start` would need is made and both use it."""
    env = _clean_env(tmp_path, "auth")
    (Path(env["HOME"]) / ".ray" / "auth_token").unlink()
    code = ("import os; from jobs._ray import ensure_auth_env as e; a = e(); b = os.environ.get('RAY_AUTH_MODE'); "
            "c = e(create_token=True); print(a, b, c, os.environ['RAY_AUTH_MODE'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["disabled", "None", "token", "token"]
    assert (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()


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
    started = re.search(r"started a local Ray head: pid (\d+), temp dir ([^\s,]+)", p.stderr)
    assert started, p.stderr[-3000:]
    pid, temp_dir = int(started.group(1)), started.group(2)
    assert temp_dir.startswith("/tmp/dynray-ray-"), temp_dir
    try:
        assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
        assert "failed to deploy" in p.stderr and "no_such_module" in p.stderr
        left = _gone_within(temp_dir, 5)
        assert not left, f"head processes still alive after a failed up: {left}"
        assert _pid_gone(pid)
        assert not (Path(env["DYNRAY_HOME"]) / "serve.json").exists() and not Path(temp_dir).exists()
    finally:
        _kill_head(temp_dir)
