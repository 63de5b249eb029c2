"""TrafficSplit: weighted A/B draw, explicit versions, validation, counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dynray.errors import ConfigError, RequestError
from dynray.serving.split import TrafficSplit

VERSIONS = ("net:v1", "net:v2", "net:v3", "net:v4")


def _draw(split: TrafficSplit, n: int, seed: int = 7) -> Counter:
    rng = random.Random(seed)
    return Counter(split.pick(rng=rng) for _ in range(n))


@pytest.mark.parametrize("weights", [(0.7, 0.2, 0.1, 0.0), (1.0, 1.0, 1.0, 1.0), (5.0, 3.0, 0.0, 2.0)])
def test_weighted_pick_matches_the_shares(weights):
    split = TrafficSplit(versions=VERSIONS, weights=weights)
    n = 4000
    counts = _draw(split, n)
    assert sum(counts.values()) == n
    assert set(counts) <= set(VERSIONS)
    for v, share in split.shares.items():
        # binomial sd of a share at n=4000 is sqrt(p(1-p)/n) <= 0.5/sqrt(4000) < 0.8 pt, so
        # ±3 pt is about 4 sd: a fixed seed passes, and a wrong weighting would not
        assert abs(counts[v] / n - share) <= 0.03, (v, counts[v] / n, share)


def test_zero_weight_is_never_drawn_but_can_be_requested():
    split = TrafficSplit(versions=VERSIONS, weights=(0.5, 0.0, 0.5, 0.0))
    counts = _draw(split, 4000, seed=11)
    assert counts["net:v2"] == 0 and counts["net:v4"] == 0
    assert counts["net:v1"] > 0 and counts["net:v3"] > 0
    assert split.pick("net:v2") == "net:v2"
    assert split.shares["net:v2"] == 0.0


def test_same_seed_same_draws():
    split = TrafficSplit(versions=VERSIONS, weights=(0.4, 0.3, 0.2, 0.1))
    a = [split.pick(rng=random.Random(3)) for _ in range(5)]
    r1, r2 = random.Random(5), random.Random(5)
    assert [split.pick(rng=r1) for _ in range(50)] == [split.pick(rng=r2) for _ in range(50)]
    assert len(set(a)) == 1  # a fresh generator with one seed gives the same first draw


def test_requested_version_is_honoured():
    split = TrafficSplit(versions=VERSIONS, weights=(1.0, 0.0, 0.0, 0.0))
    rng = random.Random(0)
    for v in VERSIONS:
        assert split.pick(v, rng=rng) == v
        assert split.pick(requested=v) == v


@pytest.mark.parametrize("requested", ["net:v9", "net", "", "NET:V1"])
def test_unknown_requested_version_is_a_422(requested):
    split = TrafficSplit(versions=VERSIONS, weights=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(RequestError) as err:
        split.pick(requested, rng=random.Random(0))
    assert err.value.status == 422
    assert "net:v1" in err.value.fix


@pytest.mark.parametrize(
    "versions,weights",
    [
        (("a", "b"), (1.0,)),  # fewer weights than versions
        (("a",), (0.5, 0.5)),  # more weights than versions
        ((), ()),  # nothing to serve
        (("a", "a"), (0.5, 0.5)),  # duplicate version
        (("a", "b"), (1.0, -0.1)),  # negative weight
        (("a", "b"), (0.0, 0.0)),  # zero sum
    ],
)
def test_validation(versions, weights):
    with pytest.raises(ConfigError):
        TrafficSplit(versions=versions, weights=weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        TrafficSplit(versions=("a", "b"), weights=(1.0, bad))


def test_of_defaults_to_the_first_version():
    split = TrafficSplit.of(["a:v1", "b:v1", "c:v1"], None)
    assert split.versions == ("a:v1", "b:v1", "c:v1") and split.weights == (1.0, 0.0, 0.0)
    assert set(_draw(split, 200)) == {"a:v1"}
    split = TrafficSplit.of(["a:v1", "b:v1"], [3, 1])
    assert split.weights == (3.0, 1.0) and all(isinstance(w, float) for w in split.weights)
    assert split.shares == {"a:v1": 0.75, "b:v1": 0.25}
    with pytest.raises(ConfigError):
        TrafficSplit.of(["a:v1", "b:v1"], [1.0])


def test_describe_counts_recorded_requests():
    split = TrafficSplit(versions=("a:v1", "b:v2"), weights=(3.0, 1.0))
    assert split.describe() == {"versions": ["a:v1", "b:v2"], "split": {"a:v1": 0.75, "b:v2": 0.25}, "requests": {"a:v1": 0, "b:v2": 0}}
    rng = random.Random(1)
    picked = [split.pick(rng=rng) for _ in range(20)]
    for v in picked:
        split.record(v)
    split.record("b:v2")
    d = split.describe()
    assert d["requests"] == {"a:v1": picked.count("a:v1"), "b:v2": picked.count("b:v2") + 1}
    assert sum(d["requests"].values()) == 21
    assert d["split"] == split.shares and d["versions"] == list(split.versions)


def test_counts_do_not_affect_equality_and_are_per_instance():
    a = TrafficSplit(versions=("x:v1",), weights=(1.0,))
    b = TrafficSplit(versions=("x:v1",), weights=(1.0,))
    a.record("x:v1")
    assert a == b
    assert a.describe()["requests"] == {"x:v1": 1} and b.describe()["requests"] == {"x:v1": 0}
