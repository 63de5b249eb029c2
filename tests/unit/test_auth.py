"""The ingress gate on a real SQLite key store and real token buckets: 401, 403, 429, 503,
the verdict cache and how soon a revocation holds; and IngressCore answering through it."""

import asyncio
import json

import pytest

from dynray.errors import ConfigError
from dynray.security.keys import KeyStore
from dynray.security.ratelimit import Buckets
from dynray.serving import metrics as M
from dynray.serving.auth import Admitted, Gate, Refusal, presented_key
from dynray.serving.config import AppArgs
from dynray.serving.ingress import IngressCore

PEPPER = b"p" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def setup(tmp_path):
    clock = Clock()
    store = KeyStore(tmp_path / "keys.db", PEPPER, clock=clock)
    buckets = Buckets(clock=clock)
    calls = {"verify": 0}

    async def verify(key):
        calls["verify"] += 1
        return store.verify(key)

    async def take(kid, rate, burst):
        return buckets.take(kid, rate, burst)

    gate = Gate(verify, take, ttl_s=0.5, clock=clock)
    return store, gate, clock, calls


def _admit(gate, headers, scope="predict"):
    return asyncio.run(gate.admit(headers, scope, "rid-1"))


def test_keys_are_read_from_bearer_or_x_api_key():
    assert presented_key({"authorization": "Bearer dk_a_b"}) == "dk_a_b"
    assert presented_key({"authorization": "bearer   dk_a_b "}) == "dk_a_b"
    assert presented_key({"x-api-key": "dk_c_d"}) == "dk_c_d"
    assert presented_key({"authorization": "Basic dXNlcjpwYXNz"}) == "Basic dXNlcjpwYXNz"  # checked and refused, not ignored
    assert presented_key({}) is None


def test_every_bad_key_is_401_with_a_bearer_challenge(setup):
    store, gate, clock, _ = setup
    good, rec = store.create("c", ttl_s=10)
    revoked, rrec = store.create("r")
    store.revoke(rrec.id)
    cases = {
        "missing": {},
        "malformed": {"authorization": "Bearer not-a-key"},
        "unknown": {"authorization": f"Bearer {good[:-3]}xyz"},  # right id, wrong secret
        "revoked": {"authorization": f"Bearer {revoked}"},
    }
    for what, headers in cases.items():
        r = _admit(gate, headers)
        assert isinstance(r, Refusal) and r.status == 401, what
        assert r.headers["WWW-Authenticate"].startswith("Bearer") and r.body["request_id"] == "rid-1" and "dynray keys create" in r.body["fix"], what
    assert "revoked" in _admit(gate, cases["revoked"]).body["error"]
    assert _admit(gate, {"authorization": f"Bearer {good}"}) == Admitted(rec.id)
    clock.t += 11
    r = _admit(gate, {"x-api-key": good})
    assert r.status == 401 and "expired" in r.body["error"]


def test_a_key_without_the_scope_is_403_and_admin_holds_every_scope(setup):
    store, gate, _, _ = setup
    predict, _ = store.create("p", scopes=["predict"])
    admin, arec = store.create("a", scopes=["admin"])
    r = _admit(gate, {"authorization": f"Bearer {predict}"}, scope="admin")
    assert isinstance(r, Refusal) and r.status == 403 and "admin" in r.body["error"]
    assert _admit(gate, {"authorization": f"Bearer {admin}"}, scope="admin") == Admitted(arec.id)
    assert _admit(gate, {"authorization": f"Bearer {admin}"}, scope="predict") == Admitted(arec.id)


def test_over_its_rate_a_key_gets_429_with_retry_after_and_other_keys_do_not(setup):
    store, gate, clock, _ = setup
    slow, _ = store.create("slow", rate_per_s=2, burst=3)
    other, _ = store.create("other", rate_per_s=2, burst=3)
    got = [_admit(gate, {"x-api-key": slow}) for _ in range(4)]
    assert [isinstance(g, Admitted) for g in got] == [True, True, True, False]
    assert got[3].status == 429 and got[3].headers["Retry-After"] == "1" and got[3].body["retry_after_s"] == pytest.approx(0.5)
    assert isinstance(_admit(gate, {"x-api-key": other}), Admitted)
    clock.t += 0.5  # one token back
    assert isinstance(_admit(gate, {"x-api-key": slow}), Admitted)


def test_the_verdict_is_cached_for_the_ttl_and_a_revocation_holds_after_it(setup):
    store, gate, clock, calls = setup
    key, rec = store.create("c", rate_per_s=1000, burst=1000)
    h = {"authorization": f"Bearer {key}"}
    for _ in range(5):
        assert isinstance(_admit(gate, h), Admitted)
    assert calls["verify"] == 1  # one key-store call for five requests
    store.revoke(rec.id)
    clock.t += 0.3
    assert isinstance(_admit(gate, h), Admitted)  # within the TTL the cached verdict stands
    clock.t += 0.21  # 0.51 s after the verdict: past the TTL (0.5 s), well within 1 s
    r = _admit(gate, h)
    assert r.status == 401 and "revoked" in r.body["error"] and calls["verify"] == 2


def test_a_ttl_over_one_second_is_refused():
    async def never(*a):
        raise AssertionError

    with pytest.raises(ConfigError, match="within a second"):
        Gate(never, never, ttl_s=1.5)


def test_a_key_store_or_limiter_outage_is_503_never_a_pass(setup):
    store, _, clock, _ = setup
    key, _ = store.create("c")

    async def down(*a):
        raise ConnectionError("actor died")

    async def slow(*a):
        await asyncio.sleep(5)

    async def verify(k):
        return store.verify(k)

    for gate in (Gate(down, down, clock=clock), Gate(verify, down, clock=clock), Gate(slow, slow, timeout_s=0.05, clock=clock)):
        r = _admit(gate, {"x-api-key": key})
        assert isinstance(r, Refusal) and r.status == 503 and r.headers["Retry-After"] == "1"


def test_the_ingress_answers_401_403_429_through_the_gate_and_health_stays_open(setup):
    store, gate, _, _ = setup
    core = IngressCore(AppArgs(), M.MemoryMetrics(), tiers=("edge", "cloud"), gate=gate)
    key, _ = store.create("c", rate_per_s=1, burst=1)

    async def chunks():
        yield json.dumps({"inputs": [[[[0.0] * 28] * 28]]}).encode()

    def predict(headers):
        return asyncio.run(core.predict(chunks(), {"content-type": "application/json", **headers}))

    assert predict({}).status == 401
    assert asyncio.run(core.models({})).status == 401
    assert asyncio.run(core.security({"x-api-key": key})).status == 403
    assert predict({"x-api-key": key}).status == 503  # admitted: no model served yet (not 401/429)
    r = predict({"x-api-key": key})
    assert r.status == 429 and r.headers["Retry-After"] == "1" and r.headers["X-Request-Id"]
    assert core.health({}).status == 503 and "error" in core.health({}).body  # open: no key asked (503 only for no plan)
    assert core.metrics.count(M.REJECTED, status="401") == 2 and core.metrics.count(M.REJECTED, status="403") == 1 and core.metrics.count(M.REJECTED, status="429") == 1
    assert core.metrics.count(M.RATE_LIMITED) == 1
    admin, _ = store.create("a", scopes=["admin"])
    s = asyncio.run(core.security({"authorization": f"Bearer {admin}"}))
    assert s.status == 200 and s.body["auth"]["enabled"] is True and s.body["flags"] == []
