"""Cluster configs read as one shape: node types with their resources and autoscaling bounds.

dynray's clusters come in three formats that must agree (``tests/unit/test_cluster_spec.py``
checks that they do):

- a Ray cluster-launcher / autoscaler YAML (``cluster/local-autoscale.yaml`` for the fake
  multi-node provider, ``cluster/aws.yaml``), validated against Ray's own JSON schema
  (``ray/autoscaler/ray-schema.json``), so a missing or mistyped key is refused with its
  path;
- a KubeRay ``RayCluster`` manifest, and a ``RayService`` (its ``rayClusterConfig``, plus the
  Serve config in ``serveConfigV2``).

:class:`ClusterSpec` is what dynray needs of any of them: which node types offer the
``edge`` and ``cloud`` resources, how many CPUs they bring, and how far each may scale.
Pure Python: no Ray cluster is needed to read one.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynray.errors import ConfigError

__all__ = ["SPEC_KEY", "KV_NAMESPACE", "NodeType", "ClusterSpec", "load_cluster_spec", "launcher_spec", "kuberay_spec", "kuberay_serve_config", "TIER_RESOURCES"]

TIER_RESOURCES = ("edge", "cloud")
SPEC_KEY = b"cluster_spec"
"""Ray internal-KV key (in :data:`KV_NAMESPACE`) where ``dynray cluster up`` publishes its
:class:`ClusterSpec`, so that ``dynray serve up`` knows which nodes the autoscaler can add."""
KV_NAMESPACE = b"dynray"


@dataclass(frozen=True)
class NodeType:
    """One node type: what each node of it offers, and how many the autoscaler may run."""

    name: str
    resources: dict[str, float]
    """CPU, GPU and custom resources of one node."""
    min_workers: int = 0
    max_workers: int = 0

    def fits(self, bundle: dict[str, float]) -> bool:
        """Whether one node of this type can host ``bundle`` (e.g. ``{"CPU": 1, "edge": 1}``)."""
        return all(self.resources.get(k, 0) >= v for k, v in bundle.items() if v > 0)


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    head: NodeType
    workers: dict[str, NodeType] = field(default_factory=dict)
    """Worker node types by name."""
    max_workers: int = 0
    """Cluster-wide limit on worker nodes."""
    idle_timeout_s: float | None = None
    source: str = ""
    """The file and format it was read from."""

    def tier_types(self, tier: str) -> list[NodeType]:
        """Worker node types offering ``tier``'s resource."""
        return [t for t in self.workers.values() if t.resources.get(tier, 0) > 0]

    def can_host(self, bundle: dict[str, float]) -> bool:
        """Whether the autoscaler could add a node that hosts ``bundle``."""
        return any(t.max_workers > 0 and t.fits(bundle) for t in self.workers.values())

    def summary(self) -> dict[str, Any]:
        """Node types, resources and bounds: the part every config of dynray must agree on."""
        return {
            "head": _plain(self.head.resources),
            "workers": {n: {"resources": _plain(t.resources), "min": t.min_workers, "max": t.max_workers} for n, t in sorted(self.workers.items())},
            "idle_timeout_s": self.idle_timeout_s,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "max_workers": self.max_workers, **self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterSpec:
        workers = {n: NodeType(n, dict(w["resources"]), w["min"], w["max"]) for n, w in d["workers"].items()}
        return cls(name=d["name"], head=NodeType("head", dict(d["head"])), workers=workers, max_workers=d.get("max_workers", 0),
                   idle_timeout_s=d.get("idle_timeout_s"), source=d.get("source", ""))

    def check_tiers(self) -> None:
        """Refuse a spec where no worker node type offers one of the tier resources."""
        for tier in TIER_RESOURCES:
            if not self.tier_types(tier):
                raise ConfigError(f"{self.source}: no worker node type offers the {tier!r} resource", got=sorted(self.workers),
                                  fix=f"add a node type with resources: {{CPU: 2, {tier}: 2}} (see cluster/local-autoscale.yaml)")


def _plain(res: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(res.items())}


# -- the cluster-launcher / autoscaler YAML ---------------------------------------------------

def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _schema_at(schema: dict, path: list) -> dict:
    """The sub-schema for a config path (for the keys a mistyped one was meant to be)."""
    node = schema
    for part in path:
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("patternProperties"):  # e.g. available_node_types: any name -> a node type
            node = next(iter(node["patternProperties"].values()))
        else:
            return {}
        if "$ref" in node:
            node = schema.get("definitions", {}).get(node["$ref"].rsplit("/", 1)[-1], {})
    return node


def _schema_error(source: str, err: Any, schema: dict) -> ConfigError:
    path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    hint = ""
    m = re.search(r"\('([^']+)' was unexpected\)", err.message)
    if m:
        known = list(_schema_at(schema, list(err.absolute_path)).get("properties", {}))
        close = difflib.get_close_matches(m.group(1), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: at {path}: {err.message}{hint}", fix="fix that key (Ray's cluster config schema: ray/autoscaler/ray-schema.json)")


def launcher_spec(config: dict, *, source: str = "cluster config") -> ClusterSpec:
    """A cluster-launcher / autoscaler config (a dict from its YAML), checked against Ray's schema."""
    import jsonschema

    schema = _schema()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise _schema_error(source, errors[0], schema)
    types = config.get("available_node_types") or {}
    head_name = config.get("head_node_type")
    if head_name not in types:
        raise ConfigError(f"{source}: at head_node_type: {head_name!r} is not one of available_node_types", got=sorted(types), fix="name the head's node type there")
    head = types[head_name]
    workers = {n: NodeType(n, dict(t.get("resources") or {}), int(t.get("min_workers", 0)), int(t.get("max_workers", 0))) for n, t in types.items() if n != head_name}
    idle = config.get("idle_timeout_minutes")
    return ClusterSpec(name=config["cluster_name"], head=NodeType(head_name, dict(head.get("resources") or {})), workers=workers,
                       max_workers=int(config.get("max_workers", 0)), idle_timeout_s=None if idle is None else float(idle) * 60, source=f"{source} (cluster launcher)")


# -- KubeRay ----------------------------------------------------------------------------------

def _get(d: Any, path: str, source: str) -> Any:
    node = d
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            known = list(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, known, n=1)
            raise ConfigError(f"{source}: missing key {path}" + (f" (found {close[0]!r}: a typo?)" if close else ""), fix="see cluster/kuberay-raycluster.yaml")
        node = node[part]
    return node


def _start_resources(params: dict, source: str, where: str) -> dict[str, float]:
    """A KubeRay group's node resources, from its ``rayStartParams`` (num-cpus, resources JSON)."""
    res: dict[str, float] = {}
    if "num-cpus" in params:
        res["CPU"] = float(params["num-cpus"])
    if "resources" in params:
        raw = str(params["resources"]).strip()
        try:
            val = json.loads(raw)
            if isinstance(val, str):  # KubeRay's quoting: resources: '"{\"edge\": 2}"' is a JSON string holding the object
                val = json.loads(val)
            res.update({k: float(v) for k, v in val.items()})
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: at {where}.rayStartParams.resources: not a JSON object ({e})", got=raw, fix='write resources: \'"{\\"edge\\": 2}"\'') from None
    return res


def kuberay_spec(manifest: dict, *, source: str = "KubeRay manifest") -> ClusterSpec:
    """A ``RayCluster`` manifest, or the cluster of a ``RayService``."""
    kind = manifest.get("kind")
    if kind == "RayService":
        spec = _get(manifest, "spec.rayClusterConfig", source)
    elif kind == "RayCluster":
        spec = _get(manifest, "spec", source)
    else:
        raise ConfigError(f"{source}: kind must be RayCluster or RayService", got=kind, fix="use a KubeRay manifest (ray.io/v1)")
    head = _start_resources(_get(spec, "headGroupSpec.rayStartParams", source), source, "headGroupSpec")
    workers = {}
    for i, g in enumerate(_get(spec, "workerGroupSpecs", source)):
        where = f"workerGroupSpecs[{i}]"
        name = _get(g, "groupName", f"{source} {where}")
        workers[name] = NodeType(name, _start_resources(_get(g, "rayStartParams", f"{source} {where}"), source, where),
                                 int(g.get("minReplicas", 0)), int(_get(g, "maxReplicas", f"{source} {where}")))
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    return ClusterSpec(name=_get(manifest, "metadata.name", source), head=NodeType("head", head), workers=workers,
                       max_workers=sum(w.max_workers for w in workers.values()), idle_timeout_s=None if idle is None else float(idle), source=f"{source} ({kind})")


def kuberay_serve_config(manifest: dict, *, source: str = "RayService manifest") -> dict:
    """The Serve config a ``RayService`` deploys (its ``serveConfigV2`` YAML string)."""
    raw = _get(manifest, "spec.serveConfigV2", source)
    return yaml.safe_load(raw)


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    """Read any of the three formats from a YAML file (a KubeRay file by its ``kind``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("cluster config file not found", got=str(p), fix="pass --config cluster/local-autoscale.yaml or a file made from it")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not YAML ({e})", fix="fix the YAML syntax") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: not a YAML mapping", got=type(doc).__name__, fix="see cluster/local-autoscale.yaml")
    if "kind" in doc:
        return kuberay_spec(doc, source=str(p))
    return launcher_spec(doc, source=str(p))
