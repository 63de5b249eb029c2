"""The NAS performance predictor ranks held-out trials better than chance.

The trial set is real and fixed: ``data/nas_trials_random.json`` holds the 45 trials of one
random-search run on mnist-5k (``dynray nas run --searcher random``), their reports of
epochs 1 and 2 (the first ASHA rung) and each candidate's proxy features as
:mod:`dynray.nas.proxies` computed them, so the test trains nothing and builds no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynray.errors import ConfigError
from dynray.nas.predictor import Observation, PerformancePredictor, PredictorConfig, heldout_spearman
from dynray.nas.proxies import DEFAULT_COLUMNS, CandidateFeatures, ProxyConfig
from dynray.nas.space import Candidate, SearchSpace

FIXTURE = Path(__file__).parent / "data" / "nas_trials_random.json"
SPACE = SearchSpace()


def _key(v: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(v, 6).tolist())


@pytest.fixture(scope="module")
def trials() -> tuple[list[Observation], dict, int]:
    d = json.loads(FIXTURE.read_text())
    assert tuple(d["columns"]) == DEFAULT_COLUMNS
    obs, table = [], {}
    for t in d["trials"]:
        v = SPACE.encode(Candidate.from_dict(t["candidate"]))
        table[_key(v)] = np.asarray(t["features"])
        obs += [Observation(t["trial"], v, r["epoch"], {k: r[k] for k in ("accuracy", "macs", "latency_ms", "test_accuracy")}) for r in t["reports"]]
    return obs, table, d["max_epochs"]


def _lookup(table: dict):
    return lambda vectors: np.stack([table[_key(v)] for v in np.atleast_2d(vectors)])


def test_the_predictor_ranks_held_out_trials_better_than_chance(trials):
    obs, table, max_epochs = trials
    r = heldout_spearman(obs, max_epochs, at_epoch=2, seed=0, features=_lookup(table), permutations=500)
    assert r["trials"] == 45
    # chance (permuted predictions) reaches ~0.25 with 45 trials; the fitted ensemble clearly more
    assert r["accuracy"] > r["accuracy_null95"] + 0.1 and r["accuracy_p"] < 0.01, r
    assert r["macs"] > 0.7, r  # adaptive MACs follow the size features
    assert r["val_test_spearman"] > 0.8  # the fixture's accuracies are measurable: test agrees with val

    # the same ensemble with each candidate's features dealt to another candidate ranks at chance
    keys = list(table)
    perm = np.random.default_rng(1).permutation(len(keys))
    shuffled = {k: table[keys[j]] for k, j in zip(keys, perm, strict=True)}
    s = heldout_spearman(obs, max_epochs, at_epoch=2, seed=0, features=_lookup(shuffled), permutations=100)
    assert s["accuracy"] < r["accuracy_null95"] < r["accuracy"], (s["accuracy"], r)


def test_the_predictor_keeps_the_searchers_api(trials):
    obs, table, max_epochs = trials
    p = PerformancePredictor(max_epochs, features=_lookup(table)).fit(obs)
    vectors = np.stack([obs[0].vector, obs[-1].vector])
    full, first = p.predict(vectors), p.predict(vectors, 1)
    assert set(full) == {"accuracy", "macs", "latency_ms"} and all(v.shape == (2,) for v in full.values())
    assert np.all((0 < full["accuracy"]) & (full["accuracy"] < 1)) and np.all(full["macs"] > 0)
    assert np.all(full["accuracy"] > first["accuracy"])  # more epochs, more accuracy
    # raw encodings work without a features callable (the predictor's default input)
    assert PerformancePredictor(max_epochs).fit(obs).predict(vectors)["accuracy"].shape == (2,)
    with pytest.raises(ConfigError, match="not fitted"):
        PerformancePredictor(max_epochs).predict(vectors)
    with pytest.raises(ConfigError, match="predictor members"):
        PredictorConfig(members=("svm",))
    with pytest.raises(ConfigError, match="proxy columns"):
        ProxyConfig(columns=("log_macs", "naswot"))


def test_a_candidate_run_twice_is_held_out_as_one(trials):
    obs, table, max_epochs = trials
    twin = [Observation(o.trial + "-again", o.vector, o.epoch, o.metrics) for o in obs if o.trial == obs[0].trial]
    r = heldout_spearman(obs + twin, max_epochs, at_epoch=2, seed=0, features=_lookup(table), permutations=10)
    assert r["trials"] == 46  # both runs compared, and never one fitted while the other is held out
    with pytest.raises(ConfigError, match="distinct candidates"):
        heldout_spearman([o for o in obs if o.trial in {obs[0].trial}] * 3, max_epochs)


def test_proxies_are_deterministic_and_grow_with_the_network():
    f = CandidateFeatures(SPACE, ProxyConfig(batch=8))
    small = Candidate(num_stages=2, widths=(8, 16, 32, 32), layers=(1, 1, 1, 1), kernels=(3, 3, 3, 3), exit_hidden=0)
    big = Candidate(num_stages=4, widths=(24, 48, 64, 64), layers=(3, 3, 3, 3), kernels=(5, 5, 5, 5), exit_hidden=64)
    vs = np.stack([SPACE.encode(small), SPACE.encode(big)])
    a = f(vs)
    assert a.shape == (2, len(DEFAULT_COLUMNS)) and np.isfinite(a).all()
    col = {n: i for i, n in enumerate(f.names)}
    assert a[1, col["log_macs"]] > a[0, col["log_macs"]] and a[1, col["log_params"]] > a[0, col["log_params"]] and a[1, col["synflow"]] > a[0, col["synflow"]]
    again = CandidateFeatures(SPACE, ProxyConfig(batch=8))(vs)
    np.testing.assert_allclose(a, again)
