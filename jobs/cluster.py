"""Start, inspect and stop a local autoscaling cluster (``dynray cluster up --local|status|down``).

    python -m jobs.cluster up --local [--config cluster/local-autoscale.yaml]
    python -m jobs.cluster status
    python -m jobs.cluster down

``up --local`` starts a Ray head that offers neither ``edge`` nor ``cloud``, with the
autoscaler on the fake multi-node provider (RAY_NOTES §9): the config's ``edge.worker`` and
``cloud.worker`` node types are real raylets on this machine that the autoscaler adds when
replicas ask for their resources and removes after the idle timeout. It also starts the
registry actor on the head (``actors/registry.py``), so replicas on any node get their models
through Ray and jobs register into this home's registry. The address goes to
``$DYNRAY_HOME/cluster.json``, where ``dynray serve up``, ``dynray submit`` and
``dynray cluster status`` find it.

A real cluster comes from ``ray up cluster/aws.yaml`` or the KubeRay manifests in
``cluster/``; their node types are the same as the local config's.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tyro
import yaml

from dynray.cluster_spec import KV_NAMESPACE, SPEC_KEY, ClusterSpec, launcher_spec
from dynray.errors import ConfigError, ServingError
from dynray.fileio import write_atomic
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import default_home

__all__ = ["Config", "UpResult", "StatusResult", "DownResult", "Result", "run", "main", "read_state", "attach"]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "cluster" / "local-autoscale.yaml"
# how fast the local cluster reacts to a lost node: the GCS health-checks each raylet every
# second (Ray's default 3 s; 5 misses mark it dead, ~5 s instead of the 13 s measured with the
# default), the autoscaler loops every second and terminates a node whose raylet stopped
# reporting after 10 s instead of Ray's default 30 s
AUTOSCALER_ENV = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10", "RAY_health_check_period_ms": "1000"}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Start (up --local), inspect (status) or stop (down) a local autoscaling cluster."""

    action: tyro.conf.Positional[Literal["up", "status", "down"]]
    """up: start the head with the autoscaler; status: nodes by type, resources, load and pending demand; down: stop all of it."""
    local: bool = False
    """up: a cluster on this machine (fake multi-node provider). The only kind `up` starts: use `ray up cluster/aws.yaml` or KubeRay for real ones."""
    config: str | None = None
    """Autoscaling config for up (default: cluster/local-autoscale.yaml)."""
    json: bool = False
    """status: print JSON instead of a table."""
    timeout: float = 90.0
    """Seconds to wait for the head."""

    def __post_init__(self) -> None:
        if self.action == "up" and not self.local:
            raise ConfigError("`cluster up` starts local clusters only", fix="dynray cluster up --local  (a cloud cluster: `ray up cluster/aws.yaml`, or kubectl apply -f cluster/kuberay-raycluster.yaml)")
        if self.action != "up" and (self.local or self.config):
            raise ConfigError(f"`{self.action}` takes no --local or --config", fix=f"dynray cluster {self.action}")
        if self.timeout <= 0:
            raise ConfigError("--timeout must be > 0 seconds", got=self.timeout, fix="e.g. --timeout 90")


@dataclass(frozen=True)
class UpResult:
    address: str
    dashboard: str
    head_pid: int
    spec: ClusterSpec

    def summary(self) -> str:
        types = ", ".join(f"{n} ({t.min_workers}-{t.max_workers} x {_res(t.resources)})" for n, t in self.spec.workers.items())
        return (f"cluster up: head at {self.address} (pid {self.head_pid}), dashboard and jobs at {self.dashboard}\n"
                f"node types: {types}; nodes come when replicas ask for them and leave {self.spec.idle_timeout_s or 0:g} s after they go idle\n"
                f"next: `dynray serve up`, `dynray submit STEP -- ARGS`, `dynray cluster status`; stop with `dynray cluster down`")


@dataclass(frozen=True)
class StatusResult:
    body: dict
    as_json: bool = False

    def summary(self) -> str:
        if self.as_json:
            return json.dumps(self.body, indent=2)
        b = self.body
        lines = [f"cluster at {b['address']} (dashboard {b['dashboard']})", f"{'node':<10} {'type':<18} {'state':<6} {'CPU used/total':<15} {'edge':<9} {'cloud':<9}"]
        for n in b["nodes"]:
            used = {k: n["total"].get(k, 0) - n["available"].get(k, 0) for k in n["total"]}
            cell = lambda k: f"{used.get(k, 0):g}/{n['total'][k]:g}" if k in n["total"] else "-"  # noqa: E731
            lines.append(f"{n['node_id'][-6:]:<10} {n['type']:<18} {'alive' if n['alive'] else 'dead':<6} {cell('CPU'):<15} {cell('edge'):<9} {cell('cloud'):<9}")
        lines.append(f"pending demand: {b['pending_demand'] or 'none'}; launching: {b['launching'] or 'none'}")
        return "\n".join(lines)


@dataclass(frozen=True)
class DownResult:
    stopped: bool
    message: str

    def summary(self) -> str:
        return self.message


Result = UpResult | StatusResult | DownResult


def _res(r: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in r.items()) + "}"


def _state_path() -> Path:
    return default_home() / "cluster.json"


def read_state() -> dict:
    """The recorded cluster (``{}`` if none): address, dashboard, head_pid, temp_dir, auth_mode, spec."""
    from jobs._ray import read_state_file

    return read_state_file(_state_path(), "cluster")


def load_local_config(path: str | Path) -> tuple[dict, ClusterSpec]:
    """The autoscaling config and its spec, refused with the key path at fault if malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("cluster config file not found", got=str(p), fix="pass --config cluster/local-autoscale.yaml or a file made from it")
    config = yaml.safe_load(p.read_text())
    if not isinstance(config, dict):
        raise ConfigError(f"{p}: not a YAML mapping", fix="see cluster/local-autoscale.yaml")
    spec = launcher_spec(config, source=str(p))
    if config["provider"].get("type") != "fake_multinode":
        raise ConfigError(f"{p}: at provider.type: `up --local` needs the fake_multinode provider", got=config["provider"].get("type"), fix="use cluster/local-autoscale.yaml; launch cloud configs with `ray up`")
    spec.check_tiers()
    return config, spec


def up(cfg: Config) -> UpResult:
    import ray

    from actors.registry import start_registry
    from jobs._ray import ensure_auth_env, free_port, recorded_head, start_local_head, stop_local_head

    config, spec = load_local_config(cfg.config or DEFAULT_CONFIG)
    state = read_state()
    if state:
        running, found = recorded_head(state)
        if running:
            raise ServingError("the cluster is already up", got=state.get("address"), fix=f"use it (dashboard {state.get('dashboard')}), or `dynray cluster down` first")
        stop_local_head(state.get("head_pid"), state.get("temp_dir"))
        _state_path().unlink(missing_ok=True)
        log.warning("%s; cleared its stale state", found)
    import tempfile

    tmp = tempfile.mkdtemp(prefix="dynray-cluster-", dir="/tmp")
    port = free_port()
    # the fake workers dial the head's GCS at this address (without it: 6379)
    resolved = {**config, "provider": {**config["provider"], "gcs_address": f"127.0.0.1:{port}"}}
    cfg_path = Path(tmp) / "autoscale.yaml"
    cfg_path.write_text(yaml.safe_dump(resolved))
    head_res = {k: v for k, v in spec.head.resources.items() if k != "CPU"}
    home = str(default_home())
    t0 = time.perf_counter()
    head = start_local_head(head_res, cwd=ROOT, num_cpus=spec.head.resources.get("CPU", 1), timeout_s=cfg.timeout, autoscaling_config=cfg_path,
                            extra_env={**AUTOSCALER_ENV, "DYNRAY_HOME": None}, gcs_port=port, temp_dir=tmp)  # no DYNRAY_HOME on the nodes: models go through the registry actor
    state = {**head.to_state(), "spec": spec.to_dict(), "config": str(Path(cfg.config or DEFAULT_CONFIG).resolve()), "home": home}
    write_atomic(_state_path(), json.dumps(state, indent=2))  # first: if anything below fails, `down` still finds the head
    try:
        ensure_auth_env(head.auth_mode)
        ray.init(address=head.address, logging_level="WARNING", log_to_driver=False)
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(SPEC_KEY, json.dumps(spec.to_dict()).encode(), overwrite=True, namespace=KV_NAMESPACE)
        head_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
        start_registry(home, node_id=head_node)
        ray.shutdown()
    except BaseException:
        ray.shutdown()
        stop_local_head(head.pid, head.temp_dir)
        _state_path().unlink(missing_ok=True)
        raise
    log.info("cluster head up in %.1f s", time.perf_counter() - t0)
    return UpResult(address=head.address, dashboard=head.dashboard, head_pid=head.pid, spec=spec)


def attach(state: dict | None = None) -> dict:
    """``ray.init`` to the recorded cluster (in its auth mode); returns its state."""
    import ray

    from jobs._ray import ensure_auth_env, recorded_head

    state = read_state() if state is None else state
    if not state:
        raise ServingError("no cluster is up", got=str(_state_path()), fix="run `dynray cluster up --local` first")
    running, found = recorded_head(state)
    if not running:
        raise ServingError(found, got=state.get("address"), fix="`dynray cluster down` clears it; then `dynray cluster up --local`")
    ensure_auth_env(state.get("auth_mode"))
    if not ray.is_initialized():
        ray.init(address=state["address"], logging_level="WARNING", log_to_driver=False)
    return state


def autoscaler_report() -> dict[str, Any]:
    """The autoscaler's last status (what `ray status` prints), from the GCS; {} if none yet."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else {}


def nodes_by_type() -> list[dict]:
    """Every node Ray knows, with its node type (from the autoscaler), resources and what is free."""
    import ray
    from ray._private.state import available_resources_per_node

    report = autoscaler_report().get("autoscaler_report") or {}
    types = report.get("node_type_mapping") or {}
    free = available_resources_per_node()
    out = []
    for n in ray.nodes():
        total = {k: v for k, v in n["Resources"].items() if k in ("CPU", "edge", "cloud", "GPU")}
        avail = {k: v for k, v in free.get(n["NodeID"], {}).items() if k in total}
        head = "node:__internal_head__" in n["Resources"]
        kind = types.get(n["NodeID"]) or ("head" if head else "(removed)" if not n["Alive"] else "?")
        out.append({"node_id": n["NodeID"], "type": kind, "alive": bool(n["Alive"]), "head": head, "total": total, "available": avail})
    return out


def status(cfg: Config) -> StatusResult:
    state = attach()
    full = autoscaler_report()
    report = full.get("autoscaler_report") or {}
    demand = (full.get("load_metrics_report") or {}).get("resource_demand") or []
    body = {
        "address": state["address"], "dashboard": state["dashboard"], "nodes": nodes_by_type(),
        "active": report.get("active_nodes") or {}, "launching": report.get("pending_launches") or {},
        "pending_demand": [{"bundle": b, "count": c} for b, c in demand], "failed": report.get("failed_nodes") or [],
    }
    return StatusResult(body=body, as_json=cfg.json)


def down(cfg: Config) -> DownResult:
    from jobs._ray import recorded_head, stop_local_head

    state = read_state()
    if not state:
        return DownResult(stopped=False, message=f"nothing to stop: no cluster state in {_state_path()}")
    running, found = recorded_head(state)
    stopped = stop_local_head(state.get("head_pid"), state.get("temp_dir"))  # the fake nodes carry the head's mark: they go too
    _state_path().unlink(missing_ok=True)
    serve_state = default_home() / "serve.json"
    if serve_state.exists() and json.loads(serve_state.read_text() or "{}").get("address") == state.get("address"):
        serve_state.unlink()  # the app it recorded went with the cluster
    msg = f"stopped the cluster at {state.get('address')} (head pid {state.get('head_pid')}) and its nodes" if running else f"{found}; stopped what was left and cleared its state" if stopped else f"{found}; cleared its stale state"
    return DownResult(stopped=stopped, message=msg)


ACTIONS = {"up": up, "status": status, "down": down}


def run(cfg: Config) -> Result:
    return ACTIONS[cfg.action](cfg)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.cluster") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.cluster"))
