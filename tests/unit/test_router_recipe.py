"""The router's training recipe without Ray: held-out iterate selection and the per-seed bench.

- :func:`~dynray.routing.ppo.select_iterate` keeps the best held-out iterate (recorded score
  sequences), and the scoring schedule scores every ``select_every``-th iteration and the last;
- :class:`~dynray.routing.ppo.ValScorer` is what its docstring says (reward minus the
  re-tuned thresholds', averaged over the grid);
- ``jobs.train_router`` refuses to select on a split PPO trains on;
- ``router.seeds`` has the fields the issue fixes, from the library (:func:`bench_seeds`) and
  from the job (``jobs.bench_router.run --seeds``, PPO training replaced by a stub, the rest real).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dynray.bench.report import format_router
from dynray.bench.router import SEED_METRICS, RouterBenchConfig, bench_router, bench_seeds, seed_entry, seeds_summary
from dynray.bench.trace import LoadShift
from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords
from dynray.routing.costs import RouteCosts, TierLoad
from dynray.routing.features import CONTINUE, OFFLOAD, STOP, CostWeights, obs_dim
from dynray.routing.policy import PolicyNet
from dynray.routing.ppo import PPOTrainConfig, ValScorer, is_selection_point, select_iterate
from dynray.routing.rollout import rollout, threshold_decide
from dynray.routing.tuning import exit_prices, tune_thresholds
from dynray.thresholds import ThresholdRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")
C = 10
COSTS = RouteCosts(stage_macs=(129216.0, 326784.0, 2710144.0), stage_ms=(0.15, 0.07, 0.2), edge_stages=2)
RULE = ThresholdRule(thresholds=(0.9, 0.9))
SMALL = RouterBenchConfig(curve_lambdas=(0.001, 0.005, 0.03), sweep_lambdas=(0.001, 0.03), max_drops=(0.0, 0.02),
                          shift=LoadShift(requests=200), shift_lat_weights=(1e-3,))
TINY_BENCH = RouterBenchConfig(curve_lambdas=(0.001, 0.03), sweep_lambdas=(0.03,), max_drops=(0.01,), shift=LoadShift(requests=100), shift_lat_weights=(1e-3,))


def _records(n: int, seed: int) -> ExitRecords:
    """3 exits whose accuracy rises with depth; right answers are more confident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    logits = []
    for p in (0.8, 0.9, 0.97):
        ok = torch.rand(n, generator=g) < p
        pred = torch.where(ok, labels, (labels + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C)
        margin = torch.where(ok, 2.0 + 3.0 * torch.rand(n, generator=g), 0.5 + torch.rand(n, generator=g))
        z = torch.randn(n, C, generator=g) * 0.3
        z[torch.arange(n), pred] += margin + 1.5
        logits.append(z)
    return ExitRecords(logits=torch.stack(logits), complexity=torch.rand(n, 4, generator=g), labels=labels,
                       cum_macs=torch.tensor([1e5, 4e5, 3e6], dtype=torch.float64), full_macs=3_000_000)


VAL, TEST = _records(300, 1), _records(300, 2)


def _policy(seed: int) -> PolicyNet:
    torch.manual_seed(seed)
    return PolicyNet([obs_dim(3), 16, 3]).eval()


def _always(action: int) -> PolicyNet:
    """A policy sure of one action everywhere (routers that surely measure differently)."""
    net = PolicyNet([obs_dim(3), 3])
    with torch.no_grad():
        net.linears()[0].weight.zero_()
        net.linears()[0].bias.copy_(torch.nn.functional.one_hot(torch.tensor(action), 3).float() * 10)
    return net.eval()


# --- iterate selection -------------------------------------------------------------------------


@pytest.mark.parametrize("curve, want", [
    ([(5, 0.01), (10, 0.04), (15, 0.02), (20, -0.1)], 10),  # a middle iterate beats the last
    ([(5, 0.03), (10, 0.01), (15, 0.02)], 5),  # the first one
    ([(5, -0.2), (10, -0.1)], 10),  # all below the thresholds: still the best
    ([(5, 0.02), (10, 0.02), (15, 0.01)], 10),  # ties: the later (more trained) iterate
    ([(5, float("nan")), (10, 0.0), (15, float("nan")), (20, float("inf"))], 10),  # a non-finite score never wins
    ([(5, float("nan")), (7, float("nan"))], 7),  # nothing finite: the last
    ([(3, 0.5)], 3),
])
def test_select_iterate_keeps_the_best_held_out_iterate(curve, want):
    assert select_iterate(curve) == want


def test_select_iterate_needs_a_scored_iterate():
    with pytest.raises(ConfigError, match="no scored iterate"):
        select_iterate([])


def test_scored_iterations_are_every_select_every_th_and_the_last():
    cfg = PPOTrainConfig(iterations=12, select_every=5)
    assert [i for i in range(1, 13) if is_selection_point(i, cfg, last=i == 12)] == [5, 10, 12]
    assert is_selection_point(7, cfg, last=True)  # the time budget ended training at 7
    assert not any(is_selection_point(i, dataclasses.replace(cfg, select_every=0), last=True) for i in range(1, 13))


def test_val_scorer_is_reward_minus_retuned_thresholds_over_the_grid():
    cfg = PPOTrainConfig(select_lambdas=(0.002, 0.02), select_lat=1e-3, select_cloud_slowdown=5.0)
    scorer = ValScorer(VAL, COSTS, cfg)
    pol = _policy(0)
    got = scorer(pol)
    gaps, rewards = [], []
    for lam in (0.002, 0.02):
        rule = tune_thresholds(VAL, exit_prices(COSTS), CostWeights(cost=lam))
        for cloud, lat in ((TierLoad(), 0.0), (TierLoad(slowdown=5.0), 1e-3)):
            w = CostWeights(cost=lam, lat=lat)
            r = float(rollout(VAL, COSTS, lambda o, k, lg: pol.act(o)[0], w, cloud=cloud).reward(w).mean())
            rewards.append(r)
            gaps.append(r - float(rollout(VAL, COSTS, threshold_decide(rule), w, cloud=cloud).reward(w).mean()))
    assert len(scorer.grid) == 4 and scorer.samples == 300
    assert got["score"] == pytest.approx(sum(gaps) / 4, abs=1e-12)
    assert got["reward"] == pytest.approx(sum(rewards) / 4, abs=1e-12)
    assert got["worst"] == pytest.approx(min(gaps), abs=1e-12)
    # the thresholds' part is a constant per grid point: the scores of two policies differ by their rewards' difference
    other = scorer(_policy(1))
    assert other["score"] - got["score"] == pytest.approx(other["reward"] - got["reward"], abs=1e-12)


def test_ppo_config_schedules_and_bad_values():
    assert PPOTrainConfig().schedule(1e-3, None) == 1e-3  # default: today's constants
    cfg = PPOTrainConfig(iterations=10, batch_size=1000, minibatch_size=500, lr_final=1e-4, entropy_coeff_final=0.0)
    assert cfg.schedule(cfg.lr, cfg.lr_final) == [[0, 1e-3], [10_000, 1e-4]]
    for bad in ({"select_every": -1}, {"select_lambdas": ()}, {"select_cloud_slowdown": 0.5}, {"lr_final": 0.0}, {"entropy_coeff_final": -0.1}):
        with pytest.raises(ConfigError):
            PPOTrainConfig(**bad)


def test_train_router_refuses_to_select_on_a_training_split():
    from jobs.train_router import Config

    assert Config().splits() == ("train",) and Config().select_split == "val"
    with pytest.raises(ConfigError, match="held out"):
        Config(train_splits="train+val")
    Config(train_splits="train+val", ppo=PPOTrainConfig(select_every=0))  # no selection: today's recipe is still possible
    with pytest.raises(ConfigError, match="select-split"):
        Config(select_split="holdout")


# --- router.seeds ----------------------------------------------------------------------------------


def _meta(seed: int) -> dict:
    return {"costs": COSTS.to_dict(), "train_minutes": 0.5 + seed, "iterations": 20, "env": {"train_splits": "train"}, "ppo": {"seed": seed},
            "selection": {"chosen_iteration": 10 + seed, "score": 0.01, "curve": [{"iteration": 5, "score": 0.0}, {"iteration": 10 + seed, "score": 0.01}], "split": "val"}}


def _check_seed_fields(e: dict) -> None:
    for k in ("hybrid", "ppo"):
        assert math.isfinite(e["equal_accuracy_cost_saving"][k])
        assert -1.0 <= e["load_shift"]["accuracy_delta"][k] <= 1.0
    assert math.isfinite(e["lambda_sweep_max_gap"])
    assert all(isinstance(e["load_shift"]["slo_misses"][k], int) for k in ("thresholds", "ppo", "hybrid"))


def test_router_seeds_have_the_issue_fields():
    entries = bench_seeds(VAL, TEST, RULE, [(s, _policy(s), _meta(s)) for s in (0, 1)], SMALL)
    assert [e["seed"] for e in entries] == [0, 1]
    for e in entries:
        _check_seed_fields(e)
        assert e["chosen_iteration"] == 10 + e["seed"] and e["val_use"] == {"ppo_train_splits": "train", "val_in_ppo_training": False,
                                                                            "val_chose_iterate": True, "gate_fitted_on": "val"}
    # each entry is that seed's full bench section, cut: the same numbers
    full = bench_router(VAL, TEST, COSTS, _policy(1), RULE, SMALL)
    e = entries[1]
    assert e["equal_accuracy_cost_saving"] == {k: full["equal_accuracy_cost_saving"][k] for k in ("hybrid", "ppo")}
    assert e["lambda_sweep_max_gap"] == full["lambda_sweep_max_gap"]
    assert e["load_shift"]["slo_misses"] == full["load_shift"]["slo_misses"]
    acc = full["load_shift"]["accuracy"]
    assert e["load_shift"]["accuracy_delta"] == {k: pytest.approx(acc[k] - acc["thresholds"], abs=1e-12) for k in ("ppo", "hybrid")}
    assert full["load_shift"]["accuracy_delta"] == e["load_shift"]["accuracy_delta"]  # added to the single-run section too
    # the spread over seeds
    summ = seeds_summary(entries)
    assert set(summ) == set(SEED_METRICS)
    vals = [entries[0]["lambda_sweep_max_gap"], entries[1]["lambda_sweep_max_gap"]]
    assert summ["lambda_sweep_max_gap"]["min"] == min(vals) and summ["lambda_sweep_max_gap"]["max"] == max(vals)
    assert seed_entry(full, 7)["seed"] == 7 and "chosen_iteration" not in seed_entry(full, 7)


def info_rule(reg, info) -> ThresholdRule:
    from dynray.store import load_model

    return load_model(reg, info.ref).rule


def test_bench_router_job_writes_router_seeds(tmp_path, monkeypatch):
    """``--seeds 0 1`` through the job: one router per seed via ``train_router.train`` (a stub here,
    the rest real), none registered; the single-run fields are still the registered router's."""
    from dynray.models import DynamicNetConfig, build
    from dynray.registry import ModelRegistry
    from dynray.routing.policy import find_policy, router_name, save_policy
    from dynray.store import save_model
    from jobs import bench_router as job
    from jobs import train_router

    monkeypatch.setenv("DYNRAY_HOME", str(tmp_path / "home"))
    reg = ModelRegistry(tmp_path / "home")
    torch.manual_seed(0)
    model = build(DynamicNetConfig(widths=(8, 8, 16), layers=(1, 1, 1), exit_hidden=16)).eval()
    model.complexity.fit(torch.rand(64, 1, 28, 28))  # the features' scale does not matter here
    info = save_model(reg, "tiny", model, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.9, 0.9)), metrics={})
    costs = RouteCosts.for_model(model)
    registered = save_policy(reg, info, _always(STOP), {"costs": costs.to_dict(), "train_minutes": 1.0, "env": {"train_splits": "train+val"}})
    calls = []

    def fake_train(cfg, *, registry=None):
        calls.append(cfg.ppo.seed)
        assert cfg.model == info.ref and cfg.train_splits == "train" and cfg.select_split == "val" and cfg.ppo.iterations == 3
        meta = {**_meta(cfg.ppo.seed), "costs": costs.to_dict(), "ppo": dataclasses.asdict(cfg.ppo)}
        return train_router.Trained(policy=_always((CONTINUE, OFFLOAD)[cfg.ppo.seed]), model=info, meta=meta)

    monkeypatch.setattr(train_router, "train", fake_train)
    monkeypatch.setattr(job, "RouterBenchConfig", lambda shift: dataclasses.replace(TINY_BENCH, shift=LoadShift(requests=shift.requests)))
    out = tmp_path / "bench.json"
    job.run(job.Config(json=str(out), model=info.ref, seeds=(0, 1), router_iterations=3, shift_requests=100))
    s = json.loads(out.read_text())["router"]
    assert calls == [0, 1]
    assert [e["seed"] for e in s["seeds"]] == [0, 1] and set(s["seeds_summary"]) == set(SEED_METRICS)
    for e in s["seeds"]:
        _check_seed_fields(e)
    # each seed's entry measures that seed's router
    from dynray.routing.cache import load_exit_cache

    val, test = (load_exit_cache(reg, info.ref, split)[1] for split in ("val", "test"))
    want = seed_entry(bench_router(val, test, costs, _always(OFFLOAD), info_rule(reg, info), dataclasses.replace(TINY_BENCH, shift=LoadShift(requests=100))), 1)
    assert {k: s["seeds"][1][k] for k in want} == json.loads(json.dumps(want))
    assert s["seeds"][0]["equal_accuracy_cost_saving"]["ppo"] != s["seeds"][1]["equal_accuracy_cost_saving"]["ppo"] != s["equal_accuracy_cost_saving"]["ppo"]
    # the single-run fields are the registered router's, and the seeds' routers were not registered
    assert s["router"] == registered.ref and find_policy(reg, info).ref == registered.ref and len(reg.list(router_name(info.name))) == 1
    for k in ("curves", "equal_accuracy_cost_saving", "load_shift", "lambda_sweep_max_gap", "train_minutes"):
        assert k in s
    assert s["val_use"]["val_in_ppo_training"] is True  # the old recipe's router: val was in its training data
    assert "2 PPO seeds" in format_router(s) and "held out" not in format_router(s)


def test_bench_router_rejects_bad_seeds():
    from jobs.bench_router import Config

    for bad in ((), (0, 0), (-1,)):
        with pytest.raises(ConfigError, match="--seeds"):
            Config(json="x.json", seeds=bad)
    assert Config(json="x.json").seeds is None  # default: only the registered router, as before
