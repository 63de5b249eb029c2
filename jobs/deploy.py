"""Start, inspect, roll and stop the dynray Serve app (``dynray serve …``).

    python -m jobs.deploy up [--address ADDR] [--config cluster/serve.yaml] [--model REF …] [--weights W …] [--port P]
    python -m jobs.deploy status            # DYNRAY_API_KEY=<key> adds what /v1/models answers, and the drift score
    python -m jobs.deploy roll --model REF [--model REF2 --weights 0.9 0.1]
    python -m jobs.deploy down

With no ``--address`` and no ``RAY_ADDRESS``, ``up`` starts a private local Ray head
(``ray start --head --block``, every port free, the ``edge`` and ``cloud`` resources
declared) that outlives the command; ``down`` stops it. The state (address, URL, head PID,
the applied config) lives in ``$DYNRAY_HOME/serve.json``. Every command works from a plain
shell: the auth mode is settled for the head and its clients alike (``jobs/_ray.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from dynray.errors import ConfigError, ServingError
from dynray.fileio import write_atomic
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import default_home

__all__ = ["Config", "UpResult", "StatusResult", "RollResult", "DownResult", "Result", "run", "main"]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]  # where `actors.app:build_app` imports from


@dataclass(frozen=True, kw_only=True)
class Config:
    """Start (up), inspect (status), roll versions (roll) or stop (down) the Serve app."""

    action: tyro.conf.Positional[Literal["up", "status", "roll", "down"]]
    """up: deploy, on a local Ray head it starts unless --address or RAY_ADDRESS; status: print
    the app's state as JSON; roll: serve other versions without downtime; down: remove the app
    and stop the head `up` started."""
    address: str | None = None
    """Ray cluster (GCS address HOST:PORT); default: the one `up` recorded, else $RAY_ADDRESS, else (up) a new local head."""
    config: str | None = None
    """Serve config file for up (default: cluster/serve.yaml)."""
    model: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Registry ref to serve; repeat it for A/B (up's default: the config's models)."""
    weights: tuple[float, ...] | None = None
    """A/B traffic shares, one per --model, e.g. --weights 0.9 0.1 (default: all to the first)."""
    port: int | None = None
    """HTTP port for up (default: the config's, 8000)."""
    timeout: float = 180.0
    """Seconds to wait for the app to be RUNNING."""

    def __post_init__(self) -> None:
        if self.action in ("status", "down") and (self.model or self.weights or self.config or self.port):
            raise ConfigError(f"`{self.action}` takes no --model, --weights, --config or --port", fix=f"dynray serve {self.action} [--address ADDR]")
        if self.action == "roll" and not self.model:
            raise ConfigError("roll needs the version(s) to serve", fix="dynray serve roll --model NAME:vN [--model NAME:vM --weights 0.9 0.1]")
        if self.action == "roll" and (self.config or self.port):
            raise ConfigError("roll keeps the applied config and port", fix="`dynray serve down`, then `dynray serve up --config … --port …`")
        if self.weights is not None and self.model and len(self.weights) != len(self.model):
            raise ConfigError("one weight per --model is needed", got={"models": list(self.model), "weights": list(self.weights)}, fix="e.g. --model A --model B --weights 0.9 0.1")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError("--port must be a TCP port", got=self.port, fix="e.g. --port 8000")
        if self.timeout <= 0:
            raise ConfigError("--timeout must be > 0 seconds", got=self.timeout, fix="e.g. --timeout 180")
        if self.config is not None and not Path(self.config).is_file():
            raise ConfigError("Serve config file not found", got=self.config, fix="pass --config cluster/serve.yaml or a file made from it")


@dataclass(frozen=True)
class UpResult:
    app: str
    url: str
    address: str
    head_pid: int | None
    """The local head `up` started (None: an existing cluster)."""

    def summary(self) -> str:
        return f"serving {self.app} at {self.url}/v1/predict (Ray at {self.address}); `dynray serve status` to inspect, `dynray serve down` to stop"


@dataclass(frozen=True)
class StatusResult:
    body: dict
    """app, address, url, serve (controller view), health and models (the ingress's answers)."""

    def summary(self) -> str:
        return json.dumps(self.body, indent=2, default=str)


@dataclass(frozen=True)
class RollResult:
    app: str
    models: list[str]
    weights: list[float] | None

    def summary(self) -> str:
        return json.dumps({"app": self.app, "models": self.models, "weights": self.weights}, indent=2)


@dataclass(frozen=True)
class DownResult:
    stopped: str | None
    """The app removed (None: nothing was recorded)."""
    cluster_stopped: bool
    """Whether processes of a local head were stopped."""
    message: str
    """What down found and did."""

    def summary(self) -> str:
        return json.dumps({"stopped": self.stopped, "cluster_stopped": self.cluster_stopped, "message": self.message}, indent=2)


Result = UpResult | StatusResult | RollResult | DownResult


def _state_path() -> Path:
    return default_home() / "serve.json"


def _read_state() -> dict:
    from jobs._ray import read_state_file

    return read_state_file(_state_path(), "serving")


def _write_state(state: dict) -> None:
    write_atomic(_state_path(), json.dumps(state, indent=2, default=str))


def _head_found(state: dict) -> tuple[bool, str]:
    from jobs._ray import recorded_head

    return recorded_head(state)


def serving_state() -> dict:
    """What `dynray serve up` recorded, if its service's head is still running ({} otherwise)."""
    state = _read_state()
    if state.get("head_pid") and _head_found(state)[0]:
        return state
    if state.get("cluster") and state.get("url"):
        return state
    return {}


def _attach(cfg: Config, state: dict) -> None:
    """``ray.init`` to the recorded (or given) cluster, in the auth mode it was started with."""
    import ray

    from jobs._ray import ensure_auth_env, gcs_reachable

    if state.get("head_pid") and not cfg.address:
        running, found = _head_found(state)
        if not running:
            raise ServingError(found, fix="run `dynray serve down` to clear its state, then `dynray serve up`")
    address = cfg.address or state.get("address") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ServingError("no serving cluster known", got=str(_state_path()), fix="run `dynray serve up` first, or pass --address")
    if not gcs_reachable(address):
        raise ServingError("no Ray cluster answers at this address", got=address, fix="check --address, or start one with `dynray cluster up --local` (`dynray serve down` clears a stale state)")
    ensure_auth_env(state.get("auth_mode"))
    ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def up(cfg: Config) -> UpResult:
    import ray

    from actors import serve_apps as D
    from jobs._ray import LOCAL_RESOURCES, ensure_auth_env, start_local_head, stop_local_head

    state = _read_state()
    if state.get("head_pid"):
        running, found = _head_found(state)
        if running:
            raise ServingError("a serving cluster from `dynray serve up` is still running", got=state.get("address"), fix="run `dynray serve down` first, or `dynray serve roll` to change models")
        stop_local_head(state.get("head_pid"), state.get("temp_dir"))
        _state_path().unlink(missing_ok=True)
        log.warning("%s; cleared its stale state", found)
    from jobs._ray import gcs_reachable

    given = cfg.address or os.environ.get("RAY_ADDRESS")
    if given and not gcs_reachable(given):
        raise ServingError("no Ray cluster answers at this address", got=given, fix="check --address (HOST:PORT of the head's GCS), or start one with `dynray cluster up --local`")
    home = str(default_home())
    serve_cfg = D.prepare_config(D.load_config(cfg.config) if cfg.config else D.load_config(), home=home, models=cfg.model, weights=cfg.weights, port=cfg.port)
    app = serve_cfg["applications"][0]
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    state: dict = {}
    cluster = _running_cluster() if not address else {}
    if cluster:  # the one `dynray cluster up` started: its autoscaler adds the nodes the replicas need
        address = cluster["address"]
        state = {"auth_mode": cluster.get("auth_mode"), "cluster": True}
        log.info("deploying on the cluster from `dynray cluster up` at %s", address)
    head = None
    try:
        if not address:
            head = start_local_head(LOCAL_RESOURCES, cwd=ROOT)
            log.info("started a local Ray head: pid %d, temp dir %s, address %s", head.pid, head.temp_dir, head.address)
            state = {**head.to_state(), "app": app["name"]}
            _write_state(state)  # before deploying: if this command dies, `dynray serve down` still finds the head
            address = head.address
        ensure_auth_env(head.auth_mode if head else state.get("auth_mode"))
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        D.deploy(serve_cfg, timeout_s=cfg.timeout)
    except BaseException:
        if head is not None:  # leave no half-started cluster and no state behind
            ray.shutdown()
            stop_local_head(head.pid, head.temp_dir)
            _state_path().unlink(missing_ok=True)
            log.info("stopped the local Ray head (pid %d) after the failure", head.pid)
        raise
    http = serve_cfg.get("http_options", {})
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{app.get('route_prefix', '/').rstrip('/')}"
    _write_state({**state, "address": address, "url": url, "app": app["name"], "config": serve_cfg})
    return UpResult(app=app["name"], url=url, address=address, head_pid=head.pid if head else None)


def _running_cluster() -> dict:
    """The cluster `dynray cluster up` recorded, if it is running ({} otherwise)."""
    from jobs._ray import recorded_head
    from jobs.cluster import read_state

    cluster = read_state()
    if cluster and recorded_head(cluster)[0]:
        return cluster
    return {}


def status(cfg: Config) -> StatusResult:
    import requests

    from actors import serve_apps as D
    from jobs.cluster import nodes_by_type

    state = _read_state()
    _attach(cfg, state)
    app = state.get("app", "dynray")
    out = {"app": app, "address": state.get("address"), "url": state.get("url"), "serve": D.app_status(app)}
    types = {n["node_id"]: n["type"] for n in nodes_by_type()}
    out["replicas"] = {d: [{**r, "node_type": types.get(r["node_id"], "?")} for r in reps] for d, reps in D.replica_nodes(app, cfg.address or state.get("address") or os.environ.get("RAY_ADDRESS", "auto")).items()}
    if state.get("url"):
        try:
            out["health"] = requests.get(f"{state['url']}/v1/health", timeout=5).json()
            key = os.environ.get("DYNRAY_API_KEY")
            r = requests.get(f"{state['url']}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5)
            out["models"] = r.json()
            if r.status_code == 401 and not key:
                out["models"] = {"error": "GET /v1/models needs an API key: set DYNRAY_API_KEY (make one with `dynray keys create --name NAME`)"}
            out["drift"] = _drift(out["models"])
        except (requests.RequestException, ValueError) as e:
            out["health"] = {"error": str(e)}
    return StatusResult(body=out)


def _drift(models: dict) -> dict:
    """The drift watch's score per served version, from the /v1/models answer (one ingress
    replica's view: each replica watches the traffic it answers)."""
    d = models.get("drift")
    if not isinstance(d, dict):
        return {"error": models.get("error", "the ingress reported no drift watch")}
    if d.get("enabled") is False:
        return {"enabled": False}
    keep = ("status", "score", "threshold", "feature", "samples", "alarms", "fix")
    return {"versions": {v: {k: st[k] for k in keep if k in st} for v, st in d.get("versions", {}).items()},
            "cost_ms_per_request": d.get("cost_ms_per_request"), "note": "one ingress replica's view: each replica watches the requests it answers"}


def roll(cfg: Config) -> RollResult:
    from actors import serve_apps as D

    state = _read_state()
    if "config" not in state:
        raise ServingError("no applied config recorded", got=str(_state_path()), fix="roll works on apps started with `dynray serve up`")
    weights = None if cfg.weights is None else list(cfg.weights)
    refs = D.check_roll(state["config"], state["app"], list(cfg.model), weights)  # before any Ray call: a bad roll touches nothing
    _attach(cfg, state)
    state["config"] = D.roll(state["config"], state["app"], refs, weights, timeout_s=cfg.timeout)
    _write_state(state)
    return RollResult(app=state["app"], models=refs, weights=weights)


def down(cfg: Config) -> DownResult:
    from jobs._ray import stop_local_head

    state = _read_state()
    app = state.get("app")
    if state.get("head_pid") and not cfg.address:
        # a head of our own: stopping it removes the app with it, and needs no working Ray
        running, found = _head_found(state)
        stopped = stop_local_head(state["head_pid"], state.get("temp_dir"))
        _state_path().unlink(missing_ok=True)
        msg = f"stopped the local Ray head (pid {state['head_pid']}) and the app {app!r} on it" if running else f"{found}; stopped what was left of it and cleared its state" if stopped else f"{found}; cleared its stale state"
        return DownResult(stopped=app, cluster_stopped=stopped, message=msg)
    if not state and not cfg.address and not os.environ.get("RAY_ADDRESS"):
        return DownResult(stopped=None, cluster_stopped=False, message=f"nothing to stop: no serving state in {_state_path()}")
    from actors import serve_apps as D

    try:
        _attach(cfg, state)
    except ServingError as e:
        if not state:
            raise
        _state_path().unlink(missing_ok=True)
        return DownResult(stopped=None, cluster_stopped=False, message=f"{e.what} ({e.got}); cleared the serving state")
    D.shutdown()
    _state_path().unlink(missing_ok=True)
    return DownResult(stopped=app or "all Serve apps", cluster_stopped=False, message=f"shut Serve down on {cfg.address or state.get('address') or os.environ.get('RAY_ADDRESS')}")


ACTIONS = {"up": up, "status": status, "roll": roll, "down": down}


def run(cfg: Config) -> Result:
    return ACTIONS[cfg.action](cfg)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.deploy") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.deploy"))
