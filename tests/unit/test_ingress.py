"""IngressCore: what /v1/predict, /v1/health and /v1/models answer, without Serve or FastAPI.

Before the first reconfigure (no plan) every endpoint answers 503 JSON; a bug anywhere on
the answer path is a JSON 500 with a request id that is logged and counted; client errors
stay 4xx; a body over the limit is refused while it is being read.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from dynray.models import StopAtExit
from dynray.serving import metrics as M
from dynray.serving.config import AppArgs
from dynray.serving.failover import FailoverConfig, Orchestrator
from dynray.serving.ingress import REQUEST_ID_HEADER, IngressCore, ServedPlan, request_id
from dynray.serving.partition import DeviceReply, StageRange, range_macs, run_stages
from dynray.serving.payload import PayloadLimits, encode_array
from dynray.serving.scheduling import CLOUD_PROFILE, EDGE_PROFILE, LatencyPolicy, LoadTracker
from dynray.serving.split import TrafficSplit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VERSION = "tiny:v1"
LIMIT = 64 * 1024
RUNNING = {"Edge": {"status": "HEALTHY", "replicas": {"RUNNING": 2}}, "Cloud": {"status": "HEALTHY", "replicas": {"RUNNING": 1}}}


def _device(model, tier: str, stop: int):
    async def call(req) -> DeviceReply:
        res = run_stages(model, StageRange(start=req.start, stop=stop), req.inp, StopAtExit(exit=0))
        profile = EDGE_PROFILE if tier == "edge" else CLOUD_PROFILE
        return DeviceReply(result=res, tier=tier, replica=f"{tier}-0", load=LoadTracker().report(f"{tier}-0", profile).to_dict(), ms_per_mmac=1.0)

    return call


def _plan(model) -> ServedPlan:
    profiles = {"edge": EDGE_PROFILE, "cloud": CLOUD_PROFILE}
    orch = Orchestrator(FailoverConfig(), LatencyPolicy(), edge=_device(model, "edge", 2), cloud=_device(model, "cloud", model.num_exits), edge_stages=2,
                        edge_macs=range_macs(model, StageRange(start=0, stop=2)), cloud_rest_macs=range_macs(model, StageRange(start=2, stop=model.num_exits)),
                        full_macs=model.mac_profile.full, profiles=profiles)
    return ServedPlan(split=TrafficSplit.of([VERSION], None), limits=PayloadLimits(input_shape=tuple(model.cfg.input_shape), max_body_bytes=LIMIT),
                      orch=orch, profiles=profiles, routers={VERSION: None})


@pytest.fixture
def core() -> IngressCore:
    return IngressCore(AppArgs(), M.MemoryMetrics(), tiers=("edge", "cloud"))


async def _chunks(data: bytes, size: int = 4096, read: list | None = None):
    for i in range(0, len(data), size):
        if read is not None:
            read.append(size)
        yield data[i : i + size]


def _predict(core: IngressCore, body: bytes, **headers: str):
    hdrs = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return asyncio.run(core.predict(_chunks(body), hdrs))


def _good_body() -> bytes:
    return json.dumps(encode_array(torch.rand(3, 1, 28, 28))).encode()


def test_before_the_first_reconfigure_every_endpoint_answers_503_json(core):
    h = core.health(RUNNING)
    assert h.status == 503 and h.body["ready"] is False and "not ready" in h.body["error"] and h.body["tiers"]["edge"]["up"] is False
    m = asyncio.run(core.models())
    assert m.status == 503 and "not ready" in m.body["error"] and m.headers["Retry-After"] == "1"
    p = _predict(core, _good_body())
    assert p.status == 503 and "not ready" in p.body["error"] and p.headers["Retry-After"] == "1"
    for r in (h, m, p):
        assert r.headers[REQUEST_ID_HEADER] and json.dumps(r.body)  # JSON with an id, never a 500
    assert core.metrics.count(M.ERRORS, status="500") == 0


def test_after_configure_it_answers(core, tiny_cnn):
    core.configure(_plan(tiny_cnn))
    r = _predict(core, _good_body(), x_request_id="client-id.7")
    assert r.status == 200 and len(r.body["predictions"]) == 3 and r.body["model_version"] == VERSION
    assert r.body["device_failures"] == 0 and r.headers[REQUEST_ID_HEADER] == "client-id.7"
    assert core.health(RUNNING).status == 200 and core.health(RUNNING).body["ready"]
    assert core.health({}).status == 503  # no replica running: not ready
    assert asyncio.run(core.models()).status == 200 and asyncio.run(core.models()).body["versions"] == [VERSION]
    assert core.metrics.count(M.REQUESTS, model_version=VERSION) == 1
    # every answer counted by status; the exit mix by tier and exit, the latency observed
    assert core.metrics.count(M.RESPONSES, status="200") == 1
    exits = {(dict(ts)["tier"], dict(ts)["exit"]): v for (n, ts), v in core.metrics.counts.items() if n == M.EXITS}
    assert sum(exits.values()) == 3 and set(exits) == {(t, str(k)) for t, k in zip(r.body["tier"], r.body["exit"], strict=True)}
    assert len(core.metrics.observed(M.LATENCY_MS, model_version=VERSION)) == 1
    # the drift watch sees the answered samples; this plan has no reference: "no reference"
    drift = asyncio.run(core.models()).body["drift"]["versions"][VERSION]
    assert drift["status"] == "no reference" and drift["score"] is None


def test_the_drift_watch_scores_answered_requests_against_the_plans_reference(tiny_cnn):
    from dataclasses import replace

    import numpy as np

    from dynray.drift import FEATURES, DriftReference

    core = IngressCore(AppArgs.model_validate({"drift": {"window": 20, "check_every": 5}}), M.MemoryMetrics(), tiers=("edge", "cloud"))
    ref = DriftReference(values=np.random.default_rng(0).uniform(size=(200, len(FEATURES))))
    core.configure(replace(_plan(tiny_cnn), references={VERSION: ref}))
    for _ in range(10):
        assert _predict(core, _good_body()).status == 200
    st = asyncio.run(core.models()).body["drift"]
    assert st["versions"][VERSION]["samples"] == 30 and st["versions"][VERSION]["score"] is not None and st["cost_ms_per_request"] > 0
    assert core.metrics.gauges  # the score was exported
    off = IngressCore(AppArgs.model_validate({"drift": {"enabled": False}}), M.MemoryMetrics(), tiers=("edge", "cloud"))
    off.configure(_plan(tiny_cnn))
    assert _predict(off, _good_body()).status == 200 and asyncio.run(off.models()).body["drift"] == {"enabled": False}


def test_an_unexpected_exception_is_a_json_500_with_a_logged_counted_request_id(core, tiny_cnn, caplog, monkeypatch):
    plan = _plan(tiny_cnn)
    core.configure(plan)

    async def boom(*a, **k):
        raise KeyError("a bug deep in the answer path")

    monkeypatch.setattr(plan.orch, "answer", boom)
    with caplog.at_level(logging.ERROR, logger="dynray.serving.ingress"):
        r = _predict(core, _good_body())
    rid = r.headers[REQUEST_ID_HEADER]
    assert r.status == 500 and r.body == {"error": "internal error", "request_id": rid}
    assert core.metrics.count(M.ERRORS, status="500") == 1
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    # and in the other endpoints
    monkeypatch.setattr(TrafficSplit, "describe", lambda self: 1 / 0)
    r = asyncio.run(core.models())
    assert r.status == 500 and r.body["error"] == "internal error" and core.metrics.count(M.ERRORS, status="500") == 2


@pytest.mark.parametrize("body, ctype, status", [
    (b"{not json", "application/json", 400),
    (b'{"inputs": [[0.5]]}', "application/json", 422),
    (b"{}", "text/plain", 415),
    (json.dumps({**encode_array(torch.rand(1, 1, 28, 28)), "router": "sgd"}).encode(), "application/json", 422),
    (json.dumps({**encode_array(torch.rand(1, 1, 28, 28)), "model_version": "nope:v9"}).encode(), "application/json", 422),
    (json.dumps({**encode_array(torch.rand(1, 1, 28, 28)), "router": "ppo"}).encode(), "application/json", 422),  # no PPO router registered
])
def test_client_errors_are_4xx_with_an_error(core, tiny_cnn, body, ctype, status):
    core.configure(_plan(tiny_cnn))
    r = asyncio.run(core.predict(_chunks(body), {"content-type": ctype}))
    assert r.status == status and r.body["error"] and r.headers[REQUEST_ID_HEADER]
    assert core.metrics.count(M.REJECTED, status=str(status)) == 1 and core.metrics.count(M.ERRORS) == 0
    assert core.metrics.count(M.RESPONSES, status=str(status)) == 1


def test_a_body_over_the_limit_is_refused_while_it_is_read(core, tiny_cnn):
    core.configure(_plan(tiny_cnn))
    read: list[int] = []
    big = b"x" * (100 * LIMIT)  # chunked: no Content-Length to refuse it up front
    r = asyncio.run(core.predict(_chunks(big, 4096, read), {"content-type": "application/json"}))
    assert r.status == 413 and "over" in r.body["error"]
    assert sum(read) <= LIMIT + 4096  # stopped at the chunk that passed the limit
    r = asyncio.run(core.predict(_chunks(b"", 4096, read := []), {"content-type": "application/json", "content-length": str(LIMIT + 1)}))
    assert r.status == 413 and read == []  # a declared length over the limit: nothing read
    r = asyncio.run(core.predict(_chunks(b"{}"), {"content-type": "application/json", "content-length": "12abc"}))
    assert r.status == 400 and "Content-Length" in r.body["error"]


def test_request_ids():
    for plain in ("abc-123_x.y:z", "9f1c2d3e-aaaa-4bbb-8ccc-0123456789ab", "x" * 128):
        assert request_id(plain) == plain
    for bad in (None, "", "has space", "x" * 129, "new\nline", "t\tab", "caf\u00e9"):
        rid = request_id(bad)
        assert rid != bad and len(rid) == 16
    assert request_id(None) != request_id(None)


def test_an_extraction_like_key_is_flagged_counted_listed_and_blocked_on_the_limiter(tiny_cnn, tmp_path):
    from dynray.security.keys import KeyStore
    from dynray.security.ratelimit import Buckets
    from dynray.serving.auth import Gate

    store, buckets = KeyStore(tmp_path / "keys.db", b"p" * 32), Buckets()

    async def verify(k):
        return store.verify(k)

    async def take(kid, rate, burst):
        return buckets.take(kid, rate, burst)

    async def penalise(kid, action, factor, duration_s):
        buckets.penalise(kid, action, factor=factor, duration_s=duration_s)

    args = AppArgs.model_validate({"detect": {"action": "block", "window": 32, "min_queries": 16}})
    core = IngressCore(args, M.MemoryMetrics(), tiers=("edge", "cloud"), gate=Gate(verify, take), penalise=penalise)
    core.configure(_plan(tiny_cnn))
    normal, _ = store.create("normal", rate_per_s=1e4)
    prober, prec = store.create("prober", rate_per_s=1e4)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def ask(key, img):
        body = json.dumps(encode_array(img)).encode()
        return core.predict(_chunks(body), {"content-type": "application/json", "x-api-key": key})

    async def scenario():
        nonlocal x
        for _ in range(10):  # below min_queries: no verdict on this key (the untrained model is unsure of everything)
            assert (await ask(normal, x)).status == 200
        for i in range(40):  # each query a small step from the last (what Jacobian augmentation sends)
            x = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i + 1)).sign()).clamp(0, 1)
            r = await ask(prober, x)
            if r.status != 200:
                return r, i
            await asyncio.sleep(0)  # the block reaches the limiter in the background, as on Serve
        return r, 40

    r, sent = asyncio.run(scenario())
    assert r.status == 403 and "blocked" in r.body["error"] and sent <= 20, (sent, r.body)
    assert [f["subject"] for f in core.flags] == [prec.id] and core.flags[0]["action"] == "block"
    assert core.metrics.count(M.FLAGS, detector="extraction", action="block") == 1
    assert asyncio.run(ask(normal, x)).status == 200  # only the flagged key is blocked
