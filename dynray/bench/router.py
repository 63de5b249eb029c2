"""``dynray bench router``: thresholds vs PPO vs hybrid vs oracle on the held-out test split.

Everything is replayed exactly from cached exit outputs (:mod:`dynray.routing.rollout`):

- **curves**: accuracy vs cost (units of DeviceProfile.cost_per_mmac x MMACs) on test for
  calibrated thresholds (the max-drop calibrator at several targets, plus thresholds tuned
  per λ), PPO at a grid of λ_cost, the hybrid (each calibrated rule with the policy at the
  matching operating point, trust adapted on val), and the oracle.
- **equal-accuracy saving**: each router point against the thresholds frontier at the same
  accuracy (:mod:`dynray.bench.curves`); the median over the curve is reported.
- **λ sweep**: the one λ-conditioned policy at 5 λ values against thresholds re-tuned for
  the same λ on val. When their test accuracies are equal (within ``equal_accuracy``) the
  pair's costs are compared directly; otherwise against the re-tuned thresholds' frontier at
  PPO's accuracy. ``lambda_sweep_max_gap`` is the worst relative cost gap;
  ``lambda_sweep_max_gap_vs_frontier`` is the stricter gap against the frontier of thresholds
  re-tuned at every λ of the grid, whatever λ reached it.
- **load shift**: the :mod:`dynray.bench.trace` scenario (cloud x5 for a window), counting
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
from dynray.bench.curves import compare, frontier
from dynray.routing.features import CostWeights
from dynray.routing.hybrid import HybridConfig, HybridRouter, fit_gate
from dynray.routing.policy import PolicyNet
from dynray.routing.rollout import Paths, rollout, threshold_decide
from dynray.bench.trace import LoadShift, run_trace
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
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    equal_accuracy: float = 0.002
    """Accuracies within this (0.2 pt) count as equal when PPO and thresholds at one λ are paired."""
    chunk: int = 50
    """The hybrid adapts rl_weight online after every chunk of this many test requests."""
    shift_lat_weights: tuple[float, ...] = (5e-4, 1e-3, 2e-3, 4e-3)
    """λ_lat candidates for the load-shift scenario (chosen on the val trace with λ_cost)."""
    shift_accuracy_tolerance: float = 0.002
    """On the val trace, candidates within this accuracy of the thresholds' (0.2 pt, inside the
    target's 0.3 pt) compete on SLO misses."""


def policy_decide(policy: PolicyNet):
    def decide(obs: torch.Tensor, k: int, logits: torch.Tensor) -> torch.Tensor:
        return policy.act(obs)[0]

    return decide


def _pt(p: Paths, **extra) -> dict:
    return {"accuracy": p.accuracy, "cost": p.mean_cost, **extra}


def _cost_records(rec: ExitRecords, costs: RouteCosts) -> ExitRecords:
    """The records with each exit's thresholds-path cost in place of its MACs (for the calibrator)."""
    return replace(rec, cum_macs=torch.tensor(exit_prices(costs).cost, dtype=torch.float64))


def run_hybrid_online(h: HybridRouter, rec: ExitRecords, costs: RouteCosts, w: CostWeights, *, chunk: int, seed: int = 0) -> Paths:
    """The hybrid on a stream of ``rec``'s samples (random order, ``chunk`` requests at a time).

    Each chunk is decided with the current ``rl_weight``; then the router observes what the
    policy alone and the rules alone earned on that chunk (labels arrive after the answers)
    and adapts. Every decision counts, including those made before any adaptation.
    """
    order = torch.randperm(rec.labels.shape[0], generator=torch.Generator().manual_seed(seed))
    pol, rules = policy_decide(h.policy), threshold_decide(h.rule)
    parts = []
    for lo in range(0, order.shape[0], chunk):
        idx = order[lo : lo + chunk]
        parts.append((idx, rollout(rec, costs, h.decide_fn(), w, index=idx)))
        if h.policy is not None:
            h.observe(rollout(rec, costs, pol, w, index=idx).reward(w), rollout(rec, costs, rules, w, index=idx).reward(w))
    inv = torch.argsort(torch.cat([i for i, _ in parts]))
    cat = {f: torch.cat([getattr(p, f) for _, p in parts])[inv] for f in ("exit_index", "tier", "correct", "cost", "latency_ms", "macs", "offloaded")}
    return Paths(**cat)


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
    # (matching operating points on val), and runs online on test, adapting rl_weight as labels arrive
    calibrated, hyb = [], []
    for d in cfg.max_drops:
        rule = calibrate(val_cost, CalibrationTarget(max_drop=d)).rule
        calibrated.append(_pt(rollout(test, costs, threshold_decide(rule), CostWeights()), source=f"max_drop={d}"))
        rule_val = rollout(val, costs, threshold_decide(rule), CostWeights()).mean_cost
        lam = min(cfg.curve_lambdas, key=lambda x: abs(ppo_val[x] - rule_val))
        w = CostWeights(cost=lam)
        gate = fit_gate(policy, rule, cfg.hybrid, lambda decide, w=w: rollout(val, costs, decide, w).reward(w))
        h = HybridRouter(policy, rule, cfg.hybrid, gate=gate)
        hyb.append(_pt(run_hybrid_online(h, test, costs, w, chunk=cfg.chunk), source=f"max_drop={d}", lam=lam, rl_weight_end=h.rl_weight,
                       policy_share=h.decisions["policy"] / max(1, sum(h.decisions.values())), gate=gate.to_dict()))
    thresholds = calibrated + tuned
    orc = oracle(test)
    orc_first = oracle(test, unsolved="first")
    oracle_pts = [{"accuracy": o.accuracy, "cost": float(prices.cost[o.exit_index.numpy()].mean())} for o in (orc_first, orc)]
    curve_ppo = [p for p in ppo if p["lam"] in cfg.curve_lambdas]
    curve_hyb = hyb
    saving = {"ppo": _summary(compare(curve_ppo, thresholds)), "hybrid": _summary(compare(curve_hyb, thresholds))}

    # --- one policy, 5 operating points -----------------------------------------------------
    sweep = []
    for lam in cfg.sweep_lambdas:
        p = next(x for x in ppo if x["lam"] == lam)
        t = next(x for x in tuned if x["lam"] == lam)
        c = compare([p], tuned)[0]  # the frontier of thresholds re-tuned at every λ of the grid
        if abs(p["accuracy"] - t["accuracy"]) <= cfg.equal_accuracy + 1e-9:
            # same λ and the same accuracy: compare the pair directly
            pair, how = p["cost"] / t["cost"] - 1.0, "same lambda"
        else:  # different accuracies: the re-tuned thresholds' cost at PPO's accuracy
            pair, how = -c.saving, f"thresholds frontier ({c.where})"
        sweep.append({"lambda": lam, "ppo": p, "thresholds": t, "gap": pair, "compared_with": how,
                      "thresholds_frontier_cost_at_ppo_accuracy": c.thresholds_cost, "gap_vs_frontier": -c.saving, "where": c.where})

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
        "lambda_sweep_max_gap_vs_frontier": max(s["gap_vs_frontier"] for s in sweep),
        "lambda_sweep": sweep,
        "train_minutes": train_minutes,
        "costs": costs.to_dict(),
        "config": {k: (v if not dataclasses.is_dataclass(v) else dataclasses.asdict(v)) for k, v in dataclasses.asdict(cfg).items()},
    }


def load_shift(val: ExitRecords, test: ExitRecords, costs: RouteCosts, policy: PolicyNet, rule: ThresholdRule, cfg: RouterBenchConfig) -> dict:
    """SLO misses of thresholds, PPO and hybrid in the load-shift trace.

    The learned routers' operating point (λ_cost, λ_lat) is chosen on the val trace: the
    fewest SLO misses among the points whose val accuracy is within
    ``shift_accuracy_tolerance`` of the thresholds' (else the closest accuracy). The test
    trace then reports all three.
    """
    shift_val = replace(cfg.shift, requests=min(cfg.shift.requests, 2000))
    thr_val = run_trace(val, costs, threshold_decide(rule), CostWeights(), shift_val)
    pol = policy_decide(policy)
    cands = []
    for lat in cfg.shift_lat_weights:
        for lam in cfg.curve_lambdas:
            r = run_trace(val, costs, pol, CostWeights(cost=lam, lat=lat), shift_val)
            gap = thr_val.accuracy - r.accuracy
            ok = gap <= cfg.shift_accuracy_tolerance + 1e-9  # accuracies are multiples of 1/requests
            cands.append(((0 if ok else 1, r.slo_misses if ok else gap, abs(gap)), lam, lat))
    _, lam, lat = min(cands)
    w = CostWeights(cost=lam, lat=lat)
    out = {"thresholds": run_trace(test, costs, threshold_decide(rule), w, cfg.shift), "ppo": run_trace(test, costs, pol, w, cfg.shift)}
    gate = fit_gate(policy, rule, cfg.hybrid, lambda decide: torch.from_numpy(run_trace(val, costs, decide, w, shift_val).rewards))
    h = HybridRouter(policy, rule, cfg.hybrid, gate=gate)
    rules_alone = threshold_decide(rule)
    weights_seen = []

    def feedback(s, w_, edge, cloud, seen, paths):
        idx = torch.tensor([s])
        rp = rollout(test, costs, pol, w_, edge=edge, cloud=cloud, load=seen, index=idx).reward(w_)
        rr = rollout(test, costs, rules_alone, w_, edge=edge, cloud=cloud, load=seen, index=idx).reward(w_)
        weights_seen.append(h.observe(rp, rr))

    out["hybrid"] = run_trace(test, costs, h.decide_fn(), w, cfg.shift, feedback=feedback)
    thr = out["thresholds"].slo_misses
    return {
        "slo_ms": cfg.shift.slo_ms,
        "slowdown": cfg.shift.slowdown,
        "requests": cfg.shift.requests,
        "lambda_cost": lam,
        "lambda_lat": lat,
        "val_accuracy_thresholds": thr_val.accuracy,
        "slo_misses": {k: v.slo_misses for k, v in out.items()},
        "accuracy": {k: v.accuracy for k, v in out.items()},
        "accuracy_gap_pt": {k: 100 * (out[k].accuracy - out["thresholds"].accuracy) for k in ("ppo", "hybrid")},
        "miss_reduction": {k: (1 - out[k].slo_misses / thr) if thr else 0.0 for k in ("ppo", "hybrid")},
        "detail": {k: v.to_dict() for k, v in out.items()},
        "hybrid_rl_weight": {"start": cfg.hybrid.rl_weight, "min": min(weights_seen), "max": max(weights_seen), "end": weights_seen[-1]},
        "hybrid_gate": gate.to_dict(),
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
