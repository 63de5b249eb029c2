"""Edge/cloud scheduling: profiles, load tracking, the path cost model and the policies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dynray.serving import scheduling
from dynray.errors import ConfigError, DynrayError, UnknownNameError
from dynray.serving.scheduling import (
    CLOUD_PROFILE,
    EDGE_PROFILE,
    BalancedPolicy,
    DeviceProfile,
    LoadReport,
    LoadTracker,
    NoDeviceAvailable,
    PathEstimate,
    WorkloadEstimate,
    estimate_paths,
    get_policy,
    policy_names,
    register_policy,
    request_cost,
)

WORK = WorkloadEstimate(edge_macs=0.2e6, cloud_rest_macs=2.7e6, full_macs=3.0e6, escalate_frac=0.1, ms_per_mmac=1.0)


def load(replica: str, profile: DeviceProfile = EDGE_PROFILE, *, queue: int = 0, ewma: float = 0.0,
         healthy: bool = True) -> LoadReport:
    return LoadReport(replica=replica, profile=profile, in_flight=queue, queue_len=queue, ewma_service_ms=ewma,
                      healthy=healthy)


def by_path(estimates: list[PathEstimate]) -> dict[str, PathEstimate]:
    return {e.path: e for e in estimates}


# --- profiles -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"rtt_ms": -1.0}, {"speed": 0.0}, {"speed": float("nan")}, {"tier": "fog"},
                                 {"cost_per_mmac": -0.1}, {"memory_mb": 0}, {"memory_mb": 1.5}])
def test_profile_validation(bad):
    with pytest.raises(ConfigError):
        replace(EDGE_PROFILE, **bad)


def test_profile_dict_round_trip_and_unknown_key():
    assert DeviceProfile.from_dict(CLOUD_PROFILE.to_dict()) == CLOUD_PROFILE
    with pytest.raises(ConfigError, match="allowed keys: tier, speed, rtt_ms, cost_per_mmac, memory_mb"):
        DeviceProfile.from_dict({**EDGE_PROFILE.to_dict(), "gpu": "h100"})
    with pytest.raises(ConfigError, match="missing keys"):
        DeviceProfile.from_dict({"tier": "edge"})


def test_slowdown():
    assert EDGE_PROFILE.slowdown_s(0.002) == pytest.approx(0.006)
    assert CLOUD_PROFILE.slowdown_s(0.002) == 0.0
    assert replace(CLOUD_PROFILE, speed=2.0).slowdown_s(0.002) == 0.0  # cannot inject a negative delay


# --- load ---------------------------------------------------------------------------------

def test_load_tracker_counts_and_ewma():
    t = LoadTracker(alpha=0.5)
    t.enqueue()
    t.enqueue()
    t.dequeue()
    t.start()
    t.start()
    r = t.report("e0", EDGE_PROFILE)
    assert (r.queue_len, r.in_flight, r.ewma_service_ms) == (1, 2, 0.0)
    t.finish(10.0)  # first sample initialises the EWMA
    assert t.ewma_service_ms == 10.0 and t.in_flight == 1
    t.finish(20.0)  # 0.5 * 20 + 0.5 * 10
    assert t.ewma_service_ms == 15.0 and t.in_flight == 0
    t.start()
    t.finish(5.0)  # 0.5 * 5 + 0.5 * 15
    r = t.report("e0", EDGE_PROFILE, healthy=False)
    assert r.ewma_service_ms == 10.0 and r.expected_wait_ms() == 10.0 and not r.healthy
    t.dequeue()
    t.dequeue()  # never below zero
    assert t.report("e0", EDGE_PROFILE).expected_wait_ms() == 0.0


def test_load_tracker_default_alpha_and_validation():
    t = LoadTracker()
    t.finish(10.0)
    t.finish(0.0)
    assert t.ewma_service_ms == pytest.approx(8.0)  # 0.2 * 0 + 0.8 * 10
    for alpha in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError):
            LoadTracker(alpha)
    with pytest.raises(ConfigError):
        t.finish(-1.0)


def test_load_report_dict_round_trip_and_validation():
    r = load("c0", CLOUD_PROFILE, queue=3, ewma=2.5, healthy=False)
    d = r.to_dict()
    assert d["profile"] == CLOUD_PROFILE.to_dict() and LoadReport.from_dict(d) == r
    assert r.expected_wait_ms() == 7.5
    with pytest.raises(ConfigError, match="allowed keys"):
        LoadReport.from_dict({**d, "extra": 1})
    with pytest.raises(ConfigError):
        LoadReport.from_dict({**d, "profile": {**d["profile"], "tier": "moon"}})
    with pytest.raises(ConfigError):
        load("c0", queue=-1)


# --- cost model ---------------------------------------------------------------------------

def test_estimate_paths_worked_example():
    est = by_path(estimate_paths(WORK, load("e0"), load("c0", CLOUD_PROFILE)))
    # edge_first: 5 rtt + 0.2 MMAC * 1 ms / 0.25 speed = 5.8 ms on the edge, plus 10% escalated to the
    # cloud: 0.1 * (40 rtt + 2.7 MMAC * 1 ms / 1.0) = 4.27 ms -> 10.07 ms.
    # cost: 0.2 MMAC * 1.0 + 0.1 * 2.7 MMAC * 4.0 = 0.2 + 1.08 = 1.28.
    assert est["edge_first"].latency_ms == pytest.approx(10.07, rel=1e-12)
    assert est["edge_first"].cost == pytest.approx(1.28, rel=1e-12)
    # cloud_direct: 40 rtt + 3.0 MMAC * 1 ms = 43 ms; cost 3.0 * 4.0 = 12.
    assert est["cloud_direct"].latency_ms == pytest.approx(43.0, rel=1e-12)
    assert est["cloud_direct"].cost == pytest.approx(12.0, rel=1e-12)


def test_estimate_paths_queue_and_missing_tiers():
    busy = by_path(estimate_paths(WORK, load("e0", queue=2, ewma=3.0), load("c0", CLOUD_PROFILE, queue=10, ewma=2.0)))
    assert busy["edge_first"].latency_ms == pytest.approx(5 + 6 + 0.8 + 0.1 * (40 + 20 + 2.7))
    assert busy["cloud_direct"].latency_ms == pytest.approx(40 + 20 + 3.0)
    # no healthy cloud: edge_first keeps only its edge terms, cloud_direct is gone
    for cloud in (None, load("c0", CLOUD_PROFILE, healthy=False)):
        (only,) = estimate_paths(WORK, load("e0"), cloud)
        assert only == PathEstimate("edge_first", pytest.approx(5.8), pytest.approx(0.2))
    assert [e.path for e in estimate_paths(WORK, load("e0", healthy=False), load("c0", CLOUD_PROFILE))] == ["cloud_direct"]
    assert estimate_paths(WORK, None, load("c0", CLOUD_PROFILE, healthy=False)) == []


@pytest.mark.parametrize("bad", [{"escalate_frac": 1.1}, {"escalate_frac": -0.1}, {"ms_per_mmac": 0.0},
                                 {"edge_macs": -1.0}, {"full_macs": float("inf")}])
def test_workload_validation(bad):
    with pytest.raises(ConfigError):
        replace(WORK, **bad)


def test_request_cost():
    profiles = {"edge": EDGE_PROFILE, "cloud": CLOUD_PROFILE}
    assert request_cost({"edge": 0.2e6}, profiles) == pytest.approx(0.2)
    assert request_cost({"edge": 0.2e6, "cloud": 2.7e6}, profiles) == pytest.approx(0.2 + 10.8)
    assert request_cost({"edge": 0.2e6, "cloud": 0.0}, {"edge": EDGE_PROFILE}) == pytest.approx(0.2)  # untouched tier
    assert request_cost({}, profiles) == 0.0
    with pytest.raises(UnknownNameError):
        request_cost({"fog": 1e6}, profiles)
    with pytest.raises(ConfigError):
        request_cost({"edge": -1.0}, profiles)


# --- policies -----------------------------------------------------------------------------

def test_registry():
    assert policy_names() == ["balanced", "cost", "latency"]
    for name in policy_names():
        assert get_policy(name).name == name
    assert get_policy("balanced", weight=0.8) == BalancedPolicy(weight=0.8)
    with pytest.raises(UnknownNameError, match="did you mean latency") as e:
        get_policy("latncy")
    assert e.value.known == ["balanced", "cost", "latency"]
    with pytest.raises(ConfigError):
        get_policy("latency", weight=0.5)
    with pytest.raises(ConfigError):
        BalancedPolicy(weight=1.5)


def test_duplicate_registration_raises(monkeypatch):
    monkeypatch.setattr(scheduling, "POLICIES", dict(scheduling.POLICIES))
    with pytest.raises(ConfigError, match="already registered"):
        register_policy("latency")(BalancedPolicy)

    @register_policy("always-edge")
    class AlwaysEdge:
        name = "always-edge"

    assert "always-edge" in policy_names() and isinstance(get_policy("always-edge"), AlwaysEdge)
    with pytest.raises(ConfigError, match="already registered"):
        register_policy("always-edge")(AlwaysEdge)


def test_heavy_cloud_queue_latency_picks_edge_first():
    est = estimate_paths(WORK, load("e0"), load("c0", CLOUD_PROFILE, queue=20, ewma=10.0))
    # edge_first 5.8 + 0.1 * (40 + 200 + 2.7) = 30.07 ms; cloud_direct 40 + 200 + 3 = 243 ms
    assert get_policy("latency").choose_path(est).path == "edge_first"
    # idle cloud but a high escalation rate: going straight to the cloud is faster
    est = estimate_paths(replace(WORK, escalate_frac=1.0), load("e0"), load("c0", CLOUD_PROFILE))
    assert get_policy("latency").choose_path(est).path == "cloud_direct"  # 48.5 ms vs 43 ms


def test_policies_disagree():
    cheap_cloud = replace(CLOUD_PROFILE, cost_per_mmac=0.3)
    work = replace(WORK, escalate_frac=0.9)
    est = by_path(estimate_paths(work, load("e0"), load("c0", cheap_cloud, queue=10, ewma=10.0)))
    # edge_first: 5.8 + 0.9 * (40 + 100 + 2.7) = 134.23 ms, cost 0.2 + 0.9 * 2.7 * 0.3 = 0.929
    # cloud_direct: 40 + 100 + 3 = 143 ms, cost 3.0 * 0.3 = 0.9
    assert est["edge_first"].latency_ms == pytest.approx(134.23)
    assert est["edge_first"].cost == pytest.approx(0.929)
    assert est["cloud_direct"].cost == pytest.approx(0.9)
    paths = list(est.values())
    assert get_policy("latency").choose_path(paths).path == "edge_first"
    assert get_policy("cost").choose_path(paths).path == "cloud_direct"
    assert BalancedPolicy(weight=1.0).choose_path(paths).path == "edge_first"
    assert BalancedPolicy(weight=0.0).choose_path(paths).path == "cloud_direct"
    # weight 0.5: edge 0.5 * 1 + 0.5 * 0.929 / 0.9 = 1.0161; cloud 0.5 * 143 / 134.23 + 0.5 = 1.0327
    assert BalancedPolicy().choose_path(paths).path == "edge_first"
    # weight 0.2: edge 0.2 + 0.8 * 1.03222 = 1.0258; cloud 0.2 * 1.06534 + 0.8 = 1.0131
    assert BalancedPolicy(weight=0.2).choose_path(paths).path == "cloud_direct"


def test_cost_ties_go_to_lower_latency_and_zero_minima_are_guarded():
    a, b = PathEstimate("edge_first", 10.0, 1.0), PathEstimate("cloud_direct", 5.0, 1.0)
    assert get_policy("cost").choose_path([a, b]) is b
    free = [PathEstimate("edge_first", 8.0, 0.0), PathEstimate("cloud_direct", 5.0, 2.0)]
    assert BalancedPolicy(weight=0.5).choose_path(free).path == "edge_first"  # 0.5 * 1.6 + 0 vs 0.5 * 1 + 0.5 * 2 / 2
    zero = [PathEstimate("edge_first", 0.0, 0.0), PathEstimate("cloud_direct", 0.0, 0.0)]
    assert BalancedPolicy().choose_path(zero).path == "edge_first"


def test_no_device_available():
    assert issubclass(NoDeviceAvailable, DynrayError)
    for name in policy_names():
        with pytest.raises(NoDeviceAvailable):
            get_policy(name).choose_path(estimate_paths(WORK, None, None))
        assert get_policy(name).rank_replicas([load("e0", healthy=False)]) == []


def test_latency_ranks_by_expected_finish_and_drops_unhealthy():
    loads = [
        load("e-busy", queue=4, ewma=10.0),  # 40 + 10 + 5 = 55
        load("e-idle", ewma=10.0),  # 0 + 10 + 5 = 15
        load("e-idle2", ewma=10.0),  # tie with e-idle
        load("e-sick", ewma=1.0, healthy=False),
        load("c0", CLOUD_PROFILE, queue=1, ewma=2.0),  # 2 + 2 + 40 = 44
    ]
    assert get_policy("latency").rank_replicas(loads) == [["e-idle", "e-idle2"], ["c0"], ["e-busy"]]


def test_cost_prefers_cheaper_profile_in_mixed_tier():
    cheap, dear = replace(EDGE_PROFILE, cost_per_mmac=0.5), replace(EDGE_PROFILE, cost_per_mmac=2.0)
    loads = [load("dear", dear), load("cheap-busy", cheap, queue=5, ewma=10.0), load("cheap", cheap, queue=1, ewma=10.0),
             load("cheap-sick", cheap, healthy=False)]
    assert get_policy("cost").rank_replicas(loads) == [["cheap"], ["cheap-busy"], ["dear"]]
    assert get_policy("latency").rank_replicas(loads)[0] == ["dear"]  # idle: finishes first


def test_balanced_ranks_by_normalised_mix():
    cheap = replace(EDGE_PROFILE, cost_per_mmac=0.5)
    # finish times: a 15 ms (cost 1.0), b 25 ms (cost 0.5)
    loads = [load("a", ewma=10.0), load("b", cheap, queue=1, ewma=10.0)]
    # weight 0.5: a 0.5 * 1 + 0.5 * 2 = 1.5; b 0.5 * 25 / 15 + 0.5 * 1 = 1.333
    assert BalancedPolicy().rank_replicas(loads) == [["b"], ["a"]]
    # weight 0.9: a 0.9 + 0.2 = 1.1; b 1.5 + 0.1 = 1.6
    assert BalancedPolicy(weight=0.9).rank_replicas(loads) == [["a"], ["b"]]
    assert BalancedPolicy().rank_replicas([load("x", ewma=1.0), load("y", ewma=1.0)]) == [["x", "y"]]
