"""Measurements: the bench JSON sections and the accuracy-vs-MACs plot.

Every number in the README and the closing notes comes from here. Accuracy and MACs are
measured on the real compacted forward pass (``forward_exits``); the threshold sweep in the
plot uses the exact cached-output simulation (see ``dynray.evaluation``). Given the val split
and the rows of a static-CNN sweep (:mod:`dynray.bench.static`), the section also holds the
static and adaptive frontiers and their ratio (:mod:`dynray.bench.baselines`).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynray.bench.baselines import adaptive_frontier, compare_frontiers
from dynray.data import Split
from dynray.errors import ConfigError
from dynray.evaluation import ExitRecords, collect_exit_outputs, oracle, simulate
from dynray.models.fuse import fused_copy
from dynray.store import StoredModel
from dynray.thresholds import ThresholdRule

__all__ = ["CoreBenchConfig", "bench_core", "plot_tradeoff"]
log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CoreBenchConfig:
    """How long to time things."""

    batch: int = 256
    """Large-batch size for latency and throughput."""
    batches: int = 40
    """Timed large batches per path (cycling over the test split)."""
    singles: int = 300
    """Timed batch-1 calls per path."""
    warmup_s: float = 1.5
    """Untimed seconds of calls before each timing loop (oneDNN primitive creation and the
    CPU's clock ramp take ~1 s on this machine; fewer warm-up calls skew the first path timed)."""
    threads: int = 1
    """Torch intra-op threads for the latency/throughput numbers. 1 matches a Ray actor or Serve
    replica with num_cpus=1 (Ray sets OMP_NUM_THREADS=1 there); the all-threads throughput is
    reported beside it."""


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {f"p{q}": round(float(np.percentile(ms, q)), 4) for q in (50, 95, 99)}


def _time_pair(
    fa: Callable[[torch.Tensor], object], fb: Callable[[torch.Tensor], object], inputs: list[torch.Tensor], warmup_s: float
) -> tuple[list[float], list[float]]:
    """Seconds per call of two paths, alternating on the same inputs.

    Alternating keeps slow drifts of a shared machine (frequency, neighbours) out of the
    ratio between the two paths.
    """
    end = time.perf_counter() + warmup_s
    i = 0
    while time.perf_counter() < end:
        fa(inputs[i % len(inputs)])
        fb(inputs[i % len(inputs)])
        i += 1
    ta, tb = [], []
    for x in inputs:
        t0 = time.perf_counter()
        fa(x)
        t1 = time.perf_counter()
        fb(x)
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    return ta, tb


def _rule(stored: StoredModel) -> ThresholdRule:
    if stored.rule is None:
        raise ConfigError("the model has no thresholds", got=stored.info.ref, fix=f"run `dynray calibrate --model {stored.info.ref} --max-drop 0.005`")
    return stored.rule


@torch.inference_mode()
def bench_core(stored: StoredModel, test: Split, *, cfg: CoreBenchConfig = CoreBenchConfig(), plot: str | Path | None = None,
               val: Split | None = None, static_rows: list[dict] | None = None) -> dict:
    """The "core" section: accuracy, MACs, oracle, exit mix, latency, throughput, memory; with
    ``val`` and ``static_rows``, the static baseline and both frontiers too."""
    model, rule = fused_copy(stored.model), _rule(stored)  # BatchNorm folded, for both paths
    x, y = test.images, test.labels
    log.info("core bench: %s on %s/%s (%d samples)", stored.info.ref, test.name, test.split, len(y))
    out = model.forward_exits(x, rule)  # the real compacted pass
    full_logits = model.forward_full(x)
    rec = collect_exit_outputs(model, x, y)
    orc, orc_strict = oracle(rec), oracle(rec, unsolved="first")
    n_exits = model.num_exits

    def batches(size: int, count: int) -> list[torch.Tensor]:
        starts = [(i * size) % max(1, len(x) - size + 1) for i in range(count)]
        return [x[s : s + size] for s in starts]

    def adaptive(t: torch.Tensor) -> object:
        return model.forward_exits(t, rule)

    b1 = batches(1, cfg.singles)
    big = batches(cfg.batch, cfg.batches)
    all_threads = torch.get_num_threads()
    t_full_all, t_adapt_all = _time_pair(model.forward_full, adaptive, big, cfg.warmup_s)
    torch.set_num_threads(cfg.threads)
    try:
        s1_full, s1_adapt = _time_pair(model.forward_full, adaptive, b1, cfg.warmup_s)
        t_full, t_adapt = _time_pair(model.forward_full, adaptive, big, cfg.warmup_s)
    finally:
        torch.set_num_threads(all_threads)
    lat = {
        "full": {"b1": _percentiles(s1_full), f"b{cfg.batch}": _percentiles(t_full)},
        "adaptive": {"b1": _percentiles(s1_adapt), f"b{cfg.batch}": _percentiles(t_adapt)},
    }
    n_big = sum(len(b) for b in big)
    section = {
        "dataset": test.name,
        "n_test": int(len(y)),
        "model": stored.info.ref,
        "accuracy_full": float((full_logits.argmax(1) == y).float().mean()),
        "accuracy_adaptive": float((out.logits.argmax(1) == y).float().mean()),
        "accuracy_oracle": orc.accuracy,
        "accuracy_per_exit": rec.exit_accuracy(),
        "macs_full": int(model.mac_profile.full),
        "macs_adaptive": float(out.macs.double().mean()),
        "macs_oracle": orc.mean_macs,
        "macs_oracle_strict": orc_strict.mean_macs,
        "macs_per_exit": list(model.mac_profile.cumulative),
        "exit_fractions": (torch.bincount(out.exit_index, minlength=n_exits).double() / len(y)).tolist(),
        "latency_ms": lat,
        "throughput_sps": {"full": n_big / sum(t_full), "adaptive": n_big / sum(t_adapt), "batch": cfg.batch, "threads": cfg.threads},
        "throughput_sps_all_threads": {"full": n_big / sum(t_full_all), "adaptive": n_big / sum(t_adapt_all), "threads": all_threads},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "threads": cfg.threads,
        "thresholds": rule.to_dict(),
    }
    section["macs_saving"] = section["macs_full"] / section["macs_adaptive"]
    section["adaptive_vs_oracle"] = section["macs_adaptive"] / section["macs_oracle"]
    section["throughput_gain"] = section["throughput_sps"]["adaptive"] / section["throughput_sps"]["full"]
    if val is not None and static_rows:
        front = adaptive_frontier(collect_exit_outputs(model, val.images, val.labels), rec, rule)
        section.update(compare_frontiers(static_rows, front, section["accuracy_adaptive"], section["macs_adaptive"]))
    if plot is not None:
        section["plot"] = str(plot_tradeoff(rec, rule, section, plot))
    return section


def plot_tradeoff(rec: ExitRecords, rule: ThresholdRule, section: dict, path: str | Path, *, points: int = 60) -> Path:
    """Accuracy vs mean MACs over a sweep of a shared threshold, with the reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = []
    for t in np.linspace(0.0, 1.0, points):
        o = simulate(rec, ThresholdRule(thresholds=(float(t),) * (rec.num_exits - 1), confidence=rule.confidence,
                                        complexity_weight=rule.complexity_weight, feature_weights=rule.feature_weights))
        sweep.append((o.mean_macs, o.accuracy))
    sweep.sort()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([m / 1e6 for m, _ in sweep], [a for _, a in sweep], "-", color="tab:blue", label=f"threshold sweep ({rule.confidence})")
    ax.scatter([section["macs_adaptive"] / 1e6], [section["accuracy_adaptive"]], color="tab:red", zorder=3, s=60, label="calibrated operating point")
    ax.scatter([section["macs_full"] / 1e6], [section["accuracy_full"]], color="black", marker="s", zorder=3, label="full network")
    ax.scatter([section["macs_oracle"] / 1e6], [section["accuracy_oracle"]], color="tab:green", marker="*", s=120, zorder=3, label="oracle")
    for key, style, label in (("frontier_adaptive", "-o", "adaptive frontier (rules calibrated on val)"), ("frontier_static", "-s", "static CNNs (mean of seeds)")):
        if section.get(key):
            pts = section[key]
            ax.plot([q["macs"] / 1e6 for q in pts], [q["accuracy"] for q in pts], style, ms=4, color="tab:orange" if key == "frontier_adaptive" else "tab:gray", label=label)
    if section.get("static_sweep"):
        rows = section["static_sweep"]
        ax.scatter([r["macs"] / 1e6 for r in rows], [r["accuracy"] for r in rows], s=8, color="tab:gray", alpha=0.4, label="static CNNs (each seed)")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    lo = min(m for m, _ in sweep) / 1e6
    hi = max([section["macs_full"]] + [r["macs"] for r in section.get("static_sweep") or []]) / 1e6
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if lo / 2 <= t <= hi * 2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean MACs per sample (millions, log scale)")
    ax.set_ylabel("test accuracy")
    title = f"{section['model']} on {section['dataset']}: {section['macs_saving']:.1f}x fewer MACs than its full network"
    if section.get("static_equal_accuracy_ratio"):
        title += f",\n{section['static_equal_accuracy_ratio']:.1f}x fewer than the cheapest static CNN as accurate"
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
