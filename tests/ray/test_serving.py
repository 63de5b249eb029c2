"""The Serve graph end to end over HTTP: offline equality, bad input, A/B, version roll, chaos.

One dynray app (cluster/serve.yaml, on a free port, 2 ingress replicas) is deployed once for
the module on the session's Ray. Two registry versions of a small model make the A/B, roll
and not-hosted tests real. The chaos tests (replicas killed) run last.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from dynray.data import load_dataset
from dynray.bench.fuzz import fuzz_ingress
from dynray.bench.load import LoadConfig, run_load_sync
from dynray.serving import metrics as M
from dynray.serving.failover import ErrorKind, classify_error
from dynray.serving.partition import DeviceRequest, StageInput
from dynray.serving.payload import encode_array
from dynray.serving.prometheus import dashboard_series, dynray_series, nonzero, parse, required_missing, scrape
from dynray.serving.routing_state import Observation, SharedFailure, TierObservation
from dynray.registry import ModelRegistry
from dynray.store import load_model
from actors.registry import find_registry
from serving_helpers import chunked_post_until_answered, scrape_until, the_alarm_submitted_a_recalibration_job_that_registered_a_calibrated_child  # tests/ray is on sys.path
from jobs.serve_chaos import ChaosConfig, kill_devices_under_load, kill_ingress_under_load

pytestmark = pytest.mark.ray
APP = "dynray"
DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana-dashboard.json"


def _post(served: dict, body, **kw) -> requests.Response:
    return served["http"].post(f"{served['url']}/v1/predict", json=body, timeout=30, **kw)


def test_http_predictions_equal_the_offline_model(served):
    x = load_dataset("mnist-5k", "test").images[:48]
    sm = load_model(ModelRegistry(served["home"]), served["v1"])
    ref = sm.model.forward_exits(x, sm.rule)
    batch = _post(served, encode_array(x)).json()
    singles = [_post(served, encode_array(x[i : i + 1])).json() for i in range(16)]
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


def test_replicas_read_models_through_the_registry_actor_not_their_own_disk(served, ray_session):
    """Every prediction test in this module runs on replicas whose DYNRAY_HOME is empty: the
    registry actor (on this node) sent them the weights, and they checked the sha256."""
    handle = find_registry()
    assert handle is not None and ray_session.get(handle.home.remote()) == str(served["home"])
    assert list(served["empty"].iterdir()) == []  # nothing was read from, or written to, the replicas' home
    health = served["http"].get(f"{served['url']}/v1/health", timeout=10).json()
    assert health["status"] == "ok", health


def test_each_router_setting_answers(served):
    x = load_dataset("mnist-5k", "test").images[:48]
    body = encode_array(x)
    out = {r: _post(served, {**body, "router": r}) for r in ("thresholds", "ppo", "hybrid")}
    for r, resp in out.items():
        assert resp.status_code == 200, (r, resp.text)
        assert resp.json()["router"] == r and len(resp.json()["predictions"]) == 48
    thr, ppo, hyb = (out[r].json() for r in ("thresholds", "ppo", "hybrid"))
    assert 0 in thr["exit"] and 2 in thr["exit"]  # the thresholds send samples past the edge
    # the registered policy stops everything at exit 0 with p = 0.987: PPO follows it, and so
    # does the hybrid, whose needed confidence is 0.9 + (1 - 0.8) * 0.1 = 0.92
    assert set(ppo["exit"]) == {0} and set(ppo["tier"]) == {"edge"}
    assert hyb["exit"] == ppo["exit"] and hyb["predictions"] == ppo["predictions"]
    models = served["http"].get(f"{served['url']}/v1/models", timeout=10).json()
    assert models["ppo_routers"][served["v1"]] == "srv-router:v1" and models["router"] == "thresholds"
    bad = _post(served, {**body, "router": "sgd"})
    assert bad.status_code == 422 and "unknown router" in bad.json()["error"]


def test_labels_over_http_reach_the_shared_book_and_move_the_hybrids_trust(served):
    """POST /v1/feedback on an app with 2 ingress replicas: every label goes to the book in
    RoutingState, whichever replica answered. The truth here is the thresholds' answer; the
    registered policy stops everything at exit 0, so it is wrong wherever exit 0 disagrees:
    rl_weight falls, and then the hybrid answers as the thresholds do. Bad labels get 4xx."""
    h, url = served["http"], served["url"]
    x = load_dataset("mnist-5k", "test").images[:8]
    body = encode_array(x)
    truth = _post(served, {**body, "router": "thresholds"}).json()["predictions"]
    weights = []
    for i in range(60):
        rid = f"fb-{i}"
        r = _post(served, {**body, "router": "hybrid"}, headers={"X-Request-Id": rid})
        assert r.status_code == 200 and r.headers["X-Request-Id"] == rid, r.text
        f = h.post(f"{url}/v1/feedback", json={"request_id": rid, "labels": truth}, timeout=30)
        assert f.status_code == 200, f.text
        weights.append(f.json()["rl_weight"])
    assert weights[0] < 0.8 and weights[-1] < 0.15, weights
    time.sleep(1.5)  # both ingress replicas take the weight at their next sync (every 0.5 s)
    for _ in range(4):
        assert _post(served, {**body, "router": "hybrid"}).json()["predictions"] == truth
    assert f.json()["live_accuracy"]
    # bad labels: unknown id, repeated, out of range, wrong count
    assert h.post(f"{url}/v1/feedback", json={"request_id": "never-answered", "label": 1}, timeout=30).status_code == 404
    assert h.post(f"{url}/v1/feedback", json={"request_id": "fb-0", "labels": truth}, timeout=30).status_code == 409
    rid = "fb-bad"
    assert _post(served, body, headers={"X-Request-Id": rid}).status_code == 200
    for bad in ({"labels": [10] * 8}, {"labels": truth[:3]}, {"label": 1}):
        resp = h.post(f"{url}/v1/feedback", json={"request_id": rid, **bad}, timeout=30)
        assert resp.status_code == 422 and resp.json()["error"], resp.text
    assert requests.post(f"{url}/v1/feedback", json={"request_id": rid, "labels": truth}, timeout=30).status_code == 401  # scope predict: a key


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
    r = served["http"].post(f"{served['url']}/v1/predict", data=body(), headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"] and r.json()["request_id"] == r.headers["X-Request-Id"]
    ok = _post(served, encode_array(torch.zeros(1, 1, 28, 28)))
    assert ok.status_code == 200


def test_health_models_and_openapi(served):
    r = served["http"].get(f"{served['url']}/v1/health", timeout=10, headers={"X-Request-Id": "probe-1"})
    h = r.json()
    assert h["ready"] and h["tiers"]["edge"]["replicas"] == 2 and h["tiers"]["cloud"]["replicas"] == 1
    assert r.headers["X-Request-Id"] == "probe-1"
    assert h["deployments"]["Ingress"]["replicas"]["RUNNING"] == 2 and h["deployments"]["RoutingState"]["replicas"]["RUNNING"] == 1
    m = served["http"].get(f"{served['url']}/v1/models", timeout=10).json()
    assert m["versions"] == [served["v1"]]
    spec = served["http"].get(f"{served['url']}/openapi.json", timeout=10).json()
    assert "/v1/predict" in spec["paths"] and "requestBody" in spec["paths"]["/v1/predict"]["post"]


def test_http_auth_401_403_429_and_health_needs_no_key(served):
    url, body = served["url"], encode_array(torch.zeros(1, 1, 28, 28))
    for path, method in (("/v1/predict", "post"), ("/v1/models", "get"), ("/v1/admin/security", "get")):
        r = getattr(requests, method)(f"{url}{path}", json=body if method == "post" else None, timeout=10)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer") and "API key" in r.json()["error"], (path, r.text)
    bad = requests.post(f"{url}/v1/predict", json=body, headers={"Authorization": f"Bearer {served['key'][:-4]}AAAA"}, timeout=10)
    assert bad.status_code == 401 and "not valid" in bad.json()["error"]
    assert requests.get(f"{url}/v1/health", timeout=10).status_code == 200  # no key asked
    forbidden = served["http"].get(f"{url}/v1/admin/security", timeout=10)
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["error"]
    admin, _ = served["store"].create("test-admin", scopes=["admin"])
    sec = requests.get(f"{url}/v1/admin/security", headers={"X-API-Key": admin}, timeout=10)
    assert sec.status_code == 200 and sec.json()["auth"]["enabled"] is True
    slow, _ = served["store"].create("test-slow", rate_per_s=0.5, burst=2)
    got = [requests.post(f"{url}/v1/predict", json=body, headers={"X-API-Key": slow}, timeout=10) for _ in range(3)]
    assert [g.status_code for g in got] == [200, 200, 429], [g.text for g in got]
    assert int(got[2].headers["Retry-After"]) >= 1 and got[2].json()["retry_after_s"] > 0
    assert _post(served, body).status_code == 200  # the other key is not limited by it


def test_a_revoked_key_is_refused_by_every_ingress_replica_within_a_second(served):
    key, rec = served["store"].create("test-revoke", rate_per_s=10_000)
    h, body = {"Authorization": f"Bearer {key}"}, encode_array(torch.zeros(1, 1, 28, 28))
    for _ in range(10):  # both replicas have the key's verdict cached
        assert requests.post(f"{served['url']}/v1/predict", json=body, headers=h, timeout=10).status_code == 200
    served["store"].revoke(rec.id)
    t0, seen = time.monotonic(), []
    while time.monotonic() - t0 < 2.0:
        r = requests.post(f"{served['url']}/v1/predict", json=body, headers=h, timeout=10)
        seen.append((time.monotonic() - t0, r.status_code))
    last_ok = max((t for t, s in seen if s == 200), default=0.0)
    after = [s for t, s in seen if t > 1.0]
    assert last_ok < 1.0 and after and set(after) == {401}, seen


def test_a_keys_rate_holds_across_both_ingress_replicas_over_http(served):
    """25/s with a burst of 10, hammered at concurrency 8 for 4 s through Serve's proxy, which
    spreads the requests over the two ingress replicas: 10 + 25 x 4 = 110 may pass, within 10%."""
    key, _ = served["store"].create("test-rate", rate_per_s=25, burst=10)
    x = load_dataset("mnist-5k", "test").images[:8]
    res = run_load_sync(LoadConfig(url=f"{served['url']}/v1/predict", requests=100_000, concurrency=8, max_duration_s=4.0, api_key=key), lambda i: encode_array(x[i % 8][None]))
    counts = res.status_counts()
    assert set(counts) <= {200, 429, -1}, counts
    assert abs(counts.get(200, 0) - 110) <= 11, counts
    assert all(r.retry_after for r in res.records if r.status == 429)


def test_fuzzing_the_ingress_from_its_openapi_schema_gets_no_5xx_and_it_keeps_serving(served):
    res = fuzz_ingress(served["url"], key=served["key"], cases=300, seed=0)
    assert res.cases == 300 and res.n_5xx == 0, res.five_xx[:5]
    # the draws reached every layer: refused keys, refused bodies, and real answers
    assert res.healthy_after and {200, 401}.issubset(res.status) and res.status.keys() & {400, 415, 422}, res.status
    assert _post(served, encode_array(torch.zeros(1, 1, 28, 28))).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(served):
    """A 100 MB chunked upload (no Content-Length, 10 MB/s) is answered 413 soon after ~8 MB (the
    limit) have arrived, while the client is still sending: the ingress stops reading at the
    limit (reading the whole body first, the answer would come after all 100 MB, at 10 s)."""
    t0 = time.monotonic()
    sent, raw, total = chunked_post_until_answered(served["port"], served["key"], 100 * 1024 * 1024, rate=10e6)
    print(f"chunked 413 after {sent / 1e6:.1f} MB sent, {time.monotonic() - t0:.1f} s")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert "over 8388608 bytes" in json.loads(body)["error"] and b"x-request-id" in head.lower()
    assert sent < total // 2, f"the answer came only after {sent} of {total} bytes were sent"
    ok = _post(served, encode_array(torch.zeros(1, 1, 28, 28)))
    assert ok.status_code == 200


def test_device_errors_through_ray_are_classified(served, ray_session):
    """The real exceptions: a device refusing a version (through a Serve handle) is no tier
    failure; a call to a dead actor is one."""
    import ray
    from ray import serve

    edge = serve.get_deployment_handle("Edge", APP)
    with pytest.raises(Exception) as err:
        edge.run.remote(DeviceRequest("nope:v9", 0, StageInput(h=torch.zeros(1, 1, 28, 28)))).result(timeout_s=30)
    assert classify_error(err.value) is ErrorKind.REFUSED and "does not host" in str(err.value)

    @ray.remote(num_cpus=0)
    class Doomed:
        def ping(self) -> int:
            return 1

    a = Doomed.remote()
    ray.get(a.ping.remote(), timeout=30)
    ray.kill(a)  # asynchronous: a call made at once may still reach the actor before it dies
    died: Exception | None = None
    until = time.monotonic() + 30
    while died is None and time.monotonic() < until:
        try:
            ray.get(a.ping.remote(), timeout=30)
            time.sleep(0.1)
        except Exception as e:  # noqa: BLE001 - the exception under test
            died = e
    assert died is not None, "the killed actor kept answering for 30 s"
    assert classify_error(died) is ErrorKind.TIER, type(died)


def test_a_version_the_devices_do_not_host_is_503_and_trips_no_breaker(served):
    """The ingress serves v2 (weight 0) that no device hosts: asking for it is a 503 naming the
    cause, again and again, and v1 traffic is not affected (no tier is marked down)."""
    import copy

    from actors import serve_apps as D

    cfg = copy.deepcopy(served["cfg"])
    ingress = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Ingress")
    ingress["user_config"] = {**ingress["user_config"], "models": [served["v1"], served["v2"]], "weights": [1.0, 0.0]}
    D.deploy(cfg, timeout_s=120, check=False)
    try:
        x = load_dataset("mnist-5k", "test").images[:48]
        for _ in range(6):
            r = _post(served, {**encode_array(x[:4]), "model_version": served["v2"]})
            assert r.status_code == 503 and "does not host the requested version" in r.json()["error"], r.text
        v1 = _post(served, encode_array(x)).json()
        assert v1["model_version"] == served["v1"] and not v1["degraded"] and "cloud" in v1["tier"] and v1["path"] == "edge_first"
        h = served["http"].get(f"{served['url']}/v1/health", timeout=10).json()
        assert h["tiers"]["edge"]["up"] and h["tiers"]["cloud"]["up"], h["tiers"]
    finally:
        D.deploy(served["cfg"], timeout_s=120, check=False)


def test_a_tier_marked_down_by_one_ingress_replica_is_down_for_all(served):
    """Another ingress replica ("injector") keeps reporting cloud failures to the shared
    RoutingState: every ingress replica stops calling the cloud (escalations answered
    degraded), and once the reports stop the cloud is used again. (The module's 3 s breaker
    cooldown outlasts any lag of the injector thread: were a replica's cooldown to run out
    between two syncs, its trial call would succeed and rightly close the breaker.)"""
    from ray import serve

    state = serve.get_deployment_handle("RoutingState", APP)
    stop = threading.Event()

    def inject() -> None:
        seq = 0
        while not stop.is_set():
            seq += 2  # two failures, the second sent after the first was seen: a trip
            fails = (SharedFailure("injector", seq - 1, 0.3, 0.2), SharedFailure("injector", seq, 0.1, 0.0))
            state.sync.remote(Observation(replica="injector", tiers={"cloud": TierObservation(failures=fails)})).result(timeout_s=10)
            stop.wait(0.1)

    t = threading.Thread(target=inject, daemon=True)
    t.start()
    try:
        time.sleep(1.5)  # > 2 sync periods: every replica has pulled the merged view
        x = load_dataset("mnist-5k", "test").images[:48]
        answers = [_post(served, encode_array(x)).json() for _ in range(12)]
        h = served["http"].get(f"{served['url']}/v1/health", timeout=10).json()
        known = state.replicas.remote().result(timeout_s=10)
    finally:
        stop.set()
        t.join(timeout=10)
    assert len(known) == 3 and "injector" in known, known  # both ingress replicas push their view
    # no cloud call was made: none answered and none failed (an edge call slower than its
    # timeout on a loaded 2-core CI machine is retried and shows in failed_calls["edge"])
    assert all("cloud" not in a["tier"] and a["degraded"] and "cloud" not in a["failed_calls"] for a in answers), \
        [(sorted(set(a["tier"])), a["degraded"], a["failed_calls"], a["path"]) for a in answers]
    assert not h["tiers"]["cloud"]["up"] and h["tiers"]["edge"]["up"]
    for _ in range(40):  # the cooldown + a sync period, then the first call closes the breaker
        a = _post(served, encode_array(x)).json()
        if "cloud" in a["tier"] and not a["degraded"]:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the cloud was not used again after the failure reports stopped")


def _load_in_background(served: dict, n: int, concurrency: int, x: torch.Tensor):
    out = {}
    cfg = LoadConfig(url=f"{served['url']}/v1/predict", requests=n, concurrency=concurrency, timeout_s=15, api_key=served["key"])
    t = threading.Thread(target=lambda: out.setdefault("res", run_load_sync(cfg, lambda i: encode_array(x[i % len(x)][None]))))
    t.start()
    return t, out


def test_zero_downtime_roll_then_ab_split(served):
    from actors import serve_apps as D

    x = load_dataset("mnist-5k", "test").images[:64]
    t, out = _load_in_background(served, 400, 4, x)
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
    res = run_load_sync(LoadConfig(url=f"{served['url']}/v1/predict", requests=400, concurrency=8, api_key=served["key"]), lambda i: encode_array(x[i % 64][None]))
    share_v1 = sum(r.body["model_version"] == served["v1"] for r in res.records) / 400
    # binomial sd at n=400, p=0.3 is 2.3 pt; +-8 pt is > 3 sd
    assert abs(share_v1 - 0.3) < 0.08, share_v1
    counts = served["http"].get(f"{served['url']}/v1/models", timeout=10).json()["requests"]
    assert counts[served["v1"]] > 0 and counts[served["v2"]] > 0


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
    # 32 in flight: each of the two ingress replicas coalesces about half of them
    res = run_load_sync(LoadConfig(url=f"{served['url']}/v1/predict", requests=400, concurrency=32, api_key=served["key"]), lambda i: encode_array(x[i % 64][None]))
    assert res.errors == 0, [(r.status, r.body) for r in res.records if r.status != 200][:3]
    after = _edge_stats()
    zero = {"forwards": 0, "samples": 0}
    forwards = sum(s["forwards"] - before.get(r, zero)["forwards"] for r, s in after.items())
    samples = sum(s["samples"] - before.get(r, zero)["samples"] for r, s in after.items())
    assert samples >= 50 and forwards > 0, (before, after)  # the latency policy sends part of the load straight to the cloud
    assert samples / forwards > 1.5, (samples, forwards)  # one image per request, yet forwards are shared
    assert max(s["max_samples"] for s in after.values()) >= 4, after


def test_chaos_kill_edge_then_cloud_every_request_answered(served):
    """One edge replica, then the cloud replica, killed under load (jobs.serve_chaos): every
    request is answered, and the answers show the failover happened (retried device calls,
    degraded answers while the cloud was away)."""
    from actors import serve_apps as D

    images = load_dataset("mnist-5k", "test").images[:64].numpy()
    res = kill_devices_under_load(ChaosConfig(url=f"{served['url']}/v1/predict", app=APP, requests=700, concurrency=8, kill_after_s=1.0, recovery_timeout_s=30, api_key=served["key"]), images)
    print("device chaos:", res.to_dict())
    assert res.kills_during_load, res.to_dict()
    assert res.answered_no_retry == res.requests == 700 and res.errors == 0, res.status
    assert res.device_failures > 0, res.to_dict()  # the ingress saw the kills and retried or failed over
    assert res.recovery_s < 30  # both tiers back at full strength
    s = D.app_status(APP)["deployments"]
    assert s["Edge"]["replicas"].get("RUNNING") == 2 and s["Cloud"]["replicas"].get("RUNNING") == 1
    for _ in range(40):  # the breaker closes at the first call after its cooldown
        if not _post(served, encode_array(torch.from_numpy(images[:48]))).json()["degraded"]:
            break
        time.sleep(0.25)
    else:
        pytest.fail("answers still degraded 10 s after both tiers were back")


def test_prometheus_serves_every_dynray_series_drift_alarms_on_a_shift_and_the_dashboard_matches(served, ray_session):
    """After the traffic above (4xx and 429 answers, the chaos run's degraded answers and
    retries), in-distribution traffic for v1's drift watch, a client that sends small
    perturbations of its own queries (how Jacobian-based extraction queries), and a stream of
    inverted digits: every series of dynray/serving/metrics.py but the expert one (this app
    has no remote experts) is on the node's metrics endpoint with a non-zero count and its
    tags, read with prometheus_client's parser; the in-distribution traffic raised no drift
    alarm and the inverted digits did; every dashboard query names a series that exists."""
    port = ray_session.nodes()[0]["MetricsExportPort"]
    x = load_dataset("mnist-5k", "test").images[:256]
    v1 = served["v1"]
    url = f"{served['url']}/v1/predict"

    def alarms() -> float:  # once the replicas' last reports are in (every second here)
        time.sleep(3.0)
        return nonzero(parse(scrape(port))).get(M.DRIFT_ALARMS, 0.0)

    # the tests above sent blank images and fuzz junk: real drift, which may have raised alarms already
    before = alarms()
    res = run_load_sync(LoadConfig(url=url, requests=300, concurrency=4, api_key=served["key"]), lambda i: {**encode_array(x[i % len(x)][None]), "model_version": v1})
    assert res.errors == 0, res.status_counts()
    calm = scrape_until(port, [M.DRIFT_SCORE])
    assert M.DRIFT_SCORE in nonzero(calm) and alarms() == before, (before, nonzero(calm))
    key, _ = served["store"].create("test-extraction", rate_per_s=100_000)
    g = torch.Generator().manual_seed(0)
    bodies = [encode_array((b + 0.1 * torch.sign(torch.randn(b.shape, generator=g)) * (j > 0)).clamp(0, 1)[None]) for b in x[:60] for j in range(4)]
    res = run_load_sync(LoadConfig(url=url, requests=len(bodies), concurrency=4, api_key=key), lambda i: bodies[i])
    assert res.errors == 0, res.status_counts()
    inverted = 1.0 - x
    res = run_load_sync(LoadConfig(url=url, requests=256, concurrency=4, api_key=served["key"]), lambda i: {**encode_array(inverted[i][None]), "model_version": v1})
    assert res.errors == 0, res.status_counts()
    required = [n for n in M.SPECS if n != M.EXPERT_TOKENS]
    fams = scrape_until(port, required)
    assert nonzero(fams).get(M.DRIFT_ALARMS, 0.0) > before, (before, nonzero(fams))  # the inverted digits raised an alarm
    assert required_missing(fams, required) == [], (required_missing(fams, required), nonzero(fams))
    series = dynray_series(fams)
    for name in required:
        labels = series[name].labels()
        assert {M.TAG_NODE, *M.SPECS[name].tags} <= labels, (name, labels)
    drift = served["http"].get(f"{served['url']}/v1/models", timeout=10).json()["drift"]
    assert drift["versions"][v1]["score"] is not None and drift["versions"][v1]["alarms"] >= 1, drift
    the_alarm_submitted_a_recalibration_job_that_registered_a_calibrated_child(served, ray_session)
    for q in dashboard_series(DASHBOARD):
        for fam in q.families() - {M.exported_name(M.EXPERT_TOKENS)}:
            assert fam in fams, (q.panel, fam)
            assert set(q.labels) - {"le"} <= fams[fam].labels(), (q.panel, q.labels, fams[fam].labels())


def test_kill_one_ingress_replica_under_load(served):
    """One of the 2 ingress replicas killed under load: with one client retry every request is
    answered (the proxy cannot retry those the dying replica had accepted)."""
    from actors import serve_apps as D

    images = load_dataset("mnist-5k", "test").images[:64].numpy()
    res = kill_ingress_under_load(ChaosConfig(url=f"{served['url']}/v1/predict", app=APP, requests=400, concurrency=8, kill_after_s=1.0, retries=1, recovery_timeout_s=30, api_key=served["key"]), images)
    print("ingress chaos:", res.to_dict())
    assert res.kills_during_load, res.to_dict()
    assert res.answered == res.requests == 400, res.to_dict()
    assert res.answered_no_retry >= 0.9 * res.requests, res.to_dict()
    assert D.app_status(APP)["deployments"]["Ingress"]["replicas"].get("RUNNING") == 2
