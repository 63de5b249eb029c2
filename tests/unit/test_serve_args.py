"""The Serve app's grouped args (``AppArgs``): the shipped config parses, flat names are refused with their new place."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dynray.serving.config import AppArgs, FailoverArgs, IngressArgs, RouterArgs, SchedulingArgs

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_serve_yaml_parses_into_the_groups():
    args = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())["applications"][0]["args"]
    a = AppArgs.model_validate(args)
    assert a.ingress.replicas == 2 and a.failover.deadline_ms == 3000 and a.scheduling.policy == "latency"
    assert a.router.kind == "thresholds" and a.router.lambda_cost == 0.01 and a.edge.min_replicas == 2
    assert AppArgs.model_validate(a.model_dump()) == a  # build_app hands the ingress a dump


def test_defaults_live_in_the_groups():
    a = AppArgs()
    assert a.ingress == IngressArgs() and a.failover == FailoverArgs() and a.scheduling == SchedulingArgs() and a.router == RouterArgs()
    assert set(AppArgs.model_fields) == {"system", "home", "registry", "models", "weights", "edge_stages", "simulate", "edge", "cloud", "experts",
                                         "ingress", "failover", "scheduling", "router", "auth", "detect", "drift", "feedback"}
    assert a.auth.enabled is True  # secure by default: an app without an auth group asks for keys


@pytest.mark.parametrize("flat, new", [
    ({"ingress_replicas": 1}, "`ingress_replicas` is now `ingress.replicas`"),
    ({"ingress_max_ongoing_requests": 9}, "`ingress_max_ongoing_requests` is now `ingress.max_ongoing_requests`"),
    ({"max_body_bytes": 4096}, "`max_body_bytes` is now `ingress.max_body_bytes`"),
    ({"deadline_ms": 10.0}, "`deadline_ms` is now `failover.deadline_ms`"),
    ({"health_check_period_s": 2.0}, "`health_check_period_s` is now `failover.health_check_period_s`"),
    ({"policy": "cost"}, "`policy` is now `scheduling.policy`"),
    ({"lambda_cost": 0.1}, "`lambda_cost` is now `router.lambda_cost`"),
    ({"router": "ppo"}, "`router` is now `router.kind`: write `router: {kind: 'ppo'}`"),
])
def test_a_flat_name_is_refused_with_its_new_place(flat, new):
    with pytest.raises(ValidationError) as e:
        AppArgs.model_validate(flat)
    assert new in str(e.value)


def test_several_flat_names_are_all_named():
    with pytest.raises(ValidationError, match=r"and 2 more flat name\(s\): deadline_ms, policy"):
        AppArgs.model_validate({"ingress_replicas": 1, "deadline_ms": 10.0, "policy": "cost"})


@pytest.mark.parametrize("bad, match", [
    ({"ingress": {"replica": 2}}, "replica"),              # a typo inside a group
    ({"scheduling": {"policy": "fastest"}}, "unknown scheduling policy 'fastest'"),
    ({"router": {"kind": "oracle"}}, "thresholds"),
    ({"ingress": {"max_body_bytes": 10}}, "greater than or equal to 1024"),
    ({"models": ["a", "b"], "weights": [1.0]}, "weights \\(1\\) must match models \\(2\\)"),
])
def test_bad_group_values_are_refused(bad, match):
    with pytest.raises(ValidationError, match=match):
        AppArgs.model_validate(bad)
