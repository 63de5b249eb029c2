"""Token buckets per API key: the algorithm the global rate-limiter actor runs.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a request
takes one. When it finds none, the answer says how long until one is there, which the
ingress sends as ``Retry-After`` with a 429. The Ray actor that makes the limit global
across ingress replicas (``actors/ratelimiter.py``) holds one :class:`Buckets` and only
wires calls to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from dynray.errors import ConfigError

__all__ = ["Decision", "Buckets"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    """Seconds until a token is available (0 when allowed)."""
    blocked: bool = False
    """Refused because a detector's flag blocks the key (not for want of tokens)."""

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class Buckets:
    """One token bucket per key; ``clock`` gives monotonic seconds (injectable for tests).

    A detector's flag can *penalise* a key (:meth:`penalise`): ``throttle`` makes each of its
    requests cost ``factor`` tokens, ``block`` refuses it until the penalty ends.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self.clock, self.max_keys = clock, max_keys
        self._b: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._penalty: dict[str, tuple[str, float, float]] = {}  # key -> (action, factor, until)

    def penalise(self, key: str, action: str, *, factor: float = 10.0, duration_s: float = 3600.0) -> None:
        """Throttle (each request costs ``factor`` tokens) or block ``key`` for ``duration_s``."""
        if action not in ("throttle", "block") or factor < 1 or duration_s <= 0:
            raise ConfigError("a penalty is throttle (factor >= 1) or block, for a positive duration", got={"action": action, "factor": factor, "duration_s": duration_s},
                              fix="e.g. penalise(key, 'throttle', factor=10, duration_s=3600)")
        self._penalty[key] = (action, float(factor), self.clock() + duration_s)

    def penalty(self, key: str) -> str | None:
        """``throttle``, ``block`` or None."""
        p = self._penalty.get(key)
        if p is not None and self.clock() >= p[2]:
            del self._penalty[key]
            p = None
        return p[0] if p else None

    def take(self, key: str, rate: float, burst: float, n: float = 1.0) -> Decision:
        """Take ``n`` tokens from ``key``'s bucket if it has them."""
        if rate <= 0 or burst < 1 or n <= 0:
            raise ConfigError("a bucket needs rate > 0, burst >= 1 and n > 0", got={"rate": rate, "burst": burst, "n": n}, fix="set the key's limits with `dynray keys create --rate R --burst B`")
        now = self.clock()
        p = self._penalty.get(key) if self.penalty(key) else None
        if p is not None and p[0] == "block":
            return Decision(False, p[2] - now, blocked=True)
        if p is not None:
            n *= p[1]
            burst = max(burst, n)  # a throttled request still fits in a full bucket
        tokens, at = self._b.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= n:
            self._b[key] = (tokens - n, now)
            return Decision(True, 0.0)
        self._b[key] = (tokens, now)
        if len(self._b) > self.max_keys:  # forget the longest-idle buckets (they would be full again)
            for k in sorted(self._b, key=lambda k: self._b[k][1])[: len(self._b) - self.max_keys]:
                del self._b[k]
        return Decision(False, (n - tokens) / rate)
