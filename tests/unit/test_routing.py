"""The learned router's pieces on synthetic exit outputs (no Ray, no training).

Observation layout, environment vs vectorised rollout, hybrid fallbacks and trust
adaptation, policy storage tied to a model version, curves, threshold tuning, the
load-shift trace and input validation.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dynray.errors import ConfigError, DatasetNotFoundError, InputValidationError, IntegrityError
from dynray.evaluation import ExitRecords, simulate
from dynray.registry import ModelRegistry
from dynray.routing.cache import load_exit_cache
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.bench.curves import compare, cost_at, frontier
from dynray.routing.env import LoadSampler, RouterEnvConfig, RoutingEnv, WeightSampler
from dynray.routing.features import CONTINUE, OFFLOAD, STOP, CostWeights, Load, build_observation, obs_dim
from dynray.routing.hybrid import Gate, HybridConfig, HybridRouter, fit_gate, gate_from_rewards
from dynray.routing.policy import PolicyNet, find_policy, load_policy, save_policy
from dynray.routing.rollout import observed_load, rollout, threshold_decide
from dynray.bench.trace import LoadShift, run_trace
from dynray.routing.tuning import exit_prices, tune_thresholds
from dynray.thresholds import ThresholdRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K, N, C = 3, 200, 10
SKILL = (0.8, 0.9, 0.97)  # probability that exit k is right


def make_records(n: int = N, seed: int = 0) -> ExitRecords:
    """K=3 exits whose accuracy rises with depth; right answers are more confident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    logits = []
    for p in SKILL:
        ok = torch.rand(n, generator=g) < p
        wrong = (labels + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
        pred = torch.where(ok, labels, wrong)
        # confidence: right answers get a large margin, wrong ones a small one (controllable)
        margin = torch.where(ok, 2.0 + 3.0 * torch.rand(n, generator=g), 0.5 + 1.0 * torch.rand(n, generator=g))
        z = torch.randn(n, C, generator=g) * 0.3
        z[torch.arange(n), pred] += margin + 1.5  # +1.5 beats the noise: argmax is pred
        logits.append(z)
    return ExitRecords(logits=torch.stack(logits), complexity=torch.rand(n, 4, generator=g), labels=labels,
                       cum_macs=torch.tensor([1e5, 4e5, 3e6], dtype=torch.float64), full_macs=3_000_000)


REC = make_records()
COSTS = RouteCosts(stage_macs=(129216.0, 326784.0, 2710144.0), stage_ms=(0.15, 0.07, 0.2), edge_stages=2)
RULE = ThresholdRule(thresholds=(0.9, 0.9))


def make_env(rec: ExitRecords = REC, costs: RouteCosts = COSTS, shaping: bool = False) -> RoutingEnv:
    return RoutingEnv({"records": rec, "config": RouterEnvConfig(costs=costs, shaping=shaping)})


def always(action: int):
    def decide(obs, k, logits):
        return torch.full((obs.shape[0],), action, dtype=torch.int64)

    return decide


def mixed_decide(obs, k, logits):
    """Uses only the observation: stop when confident, offload complex samples, else continue."""
    a = torch.full((obs.shape[0],), CONTINUE, dtype=torch.int64)
    a[obs[:, 6] > 0.6] = OFFLOAD  # first complexity feature
    a[obs[:, 0] > 0.7] = STOP
    return a


def test_synthetic_records_are_what_the_tests_assume():
    acc = REC.exit_accuracy()
    assert acc[0] < acc[1] < acc[2]
    assert 0.7 < acc[0] and acc[2] > 0.93
    # confidence carries signal: the 0.9 rule stops some but not all samples at exit 0
    stop0 = RULE.stop(0, REC.logits[0], REC.complexity)
    assert 0 < int(stop0.sum()) < N


# ------------------------------------------------------------------------------- environment
def test_env_passes_check_env():
    from gymnasium.utils.env_checker import check_env

    env = make_env()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*render.*")
        check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (obs_dim(K),) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)


def test_env_observation_equals_build_observation():
    env = make_env()
    w = CostWeights(cost=0.01, lat=0.001)
    edge, cloud = TierLoad(), TierLoad(slowdown=3.0, queue=2.0)
    load = observed_load(COSTS, edge, cloud)
    for i in (0, 7, 123):
        obs, _ = env.reset(options={"sample": i, "weights": w, "tiers": (edge, cloud)})
        ref = build_observation(0, K, REC.logits[0, i:i + 1], REC.complexity[i:i + 1], None, False, load, w)[0]
        np.testing.assert_allclose(obs, ref.numpy(), atol=1e-6)
        assert obs[-7:-3].tolist() == pytest.approx(load.vector(), abs=1e-6)  # the load is really in there

        obs1, r, done, trunc, _ = env.step(CONTINUE)
        assert not done and not trunc and r < 0  # stage 1 costs something, nothing earned yet
        prev = REC.logits[0, i:i + 1].argmax(dim=1)
        ref1 = build_observation(1, K, REC.logits[1, i:i + 1], REC.complexity[i:i + 1], prev, False, load, w, REC.logits[0, i:i + 1])[0]
        np.testing.assert_allclose(obs1, ref1.numpy(), atol=1e-6)

        # offload at exit 0: exit 1 runs on the cloud, and the observation says so
        env.reset(options={"sample": i, "weights": w, "tiers": (edge, cloud)})
        obs1c, *_ = env.step(OFFLOAD)
        ref1c = build_observation(1, K, REC.logits[1, i:i + 1], REC.complexity[i:i + 1], prev, True, load, w, REC.logits[0, i:i + 1])[0]
        np.testing.assert_allclose(obs1c, ref1c.numpy(), atol=1e-6)
        assert obs1c[obs_dim(K) - 8] == 1.0 and obs1[obs_dim(K) - 8] == 0.0


def _env_episodes(env, w, edge, cloud, act_fn):
    """Step every sample through the env; act_fn(obs [1, D], k, i) -> action."""
    out = []
    for i in range(N):
        obs, _ = env.reset(options={"sample": i, "weights": w, "tiers": (edge, cloud)})
        total, k, done = 0.0, 0, False
        while not done:
            a = act_fn(torch.from_numpy(obs).unsqueeze(0), k, i)
            obs, r, done, _, info = env.step(a)
            total += r
            k += 1
        out.append((total, info))
    return out


@pytest.mark.parametrize("policy", ["thresholds", "mixed"])
def test_env_episode_returns_equal_vectorised_rollout(policy):
    env = make_env()
    w = CostWeights(cost=0.01, lat=0.001, macs=0.002)
    edge, cloud = TierLoad(slowdown=1.5, queue=1.0), TierLoad(slowdown=2.0, queue=3.0)
    if policy == "thresholds":
        decide = threshold_decide(RULE)

        def act(obs, k, i):
            prev = REC.logits[k - 1, i:i + 1].argmax(dim=1) if k else None
            return int(decide(obs, k, REC.logits[k, i:i + 1], REC.complexity[i:i + 1], prev)[0])
    else:
        decide = mixed_decide

        def act(obs, k, i):
            return int(mixed_decide(obs, k, REC.logits[k, i:i + 1])[0])

    paths = rollout(REC, COSTS, decide, w, edge=edge, cloud=cloud)
    eps = _env_episodes(env, w, edge, cloud, act)
    first = COSTS.run(0, "edge", edge, new_call=True)
    first_price = w.cost * first.cost + w.lat * first.latency_ms + w.macs * first.macs / 1e6
    returns = torch.tensor([t for t, _ in eps], dtype=torch.float64)
    torch.testing.assert_close(returns - first_price, paths.reward(w), atol=1e-9, rtol=0)
    infos = [info for _, info in eps]
    assert [d["exit"] for d in infos] == paths.exit_index.tolist()
    assert [d["tier"] == "cloud" for d in infos] == paths.tier.tolist()
    assert [d["correct"] for d in infos] == paths.correct.tolist()
    for key, col in (("cost", paths.cost), ("latency_ms", paths.latency_ms), ("macs", paths.macs)):
        torch.testing.assert_close(torch.tensor([d[key] for d in infos], dtype=torch.float64), col, atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.tensor([d["reward"] for d in infos], dtype=torch.float64), paths.reward(w), atol=1e-9, rtol=0)
    # with potential-based shaping the return is the same reward minus correct_0, an
    # action-independent constant of the episode (same optimal policy, lower variance)
    shaped = torch.tensor([t for t, _ in _env_episodes(make_env(shaping=True), w, edge, cloud, act)], dtype=torch.float64)
    torch.testing.assert_close(shaped - first_price, paths.reward(w) - REC.correct[0].double(), atol=1e-9, rtol=0)
    # the comparison is not vacuous: samples leave at every exit
    assert set(paths.exit_index.tolist()) == {0, 1, 2}
    if policy == "mixed":
        assert paths.offloaded.any() and (~paths.offloaded).any()


# --------------------------------------------------------------------------- input validation
def test_non_finite_observations_are_rejected():
    bad = REC.logits[0, :4].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(InputValidationError):
        build_observation(0, K, bad, REC.complexity[:4], None, False, Load(), CostWeights())
    with pytest.raises(InputValidationError):
        build_observation(0, K, REC.logits[0, :4], REC.complexity[:4], None, False, Load(edge_ms=float("inf")), CostWeights())
    with pytest.raises(InputValidationError):
        CostWeights(cost=float("nan"))
    with pytest.raises(InputValidationError):
        CostWeights(lat=-1.0)
    with pytest.raises(InputValidationError):
        build_observation(K - 1, K, REC.logits[0, :4], REC.complexity[:4], None, False, Load(), CostWeights())  # no decision at the last exit

    obs = build_observation(0, K, REC.logits[0, :4], REC.complexity[:4], None, False, Load(), CostWeights())
    obs[2, 5] = float("inf")
    router = HybridRouter(PolicyNet([obs_dim(K), 3]), RULE)
    with pytest.raises(InputValidationError):
        router.decide(obs, 0, REC.logits[0, :4], REC.complexity[:4], None)


# -------------------------------------------------------------------------------- hybrid router
def _obs0(n: int = N) -> torch.Tensor:
    return build_observation(0, K, REC.logits[0, :n], REC.complexity[:n], None, False, Load(), CostWeights())


def _rule_actions(n: int = N) -> torch.Tensor:
    return torch.where(RULE.stop(0, REC.logits[0, :n], REC.complexity[:n]), STOP, CONTINUE)


def _constant_policy(bias: list[float]) -> PolicyNet:
    net = PolicyNet([obs_dim(K), 3])
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.linears()[-1].bias.copy_(torch.tensor(bias))
    return net


def test_hybrid_falls_back_to_thresholds_without_policy():
    router = HybridRouter(None, RULE)
    d = router.decide(_obs0(), 0, REC.logits[0], REC.complexity, None)
    expected = _rule_actions()
    assert torch.equal(d.actions, expected)
    assert not d.by_policy.any()
    assert (expected == STOP).any() and (expected == CONTINUE).any()
    assert router.decisions == {"policy": 0, "rules": N}


def test_hybrid_falls_back_when_policy_is_unsure():
    uniform = _constant_policy([0.0, 0.0, 0.0])
    _, probs = uniform.act(_obs0())
    assert torch.allclose(probs, torch.full_like(probs, 1 / 3))
    router = HybridRouter(uniform, RULE, HybridConfig(min_confidence=0.9, rl_weight=1.0))
    d = router.decide(_obs0(), 0, REC.logits[0], REC.complexity, None)
    assert torch.equal(d.actions, _rule_actions())  # an argmax of the uniform policy would be all STOP
    assert not d.by_policy.any()

    sure_stop = _constant_policy([10.0, -10.0, -10.0])
    trusting = HybridRouter(sure_stop, RULE, HybridConfig(min_confidence=0.9, rl_weight=1.0))
    d = trusting.decide(_obs0(), 0, REC.logits[0], REC.complexity, None)
    assert (d.actions == STOP).all() and d.by_policy.all()
    assert trusting.decisions == {"policy": N, "rules": 0}

    distrusting = HybridRouter(sure_stop, RULE, HybridConfig(min_confidence=0.9, rl_weight=0.0))
    d = distrusting.decide(_obs0(), 0, REC.logits[0], REC.complexity, None)
    assert torch.equal(d.actions, _rule_actions()) and not d.by_policy.any()


def test_hybrid_decide_fn_routes_like_the_rule_when_policy_is_unsure():
    router = HybridRouter(_constant_policy([0.0, 0.0, 0.0]), RULE)
    w = CostWeights(cost=0.01)
    a = rollout(REC, COSTS, router.decide_fn(), w)
    b = rollout(REC, COSTS, threshold_decide(RULE), w)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.reward(w), b.reward(w))


def test_hybrid_rl_weight_adapts_and_stays_bounded():
    good, bad = torch.full((16,), 0.9), torch.full((16,), 0.5)
    up = HybridRouter(None, RULE, HybridConfig(rl_weight=0.5))
    ws = [up.observe(good, bad) for _ in range(20)]
    assert all(b > a for a, b in zip(ws, ws[1:], strict=False) if a < 1.0)
    assert ws[-1] > 0.5 and ws[-1] == up.rl_weight
    for _ in range(500):
        up.observe(good, bad)
    assert up.rl_weight == 1.0

    down = HybridRouter(None, RULE, HybridConfig(rl_weight=0.5))
    ws = [down.observe(bad, good) for _ in range(20)]
    assert all(b < a for a, b in zip(ws, ws[1:], strict=False) if a > 0.0)
    for _ in range(500):
        down.observe(bad, good)
    assert down.rl_weight == 0.0
    assert down.needed_confidence() == pytest.approx(1.0)

    with pytest.raises(ConfigError):
        up.observe(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ConfigError):
        up.observe(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ConfigError):
        up.observe(torch.tensor([float("nan")]), torch.tensor([0.0]))
    with pytest.raises(ConfigError):
        HybridConfig(rl_weight=1.5)
    with pytest.raises(ConfigError):
        HybridConfig(min_confidence=0.0)


def test_the_safety_gate_shuts_out_a_bad_policy_and_lets_a_better_one_decide():
    """A policy sure of 'stop' at every exit is worse than the thresholds when accuracy counts
    (exit 0 is right 80% of the time): the gate, fitted on one split, shuts, and the hybrid then
    decides exactly like the thresholds on another split. At a huge cost weight the same policy
    beats the rules (stopping early is right there): the gate opens and the policy decides."""
    sure_stop = _constant_policy([10.0, -10.0, -10.0])
    val, test = make_records(seed=1), make_records(seed=2)
    cfg = HybridConfig(min_confidence=0.9, rl_weight=1.0)

    def rewards_at(w: CostWeights):
        return lambda decide: rollout(val, COSTS, decide, w).reward(w)

    accurate = CostWeights(cost=1e-4)
    shut = fit_gate(sure_stop, RULE, cfg, rewards_at(accurate))
    assert not shut.open and shut.gain < 0 and shut.n == N, shut
    gated = HybridRouter(sure_stop, RULE, cfg, gate=shut)
    a, b = rollout(test, COSTS, gated.decide_fn(), accurate), rollout(test, COSTS, threshold_decide(RULE), accurate)
    assert torch.equal(a.exit_index, b.exit_index) and gated.decisions["policy"] == 0
    ungated = rollout(test, COSTS, HybridRouter(sure_stop, RULE, cfg).decide_fn(), accurate)
    assert ungated.accuracy < b.accuracy - 0.05  # what the gate kept out

    thrifty = CostWeights(cost=10.0)
    opened = fit_gate(sure_stop, RULE, cfg, rewards_at(thrifty))
    assert opened.open and opened.gain > opened.z * opened.se > 0, opened
    router = HybridRouter(sure_stop, RULE, cfg, gate=opened)
    assert (rollout(test, COSTS, router.decide_fn(), thrifty).exit_index == 0).all() and router.decisions["policy"] > 0

    assert not fit_gate(None, RULE, cfg, rewards_at(accurate)).open
    noisy = gate_from_rewards(torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.5]), z=1.0)
    assert noisy.gain > 0 and not noisy.open  # a gain inside one standard error is noise
    assert Gate.from_dict(opened.to_dict()) == opened
    with pytest.raises(ConfigError):
        gate_from_rewards(torch.zeros(3), torch.zeros(4), z=1.0)
    with pytest.raises(ConfigError):
        HybridConfig(gate_z=-1.0)


# ------------------------------------------------------------------------------ policy storage
def test_policy_save_load_tied_to_model_version(tmp_path):
    reg = ModelRegistry(tmp_path)
    v1 = reg.register("dynnet-x", {"w": torch.zeros(1)}, {"kind": "dynamic_net"})
    v2 = reg.register("dynnet-x", {"w": torch.zeros(1)}, {"kind": "dynamic_net"})
    assert (v1.version, v2.version) == (1, 2)
    torch.manual_seed(0)
    net = PolicyNet([obs_dim(K), 16, 3])
    router = save_policy(reg, v1, net, {"note": "t"})
    assert router.name == "dynnet-x-router" and router.meta["attached_to"] == v1.ref and router.meta["note"] == "t"

    stored = load_policy(reg, router.ref, v1)
    obs = torch.randn(8, obs_dim(K))
    with torch.no_grad():
        assert torch.equal(stored.policy(obs), net(obs))
    assert stored.model_ref == v1.ref and stored.policy.sizes == net.sizes

    with pytest.raises(IntegrityError):
        load_policy(reg, router.ref, v2)
    found = find_policy(reg, v1)
    assert found is not None and found.ref == router.ref
    assert find_policy(reg, v2) is None
    newer = save_policy(reg, v1, net, {"note": "retrained"})
    assert find_policy(reg, v1).ref == newer.ref  # the newest router for that version wins


def test_policy_net_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        PolicyNet([5])
    with pytest.raises(ConfigError):
        PolicyNet([5, 0, 3])


# ------------------------------------------------------------------------------------- curves
def test_frontier_drops_dominated_points():
    pts = [{"accuracy": 0.9, "cost": 1.0}, {"accuracy": 0.8, "cost": 2.0}, {"accuracy": 0.95, "cost": 3.0},
           {"accuracy": 0.7, "cost": 0.5}, {"accuracy": 0.9, "cost": 1.5}]
    front = frontier(pts)
    assert [(p["accuracy"], p["cost"]) for p in front] == [(0.7, 0.5), (0.9, 1.0), (0.95, 3.0)]


def test_cost_at_interpolates_and_flags_out_of_range():
    front = frontier([{"accuracy": 0.8, "cost": 1.0}, {"accuracy": 0.9, "cost": 3.0}])
    c, where = cost_at(front, 0.85)
    assert where == "interpolated" and c == pytest.approx(2.0)
    assert cost_at(front, 0.8) == (pytest.approx(1.0), "interpolated")
    assert cost_at(front, 0.95) == (3.0, "above")
    assert cost_at(front, 0.5) == (1.0, "below")


def test_compare_saving_sign():
    thresholds = [{"accuracy": 0.8, "cost": 1.0}, {"accuracy": 0.9, "cost": 3.0}, {"accuracy": 0.85, "cost": 5.0}]
    cmp = compare([{"accuracy": 0.85, "cost": 1.0}, {"accuracy": 0.85, "cost": 4.0}], thresholds)
    assert cmp[0].thresholds_cost == pytest.approx(2.0)  # the dominated (0.85, 5.0) point is ignored
    assert cmp[0].saving == pytest.approx(0.5) and cmp[0].where == "interpolated"
    assert cmp[1].saving == pytest.approx(-1.0)
    assert cmp[0].to_dict()["saving"] == cmp[0].saving


# ------------------------------------------------------------------------------ threshold tuning
def _mean_reward(rule: ThresholdRule, w: CostWeights) -> float:
    return float(rollout(REC, COSTS, threshold_decide(rule), w).reward(w).mean())


def test_exit_prices_match_rollout_of_the_thresholds_path():
    w = CostWeights(cost=0.03, lat=0.002, macs=0.01)
    prices = exit_prices(COSTS)
    paths = rollout(REC, COSTS, threshold_decide(RULE), w)
    sim = simulate(REC, RULE).exit_index
    assert torch.equal(paths.exit_index, sim)
    expected = REC.correct[sim, torch.arange(N)].double() - torch.from_numpy(prices.penalty(w))[sim]
    torch.testing.assert_close(paths.reward(w), expected)


def test_tune_thresholds_beats_trivial_rules_at_low_cost():
    w = CostWeights(cost=1e-6)
    rule = tune_thresholds(REC, exit_prices(COSTS), w, levels=40, sweeps=2)
    never = ThresholdRule(thresholds=(2.0, 2.0))
    first = ThresholdRule(thresholds=(0.0, 0.0))
    r = _mean_reward(rule, w)
    assert r >= _mean_reward(never, w) - 1e-12
    assert r >= _mean_reward(first, w) - 1e-12
    assert r > _mean_reward(first, w) + 0.05  # exit 0 is clearly worse here


def test_tune_thresholds_stops_everything_at_a_huge_cost_weight():
    # (cost=1.0 is not enough: running stage 1 costs ~0.33 reward, less than the 1.0 a
    # wrong-then-right sample gains; at 10 no later exit can pay for itself)
    w = CostWeights(cost=10.0)
    rule = tune_thresholds(REC, exit_prices(COSTS), w, levels=40, sweeps=2)
    paths = rollout(REC, COSTS, threshold_decide(rule), w)
    assert (paths.exit_index == 0).all()


# -------------------------------------------------------------------------------------- rollout
# Path prices by hand from the definition (DESIGN.md §3): cost = the sum over the devices a
# sample touched of its MACs there / 1e6 x the device's cost per million MACs (edge 1 unit,
# cloud 4); latency = each call's round trip (edge 5 ms, cloud 40 ms) + stage time / speed
# (edge 0.25, cloud 1). COSTS: stage (+ exit head) MACs 129216, 326784, 2710144 and times
# 0.15, 0.07, 0.2 ms; the edge hosts stages 0 and 1.
COST_EXIT0_EDGE = 0.129216  # 129216 / 1e6 * 1
COST_EXIT1_EDGE = 0.456  # (129216 + 326784) / 1e6 * 1
COST_EXIT2_VIA_EDGE = 11.296576  # 0.456 on the edge + 2710144 / 1e6 * 4 = 10.840576 on the cloud
COST_EXIT2_OFFLOADED = 12.276928  # 0.129216 on the edge + (326784 + 2710144) / 1e6 * 4 = 12.147712 on the cloud


def _all(value: float) -> torch.Tensor:
    return torch.full((N,), value, dtype=torch.float64)


def test_rollout_always_stop():
    p = rollout(REC, COSTS, always(STOP), CostWeights())
    assert (p.exit_index == 0).all() and not p.tier.any() and not p.offloaded.any()
    torch.testing.assert_close(p.cost, _all(COST_EXIT0_EDGE), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.latency_ms, _all(5.6), rtol=1e-12, atol=0)  # 5 ms + 0.15 ms / 0.25
    torch.testing.assert_close(p.macs, _all(129216.0), rtol=0, atol=0)
    assert p.accuracy == pytest.approx(REC.exit_accuracy()[0])


def test_rollout_always_offload():
    p = rollout(REC, COSTS, always(OFFLOAD), CostWeights())
    assert (p.exit_index == K - 1).all() and p.tier.all() and p.offloaded.all()
    torch.testing.assert_close(p.cost, _all(COST_EXIT2_OFFLOADED), rtol=1e-12, atol=0)
    # edge call 5 + 0.15 / 0.25, then one cloud call for stages 1 and 2: 40 + 0.07 + 0.2
    torch.testing.assert_close(p.latency_ms, _all(45.87), rtol=1e-12, atol=0)
    assert p.accuracy == pytest.approx(REC.exit_accuracy()[-1])


def test_rollout_continue_is_not_an_offload():
    p = rollout(REC, COSTS, always(CONTINUE), CostWeights())
    assert (p.exit_index == K - 1).all() and p.tier.all() and not p.offloaded.any()
    torch.testing.assert_close(p.cost, _all(COST_EXIT2_VIA_EDGE), rtol=1e-12, atol=0)
    # edge call 5 + (0.15 + 0.07) / 0.25, then a cloud call for stage 2: 40 + 0.2
    torch.testing.assert_close(p.latency_ms, _all(46.08), rtol=1e-12, atol=0)


def test_rollout_prices_each_path_by_the_devices_it_touched():
    p = rollout(REC, COSTS, threshold_decide(RULE), CostWeights())
    by_exit = {0: COST_EXIT0_EDGE, 1: COST_EXIT1_EDGE, 2: COST_EXIT2_VIA_EDGE}
    assert torch.bincount(p.exit_index, minlength=K).gt(0).all()  # every path is taken
    want = torch.tensor([by_exit[int(k)] for k in p.exit_index], dtype=torch.float64)
    torch.testing.assert_close(p.cost, want, rtol=1e-12, atol=0)
    assert torch.equal(p.tier, p.exit_index == 2)


def test_slow_cloud_raises_latency_only_for_cloud_samples():
    decide = threshold_decide(RULE)
    w = CostWeights()
    fast = rollout(REC, COSTS, decide, w)
    slow = rollout(REC, COSTS, decide, w, cloud=TierLoad(slowdown=5.0), load=observed_load(COSTS, TierLoad(), TierLoad()))
    assert torch.equal(fast.exit_index, slow.exit_index)
    on_cloud = fast.tier
    assert on_cloud.any() and (~on_cloud).any()
    assert (slow.latency_ms[on_cloud] > fast.latency_ms[on_cloud] + 100).all()
    assert torch.equal(slow.latency_ms[~on_cloud], fast.latency_ms[~on_cloud])
    assert torch.equal(slow.cost, fast.cost)  # slowdown changes time, not price


def test_rollout_index_subset_matches_full_run():
    decide = threshold_decide(RULE)
    w = CostWeights(cost=0.02, lat=0.001)
    full = rollout(REC, COSTS, decide, w)
    idx = torch.tensor([5, 0, 199, 42])
    part = rollout(REC, COSTS, decide, w, index=idx)
    assert torch.equal(part.exit_index, full.exit_index[idx])
    torch.testing.assert_close(part.reward(w), full.reward(w)[idx])


# ---------------------------------------------------------------------------------------- trace
def test_trace_slo_misses_only_inside_the_slow_window():
    shift = LoadShift(requests=200, rate_per_s=50, slowdown=5, slo_ms=100)
    w = CostWeights()
    stop = run_trace(REC, COSTS, always(STOP), w, shift)
    assert stop.slo_misses == 0 and stop.escalated_frac == 0.0
    assert stop.accuracy == pytest.approx(REC.exit_accuracy()[0])

    cont = run_trace(REC, COSTS, always(CONTINUE), w, shift)
    assert cont.slo_misses > 0
    assert cont.slo_misses == cont.slo_misses_in_window
    assert cont.slo_misses == 80  # every request of the 40 % window, none outside it
    assert cont.escalated_frac == 1.0 and cont.p99_ms > shift.slo_ms


def test_trace_feedback_sees_every_request():
    seen = []
    run_trace(REC, COSTS, always(STOP), CostWeights(), LoadShift(requests=30), feedback=lambda s, *_: seen.append(s))
    assert len(seen) == 30 and all(0 <= s < N for s in seen)


def test_load_shift_rejects_bad_scenario():
    with pytest.raises(ConfigError):
        LoadShift(window=(0.7, 0.3))
    with pytest.raises(ConfigError):
        LoadShift(slowdown=0.5)


# ------------------------------------------------------------------------------- configuration
def test_samplers_and_env_config_reject_bad_input():
    with pytest.raises(ConfigError):
        WeightSampler(cost=(0.1, 0.01))
    with pytest.raises(ConfigError):
        WeightSampler(lat_p_zero=1.5)
    with pytest.raises(ConfigError):
        LoadSampler(slowdown=(0.5, 2))
    with pytest.raises(ConfigError):
        LoadSampler(edge_p_slow=2.0)
    two = RouteCosts(stage_macs=(1e5, 3e5), stage_ms=(0.1, 0.1), edge_stages=1)
    with pytest.raises(ConfigError, match="exits"):
        make_env(costs=two)
    with pytest.raises(ConfigError) as e:
        RoutingEnv({})
    assert "dynray router cache" in str(e.value)
    with pytest.raises(ConfigError):
        RouteCosts(stage_macs=(1.0, 2.0), stage_ms=(1.0,))
    with pytest.raises(ConfigError):
        RouteCosts(stage_macs=(1.0, 2.0), stage_ms=(1.0, 1.0), edge_stages=3)
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ConfigError):
        env.step(3)


def test_samplers_draw_within_their_ranges():
    rng = np.random.default_rng(0)
    ws = WeightSampler(cost=(1e-3, 1e-2), lat=(1e-4, 1e-3), lat_p_zero=0.5)
    draws = [ws.sample(rng) for _ in range(200)]
    assert all(1e-3 <= d.cost <= 1e-2 for d in draws)
    assert all(d.lat == 0.0 or 1e-4 <= d.lat <= 1e-3 for d in draws)
    assert 0 < sum(d.lat == 0.0 for d in draws) < 200
    ls = LoadSampler(slowdown=(2.0, 4.0), edge_p_slow=1.0, cloud_p_slow=0.0, max_queue=3, noise=0.0)
    for _ in range(50):
        edge, cloud, seen = ls.sample(rng, COSTS)
        assert 2.0 <= edge.slowdown <= 4.0 and cloud.slowdown == 1.0
        assert 0 <= edge.queue <= 3 and float(edge.queue).is_integer()
        assert seen == observed_load(COSTS, edge, cloud)  # noise=0: the observation is exact


def test_env_draws_operating_points_when_not_given():
    env = make_env()
    env.reset(seed=1)
    tails = set()
    for _ in range(20):
        obs, _ = env.reset()
        tails.add(tuple(np.round(obs[-7:], 6)))
        assert env.observation_space.contains(obs)
    assert len(tails) > 1
    assert not math.isnan(float(obs.sum()))


def test_load_exit_cache_without_cache_names_the_command(tmp_path):
    reg = ModelRegistry(tmp_path)
    info = reg.register("dynnet-x", {"w": torch.zeros(1)}, {"kind": "dynamic_net"})
    with pytest.raises(DatasetNotFoundError) as e:
        load_exit_cache(reg, info.ref, "val")
    assert "dynray router cache" in str(e.value)


# ----------------------------------------------------------------- serving rule == training obs
def test_policy_rule_in_run_stages_matches_the_rollout():
    """The device-side rule (serving) decides exactly as the rollout (training/bench) does."""
    from dynray.evaluation import collect_exit_outputs
    from dynray.models import DynamicNetConfig, build
    from dynray.serving.partition import StageInput, StageRange, run_stages
    from dynray.routing.rules import HybridRule, PolicyRule, RouteContext

    torch.manual_seed(0)
    model = build(DynamicNetConfig(widths=(8, 8, 16), layers=(1, 1, 1), exit_hidden=16)).eval()
    x = torch.rand(64, 1, 28, 28)
    model.complexity.fit(x)
    rec = collect_exit_outputs(model, x, torch.randint(0, 10, (64,)))
    # stop when max-softmax (feature 0) beats that exit's median (carried by the one-hot exit
    # columns 10 and 11), never offload
    t = torch.softmax(rec.logits[:2], dim=2).amax(dim=2).median(dim=1).values
    net = PolicyNet([obs_dim(3), 3])
    with torch.no_grad():
        net.linears()[0].weight.zero_()
        net.linears()[0].weight[0, 0] = 50.0
        net.linears()[0].weight[0, 10:12] = -50.0 * t
        net.linears()[0].bias.copy_(torch.tensor([0.0, 0.0, -100.0]))
    ctx = RouteContext("ppo", Load(edge_ms=7.0, cloud_ms=60.0, cloud_queue=2.0), CostWeights(cost=0.01, lat=0.001))
    costs = RouteCosts(stage_macs=(1.0, 1.0, 1.0), stage_ms=(0.1, 0.1, 0.1), edge_stages=3)  # one device hosts all
    want = rollout(rec, costs, lambda obs, k, logits: net.act(obs)[0], ctx.weights, load=ctx.load)
    with torch.no_grad():
        res = run_stages(model, StageRange(start=0, stop=3), StageInput(h=x), PolicyRule(net, 3, False, ctx))
    got = torch.full((64,), -1, dtype=torch.int64)
    got[res.done] = res.exit_index
    assert torch.equal(got, want.exit_index) and set(got.tolist()) == {0, 1, 2}
    # the hybrid rule with full trust in a sure policy behaves the same way
    sure = PolicyNet([obs_dim(3), 3])
    with torch.no_grad():
        sure.linears()[-1].weight.zero_()
        sure.linears()[-1].bias.copy_(torch.tensor([-10.0, 10.0, -10.0]))  # always continue
    h = HybridRouter(sure, RULE, HybridConfig(rl_weight=1.0))
    res = run_stages(model, StageRange(start=0, stop=3), StageInput(h=x), HybridRule(h, 3, False, ctx))
    assert res.exit_index.tolist() == [2] * 64


def test_a_router_is_never_the_default_model(tmp_path):
    """Routers are registered after their model; "newest" must still mean the newest model."""
    reg = ModelRegistry(tmp_path)
    model = reg.register("dynnet-x", {"w": torch.zeros(1)}, {"kind": "dynamic_net"})
    router = save_policy(reg, model, PolicyNet([obs_dim(K), 3]), {"note": "t"})
    assert router.meta["attached_to"] == model.ref
    assert reg.resolve(None).ref == model.ref
