"""Ray job / CLI face of serving: start, inspect, roll and stop the Serve app.

    python -m jobs.deploy up [--address ADDR] [--config cluster/serve.yaml] [--model REF …] [--weights W …]
    python -m jobs.deploy status
    python -m jobs.deploy roll --model REF [--model REF2 --weights 0.9 0.1]
    python -m jobs.deploy down

With no ``--address`` and no ``RAY_ADDRESS``, ``up`` starts a local Ray head in the
background (``ray start --head --block``, every port picked free, the ``edge`` and
``cloud`` resources declared) that outlives the command; ``down`` stops it. The state
(address, HTTP URL, head PID, the applied config) is kept in ``$DYNRAY_HOME/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import requests

from dynray.errors import ServingError
from dynray.registry import ModelRegistry
from jobs._ray import free_port

log = logging.getLogger(__name__)


def _state_path() -> Path:
    return ModelRegistry().home / "serve.json"


def _read_state() -> dict:
    p = _state_path()
    return json.loads(p.read_text()) if p.exists() else {}



def _start_local_head(resources: dict) -> dict:
    """``ray start --head --block`` in its own session; returns address, PID, dashboard."""
    bin_dir = Path(sys.executable).parent
    gcs, dash, agent, agent_grpc, metrics, rt_env = (free_port() for _ in range(6))
    tmp = tempfile.mkdtemp(prefix="dynray-ray-", dir="/tmp")  # unix socket paths must stay short
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    logf = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - handed to the child
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--resources={json.dumps(resources)}", f"--temp-dir={tmp}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}"],
        env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd(),
    )
    until = time.monotonic() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", dash), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > until:
                raise ServingError("could not start a local Ray head", got=(Path(tmp) / "head.log").read_text()[-500:], fix="pass --address of a running cluster") from None
            time.sleep(0.5)
    return {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "head_pid": head.pid, "temp_dir": tmp}


def up(a: argparse.Namespace) -> dict:
    from actors import serve_apps as D

    if _read_state().get("head_pid"):
        raise ServingError("a local serving cluster from `dynray serve up` is still running", got=str(_state_path()), fix="run `dynray serve down` first, or `dynray serve roll` to change models")
    cfg = D.load_config(a.config) if a.config else D.load_config()
    app = cfg["applications"][0]
    home = str(ModelRegistry().home.resolve())
    reg = ModelRegistry(home)
    models = [reg.resolve(m).ref for m in (a.model or app["args"].get("models", ["production"]))]  # pin concrete versions
    app["args"].update(home=home, models=models, weights=a.weights)
    if a.port:
        cfg["http_options"] = {**cfg.get("http_options", {}), "port": a.port}
    for d in app.get("deployments", []):
        d["user_config"] = {**d.get("user_config", {}), "models": models, "home": home, **({"weights": a.weights} if d["name"] == "Ingress" else {})}
    address = a.address or os.environ.get("RAY_ADDRESS")
    state: dict = {}
    if not address:
        state = _start_local_head({"edge": 16, "cloud": 16})
        address = state["address"]
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        D.deploy(cfg, timeout_s=a.timeout)
    except BaseException:
        if state.get("head_pid"):  # do not leave a half-started cluster behind
            os.killpg(state["head_pid"], signal.SIGTERM)
        raise
    http = cfg.get("http_options", {})
    state.update(address=address, url=f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{app.get('route_prefix', '/').rstrip('/')}", app=app["name"], config=cfg)
    _state_path().parent.mkdir(parents=True, exist_ok=True)
    _state_path().write_text(json.dumps(state, indent=2))
    return state


def _attach(a: argparse.Namespace) -> dict:
    state = _read_state()
    address = a.address or state.get("address") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ServingError("no serving cluster known", fix="run `dynray serve up` first, or pass --address")
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    return state


def status(a: argparse.Namespace) -> dict:
    from actors import serve_apps as D

    state = _attach(a)
    app = state.get("app", "dynray")
    out = {"app": app, "address": state.get("address"), "url": state.get("url"), "serve": D.app_status(app)}
    if state.get("url"):
        try:
            out["health"] = requests.get(f"{state['url']}/v1/health", timeout=5).json()
            out["models"] = requests.get(f"{state['url']}/v1/models", timeout=5).json()
        except requests.RequestException as e:
            out["health"] = {"error": str(e)}
    return out


def roll(a: argparse.Namespace) -> dict:
    from actors import serve_apps as D

    state = _attach(a)
    if "config" not in state:
        raise ServingError("no applied config recorded", got=str(_state_path()), fix="roll works on apps started with `dynray serve up`")
    reg = ModelRegistry(state["config"]["applications"][0]["args"]["home"])
    models = [reg.resolve(m).ref for m in a.model]
    state["config"] = D.roll(state["config"], state["app"], models, a.weights, timeout_s=a.timeout)
    _state_path().write_text(json.dumps(state, indent=2))
    return {"app": state["app"], "models": models, "weights": a.weights}


def down(a: argparse.Namespace) -> dict:
    from actors import serve_apps as D

    state = _attach(a)
    D.shutdown()
    ray.shutdown()
    if state.get("head_pid"):
        try:
            os.killpg(state["head_pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    _state_path().unlink(missing_ok=True)
    return {"stopped": state.get("app", "dynray"), "cluster_stopped": bool(state.get("head_pid"))}


ACTIONS = {"up": up, "status": status, "roll": roll, "down": down}


def add_deploy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=list(ACTIONS))
    p.add_argument("--address", default=None, help="Ray cluster (GCS address); default: $RAY_ADDRESS, else a local head")
    p.add_argument("--config", default=None, help="Serve config file (default cluster/serve.yaml)")
    p.add_argument("--model", action="append", default=None, help="registry ref to serve (repeat for A/B); default: the config's")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="A/B traffic shares, one per --model")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the apps to run")


def run(a: argparse.Namespace) -> dict:
    if a.action == "roll" and not a.model:
        raise ServingError("roll needs the version(s) to serve", fix="dynray serve roll --model NAME:vN")
    return ACTIONS[a.action](a)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.deploy", description=__doc__.splitlines()[0])
    add_deploy_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(), indent=2, default=str))
