"""Routing state shared by ingress replicas: two orchestrators and one store, no Ray.

Replicas A and B each have their own Orchestrator over the same (fake) tiers; ``sync``
does what each replica's background task does every period: push, then apply the merge.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dynray.errors import ConfigError
from dynray.serving.failover import FailoverConfig, Orchestrator
from dynray.serving.partition import DeviceReply, StageRange, range_macs, run_stages
from dynray.serving.routing_state import ReplicaSync, RoutingStateStore
from dynray.serving.scheduling import CLOUD_PROFILE, EDGE_PROFILE, LatencyPolicy, LoadReport, LoadTracker
from dynray.models import StopAtExit

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VERSION = "tiny:v1"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tier:
    """A tier's device call: the tiny model, failing while ``down`` (time passes on the clock)."""

    def __init__(self, model, tier: str, stop: int, clock: Clock, replica: str) -> None:
        self.model, self.tier, self.stop, self.clock, self.replica = model, tier, stop, clock, replica
        self.down, self.calls = False, 0

    async def __call__(self, req) -> DeviceReply:
        self.calls += 1
        self.clock.t += 0.01  # every call takes 10 ms
        if self.down:
            raise RuntimeError(f"{self.tier} replica died")
        res = run_stages(self.model, StageRange(start=req.start, stop=self.stop), req.inp, StopAtExit(exit=0))
        profile = EDGE_PROFILE if self.tier == "edge" else CLOUD_PROFILE
        return DeviceReply(result=res, tier=self.tier, replica=self.replica, load=LoadTracker().report(self.replica, profile).to_dict(), ms_per_mmac=1.0)


def _orch(model, edge, cloud, clock, origin: str) -> Orchestrator:
    return Orchestrator(
        FailoverConfig(attempts=2, failures_to_trip=2, cooldown_s=5.0), LatencyPolicy(), edge=edge, cloud=cloud, edge_stages=2,
        edge_macs=range_macs(model, StageRange(start=0, stop=2)), cloud_rest_macs=range_macs(model, StageRange(start=2, stop=model.num_exits)),
        full_macs=model.mac_profile.full, profiles={"edge": EDGE_PROFILE, "cloud": CLOUD_PROFILE}, clock=clock, origin=origin,
    )


@pytest.fixture
def two(tiny_cnn):
    clock = Clock()
    edge, cloud = Tier(tiny_cnn, "edge", 2, clock, "edge-0"), Tier(tiny_cnn, "cloud", tiny_cnn.num_exits, clock, "cloud-0")
    a, b = _orch(tiny_cnn, edge, cloud, clock, "A"), _orch(tiny_cnn, edge, cloud, clock, "B")
    store = RoutingStateStore(expire_s=3.0, clock=clock)
    syncs = {"A": ReplicaSync("A"), "B": ReplicaSync("B")}

    def sync(*orchs: Orchestrator) -> None:
        for o in orchs:
            s = syncs[o.views["edge"].origin]
            s.apply(o, store.push(s.observation(o, clock())), clock())

    x = torch.rand(4, *tiny_cnn.cfg.input_shape)
    return clock, edge, cloud, a, b, store, sync, x


def test_a_tier_one_replica_saw_go_down_is_skipped_by_the_other(two):
    clock, edge, _, a, b, _, sync, x = two
    edge.down = True
    assert asyncio.run(a.answer(x, VERSION)).path == "cloud_direct"  # two failed edge calls trip A's breaker
    assert not a.views["edge"].available(clock())
    assert b.choose_path() == "edge_first" and b.views["edge"].available(clock())  # B has not heard yet
    sync(a, b)
    assert not b.views["edge"].available(clock()) and b.views["edge"].failures == 2
    calls = edge.calls
    assert asyncio.run(b.answer(x, VERSION)).path == "cloud_direct" and edge.calls == calls  # B never tried the edge itself
    # the edge recovers; after the cooldown B tries it first: its success closes A's breaker too
    edge.down = False
    clock.t += 5.0
    assert asyncio.run(b.answer(x, VERSION)).path == "edge_first"
    sync(b, a)
    assert a.views["edge"].failures == 0 and a.views["edge"].available(clock())


def test_failures_both_replicas_had_in_flight_count_once(two):
    """One dead device replica fails a call on A and one on B at the same moment: one wave,
    so the pooled breaker stays closed (counting per replica would trip it at 2)."""
    clock, _, _, a, b, _, sync, _ = two
    cfg = a.cfg
    a.views["edge"].failure(clock(), cfg, started=clock() - 0.2)
    b.views["edge"].failure(clock() + 0.001, cfg, started=clock() - 0.1)
    sync(a, b, a)
    for o in (a, b):
        assert o.views["edge"].failures == 1 and o.views["edge"].available(clock())
    clock.t += 0.5  # a new call, sent after both failures were seen, fails too: that trips it everywhere
    b.views["edge"].failure(clock(), cfg, started=clock() - 0.05)
    sync(b, a)
    assert not a.views["edge"].available(clock()) and a.views["edge"].failures == 2


def test_a_replica_that_stops_pushing_is_forgotten(two):
    clock, edge, _, a, b, store, sync, x = two
    edge.down = True
    asyncio.run(a.answer(x, VERSION))
    sync(a, b)
    assert not b.views["edge"].available(clock()) and store.replicas() == ["A", "B"]
    clock.t += 3.5  # A was killed: it no longer pushes; its trip must not outlive it in B
    edge.down = False
    sync(b)
    assert store.replicas() == ["B"]
    assert b.views["edge"].failures == 0 and b.views["edge"].available(clock())


def test_load_reports_and_call_times_are_shared(two):
    clock, _, _, a, b, _, sync, x = two
    for _ in range(10):
        asyncio.run(a.answer(x, VERSION))  # only A has called the tiers
    assert set(a.views["edge"].loads) == {"edge-0"} and b.views["edge"].loads == {}
    sync(a, b)
    assert set(b.views["edge"].loads) == {"edge-0"}
    assert b.call_times["edge"].value == pytest.approx(a.call_times["edge"].value)
    assert b.call_times["edge"].base == pytest.approx(a.call_times["edge"].base)
    assert b.load_snapshot().edge_ms == pytest.approx(a.load_snapshot().edge_ms)
    # a fresher report of the same device replica replaces the older one
    newer = LoadReport(replica="edge-0", profile=EDGE_PROFILE, in_flight=7, queue_len=5, ewma_service_ms=30.0)
    clock.t += 1.0
    b.views["edge"].loads["edge-0"], b.views["edge"].seen["edge-0"] = newer, clock()
    sync(b, a)
    assert a.views["edge"].loads["edge-0"].queue_len == 5 and a.load_snapshot().edge_queue == 5.0
    # call-time EWMAs merge weighted by the calls each replica made since its last push
    a.call_times["cloud"].value, a.call_times["cloud"].calls = 100.0, a.call_times["cloud"].calls + 3
    b.call_times["cloud"].value, b.call_times["cloud"].calls = 20.0, b.call_times["cloud"].calls + 1
    sync(a, b)
    assert b.call_times["cloud"].value == pytest.approx((100.0 * 3 + 20.0 * 1) / 4)


def test_store_config_is_checked():
    with pytest.raises(ConfigError, match="expire_s"):
        RoutingStateStore(expire_s=0)


def test_state_survives_a_reconfigure(two, tiny_cnn):
    """A version roll rebuilds the orchestrator; what it knew about the tiers stays."""
    clock, edge, cloud, a, _, _, _, x = two
    edge.down = True
    asyncio.run(a.answer(x, VERSION))
    fresh = _orch(tiny_cnn, edge, cloud, clock, "A")
    fresh.adopt(a)
    assert not fresh.views["edge"].available(clock()) and fresh.choose_path() == "cloud_direct"
