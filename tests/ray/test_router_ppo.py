"""RLlib PPO on the routing environment: it learns, its export is exact, and it exports the
best held-out iterate.

A tiny configuration on synthetic exit outputs (3 exits whose accuracy rises with depth and
whose right answers are more confident), trained on the session's Ray with one env-runner
actor. Budget: 12 iterations of 1,000 steps, capped at 2 minutes; the selection runs use 6
iterations of 500 steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts
from dynray.routing.env import LoadSampler, RouterEnvConfig, RoutingEnv, WeightSampler
from dynray.routing.features import CostWeights
from dynray.routing.ppo import PPOTrainConfig, ValScorer, export_policy, make_ppo_config, select_iterate, train_ppo
from dynray.routing.rollout import rollout

pytestmark = pytest.mark.ray
C = 10
MARGIN = 0.05  # mean reward per request the trained policy must gain over a uniformly random one
WEIGHTS = CostWeights(cost=0.02)


def _records(n: int = 400, seed: int = 0) -> ExitRecords:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    logits = []
    for p in (0.75, 0.9, 0.98):
        ok = torch.rand(n, generator=g) < p
        pred = torch.where(ok, labels, (labels + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C)
        margin = torch.where(ok, 2.0 + 3.0 * torch.rand(n, generator=g), 0.5 + torch.rand(n, generator=g))
        z = torch.randn(n, C, generator=g) * 0.3
        z[torch.arange(n), pred] += margin + 1.5
        logits.append(z)
    return ExitRecords(logits=torch.stack(logits), complexity=torch.rand(n, 4, generator=g), labels=labels,
                       cum_macs=torch.tensor([1e5, 4e5, 3e6], dtype=torch.float64), full_macs=3_000_000)


REC = _records()
VAL = _records(300, seed=1)  # the held-out split: other samples of the same "model"
COSTS = RouteCosts(stage_macs=(129216.0, 326784.0, 2710144.0), stage_ms=(0.15, 0.07, 0.2), edge_stages=2)
# a narrow operating range keeps the tiny run's task small; the load still varies
ENV = RouterEnvConfig(costs=COSTS, weights=WeightSampler(cost=(0.01, 0.04), lat_p_zero=1.0), load=LoadSampler())
TINY = PPOTrainConfig(iterations=12, minutes=2.0, batch_size=1000, minibatch_size=250, epochs=8, lr=3e-3, hidden=(32, 32), env_runners=1, envs_per_runner=4)
SELECT = PPOTrainConfig(iterations=6, minutes=1.5, batch_size=500, minibatch_size=250, epochs=4, lr=3e-3, hidden=(16, 16), env_runners=1, envs_per_runner=4,
                        select_every=2, select_lambdas=(0.005, 0.02))


def _random_decide(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return lambda obs, k, logits: torch.randint(0, 3, (obs.shape[0],), generator=g)


def test_ppo_beats_a_random_policy_within_budget(ray_session):
    res = train_ppo(TINY, REC, ENV)
    assert res.iterations <= TINY.iterations and res.seconds < 150
    trained = rollout(REC, COSTS, lambda obs, k, logits: res.policy.act(obs)[0], WEIGHTS).reward(WEIGHTS).mean()
    rand = np.mean([float(rollout(REC, COSTS, _random_decide(s), WEIGHTS).reward(WEIGHTS).mean()) for s in range(5)])
    assert trained > rand + MARGIN, (float(trained), rand)
    assert len(res.history) == res.iterations and res.history[-1]["env_steps"] >= TINY.batch_size * res.iterations * 0.9


def test_exported_policy_acts_like_the_rllib_module(ray_session):
    algo = make_ppo_config(PPOTrainConfig(iterations=1, batch_size=500, minibatch_size=250, epochs=2, hidden=(16, 16)), REC, ENV).build_algo()
    try:
        algo.train()
        module = algo.get_module()
        env = RoutingEnv({"records": REC, "config": ENV})
        obs = torch.from_numpy(np.stack([env.reset(seed=i)[0] for i in range(300)]))
        net = export_policy(module, obs.shape[1], check=obs)
        with torch.no_grad():
            want = module.forward_inference({"obs": obs})["action_dist_inputs"]
        got_actions, _ = net.act(obs)
        assert torch.equal(got_actions, want.argmax(dim=1))
        torch.testing.assert_close(net(obs), want, atol=1e-6, rtol=0)
    finally:
        algo.stop()


def test_serving_path_does_not_import_rllib():
    import subprocess
    import sys

    code = "import sys, actors.app, actors.device, dynray.routing.rules; sys.exit(any(m.startswith('ray.rllib') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _weights(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_policy_is_the_best_held_out_iterate(ray_session):
    seen: dict[int, dict] = {}
    res = train_ppo(SELECT, REC, ENV, select_on=VAL, on_scored=lambda it, pol, s: seen.update({it: _weights(pol)}))
    sel = res.selection
    assert res.iterations == 6 and sorted(seen) == [2, 4, 6] == [c["iteration"] for c in sel.curve]
    assert [r["iteration"] for r in res.history if "val_score" in r] == [2, 4, 6]
    assert sel.chosen_iteration == select_iterate([(c["iteration"], c["score"]) for c in sel.curve])
    assert sel.score == max(c["score"] for c in sel.curve) and len(sel.grid) == 4 and sel.samples == 300
    assert _same(_weights(res.policy), seen[sel.chosen_iteration])  # the exported weights are the chosen iterate's
    assert ValScorer(VAL, COSTS, SELECT)(res.policy)["score"] == sel.score  # and they score what the curve says


def test_a_middle_iterate_is_exported_when_it_scores_best(ray_session):
    """Recorded scores (2: 0.1, 4: 0.5, 6: 0.2) make iteration 4 the best: the export must be
    its weights, not the last iterate's."""
    scripted = iter([0.1, 0.5, 0.2])
    seen: dict[int, dict] = {}
    cfg = dataclasses.replace(SELECT, lr_final=1e-4, entropy_coeff=0.01, entropy_coeff_final=0.0)  # RLlib's schedules, exercised on the way
    res = train_ppo(cfg, REC, ENV, select_on=lambda pol: {"score": next(scripted)}, on_scored=lambda it, pol, s: seen.update({it: _weights(pol)}))
    assert res.selection.chosen_iteration == 4 and res.selection.score == 0.5
    lrs, ents = [r["lr"] for r in res.history], [r["entropy_coeff"] for r in res.history]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < cfg.lr and lrs[-1] == pytest.approx(1e-4)
    assert ents == sorted(ents, reverse=True) and ents[-1] == pytest.approx(0.0, abs=1e-12)
    assert not _same(seen[4], seen[6])  # PPO moved the weights after iteration 4
    assert _same(_weights(res.policy), seen[4])


def test_the_same_seed_trains_the_same_router(ray_session):
    """PPOTrainConfig.seed reaches RLlib (learner and env RNG): two runs with one seed export
    identical weights and score identically on the held-out split."""
    cfg = dataclasses.replace(SELECT, iterations=2, select_every=1, seed=3)
    a, b = (train_ppo(cfg, REC, ENV, select_on=VAL) for _ in range(2))
    assert [c["score"] for c in a.selection.curve] == [c["score"] for c in b.selection.curve]
    assert _same(_weights(a.policy), _weights(b.policy))
