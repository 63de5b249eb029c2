"""Every cluster config of dynray agrees: node types, resources, bounds and the Serve config;
a malformed one is refused with the key path at fault."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynray.cluster_spec import kuberay_serve_config, kuberay_spec, launcher_spec, load_cluster_spec
from dynray.errors import ConfigError
from dynray.serving.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CONFIGS = ["local-autoscale.yaml", "aws.yaml", "kuberay-raycluster.yaml", "kuberay-rayservice.yaml"]


def _norm(summary: dict) -> dict:
    """KubeRay group names are DNS labels: `edge.worker` there is `edge-worker`."""
    return {**summary, "workers": {n.replace(".", "-"): w for n, w in summary["workers"].items()}}


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_cluster_config_has_the_same_node_types_resources_and_bounds():
    specs = {f: load_cluster_spec(CLUSTER / f) for f in CONFIGS}
    local = _norm(specs["local-autoscale.yaml"].summary())
    assert set(local["workers"]) == {"edge-worker", "cloud-worker"}
    for f, spec in specs.items():
        spec.check_tiers()  # a node type for each tier
        assert _norm(spec.summary()) == local, f
    # a device replica (CPU 1 + its tier's resource, the AppArgs defaults) fits each tier's node type
    args = AppArgs()
    for tier in ("edge", "cloud"):
        bundle = {"CPU": getattr(args, tier).num_cpus, tier: 1}
        assert specs["local-autoscale.yaml"].can_host(bundle) and not specs["local-autoscale.yaml"].head.fits(bundle)


def test_the_rayservice_serves_cluster_serve_yaml_with_only_the_real_node_changes():
    served = kuberay_serve_config(_yaml("kuberay-rayservice.yaml"))
    ours = _yaml("serve.yaml")
    assert served["applications"][0]["args"]["simulate"] is False and served["http_options"]["host"] == "0.0.0.0"
    served["applications"][0]["args"]["simulate"] = ours["applications"][0]["args"]["simulate"]
    served["http_options"]["host"] = ours["http_options"]["host"]
    assert served == ours
    AppArgs.model_validate(served["applications"][0]["args"])
    # and its cluster is the RayCluster manifest's
    assert _yaml("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"] == _yaml("kuberay-raycluster.yaml")["spec"]


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(availble_node_types=c.pop("available_node_types")), r"at \(top level\): .*'availble_node_types' was unexpected.*did you mean 'available_node_types'"),
    (lambda c: c["available_node_types"]["edge.worker"].update(max_worker=c["available_node_types"]["edge.worker"].pop("max_workers")),
     r"at available_node_types\.edge\.worker: .*'max_worker' was unexpected.*did you mean 'max_workers'"),
    (lambda c: c.pop("provider"), r"'provider' is a required property"),
    (lambda c: c["available_node_types"]["edge.worker"]["resources"].update(CPU="two"), r"at available_node_types\.edge\.worker\.resources\.CPU: 'two' is not of type 'integer'"),
    (lambda c: c.update(head_node_type="head"), r"at head_node_type: 'head' is not one of available_node_types"),
])
def test_a_malformed_launcher_config_names_the_key_path(edit, match):
    cfg = _yaml("local-autoscale.yaml")
    edit(cfg)
    with pytest.raises(ConfigError, match=match) as e:
        launcher_spec(cfg, source="bad.yaml")
    assert "\n" not in str(e.value)


def test_a_config_without_a_node_type_for_a_tier_is_refused():
    cfg = _yaml("local-autoscale.yaml")
    del cfg["available_node_types"]["cloud.worker"]
    with pytest.raises(ConfigError, match="no worker node type offers the 'cloud' resource"):
        launcher_spec(cfg, source="bad.yaml").check_tiers()


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["spec"]["workerGroupSpecs"][0].pop("maxReplicas"), r"missing key maxReplicas"),
    (lambda m: m["spec"].update(headGroupSpc=m["spec"].pop("headGroupSpec")), r"missing key headGroupSpec.rayStartParams \(found 'headGroupSpc': a typo\?\)"),
    (lambda m: m["spec"]["workerGroupSpecs"][0]["rayStartParams"].update(resources="{edge: 2"), r"workerGroupSpecs\[0\]\.rayStartParams\.resources: not a JSON object"),
])
def test_a_malformed_kuberay_manifest_names_the_key(edit, match):
    m = copy.deepcopy(_yaml("kuberay-raycluster.yaml"))
    edit(m)
    with pytest.raises(ConfigError, match=match):
        kuberay_spec(m, source="bad.yaml")


def test_cluster_up_with_a_mistyped_key_exits_2_with_one_line(tmp_path, clean_env):
    cfg = _yaml("local-autoscale.yaml")
    cfg["idle_timeout_minute"] = cfg.pop("idle_timeout_minutes")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([str(Path(sys.executable).with_name("dynray")), "cluster", "up", "--local", "--config", str(bad)], cwd=ROOT, env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "idle_timeout_minute" in line and "did you mean 'idle_timeout_minutes'" in line, line
    assert not (tmp_path / "cluster.json").exists()
