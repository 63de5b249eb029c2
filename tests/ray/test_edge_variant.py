"""The edge tier runs an int8 variant while the cloud runs the full model: the answers agree."""

from __future__ import annotations

import pytest
import requests
import torch

from dynray.compress.quant import quantize_int8
from dynray.errors import ServingError
from dynray.pipeline import drift_reference
from dynray.registry import ModelRegistry
from dynray.serving.payload import encode_array
from dynray.serving.scheduling import EDGE_PROFILE
from dynray.store import load_model, save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def variant_home(tmp_path_factory, trained_net, mnist5k):
    """The session's trained net as the served version, its int8 child, and a pruned-shape impostor."""
    home = tmp_path_factory.mktemp("variant-home")
    reg = ModelRegistry(home)
    rule = ThresholdRule(thresholds=(0.95, 0.95))
    ref = save_model(reg, "full", trained_net, dataset="mnist-5k", rule=rule, metrics={},
                     extra={"drift_reference": drift_reference(trained_net, rule, mnist5k["val"]).to_dict()}).ref
    q = quantize_int8(trained_net, mnist5k["train"].images[:256])
    int8 = save_model(reg, "full-int8", q, dataset="mnist-5k", rule=rule, metrics={}, parent=ref).ref
    stranger = save_model(reg, "other", trained_net, dataset="mnist-5k", rule=rule, metrics={}).ref  # not a child of `full`
    return home, ref, int8, stranger


def test_edge_runs_the_int8_variant_the_cloud_the_full_model_and_answers_agree(ray_session, variant_home, mnist5k):
    from ray import serve

    from actors import serve_apps as D

    home, ref, int8, _ = variant_home
    port = free_port()
    cfg = D.load_config()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    # generous deadlines: under a loaded CI machine a slow cloud call must not turn into a degraded (edge-only) answer
    failover = {**app["args"]["failover"], "edge_timeout_ms": 20000, "cloud_timeout_ms": 20000, "deadline_ms": 60000}
    app["args"].update(home=str(home), models=[ref], auth={"enabled": False}, simulate=False, drift={"enabled": False}, failover=failover,
                       edge={**app["args"]["edge"], "min_replicas": 1, "max_replicas": 1, "variants": {ref: int8}},
                       cloud={**app["args"]["cloud"], "min_replicas": 1, "max_replicas": 1}, ingress={**app["args"]["ingress"], "replicas": 1})
    args = D.AppArgs.model_validate(app["args"])
    cfg["applications"][0] = D.app_config(args, name=app["name"], route_prefix=app["route_prefix"])
    D.deploy(cfg, timeout_s=180)
    try:
        edge = serve.get_deployment_handle(D.EDGE, app_name=app["name"])
        cloud = serve.get_deployment_handle(D.CLOUD, app_name=app["name"])
        assert edge.hosting.remote().result(timeout_s=30) == {ref: int8}
        assert cloud.hosting.remote().result(timeout_s=30) == {ref: ref}
        test = mnist5k["test"]
        preds, exits, tiers = [], [], []
        for i in range(0, len(test), 100):
            body = requests.post(f"http://127.0.0.1:{port}/v1/predict", json=encode_array(test.images[i : i + 100]), timeout=120).json()
            assert body["model_version"] == ref and not body["degraded"]
            preds += body["predictions"]
            exits += body["exit"]
            tiers += body["tier"]
        full = load_model(ModelRegistry(home), ref)
        want = full.model.forward_exits(test.images, full.rule).logits.argmax(1)
        agree = float((torch.tensor(preds) == want).float().mean())
        print(f"int8 edge + full cloud vs the full model offline: {agree:.4f} of {len(test)} test answers agree")
        assert agree >= 0.99, agree
        assert "edge" in tiers and "cloud" in tiers  # both tiers answered: the cloud continued from int8 features
    finally:
        D.delete_apps([app["name"]])
        D.shutdown()


def test_a_variant_that_is_no_child_of_the_served_version_is_refused(ray_session, variant_home):
    from actors.device import Device

    home, ref, _, stranger = variant_home
    with pytest.raises(ServingError, match="compressed child"):
        Device(profile=EDGE_PROFILE.to_dict(), last_stage=2, simulate=False, user_config={"models": [ref], "home": str(home), "variants": {ref: stranger}})
