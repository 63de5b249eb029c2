"""Hybrid thresholds: a stop rule on exit confidence and input complexity, its
calibration on the validation split, and its sensitivity analysis.

Rule: leave at exit k when ``conf_k(x) - β · (c(x) - 0.5) ≥ τ_k``, where ``conf`` is the
max-softmax probability, the top-2 margin or 1 - normalised entropy, and ``c`` in [0, 1]
is the sample's complexity score (weighted mean of the normalised complexity features).
A complex input needs more confidence to leave early (β > 0).

Calibration walks every threshold down from "never stop" one quantile step at a time. At
each step it uses the sensitivity of the candidate moves, dMACs/dτ over dAccuracy/dτ, to
take the move that saves the most compute per unit of accuracy lost, and stops at the
target (accuracy drop against the last exit, or a MAC budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from dynray.complexity import FEATURE_NAMES
from dynray.errors import CalibrationError, ConfigError, UnknownNameError
from dynray.evaluation import ExitRecords, Outcome, simulate

__all__ = [
    "CONFIDENCES",
    "ThresholdRule",
    "CalibrationTarget",
    "CalibrationResult",
    "ExitSensitivity",
    "calibrate",
    "sensitivity",
]


def _max_softmax(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, dim=1).amax(dim=1)


def _margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = F.softmax(logits, dim=1).topk(2, dim=1).values  # [b, 2]
    return top2[:, 0] - top2[:, 1]


def _neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    return 1.0 - h / math.log(logits.shape[1])


CONFIDENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_softmax": _max_softmax,
    "margin": _margin,
    "entropy": _neg_entropy,
}
_NEVER = 2.0  # above every confidence score: "never stop here"


@dataclass(frozen=True, kw_only=True)
class ThresholdRule:
    """Per-exit hybrid threshold stop rule (implements ``StopRule``)."""

    thresholds: tuple[float, ...]
    """τ_k for every exit but the last (the last exit always stops)."""
    confidence: str = "max_softmax"
    """Confidence measure: max_softmax, margin or entropy (1 - normalised entropy)."""
    complexity_weight: float = 0.0
    """β: extra confidence demanded per unit of complexity above 0.5 (0 = confidence only)."""
    feature_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    """Weights of the normalised complexity features in the complexity score (sum to 1)."""
    agreement_bonus: float = 0.0
    """γ: confidence credited at exit k >= 2 when its prediction agrees with exit k-1's
    (the "patience" evidence of PABEE, Zhou et al. 2020); 0 = off."""

    def __post_init__(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise UnknownNameError("confidence", self.confidence, CONFIDENCES)
        if len(self.feature_weights) != len(FEATURE_NAMES) or abs(sum(self.feature_weights) - 1) > 1e-6:
            raise ConfigError("feature_weights need one weight per feature, summing to 1", got=self.feature_weights, fix=f"features: {FEATURE_NAMES}")
        if any(not math.isfinite(t) for t in self.thresholds):
            raise ConfigError("thresholds must be finite", got=self.thresholds, fix=f"use {_NEVER} for 'never stop'")

    @property
    def uses_complexity(self) -> bool:
        return self.complexity_weight != 0.0

    def score(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        """Stop score of the running samples at exit k.

        logits [b, C], complexity [b, F], prev_pred [b] (exit k-1's argmax, None at exit 0) -> [b]
        """
        conf = CONFIDENCES[self.confidence](logits.float())
        if self.complexity_weight:
            c = complexity @ torch.tensor(self.feature_weights, dtype=complexity.dtype)  # [b]
            conf = conf - self.complexity_weight * (c - 0.5)
        if self.agreement_bonus and prev_pred is not None:
            conf = conf + self.agreement_bonus * (logits.argmax(dim=1) == prev_pred).to(conf.dtype)
        return conf

    def stop(self, k: int, logits: torch.Tensor, complexity: torch.Tensor, prev_pred: torch.Tensor | None = None) -> torch.Tensor:
        if k >= len(self.thresholds):
            return torch.ones(logits.shape[0], dtype=torch.bool)
        return self.score(k, logits, complexity, prev_pred) >= self.thresholds[k]

    def to_dict(self) -> dict:
        return {
            "kind": "hybrid_threshold",
            "thresholds": list(self.thresholds),
            "confidence": self.confidence,
            "complexity_weight": self.complexity_weight,
            "feature_weights": list(self.feature_weights),
            "agreement_bonus": self.agreement_bonus,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ThresholdRule":
        return cls(
            thresholds=tuple(d["thresholds"]),
            confidence=d.get("confidence", "max_softmax"),
            complexity_weight=float(d.get("complexity_weight", 0.0)),
            feature_weights=tuple(d.get("feature_weights", (0.25,) * 4)),
            agreement_bonus=float(d.get("agreement_bonus", 0.0)),
        )


@dataclass(frozen=True, kw_only=True)
class CalibrationTarget:
    """Exactly one of the two targets."""

    max_drop: float | None = None
    """Largest allowed accuracy drop against the last exit on val (0.005 = 0.5 pt), counted
    conservatively: the share of the last exit's correct answers that early exits get wrong."""
    macs_budget: float | None = None
    """Largest allowed mean MACs per sample on val."""

    def __post_init__(self) -> None:
        if (self.max_drop is None) == (self.macs_budget is None):
            raise CalibrationError("give exactly one calibration target", got=self, fix="use --max-drop X or --macs-budget Y")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 1.0:
            raise CalibrationError("impossible accuracy-drop target: it must be in [0, 1]", got=self.max_drop, fix="use e.g. --max-drop 0.005")
        if self.macs_budget is not None and not self.macs_budget > 0:
            raise CalibrationError("impossible MAC budget: it must be positive", got=self.macs_budget, fix="use a budget between the first exit's and the full network's MACs")


@dataclass(frozen=True)
class ExitSensitivity:
    exit: int
    threshold: float
    d_accuracy_d_threshold: float
    d_macs_d_threshold: float

    @property
    def macs_per_accuracy(self) -> float:
        """MACs saved per unit of accuracy given up when τ is lowered here."""
        return self.d_macs_d_threshold / self.d_accuracy_d_threshold if self.d_accuracy_d_threshold > 0 else math.inf


@dataclass(frozen=True)
class CalibrationResult:
    rule: ThresholdRule
    val: Outcome
    reference_accuracy: float  # last exit's accuracy on val
    target: CalibrationTarget
    sensitivity: tuple[ExitSensitivity, ...]
    candidates: tuple[dict, ...] = field(default=())  # every (confidence, β) tried, for the report


class _Evaluator:
    """(accuracy, mean MACs, lost) of threshold vectors on precomputed scores, in numpy.

    ``lost`` is the share of samples the last exit gets right and the rule gets wrong. The
    calibrator calls this tens of thousands of times on a few hundred samples, where numpy's
    per-call overhead is ~10x below torch's.
    """

    def __init__(self, rec: ExitRecords, scores: torch.Tensor) -> None:
        self.scores = scores.double().numpy()  # [K-1, N]
        self.correct = rec.correct.numpy()  # [K, N]
        self.last_ok = self.correct[-1]
        self.cost = rec.cum_macs.numpy()  # [K]
        self.n = self.scores.shape[1]
        self.cols = np.arange(self.n)
        self.always = np.ones((1, self.n), dtype=bool)

    def __call__(self, taus: Sequence[float]) -> tuple[float, float, float]:
        stop = np.vstack([self.scores >= np.asarray(taus)[:, None], self.always])  # [K, N]
        exit_index = stop.argmax(axis=0)  # first exit that says stop
        ok = self.correct[exit_index, self.cols]
        lost = np.count_nonzero(self.last_ok & ~ok)
        return np.count_nonzero(ok) / self.n, float(self.cost[exit_index].mean()), lost / self.n


def _scores(rec: ExitRecords, rule: ThresholdRule) -> torch.Tensor:
    return torch.stack([rule.score(k, rec.logits[k], rec.complexity, rec.prev_pred(k)) for k in range(rec.num_exits - 1)])


def sensitivity(rec: ExitRecords, rule: ThresholdRule, *, h: float = 0.02) -> tuple[ExitSensitivity, ...]:
    """d(accuracy)/dτ_k and d(MACs)/dτ_k at the rule's thresholds, by central differences."""
    at = _Evaluator(rec, _scores(rec, rule))
    out = []
    for k, tau in enumerate(rule.thresholds):
        up, down = list(rule.thresholds), list(rule.thresholds)
        up[k], down[k] = tau + h, tau - h
        (a1, m1, _), (a0, m0, _) = at(up), at(down)
        out.append(ExitSensitivity(k, tau, (a1 - a0) / (2 * h), (m1 - m0) / (2 * h)))
    return tuple(out)


def _greedy(rec: ExitRecords, scores: torch.Tensor, target: CalibrationTarget, levels: int) -> list[float]:
    """Lower thresholds from strict to permissive, best MACs-per-accuracy move first.

    The accuracy cost of a move is the share of the last exit's correct answers it loses;
    samples an early exit gets right and the last exit gets wrong are not credited. On a
    small validation split those lucky gains are mostly noise, and crediting them lets the
    calibrator trade real losses for them (it then misses the target on test).
    """
    grids = []
    for s in scores:  # candidate τ per exit: score quantiles, top = never stop
        q = torch.quantile(s.double(), torch.linspace(0, 1, levels, dtype=torch.float64))
        grids.append(sorted(set(q.tolist())) + [_NEVER])
    pos = [len(g) - 1 for g in grids]
    taus = [g[-1] for g in grids]
    at = _Evaluator(rec, scores)
    _, macs, lost = at(taus)
    allowed = target.max_drop if target.max_drop is not None else 1.0
    eps = 0.5 / scores.shape[1]  # half a sample of accuracy: ties break towards MACs saved
    while True:
        if target.macs_budget is not None and macs <= target.macs_budget:
            return taus
        best, best_eff = None, -math.inf
        for k in range(len(grids)):
            # next level down that changes the outcome (levels can be no-ops when an
            # earlier exit already stops every sample they would add)
            p, trial = pos[k], list(taus)
            m, lo = macs, lost
            while p > 0 and m >= macs:
                p -= 1
                trial[k] = grids[k][p]
                _, m, lo = at(trial)
            if m >= macs or lo > allowed + 1e-12:
                continue
            # sensitivities of this step (dMACs/dτ over dAccuracy/dτ); dτ cancels in the ratio
            eff = (macs - m) / (lo - lost) if lo > lost else (macs - m) / eps
            if eff > best_eff:
                best, best_eff = (k, p, lo, m), eff
        if best is None:
            if target.macs_budget is not None:
                raise CalibrationError(
                    "MAC budget cannot be met on the validation split",
                    got=target.macs_budget,
                    fix=f"the cheapest reachable operating point spends {macs:,.0f} MACs/sample; raise the budget",
                )
            return taus
        k, pos[k], lost, macs = best
        taus[k] = grids[k][pos[k]]


def calibrate(
    rec: ExitRecords,
    target: CalibrationTarget,
    *,
    confidences: Sequence[str] = ("max_softmax", "margin", "entropy"),
    complexity_weights: Sequence[float] = (0.0, 0.1, 0.2),
    agreement_bonuses: Sequence[float] = (0.0, 0.1, 0.2),
    feature_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25),
    levels: int = 200,
    complexity_margin: float = 0.02,
) -> CalibrationResult:
    """Calibrate a :class:`ThresholdRule` on validation-split records to ``target``.

    Tries every (confidence, β, γ) combination and keeps the cheapest rule that meets a max-drop
    target, or the most accurate one within a MAC budget. A rule with β > 0 must win by
    ``complexity_margin`` (relative), because computing the complexity features costs time.
    """
    reference = rec.exit_accuracy()[-1]
    if target.macs_budget is not None and target.macs_budget < float(rec.cum_macs[0]):
        raise CalibrationError(
            "MAC budget is below the cost of the first exit",
            got=target.macs_budget,
            fix=f"the minimum is {float(rec.cum_macs[0]):,.0f} MACs/sample (everything leaves at exit 1)",
        )
    best: tuple[tuple[float, float], ThresholdRule, Outcome] | None = None
    tried = []
    combos = [(c, b, g) for c in confidences for b in complexity_weights for g in (agreement_bonuses if rec.num_exits > 2 else (0.0,))]
    for conf, beta, gamma in combos:
        rule = ThresholdRule(thresholds=(0.0,) * (rec.num_exits - 1), confidence=conf, complexity_weight=beta,
                             feature_weights=feature_weights, agreement_bonus=gamma)
        taus = _greedy(rec, _scores(rec, rule), target, levels)
        rule = replace(rule, thresholds=tuple(taus))
        out = simulate(rec, rule)
        tried.append({"confidence": conf, "complexity_weight": beta, "agreement_bonus": gamma, "accuracy": out.accuracy, "mean_macs": out.mean_macs})
        key = (out.mean_macs, -out.accuracy) if target.max_drop is not None else (-out.accuracy, out.mean_macs)
        if beta:
            # the complexity features cost wall-clock time (not MACs): use them only if
            # they beat a confidence-only rule by a clear margin on val
            key = (key[0] * (1 + complexity_margin), key[1]) if key[0] > 0 else (key[0] * (1 - complexity_margin), key[1])
        if best is None or key < best[0]:
            best = (key, rule, out)
    assert best is not None
    _, rule, out = best
    return CalibrationResult(rule=rule, val=out, reference_accuracy=reference, target=target, sensitivity=sensitivity(rec, rule), candidates=tuple(tried))
