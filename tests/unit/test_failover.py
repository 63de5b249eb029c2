"""Orchestrator: path choice, retries, failover, degradation, circuit breaker, deadline,
and the classification of device errors (tier failure, refusal, client error).

Device calls are fakes built from the tiny model and run_stages: no Ray cluster (the
classification test builds Ray's real exception classes, which needs no ray.init).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
import torch

from dynray.errors import ConfigError, RegistryError, RequestError, ServingError
from dynray.serving.failover import Answer, ErrorKind, FailoverConfig, Orchestrator, TierView, classify_error, is_tier_failure
from dynray.models import StopAtExit
from dynray.serving.partition import DeviceReply, DeviceRequest, StageInput, StageRange, range_macs, run_stages
from dynray.serving.scheduling import CLOUD_PROFILE, EDGE_PROFILE, LatencyPolicy, LoadTracker, NoDeviceAvailable, PathEstimate
from dynray.thresholds import ThresholdRule

N = 16
VERSION = "tiny:v1"
EDGE_STAGES = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(model, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    scale = torch.linspace(0.02, 1.0, n).view(n, 1, 1, 1)
    return torch.rand(n, *model.cfg.input_shape, generator=g) * scale


def _rule(model, x) -> ThresholdRule:
    """A complexity rule that sends some samples to each exit (the darkest images leave first)."""
    cx = model.complexity(x).mean(dim=1)
    s = cx.sort().values
    # score ~ conf - (c - 0.5); conf of the untrained net is ~0.13: thresholds split by complexity
    t0 = 0.13 + 0.5 - float(s[N // 4])  # about a quarter leaves at exit 0
    t1 = 0.13 + 0.5 - float(s[N // 2])  # about another quarter at exit 1
    return ThresholdRule(thresholds=(t0, t1), complexity_weight=1.0, feature_weights=(0.25, 0.25, 0.25, 0.25))


@dataclass
class FakeDevice:
    """A tier's device call: run_stages on the tiny model, with scripted failures."""

    model: torch.nn.Module
    rule: object
    tier: str
    stop: int
    fail: int = 0  # the first `fail` calls raise
    fail_always: bool = False
    hang_s: float = 0.0  # every call sleeps this long first (a hang when > the timeout)
    error: object = None  # a callable: what a failing call raises (default RuntimeError)
    calls: list[DeviceRequest] = field(default_factory=list)
    tracker: LoadTracker = field(default_factory=LoadTracker)

    async def __call__(self, req: DeviceRequest) -> DeviceReply:
        self.calls.append(req)
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.fail_always or len(self.calls) <= self.fail:
            raise self.error() if self.error is not None else RuntimeError(f"{self.tier} replica died")
        res = run_stages(self.model, StageRange(start=req.start, stop=self.stop), req.inp, self.rule)
        profile = EDGE_PROFILE if self.tier == "edge" else CLOUD_PROFILE
        return DeviceReply(result=res, tier=self.tier, replica=f"{self.tier}-0", load=self.tracker.report(f"{self.tier}-0", profile).to_dict(), ms_per_mmac=1.0)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _orch(model, edge, cloud, cfg: FailoverConfig | None = None, clock=time.monotonic, policy=None) -> Orchestrator:
    return Orchestrator(
        cfg or FailoverConfig(),
        policy or LatencyPolicy(),
        edge=edge,
        cloud=cloud,
        edge_stages=EDGE_STAGES,
        edge_macs=range_macs(model, StageRange(start=0, stop=EDGE_STAGES)),
        cloud_rest_macs=range_macs(model, StageRange(start=EDGE_STAGES, stop=model.num_exits)),
        full_macs=model.mac_profile.full,
        profiles={"edge": EDGE_PROFILE, "cloud": CLOUD_PROFILE},
        clock=clock,
    )


@pytest.fixture
def setup(tiny_cnn):
    x = _images(tiny_cnn)
    rule = _rule(tiny_cnn, x)
    ref = tiny_cnn.forward_exits(x, rule)
    counts = torch.bincount(ref.exit_index, minlength=3)
    assert (counts > 0).all(), counts  # the rule splits the batch at every exit
    edge_ref = run_stages(tiny_cnn, StageRange(start=0, stop=EDGE_STAGES), StageInput(h=x), rule)

    def edge(**kw) -> FakeDevice:
        return FakeDevice(tiny_cnn, rule, "edge", EDGE_STAGES, **kw)

    def cloud(**kw) -> FakeDevice:
        return FakeDevice(tiny_cnn, rule, "cloud", tiny_cnn.num_exits, **kw)

    return tiny_cnn, x, rule, ref, edge_ref, edge, cloud


def _check_shapes(ans: Answer, n: int = N) -> None:
    assert ans.logits.shape == (n, 10)
    assert ans.exit_index.shape == (n,) and ans.exit_index.dtype == torch.int64
    assert len(ans.tier) == n and all(t in ("edge", "cloud") for t in ans.tier)
    assert ans.degraded.shape == (n,) and ans.degraded.dtype == torch.bool
    assert (ans.exit_index >= 0).all()


def test_happy_path_edge_first(setup):
    model, x, rule, ref, edge_ref, edge, cloud = setup
    e, c = edge(), cloud()
    orch = _orch(model, e, c)
    assert orch.choose_path() == "edge_first"
    ans = asyncio.run(orch.answer(x, VERSION))
    _check_shapes(ans)
    assert ans.path == "edge_first"
    assert torch.equal(ans.logits, ref.logits)
    assert torch.equal(ans.exit_index, ref.exit_index)
    assert ans.tier == ["edge" if k < EDGE_STAGES else "cloud" for k in ref.exit_index.tolist()]
    assert ans.escalated == int((ref.exit_index >= EDGE_STAGES).sum()) == edge_ref.cont.numel()
    assert not ans.degraded.any()
    assert set(ans.macs) == {"edge", "cloud"}
    assert torch.equal(ans.macs["edge"], edge_ref.macs)
    assert torch.equal(ans.macs["edge"] + ans.macs["cloud"], ref.macs)
    assert (ans.macs["cloud"][ref.exit_index < EDGE_STAGES] == 0).all()
    assert (ans.macs["cloud"][ref.exit_index == 2] == range_macs(model, StageRange(start=2, stop=3))).all()
    # one call per tier; the cloud resumed at stage 2 with the edge's continuations
    assert len(e.calls) == 1 and len(c.calls) == 1
    assert e.calls[0].start == 0 and c.calls[0].start == EDGE_STAGES
    assert e.calls[0].version == c.calls[0].version == VERSION
    assert c.calls[0].inp.h.shape[0] == ans.escalated
    # load reports were recorded
    assert set(orch.views["edge"].loads) == {"edge-0"} and set(orch.views["cloud"].loads) == {"cloud-0"}


def test_nothing_escalated_skips_the_cloud(setup):
    model, x, _, _, _, edge, cloud = setup
    e = FakeDevice(model, StopAtExit(exit=0), "edge", EDGE_STAGES)
    c = FakeDevice(model, StopAtExit(exit=0), "cloud", 3)
    ans = asyncio.run(_orch(model, e, c).answer(x, VERSION))
    assert ans.path == "edge_first" and ans.escalated == 0 and ans.tier == ["edge"] * N
    assert (ans.exit_index == 0).all() and not ans.degraded.any()
    assert c.calls == [] and set(ans.macs) == {"edge"}


def _assert_degraded(ans: Answer, ref, edge_ref) -> None:
    _check_shapes(ans)
    assert ans.path == "edge_first"
    esc = edge_ref.cont
    assert ans.escalated == esc.numel() > 0
    assert ans.tier == ["edge"] * N
    expected = torch.zeros(N, dtype=torch.bool)
    expected[esc] = True
    assert torch.equal(ans.degraded, expected)
    # escalated samples: the deepest edge exit's answer
    assert torch.equal(ans.logits[esc], edge_ref.cont_logits)
    assert (ans.exit_index[esc] == edge_ref.cont_exit).all() and edge_ref.cont_exit == EDGE_STAGES - 1
    # the others: exactly what forward_exits gives
    done = edge_ref.done
    assert torch.equal(ans.logits[done], ref.logits[done])
    assert torch.equal(ans.exit_index[done], ref.exit_index[done])
    assert set(ans.macs) == {"edge"} and torch.equal(ans.macs["edge"], edge_ref.macs)


def test_cloud_raising_degrades_escalations(setup):
    model, x, _, ref, edge_ref, edge, cloud = setup
    cfg = FailoverConfig(deadline_s=2.0, cloud_timeout_s=0.5, attempts=2, failures_to_trip=5)
    c = cloud(fail_always=True)
    orch = _orch(model, edge(), c, cfg)
    t0 = time.monotonic()
    ans = asyncio.run(orch.answer(x, VERSION))
    assert time.monotonic() - t0 < 1.0
    _assert_degraded(ans, ref, edge_ref)
    assert len(c.calls) == cfg.attempts  # retried once, then degraded
    assert orch.views["cloud"].failures == 2 and orch.views["edge"].failures == 0


def test_cloud_hanging_degrades_within_the_deadline(setup):
    model, x, _, ref, edge_ref, edge, cloud = setup
    cfg = FailoverConfig(deadline_s=0.6, edge_timeout_s=0.5, cloud_timeout_s=0.15, attempts=3, failures_to_trip=10)
    c = cloud(hang_s=5.0)
    orch = _orch(model, edge(), c, cfg)
    t0 = time.monotonic()
    ans = asyncio.run(orch.answer(x, VERSION))
    elapsed = time.monotonic() - t0
    assert elapsed < cfg.deadline_s + 0.25
    assert elapsed >= 3 * 0.15 - 0.02  # three timed-out attempts
    assert len(c.calls) == 3
    _assert_degraded(ans, ref, edge_ref)


def test_cloud_hanging_past_the_deadline_is_cut_at_the_deadline(setup):
    # the cloud timeout is longer than what is left of the deadline: the call gets only the rest
    model, x, _, ref, edge_ref, edge, cloud = setup
    cfg = FailoverConfig(deadline_s=0.3, edge_timeout_s=0.5, cloud_timeout_s=5.0, attempts=2, failures_to_trip=10)
    orch = _orch(model, edge(), cloud(hang_s=10.0), cfg)
    t0 = time.monotonic()
    ans = asyncio.run(orch.answer(x, VERSION))
    assert time.monotonic() - t0 < cfg.deadline_s + 0.25
    _assert_degraded(ans, ref, edge_ref)


def test_edge_down_goes_cloud_direct(setup):
    model, x, _, ref, _, edge, cloud = setup
    e, c = edge(fail_always=True), cloud()
    cfg = FailoverConfig(attempts=2, failures_to_trip=5)
    orch = _orch(model, e, c, cfg)
    ans = asyncio.run(orch.answer(x, VERSION))
    _check_shapes(ans)
    assert ans.path == "cloud_direct"
    assert ans.tier == ["cloud"] * N and not ans.degraded.any() and ans.escalated == 0
    assert len(e.calls) == 2 and len(c.calls) == 1
    assert c.calls[0].start == 0 and torch.equal(c.calls[0].inp.h, x)
    # the cloud ran the whole model with the same rule: forward_exits exactly
    assert torch.equal(ans.logits, ref.logits) and torch.equal(ans.exit_index, ref.exit_index)
    assert set(ans.macs) == {"cloud"} and torch.equal(ans.macs["cloud"], ref.macs)


def test_one_edge_failure_then_success_is_retried(setup):
    model, x, _, ref, _, edge, cloud = setup
    e, c = edge(fail=1), cloud()
    cfg = FailoverConfig(attempts=2, failures_to_trip=2)
    orch = _orch(model, e, c, cfg)
    ans = asyncio.run(orch.answer(x, VERSION))
    assert len(e.calls) == 2  # attempts: the failure and the retry
    assert ans.path == "edge_first" and not ans.degraded.any()
    assert torch.equal(ans.logits, ref.logits) and torch.equal(ans.exit_index, ref.exit_index)
    assert orch.views["edge"].failures == 0 and orch.views["edge"].down_until == 0.0
    assert len(c.calls) == 1 and c.calls[0].start == EDGE_STAGES


def test_both_tiers_failing_raises(setup):
    model, x, _, _, _, edge, cloud = setup
    e, c = edge(fail_always=True), cloud(fail_always=True)
    orch = _orch(model, e, c, FailoverConfig(attempts=2, failures_to_trip=5))
    with pytest.raises(NoDeviceAvailable):
        asyncio.run(orch.answer(x, VERSION))
    assert len(e.calls) == 2 and len(c.calls) == 2


def test_circuit_breaker_skips_a_tripped_edge_until_cooldown(setup):
    model, x, _, _, _, edge, cloud = setup
    clock = Clock()
    cfg = FailoverConfig(attempts=2, failures_to_trip=2, cooldown_s=10.0)
    e, c = edge(fail_always=True), cloud()
    orch = _orch(model, e, c, cfg, clock=clock)

    ans = asyncio.run(orch.answer(x, VERSION))  # two edge failures trip the breaker
    assert ans.path == "cloud_direct" and len(e.calls) == 2
    view = orch.views["edge"]
    assert view.failures == 2 and view.down_until == clock.t + 10.0
    assert not view.available(clock.t) and view.loads == {}

    clock.t += 9.9  # still cooling down: the edge is not even tried
    assert orch.choose_path() == "cloud_direct"
    assert [est.path for est in orch.estimates()] == ["cloud_direct"]
    ans = asyncio.run(orch.answer(x, VERSION))
    assert ans.path == "cloud_direct" and len(e.calls) == 2 and len(c.calls) == 2

    clock.t += 0.1  # cooled down: tried again; one more failure trips it again at once
    assert view.available(clock.t) and orch.choose_path() == "edge_first"
    ans = asyncio.run(orch.answer(x, VERSION))
    assert ans.path == "cloud_direct" and len(e.calls) == 3
    assert view.down_until == clock.t + 10.0

    # the edge recovers: after the cooldown a success closes the breaker
    clock.t += 10.0
    e.fail_always = False
    ans = asyncio.run(orch.answer(x, VERSION))
    assert ans.path == "edge_first" and len(e.calls) == 4
    assert view.failures == 0 and view.available(clock.t)


def test_circuit_breaker_on_the_cloud_answers_degraded_without_calling_it(setup):
    model, x, _, ref, edge_ref, edge, cloud = setup
    clock = Clock()
    cfg = FailoverConfig(attempts=2, failures_to_trip=2, cooldown_s=5.0)
    c = cloud(fail_always=True)
    orch = _orch(model, edge(), c, cfg, clock=clock)
    _assert_degraded(asyncio.run(orch.answer(x, VERSION)), ref, edge_ref)
    assert len(c.calls) == 2 and not orch.views["cloud"].available(clock.t)
    _assert_degraded(asyncio.run(orch.answer(x, VERSION)), ref, edge_ref)
    assert len(c.calls) == 2  # skipped while tripped
    clock.t += 5.0
    c.fail_always = False
    ans = asyncio.run(orch.answer(x, VERSION))
    assert not ans.degraded.any() and len(c.calls) == 3
    assert torch.equal(ans.logits, ref.logits)


def test_tier_view_failure_counting():
    cfg = FailoverConfig(failures_to_trip=3, cooldown_s=2.0)
    v = TierView("edge")
    v.failure(10.0, cfg)
    v.failure(10.5, cfg)
    assert v.available(10.5) and v.failures == 2
    v.failure(11.0, cfg)
    assert not v.available(12.9) and v.available(13.0)


def test_only_a_cloud_tier(setup):
    model, x, _, ref, _, _, cloud = setup
    c = cloud()
    orch = _orch(model, None, c)
    assert orch.choose_path() == "cloud_direct"
    ans = asyncio.run(orch.answer(x, VERSION))
    assert ans.path == "cloud_direct" and ans.tier == ["cloud"] * N
    assert torch.equal(ans.logits, ref.logits)
    c.fail_always = True
    with pytest.raises(NoDeviceAvailable):
        asyncio.run(orch.answer(x, VERSION))


def test_only_an_edge_tier(setup):
    model, x, _, ref, edge_ref, edge, _ = setup
    e = edge()
    orch = _orch(model, e, None)
    assert orch.choose_path() == "edge_first"
    ans = asyncio.run(orch.answer(x, VERSION))
    _assert_degraded(ans, ref, edge_ref)  # nowhere to escalate: degraded at exit 1
    e.fail_always = True
    with pytest.raises(NoDeviceAvailable):
        asyncio.run(orch.answer(x, VERSION))


def test_no_tier_at_all_is_a_config_error(tiny_cnn):
    with pytest.raises(ConfigError):
        _orch(tiny_cnn, None, None)


def test_both_hanging_raises_at_the_deadline(setup):
    model, x, _, _, _, edge, cloud = setup
    cfg = FailoverConfig(deadline_s=0.5, edge_timeout_s=0.2, cloud_timeout_s=0.2, attempts=2, failures_to_trip=10)
    e, c = edge(hang_s=10.0), cloud(hang_s=10.0)
    orch = _orch(model, e, c, cfg)
    t0 = time.monotonic()
    with pytest.raises(NoDeviceAvailable):
        asyncio.run(orch.answer(x, VERSION))
    elapsed = time.monotonic() - t0
    assert cfg.deadline_s - 0.05 <= elapsed < cfg.deadline_s + 0.25
    assert len(e.calls) == 2 and len(c.calls) >= 1


@dataclass(frozen=True)
class _ForceCloud:
    name: str = "force-cloud"

    def choose_path(self, estimates):
        return next(e for e in estimates if e.path == "cloud_direct")

    def rank_replicas(self, loads):
        return []


def test_cloud_direct_failing_falls_back_to_the_edge(setup):
    model, x, _, ref, edge_ref, edge, cloud = setup
    e, c = edge(), cloud(fail_always=True)
    orch = _orch(model, e, c, FailoverConfig(attempts=2, failures_to_trip=2), policy=_ForceCloud())
    assert orch.choose_path() == "cloud_direct"
    ans = asyncio.run(orch.answer(x, VERSION))
    # the cloud tripped on the direct attempt, so escalations are answered degraded
    assert len(c.calls) == 2 and len(e.calls) == 1
    _assert_degraded(ans, ref, edge_ref)


def test_policy_estimates_drive_the_path(setup):
    model, *_ = setup
    orch = _orch(model, lambda r: None, lambda r: None)
    ests = {e.path: e for e in orch.estimates()}
    assert set(ests) == {"edge_first", "cloud_direct"}
    assert all(isinstance(e, PathEstimate) for e in ests.values())
    # the tiny model is cheap: the edge's short round trip wins on latency
    assert ests["edge_first"].latency_ms < ests["cloud_direct"].latency_ms


@pytest.mark.parametrize("bad", [{"deadline_s": 0}, {"edge_timeout_s": -1}, {"cloud_timeout_s": 0}, {"cooldown_s": 0}, {"attempts": 0}, {"failures_to_trip": 0}])
def test_failover_config_validation(bad):
    with pytest.raises(ConfigError):
        FailoverConfig(**bad)


def test_a_tier_reporting_only_unhealthy_replicas_is_not_chosen(tiny_cnn):
    from dynray.serving.scheduling import LoadReport

    orch = _orch(tiny_cnn, lambda r: None, lambda r: None)
    orch.views["edge"].loads["edge-0"] = LoadReport(replica="edge-0", profile=EDGE_PROFILE, in_flight=0, queue_len=0, ewma_service_ms=0.0, healthy=False)
    assert [e.path for e in orch.estimates()] == ["cloud_direct"]
    assert orch.choose_path() == "cloud_direct"


def test_router_load_is_relative_to_each_tiers_normal(setup):
    """The router sees nominal * (call-time EWMA / lowest EWMA seen): constant serving
    overhead cancels, a tier that gets 5x slower reads as 5x its nominal call time."""
    model, x, rule, ref, edge_ref, edge, cloud = setup
    clock = Clock()
    e, c = edge(), cloud()

    async def timed(dev, ms):
        async def call(req):
            clock.t += ms / 1000  # the call takes `ms` on the orchestrator's clock
            return await dev(req)
        return call

    async def run(cloud_ms: float, n: int):
        orch.calls = {"edge": await timed(e, 30.0), "cloud": await timed(c, cloud_ms)}
        for _ in range(n):
            await orch.answer(x, VERSION)

    orch = _orch(model, e, c, clock=clock)
    nominal = {"edge": 6.0, "cloud": 45.0}
    assert orch.load_snapshot(nominal).cloud_ms == 45.0  # no calls yet: nominal
    asyncio.run(run(80.0, 20))  # a serving stack that adds overhead: every cloud call takes 80 ms
    steady = orch.load_snapshot(nominal)
    assert steady.edge_ms == pytest.approx(6.0, rel=0.02) and steady.cloud_ms == pytest.approx(45.0, rel=0.02)
    assert orch.load_snapshot().cloud_ms == pytest.approx(80.0, rel=0.02)  # raw EWMA without nominal
    asyncio.run(run(400.0, 20))  # the cloud gets 5x slower
    assert orch.load_snapshot(nominal).cloud_ms == pytest.approx(5 * 45.0, rel=0.05)


# -- device errors: tier failure, refusal, client error ---------------------------------------------


def _ray_task_error(cause: BaseException) -> BaseException:
    """What a Serve handle raises when the replica's code raised ``cause``: RayTaskError(<cause>)."""
    from ray.exceptions import RayTaskError

    return RayTaskError("Device.run", "Traceback: ...", cause, proctitle="ray::ServeReplica", pid=1, ip="127.0.0.1").as_instanceof_cause()


def _tier_failures() -> list[BaseException]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

    return [
        ActorDiedError(), RayActorError(), ActorUnavailableError("restarting", None), GetTimeoutError(), TimeoutError(), asyncio.TimeoutError(),
        RequestCancelledError("r1"), DeploymentUnavailableError(DeploymentID(name="Edge", app_name="dynray")), BackPressureError(num_queued_requests=9, max_queued_requests=8),
        _ray_task_error(ActorDiedError()),  # a dead replica seen through another deployment
        RuntimeError("CUDA error inside the device"),  # a crash in the device's own code: the tier does not answer
        ConnectionResetError(),
    ]


def test_ray_failures_are_tier_failures_and_device_refusals_are_not():
    for e in _tier_failures():
        assert classify_error(e) is ErrorKind.TIER and is_tier_failure(e), repr(e)
    hosted = RegistryError("this device does not host the requested version", got="m:v9", fix="roll it out first")
    stage = ServingError("this device does not host the requested stage", got=(3, 0, 2))
    for e in (hosted, stage, _ray_task_error(hosted), _ray_task_error(stage)):
        assert classify_error(e) is ErrorKind.REFUSED and not is_tier_failure(e), repr(e)
    bad = RequestError("too big", status=413)
    assert classify_error(bad) is ErrorKind.CLIENT and classify_error(_ray_task_error(bad)) is ErrorKind.CLIENT


def test_a_version_not_hosted_is_not_retried_and_never_trips_the_breaker(setup):
    model, x, _, ref, _, edge, cloud = setup
    refuse = lambda: _ray_task_error(RegistryError("this device does not host the requested version", got=VERSION, fix="roll the version out first"))  # noqa: E731
    e, c = edge(fail_always=True, error=refuse), cloud()
    orch = _orch(model, e, c, FailoverConfig(attempts=2, failures_to_trip=1))
    for i in range(4):
        ans = asyncio.run(orch.answer(x, VERSION))
        assert ans.path == "cloud_direct" and torch.equal(ans.logits, ref.logits)  # the cloud hosts it: answered there
        assert len(e.calls) == i + 1  # asked once per request (a retry would be refused again) and never skipped
        assert orch.views["edge"].failures == 0 and orch.views["edge"].available(time.monotonic()) and ans.device_failures == 0
    c.fail_always, c.error = True, refuse
    with pytest.raises(NoDeviceAvailable, match="does not host the requested version"):
        asyncio.run(orch.answer(x, VERSION))
    assert orch.views["cloud"].failures == 0


def test_a_request_error_from_a_device_is_the_clients_4xx(setup):
    model, x, _, _, _, edge, cloud = setup
    e = edge(fail_always=True, error=lambda: _ray_task_error(RequestError("too many samples for this device", status=413, fix="send fewer")))
    orch = _orch(model, e, cloud(), FailoverConfig(attempts=2, failures_to_trip=1))
    with pytest.raises(RequestError) as err:
        asyncio.run(orch.answer(x, VERSION))
    assert err.value.status == 413 and type(err.value) is RequestError and len(e.calls) == 1
    assert orch.views["edge"].failures == 0


def test_failures_in_flight_together_count_once():
    cfg = FailoverConfig(failures_to_trip=2, cooldown_s=1.0)
    v = TierView("edge")
    for started in (0.1, 0.5, 0.9, 0.99):  # sent before the first failure was seen at 1.0
        v.failure(1.0 if started == 0.1 else 1.2, cfg, started=started)
    assert v.failures == 1 and v.available(1.2)
    assert v.failure(2.0, cfg, started=1.5)  # sent after a failure was seen: new evidence
    assert v.failures == 2 and not v.available(2.5) and v.available(3.0)


def test_a_coalesced_batch_failing_counts_one_failure_not_one_per_request(setup):
    """8 requests share one device call (the ingress's coalescing); it fails once. With a
    breaker that trips at 2, counting per request would skip the edge for the retries."""
    model, x, _, ref, _, edge, cloud = setup
    e, c = edge(), cloud()
    first: list[asyncio.Future] = []

    async def coalesced(req):
        if len(first) < 8:  # the first 8 requests are one batch: one call, one failure for all
            fut = asyncio.get_running_loop().create_future()
            first.append(fut)
            if len(first) == 8:
                await asyncio.sleep(0.01)
                err = RuntimeError("edge replica died")
                for f in first:
                    f.set_exception(err)
            return await fut
        return await e(req)

    orch = _orch(model, coalesced, c, FailoverConfig(attempts=2, failures_to_trip=2, cooldown_s=10.0))

    async def run():
        return await asyncio.gather(*(orch.answer(x, VERSION) for _ in range(8)))

    answers = asyncio.run(run())
    assert [a.path for a in answers] == ["edge_first"] * 8  # every retry went to the edge again
    assert all(a.device_failures == 1 and a.failed_calls == {"edge": 1} and torch.equal(a.logits, ref.logits) for a in answers)
    assert len(e.calls) == 8 and orch.views["edge"].failures == 0
