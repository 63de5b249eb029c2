"""Deploy, inspect, roll and remove the Serve apps, the way ``serve run CONFIG`` does it.

Apps are deployed **declaratively** (a ``ServeDeploySchema`` applied through the Serve
controller, exactly what ``serve run/deploy config.yaml`` do). Only then does Serve keep
replicas across updates: an update that changes nothing but ``user_config`` is a
``reconfigure`` in place, which is how a new model version rolls out with zero downtime.
(``serve.run(app)`` from Python gives every deployment a fresh code version, so it
replaces every replica.)
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import ray
import yaml
from ray.serve._private import api as _serve_api  # the same entry points `serve run CONFIG` uses
from ray.serve.schema import ServeDeploySchema

from dynray.errors import ServingError
from dynray.serving.config import CLOUD, EDGE, INGRESS, AppArgs, expert_name

__all__ = ["load_config", "app_config", "deploy", "wait_running", "roll", "delete_apps", "shutdown", "app_status", "check_resources"]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "cluster" / "serve.yaml"


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    """Read a Serve config file (``cluster/serve.yaml`` by default) as a plain dict."""
    p = Path(path)
    if not p.exists():
        raise ServingError("Serve config file not found", got=str(p), fix="pass --config cluster/serve.yaml or a file made from it")
    return yaml.safe_load(p.read_text())


def app_config(args: AppArgs, *, name: str, route_prefix: str) -> dict:
    """One ``applications:`` entry for ``args`` (user_config of every deployment made explicit)."""
    uc = {"models": list(args.models), "home": args.home}
    deployments = [{"name": INGRESS, "user_config": {**uc, "weights": args.weights}}]
    if "edge" in args.tiers():
        deployments.append({"name": EDGE, "user_config": uc})
    if "cloud" in args.tiers():
        deployments.append({"name": CLOUD, "user_config": uc})
    deployments += [{"name": expert_name(e), "user_config": uc} for e in range(args.experts.count) if args.system != "noop"]
    if args.system == "noop":
        deployments = []
    return {"name": name, "route_prefix": route_prefix, "import_path": "actors.app:build_app", "args": args.model_dump(exclude_none=True), "deployments": deployments}


def _client(http_options: dict | None = None):
    return _serve_api.serve_start(http_options=http_options or {})


def check_resources(apps: list[dict]) -> None:
    """Refuse up front an app no node can host: Serve would wait for it forever (RAY_NOTES §2)."""
    have = ray.cluster_resources()
    for app in apps:
        args = AppArgs.model_validate(app.get("args", {}))
        needs = {tier: getattr(args, tier).resources or {tier: 1} for tier in args.tiers()}
        if args.experts.count:
            needs["experts"] = args.experts.resources or {"cloud": 1}
        for tier, need in needs.items():
            for res, amount in need.items():
                if have.get(res, 0) < amount:
                    raise ServingError(
                        f"no node offers the {res!r} resource the {tier} tier needs",
                        got={k: v for k, v in have.items() if k in ("CPU", "edge", "cloud")},
                        fix=f"start nodes with --resources='{{\"{res}\": 8}}' (cluster/README.md), or an autoscaling cluster with {tier} node types",
                    )


def _with_expert_entries(config: dict) -> dict:
    """Give every remote expert deployment the devices' ``user_config`` (the served models),
    so a config file need not list ``Expert0..N-1`` and a roll reconfigures them too."""
    config = copy.deepcopy(config)
    for app in config.get("applications", []):
        args = AppArgs.model_validate(app.get("args", {}))
        deps = app.setdefault("deployments", [])
        device_uc = next((d.get("user_config") for d in deps if d["name"] in (EDGE, CLOUD)), None)
        names = {d["name"] for d in deps}
        for e in range(args.experts.count if args.system != "noop" else 0):
            if expert_name(e) not in names and device_uc is not None:
                deps.append({"name": expert_name(e), "user_config": copy.deepcopy(device_uc)})
    return config


def deploy(config: dict, *, timeout_s: float = 120.0, check: bool = True) -> None:
    """Apply a full Serve config (every declarative app) and wait until all are RUNNING."""
    config = _with_expert_entries(config)
    if check:
        check_resources(config.get("applications", []))
    schema = ServeDeploySchema.model_validate(config)
    client = _client(schema.http_options.model_dump() if "http_options" in config else None)
    client.deploy_apps(schema)
    wait_running([a["name"] for a in config["applications"]], timeout_s=timeout_s)


def app_status(name: str) -> dict:
    """``{"status": ..., "deployments": {name: {"status", "replicas": {state: n}}}}`` or {} if absent."""
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return {}
    return {
        "status": str(app.status.value),
        "message": app.message,
        "deployments": {d: {"status": str(s.status.value), "replicas": {str(getattr(k, "value", k)): v for k, v in s.replica_states.items()}} for d, s in app.deployments.items()},
    }


def wait_running(names: list[str], *, timeout_s: float = 120.0) -> None:
    """Block until every app is RUNNING; raise ServingError naming the one that is not."""
    until = time.monotonic() + timeout_s
    while True:
        states = {n: app_status(n) for n in names}
        failed = {n: s for n, s in states.items() if s.get("status") == "DEPLOY_FAILED"}
        if failed:
            n, s = next(iter(failed.items()))
            raise ServingError(f"Serve app {n!r} failed to deploy", got=(s.get("message") or "")[-400:], fix="fix the error above (registry path, model ref, config) and deploy again")
        if all(s.get("status") == "RUNNING" and all(d["status"] == "HEALTHY" for d in s["deployments"].values()) for s in states.values()):
            return
        if time.monotonic() > until:
            raise ServingError("Serve apps not running in time", got={n: s.get("status") for n, s in states.items()}, fix="check `dynray serve status` and the cluster's resources")
        time.sleep(0.25)


def roll(config: dict, app: str, models: list[str], weights: list[float] | None = None, *, timeout_s: float = 120.0) -> dict:
    """Zero-downtime version roll of ``app`` to ``models``; returns the final config.

    Three reconfigure steps, each waited for: devices load the new versions next to the
    old ones; the ingress moves traffic; devices drop what is no longer served. No replica
    restarts, and at every moment each version the ingress can pick is on every device.
    """
    entry = next((a for a in config["applications"] if a["name"] == app), None)
    if entry is None:
        raise ServingError("no such app in the config", got=app, fix=f"apps: {', '.join(a['name'] for a in config['applications'])}")
    old = next(d["user_config"]["models"] for d in entry["deployments"] if d["name"] == INGRESS)

    def step(device_models: list[str], ingress_models: list[str], ingress_weights: list[float] | None) -> dict:
        cfg = copy.deepcopy(config)
        e = next(a for a in cfg["applications"] if a["name"] == app)
        for d in e["deployments"]:
            if d["name"] == INGRESS:
                d["user_config"] = {**d["user_config"], "models": ingress_models, "weights": ingress_weights}
            else:
                d["user_config"] = {**d["user_config"], "models": device_models}
        deploy(cfg, timeout_s=timeout_s, check=False)
        return cfg

    both = list(dict.fromkeys([*old, *models]))
    step(both, old, next(d["user_config"].get("weights") for d in entry["deployments"] if d["name"] == INGRESS))
    step(both, models, weights)
    return step(list(models), models, weights)


def delete_apps(names: list[str]) -> None:
    from ray import serve

    for n in names:
        serve.delete(n)


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
