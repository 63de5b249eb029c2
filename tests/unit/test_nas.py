"""Architecture search without Ray: space, encoding, evolution, DARTS, predictor, Pareto."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from dynray.errors import ConfigError, UnknownNameError
from dynray.models import StopAtExit, build
from dynray.nas import Candidate, NASConfig, SearchSpace, default_candidate
from dynray.nas.darts import DartsConfig, DartsSupernet, darts_search
from dynray.nas.evolution import EvolutionConfig
from dynray.nas.evolution_searcher import EvolutionSearcher
from dynray.nas.objectives import ObjectiveConfig, measure
from dynray.nas.pareto import dominates, pareto_front, pareto_ranks
from dynray.nas.predictor import Observation, PerformancePredictor, heldout_spearman
from dynray.nas.trainable import TrialSettings, build_candidate, train_config_for
from dynray.models.defaults import default_model_config, foundation_model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPACE = SearchSpace()


def test_every_sampled_config_builds_and_runs_forward(mnist5k):
    rng = random.Random(0)
    x = mnist5k["val"].images[:8]
    settings = TrialSettings()
    for _ in range(40):
        cand = SPACE.sample(rng)
        model = build_candidate(cand, settings, mnist5k["train"]).eval()
        assert model.num_exits == cand.num_stages
        assert (model.cfg.moe is not None) == cand.moe
        with torch.no_grad():
            logits = model(x)
            out = model.forward_exits(x, StopAtExit(-1))
        assert len(logits) == cand.num_stages and all(z.shape == (8, 10) for z in logits)
        assert torch.allclose(out.logits, logits[-1], atol=1e-5)
        assert model.mac_profile.full > 0


def test_default_candidate_is_the_foundation_default():
    """The NAS's reference point is the foundation's 3-stage net (the 4-stage dense default's
    (2, 2, 1, 1) strides are outside the search space, whose strides are (2, ..., 2, 1))."""
    cfg = default_candidate(SPACE.max_stages).model_config(default_model_config("mnist-5k"))
    base = foundation_model_config("mnist-5k")
    a, b = build(cfg), build(base)
    assert a.mac_profile.full == b.mac_profile.full and a.mac_profile.stage == b.mac_profile.stage
    assert SPACE.contains_default()


def test_vector_encoding_round_trips():
    rng = random.Random(1)
    for _ in range(200):
        c = SPACE.sample(rng)
        v = SPACE.encode(c)
        assert v.shape == (SPACE.dim,) and v.min() >= 0 and v.max() <= 1
        assert SPACE.decode(v) == c
    d = default_candidate(SPACE.max_stages)
    assert SPACE.decode(SPACE.encode(d)) == d
    assert Candidate.from_dict(d.to_dict()) == d
    for _ in range(50):  # any vector decodes to a valid candidate
        SPACE.check(SPACE.decode(np.asarray([rng.random() for _ in range(SPACE.dim)])))
    with pytest.raises(ConfigError, match="wrong length"):
        SPACE.decode(np.zeros(3))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"stages": ()}, "stages choices are empty"),
        ({"widths": ()}, "widths are empty"),
        ({"widths": ((8, 16), ())}, r"widths\[1\] choices are empty"),
        ({"layers": ()}, "layers choices are empty"),
        ({"kernels": (4,)}, "must be odd"),
        ({"experts": (2,), "top_k": (1, 4)}, "contradictory search space"),
        ({"lr": (1e-2, 1e-3)}, "0 < low <= high"),
        ({"moe": ()}, "moe choices"),
    ],
)
def test_empty_or_contradictory_spaces_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        SearchSpace(**kw)
    assert "fix:" in str(e.value)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"time_budget_min": 0}, ConfigError, "time budget must be a positive"),
        ({"trials": 0}, ConfigError, "at least one trial"),
        ({"searcher": "evolutoin"}, UnknownNameError, "did you mean evolution"),
        ({"grace": 30}, ConfigError, "grace <= epochs"),
        ({"space": SearchSpace(widths=((8,), (16,), (32,)))}, ConfigError, "does not contain the foundation default"),
    ],
)
def test_bad_search_configs_are_refused_with_the_fix(kw, err, match):
    with pytest.raises(err, match=match):
        NASConfig(**kw)


def test_candidate_outside_the_space_is_refused():
    c = replace(default_candidate(SPACE.max_stages), widths=(16, 32, 64, 7))
    with pytest.raises(ConfigError, match=r"widths\[3\] is outside the search space"):
        SPACE.check(c)


def _synthetic(space: SearchSpace, target: np.ndarray):
    """A smooth objective on the encoding: accuracy falls with the distance to ``target``
    (constant MACs, so the Pareto rank and the score agree)."""

    def f(c: Candidate) -> dict:
        d = float(np.abs(space.encode(c) - target).mean())
        return {"accuracy": 1.0 - d, "macs": 1e5, "latency_ms": 1.0 + d, "score": 1.0 - d}

    return f


@pytest.mark.parametrize("predictor_min, generations", [(0, 8), (8, 6)])
def test_evolution_improves_over_generations_on_a_synthetic_objective(predictor_min, generations):
    target = np.random.default_rng(3).random(SPACE.dim)
    f = _synthetic(SPACE, target)
    cfg = EvolutionConfig(population=8, elites=2, predictor_min=predictor_min, screen=16, seed=0)
    s = EvolutionSearcher(SPACE, cfg=cfg, max_epochs=1)
    scores = []
    for i in range(8 * generations):  # generations of 8
        tid = f"t{i}"
        c = Candidate.from_dict(s.suggest(tid))
        r = {**f(c), "epoch": 1, "training_iteration": 1}
        s.on_trial_result(tid, r)
        s.on_trial_complete(tid, r)
        scores.append(r["score"])
    gens = np.asarray(scores).reshape(generations, 8)
    assert gens[-1].mean() > gens[0].mean() + 0.05  # the last generation beats the random one
    assert max(scores[24:]) > max(scores[:8])  # and finds better individuals than it started with
    best = sorted(s.members, key=lambda m: m.result["score"], reverse=True)[:2]
    assert all(m in s.pool() for m in best)  # elitism: the best stay in the breeding pool
    assert (s.prescreened > 0) == (predictor_min > 0)


def test_evolution_suggests_the_reference_first_and_skips_failed_trials():
    ref = {**default_candidate(SPACE.max_stages).to_dict(), "reference": True}
    s = EvolutionSearcher(SPACE, cfg=EvolutionConfig(predictor_min=0), seeds=[ref])
    first = s.suggest("a")
    assert first["reference"] is True and Candidate.from_dict({k: v for k, v in first.items() if k != "reference"}) == default_candidate(SPACE.max_stages)
    s.suggest("b")
    s.on_trial_complete("b", None, error=True)
    assert s.failed == ["b"] and not s.members


def test_darts_alphas_receive_gradients_and_the_cell_discretises(mnist5k):
    torch.manual_seed(0)
    cfg = DartsConfig(widths=(8, 16, 32), positions=3)
    net = DartsSupernet(cfg, (1, 28, 28), 10)
    x, y = mnist5k["train"].images[:16], mnist5k["train"].labels[:16]
    loss = sum(torch.nn.functional.cross_entropy(z, y) for z in net(x)) + 0.1 * net.expected_macs() / net.max_macs()
    loss.backward()
    for stage in net.stages:
        g = stage.alpha.grad
        assert g is not None and torch.isfinite(g).all()
        assert (g[0, 1:].abs() > 0).all() and (g[1:].abs() > 0).all()  # every live operation
        assert g[0, 0] == 0  # the first position has no skip
    # force choices: stage 0 all skip after the first (5x5), stage 1 convs 3x3, stage 2 mixed
    with torch.no_grad():
        net.stages[0].alpha.copy_(torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))
        net.stages[1].alpha.copy_(torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]))
        net.stages[2].alpha.copy_(torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]))
    cand = net.discretise(SearchSpace(widths=((8,), (16,), (32,))), lr=3e-3, weight_decay=5e-4)
    assert cand.num_stages == 3 and cand.layers[:3] == (1, 3, 2) and cand.kernels[:3] == (5, 3, 5) and cand.widths[:3] == (8, 16, 32)
    model = build(cand.model_config(default_model_config("mnist-5k")))
    assert len(model(x)) == 3


def test_darts_search_alternates_and_returns_a_buildable_candidate(mnist5k):
    train = replace(mnist5k["train"], images=mnist5k["train"].images[:256], labels=mnist5k["train"].labels[:256])
    cfg = DartsConfig(widths=(8, 16, 32), epochs=1, batch_size=32)
    before = [s.alpha.detach().clone() for s in DartsSupernet(cfg, (1, 28, 28), 10).stages]
    res = darts_search(train, SPACE, cfg)
    assert len(res.history) == 1 and res.history[0]["arch_loss"] > 0
    assert any(not torch.allclose(torch.tensor(a), torch.softmax(b, -1), atol=1e-4) for a, b in zip(res.alphas, before))  # α moved
    SPACE.check(res.candidate)
    build(res.candidate.model_config(default_model_config("mnist-5k")))


def test_darts_refuses_a_supernet_outside_the_space(mnist5k):
    with pytest.raises(ConfigError, match="not a choice of the search space"):
        darts_search(mnist5k["train"], SPACE, DartsConfig(widths=(7, 16, 32)))


def test_pareto_front_and_ranks():
    pts = [(0.99, 300.0), (0.98, 100.0), (0.97, 200.0), (0.99, 400.0), (0.95, 50.0)]
    assert dominates(pts[1], pts[2]) and not dominates(pts[0], pts[1])
    assert pareto_front(pts) == [4, 1, 0]
    assert pareto_ranks(pts) == [0, 0, 1, 1, 0]


def test_predictor_ranks_held_out_trials_on_a_learnable_relation():
    rng = np.random.default_rng(0)
    obs = []
    for t in range(20):
        v = rng.random(6)
        for ep in (1, 2, 3):
            acc = 0.9 + 0.05 * v[0] - 0.03 * v[1] + 0.01 * ep
            obs.append(Observation(f"t{t}", v, ep, {"accuracy": acc, "macs": 1e5 * (1 + 4 * v[2]), "latency_ms": 1 + v[3]}))
    r = heldout_spearman(obs, 3, folds=5, at_epoch=1)
    assert r["trials"] == 20 and r["accuracy"] > 0.8 and r["macs"] > 0.9
    p = PerformancePredictor(3).fit(obs).predict(np.stack([obs[0].vector]))
    assert set(p) == {"accuracy", "macs", "latency_ms"} and 0 < p["accuracy"][0] < 1
    with pytest.raises(ConfigError, match="too few trials"):
        heldout_spearman(obs[:6], 3)


def test_measure_calibrates_on_val_and_reports_both_splits(mnist5k):
    torch.manual_seed(0)
    c = default_candidate(SPACE.max_stages)
    settings = TrialSettings()
    model = build_candidate(c, settings, mnist5k["train"])
    m = measure(model, mnist5k["val"], mnist5k["test"], ObjectiveConfig(latency_repeats=1))
    d = m.metrics(ObjectiveConfig())
    assert 0 <= d["accuracy"] <= 1 and 0 <= d["test_accuracy"] <= 1
    assert model.mac_profile.cumulative[0] <= d["macs"] <= model.mac_profile.full + 1
    assert d["latency_ms"] > 0 and train_config_for(c, settings).lr == c.lr


def test_asha_never_stops_the_reference_and_remembers_whom_it_stopped():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from dynray.nas.asha import ReferenceProtectedASHA

    asha = ReferenceProtectedASHA(time_attr="training_iteration", metric="score", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"reference": i == 0}) for i in range(6)]
    for t in trials:
        asha.on_trial_add(None, t)
    # rung 1: the reference scores worst of all, then five others arrive, each worse than the last
    decisions = {t.trial_id: asha.on_trial_result(None, t, {"training_iteration": 1, "score": 0.1 if t.config["reference"] else 1.0 - 0.1 * i}) for i, t in enumerate(trials)}
    assert decisions["t0"] == TrialScheduler.CONTINUE  # protected although it is the worst
    assert asha.stopped_early and all(decisions[t] == TrialScheduler.STOP for t in asha.stopped_early) and "t0" not in asha.stopped_early
    assert decisions["t1"] == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, trials[1], {"training_iteration": 9, "score": 0.9}) == TrialScheduler.STOP  # the end, not an early stop
    assert "t1" not in asha.stopped_early


def test_a_variant_generator_without_the_concurrency_limit_is_refused():
    """Tune ignores max_concurrent_trials for a variant generator (it wraps only a Searcher),
    so a searcher that forgets to pass it would run every trial at once."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from dynray.nas.search import _check_concurrency
    from dynray.nas.config import SEARCHERS
    from dynray.nas.searchers import SearchPlan

    cfg = NASConfig(searcher="random", trials=3, concurrency=1)
    forgot = SearchPlan(lambda c: None, BasicVariantGenerator(), {}, 3, False)
    with pytest.raises(ConfigError, match="max_concurrent=cfg.concurrency"):
        _check_concurrency(forgot, cfg)
    # the built-in random searcher passes it
    _check_concurrency(SEARCHERS["random"](cfg, None), cfg)


def test_a_trial_the_budget_cut_before_its_first_report_is_left_out_of_the_predictor_rows():
    """Tune returns such a trial with an empty config and no rows; the 4-stage space must not
    read it as the 3-stage default (which it would refuse, ending the whole search report)."""
    import pandas as pd

    from dynray.bench.nas import observations
    from dynray.nas.config import TrialRecord

    cfg = NASConfig(dataset="mnist-5k")
    assert cfg.space.max_stages == 4
    done = TrialRecord(trial_id="a", status="budget", candidate=default_candidate(4).to_dict(), epochs=1, metrics={"accuracy": 0.9}, reference=False)
    cut = TrialRecord(trial_id="b", status="budget", candidate={}, epochs=0, metrics={}, reference=False)
    rows = pd.DataFrame([{"training_iteration": 1, "accuracy": 0.9, "macs": 1e5, "latency_ms": 1.0}])
    obs = observations([done, cut], {"a": rows, "b": rows.iloc[:0]}, cfg)
    assert [o.trial for o in obs] == ["a"]
