"""Who may call the ingress: API-key checks and the global rate limit, without Ray.

:class:`Gate` answers one question per request: may this caller use this endpoint now? It
returns None (go on) or the :class:`~dynray.serving.ingress.Reply`-shaped refusal:

- no key, or a key that is malformed, unknown, revoked or expired: 401 with
  ``WWW-Authenticate: Bearer``;
- a valid key without the endpoint's scope: 403;
- a key over its rate: 429 with ``Retry-After``; a key a detector blocked: 403 (a throttled
  one pays more tokens per request, so it meets its 429 sooner);
- the key store or the limiter not answering: 503 with ``Retry-After`` (fail closed: an
  outage never lets unauthenticated traffic through).

A key is read from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The gate asks
``verify`` (the key-store actor, ``actors/keystore.py``) and keeps the answer for
``ttl_s`` (at most 1 s), so a revocation takes effect within ``ttl_s`` everywhere; cache
entries are keyed by the key's SHA-256, never the key itself. Every request takes a token
from ``take`` (the named limiter actor, ``actors/ratelimiter.py``): the limit is global
across ingress replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from dynray.errors import ConfigError
from dynray.security.keys import Verified
from dynray.security.ratelimit import Decision

__all__ = ["Refusal", "Admitted", "Gate", "presented_key", "MAX_TTL_S"]

log = logging.getLogger(__name__)
MAX_TTL_S = 1.0
"""A revocation must take effect within a second: no replica trusts a verdict longer."""
_REASONS = {
    "missing": "an API key is required: send `Authorization: Bearer <key>` (or `X-API-Key`)",
    "malformed": "the API key is not a dynray key (dk_<id>_<secret>)",
    "unknown": "the API key is not valid",
    "revoked": "the API key was revoked",
    "expired": "the API key has expired",
}
_FIX_401 = "create one with `dynray keys create --name NAME` and send it as `Authorization: Bearer <key>`"

Verify = Callable[[str], Awaitable[Verified]]
Take = Callable[[str, float, float], Awaitable[Decision]]


@dataclass(frozen=True)
class Refusal:
    """The answer a refused request gets."""

    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Admitted:
    """A request that may go on: the key's id (for per-key detectors and logs)."""

    key_id: str | None
    """None when auth is off."""


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries (``headers``: lower-case names), or None."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return auth.strip()  # some other scheme: checked (and refused) like any bad key
    key = headers.get("x-api-key")
    return key.strip() if key else None


class Gate:
    """Authentication, scope and rate checks for one ingress replica (see the module doc)."""

    def __init__(self, verify: Verify, take: Take, *, ttl_s: float = 0.5, timeout_s: float = 1.0, max_cached: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ConfigError(f"the key cache TTL must be within (0, {MAX_TTL_S}] s: a revocation has to take effect within a second", got=ttl_s, fix="e.g. auth: {cache_ttl_s: 0.5}")
        self._verify, self._take, self.ttl_s, self.timeout_s, self.max_cached, self.clock = verify, take, ttl_s, timeout_s, max_cached, clock
        self._cache: OrderedDict[bytes, tuple[float, Verified]] = OrderedDict()

    async def admit(self, headers: Mapping[str, str], scope: str, rid: str) -> Admitted | Refusal:
        key = presented_key(headers)
        if not key:
            return self._unauthorized("missing", rid)
        try:
            v = await self._verified(key)
        except Exception as e:  # noqa: BLE001 - the key store is down or slow: refuse, never let the request through
            log.warning("key store did not answer (%s: %s); refusing with 503", type(e).__name__, str(e)[:200])
            return _unavailable("the key store is not answering", rid)
        if not v.ok or v.record is None:
            return self._unauthorized(v.reason, rid)
        if not v.allows(scope):
            return Refusal(403, {"error": f"this API key lacks the `{scope}` scope", "request_id": rid,
                                 "fix": f"use a key created with `dynray keys create --scope {scope}`"})
        rec = v.record
        try:
            d = await asyncio.wait_for(self._take(rec.id, rec.rate_per_s, rec.burst), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - same: without the limiter, no request is counted, so none is answered
            log.warning("rate limiter did not answer (%s: %s); refusing with 503", type(e).__name__, str(e)[:200])
            return _unavailable("the rate limiter is not answering", rid)
        if d.blocked:
            return Refusal(403, {"error": f"API key {rec.id} is blocked: a detector flagged its queries as model extraction", "request_id": rid,
                                 "fix": "ask the operator; `GET /v1/admin/security` lists the flags"})
        if not d.allowed:
            return Refusal(429, {"error": f"rate limit of {rec.rate_per_s:g} requests/s (burst {rec.burst:g}) exceeded for key {rec.id}", "request_id": rid,
                                 "retry_after_s": round(d.retry_after_s, 3)}, {"Retry-After": d.retry_after_header})
        return Admitted(rec.id)

    async def _verified(self, key: str) -> Verified:
        h, now = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest(), self.clock()
        hit = self._cache.get(h)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        v = await asyncio.wait_for(self._verify(key), self.timeout_s)
        self._cache[h] = (now, v)
        self._cache.move_to_end(h)
        while len(self._cache) > self.max_cached:  # a flood of random keys cannot grow memory
            self._cache.popitem(last=False)
        return v

    @staticmethod
    def _unauthorized(reason: str, rid: str) -> Refusal:
        return Refusal(401, {"error": _REASONS.get(reason, _REASONS["unknown"]), "request_id": rid, "fix": _FIX_401},
                       {"WWW-Authenticate": 'Bearer realm="dynray"'})


def _unavailable(what: str, rid: str) -> Refusal:
    return Refusal(503, {"error": f"{what}; retry shortly", "request_id": rid}, {"Retry-After": "1"})
