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
- **seeds** (``dynray bench router --seeds 0 1 2``): the same measures for one router per PPO
  seed (:func:`bench_seeds`, one :func:`seed_entry` each, fields fixed by the issue), and their
  spread (:func:`seeds_summary`), since one PPO run is not a measurement of the recipe.

What val is used for: the thresholds are tuned and calibrated on it, the hybrid's safety gate
and operating points are fitted on it, and (for routers trained with ``--train-splits train``,
the default) PPO's exported iterate was chosen on it, so val is held out from PPO's training
data but not unseen by the router. :func:`val_use` records which applies to a router.
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

__all__ = ["RouterBenchConfig", "bench_router", "policy_decide", "plot_curves", "val_use", "seed_entry", "bench_seeds", "seeds_summary", "SEED_METRICS"]
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
        "accuracy_delta": {k: out[k].accuracy - out["thresholds"].accuracy for k in ("ppo", "hybrid")},  # fraction: 0.003 = 0.3 pt
        "miss_reduction": {k: (1 - out[k].slo_misses / thr) if thr else 0.0 for k in ("ppo", "hybrid")},
        "detail": {k: v.to_dict() for k, v in out.items()},
        "hybrid_rl_weight": {"start": cfg.hybrid.rl_weight, "min": min(weights_seen), "max": max(weights_seen), "end": weights_seen[-1]},
        "hybrid_gate": gate.to_dict(),
    }


def val_use(router_meta: dict) -> dict:
    """How a router's training used the val split, from its registry meta (routers from before
    iterate selection trained on train+val and have no ``selection``)."""
    splits = str(router_meta.get("env", {}).get("train_splits", "")).split("+")
    sel = router_meta.get("selection") or {}
    return {"ppo_train_splits": "+".join(s for s in splits if s) or None, "val_in_ppo_training": "val" in splits,
            "val_chose_iterate": sel.get("split") == "val", "gate_fitted_on": "val"}


SEED_METRICS = ("equal_accuracy_cost_saving.ppo", "equal_accuracy_cost_saving.hybrid", "lambda_sweep_max_gap",
                "load_shift.slo_misses.thresholds", "load_shift.slo_misses.ppo", "load_shift.slo_misses.hybrid",
                "load_shift.accuracy_delta.ppo", "load_shift.accuracy_delta.hybrid")
"""The per-seed numbers the issue fixes (dotted paths into a :func:`seed_entry`)."""


def seed_entry(section: dict, seed: int, router_meta: dict | None = None) -> dict:
    """One ``router.seeds[]`` entry: a :func:`bench_router` section cut to the per-seed fields.

    ``load_shift.accuracy_delta`` is the router's test accuracy minus the thresholds' in the
    load-shift trace, as a fraction (0.003 = 0.3 pt).
    """
    ls = section["load_shift"]
    out = {
        "seed": seed,
        "equal_accuracy_cost_saving": {k: section["equal_accuracy_cost_saving"][k] for k in ("hybrid", "ppo")},
        "lambda_sweep_max_gap": section["lambda_sweep_max_gap"],
        "lambda_sweep_max_gap_vs_frontier": section["lambda_sweep_max_gap_vs_frontier"],
        "load_shift": {"slo_misses": {k: ls["slo_misses"][k] for k in ("thresholds", "ppo", "hybrid")},
                       "accuracy_delta": {k: ls["accuracy_delta"][k] for k in ("ppo", "hybrid")},
                       "lambda_cost": ls["lambda_cost"], "lambda_lat": ls["lambda_lat"], "hybrid_gate_open": ls["hybrid_gate"]["open"]},
        "hybrid_gates_open": sum(bool(p.get("gate", {}).get("open")) for p in section["curves"]["hybrid"]),
    }
    if router_meta is not None:
        sel = router_meta.get("selection")
        out.update({"train_minutes": router_meta.get("train_minutes"), "iterations": router_meta.get("iterations"),
                    "chosen_iteration": sel["chosen_iteration"] if sel else None, "val_score": sel["score"] if sel else None,
                    "val_score_curve": [[c["iteration"], c["score"]] for c in sel["curve"]] if sel else None, "val_use": val_use(router_meta)})
    return out


def bench_seeds(val: ExitRecords, test: ExitRecords, production_rule: ThresholdRule, routers: list[tuple[int, PolicyNet, dict]],
                cfg: RouterBenchConfig = RouterBenchConfig()) -> list[dict]:
    """``router.seeds``: :func:`bench_router` for each ``(seed, policy, registry-style meta)``, cut by :func:`seed_entry`."""
    out = []
    for seed, policy, meta in routers:
        section = bench_router(val, test, RouteCosts.from_dict(meta["costs"]), policy, production_rule, cfg, train_minutes=meta.get("train_minutes"))
        out.append(seed_entry(section, seed, meta))
        log.info("router bench, seed %d: hybrid saving %+.3f, PPO %+.3f, lambda gap %+.3f", seed, out[-1]["equal_accuracy_cost_saving"]["hybrid"],
                 out[-1]["equal_accuracy_cost_saving"]["ppo"], out[-1]["lambda_sweep_max_gap"])
    return out


def _get(d: dict, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def seeds_summary(entries: list[dict]) -> dict:
    """Min, median and max over the seeds of every :data:`SEED_METRICS` number."""
    return {m: {"min": float(min(v)), "median": float(np.median(v)), "max": float(max(v))}
            for m in SEED_METRICS for v in [[float(_get(e, m)) for e in entries]]} if entries else {}


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
