"""`dynray report`: PNG plots of a run log (:mod:`dynray.runlog`).

- ``exit_mix.png``: the share of answered samples leaving at each exit (and tier) over time;
- ``latency_tiers.png``: request latency p50 / p95 / p99 over time, for requests answered
  on the edge alone and for those the cloud tier answered (or helped answer);
- ``drift.png``: each ingress replica's drift score over time, the alarm threshold, and
  where alarms were raised.

The run's phases (``phase`` of each request: the split's traffic, a shifted stream, ...) are
shaded on every plot, so a change can be read against what caused it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynray.runlog import RunData

__all__ = ["Report", "write_report", "tier_of"]

_BINS = 40


def tier_of(req: dict) -> str:
    """The tier that answered a request: ``cloud`` if any of its samples came from the cloud."""
    return "cloud" if "cloud" in (req.get("tier") or []) else "edge"


@dataclass(frozen=True)
class Report:
    plots: dict[str, str]
    """Plot name -> PNG path."""
    latency_ms: dict[str, dict[str, float]]
    """Tier -> {p50, p95, p99, requests} over the whole run."""
    exit_mix: dict[str, float]
    """"tier exit k" -> share of answered samples."""
    notes: list[str] = field(default_factory=list)
    """What could not be plotted, and what it needs."""

    def summary(self) -> str:
        lines = [f"wrote {name}: {p}" for name, p in self.plots.items()]
        lines.append("exit mix: " + ", ".join(f"{k} {v:.1%}" for k, v in self.exit_mix.items()))
        for t, s in self.latency_ms.items():
            lines.append(f"{t}: {s['requests']} requests, latency p50 {s['p50']:.1f} / p95 {s['p95']:.1f} / p99 {s['p99']:.1f} ms")
        return "\n".join(lines + self.notes)


def _phases(ax, data: RunData, t0: float) -> None:
    """Shade and name each phase of the run (consecutive requests with the same ``phase``)."""
    spans: list[tuple[str, float, float]] = []
    for r in data.requests:
        ph, t = r.get("phase") or "run", r["t"] - t0
        if spans and spans[-1][0] == ph:
            spans[-1] = (ph, spans[-1][1], t)
        else:
            spans.append((ph, t, t))
    width = max(spans[-1][2] - spans[0][1], 1e-9) if spans else 1.0
    for i, (ph, a, b) in enumerate(spans):
        if i % 2:
            ax.axvspan(a, b, color="0.92", zorder=0)
        if b - a > 0.06 * width:  # name only the phases wide enough to hold a label
            ax.text((a + b) / 2, 1.0, ph, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7, color="0.35")


def _bins(ts: np.ndarray) -> np.ndarray:
    return np.linspace(ts.min(), ts.max() + 1e-6, min(_BINS, max(2, len(ts) // 10)) + 1)


def write_report(data: RunData, out_dir: str | Path) -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = data.answered
    t0 = data.requests[0]["t"]
    plots, notes = {}, []

    # exit mix: samples per (tier, exit) label in each time bin
    samples = [(r["t"], f"{tier} exit {k}") for r in ok for k, tier in zip(r["exit"], r["tier"], strict=True)]
    labels = sorted({lab for _, lab in samples}, key=lambda s: (s.split()[0] != "edge", int(s.split()[-1])))
    ts = np.array([t for t, _ in samples])
    edges = _bins(ts)
    shares = np.zeros((len(labels), len(edges) - 1))
    idx = np.clip(np.digitize(ts, edges) - 1, 0, len(edges) - 2)
    for (_, lab), b in zip(samples, idx, strict=True):
        shares[labels.index(lab), b] += 1
    shares /= np.maximum(shares.sum(0, keepdims=True), 1)
    mids = (edges[:-1] + edges[1:]) / 2 - t0
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.stackplot(mids, shares, labels=labels, alpha=0.85)
    _phases(ax, data, t0)
    ax.set(xlabel="seconds into the run", ylabel="share of answered samples", ylim=(0, 1), title="Exit mix over time")
    ax.legend(loc="lower left", fontsize=7, ncol=len(labels))
    fig.tight_layout()
    plots["exit_mix"] = str(out / "exit_mix.png")
    fig.savefig(plots["exit_mix"], dpi=120)
    plt.close(fig)
    mix = {lab: float(sum(1 for _, s in samples if s == lab) / len(samples)) for lab in labels}

    # latency percentiles per answering tier
    fig, ax = plt.subplots(figsize=(9, 3.8))
    lat_all: dict[str, dict[str, float]] = {}
    for tier, color in (("edge", "tab:blue"), ("cloud", "tab:orange")):
        rs = [r for r in ok if tier_of(r) == tier]
        if not rs:
            continue
        t = np.array([r["t"] for r in rs])
        lat = np.array([r["latency_ms"] for r in rs])
        lat_all[tier] = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99)), "requests": len(rs)}
        e = _bins(t)
        b = np.clip(np.digitize(t, e) - 1, 0, len(e) - 2)
        m = (e[:-1] + e[1:]) / 2 - t0
        for q, style in ((50, "-"), (95, "--"), (99, ":")):
            ys = [np.percentile(lat[b == i], q) if (b == i).any() else np.nan for i in range(len(e) - 1)]
            ax.plot(m, ys, style, color=color, label=f"{tier} p{q}")
    _phases(ax, data, t0)
    ax.set(xlabel="seconds into the run", ylabel="latency (ms, client side)", yscale="log", title="Request latency by answering tier")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    plots["latency_tiers"] = str(out / "latency_tiers.png")
    fig.savefig(plots["latency_tiers"], dpi=120)
    plt.close(fig)

    # drift score per replica, threshold, alarms
    readings = [d for d in data.drift if d.get("score") is not None]
    if not readings:
        notes.append("no drift plot: the log has no drift readings with a score (it needs `kind: drift` lines from a served version "
                     "that has a drift reference: calibrate it, and log GET /v1/models while traffic flows)")
    else:
        fig, ax = plt.subplots(figsize=(9, 3.8))
        for rep in sorted({d["replica"] for d in readings}):
            rd = [d for d in readings if d["replica"] == rep]
            ax.plot([d["t"] - t0 for d in rd], [d["score"] for d in rd], "-", lw=1.2, label=f"replica {rep[:8]}")
            prev = rd[0]["alarms"]
            for d in rd[1:]:
                if d["alarms"] > prev:
                    ax.axvline(d["t"] - t0, color="tab:red", lw=1.5)
                    ax.annotate("alarm", (d["t"] - t0, d["score"]), xytext=(4, 4), textcoords="offset points", color="tab:red", fontsize=8)
                prev = d["alarms"]
        thr = readings[0].get("threshold")
        if thr:
            ax.axhline(thr, color="tab:red", ls="--", lw=1, label=f"alarm threshold {thr:.2f}")
        _phases(ax, data, t0)
        ax.set(xlabel="seconds into the run", ylabel="drift score (largest KS D)", ylim=(0, 1.05), title="Drift score of the served traffic")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plots["drift"] = str(out / "drift.png")
        fig.savefig(plots["drift"], dpi=120)
        plt.close(fig)
    return Report(plots=plots, latency_ms=lat_all, exit_mix=mix, notes=notes)
