"""The cluster section: node and replica scaling read off a sampled timeline, the targets, and the plot.

The driver (``jobs/bench_cluster.py``) samples the live cluster about once a second (live
nodes by type, RUNNING replicas by deployment) while it deploys, kills and bursts, and marks
each phase. Everything here works on those samples, so it needs no Ray and a unit test can
check it on a hand-written timeline.

A sample is ``{"t": seconds since the bench started, "nodes": {node_type: live count},
"replicas": {deployment: RUNNING count}}``; a phase is ``{"name", "start", "end"}`` on the
same clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sample", "Phase", "first_time", "count", "autoscale_summary", "targets", "plot_timeline", "format_cluster"]

Sample = dict
"""``{"t": float, "nodes": {type: int}, "replicas": {deployment: int}}``."""
Phase = dict
"""``{"name": str, "start": float, "end": float}``."""


def count(sample: Sample, kind: str, key: str) -> int:
    """Live nodes of a type (``kind="nodes"``) or RUNNING replicas of a deployment (``"replicas"``)."""
    return int(sample.get(kind, {}).get(key, 0))


def first_time(samples: Sequence[Sample], pred: Callable[[Sample], bool], *, after: float = 0.0) -> float | None:
    """Seconds from ``after`` to the first sample at or after it where ``pred`` holds (None: never)."""
    for s in samples:
        if s["t"] >= after and pred(s):
            return round(s["t"] - after, 2)
    return None


def autoscale_summary(samples: Sequence[Sample], *, deployment: str, node_type: str, burst_start: float, burst_end: float,
                      replicas_min: int, replicas_max: int) -> dict:
    """Replicas (and the nodes they need) up on a burst and back down after it.

    ``up_s``: burst start until the peak replica count is RUNNING; ``down_s``: burst end until
    the count is back at ``replicas_min``; the node counts show the autoscaler following them."""
    during = [s for s in samples if burst_start <= s["t"] <= burst_end]
    before = [s for s in samples if s["t"] <= burst_start] or samples[:1]
    start = count(before[-1], "replicas", deployment)
    peak = max((count(s, "replicas", deployment) for s in during), default=start)
    nodes_start = count(before[-1], "nodes", node_type)
    after = [s for s in samples if s["t"] >= burst_end]
    return {
        "deployment": deployment,
        "replicas_min": replicas_min,
        "replicas_max": replicas_max,
        "replicas_start": start,
        "replicas_peak": peak,
        "up_s": first_time(samples, lambda s: count(s, "replicas", deployment) >= peak, after=burst_start) if peak > start else None,
        "down_s": first_time(samples, lambda s: count(s, "replicas", deployment) <= replicas_min, after=burst_end),
        "burst_s": round(burst_end - burst_start, 2),
        "nodes_start": nodes_start,
        "nodes_peak": max((count(s, "nodes", node_type) for s in during + after), default=nodes_start),
        "nodes_up_s": first_time(samples, lambda s: count(s, "nodes", node_type) > nodes_start, after=burst_start),
        "nodes_end": count(samples[-1], "nodes", node_type) if samples else 0,
        "nodes_down_s": first_time(samples, lambda s: count(s, "nodes", node_type) <= nodes_start, after=burst_end),
    }


@dataclass(frozen=True)
class Target:
    name: str
    value: float | int | None
    target: str
    met: bool


def targets(s: dict) -> list[Target]:
    """The issue's targets for the section, each with its measured value and whether it is met."""
    idle = s.get("idle_timeout_s") or 0
    out = [
        Target("scale_up_s (0 -> 2 edge nodes)", s.get("scale_up_s"), "<= 60 s", s.get("scale_up_s") is not None and s["scale_up_s"] <= 60),
        Target("scale_down_s (to 0 worker nodes)", s.get("scale_down_s"), f"<= 60 s + idle timeout {idle:g} s",
               s.get("scale_down_s") is not None and s["scale_down_s"] <= 60 + idle),
    ]
    for kill in ("node_kill", "ingress_kill"):
        k = s.get(kill) or {}
        out.append(Target(f"{kill} answered / requests", k.get("answered"), f"= {k.get('requests')}", bool(k) and k["answered"] == k["requests"]))
        out.append(Target(f"{kill} recovery_s", k.get("recovery_s"), "<= 30 s", bool(k) and k["recovery_s"] <= 30))
    return out


def plot_timeline(samples: Sequence[Sample], phases: Sequence[Phase], path: str | Path, *, title: str) -> str:
    """Live nodes by type (top) and RUNNING replicas by deployment (bottom) over time, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, (ax_n, ax_r) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for ax, kind in ((ax_n, "nodes"), (ax_r, "replicas")):
        keys = sorted({k for s in samples for k in s.get(kind, {})})
        for i, k in enumerate(keys):  # widest first, so a series hidden under another still shows
            width = 1.2 + 2.4 * (len(keys) - 1 - i) / max(len(keys) - 1, 1)
            label = "type not yet known (node registering)" if k == "?" else k
            ax.step(t, [count(s, kind, k) for s in samples], where="post", label=label, linewidth=width, alpha=0.85)
        ax.set_ylabel("live nodes" if kind == "nodes" else "RUNNING replicas")
        ax.legend(loc="upper left", fontsize=8, ncol=len(keys))
        ax.grid(alpha=0.3)
        for i, p in enumerate(phases):
            ax.axvspan(p["start"], p["end"], color=f"C{i % 10}", alpha=0.08)
    top = ax_n.get_ylim()[1]
    for p in phases:
        ax_n.text((p["start"] + p["end"]) / 2, top * 0.97, p["name"], ha="center", va="top", fontsize=7, rotation=90)
    ax_r.set_xlabel("seconds since the bench started")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _kill_line(name: str, k: dict | None) -> str:
    if not k:
        return f"  {name}: not run"
    tiers = ", ".join(f"{t} {n}" for t, n in sorted(k.get("answered_by_tier", {}).items()))
    return (f"  {name}: {k['answered']}/{k['requests']} answered with at most one client retry ({k['answered_no_retry']} at the first try), "
            f"{k['degraded']} degraded, {k['errors']} errors, recovered in {k['recovery_s']:.1f} s; answers by tier: {tiers}")


def format_cluster(s: dict) -> str:
    """The cluster section as text."""
    out = [f"  local cluster ({s['config']}): up in {s['cluster_up_s']:.1f} s; idle timeout {s['idle_timeout_s']:g} s; model {s['model']}"]
    out.append(f"  scale up 0 -> 2 edge nodes for {s['scale_up_replicas']} edge replicas: {s['scale_up_s']} s (app RUNNING after {s['serve_up_s']} s)")
    out.append(f"  scale down to 0 worker nodes after `serve down`: {s['scale_down_s']} s")
    a = s.get("serve_autoscale")
    if a:
        out.append(f"  serve autoscale ({a['deployment']} {a['replicas_min']}-{a['replicas_max']}): {a['replicas_start']} -> {a['replicas_peak']} replicas in {a['up_s']} s of burst, "
                   f"back to {a['replicas_min']} in {a['down_s']} s; edge nodes {a['nodes_start']} -> {a['nodes_peak']} (up {a['nodes_up_s']} s into the burst) -> {a['nodes_end']} ({a['nodes_down_s']} s after it)")
    out.append(_kill_line("node kill", s.get("node_kill")))
    if s.get("node_kill"):
        nk = s["node_kill"]
        out.append(f"    killed {nk['node']['node_type']} node {nk['node']['node_id'][-6:]} with {nk['node']['replicas_on_it']} replicas; marked dead after {nk['node'].get('node_dead_s')} s, replacement node after {nk['node']['node_replaced_s']} s")
    out.append(_kill_line("ingress kill", s.get("ingress_kill")))
    out.append(f"  job round trip (dynray submit train, until `dynray models list` shows it): {s['job_roundtrip_s']} s")
    for tg in targets(s):
        out.append(f"  target {tg.name}: {tg.value} ({tg.target}) {'met' if tg.met else 'MISSED'}")
    if s.get("plot"):
        out.append(f"  plot: {s['plot']}")
    return "\n".join(out)
