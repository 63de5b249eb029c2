"""The Serve graph end to end over HTTP: offline equality, bad input, A/B, version roll, chaos.

One dynray app (cluster/serve.yaml, on a free port) is deployed once for the module on the
session's Ray. Two registry versions of a small model make the A/B and roll tests real.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
import torch

from dynray.data import load_dataset
from dynray.bench.load import LoadConfig, run_load_sync
from dynray.models import DynamicNetConfig, build
from dynray.serving.payload import encode_array
from dynray.registry import ModelRegistry
from dynray.routing.features import obs_dim
from dynray.routing.policy import PolicyNet, save_policy
from dynray.store import load_model, save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port

pytestmark = pytest.mark.ray
APP = "dynray"


def _register(reg: ModelRegistry, seed: int, train_images: torch.Tensor) -> str:
    """A small random model with fitted complexity and a rule that stops about half the
    samples at each exit, so all three paths (exit 0, exit 1, cloud) are exercised."""
    torch.manual_seed(seed)
    model = build(DynamicNetConfig(widths=(8, 8, 16), layers=(1, 1, 1), exit_hidden=16)).eval()
    model.complexity.fit(train_images)
    with torch.no_grad():
        outs = model(train_images[:512])
        cx = model.complexity(train_images[:512])
    base = ThresholdRule(thresholds=(0.0, 0.0), complexity_weight=0.1)
    taus = tuple(float(base.score(k, outs[k], cx).median()) for k in range(2))
    rule = ThresholdRule(thresholds=taus, complexity_weight=0.1)
    info = save_model(reg, "srv", model, dataset="mnist-5k", rule=rule, metrics={})
    return info.ref


def _register_stop_policy(reg: ModelRegistry, ref: str) -> None:
    """A router for ``ref`` that is sure every sample should stop at the first exit, so its
    answers are easy to tell from the thresholds' (which send samples to every exit)."""
    info = reg.resolve(ref)
    net = PolicyNet([obs_dim(3), 8, 3])
    with torch.no_grad():
        for lin in net.linears():
            lin.weight.zero_()
            lin.bias.zero_()
        net.linears()[-1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # p(stop) = 0.987
    save_policy(reg, info, net, {"costs": None, "note": "test policy"})


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from actors import serve_apps as D

    home = tmp_path_factory.mktemp("serve-home")
    reg = ModelRegistry(home)
    train = load_dataset("mnist-5k", "train").images
    v1, v2 = _register(reg, 1, train), _register(reg, 2, train)
    _register_stop_policy(reg, v1)
    port = free_port()
    cfg = D.load_config()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    app["args"].update(home=str(home), models=[v1], edge={**app["args"]["edge"], "min_replicas": 2, "max_replicas": 2}, cloud={**app["args"]["cloud"], "min_replicas": 1, "max_replicas": 1})
    for d in app["deployments"]:
        d["user_config"] = {**d["user_config"], "models": [v1], "home": str(home)}
    D.deploy(cfg, timeout_s=180)
    state = {"cfg": cfg, "url": f"http://127.0.0.1:{port}", "home": home, "v1": v1, "v2": v2}
    yield state
    D.shutdown()


def _post(url: str, body, **kw) -> requests.Response:
    return requests.post(f"{url}/v1/predict", json=body, timeout=30, **kw)


def test_http_predictions_equal_the_offline_model(served):
    x = load_dataset("mnist-5k", "test").images[:48]
    sm = load_model(ModelRegistry(served["home"]), served["v1"])
    ref = sm.model.forward_exits(x, sm.rule)
    batch = _post(served["url"], encode_array(x)).json()
    singles = [_post(served["url"], encode_array(x[i : i + 1])).json() for i in range(16)]
    assert batch["model_version"] == served["v1"] and not batch["degraded"]
    assert batch["predictions"] == ref.logits.argmax(1).tolist()
    assert batch["exit"] == ref.exit_index.tolist()
    np.testing.assert_allclose(batch["probabilities"], torch.softmax(ref.logits, 1).numpy(), atol=1e-5)
    assert [s["predictions"][0] for s in singles] == batch["predictions"][:16]
    assert [s["exit"][0] for s in singles] == batch["exit"][:16]
    # the graph really splits the work: early exits on the edge, the rest on the cloud
    tiers = dict(zip(batch["exit"], batch["tier"], strict=True))
    assert tiers.get(0) == "edge" and tiers.get(2) == "cloud", tiers
    assert batch["macs"] == ref.macs.tolist()


def test_each_router_setting_answers(served):
    x = load_dataset("mnist-5k", "test").images[:48]
    body = encode_array(x)
    out = {r: _post(served["url"], {**body, "router": r}) for r in ("thresholds", "ppo", "hybrid")}
    for r, resp in out.items():
        assert resp.status_code == 200, (r, resp.text)
        assert resp.json()["router"] == r and len(resp.json()["predictions"]) == 48
    thr, ppo, hyb = (out[r].json() for r in ("thresholds", "ppo", "hybrid"))
    assert 0 in thr["exit"] and 2 in thr["exit"]  # the thresholds send samples past the edge
    # the registered policy stops everything at exit 0 with p = 0.987: PPO follows it, and so
    # does the hybrid, whose needed confidence is 0.9 + (1 - 0.8) * 0.1 = 0.92
    assert set(ppo["exit"]) == {0} and set(ppo["tier"]) == {"edge"}
    assert hyb["exit"] == ppo["exit"] and hyb["predictions"] == ppo["predictions"]
    models = requests.get(f"{served['url']}/v1/models", timeout=10).json()
    assert models["ppo_routers"][served["v1"]] == "srv-router:v1" and models["router"] == "thresholds"
    bad = _post(served["url"], {**body, "router": "sgd"})
    assert bad.status_code == 422 and "unknown router" in bad.json()["error"]


BAD = [
    ("wrong shape", lambda: json.dumps({"inputs": [[0.0] * 10]}), "application/json", 422),
    ("wrong dtype", lambda: json.dumps({"array_b64": "AAAA", "dtype": "int64", "shape": [1, 1, 28, 28]}), "application/json", 422),
    ("nan", lambda: json.dumps(encode_array(torch.full((1, 1, 28, 28), float("nan")))), "application/json", 422),
    ("inf", lambda: json.dumps(encode_array(torch.full((1, 1, 28, 28), float("inf")))), "application/json", 422),
    ("too many items", lambda: json.dumps(encode_array(torch.zeros(257, 1, 28, 28), dtype="uint8")), "application/json", 413),
    ("not json", lambda: "{not json", "application/json", 400),
    ("wrong content type", lambda: json.dumps({"inputs": []}), "text/plain", 415),
    ("too large", lambda: "x" * (8 * 1024 * 1024 + 10), "application/json", 413),
    ("unknown version", lambda: json.dumps({**encode_array(torch.zeros(1, 1, 28, 28)), "model_version": "nope:v9"}), "application/json", 422),
]


@pytest.mark.parametrize("name,body,ctype,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_4xx_and_the_replica_keeps_serving(served, name, body, ctype, status):
    r = requests.post(f"{served['url']}/v1/predict", data=body(), headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    ok = _post(served["url"], encode_array(torch.zeros(1, 1, 28, 28)))
    assert ok.status_code == 200


def test_health_models_and_openapi(served):
    h = requests.get(f"{served['url']}/v1/health", timeout=10).json()
    assert h["ready"] and h["tiers"]["edge"]["replicas"] == 2 and h["tiers"]["cloud"]["replicas"] == 1
    m = requests.get(f"{served['url']}/v1/models", timeout=10).json()
    assert m["versions"] == [served["v1"]]
    spec = requests.get(f"{served['url']}/openapi.json", timeout=10).json()
    assert "/v1/predict" in spec["paths"] and "requestBody" in spec["paths"]["/v1/predict"]["post"]


def _load_in_background(url: str, n: int, concurrency: int, x: torch.Tensor):
    out = {}
    cfg = LoadConfig(url=f"{url}/v1/predict", requests=n, concurrency=concurrency, timeout_s=15)
    t = threading.Thread(target=lambda: out.setdefault("res", run_load_sync(cfg, lambda i: encode_array(x[i % len(x)][None]))))
    t.start()
    return t, out


def test_zero_downtime_roll_then_ab_split(served):
    from actors import serve_apps as D

    x = load_dataset("mnist-5k", "test").images[:64]
    t, out = _load_in_background(served["url"], 400, 4, x)
    time.sleep(0.5)
    cfg = D.roll(served["cfg"], APP, [served["v2"]])
    t.join(timeout=120)
    res = out["res"]
    assert res.errors == 0, res.status_counts()
    versions = [r.body["model_version"] for r in res.records]
    assert versions[-1] == served["v2"] and served["v1"] in versions  # the roll happened during the run
    # A/B: 30% to v1, 70% to v2 (devices host both)
    cfg = D.roll(cfg, APP, [served["v2"], served["v1"]], [0.7, 0.3])
    served["cfg"] = cfg
    res = run_load_sync(LoadConfig(url=f"{served['url']}/v1/predict", requests=400, concurrency=8), lambda i: encode_array(x[i % 64][None]))
    share_v1 = sum(r.body["model_version"] == served["v1"] for r in res.records) / 400
    # binomial sd at n=400, p=0.3 is 2.3 pt; +-8 pt is > 3 sd
    assert abs(share_v1 - 0.3) < 0.08, share_v1
    counts = requests.get(f"{served['url']}/v1/models", timeout=10).json()["requests"]
    assert counts[served["v1"]] > 0 and counts[served["v2"]] > 0


def _replicas(deployment: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")]


def test_chaos_kill_edge_then_cloud_every_request_answered(served):
    import ray

    from actors import serve_apps as D

    x = load_dataset("mnist-5k", "test").images[:64]
    t, out = _load_in_background(served["url"], 600, 8, x)
    time.sleep(1.0)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(_replicas("Edge")[0], namespace="serve"), no_restart=True)
    time.sleep(1.5)
    ray.kill(ray.get_actor(_replicas("Cloud")[0], namespace="serve"), no_restart=True)
    t.join(timeout=180)
    res = out["res"]
    assert len(res.records) == 600 and res.errors == 0, res.status_counts()
    # recovery: both tiers back at full strength within 30 s of the first kill
    while time.monotonic() - killed_at < 30:
        s = D.app_status(APP)
        if s["deployments"]["Edge"]["replicas"].get("RUNNING") == 2 and s["deployments"]["Cloud"]["replicas"].get("RUNNING") == 1:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"replicas not back within 30 s: {D.app_status(APP)}")
    after = _post(served["url"], encode_array(x[:8])).json()
    assert not after["degraded"]


def _edge_stats() -> dict[str, dict]:
    from ray import serve

    edge = serve.get_deployment_handle("Edge", APP)
    for _ in range(10):  # calls sent together spread over the replicas (the router balances them)
        out = {s["replica"]: s for s in (r.result(timeout_s=30) for r in [edge.stats.remote() for _ in range(16)])}
        if len(out) == 2:
            return out
    raise AssertionError(f"stats reached only {sorted(out)}")


def test_batches_fill_under_concurrency(served):
    """Concurrent single-image requests share device forwards (ingress coalescing + @serve.batch)."""
    x = load_dataset("mnist-5k", "test").images[:64]
    before = _edge_stats()
    res = run_load_sync(LoadConfig(url=f"{served['url']}/v1/predict", requests=300, concurrency=16), lambda i: encode_array(x[i % 64][None]))
    assert res.errors == 0
    after = _edge_stats()
    zero = {"forwards": 0, "samples": 0}
    forwards = sum(s["forwards"] - before.get(r, zero)["forwards"] for r, s in after.items())
    samples = sum(s["samples"] - before.get(r, zero)["samples"] for r, s in after.items())
    assert samples >= 50 and forwards > 0, (before, after)  # the latency policy sends part of the load straight to the cloud
    assert samples / forwards > 1.5, (samples, forwards)  # one image per request, yet forwards are shared
    assert max(s["max_samples"] for s in after.values()) >= 4, after
