"""Token buckets: burst, refill rate, Retry-After."""

import pytest

from dynray.errors import ConfigError
from dynray.security.ratelimit import Buckets


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_burst_then_rate():
    c = Clock()
    b = Buckets(clock=c)
    assert all(b.take("k", rate=10, burst=5).allowed for _ in range(5))
    d = b.take("k", rate=10, burst=5)
    assert not d.allowed and d.retry_after_s == pytest.approx(0.1) and d.retry_after_header == "1"
    # over 10 s at 10/s: 100 more allowed, whatever the attempts
    allowed = 0
    for _ in range(1000):
        c.t += 0.01
        allowed += b.take("k", rate=10, burst=5).allowed
    assert allowed == pytest.approx(100, abs=1)
    assert b.take("other", rate=10, burst=5).allowed  # buckets are per key


def test_bad_limits():
    with pytest.raises(ConfigError):
        Buckets().take("k", rate=0, burst=1)


def test_a_penalty_throttles_or_blocks_a_key_until_it_ends():
    c = Clock()
    b = Buckets(clock=c)
    b.penalise("t", "throttle", factor=10, duration_s=60)
    got = [b.take("t", rate=10, burst=20).allowed for _ in range(5)]
    assert got == [True, True, False, False, False]  # 10 tokens a request: a burst of 20 holds two
    c.t += 1.0  # 10 tokens back: one throttled request
    assert [b.take("t", rate=10, burst=20).allowed for _ in range(2)] == [True, False]
    b.penalise("x", "block", duration_s=30)
    d = b.take("x", rate=10, burst=20)
    assert not d.allowed and d.blocked and d.retry_after_s == pytest.approx(30) and b.penalty("x") == "block"
    assert b.take("other", rate=10, burst=20).allowed and not b.take("other", rate=10, burst=20).blocked
    c.t += 61
    assert b.penalty("t") is None and b.penalty("x") is None and b.take("x", rate=10, burst=20).allowed
    with pytest.raises(ConfigError):
        b.penalise("x", "ban")
