"""After a search: classify trials, take the front, check dominance, measure the predictor,
register the best configs and write the table, the plot and the JSON summary."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from dynray.errors import ConfigError
from dynray.fileio import write_atomic
from dynray.models import build
from dynray.nas.pareto import pareto_front, plot_front
from dynray.nas.predictor import Observation, heldout_spearman
from dynray.nas.config import NASConfig, NASResult, TrialRecord, settings_for
from dynray.nas.space import Candidate
from dynray.nas.trainable import REFERENCE_KEY, RULE_FILE, WEIGHTS_FILE, train_config_for
from dynray.registry import ModelRegistry
from dynray.store import save_model
from dynray.thresholds import ThresholdRule

__all__ = ["summarise", "records_from_grid", "observations", "write_table", "format_table"]
log = logging.getLogger(__name__)


def _trial_json(checkpoint: Any) -> dict | None:
    if checkpoint is None:
        return None
    p = Path(checkpoint.path) / RULE_FILE
    return json.loads(p.read_text()) if p.exists() else None


def records_from_grid(grid: Any, stopped: set[str], epochs: int) -> tuple[list[TrialRecord], dict[str, Any]]:
    """One :class:`TrialRecord` per Tune result, and each trial's metrics history."""
    records, histories = [], {}
    for r in grid:
        m = dict(r.metrics or {})
        tid = m.get("trial_id") or Path(r.path).name
        saved = _trial_json(r.checkpoint)
        config = {k: v for k, v in (r.config or {}).items() if k != REFERENCE_KEY}
        candidate = saved["candidate"] if saved else config
        done = int(m.get("training_iteration", 0) or 0)
        if r.error is not None:
            status = "failed"
        elif tid in stopped:
            status = "stopped"
        elif done < epochs:
            status = "budget"
        else:
            status = "completed"
        keep = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        records.append(TrialRecord(
            trial_id=tid, status=status, candidate=candidate, epochs=done, metrics=keep,
            reference=bool((r.config or {}).get(REFERENCE_KEY)), error=None if r.error is None else f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300]}",
            checkpoint=r.checkpoint.path if r.checkpoint is not None else None, darts=(saved or {}).get("darts"),
        ))
        if r.error is None and r.metrics_dataframe is not None:
            histories[tid] = r.metrics_dataframe
    return records, histories


def observations(records: list[TrialRecord], histories: dict[str, Any], cfg: NASConfig) -> list[Observation]:
    """Every report of every trial that did not fail, as predictor rows (a trial the time
    budget cut before its first report has no candidate and no rows: skipped)."""
    out = []
    for t in records:
        if t.status == "failed" or t.epochs == 0 or not t.candidate or t.trial_id not in histories:
            continue
        vec = cfg.space.encode(Candidate.from_dict(t.candidate))
        for _, row in histories[t.trial_id].iterrows():
            if all(k in row and row[k] == row[k] for k in ("accuracy", "macs", "latency_ms")):
                # test_accuracy rides along for the check's val/test agreement; the predictor never fits it
                keys = ("accuracy", "macs", "latency_ms") + (("test_accuracy",) if "test_accuracy" in row and row["test_accuracy"] == row["test_accuracy"] else ())
                out.append(Observation(t.trial_id, vec, int(row["training_iteration"]), {k: float(row[k]) for k in keys}))
    return out


def _predictor_report(obs: list[Observation], cfg: NASConfig) -> dict:
    """Held-out rank correlation of the search's predictor (5-fold by candidate).

    ``at_first_rung`` is the honest number: every held-out trial at the first ASHA rung, so
    all compared trials trained equally long; ``null95`` there is what randomly permuted
    predictions reach with this many trials, ``val_test_spearman`` how well a second
    measurement (test) of the same trials agrees with their val ranking (a ceiling), and
    ``accuracy_iqr`` their spread. ``at_last_report`` compares trials at different epochs,
    which the predictor is told, so the epochs dominate it. ``vector_only`` is the same check
    for the same ensemble on the raw encoding (no proxies), for comparison.
    """
    from dynray.nas.predictor import PredictorConfig
    from dynray.nas.proxies import CandidateFeatures, ProxyConfig

    n = len({o.trial for o in obs})
    if n < 5:
        return {"skipped": f"{n} trials with reports; the held-out check needs >= 5"}
    proxies = ProxyConfig(dataset=cfg.dataset, data_root=cfg.data_root, seed=cfg.seed)
    features = CandidateFeatures(cfg.space, proxies)
    pcfg = PredictorConfig()
    try:
        return {
            "model": f"ensemble ({' + '.join(pcfg.members)}) per metric on [{', '.join(proxies.columns)}, log epochs]",
            "folds": 5,
            "at_first_rung": heldout_spearman(obs, cfg.epochs, at_epoch=cfg.grace, seed=cfg.seed, features=features, config=pcfg),
            "at_last_report": heldout_spearman(obs, cfg.epochs, at_epoch=None, seed=cfg.seed, features=features, config=pcfg),
            "vector_only": {"at_first_rung": heldout_spearman(obs, cfg.epochs, at_epoch=cfg.grace, seed=cfg.seed, config=pcfg)},
        }
    except ConfigError as e:  # e.g. fewer than 5 distinct candidates: report why, keep the search's result
        return {"skipped": str(e)}


def _dominance(records: list[TrialRecord], front: list[int]) -> dict:
    ref = next((t for t in records if t.reference), None)
    if ref is None or ref.status != "completed":
        return {"dominates_default": False, "reason": "no completed reference trial"}
    rm = ref.metrics

    def beats(m: dict, acc: str, macs: str) -> bool:
        return m[acc] > rm[acc] and m[macs] < rm[macs]

    on_test = [records[i].trial_id for i in front if not records[i].reference and beats(records[i].metrics, "test_accuracy", "test_macs")]
    on_val = [records[i].trial_id for i in front if not records[i].reference and beats(records[i].metrics, "accuracy", "macs")]
    return {
        "dominates_default": bool(on_test),
        "dominating_on_test": on_test,
        "dominating_on_val": on_val,
        "reference": {k: rm[k] for k in ("accuracy", "macs", "test_accuracy", "test_macs", "latency_ms")},
    }


def _register(records: list[TrialRecord], front: list[int], cfg: NASConfig, registry: ModelRegistry) -> list[str]:
    settings = settings_for(cfg)
    best = sorted(front, key=lambda i: records[i].metrics["score"], reverse=True)[: cfg.register_top]
    refs = []
    for i in best:
        t = records[i]
        if t.checkpoint is None:
            continue
        saved = json.loads((Path(t.checkpoint) / RULE_FILE).read_text())
        cand = Candidate.from_dict(saved["candidate"])
        model = build(train_config_for(cand, settings).model_config())
        model.load_state_dict(load_file(str(Path(t.checkpoint) / WEIGHTS_FILE)))
        m = t.metrics
        metrics = {"val_accuracy_adaptive": m["accuracy"], "val_macs_adaptive": m["macs"], "test_accuracy_adaptive": m["test_accuracy"], "test_macs_adaptive": m["test_macs"], "latency_ms_b256": m["latency_ms"], "epochs": t.epochs}
        info = save_model(
            registry, f"nas-{cfg.dataset}", model.eval(), dataset=cfg.dataset, rule=ThresholdRule.from_dict(saved["rule"]), metrics=metrics,
            extra={"nas": {"trial": t.trial_id, "searcher": cfg.searcher, "candidate": cand.to_dict(), "describe": cand.describe(), "score": m["score"]},
                   "training": {"epochs": t.epochs, "lr": cand.lr, "weight_decay": cand.weight_decay, "seed": cfg.seed, "dataset": cfg.dataset},
                   "thresholds_source": f"calibrated on val (max drop {cfg.objective.max_drop}) by the NAS trial"},
        )
        refs.append(info.ref)
        log.info("registered %s: %s (val %.4f at %.0f MACs)", info.ref, cand.describe(), m["accuracy"], m["macs"])
    return refs


def write_table(records: list[TrialRecord], path: Path) -> Path:
    """The results table: one CSV row per trial."""
    rows = [t.row() for t in records]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
    w.writeheader()
    w.writerows(rows)
    return write_atomic(path, buf.getvalue())


def format_table(result: NASResult) -> str:
    """The results table as text: every trial, front members starred, then the summary."""
    front = {result.trials[i].trial_id for i in result.front}
    lines = [f"{'trial':<14} {'status':<9} {'ep':>3} {'val acc':>8} {'val MACs':>10} {'test acc':>8} {'test MACs':>10} {'lat ms':>7}  config"]
    order = sorted(result.trials, key=lambda t: (t.status != "completed", -(t.metrics.get("score") or -1e9)))
    for t in order:
        m = t.metrics
        mark = "*" if t.trial_id in front else ("R" if t.reference else " ")
        if t.status == "failed" or not all(k in m for k in ("accuracy", "macs", "test_accuracy", "test_macs", "latency_ms")):
            # failed, or cut by the time budget before its first report (no metrics)
            lines.append(f"{t.trial_id:<14} {t.status:<9} {t.epochs:>3} {'':>8} {'':>10} {'':>8} {'':>10} {'':>7}  {t.row()['config']}" + (f"  [{t.error}]" if t.error else ""))
            continue
        lines.append(f"{t.trial_id:<14} {t.status:<9} {t.epochs:>3} {m['accuracy']:>8.4f} {m['macs']:>10,.0f} {m['test_accuracy']:>8.4f} {m['test_macs']:>10,.0f} {m['latency_ms']:>7.2f} {mark}{t.row()['config']}")
    s = result.section()
    lines.append(f"{len(result.trials)} trials in {result.minutes:.1f} min: {s['status_counts']}; ASHA stopped {100 * result.asha_stopped_frac:.0f}% early")
    lines.append("* = Pareto front (completed trials, val); R = the foundation default (reference)")
    dom = result.dominance
    if "reference" in dom:
        r = dom["reference"]
        lines.append(f"reference on test: {r['test_accuracy']:.4f} at {r['test_macs']:,.0f} MACs; dominated on test by {dom['dominating_on_test'] or 'none'}")
    pr = result.predictor
    if "at_first_rung" in pr:
        a, b = pr["at_first_rung"], pr["at_last_report"]
        lines.append(f"predictor Spearman on held-out trials (first rung / last report): accuracy {a['accuracy']:.2f} / {b['accuracy']:.2f}, MACs {a['macs']:.2f} / {b['macs']:.2f}, latency {a['latency_ms']:.2f} / {b['latency_ms']:.2f}")
        if "accuracy_null95" in a:
            lines.append(f"  accuracy at the first rung: {a['trials']} trials, chance reaches {a['accuracy_null95']:.2f} (95th pct, p = {a['accuracy_p']:.3f}), "
                         f"accuracy IQR {100 * a['accuracy_iqr']:.1f} pt, val/test agreement {a.get('val_test_spearman', float('nan')):.2f}; raw encoding only: {pr['vector_only']['at_first_rung']['accuracy']:.2f}")
    elif "skipped" in pr:
        lines.append(f"predictor check skipped: {pr['skipped']}")
    lines.append(f"registered: {', '.join(result.registered) or 'none'}; files: {', '.join(result.files.values())}")
    return "\n".join(lines)


def summarise(cfg: NASConfig, grid: Any, stopped: set[str], minutes: float, registry: ModelRegistry, out_dir: Path) -> NASResult:
    """Everything a finished search reports (see the module docstring)."""
    records, histories = records_from_grid(grid, stopped, cfg.epochs)
    if not records:
        raise ConfigError("the search ran no trial", got=cfg.trials, fix="raise --time-budget or check the Ray cluster's free CPUs")
    done = [i for i, t in enumerate(records) if t.status == "completed"]
    front = [done[j] for j in pareto_front([(records[i].metrics["accuracy"], records[i].metrics["macs"]) for i in done])]
    eligible = [t for t in records if not t.reference and t.status != "failed"]
    asha_frac = sum(t.status == "stopped" for t in eligible) / max(len(eligible), 1)
    pred = _predictor_report(observations(records, histories, cfg), cfg)
    dominance = _dominance(records, front)
    registered = _register(records, front, cfg, registry)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table": str(write_table(records, out_dir / "nas_trials.csv"))}
    plotted = [t for t in records if t.status != "failed" and t.metrics.get("accuracy") is not None]  # not the trials cut before a report
    pos = {id(t): j for j, t in enumerate(plotted)}
    ref = next((t for t in plotted if t.reference), None)
    files["front"] = str(plot_front(
        [{**t.metrics, "status": "completed" if t.status == "completed" else "stopped"} for t in plotted],
        [pos[id(records[i])] for i in front], out_dir / "nas_front.png",
        reference=ref.metrics if ref is not None and ref.metrics else None,
        title=f"{cfg.searcher} search on {cfg.dataset}: {len(records)} trials, {minutes:.1f} min",
    ))
    result = NASResult(config=cfg, trials=records, front=front, minutes=minutes, asha_stopped_frac=asha_frac, predictor=pred, registered=registered, dominance=dominance, files=files)
    write_atomic(out_dir / "nas_result.json", json.dumps(result.section(), indent=2, default=str))
    files["json"] = str(out_dir / "nas_result.json")
    return result
