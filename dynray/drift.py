"""Drift detection on the serving path: is live traffic still like the calibration data?

The calibrated accuracy of an early-exit model holds only for inputs like its val split.
At calibration :func:`reference_from` keeps, for every val sample, the four raw complexity
features (:func:`dynray.complexity.raw_features`) and the confidence of the answer the
calibrated stop rule gives; the reference is saved with the model version
(``meta["drift_reference"]``). While serving, :class:`DriftMonitor` keeps the same
features of the last ``window`` answered samples and, every ``check_every`` samples, runs
a two-sample Kolmogorov-Smirnov test of each feature against the reference.

**Score and alarm.** The score is the largest KS statistic D over the features (0: same
distribution, 1: disjoint). An alarm needs a shift that is both significant and material:
D above the asymptotic critical value for the window and reference sizes at level
``alpha / F`` per feature (Bonferroni), and above ``min_effect``. The first part bounds the
false alarms of sampling noise: under traffic drawn like the reference one check alarms
with probability at most ``alpha``, so over N samples the expected number of false checks
is at most ``alpha * N / check_every`` (5000 samples at the defaults: 0.05). The second
ignores benign variation the KS test alone would flag with enough samples: lightly
rotated or shifted digits move the edge-energy feature's D by about 0.3 on mnist-5k, the
shifts that matter move some feature's D by 0.55 to 1. At the defaults ``min_effect``
(0.4) is the binding threshold. An alarm is one episode: raised once, cleared when the
score falls below ``clear_ratio`` of the threshold.

**Reference.** The val split plus one copy under the training augmentation (the inputs the
model was trained on), so digits a little off-centre are not called drift.

Why both kinds of feature: inverting or adding noise to digits moves the pixel statistics,
but rotating them by 90 degrees leaves all four exactly unchanged (they are invariant to
the rotation); only the model's confidence sees it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from dynray.complexity import FEATURE_NAMES, raw_features
from dynray.errors import ConfigError

__all__ = ["FEATURES", "DriftConfig", "DriftReference", "DriftAlarm", "DriftMonitor", "sample_features", "reference_from",
           "critical_d", "ks_statistic", "REFERENCE_KEY"]

FEATURES: tuple[str, ...] = (*FEATURE_NAMES, "confidence")
REFERENCE_KEY = "drift_reference"
"""Where a model version's metadata keeps its reference."""
_MIN_REFERENCE = 50


@dataclass(frozen=True, kw_only=True)
class DriftConfig:
    """The detector's window and false-alarm level."""

    window: int = 100
    """Latest answered samples compared with the reference."""
    check_every: int = 10
    """Samples between two tests (a test costs about 0.1 ms)."""
    alpha: float = 1e-4
    """False-alarm probability of one test on traffic drawn like the reference (Bonferroni over the features)."""
    min_effect: float = 0.4
    """Least KS statistic that alarms, however significant: benign variation (the shifts and
    rotations the model was trained to ignore, resampling blur) moves D by up to ~0.3."""
    clear_ratio: float = 0.75
    """An alarm clears once the score is below this share of the threshold (0.3 at the defaults:
    a window of in-distribution traffic scores about 0.1 to 0.25)."""

    def __post_init__(self) -> None:
        if self.window < 20:
            raise ConfigError("drift window too small for a KS test", got=self.window, fix="window >= 20 samples (default 100)")
        if not 1 <= self.check_every <= self.window:
            raise ConfigError("check_every must be between 1 and the window", got=self.check_every, fix=f"1..{self.window}")
        if not 0 < self.min_effect < 1:
            raise ConfigError("min_effect is a KS statistic in (0, 1)", got=self.min_effect, fix="e.g. 0.4")
        if not 0 < self.alpha < 1 or not 0 < self.clear_ratio < 1:
            raise ConfigError("alpha and clear_ratio must lie in (0, 1)", got=(self.alpha, self.clear_ratio), fix="e.g. alpha 1e-4, clear_ratio 0.75")


def sample_features(images: torch.Tensor, probs: torch.Tensor) -> np.ndarray:
    """images [B, C, H, W] in [0, 1], answered probabilities [B, classes] -> [B, len(FEATURES)]."""
    with torch.no_grad():
        cx = raw_features(images)  # [B, 4]
        conf = probs.max(dim=1).values.to(cx.dtype).unsqueeze(1)  # [B, 1]
        return torch.cat([cx, conf], dim=1).numpy().astype(np.float64)


@dataclass(frozen=True)
class DriftReference:
    """Per-sample features of the calibration split: ``values`` [N, F], columns ``features``."""

    values: np.ndarray
    features: tuple[str, ...] = FEATURES
    source: str = "val"

    def __post_init__(self) -> None:
        if self.values.ndim != 2 or self.values.shape[1] != len(self.features) or self.values.shape[0] < _MIN_REFERENCE:
            raise ConfigError("bad drift reference", got=self.values.shape, fix=f"[N >= {_MIN_REFERENCE}, {len(self.features)}] values, one column per feature")

    def to_dict(self) -> dict:
        """Plain JSON for the registry metadata (6 significant digits)."""
        return {"features": list(self.features), "source": self.source, "values": [[float(f"{v:.6g}") for v in row] for row in self.values.tolist()]}

    @classmethod
    def from_dict(cls, d: dict) -> DriftReference:
        return cls(values=np.asarray(d["values"], dtype=np.float64), features=tuple(d["features"]), source=d.get("source", "val"))

    @classmethod
    def from_meta(cls, meta: dict) -> DriftReference | None:
        """A version's reference, or None when it was registered without one (older versions)."""
        d = meta.get(REFERENCE_KEY)
        return cls.from_dict(d) if d else None


def reference_from(images: torch.Tensor, probs: torch.Tensor, *, source: str = "val") -> DriftReference:
    """The reference of a split: its images and the probabilities the served rule answers them with."""
    return DriftReference(values=np.concatenate([sample_features(images[i : i + 1024], probs[i : i + 1024]) for i in range(0, len(images), 1024)]), source=source)


def critical_d(n: int, m: int, alpha: float) -> float:
    """Asymptotic two-sample KS critical value of D at level ``alpha`` for sizes n and m."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def ks_statistic(ref_sorted: np.ndarray, window: np.ndarray) -> float:
    """Two-sample KS statistic of a sorted reference column and a window column (ties handled)."""
    w = np.sort(window)
    pts = np.concatenate([ref_sorted, w])
    cdf_r = np.searchsorted(ref_sorted, pts, side="right") / len(ref_sorted)
    cdf_w = np.searchsorted(w, pts, side="right") / len(w)
    return float(np.abs(cdf_r - cdf_w).max())


@dataclass(frozen=True)
class DriftAlarm:
    """A raised alarm: the score, the threshold, the feature that moved most, when."""

    score: float
    threshold: float
    feature: str
    samples: int
    """Samples observed when it was raised."""

    def message(self, version: str) -> str:
        return (f"drift alarm on {version}: KS D {self.score:.3f} > {self.threshold:.3f} on '{self.feature}' over the last window, after {self.samples} samples; "
                f"the calibrated accuracy may no longer hold: recalibrate (`dynray calibrate --model {version}`) on data like the new traffic")


@dataclass
class DriftMonitor:
    """The windowed detector of one served version (``reference`` None: it reports "no reference")."""

    reference: DriftReference | None
    cfg: DriftConfig = field(default_factory=DriftConfig)
    score: float | None = None
    feature: str | None = None
    samples: int = 0
    alarms: int = 0
    alarmed: bool = False

    def __post_init__(self) -> None:
        self._win: deque[np.ndarray] = deque(maxlen=self.cfg.window)
        self._since = 0
        if self.reference is not None:
            self._sorted = [np.sort(self.reference.values[:, j]) for j in range(len(self.reference.features))]
            sig = critical_d(self.cfg.window, len(self.reference.values), self.cfg.alpha / len(self.reference.features))
            self.threshold = max(sig, self.cfg.min_effect)
        else:
            self.threshold = float("nan")

    def observe(self, feats: np.ndarray) -> DriftAlarm | None:
        """Add answered samples' features [B, F]; returns the alarm when this raises one."""
        if self.reference is None:
            return None
        for row in feats:
            self._win.append(row)
        self.samples += len(feats)
        self._since += len(feats)
        if len(self._win) < self.cfg.window or self._since < self.cfg.check_every:
            return None
        self._since = 0
        return self._check()

    def _check(self) -> DriftAlarm | None:
        win = np.stack(self._win)  # [W, F]
        ds = [ks_statistic(self._sorted[j], win[:, j]) for j in range(win.shape[1])]
        j = int(np.argmax(ds))
        self.score, self.feature = ds[j], self.reference.features[j]  # type: ignore[union-attr]
        if self.alarmed:
            if self.score < self.cfg.clear_ratio * self.threshold:
                self.alarmed = False
            return None
        if self.score > self.threshold:
            self.alarmed, self.alarms = True, self.alarms + 1
            return DriftAlarm(self.score, self.threshold, self.feature, self.samples)
        return None

    def status(self) -> dict:
        """What `dynray serve status` shows: status, score, threshold, samples, alarms."""
        if self.reference is None:
            return {"status": "no reference", "score": None, "samples": self.samples,
                    "fix": "this version was registered without a drift reference: calibrate it again (`dynray calibrate`) to get one"}
        state = "alarm" if self.alarmed else ("ok" if self.score is not None else "warming up")
        return {"status": state, "score": self.score, "threshold": self.threshold, "feature": self.feature, "samples": self.samples,
                "alarms": self.alarms, "window": self.cfg.window, "alpha": self.cfg.alpha}
