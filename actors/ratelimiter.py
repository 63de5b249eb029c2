"""The global rate limiter: one named Ray actor holding every key's token bucket.

Every ingress replica asks it before answering, so a key's limit holds across all replicas
together rather than per replica. The algorithm is :class:`dynray.security.ratelimit.Buckets`;
this actor only wires calls to it. Async methods: calls from many replicas interleave on one
event loop, and each ``take`` runs to completion without awaiting, so buckets never race.
"""

from __future__ import annotations

import ray

from dynray.security.ratelimit import Buckets, Decision

__all__ = ["RATELIMITER_ACTOR", "RateLimiter", "start_ratelimiter"]

RATELIMITER_ACTOR = "dynray-ratelimiter"
NAMESPACE = "dynray"


class RateLimiter:
    def __init__(self) -> None:
        self.buckets = Buckets()

    async def take(self, key: str, rate: float, burst: float) -> Decision:
        return self.buckets.take(key, rate, burst)

    async def penalise(self, key: str, action: str, factor: float = 10.0, duration_s: float = 3600.0) -> None:
        """A detector flagged ``key``: throttle or block it on every ingress replica."""
        self.buckets.penalise(key, action, factor=factor, duration_s=duration_s)

    async def penalty(self, key: str) -> str | None:
        return self.buckets.penalty(key)


def start_ratelimiter(*, name: str = RATELIMITER_ACTOR, node_id: str | None = None):
    """The named limiter (started on ``node_id``, default the head, if it is not running)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.keystore import head_node_id

    node = node_id or head_node_id()
    return (
        ray.remote(RateLimiter)
        .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1, max_concurrency=1000,
                 scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
        .remote()
    )
