"""Label feedback (POST /v1/feedback): the hybrid's trace, the book, and the ingress end to end.

The end-to-end tests run the real path without Ray: IngressCore -> Orchestrator -> devices that
run the model's stages with the real hybrid stop rule (``make_rule``). Labels are the full
network's own answers, so the thresholds (set here to never stop early) are always right and
a policy that stops everything at the first exit is wrong wherever that exit disagrees.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
import torch

from dynray.errors import RequestError
from dynray.routing.features import obs_dim
from dynray.routing.hybrid import HybridConfig, HybridRouter
from dynray.routing.policy import PolicyNet
from dynray.routing.rules import POLICY_STOPPED_EARLY, POLICY_WENT_DEEPER, RULES_ANSWER, RouteContext, make_rule
from dynray.serving import metrics as M
from dynray.serving.config import AppArgs
from dynray.serving.failover import FailoverConfig, Orchestrator
from dynray.serving.feedback import AnswerRecord, FeedbackBook, FeedbackConfig, SharedFeedback, book_label, exit_costs
from dynray.serving.ingress import IngressCore, ServedPlan
from dynray.serving.partition import DeviceReply, StageInput, StageRange, range_macs, run_stages
from dynray.serving.payload import PayloadLimits, encode_array
from dynray.serving.scheduling import CLOUD_PROFILE, EDGE_PROFILE, LatencyPolicy, LoadTracker
from dynray.serving.split import TrafficSplit
from dynray.thresholds import ThresholdRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VERSION = "tiny:v1"
NEVER, ALWAYS = 2.0, -10.0  # thresholds: never stop early / stop at the first exit


def _policy(action: int, num_exits: int = 3) -> PolicyNet:
    """A policy that always proposes ``action`` with probability ~0.987."""
    net = PolicyNet([obs_dim(num_exits), 3])
    with torch.no_grad():
        lin = net.linears()[0]
        lin.weight.zero_()
        lin.bias.zero_()
        lin.bias[action] = 5.0
    return net.eval()


def _rule(tau: float) -> ThresholdRule:
    return ThresholdRule(thresholds=(tau, tau))


# -- the hybrid's trace ----------------------------------------------------------------------
@pytest.mark.parametrize("policy_action, tau, override", [(0, NEVER, POLICY_STOPPED_EARLY), (1, ALWAYS, POLICY_WENT_DEEPER), (0, ALWAYS, RULES_ANSWER)])
def test_the_hybrid_rule_traces_where_the_policy_overrode_the_rules(tiny_cnn, policy_action, tau, override):
    x = torch.rand(6, 1, 28, 28)
    rule, policy = _rule(tau), _policy(policy_action)
    stop_rule = make_rule(RouteContext("hybrid"), rule, policy, HybridRouter(policy, rule), num_exits=3, on_cloud=False)
    res = run_stages(tiny_cnn, StageRange(start=0, stop=3), StageInput(h=x), stop_rule)
    t = res.route_trace
    assert t is not None and t.override.tolist() == [override] * 6
    if override == POLICY_WENT_DEEPER:  # the rules' answer is the first exit's, computed on the way
        with torch.no_grad():
            first = tiny_cnn(x)[0]
        assert t.rule_exit.tolist() == [0] * 6 and res.exit_index.tolist() == [2] * 6
        assert t.rule_pred.tolist() == first.argmax(dim=1).tolist()
    else:
        assert t.rule_exit.tolist() == [-1] * 6
    # trust 0 from the ingress: the policy never decides, the answer is the rules'
    off = make_rule(RouteContext("hybrid", rl_weight=0.0), rule, policy, HybridRouter(policy, rule), num_exits=3, on_cloud=False)
    assert run_stages(tiny_cnn, StageRange(start=0, stop=3), StageInput(h=x), off).route_trace.override.tolist() == [RULES_ANSWER] * 6


# -- the book ----------------------------------------------------------------------------------
def _record(rid: str, *, override=(), rule_exit=(), rule_pred=(), exit=(0,), pred=(3,), router="hybrid", at: float | None = None) -> AnswerRecord:
    n = len(exit)
    return AnswerRecord(request_id=rid, version=VERSION, router=router, exit=exit, pred=pred, degraded=(False,) * n, override=override,
                        rule_exit=rule_exit, rule_pred=rule_pred, num_classes=10, exit_cost=(0.1, 0.4, 2.0), lambda_cost=0.01,
                        reference_accuracy=0.98, at=time.time() if at is None else at)


def test_every_bad_label_gets_its_4xx():
    now = [100.0]
    book = FeedbackBook(FeedbackConfig(ttl_s=60), clock=lambda: now[0])
    book.add([_record("a", at=100.0), _record("b", exit=(0, 1), pred=(1, 2), at=100.0)])
    with pytest.raises(RequestError) as e:
        book.label("nope", [3])
    assert e.value.status == 404
    for labels in ([10], [-1], [3, 3]):  # out of range; one label too many for a one-sample answer
        with pytest.raises(RequestError) as e:
            book.label("a", labels)
        assert e.value.status == 422, labels
    assert book.label("a", [3]).correct == (True,)
    with pytest.raises(RequestError) as e:
        book.label("a", [3])  # a second label for the same answer
    assert e.value.status == 409
    now[0] = 200.0  # past the 60 s window: "b" is gone
    with pytest.raises(RequestError) as e:
        book.label("b", [1, 2])
    assert e.value.status == 404


@pytest.mark.parametrize("policy_right, direction", [(False, -1), (True, +1)])
def test_labels_move_rl_weight_towards_whoever_was_right(policy_right, direction):
    """Policy stopped early (the rules' answer is estimated from the prior) and policy went deeper (exact)."""
    for kind in ("early", "deeper"):
        book = FeedbackBook(FeedbackConfig(prior_samples=20), HybridConfig(rl_weight=0.5))
        for i in range(20):
            if kind == "early":  # the policy answered at exit 0; the rules would have gone on (98% right, by the prior)
                rec = _record(f"r{i}", override=(POLICY_STOPPED_EARLY,), rule_exit=(-1,), rule_pred=(-1,), exit=(0,), pred=(3,))
            else:  # the policy went on to exit 2; the rules would have answered 5 at exit 0
                rec = _record(f"r{i}", override=(POLICY_WENT_DEEPER,), rule_exit=(0,), rule_pred=(5,), exit=(2,), pred=(3,))
            book.add([rec])
            got = book.label(f"r{i}", [3 if policy_right else 7 if kind == "early" else 5])
            assert got.evidence == 1
        w = book.weights()[VERSION]
        assert (w - 0.5) * direction > 0.2, (kind, w)


def test_answers_the_policy_did_not_touch_move_nothing_but_count_for_live_accuracy():
    book = FeedbackBook(hybrid=HybridConfig(rl_weight=0.5))
    book.add([_record("x", override=(RULES_ANSWER,), rule_exit=(-1,), rule_pred=(-1,)), _record("y", router="thresholds")])
    assert book.label("x", [3]).evidence == 0 and book.label("y", [4]).rl_weight is None
    assert book.weights()[VERSION] == 0.5
    assert book.accuracy()[VERSION]["0"] == {"accuracy": 0.5, "window": 2, "labels": 2}


def test_a_label_for_another_replicas_answer_waits_for_its_sync():
    """SharedFeedback: 404 once, then asked again after about one sync period."""
    shared_book = FeedbackBook()
    late = [_record("other")]  # another replica's answer, not yet synced
    calls = []

    async def send(rid, labels, records):
        calls.append((rid, len(records)))
        if len(calls) == 2:  # the other replica synced meanwhile
            shared_book.add(late)
        return book_label(shared_book, rid, labels, records)

    fb = SharedFeedback(send, retry_s=0.01)
    fb.remember(_record("mine"))
    done = asyncio.run(fb.label("other", [3]))
    assert done.correct == (True,) and calls == [("other", 1), ("other", 0)]  # own pending records went with the first try
    assert asyncio.run(fb.label("mine", [3])).correct == (True,)
    with pytest.raises(RequestError) as e:
        asyncio.run(fb.label("never", [3]))
    assert e.value.status == 404 and len(calls) == 5


# -- end to end through the ingress -----------------------------------------------------------
def _device(model, tier: str, stop: int, rule: ThresholdRule, policy: PolicyNet):
    hybrid = HybridRouter(policy, rule, HybridConfig())

    async def call(req) -> DeviceReply:
        stop_rule = make_rule(req.route, rule, policy, hybrid, num_exits=model.num_exits, on_cloud=tier == "cloud")
        res = run_stages(model, StageRange(start=req.start, stop=stop), req.inp, stop_rule)
        profile = EDGE_PROFILE if tier == "edge" else CLOUD_PROFILE
        return DeviceReply(result=res, tier=tier, replica=f"{tier}-0", load=LoadTracker().report(f"{tier}-0", profile).to_dict(), ms_per_mmac=1.0)

    return call


def _plan(model, rule: ThresholdRule, policy: PolicyNet) -> ServedPlan:
    profiles = {"edge": EDGE_PROFILE, "cloud": CLOUD_PROFILE}
    orch = Orchestrator(FailoverConfig(), LatencyPolicy(), edge=_device(model, "edge", rule=rule, policy=policy, stop=2),
                        cloud=_device(model, "cloud", rule=rule, policy=policy, stop=model.num_exits), edge_stages=2,
                        edge_macs=range_macs(model, StageRange(start=0, stop=2)), cloud_rest_macs=range_macs(model, StageRange(start=2, stop=model.num_exits)),
                        full_macs=model.mac_profile.full, profiles=profiles)
    p = model.mac_profile
    return ServedPlan(split=TrafficSplit.of([VERSION], None), limits=PayloadLimits(input_shape=tuple(model.cfg.input_shape), max_body_bytes=1 << 20),
                      orch=orch, profiles=profiles, routers={VERSION: "tiny-router:v1"},
                      exit_costs={VERSION: exit_costs(p.stage, p.exit, 2, {"edge": 1.0, "cloud": 4.0})}, reference_accuracy={VERSION: 0.98})


async def _body(data: bytes):
    yield data


def _post(coro_fn, payload: dict, **headers: str):
    hdrs = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return asyncio.run(coro_fn(_body(json.dumps(payload).encode()), hdrs))


def _stream(core: IngressCore, model, requests: int, *, seed: int = 0) -> list[float]:
    """Predict with the hybrid, label with the full network's answer; the accuracy of each request."""
    g = torch.Generator().manual_seed(seed)
    acc = []
    for i in range(requests):
        x = torch.rand(4, 1, 28, 28, generator=g)
        with torch.no_grad():
            truth = model(x)[-1].argmax(dim=1).tolist()
        r = _post(core.predict, {**encode_array(x), "router": "hybrid"}, x_request_id=f"q{seed}-{i}")
        assert r.status == 200, r.body
        acc.append(sum(p == y for p, y in zip(r.body["predictions"], truth, strict=True)) / 4)
        f = _post(core.label, {"request_id": f"q{seed}-{i}", "labels": truth})
        assert f.status == 200, f.body
    return acc


def test_a_wrong_policy_loses_the_ingress_trust_and_accuracy_recovers(tiny_cnn):
    """The policy stops everything at exit 0; the rules (never stop early) are always right."""
    core = IngressCore(AppArgs.model_validate({"router": {"kind": "hybrid"}}), M.MemoryMetrics(), tiers=("edge", "cloud"))
    core.configure(_plan(tiny_cnn, _rule(NEVER), _policy(0)))
    acc = _stream(core, tiny_cnn, 60)
    w = core.feedback.weight(VERSION)
    assert w is not None and w < 0.15, w  # from 0.8: the policy (p = 0.987) no longer passes 0.9 + (1 - w) * 0.1
    assert sum(acc[:10]) / 10 < 0.8 and acc[-10:] == [1.0] * 10, acc
    # what the metrics and /v1/models show
    assert core.metrics.gauges[(M.RL_WEIGHT, ((M.TAG_VERSION, VERSION),))] == pytest.approx(w)
    assert core.metrics.count(M.FEEDBACK_LABELS, model_version=VERSION, exit="2", result="correct") > 0
    assert core.metrics.count(M.FEEDBACK_LABELS, model_version=VERSION, exit="0", result="wrong") > 0
    status = asyncio.run(core.models()).body["feedback"]
    assert status["rl_weight"][VERSION] == pytest.approx(w) and status["accuracy"][VERSION]["2"]["accuracy"] == 1.0


def test_a_right_policy_gains_trust_through_the_ingress(tiny_cnn):
    """The policy goes on to the last exit (the truth here); the rules would stop at exit 0."""
    core = IngressCore(AppArgs.model_validate({"router": {"kind": "hybrid"}}), M.MemoryMetrics(), tiers=("edge", "cloud"))
    core.configure(_plan(tiny_cnn, _rule(ALWAYS), _policy(1)))
    _stream(core, tiny_cnn, 15)
    assert core.feedback.weight(VERSION) > 0.95


@pytest.mark.parametrize("payload, status", [
    ({"request_id": "unknown", "label": 1}, 404),
    ({"request_id": "seen", "labels": [10, 0, 0, 0]}, 422),  # class 10 of 10
    ({"request_id": "seen", "label": 1}, 422),  # one label for a four-image request
    ({"request_id": "seen", "labels": [1, 2, 3]}, 422),
    ({"request_id": "seen", "labels": [True, 0, 0, 0]}, 422),
    ({"request_id": "seen"}, 422),
    ({"label": 1}, 422),
    ({"request_id": "seen", "labels": [1, 2, 3, 4], "extra": 1}, 422),
])
def test_every_bad_feedback_request_gets_its_4xx_over_the_ingress(tiny_cnn, payload, status):
    core = IngressCore(AppArgs(), M.MemoryMetrics(), tiers=("edge", "cloud"))
    core.configure(_plan(tiny_cnn, _rule(NEVER), _policy(0)))
    assert _post(core.predict, encode_array(torch.rand(4, 1, 28, 28)), x_request_id="seen").status == 200
    r = _post(core.label, payload)
    assert r.status == status and r.body["error"], r.body
    assert core.metrics.count(M.REJECTED, status=str(status)) == 1


def test_a_repeated_or_malformed_label_over_the_ingress(tiny_cnn):
    core = IngressCore(AppArgs(), M.MemoryMetrics(), tiers=("edge", "cloud"))
    core.configure(_plan(tiny_cnn, _rule(NEVER), _policy(0)))
    assert _post(core.predict, encode_array(torch.rand(1, 1, 28, 28)), x_request_id="one").status == 200
    assert _post(core.label, {"request_id": "one", "label": 4}).status == 200
    assert _post(core.label, {"request_id": "one", "label": 4}).status == 409
    bad = asyncio.run(core.label(_body(b"{not json"), {"content-type": "application/json"}))
    assert bad.status == 400
    off = IngressCore(AppArgs.model_validate({"feedback": {"enabled": False}}), M.MemoryMetrics(), tiers=("edge", "cloud"))
    off.configure(replace(_plan(tiny_cnn, _rule(NEVER), _policy(0))))
    assert _post(off.label, {"request_id": "one", "label": 4}).status == 404
