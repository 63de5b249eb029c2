"""The drift detector: its KS statistic and false-alarm level, and on a trained mnist-5k
model, alarms on the three shifts and none on lightly augmented in-distribution digits.
(The measured numbers, over the live service, are `dynray bench drift`'s.)"""

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from dynray.bench.drift import in_distribution, replay, shifted
from dynray.drift import FEATURES, DriftConfig, DriftMonitor, DriftReference, critical_d, ks_statistic
from dynray.errors import ConfigError
from dynray.evaluation import collect_exit_outputs
from dynray.pipeline import drift_reference
from dynray.serving import metrics as M
from dynray.serving.drift import DriftWatch
from dynray.thresholds import CalibrationTarget, calibrate


def test_ks_statistic_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    ref = np.round(rng.normal(size=700), 1)  # rounded: many ties, as confidences near 1 have
    for shift in (0.0, 0.3, 1.0):
        win = np.round(rng.normal(shift, 1.0, size=100), 1)
        assert ks_statistic(np.sort(ref), win) == pytest.approx(ks_2samp(ref, win).statistic, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_the_critical_value_holds_its_false_alarm_rate(alpha):
    """Windows drawn like the reference exceed critical_d at about rate alpha, not more."""
    rng = np.random.default_rng(1)
    ref = np.sort(rng.uniform(size=1000))
    d = critical_d(100, 1000, alpha)
    rate = np.mean([ks_statistic(ref, rng.uniform(size=100)) > d for _ in range(2000)])
    assert rate <= 1.3 * alpha + 0.005 and rate >= 0.3 * alpha, (alpha, rate)


def _reference(n: int = 200) -> DriftReference:
    return DriftReference(values=np.random.default_rng(2).uniform(size=(n, len(FEATURES))))


def test_without_a_reference_drift_reports_no_reference_and_never_fails():
    mon = DriftMonitor(None)
    assert mon.observe(np.ones((500, len(FEATURES)))) is None
    st = mon.status()
    assert st["status"] == "no reference" and st["score"] is None and "calibrate" in st["fix"]
    assert DriftReference.from_meta({"dataset": "mnist-5k"}) is None  # an old version's metadata
    watch = DriftWatch(DriftConfig(), M.MemoryMetrics())
    watch.serve({"old:v1": None})
    assert watch.observe("old:v1", torch.rand(4, 1, 28, 28), torch.softmax(torch.randn(4, 10), 1)) is None
    assert watch.status()["versions"]["old:v1"]["status"] == "no reference"


def test_a_reference_survives_the_registry_metadata_round_trip():
    ref = _reference()
    back = DriftReference.from_meta({"drift_reference": ref.to_dict()})
    assert back.features == FEATURES and np.allclose(back.values, ref.values, rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(window=5), dict(check_every=0), dict(check_every=500), dict(alpha=0), dict(min_effect=1.5)])
def test_bad_detector_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        DriftConfig(**bad)


def test_an_alarm_is_one_episode_counted_logged_and_handed_to_the_hook(caplog):
    metrics, seen = M.MemoryMetrics(), []

    class Hook:
        def __call__(self, version, alarm):
            seen.append((version, alarm.feature))

        def history(self):
            return [{"version": v} for v, _ in seen]

    watch = DriftWatch(DriftConfig(window=50, check_every=10), metrics, on_alarm=Hook())
    ref = DriftReference(values=np.random.default_rng(3).uniform(0.0, 0.5, size=(300, len(FEATURES))))
    watch.serve({"m:v1": ref})
    black = torch.zeros(1, 1, 28, 28)  # every pixel feature far below the reference's range
    probs = torch.full((1, 10), 0.1)
    raised = [watch.observe("m:v1", black, probs) for _ in range(200)]
    assert sum(a is not None for a in raised) == 1 and seen and seen[0][0] == "m:v1"
    assert metrics.count(M.DRIFT_ALARMS, model_version="m:v1") == 1
    assert metrics.gauges[(M.DRIFT_SCORE, (("model_version", "m:v1"),))] > 0.4
    assert "drift alarm on m:v1" in caplog.text
    st = watch.status()
    assert st["versions"]["m:v1"]["status"] == "alarm" and st["cost_ms_per_request"] > 0 and st["on_alarm"] == [{"version": "m:v1"}]

    class Failing(Hook):
        def __call__(self, version, alarm):
            raise RuntimeError("the job API is down")

    watch.on_alarm = Failing()  # a failing hook: the alarm still counts, nothing raises
    watch.serve({"m:v2": ref})
    assert any(watch.observe("m:v2", black, probs) is not None for _ in range(100))
    assert metrics.count(M.DRIFT_ALARMS, model_version="m:v2") == 1


@pytest.fixture(scope="module")
def calibrated(trained_net, mnist5k):
    val = mnist5k["val"]
    rule = calibrate(collect_exit_outputs(trained_net, val.images, val.labels), CalibrationTarget(max_drop=0.01)).rule
    return trained_net, rule, drift_reference(trained_net, rule, val)


def test_no_alarm_on_lightly_augmented_test_digits(calibrated, mnist5k):
    model, rule, ref = calibrated
    (r,) = replay(model, rule, ref, [in_distribution(mnist5k["test"].images, 2000, seed=0)])
    assert r.alarms_at == () and max(r.scores) < r.threshold, (max(r.scores), r.threshold)


@pytest.mark.parametrize("shift", ["inverted", "rotated90", "noise"])
def test_each_shift_alarms_within_200_requests(calibrated, mnist5k, shift):
    model, rule, ref = calibrated
    test = mnist5k["test"].images
    warm, r = replay(model, rule, ref, [in_distribution(test, 150, seed=1), shifted(shift, test, 300, seed=2)])
    assert warm.alarms_at == ()
    assert r.alarms_at and r.alarms_at[0] <= 200, (shift, r.alarms_at, r.scores[-5:])
    assert len(r.alarms_at) == 1  # one episode while the shift lasts
