"""The "security" bench section's offline measurements: adversarial detection and the
poisoning audits, each over several seeds, and the FGSM detection plot.

``jobs/bench_security.py`` adds what needs a live deployment (the extraction clients, the
global rate limit, the auth overhead and the fuzz run) and merges the section.
Per-seed numbers are kept; the headline of a rate that must be high is the worst seed's,
of one that must be low the worst (highest) seed's, so a target "holds" only in 3 of 3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dynray.security.anomaly import AdversarialDetector, audit_backdoor, audit_labels, exit_probs, train_audit_model
from dynray.security.attacks import add_backdoor, fgsm, flip_labels, pgd

__all__ = ["EPS_GRID", "FPR_GRID", "adversarial", "poisoning", "plot_fgsm"]

EPS_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
FPR_GRID = (0.01, 0.02, 0.05, 0.1, 0.2)


def _rate(mask: torch.Tensor) -> float:
    return round(float(mask.float().mean()), 4) if len(mask) else float("nan")


def adversarial(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, seeds: Sequence[int], n_attack: int = 500, eps: float = 0.1,
                fpr: float = 0.03, fit_eps: Sequence[float] = (0.05, 0.1, 0.2), eps_grid: Sequence[float] = EPS_GRID,
                fpr_grid: Sequence[float] = FPR_GRID, progress: Callable[[str], None] | None = None) -> dict:
    """Per seed, split the clean images in half. The first half builds the detector: a third
    of it, clean and FGSM-attacked at ``fit_eps``, fits the signal weights; the other two
    thirds (clean) set the threshold at ``fpr``. The second half is
    held out: its false-positive rate, and the detection of FGSM and PGD (an attack the
    detector never saw) at ``eps``, over all crafted inputs and those that flip the answer;
    plus the curves over ``eps_grid`` and ``fpr_grid``."""
    per_seed = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        perm = torch.randperm(len(labels), generator=g)
        half = len(perm) // 2
        fit_idx, cal, ev = perm[: half // 3], perm[half // 3 : half], perm[half:]  # a threshold needs more samples than the weights
        det = AdversarialDetector(model)
        xf, yf = images[fit_idx], labels[fit_idx]
        det.fit(images[fit_idx], torch.cat([fgsm(model, xf, yf, e) for e in fit_eps]))
        det.calibrate(images[cal], fpr)
        x, y = images[ev][:n_attack], labels[ev][:n_attack]
        clean_scores = det.scores(images[ev])
        row: dict = {"seed": s, "threshold": round(det.threshold, 4), "fpr": _rate(clean_scores > det.threshold), "n_clean_heldout": len(ev),
                     "n_fit": len(fit_idx), "n_calibrate": len(cal), "n_attack": len(y)}
        for name, attack in (("fgsm", lambda e: fgsm(model, x, y, e)), ("pgd", lambda e: pgd(model, x, y, e, steps=20, seed=s))):
            adv = attack(eps)
            flipped = exit_probs(model, adv)[-1].argmax(1) != y
            flags = det.flag(adv)
            row[name] = {"detection_rate": _rate(flags), "success_rate": _rate(flipped), "detection_rate_successful": _rate(flags[flipped])}
        fg, cal_scores = det.scores(fgsm(model, x, y, eps)), det.scores(images[cal])
        row["fgsm_vs_fpr"] = [{"fpr": f, "detection_rate": _rate(fg > torch.quantile(cal_scores, 1 - f))} for f in fpr_grid]
        row["vs_eps"] = [{"eps": e, "fgsm": _rate(det.flag(fgsm(model, x, y, e))), "pgd": _rate(det.flag(pgd(model, x, y, e, steps=10, seed=s)))} for e in eps_grid]
        per_seed.append(row)
        if progress is not None:
            progress(f"adversarial seed {s}: held-out FPR {row['fpr']:.3f}, FGSM detected {row['fgsm']['detection_rate']:.3f}, PGD {row['pgd']['detection_rate']:.3f}")
    return {
        "eps": eps, "target_fpr": fpr, "fit_eps": list(fit_eps),
        "detector": "logistic regression over squeeze / exit-disagreement signals, fitted on FGSM (dynray.security.anomaly.AdversarialDetector)",
        "fgsm_detection_rate": min(r["fgsm"]["detection_rate"] for r in per_seed),
        "fgsm_fpr": max(r["fpr"] for r in per_seed),
        "pgd_detection_rate": min(r["pgd"]["detection_rate"] for r in per_seed),
        "per_seed": per_seed,
    }


def poisoning(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, seeds: Sequence[int], flip_frac: float = 0.1,
              backdoor_frac: float = 0.05, progress: Callable[[str], None] | None = None) -> dict:
    """Per seed: flip ``flip_frac`` of the labels and audit them; stamp a backdoor on
    ``backdoor_frac`` and audit a model trained on that data by activation clustering."""
    per_seed = []
    for s in seeds:
        y, flipped = flip_labels(labels, flip_frac, num_classes, seed=s)
        lab = audit_labels(images, y, num_classes, seed=s)
        lp, lr = lab.precision_recall(flipped.numpy())
        xb, yb, poisoned = add_backdoor(images, labels, backdoor_frac, target=0, seed=s)
        model = train_audit_model(xb, yb, num_classes, epochs=5, seed=s)
        bd = audit_backdoor(model, xb, yb, num_classes, seed=s)
        bp, br = bd.precision_recall(poisoned.numpy())
        per_seed.append({"seed": s, "flipped": len(flipped), "flagged": len(lab.flagged), "precision": round(lp, 4), "recall": round(lr, 4),
                         "backdoor": {"poisoned": len(poisoned), "flagged": len(bd.flagged), "precision": round(bp, 4), "recall": round(br, 4)}})
        if progress is not None:
            progress(f"poisoning seed {s}: label audit P {lp:.3f} R {lr:.3f}; backdoor audit P {bp:.3f} R {br:.3f}")
    return {
        "flip_frac": flip_frac, "backdoor_frac": backdoor_frac, "method": "out-of-fold margin (labels), activation clustering (backdoor)",
        "poison_precision": min(r["precision"] for r in per_seed), "poison_recall": min(r["recall"] for r in per_seed),
        "backdoor_precision": min(r["backdoor"]["precision"] for r in per_seed), "backdoor_recall": min(r["backdoor"]["recall"] for r in per_seed),
        "per_seed": per_seed,
    }


def plot_fgsm(adv: dict, path: str | Path) -> str:
    """Detection rate against eps (at the calibrated FPR) and against the FPR (at eps), every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in adv["per_seed"]:
        eps = [p["eps"] for p in r["vs_eps"]]
        a.plot(eps, [p["fgsm"] for p in r["vs_eps"]], "o-", color="tab:blue", alpha=0.7, label="FGSM" if r is adv["per_seed"][0] else None)
        a.plot(eps, [p["pgd"] for p in r["vs_eps"]], "s--", color="tab:red", alpha=0.7, label="PGD-10" if r is adv["per_seed"][0] else None)
        b.plot([p["fpr"] for p in r["fgsm_vs_fpr"]], [p["detection_rate"] for p in r["fgsm_vs_fpr"]], "o-", alpha=0.7, label=f"seed {r['seed']}")
    a.axvline(adv["eps"], color="grey", lw=0.8, ls=":")
    a.set(xlabel="eps (L-inf, inputs in [0, 1])", ylabel="detected", title=f"detection vs eps, threshold at {adv['target_fpr']:.0%} clean FPR", ylim=(0, 1.02))
    b.axvline(adv["target_fpr"], color="grey", lw=0.8, ls=":")
    b.set(xlabel="false-positive rate the threshold is set to (clean calibration set)", ylabel="FGSM detected", title=f"FGSM eps={adv['eps']}: detection vs FPR", xscale="log", ylim=(0, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def format_security(s: dict) -> str:
    """The section as printed by `dynray bench security`."""
    def pct(v) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    adv, poi = s["adversarial"], s["poisoning"]
    lines = [f"security ({s['dataset']}, model {s['model']}, seeds {s['seeds']}; worst seed shown):",
             f"  FGSM eps={adv['eps']}: {pct(s['fgsm_detection_rate'])} detected at {pct(s['fgsm_fpr'])} false positives (PGD-20: {pct(adv['pgd_detection_rate'])})",
             f"  label flips {pct(poi['flip_frac'])}: audit precision {pct(s['poison_precision'])}, recall {pct(s['poison_recall'])}; "
             f"backdoor {pct(poi['backdoor_frac'])}: precision {pct(poi['backdoor_precision'])}, recall {pct(poi['backdoor_recall'])}"]
    if "extraction" in s:
        e, r, o = s["extraction"], s["ratelimit"], s["auth_overhead"]
        lines += [f"  extraction client refused after {e['queries_to_flag']} queries (substitute accuracy {e['substitute_accuracy']}); "
                  f"{e['normal_refused']} of {e['normal_clients']} normal clients refused",
                  f"  rate limit {r['rate']:g}/s over {r['replicas']} ingress replicas: {r['allowed']} allowed vs {r['expected']} expected ({pct(r['error_frac'])} off)",
                  f"  auth + limiter: p50 {o['on_p50_ms']} ms vs {o['off_p50_ms']} ms without ({o['p50_ms_added']:+.2f} ms, one request at a time); "
                  f"limiter round trip p50 {s['limiter_round_trip']['concurrency_1']['p50_ms']} ms ({s['limiter_round_trip']['concurrency_8']['p50_ms']} ms with 8 in flight)",
                  f"  fuzz: {s['fuzz_cases']} cases from the OpenAPI schema, {s['fuzz_5xx']} answered 5xx"]
    lines.append(f"  plot: {s['plot']}")
    return "\n".join(lines)
