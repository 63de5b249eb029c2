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
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pydantic
import ray
import yaml
from ray.serve._private import api as _serve_api  # the same entry points `serve run CONFIG` uses
from ray.serve.schema import ServeDeploySchema

from actors.keystore import start_keystore
from actors.ratelimiter import start_ratelimiter
from actors.registry import REGISTRY_ACTOR, start_registry
from dynray.cluster_spec import KV_NAMESPACE, SPEC_KEY, ClusterSpec, NodeType
from dynray.errors import ConfigError, ServingError
from dynray.registry import ModelRegistry, default_home
from dynray.serving.config import CLOUD, EDGE, INGRESS, AppArgs, DeviceUserConfig, IngressUserConfig, expert_name
from dynray.serving.split import TrafficSplit

__all__ = [
    "load_config",
    "app_config",
    "prepare_config",
    "check_versions",
    "check_roll",
    "deploy",
    "wait_running",
    "roll",
    "delete_apps",
    "shutdown",
    "app_status",
    "check_resources",
    "autoscaling_spec",
    "replica_bundles",
    "replica_nodes",
]

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
        deployments.append({"name": EDGE, "user_config": {**uc, **({"variants": dict(args.edge.variants)} if args.edge.variants else {})}})
    if "cloud" in args.tiers():
        deployments.append({"name": CLOUD, "user_config": {**uc, **({"variants": dict(args.cloud.variants)} if args.cloud.variants else {})}})
    deployments += [{"name": expert_name(e), "user_config": uc} for e in range(args.experts.count) if args.system != "noop"]
    if args.system == "noop":
        deployments = []
    return {"name": name, "route_prefix": route_prefix, "import_path": "actors.app:build_app", "args": args.model_dump(exclude_none=True), "deployments": deployments}


def _client(http_options: dict | None = None):
    return _serve_api.serve_start(http_options=http_options or {})


def autoscaling_spec() -> ClusterSpec | None:
    """The node types this cluster's autoscaler can add: what ``dynray cluster up`` published,
    else the v2 autoscaler's cluster config (KubeRay); None on a fixed cluster."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(SPEC_KEY, namespace=KV_NAMESPACE)
    if raw:
        return ClusterSpec.from_dict(json.loads(raw))
    try:
        from ray._private.state import state

        cc = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older GCS, or no autoscaler state: a fixed cluster
        cc = None
    if cc is None or not cc.node_group_configs:
        return None
    workers = {g.name: NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, g.min_count, g.max_count if g.max_count >= 0 else 10**6) for g in cc.node_group_configs}
    return ClusterSpec(name="cluster", head=NodeType("head", {}), workers=workers, source="the autoscaler's cluster config")


def replica_bundles(args: AppArgs) -> dict[str, dict[str, float]]:
    """What one replica of each device part reserves: CPU plus its tier's resource."""
    out = {tier: {"CPU": getattr(args, tier).num_cpus, **(getattr(args, tier).resources or {tier: 1})} for tier in args.tiers()}
    if args.experts.count and args.system != "noop":
        out["experts"] = {"CPU": args.experts.num_cpus, **(args.experts.resources or {"cloud": 1})}
    return out


def check_resources(apps: list[dict]) -> None:
    """Refuse up front an app no node can host, now or after the autoscaler adds one: Serve
    would wait for it forever (RAY_NOTES §2)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    spec = autoscaling_spec()
    for app in apps:
        args = AppArgs.model_validate(app.get("args", {}))
        for part, bundle in replica_bundles(args).items():
            if any(all(node.get(k, 0) >= v for k, v in bundle.items() if v > 0) for node in nodes):
                continue
            if spec is not None and spec.can_host(bundle):
                log.info("no node hosts a %s replica (%s) yet: the autoscaler adds one (%s)", part, bundle, ", ".join(t.name for t in spec.workers.values() if t.fits(bundle)))
                continue
            tier = next((k for k in bundle if k != "CPU"), "CPU")
            raise ServingError(
                f"no node can host a {part} replica, which reserves {bundle}" + (", and the autoscaler has no node type for it" if spec else " (and this cluster has no autoscaler)"),
                got=[{k: v for k, v in n.items() if k in ("CPU", "edge", "cloud")} for n in nodes],
                fix=f"start nodes with --num-cpus=2 --resources='{{\"{tier}\": 2}}' (cluster/README.md), or `dynray cluster up --local` (node types for both tiers)",
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


def _quiet_serve_driver_log() -> None:
    """Serve sets its driver-side logger to INFO when ``ray.serve`` is imported ("Started Serve",
    "Deleting app"): this process's user sees its warnings only, unless running with -v. The
    controller and the replicas log to files (RAY_SERVE_LOG_TO_STDERR=0, jobs/_ray.py)."""
    logging.getLogger("ray.serve").setLevel(logging.DEBUG if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else logging.WARNING)


def deploy(config: dict, *, timeout_s: float = 120.0, check: bool = True) -> None:
    """Apply a full Serve config (every declarative app) and wait until all are RUNNING."""
    config = _with_expert_entries(config)
    if check:
        check_resources(config.get("applications", []))
    schema = ServeDeploySchema.model_validate(config)
    for app in config.get("applications", []):
        args = AppArgs.model_validate(app.get("args", {}))
        if args.registry:  # replicas read models through it: it must run before they start
            start_registry(args.home)
        if args.auth.enabled and args.system != "noop":  # the ingress replicas look both up when they start
            start_keystore(args.home)
            start_ratelimiter()
    _quiet_serve_driver_log()
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


def replica_nodes(app: str, address: str) -> dict[str, list[dict]]:
    """Each deployment's live replicas with the node each runs on (State API: needs the
    dashboard). ``address``: the cluster's GCS address (the State API would otherwise guess,
    and may pick another Ray on this host)."""
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{app}:"
    out: dict[str, list[dict]] = {}
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        if a.class_name.startswith(prefix):
            out.setdefault(a.class_name[len(prefix):], []).append({"replica": a.name.rsplit("#", 1)[-1], "node_id": a.node_id})
    return {d: sorted(r, key=lambda x: x["replica"]) for d, r in sorted(out.items())}


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


def _entry(config: dict, app: str) -> dict:
    entry = next((a for a in config.get("applications", []) if a["name"] == app), None)
    if entry is None:
        raise ServingError("no such app in the config", got=app, fix=f"apps: {', '.join(a['name'] for a in config.get('applications', []))}")
    return entry


def _invalid(what: str, e: pydantic.ValidationError, fix: str) -> ConfigError:
    got = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())
    return ConfigError(what, got=got, fix=fix)


def check_versions(home: str | None, models: Sequence[str], weights: Sequence[float] | None) -> list[str]:
    """Resolve and verify ``models`` in the registry at ``home`` and check the A/B split;
    return the concrete refs (``name:vN``). Raises a DynrayError naming the fix; touches no Ray."""
    if not models:
        raise ConfigError("no model versions to serve", fix="pass --model NAME:vN (repeat it for A/B)")
    reg = ModelRegistry(default_home(home))
    infos = [reg.verify(m) for m in models]  # unknown refs, missing or corrupt files
    for m, info in zip(models, infos, strict=True):
        if info.meta.get("kind") != "dynamic_net":
            raise ConfigError("not a servable model", got=f"{m} -> {info.ref} ({info.meta.get('kind')})", fix="serve a model registered by `dynray train` (see `dynray models list`)")
    refs = [i.ref for i in infos]
    TrafficSplit.of(refs, None if weights is None else [float(w) for w in weights])  # counts, duplicates, signs
    shapes = sorted({tuple(i.meta["config"].get("input_shape", ())) for i in infos})
    if len(shapes) != 1:
        raise ConfigError("served versions must share one input shape", got=shapes, fix="serve models trained on the same dataset")
    return refs


def _is_device(name: str) -> bool:
    """Deployments that host model versions (their ``user_config`` is a DeviceUserConfig)."""
    return name in (EDGE, CLOUD) or (name.startswith("Expert") and name[len("Expert"):].isdigit())


def _with_versions(config: dict, app: str, device_models: list[str], ingress_models: list[str], weights: list[float] | None) -> dict:
    """``config`` with ``app``'s ingress serving ``ingress_models`` at ``weights`` and its devices hosting ``device_models``."""
    cfg = copy.deepcopy(config)
    for d in _entry(cfg, app).get("deployments", []):
        if d["name"] == INGRESS:
            d["user_config"] = {**d.get("user_config", {}), "models": list(ingress_models), "weights": weights}
        elif _is_device(d["name"]):
            d["user_config"] = {**d.get("user_config", {}), "models": list(device_models)}
    return cfg


def _check_config(config: dict) -> None:
    """Every app's args and every deployment's ``user_config`` as the replicas will parse them."""
    try:
        for app in config.get("applications", []):
            AppArgs.model_validate(app.get("args", {}))
            for d in app.get("deployments", []):
                if d["name"] == INGRESS:
                    IngressUserConfig.model_validate(d.get("user_config", {}))
                elif _is_device(d["name"]):
                    DeviceUserConfig.model_validate(d.get("user_config", {}))
        ServeDeploySchema.model_validate(_with_expert_entries(config))
    except pydantic.ValidationError as e:
        raise _invalid("the Serve config is invalid", e, "fix the named field in the config file or the flags") from None


def prepare_config(config: dict, *, home: str, models: Sequence[str] = (), weights: Sequence[float] | None = None, port: int | None = None) -> dict:
    """The config ``dynray serve up`` deploys: the first app serves ``models`` (default: the
    config's) at ``weights`` from the registry at ``home``, pinned to concrete versions, on
    ``port``; checked in full (registry, split, args, user_configs) before any Ray call."""
    cfg = copy.deepcopy(config)
    app = cfg["applications"][0]
    w = None if weights is None else [float(x) for x in weights]
    refs = check_versions(home, list(models) or app.get("args", {}).get("models", ["production"]), w)
    # replicas read the models through the registry actor on this node, never a path on theirs
    app.setdefault("args", {}).update(home=home, models=refs, weights=w, registry=app.get("args", {}).get("registry", REGISTRY_ACTOR))
    if port:
        cfg["http_options"] = {**cfg.get("http_options", {}), "port": port}
    for d in app.get("deployments", []):
        if d["name"] == INGRESS or _is_device(d["name"]):
            d["user_config"] = {**d.get("user_config", {}), "models": refs, "home": home, **({"weights": w} if d["name"] == INGRESS else {})}
    _check_config(cfg)
    return cfg


def check_roll(config: dict, app: str, models: Sequence[str], weights: Sequence[float] | None = None) -> list[str]:
    """Everything a roll of ``app`` to ``models`` at ``weights`` needs, checked without
    touching Serve: the versions (:func:`check_versions`), and the args and user_configs the
    replicas will get. Returns the concrete refs."""
    entry = _entry(config, app)
    try:
        home = AppArgs.model_validate(entry.get("args", {})).home
    except pydantic.ValidationError as e:
        raise _invalid("the applied config's args are invalid", e, "`dynray serve down`, then `dynray serve up` again") from None
    w = None if weights is None else [float(x) for x in weights]
    refs = check_versions(home, models, w)
    final = _with_versions(config, app, refs, refs, w)
    _entry(final, app)["args"] = {**entry.get("args", {}), "models": refs, "weights": w}
    _check_config(final)
    return refs


def roll(config: dict, app: str, models: list[str], weights: list[float] | None = None, *, timeout_s: float = 120.0) -> dict:
    """Zero-downtime version roll of ``app`` to ``models``; returns the final config.

    Everything is checked first (:func:`check_roll`): a bad roll deploys nothing. Then
    three reconfigure steps, each waited for: devices load the new versions next to the
    old ones; the ingress moves traffic; devices drop what is no longer served. No replica
    restarts, and at every moment each version the ingress can pick is on every device.
    If a step fails anyway (say a checkpoint that verifies but does not load), ``config``
    is applied again, so the app goes back to what it served.
    """
    refs = check_roll(config, app, models, weights)
    w = None if weights is None else [float(x) for x in weights]
    ingress = next(d["user_config"] for d in _entry(config, app)["deployments"] if d["name"] == INGRESS)
    old = list(ingress["models"])
    both = list(dict.fromkeys([*old, *refs]))
    # only user_configs change: a change of `args` would rebuild the app and restart every replica
    steps = [_with_versions(config, app, both, old, ingress.get("weights")), _with_versions(config, app, both, refs, w), _with_versions(config, app, refs, refs, w)]
    try:
        for cfg in steps:
            deploy(cfg, timeout_s=timeout_s, check=False)
    except ServingError as e:
        log.warning("roll to %s failed (%s); applying the previous config again", refs, e.what)
        try:
            deploy(config, timeout_s=timeout_s, check=False)
        except ServingError as again:
            raise ServingError(f"roll to {', '.join(refs)} failed, and so did putting the previous versions back", got=again.got, fix="`dynray serve status`; then roll again or `dynray serve down`") from e
        raise ServingError(f"roll to {', '.join(refs)} failed; the previous versions serve again", got=e.got, fix=e.fix) from e
    return steps[-1]


def delete_apps(names: list[str]) -> None:
    from ray import serve

    for n in names:
        serve.delete(n)


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
