"""run_stages: a stage range of a DynamicNet, continuations, full mode, batching helpers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from dynray.errors import ConfigError
from dynray.models import StopAtExit
from dynray.serving.partition import DeviceReply, DeviceRequest, StageInput, StageRange, StageResult, concat_inputs, group_requests, range_macs, run_stages, split_reply, split_result
from dynray.thresholds import ThresholdRule

N = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(model, n: int = N, seed: int = 1) -> torch.Tensor:
    """Images of very different contrast, so confidence and complexity spread out."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.02, 1.0, n).view(n, 1, 1, 1)
    return torch.rand(n, *model.cfg.input_shape, generator=g) * scale


@torch.no_grad()
def _mid_gap(scores: torch.Tensor) -> float:
    """A threshold in the widest gap of the middle half of ``scores``.

    Splits the samples roughly in two, and sits far (relative to float noise) from every
    score, so a tiny batch-size-dependent difference in the logits cannot flip a decision.
    """
    s = scores.double().sort().values
    n = s.numel()
    lo, hi = max(n // 4, 1), max(3 * n // 4, 2)
    gaps = s[lo:hi] - s[lo - 1 : hi - 1]
    i = int(gaps.argmax()) + lo
    assert float(gaps.max()) > 1e-6, "scores too close together to place a robust threshold"
    return float((s[i - 1] + s[i]) / 2)


@torch.no_grad()
def _fit(rule: ThresholdRule, model, x: torch.Tensor) -> ThresholdRule:
    """Set each threshold in the middle of the scores of the samples that reach that exit."""
    outs = model(x)
    cx = model.complexity(x)
    keep = torch.arange(x.shape[0])
    taus: list[float] = []
    prev = None
    for k in range(model.num_exits - 1):
        logits = outs[k][keep]
        score = rule.score(k, logits, cx[keep], None if prev is None else prev[keep])
        tau = _mid_gap(score)
        taus.append(tau)
        prev = outs[k].argmax(dim=1)
        keep = keep[score < tau]
    return replace(rule, thresholds=tuple(taus))


@dataclass(frozen=True)
class DensityRule:
    """A custom rule reading a complexity feature (no ``uses_complexity`` attribute: counts as True)."""

    cut: float

    def stop(self, k, logits, complexity, prev_pred=None):
        # exit 0: low-density images leave; exit 1: the rest leave by the parity of their confidence
        if k == 0:
            return complexity[:, 2] < self.cut
        return _conf_parity(logits) == 0


def _conf_parity(logits: torch.Tensor) -> torch.Tensor:
    """Parity of the 5th decimal of the max-softmax: a pseudo-random split of the samples."""
    return (F.softmax(logits, dim=1).amax(dim=1) * 1e5).floor().to(torch.int64) % 2


@dataclass(frozen=True)
class ParityRule:
    """A custom rule without complexity: stop by the parity of the confidence (exact-equality tests only)."""

    uses_complexity = False

    def stop(self, k, logits, complexity, prev_pred=None):
        assert complexity.shape == (logits.shape[0], 0)
        return _conf_parity(logits) == k % 2


_TEMPLATES = {
    "confidence": ThresholdRule(thresholds=(0.0, 0.0)),
    "margin+agreement": ThresholdRule(thresholds=(0.0, 0.0), confidence="margin", agreement_bonus=1e-3),
    "complexity": ThresholdRule(thresholds=(0.0, 0.0), complexity_weight=1.0),
    "complexity+agreement": ThresholdRule(thresholds=(0.0, 0.0), confidence="entropy", complexity_weight=0.5, agreement_bonus=0.01),
}


def _rule(model, x, name: str):
    """The named stop rule, with thresholds fitted to ``x`` so that every exit gets samples."""
    if name == "density":
        return DensityRule(cut=_mid_gap(model.complexity(x)[:, 2]))
    if name == "parity":
        return ParityRule()
    return _fit(_TEMPLATES[name], model, x)


RULE_NAMES = ["confidence", "margin+agreement", "complexity", "complexity+agreement", "density", "parity"]


def _split_run(model, x, rule, k: int) -> tuple[StageResult, StageResult | None]:
    edge = run_stages(model, StageRange(start=0, stop=k), StageInput(h=x), rule)
    cloud = None
    if edge.cont_input is not None:
        cloud = run_stages(model, StageRange(start=k, stop=model.num_exits), edge.cont_input, rule)
    return edge, cloud


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("name", RULE_NAMES)
def test_edge_then_cloud_reproduces_forward_exits(tiny_cnn, name, split):
    model = tiny_cnn
    x = _images(model)
    rule = _rule(model, x, name)
    ref = model.forward_exits(x, rule)
    # the rule must really split the batch at every exit, or the test proves little
    counts = torch.bincount(ref.exit_index, minlength=model.num_exits)
    assert (counts > 0).all(), f"{name}: exit counts {counts.tolist()}"

    edge, cloud = _split_run(model, x, rule, split)
    assert cloud is not None
    logits = torch.full_like(ref.logits, float("nan"))
    exit_index = torch.full((N,), -1, dtype=torch.int64)
    logits[edge.done] = edge.logits
    exit_index[edge.done] = edge.exit_index
    cont = edge.cont
    logits[cont[cloud.done]] = cloud.logits
    exit_index[cont[cloud.done]] = cloud.exit_index
    assert cloud.cont.numel() == 0 and cloud.cont_input is None and cloud.cont_exit == -1
    assert torch.equal(logits, ref.logits)  # bit for bit: max abs diff 0
    assert (logits - ref.logits).abs().max().item() == 0.0
    assert torch.equal(exit_index, ref.exit_index)
    # every sample answered exactly once
    assert sorted(torch.cat([edge.done, cont[cloud.done]]).tolist()) == list(range(N))
    assert set(edge.done.tolist()).isdisjoint(cont.tolist())
    assert (edge.exit_index < split).all() and (cloud.exit_index >= split).all()

    macs = edge.macs.clone()
    macs[cont] += cloud.macs
    assert macs.dtype == torch.int64
    assert torch.equal(macs, ref.macs)
    assert cloud.batch_size == cont.numel() and edge.batch_size == N
    # the compaction trace of the two devices together is forward_exits's
    assert edge.stage_batch + cloud.stage_batch == ref.stage_batch


def test_whole_model_on_one_device_equals_forward_exits(tiny_cnn):
    x = _images(tiny_cnn)
    rule = _rule(tiny_cnn, x, "complexity")
    ref = tiny_cnn.forward_exits(x, rule)
    res = run_stages(tiny_cnn, StageRange(start=0, stop=3), StageInput(h=x), rule)
    assert res.cont.numel() == 0 and res.cont_input is None and res.cont_exit == -1
    assert res.cont_logits.shape == (0, tiny_cnn.cfg.num_classes)
    order = res.done.argsort()
    assert torch.equal(res.done[order], torch.arange(N))
    assert torch.equal(res.logits[order], ref.logits)
    assert torch.equal(res.exit_index[order], ref.exit_index)
    assert torch.equal(res.macs, ref.macs)


def test_full_mode_is_the_plain_network(tiny_cnn):
    x = _images(tiny_cnn)
    res = run_stages(tiny_cnn, StageRange(start=0, stop=3, full=True), StageInput(h=x), StopAtExit(exit=0))
    assert torch.equal(res.done, torch.arange(N))
    assert torch.equal(res.logits, tiny_cnn.forward_full(x))
    assert (res.exit_index == 2).all()
    assert (res.macs == tiny_cnn.mac_profile.full).all()
    assert tiny_cnn.mac_profile.full == sum(tiny_cnn.mac_profile.stage) + tiny_cnn.mac_profile.exit[-1]
    assert range_macs(tiny_cnn, StageRange(start=0, stop=3, full=True)) == tiny_cnn.mac_profile.full
    assert res.cont.numel() == 0 and res.cont_input is None and res.cont_exit == -1
    assert res.stage_batch == (N, N, N)


def test_range_macs_sums_stages_and_heads(tiny_cnn):
    p = tiny_cnn.mac_profile
    assert range_macs(tiny_cnn, StageRange(start=0, stop=2)) == p.cumulative[1]
    assert range_macs(tiny_cnn, StageRange(start=2, stop=3)) == p.cumulative[2] - p.cumulative[1]
    assert range_macs(tiny_cnn, StageRange(start=0, stop=3)) == p.cumulative[-1]


@pytest.mark.parametrize("start,stop,full", [(1, 3, True), (2, 3, True), (1, 1, False), (2, 1, False), (-1, 2, False)])
def test_invalid_ranges_raise(start, stop, full):
    with pytest.raises(ConfigError):
        StageRange(start=start, stop=stop, full=full)


@pytest.mark.parametrize("rng", [StageRange(start=0, stop=4), StageRange(start=2, stop=4), StageRange(start=0, stop=2, full=True)])
def test_ranges_outside_the_model_raise(tiny_cnn, rng):
    with pytest.raises(ConfigError, match="does not fit the model"):
        rng.check(tiny_cnn)
    with pytest.raises(ConfigError):
        run_stages(tiny_cnn, rng, StageInput(h=_images(tiny_cnn, 2)), StopAtExit())


@pytest.mark.parametrize("k", [1, 2])
def test_continuations_carry_the_deepest_edge_exit(tiny_cnn, k):
    x = _images(tiny_cnn)
    with torch.no_grad():
        all_exits = tiny_cnn(x)
    # nobody stops on the edge: every sample continues with exit k-1's logits
    res = run_stages(tiny_cnn, StageRange(start=0, stop=k), StageInput(h=x), StopAtExit(exit=-1))
    assert torch.equal(res.cont, torch.arange(N))
    assert res.done.numel() == 0 and res.logits.shape == (0, tiny_cnn.cfg.num_classes)
    assert res.cont_exit == k - 1
    torch.testing.assert_close(res.cont_logits, all_exits[k - 1], rtol=0, atol=1e-6)
    assert torch.equal(res.cont_input.prev_pred, all_exits[k - 1].argmax(dim=1))
    assert res.cont_input.complexity.shape == (N, 0)  # StopAtExit reads no complexity

    # with a splitting rule, the continuing rows are exactly those samples' rows
    rule = _rule(tiny_cnn, x, "complexity")
    res = run_stages(tiny_cnn, StageRange(start=0, stop=k), StageInput(h=x), rule)
    assert 0 < res.cont.numel() < N
    assert res.cont_exit == k - 1
    torch.testing.assert_close(res.cont_logits, all_exits[k - 1][res.cont], rtol=0, atol=1e-6)
    assert torch.equal(res.cont_input.prev_pred, all_exits[k - 1][res.cont].argmax(dim=1))
    torch.testing.assert_close(res.cont_input.complexity, tiny_cnn.complexity(x)[res.cont], rtol=0, atol=0)
    assert res.cont_input.h.shape[0] == res.cont.numel()


def test_everyone_done_on_the_edge_leaves_no_continuation(tiny_cnn):
    x = _images(tiny_cnn, 5)
    res = run_stages(tiny_cnn, StageRange(start=0, stop=2), StageInput(h=x), StopAtExit(exit=0))
    assert torch.equal(res.done, torch.arange(5)) and (res.exit_index == 0).all()
    assert res.cont.numel() == 0 and res.cont_input is None and res.cont_exit == -1
    assert res.cont_logits.shape == (0, tiny_cnn.cfg.num_classes)
    assert (res.macs == tiny_cnn.mac_profile.cumulative[0]).all()
    assert res.stage_batch == (5,)  # stage 1 never ran


def _assert_same_result(a: StageResult, b: StageResult) -> None:
    # identical decisions and positions; logits up to float noise of a different batch size
    assert torch.equal(a.done, b.done)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    assert torch.equal(a.macs, b.macs)
    assert torch.equal(a.cont, b.cont)
    assert a.cont_exit == b.cont_exit
    torch.testing.assert_close(a.cont_logits, b.cont_logits, rtol=0, atol=1e-5)
    assert (a.cont_input is None) == (b.cont_input is None)
    if a.cont_input is not None:
        torch.testing.assert_close(a.cont_input.h, b.cont_input.h, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.cont_input.complexity, b.cont_input.complexity, rtol=0, atol=1e-6)
        assert torch.equal(a.cont_input.prev_pred, b.cont_input.prev_pred)


@pytest.mark.parametrize("name", ["confidence", "complexity+agreement"])
def test_concat_then_split_equals_running_each_request_alone(tiny_cnn, name):
    x = _images(tiny_cnn, 8)
    rule = _rule(tiny_cnn, _images(tiny_cnn), name)
    sizes = [1, 5, 2]
    parts = list(torch.split(x, sizes))
    inputs = [StageInput(h=p) for p in parts]
    batch = concat_inputs(inputs)
    assert torch.equal(batch.h, x) and batch.complexity is None and batch.prev_pred is None

    edge_rng = StageRange(start=0, stop=2)
    together = split_result(run_stages(tiny_cnn, edge_rng, batch, rule), sizes)
    alone = [run_stages(tiny_cnn, edge_rng, i, rule) for i in inputs]
    assert len(together) == 3
    for t, a, n in zip(together, alone, sizes, strict=True):
        assert t.batch_size == n
        _assert_same_result(t, a)
    # the combined batch must have both done and continuing samples for this to mean much
    assert sum(t.done.numel() for t in together) > 0 and sum(t.cont.numel() for t in together) > 0

    # second hop: the continuations of the three requests batched on the cloud
    conts = [(i, t.cont_input) for i, t in enumerate(together) if t.cont_input is not None]
    cloud_rng = StageRange(start=2, stop=3)
    csizes = [c.h.shape[0] for _, c in conts]
    c_together = split_result(run_stages(tiny_cnn, cloud_rng, concat_inputs([c for _, c in conts]), rule), csizes)
    c_alone = [run_stages(tiny_cnn, cloud_rng, c, rule) for _, c in conts]
    for t, a in zip(c_together, c_alone, strict=True):
        _assert_same_result(t, a)
        assert (t.exit_index == 2).all() and t.cont.numel() == 0


def test_split_result_of_one_request_is_the_result(tiny_cnn):
    x = _images(tiny_cnn, 4)
    res = run_stages(tiny_cnn, StageRange(start=0, stop=2), StageInput(h=x), StopAtExit(exit=-1))
    assert split_result(res, [4])[0] is res
    inp = StageInput(h=x)
    assert concat_inputs([inp]) is inp


def test_split_result_with_a_request_fully_done(tiny_cnn):
    # request 0 (first 3 samples) has no continuation: its cont_exit is -1, input None
    x = _images(tiny_cnn, 8)
    rule = ParityRule()
    res = run_stages(tiny_cnn, StageRange(start=0, stop=2), StageInput(h=x), rule)
    parts = split_result(res, [3, 5])
    for p, lo, n in zip(parts, [0, 3], [3, 5], strict=True):
        mine = (res.cont >= lo) & (res.cont < lo + n)
        assert torch.equal(p.cont, res.cont[mine] - lo)
        assert p.cont_exit == (1 if mine.any() else -1)
        assert (p.cont_input is None) == (not mine.any())
        assert torch.equal(p.macs, res.macs[lo : lo + n])


def test_concat_inputs_drops_partial_side_tensors(tiny_cnn):
    a = StageInput(h=torch.zeros(2, 3), complexity=torch.zeros(2, 4), prev_pred=torch.zeros(2, dtype=torch.int64))
    b = StageInput(h=torch.ones(1, 3), complexity=None, prev_pred=torch.ones(1, dtype=torch.int64))
    c = concat_inputs([a, b])
    assert c.h.shape == (3, 3) and c.complexity is None
    assert torch.equal(c.prev_pred, torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("name", ["complexity", "density"])
def test_complexity_rule_after_stage_zero_needs_forwarded_features(tiny_cnn, name):
    x = _images(tiny_cnn)
    rule = _rule(tiny_cnn, x, name)
    edge = run_stages(tiny_cnn, StageRange(start=0, stop=2), StageInput(h=x), rule)
    assert edge.cont_input is not None and edge.cont_input.complexity is not None
    stripped = StageInput(h=edge.cont_input.h, complexity=None, prev_pred=edge.cont_input.prev_pred)
    with pytest.raises(ConfigError, match="complexity"):
        run_stages(tiny_cnn, StageRange(start=2, stop=3), stripped, rule)
    # forwarded unchanged, it works
    run_stages(tiny_cnn, StageRange(start=2, stop=3), edge.cont_input, rule)


def test_rule_without_complexity_needs_no_features_after_stage_zero(tiny_cnn):
    x = _images(tiny_cnn)
    edge = run_stages(tiny_cnn, StageRange(start=0, stop=1), StageInput(h=x), StopAtExit(exit=-1))
    stripped = StageInput(h=edge.cont_input.h)
    res = run_stages(tiny_cnn, StageRange(start=1, stop=3), stripped, StopAtExit(exit=-1))
    assert (res.exit_index == 2).all()
    torch.testing.assert_close(res.logits[res.done.argsort()], tiny_cnn.forward_full(x), rtol=0, atol=1e-6)


def test_first_device_validates_raw_images(tiny_cnn):
    from dynray.errors import InputValidationError

    with pytest.raises(InputValidationError):
        run_stages(tiny_cnn, StageRange(start=0, stop=2), StageInput(h=torch.zeros(2, 3, 28, 28)), StopAtExit())


def test_helpers_really_split(tiny_cnn):
    # sanity of this file's fixtures: thresholds are far from every score
    x = _images(tiny_cnn)
    with torch.no_grad():
        conf = F.softmax(tiny_cnn(x)[0], dim=1).amax(dim=1)
    tau = _mid_gap(conf)
    assert ((conf - tau).abs() > 1e-7).all()
    assert 0 < int((conf >= tau).sum()) < N


def test_split_result_parts_carry_the_shared_batch_trace(tiny_cnn):
    """stage_batch describes the forward the request was batched into (documented on StageResult)."""
    x = _images(tiny_cnn, 8)
    sizes = [1, 5, 2]
    inputs = [StageInput(h=p) for p in torch.split(x, sizes)]
    rng = StageRange(start=0, stop=2)
    together = split_result(run_stages(tiny_cnn, rng, concat_inputs(inputs), StopAtExit(exit=0)), sizes)
    assert [t.stage_batch for t in together] == [(8,)] * 3


def test_group_requests_merges_by_version_and_start_and_split_reply_undoes_it(tiny_cnn):
    x = _images(tiny_cnn, 7)
    reqs = [DeviceRequest("a:v1", 0, StageInput(h=x[:2])), DeviceRequest("b:v1", 0, StageInput(h=x[2:3])), DeviceRequest("a:v1", 0, StageInput(h=x[3:7]))]
    groups = group_requests(reqs)
    assert [(g.version, idx, sizes) for g, idx, sizes in groups] == [("a:v1", [0, 2], [2, 4]), ("b:v1", [1], [1])]
    merged, idx, sizes = groups[0]
    assert torch.equal(merged.inp.h, torch.cat([x[:2], x[3:7]]))
    rng = StageRange(start=0, stop=3)
    rule = StopAtExit(exit=1)
    reply = DeviceReply(result=run_stages(tiny_cnn, rng, merged.inp, rule), tier="edge", replica="r1", load={}, ms_per_mmac=1.0)
    parts = split_reply(reply, sizes)
    for part, i in zip(parts, idx, strict=True):
        alone = run_stages(tiny_cnn, rng, reqs[i].inp, rule)
        assert part.tier == "edge" and part.replica == "r1"
        assert torch.equal(part.result.done, alone.done) and torch.equal(part.result.logits, alone.logits)
        assert torch.equal(part.result.macs, alone.macs)
