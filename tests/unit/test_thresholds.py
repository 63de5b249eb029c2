"""Hybrid thresholds: the rule, calibration to both targets, sensitivity, schedules."""

from __future__ import annotations

import math

import pytest
import torch

from dynray.errors import CalibrationError, ConfigError, UnknownNameError
from dynray.evaluation import ExitRecords, oracle, simulate
from dynray.annealing import anneal, anneal_vector
from dynray.thresholds import CalibrationTarget, ThresholdRule, calibrate, sensitivity


def synthetic_records(n: int = 600, seed: int = 0) -> ExitRecords:
    """Three exits; later exits are more accurate, and confidence tracks correctness."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)  # per-sample: hard samples fail early exits
    logits = []
    for k, skill in enumerate((0.55, 0.8, 0.95)):
        ok = difficulty < skill
        wrong = (labels + 1 + torch.randint(0, 9, (n,), generator=g)) % 10
        pred = torch.where(ok, labels, wrong)
        margin = 1.0 + 4.0 * (skill - difficulty).abs() + 0.5 * torch.rand(n, generator=g)
        z = torch.randn(n, 10, generator=g) * 0.3
        z[torch.arange(n), pred] += margin
        logits.append(z)
    complexity = torch.stack([difficulty, difficulty, 1 - difficulty, torch.rand(n, generator=g)], 1).clamp(0, 1)
    return ExitRecords(logits=torch.stack(logits), complexity=complexity, labels=labels,
                       cum_macs=torch.tensor([1e5, 1e6, 4e6], dtype=torch.float64), full_macs=int(3.9e6))


@pytest.mark.parametrize("drop", [0.0, 0.005, 0.02])
def test_calibrator_meets_accuracy_target_on_val(drop):
    rec = synthetic_records()
    res = calibrate(rec, CalibrationTarget(max_drop=drop))
    out = simulate(rec, res.rule)
    assert out.accuracy >= rec.exit_accuracy()[-1] - drop - 1e-9
    assert out.accuracy == pytest.approx(res.val.accuracy)
    # and it really saves compute: samples that all exits get right leave early
    assert out.exit_fractions[0] > 0.03
    assert out.mean_macs < 0.7 * float(rec.cum_macs[-1])


def test_looser_target_never_costs_more():
    rec = synthetic_records()
    strict = calibrate(rec, CalibrationTarget(max_drop=0.0))
    loose = calibrate(rec, CalibrationTarget(max_drop=0.03))
    assert loose.val.mean_macs <= strict.val.mean_macs


@pytest.mark.parametrize("budget", [3e5, 1e6, 2e6])
def test_calibrator_meets_macs_budget(budget):
    rec = synthetic_records()
    res = calibrate(rec, CalibrationTarget(macs_budget=budget))
    assert simulate(rec, res.rule).mean_macs <= budget
    assert res.val.accuracy > 0.5


def test_impossible_targets_are_refused():
    rec = synthetic_records()
    with pytest.raises(CalibrationError, match="below the cost of the first exit"):
        calibrate(rec, CalibrationTarget(macs_budget=5e4))
    with pytest.raises(CalibrationError, match="impossible accuracy-drop"):
        CalibrationTarget(max_drop=-0.01)
    with pytest.raises(CalibrationError, match="exactly one"):
        CalibrationTarget(max_drop=0.01, macs_budget=1e6)
    with pytest.raises(CalibrationError, match="exactly one"):
        CalibrationTarget()


def test_sensitivity_signs_and_use():
    rec = synthetic_records()
    res = calibrate(rec, CalibrationTarget(max_drop=0.01))
    assert len(res.sensitivity) == 2
    for s in sensitivity(rec, ThresholdRule(thresholds=(0.6, 0.6))):
        # raising a threshold keeps samples longer: never cheaper, never less accurate here
        assert s.d_macs_d_threshold >= 0
        assert s.d_accuracy_d_threshold >= 0
    assert any(s.d_macs_d_threshold > 0 for s in sensitivity(rec, ThresholdRule(thresholds=(0.6, 0.6))))


def test_complexity_term_demands_more_confidence_from_complex_inputs():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    cx = torch.tensor([[0.0] * 4, [1.0] * 4])
    rule = ThresholdRule(thresholds=(0.9,), complexity_weight=0.2)
    s = rule.score(0, logits, cx)
    assert s[0] > s[1]
    assert rule.stop(0, logits, cx).tolist() == [True, False]
    assert ThresholdRule.from_dict(rule.to_dict()) == rule


def test_rule_validation():
    with pytest.raises(UnknownNameError, match="max_softmax"):
        ThresholdRule(thresholds=(0.5,), confidence="max_sofmax")
    with pytest.raises(ConfigError):
        ThresholdRule(thresholds=(math.inf,))


def test_oracle_is_a_floor():
    rec = synthetic_records()
    orc = oracle(rec)
    res = calibrate(rec, CalibrationTarget(max_drop=0.0))
    assert orc.accuracy >= max(rec.exit_accuracy())
    assert orc.mean_macs <= res.val.mean_macs
    assert oracle(rec, unsolved="first").mean_macs <= orc.mean_macs


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_schedules_go_from_start_to_end_monotonically(kind):
    vals = [anneal(kind, 0.5, 0.9, p / 10) for p in range(11)]
    assert vals[0] == pytest.approx(0.5) and vals[-1] == pytest.approx(0.9)
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))
    assert anneal_vector(kind, (0.3, 1.0), (1.0, 1.0), 1.0) == pytest.approx((1.0, 1.0))


def test_schedules_differ_and_validate():
    mid = {k: anneal(k, 0.0, 1.0, 0.25) for k in ("linear", "cosine", "exponential")}
    assert mid["cosine"] < mid["linear"] < mid["exponential"]
    with pytest.raises(UnknownNameError):
        anneal("step", 0, 1, 0.5)
    with pytest.raises(ConfigError):
        anneal("linear", 0, 1, 1.5)
