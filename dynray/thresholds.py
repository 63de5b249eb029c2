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

The confidence measure is chosen on all of val among confidence-only rules; whether the
complexity weight β and the agreement bonus γ earn their place is chosen by K-fold
cross-validation on val (see :func:`calibrate`): every (β, γ) is calibrated on K-1 folds and
measured on the held-out fold, so a β or γ that only fits the noise of ~500 val samples does
not win; the chosen rule's thresholds are then calibrated on all of val.
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
    candidates: tuple[dict, ...] = field(default=())  # every (confidence, β, γ) calibrated on all of val, for the report
    cv: tuple[dict, ...] = field(default=())
    """Per (confidence, β, γ): held-out accuracy, MACs and loss over the CV folds (mean and
    standard error), whether it was admissible and which one was chosen; () without CV."""
    cv_folds: int = 0
    """Folds of the cross-validated choice (0: chosen on all of val, the pre-CV behaviour)."""


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
        self.last = np.full(self.n, len(self.cost) - 1)

    def __call__(self, taus: Sequence[float]) -> tuple[float, float, float]:
        exit_index = self.last.copy()  # [N] first exit that says stop: walk back from the last
        for k in range(len(self.scores) - 1, -1, -1):
            exit_index[self.scores[k] >= taus[k]] = k
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


def _subset(rec: ExitRecords, idx: np.ndarray) -> ExitRecords:
    t = torch.as_tensor(idx)
    return ExitRecords(logits=rec.logits[:, t], complexity=rec.complexity[t], labels=rec.labels[t], cum_macs=rec.cum_macs, full_macs=rec.full_macs)


def _mean_se(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def _simplicity(row: dict) -> int:
    """How many optional terms a combination switches on (β, γ): the one-SE rule prefers fewer."""
    return int(row["complexity_weight"] != 0.0) + int(row["agreement_bonus"] != 0.0)


def _cross_validate(rec: ExitRecords, target: CalibrationTarget, rules: list[ThresholdRule], scores: list[torch.Tensor], *, folds: int, seed: int, levels: int) -> list[dict]:
    """Held-out accuracy, mean MACs and loss of every rule family over ``folds`` folds.

    The folds are a seeded permutation of the samples (deterministic under ``seed``); each
    family's thresholds are calibrated to ``target`` on K-1 folds and measured on the other.
    """
    n = rec.labels.shape[0]
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    splits = [(np.sort(np.concatenate(parts[:i] + parts[i + 1 :])), np.sort(held)) for i, held in enumerate(parts)]
    subsets = [(_subset(rec, tr), _subset(rec, te)) for tr, te in splits]
    rows = []
    for rule, s in zip(rules, scores):  # stop scores are per-sample, so a fold's are a slice
        acc, macs, loss = [], [], []
        try:
            for (tr, te), (rec_tr, rec_te) in zip(splits, subsets):
                taus = _greedy(rec_tr, s[:, tr], target, levels)
                a, m, lo = _Evaluator(rec_te, s[:, te])(taus)
                acc.append(a), macs.append(m), loss.append(lo)
        except CalibrationError:  # a MAC budget some training fold cannot meet: not a candidate
            acc = macs = loss = []
        row = {"confidence": rule.confidence, "complexity_weight": rule.complexity_weight, "agreement_bonus": rule.agreement_bonus, "feasible": bool(acc)}
        for name, vals in (("accuracy", acc), ("mean_macs", macs), ("loss", loss)):
            row[f"{name}_mean"], row[f"{name}_se"] = _mean_se(vals) if vals else (math.nan, math.nan)
        rows.append(row)
    return rows


def _cv_choice(rows: list[dict], target: CalibrationTarget) -> int:
    """Index of the chosen row; marks ``admissible`` and ``chosen`` on every row.

    Max-drop target: calibrating to the target on K-1 folds is optimistic, so held-out loss
    (the share of the last exit's correct answers given up) runs above the target for every
    family, most when the target is a sample or two. A family is admissible when its mean
    held-out loss is within one standard error of max(target, the lowest mean held-out loss
    any family reached): not distinguishable from meeting the target, or from the best any
    family generalises to. Among those the lowest mean held-out MACs wins, and then the
    one-SE rule (Breiman et al. 1984; Hastie et al., ESL §7.10): of the admissible families
    whose mean MACs are within one SE of the winner's, take the simplest (fewest of β, γ
    switched on), then the cheapest. MAC budget: the same with MACs and accuracy swapped
    (admissible: mean held-out MACs within one SE of max(budget, lowest); best mean accuracy).
    """
    ok = [r for r in rows if r["feasible"]]
    if not ok:
        raise CalibrationError("no threshold family can be calibrated to the target on every CV training fold", got=target,
                               fix="raise the MAC budget, or pass cv_folds=0 to choose on all of val")
    if target.max_drop is not None:
        cost, cost_se, gain, cap = "loss_mean", "loss_se", "mean_macs", max(target.max_drop, min(r["loss_mean"] for r in ok))
    else:
        cost, cost_se, gain, cap = "mean_macs_mean", "mean_macs_se", "accuracy", max(float(target.macs_budget), min(r["mean_macs_mean"] for r in ok))
    sign = 1.0 if target.max_drop is not None else -1.0  # minimise MACs, or maximise accuracy
    for r in rows:
        r["admissible"] = r["feasible"] and r[cost] <= cap + r[cost_se] + 1e-12
        r["chosen"] = False
    adm = [r for r in rows if r["admissible"]]
    best = min(adm, key=lambda r: (sign * r[f"{gain}_mean"], _simplicity(r)))
    near = [r for r in adm if sign * r[f"{gain}_mean"] <= sign * best[f"{gain}_mean"] + best[f"{gain}_se"] + 1e-12]
    pick = min(near, key=lambda r: (_simplicity(r), sign * r[f"{gain}_mean"]))
    pick["chosen"] = True
    return rows.index(pick)


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
    cv_folds: int = 5,
    cv_seed: int = 0,
) -> CalibrationResult:
    """Calibrate a :class:`ThresholdRule` on validation-split records to ``target``.

    Every (confidence, β, γ) combination is calibrated on all of val (``candidates``). With
    ``cv_folds`` >= 2 the confidence measure is the one whose confidence-only rule is best on
    all of val, and its (β, γ) is chosen by ``cv_folds``-fold cross-validation (seeded by
    ``cv_seed``; see :func:`_cv_choice` for the rule, and ``cv`` in the result for the table);
    the thresholds are the ones calibrated on all of val. With ``cv_folds``
    0 or 1 (the pre-CV behaviour) it keeps the cheapest rule on val that meets a max-drop
    target, or the most accurate one within a MAC budget, where a rule with β > 0 must win by
    ``complexity_margin`` (relative), because computing the complexity features costs time.
    A single combination needs no choice and skips CV.
    """
    n = rec.labels.shape[0]
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, int) or cv_folds < 0:
        raise ConfigError("cv_folds must be a whole number >= 0", got=cv_folds, fix="use e.g. cv_folds=5, or 0 to choose on all of val")
    if cv_folds >= 2 and n < 2 * cv_folds:
        raise ConfigError("too few validation samples for cross-validation", got={"samples": n, "cv_folds": cv_folds},
                          fix=f"use at most {max(n // 2, 0)} folds, or cv_folds=0 to choose on all of val")
    reference = rec.exit_accuracy()[-1]
    if target.macs_budget is not None and target.macs_budget < float(rec.cum_macs[0]):
        raise CalibrationError(
            "MAC budget is below the cost of the first exit",
            got=target.macs_budget,
            fix=f"the minimum is {float(rec.cum_macs[0]):,.0f} MACs/sample (everything leaves at exit 1)",
        )
    combos = [(c, b, g) for c in confidences for b in complexity_weights for g in (agreement_bonuses if rec.num_exits > 2 else (0.0,))]
    families = [ThresholdRule(thresholds=(0.0,) * (rec.num_exits - 1), confidence=c, complexity_weight=b, feature_weights=feature_weights, agreement_bonus=g)
                for c, b, g in combos]
    scores = [_scores(rec, family) for family in families]
    fitted: list[tuple[tuple[float, float], ThresholdRule, Outcome]] = []
    tried = []
    for family, s in zip(families, scores):
        rule = replace(family, thresholds=tuple(_greedy(rec, s, target, levels)))
        out = simulate(rec, rule)
        tried.append({"confidence": rule.confidence, "complexity_weight": rule.complexity_weight, "agreement_bonus": rule.agreement_bonus,
                      "accuracy": out.accuracy, "mean_macs": out.mean_macs})
        key = (out.mean_macs, -out.accuracy) if target.max_drop is not None else (-out.accuracy, out.mean_macs)
        if rule.complexity_weight:
            # the complexity features cost wall-clock time (not MACs): use them only if
            # they beat a confidence-only rule by a clear margin on val
            key = (key[0] * (1 + complexity_margin), key[1]) if key[0] > 0 else (key[0] * (1 - complexity_margin), key[1])
        fitted.append((key, rule, out))
    folds = cv_folds if cv_folds >= 2 and len(families) > 1 else 0
    if folds:
        # the confidence measure is chosen on all of val among the confidence-only rules (as
        # before CV: which measure ranks the samples best is not what overfits); CV decides
        # whether β and γ earn their place with that measure
        plain = [i for i, f in enumerate(families) if not f.complexity_weight and not f.agreement_bonus]
        conf = families[min(plain, key=lambda i: fitted[i][0])].confidence if plain else None
        idx = [i for i, f in enumerate(families) if conf is None or f.confidence == conf]
        if len(idx) == 1:  # confidence only: nothing left for CV to choose
            folds, table = 0, []
            _, rule, out = fitted[idx[0]]
        else:
            table = _cross_validate(rec, target, [families[i] for i in idx], [scores[i] for i in idx], folds=folds, seed=cv_seed, levels=levels)
            _, rule, out = fitted[idx[_cv_choice(table, target)]]
    else:
        table = []
        _, rule, out = min(fitted, key=lambda f: f[0])  # first of equal keys, as before
    return CalibrationResult(rule=rule, val=out, reference_accuracy=reference, target=target, sensitivity=sensitivity(rec, rule),
                             candidates=tuple(tried), cv=tuple(table), cv_folds=folds)
