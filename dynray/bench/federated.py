"""Measurements of the ``"federated"`` bench section: FedAvg against centralised training,
compressed updates against dense ones, secure aggregation against plain, over seeds.

The federated runs themselves need device actors, so ``jobs/bench_federated.py`` drives them
(:func:`actors.federated.run_federated`) and hands each seed's records here. The centralised
baseline (:func:`central_accuracy`) trains the same model with the same recipe, in one
process on the whole training split, for as many epochs as one client makes in all rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from dynray.data import Split
from dynray.evaluation import full_accuracy
from dynray.models.build import build
from dynray.models.config import DynamicNetConfig
from dynray.training import TrainConfig, train_local

__all__ = ["central_accuracy", "curve", "seed_row", "summarize", "plot_bytes", "format_federated"]


def central_accuracy(model: DynamicNetConfig, train: Split, test: Split, recipe: TrainConfig) -> float:
    """Test accuracy (last exit) of ``model`` trained on all of ``train`` with ``recipe``."""
    torch.manual_seed(recipe.seed)
    net = build(model)
    net.complexity.fit(train.images)
    return full_accuracy(train_local(net, train, dataclasses.replace(recipe, model=model, workers=1)), test)


def curve(records: Sequence[dict]) -> list[dict]:
    """Test accuracy against the cumulative bytes sent up (updates) and in all, round by round."""
    up = total = 0
    out = []
    for r in records:
        up += r["bytes_up"]
        total += r["bytes_up"] + r["bytes_down"] + r["bytes_keys"]
        out.append({"round": r["round"], "bytes_up": up, "bytes_total": total, "accuracy": r["accuracy"]})
    return out


def seed_row(seed: int, central: float, runs: dict[str, list[dict]], secure_diff: float) -> dict:
    """One seed: ``runs`` maps a codec name (dense first) to its rounds' records."""
    row: dict = {"seed": seed, "accuracy_central": central, "secure_agg_max_abs_diff": secure_diff, "runs": {}}
    for name, records in runs.items():
        row["runs"][name] = {"accuracy": records[-1]["accuracy"], "bytes_up": sum(r["bytes_up"] for r in records),
                             "bytes_down": sum(r["bytes_down"] for r in records), "curve": curve(records)}
    dense = row["runs"]["dense"]
    for name, r in row["runs"].items():
        r["bytes_ratio"] = dense["bytes_up"] / r["bytes_up"]
        r["accuracy_loss_vs_dense"] = dense["accuracy"] - r["accuracy"]
    row["gap_to_central"] = central - dense["accuracy"]
    return row


def summarize(rows: list[dict], *, compressed: str, config: dict) -> dict:
    """The section: the contract's headline fields (worst seed where a target is at stake), and every seed."""
    n = len(rows)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    comp = [r["runs"][compressed] for r in rows]
    return {
        "accuracy_fedavg": mean([r["runs"]["dense"]["accuracy"] for r in rows]),
        "accuracy_central": mean([r["accuracy_central"] for r in rows]),
        "worst_gap_to_central": max(r["gap_to_central"] for r in rows),
        "compressed": compressed,
        "bytes_ratio": min(c["bytes_ratio"] for c in comp),
        "compressed_worst_accuracy_loss": max(c["accuracy_loss_vs_dense"] for c in comp),
        "secure_agg_max_abs_diff": max(r["secure_agg_max_abs_diff"] for r in rows),
        "seeds": [r["seed"] for r in rows],
        "per_seed": rows,
        "config": config,
        "targets_met": {
            "fedavg_within_2pt_of_central": sum(r["gap_to_central"] <= 0.02 for r in rows),
            "compressed_4x_fewer_bytes_within_1pt": sum(c["bytes_ratio"] >= 4 and c["accuracy_loss_vs_dense"] <= 0.01 for c in comp),
            "of": n,
        },
    }


def plot_bytes(section: dict, path: str | Path) -> str:
    """Test accuracy against the megabytes of updates sent, one line per codec and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(section["per_seed"][0]["runs"])
    for k, name in enumerate(names):
        for j, row in enumerate(section["per_seed"]):
            c = row["runs"][name]["curve"]
            ax.plot([p["bytes_up"] / 1e6 for p in c], [p["accuracy"] for p in c], color=f"C{k}", alpha=0.85, marker=".", markersize=3,
                    label=f"{name} ({row['runs'][name]['bytes_ratio']:.2f}x fewer bytes)" if j == 0 else None)
    for j, row in enumerate(section["per_seed"]):
        ax.axhline(row["accuracy_central"], color="black", linestyle=":", linewidth=1, label="centralised (per seed)" if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("MB of client updates sent (cumulative, log scale)")
    ax.set_ylabel("test accuracy of the global model")
    lo = min(p["accuracy"] for row in section["per_seed"] for r in row["runs"].values() for p in r["curve"][len(r["curve"]) // 3 :])
    ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    cfg = section["config"]
    ax.set_title(f"FedAvg, {cfg['clients']} non-IID clients (Dirichlet {cfg['alpha']}), {cfg['rounds']} rounds, seeds {section['seeds']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def format_federated(s: dict) -> str:
    t = s["targets_met"]
    comp = s["compressed"]
    lines = [
        f"FedAvg {s['accuracy_fedavg']:.4f} vs centralised {s['accuracy_central']:.4f} (mean of {t['of']}); worst gap {100 * s['worst_gap_to_central']:.2f} pt "
        f"(target <= 2): met in {t['fedavg_within_2pt_of_central']} of {t['of']} seeds",
        f"{comp} updates: {s['bytes_ratio']:.2f}x fewer bytes up (worst seed; target >= 4), worst accuracy loss vs dense {100 * s['compressed_worst_accuracy_loss']:+.2f} pt "
        f"(target <= 1): met in {t['compressed_4x_fewer_bytes_within_1pt']} of {t['of']} seeds",
        f"secure aggregation vs plain, same round: max |difference| {s['secure_agg_max_abs_diff']:.3g}",
    ]
    for r in s["per_seed"]:
        runs = ", ".join(f"{k} {v['accuracy']:.4f} ({v['bytes_up'] / 1e6:.1f} MB up)" for k, v in r["runs"].items())
        lines.append(f"  seed {r['seed']}: central {r['accuracy_central']:.4f}; {runs}")
    return "\n".join(lines)
