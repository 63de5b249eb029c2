"""Cross-validated choice of the threshold family (confidence, β, γ) in ``calibrate``."""

from __future__ import annotations

import pytest
import torch

from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords, simulate
from dynray.thresholds import CalibrationTarget, calibrate

BETAS = dict(confidences=("max_softmax",), complexity_weights=(0.0, 0.1, 0.2), agreement_bonuses=(0.0,))
"""One confidence measure and three β: the choice under test is β alone (and it keeps the tests fast)."""


def two_exit_records(n: int = 400, seed: int = 0, *, informative: bool, wrong_frac: float = 0.15) -> ExitRecords:
    """Two exits; the last is always right, the first gets ``wrong_frac`` wrong and is less
    confident on those on average (overlapping logistic-normal confidences).

    ``informative``: the complexity score is high (0.8-1) exactly on the first exit's wrong
    answers and low (0-0.5) on its right ones; otherwise it is uniform noise.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    wrong = torch.rand(n, generator=g) < wrong_frac
    conf = 0.1 + 0.9 * torch.sigmoid(torch.where(wrong, 0.5, 2.5) + torch.randn(n, generator=g))  # [n] exit 1's max-softmax
    pred = torch.where(wrong, (labels + 1 + torch.randint(0, 9, (n,), generator=g)) % 10, labels)
    first = torch.zeros(n, 10)
    first[torch.arange(n), pred] = torch.log(9 * conf / (1 - conf))  # softmax max = conf over 10 classes
    last = torch.zeros(n, 10)
    last[torch.arange(n), labels] = 6.0
    if informative:
        c = torch.where(wrong, 0.8 + 0.2 * torch.rand(n, generator=g), 0.5 * torch.rand(n, generator=g))
    else:
        c = torch.rand(n, generator=g)
    return ExitRecords(logits=torch.stack([first, last]), complexity=c.unsqueeze(1).repeat(1, 4), labels=labels,
                       cum_macs=torch.tensor([1e5, 1e6], dtype=torch.float64), full_macs=int(1e6))


def test_cv_choice_is_deterministic_under_its_seed():
    rec = two_exit_records(informative=False, seed=5)
    target = CalibrationTarget(max_drop=0.005)
    a = calibrate(rec, target, cv_seed=3, **BETAS)
    b = calibrate(rec, target, cv_seed=3, **BETAS)
    assert a.cv_folds == 5 and len(a.cv) == 3
    assert a.rule == b.rule and a.cv == b.cv
    assert sum(r["chosen"] for r in a.cv) == 1
    for r in a.cv:  # the report's table: held-out mean and standard error of accuracy and MACs
        assert {"accuracy_mean", "accuracy_se", "mean_macs_mean", "mean_macs_se", "loss_mean", "loss_se", "admissible"} <= set(r)
    # the seed is the fold split: another seed measures other folds
    assert calibrate(rec, target, cv_seed=4, **BETAS).cv != a.cv


def test_cv_keeps_noise_complexity_out_where_the_single_fit_overfits_it():
    """Complexity is pure noise. Chosen on all of val, β > 0 sometimes wins (it fits the noise of
    400 samples by more than the 2% margin); cross-validated, β = 0 every time."""
    target = CalibrationTarget(max_drop=0.005)
    single, cv = [], []
    for seed in range(5):
        rec = two_exit_records(informative=False, seed=seed)
        single.append(calibrate(rec, target, cv_folds=0, **BETAS).rule.complexity_weight)
        cv.append(calibrate(rec, target, **BETAS).rule.complexity_weight)
    assert any(b > 0 for b in single), single  # the overfitting CV is there to prevent
    assert cv == [0.0] * 5, cv


def test_cv_uses_complexity_when_it_predicts_the_early_exit_mistakes():
    target = CalibrationTarget(max_drop=0.005)
    rec = two_exit_records(informative=True, seed=0)
    res = calibrate(rec, target, **BETAS)
    assert res.rule.complexity_weight > 0
    chosen = next(r for r in res.cv if r["chosen"])
    plain = next(r for r in res.cv if r["complexity_weight"] == 0.0)
    assert chosen["mean_macs_mean"] + chosen["mean_macs_se"] < plain["mean_macs_mean"]  # outside the one-SE band
    # and it generalises: on fresh samples it is cheaper than the confidence-only rule, as accurate
    fresh = two_exit_records(informative=True, seed=99, n=2000)
    beta0 = calibrate(rec, target, confidences=("max_softmax",), complexity_weights=(0.0,), agreement_bonuses=(0.0,))
    got, base = simulate(fresh, res.rule), simulate(fresh, beta0.rule)
    assert got.mean_macs < 0.8 * base.mean_macs
    assert got.accuracy >= base.accuracy - 0.01


def test_cv_under_a_mac_budget_meets_it_on_val():
    rec = two_exit_records(informative=True, seed=1)
    res = calibrate(rec, CalibrationTarget(macs_budget=4e5), **BETAS)
    assert res.cv_folds == 5 and res.rule.complexity_weight > 0
    assert simulate(rec, res.rule).mean_macs <= 4e5


def test_single_fit_stays_reachable_and_single_families_skip_cv():
    rec = two_exit_records(informative=False, seed=2)
    target = CalibrationTarget(max_drop=0.005)
    for folds in (0, 1):
        res = calibrate(rec, target, cv_folds=folds, **BETAS)
        assert res.cv == () and res.cv_folds == 0 and len(res.candidates) == 3
    one = calibrate(rec, target, confidences=("margin",), complexity_weights=(0.0,), agreement_bonuses=(0.0,))
    assert one.cv == () and one.cv_folds == 0


@pytest.mark.parametrize("folds", [-1, 2.5, True])
def test_bad_fold_counts_are_refused(folds):
    with pytest.raises(ConfigError, match="cv_folds must be a whole number"):
        calibrate(two_exit_records(informative=False, n=50), CalibrationTarget(max_drop=0.01), cv_folds=folds, **BETAS)


def test_too_few_samples_for_the_folds_are_refused():
    with pytest.raises(ConfigError, match="too few validation samples") as e:
        calibrate(two_exit_records(informative=False, n=9), CalibrationTarget(max_drop=0.01), cv_folds=5, **BETAS)
    assert "cv_folds=0" in str(e.value)
