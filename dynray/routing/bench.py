"""``dynray bench router``: thresholds vs PPO vs hybrid vs oracle on the held-out test split.

Everything is replayed exactly from cached exit outputs (:mod:`dynray.routing.rollout`):

- **curves**: accuracy vs cost (units of DeviceProfile.cost_per_mmac x MMACs) on test for
  calibrated thresholds (the max-drop calibrator at several targets, plus thresholds tuned
  per λ), PPO at a grid of λ_cost, the hybrid (each calibrated rule with the policy at the
  matching operating point, trust adapted on val), and the oracle.
- **equal-accuracy saving**: each router point against the thresholds frontier at the same
  accuracy (:mod:`dynray.routing.curves`); the median over the curve is reported.
- **λ sweep**: the one λ-conditioned policy at 5 λ values against thresholds re-tuned for
  each λ (on val) at PPO's accuracy; the worst relative cost gap is reported.
- **load shift**: the :mod:`dynray.routing.trace` scenario (cloud x5 for a window), counting
  latency-SLO misses; PPO and hybrid use the λ_cost whose accuracy on the val trace is
  closest to the thresholds' (chosen on val, reported on test).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from dynray.evaluation import ExitRecords, oracle
from dynray.routing.costs import RouteCosts
from dynray.routing.curves import compare, frontier
from dynray.routing.features import CostWeights
from dynray.routing.hybrid import HybridConfig, HybridRouter
from dynray.routing.policy import PolicyNet
from dynray.routing.rollout import Paths, rollout, threshold_decide
from dynray.routing.trace import LoadShift, run_trace
from dynray.routing.tuning import exit_prices, tune_thresholds
from dynray.thresholds import CalibrationTarget, ThresholdRule, calibrate

__all__ = ["RouterBenchConfig", "bench_router", "policy_decide", "plot_curves"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RouterBenchConfig:
    curve_lambdas: tuple[float, ...] = tuple(float(x) for x in np.geomspace(5e-4, 5e-2, 11))
    """λ_cost grid of the PPO, hybrid and per-λ thresholds curves."""
    sweep_lambdas: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.03)
    """The 5 operating points of the moving-operating-point target."""
    max_drops: tuple[float, ...] = (0.0, 0.002, 0.004, 0.006, 0.01, 0.015, 0.02, 0.03)
    """Targets of the max-drop calibrator for the calibrated-thresholds curve."""
    shift: LoadShift = field(default_factory=LoadShift)
    shift_lat_weight: float = 1e-3
    """λ_lat (per ms) of PPO and hybrid in the load-shift scenario."""
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    warmup_chunk: int = 50
    """The hybrid adapts rl_weight on val in chunks of this many requests before the test pass."""


def policy_decide(policy: PolicyNet):
    def decide(obs: torch.Tensor, k: int, logits: torch.Tensor) -> torch.Tensor:
        return policy.act(obs)[0]

    return decide


def _pt(p: Paths, **extra) -> dict:
    return {"accuracy": p.accuracy, "cost": p.mean_cost, **extra}


def _cost_records(rec: ExitRecords, costs: RouteCosts) -> ExitRecords:
    """The records with each exit's thresholds-path cost in place of its MACs (for the calibrator)."""
    return replace(rec, cum_macs=torch.tensor(exit_prices(costs).cost, dtype=torch.float64))


def _adapt_hybrid(h: HybridRouter, val: ExitRecords, costs: RouteCosts, w: CostWeights, chunk: int, policy: PolicyNet) -> None:
    """Online adaptation on a pass over val: after each chunk, compare policy-alone and rules-alone rewards."""
    pol, rules = policy_decide(policy), threshold_decide(h.rule)
    for lo in range(0, val.labels.shape[0], chunk):
        idx = torch.arange(lo, min(lo + chunk, val.labels.shape[0]))
        h.observe(rollout(val, costs, pol, w, index=idx).reward(w), rollout(val, costs, rules, w, index=idx).reward(w))


def _hybrid_for(policy: PolicyNet, rule: ThresholdRule, cfg: RouterBenchConfig, val: ExitRecords, costs: RouteCosts, w: CostWeights) -> HybridRouter:
    h = HybridRouter(policy, rule, cfg.hybrid)
    _adapt_hybrid(h, val, costs, w, cfg.warmup_chunk, policy)
    return h


def _summary(comps: list) -> dict:
    inside = [c for c in comps if c.where == "interpolated"] or comps
    s = [c.saving for c in inside]
    return {"median": float(np.median(s)), "worst": float(min(s)), "best": float(max(s)), "points": [c.to_dict() for c in comps]}


def bench_router(
    val: ExitRecords, test: ExitRecords, costs: RouteCosts, policy: PolicyNet, production_rule: ThresholdRule,
    cfg: RouterBenchConfig = RouterBenchConfig(), *, train_minutes: float | None = None,
) -> dict:
    """The ``"router"`` bench section (see the module docstring)."""
    prices = exit_prices(costs)
    val_cost = _cost_records(val, costs)
    pol = policy_decide(policy)

    # --- static curves -----------------------------------------------------------------
    tuned, ppo, ppo_val = [], [], {}
    for lam in sorted(set(cfg.curve_lambdas) | set(cfg.sweep_lambdas)):
        w = CostWeights(cost=lam)
        rule = tune_thresholds(val, prices, w)
        tuned.append(_pt(rollout(test, costs, threshold_decide(rule), w), source=f"tuned lambda={lam:.4g}", lam=lam))
        p = rollout(test, costs, pol, w)
        ppo.append(_pt(p, lam=lam, offloaded=int(p.offloaded.sum())))
        ppo_val[lam] = rollout(val, costs, pol, w).mean_cost
    # the hybrid pairs each calibrated rule with the policy at the λ whose val cost is closest
    # (matching operating points on val), adapts rl_weight on val, then runs on test
    calibrated, hyb = [], []
    for d in cfg.max_drops:
        rule = calibrate(val_cost, CalibrationTarget(max_drop=d)).rule
        calibrated.append(_pt(rollout(test, costs, threshold_decide(rule), CostWeights()), source=f"max_drop={d}"))
        rule_val = rollout(val, costs, threshold_decide(rule), CostWeights()).mean_cost
        lam = min(cfg.curve_lambdas, key=lambda x: abs(ppo_val[x] - rule_val))
        w = CostWeights(cost=lam)
        h = _hybrid_for(policy, rule, cfg, val, costs, w)
        hyb.append(_pt(rollout(test, costs, h.decide_fn(), w), source=f"max_drop={d}", lam=lam, rl_weight=h.rl_weight,
                       policy_share=h.decisions["policy"] / max(1, sum(h.decisions.values()))))
    thresholds = calibrated + tuned
    orc = oracle(test)
    orc_first = oracle(test, unsolved="first")
    oracle_pts = [{"accuracy": o.accuracy, "cost": float(prices.cost[o.exit_index.numpy()].mean())} for o in (orc_first, orc)]
    curve_ppo = [p for p in ppo if p["lam"] in cfg.curve_lambdas]
    curve_hyb = hyb
    saving = {"ppo": _summary(compare(curve_ppo, thresholds)), "hybrid": _summary(compare(curve_hyb, thresholds))}

    # --- one policy, 5 operating points -----------------------------------------------------
    sweep = []
    per_lambda_front = [p for p in tuned]
    for lam in cfg.sweep_lambdas:
        p = next(x for x in ppo if x["lam"] == lam)
        t = next(x for x in tuned if x["lam"] == lam)
        c = compare([p], per_lambda_front)[0]
        sweep.append({"lambda": lam, "ppo": p, "thresholds": t, "thresholds_cost_at_ppo_accuracy": c.thresholds_cost, "gap": -c.saving, "where": c.where})

    # --- load shift ---------------------------------------------------------------------------
    shift = load_shift(val, test, costs, policy, production_rule, cfg)

    return {
        "n_test": int(test.labels.shape[0]),
        "curves": {"thresholds": frontier(thresholds), "ppo": curve_ppo, "hybrid": curve_hyb, "oracle": oracle_pts},
        "thresholds_points": thresholds,
        "equal_accuracy_cost_saving": {k: v["median"] for k, v in saving.items()},
        "equal_accuracy_detail": saving,
        "load_shift": shift,
        "lambda_sweep_max_gap": max(s["gap"] for s in sweep),
        "lambda_sweep": sweep,
        "train_minutes": train_minutes,
        "costs": costs.to_dict(),
        "config": {k: (v if not dataclasses.is_dataclass(v) else dataclasses.asdict(v)) for k, v in dataclasses.asdict(cfg).items()},
    }


def load_shift(val: ExitRecords, test: ExitRecords, costs: RouteCosts, policy: PolicyNet, rule: ThresholdRule, cfg: RouterBenchConfig) -> dict:
    """SLO misses of thresholds, PPO and hybrid in the load-shift trace (λ_cost picked on val)."""
    shift_val = replace(cfg.shift, requests=min(cfg.shift.requests, 2000))
    thr_val = run_trace(val, costs, threshold_decide(rule), CostWeights(), shift_val)
    pol = policy_decide(policy)
    best = None
    for lam in cfg.curve_lambdas:
        w = CostWeights(cost=lam, lat=cfg.shift_lat_weight)
        r = run_trace(val, costs, pol, w, shift_val)
        key = (abs(r.accuracy - thr_val.accuracy), r.slo_misses)
        if best is None or key < best[0]:
            best = (key, lam)
    lam = best[1]
    w = CostWeights(cost=lam, lat=cfg.shift_lat_weight)
    out = {"thresholds": run_trace(test, costs, threshold_decide(rule), w, cfg.shift), "ppo": run_trace(test, costs, pol, w, cfg.shift)}
    h = HybridRouter(policy, rule, cfg.hybrid)
    pol_alone, rules_alone = pol, threshold_decide(rule)
    weights_seen = []

    def feedback(s, w_, edge, cloud, seen, paths):
        idx = torch.tensor([s])
        rp = rollout(test, costs, pol_alone, w_, edge=edge, cloud=cloud, load=seen, index=idx).reward(w_)
        rr = rollout(test, costs, rules_alone, w_, edge=edge, cloud=cloud, load=seen, index=idx).reward(w_)
        weights_seen.append(h.observe(rp, rr))

    out["hybrid"] = run_trace(test, costs, h.decide_fn(), w, cfg.shift, feedback=feedback)
    thr = out["thresholds"].slo_misses
    return {
        "slo_ms": cfg.shift.slo_ms,
        "slowdown": cfg.shift.slowdown,
        "requests": cfg.shift.requests,
        "lambda_cost": lam,
        "lambda_lat": cfg.shift_lat_weight,
        "slo_misses": {k: v.slo_misses for k, v in out.items()},
        "accuracy": {k: v.accuracy for k, v in out.items()},
        "miss_reduction": {k: (1 - out[k].slo_misses / thr) if thr else 0.0 for k in ("ppo", "hybrid")},
        "detail": {k: v.to_dict() for k, v in out.items()},
        "hybrid_rl_weight": {"start": cfg.hybrid.rl_weight, "min": min(weights_seen), "end": weights_seen[-1]},
    }


def plot_curves(section: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    c = section["curves"]
    pts = sorted(section["thresholds_points"], key=lambda p: p["cost"])
    ax.scatter([p["cost"] for p in pts], [p["accuracy"] * 100 for p in pts], s=12, c="0.6", label="thresholds (every rule)")
    for name, style in (("thresholds", "k-o"), ("ppo", "b-s"), ("hybrid", "g-^"), ("oracle", "r*")):
        xs = sorted(c[name], key=lambda p: p["cost"])
        ax.plot([p["cost"] for p in xs], [p["accuracy"] * 100 for p in xs], style, ms=5, label=name + (" frontier" if name == "thresholds" else ""))
    ax.set_xscale("log")
    ax.set_xlabel("cost per request (edge 1, cloud 4 units per million MACs), log scale")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Routers on {section['n_test']} test samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
