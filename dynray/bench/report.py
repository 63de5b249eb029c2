"""Every bench section as text: what `dynray bench` and the demo print after a measurement."""

from __future__ import annotations

__all__ = ["format_section", "format_core", "format_serve", "format_router", "format_moe", "format_nas", "format_drift"]


def format_core(s: dict) -> str:
    """The core section as text."""
    out: list[str] = []
    rows = [
        ("model", s["model"]),
        ("test samples", s["n_test"]),
        ("accuracy full / adaptive / oracle", f"{s['accuracy_full']:.4f} / {s['accuracy_adaptive']:.4f} / {s['accuracy_oracle']:.4f}"),
        ("MACs/sample full / adaptive / oracle", f"{s['macs_full']:,.0f} / {s['macs_adaptive']:,.0f} / {s['macs_oracle']:,.0f}"),
        ("MAC saving (full / adaptive)", f"{s['macs_saving']:.2f}x"),
        ("adaptive / oracle MACs", f"{s['adaptive_vs_oracle']:.3f}"),
        ("exit fractions", ", ".join(f"{f:.3f}" for f in s["exit_fractions"])),
        ("throughput b256 full / adaptive", f"{s['throughput_sps']['full']:,.0f} / {s['throughput_sps']['adaptive']:,.0f} samples/s ({s['throughput_gain']:.2f}x, {s['threads']} thread)"),
        (f"  same with {s['throughput_sps_all_threads']['threads']} threads", f"{s['throughput_sps_all_threads']['full']:,.0f} / {s['throughput_sps_all_threads']['adaptive']:,.0f} samples/s ({s['throughput_sps_all_threads']['adaptive'] / s['throughput_sps_all_threads']['full']:.2f}x)"),
        ("latency b1 p50 full / adaptive", f"{s['latency_ms']['full']['b1']['p50']:.3f} / {s['latency_ms']['adaptive']['b1']['p50']:.3f} ms"),
        ("latency b256 p50 full / adaptive", f"{s['latency_ms']['full']['b256']['p50']:.2f} / {s['latency_ms']['adaptive']['b256']['p50']:.2f} ms"),
        ("peak RSS", f"{s['peak_rss_mb']:.0f} MB"),
    ]
    if "static_sweep" in s:
        n = len({(r["width"], r["convs"]) for r in s["static_sweep"]})
        eq = s["macs_static_equal_accuracy"]
        rows.append((f"static CNNs ({n} nets, {len(s['static_sweep'])} runs)", f"best {s['static_max_accuracy']:.4f}; at {s['accuracy_adaptive']:.4f}: "
                     + (f"{eq:,.0f} MACs = {s['static_equal_accuracy_ratio']:.2f}x the adaptive net's" if eq is not None else "no static net is that accurate")))
        worst = s["frontier_worst_ratio"]
        if s["frontier"]:
            span = f"{s['frontier'][0]['accuracy']:.3f}-{s['frontier'][-1]['accuracy']:.3f}"
            rows.append((f"adaptive / static MACs, accuracy {span}", f"worst {worst:.2f}x" if worst is not None else "not comparable everywhere (a frontier ends below)"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.append(f"  {k:<{w}}  {v}")
    if "plot" in s:
        out.append(f"  plot: {s['plot']}")
    return "\n".join(out)


def format_serve(s: dict) -> str:
    """The serve section as text."""
    out: list[str] = []
    out.append(f"  {'system':<14} {'rps':>7} {'p50 ms':>8} {'p99 ms':>8} {'accuracy':>9} {'cost/1k':>9} {'escalated':>9}")
    for name, m in s["systems"].items():
        acc, cost, esc = (f"{m[k]:.4f}" if k in m else "-" for k in ("accuracy", "cost_per_1k", "escalated_frac"))
        out.append(f"  {name:<14} {m['rps']:>7.1f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {acc:>9} {cost:>9} {esc:>9}")
        if "light" in m:
            lt = m["light"]
            out.append(f"  {'  light':<14} {lt['rps']:>7.1f} {lt['p50_ms']:>8.2f} {lt['p99_ms']:>8.2f}   (concurrency {lt['concurrency']})")
    r = s["ratios"]
    if r:
        out.append(f"  dynray vs all-cloud: cost {r['cost_vs_all_cloud']:.3f}x, p50 {r['p50_vs_all_cloud']:.3f}x (light load {r['p50_vs_all_cloud_light'] or float('nan'):.3f}x), accuracy gap {r['accuracy_gap_pt']:+.2f} pt; rps vs no-op {r['rps_vs_noop']:.3f}x")
        if "cost_vs_cloud_adaptive" in r:
            out.append(f"  early exit alone (cloud_adaptive vs all-cloud): cost {r['cost_cloud_adaptive_vs_all_cloud']:.3f}x, p50 {r['p50_cloud_adaptive_vs_all_cloud']:.3f}x; "
                       f"the edge/cloud split on top (dynray vs cloud_adaptive): cost {r['cost_vs_cloud_adaptive']:.3f}x, p50 {r['p50_vs_cloud_adaptive']:.3f}x")
    if s.get("chaos"):
        c = s["chaos"]
        out.append(f"  chaos: {c['answered']}/{c['requests']} answered, {c['degraded']} degraded, {c['errors']} errors, replicas back in {c['recovery_s']:.1f} s")
    if s.get("ingress_kill"):
        k = s["ingress_kill"]
        out.append(f"  ingress kill: {k['answered']}/{k['requests']} answered with at most one client retry, {k['answered_no_retry']} at the first try")
    if s.get("autoscale"):
        au = s["autoscale"]
        out.append(f"  autoscale: edge {au['replicas_start']} -> {au['replicas_peak']} replicas under concurrency {au['concurrency']}, first scale-up after {au['seconds_to_first_scale_up']} s")
    return "\n".join(out)


def format_router(s: dict) -> str:
    """The router section as text."""
    out: list[str] = []
    out.append(f"  model {s['model']}, router {s['router']} (PPO trained in {s['train_minutes'] or float('nan'):.1f} min), {s['n_test']} test samples")
    sav, det = s["equal_accuracy_cost_saving"], s["equal_accuracy_detail"]
    for k in ("ppo", "hybrid"):
        out.append(f"  {k:<7} cost saving vs thresholds at equal accuracy: median {sav[k]:+.1%} (worst {det[k]['worst']:+.1%}, best {det[k]['best']:+.1%})")
    out.append(f"  one PPO policy at {len(s['lambda_sweep'])} lambdas vs thresholds re-tuned per lambda: worst cost gap {s['lambda_sweep_max_gap']:+.1%} "
          f"(vs the re-tuned frontier: {s['lambda_sweep_max_gap_vs_frontier']:+.1%})")
    for w in s["lambda_sweep"]:
        out.append(f"    lambda {w['lambda']:<6g} PPO acc {w['ppo']['accuracy']:.4f} cost {w['ppo']['cost']:.4f} | re-tuned thresholds acc {w['thresholds']['accuracy']:.4f} cost {w['thresholds']['cost']:.4f}"
              f" | gap {w['gap']:+.1%} ({w['compared_with']}), vs frontier {w['gap_vs_frontier']:+.1%}")
    ls = s["load_shift"]
    out.append(f"  load shift (cloud x{ls['slowdown']:g} for a window, SLO {ls['slo_ms']:g} ms, {ls['requests']} requests, lambda_cost {ls['lambda_cost']:.4g}, lambda_lat {ls['lambda_lat']:g}/ms):")
    for k in ("thresholds", "ppo", "hybrid"):
        red = f", {-ls['miss_reduction'][k]:+.0%} misses vs thresholds" if k in ls["miss_reduction"] else ""  # fewer misses: negative
        out.append(f"    {k:<10} SLO misses {ls['slo_misses'][k]:>4}  accuracy {ls['accuracy'][k]:.4f}{red}")
    if s.get("val_use"):
        v = s["val_use"]
        out.append(f"  val split: {'in' if v['val_in_ppo_training'] else 'held out from'} PPO's training data ({v['ppo_train_splits']})"
                   + ("; it chose PPO's exported iterate" if v["val_chose_iterate"] else "") + f"; the hybrid's gate is fitted on {v['gate_fitted_on']}")
    if s.get("seeds"):
        out.append(f"  {len(s['seeds'])} PPO seeds, one router each (same configuration, not registered):")
        for e in s["seeds"]:
            sav, ls_ = e["equal_accuracy_cost_saving"], e["load_shift"]
            it = f", iteration {e['chosen_iteration']}/{e['iterations']}" if e.get("chosen_iteration") is not None else ""
            out.append(f"    seed {e['seed']:<3} saving hybrid {sav['hybrid']:+.1%} PPO {sav['ppo']:+.1%} | lambda gap {e['lambda_sweep_max_gap']:+.1%} | "
                       f"SLO misses thr/PPO/hybrid {ls_['slo_misses']['thresholds']}/{ls_['slo_misses']['ppo']}/{ls_['slo_misses']['hybrid']}, "
                       f"accuracy PPO {100 * ls_['accuracy_delta']['ppo']:+.2f} pt hybrid {100 * ls_['accuracy_delta']['hybrid']:+.2f} pt{it}")
        sm = s.get("seeds_summary") or {}
        for m in ("equal_accuracy_cost_saving.hybrid", "equal_accuracy_cost_saving.ppo", "lambda_sweep_max_gap"):
            if m in sm:
                out.append(f"    {m}: min {sm[m]['min']:+.1%}, median {sm[m]['median']:+.1%}, max {sm[m]['max']:+.1%}")
    out.append(f"  plot: {s['plot']}")
    return "\n".join(out)


def format_moe(s: dict) -> str:
    """The moe section as text."""
    out: list[str] = []
    mc = s["moe_config"]
    out.append(f"  MoE {s['model'].split(':')[0]} ({mc['num_experts']} experts, top-{mc['top_k']} {mc['gate']}, stages {mc['stages']}) vs its dense twin, {s['n_test']} test samples")
    out.append(f"  accuracy (last exit) MoE {s['accuracy_moe']:.4f} vs dense {s['accuracy_dense']:.4f} ({100 * (s['accuracy_moe'] - s['accuracy_dense']):+.2f} pt) "
          f"at {s['active_macs_moe']:,.0f} vs {s['macs_dense']:,.0f} active MACs/sample")
    if s["seeds"] > 1:
        out.append(f"  (mean of {s['seeds']} seed pairs)")
    for p in s["per_seed"]:
        m, d = p["moe"], p["dense"]
        out.append(f"    seed {p['seed']}: {p['model']} {m['accuracy']:.4f} vs {p['dense_model']} {d['accuracy']:.4f} ({p['gap_pt']:+.2f} pt); "
              f"early exits at {m['adaptive']['threshold']}: {m['adaptive']['accuracy']:.4f} at {m['adaptive']['active_macs']:,.0f} MACs vs {d['adaptive']['accuracy']:.4f} at {d['adaptive']['active_macs']:,.0f}")
    out.append(f"  expert shares {s['expert_share']} (least {s['expert_share_min_vs_uniform']:.2f}x uniform), dropped {100 * s['dropped_frac']:.2f}% (batches of {s['usage_batch_size']})")
    lat = s["remote_latency_ms"]
    out.append(f"  expert actors vs local: max |logit diff| {s['actor_max_abs_diff']:.2e}; p50 overhead "
          + ", ".join(f"{b} {v['overhead_p50_ms']:+.2f} ms ({v['local']['p50']:.2f} -> {v['remote']['p50']:.2f})" for b, v in lat.items()))
    return "\n".join(out)


def format_nas(s: dict) -> str:
    """The nas section as text."""
    out: list[str] = []
    out.append(f"  {s['trials']} trials in {s['minutes']:.1f} min ({s['searcher']}); ASHA stopped {100 * s['asha_stopped_frac']:.0f}% early")
    rho = s["predictor_spearman"]
    out.append(f"  predictor Spearman (held-out trials, accuracy at the first rung): {'n/a (too few trials)' if rho is None else f'{rho:.2f}'}")
    out.append(f"  a found architecture dominates the default on test: {s['dominates_default']}")
    for f in s["front"]:
        out.append(f"    front: val {f['accuracy']:.4f} at {f['macs']:,.0f} MACs, test {f['test_accuracy']:.4f} at {f['test_macs']:,.0f}  {f['describe']}")
    out.append(f"  files: {', '.join(s['files'].values())}")
    return "\n".join(out)


def format_drift(s: dict) -> str:
    """The drift section as text."""
    seeds = ", ".join(map(str, s["seeds"]))
    d = s["detector"]
    out = [f"  detector: window {d.get('window')}, alarm at KS D > {d.get('threshold', float('nan')):.3f} (alpha {d.get('alpha')}); {s['ingress_replicas']} ingress replica; seeds {seeds}"]
    for name, v in s["shifts"].items():
        out.append(f"  {name:<10} alarm after {v['requests_to_alarm']} requests (worst seed; per seed {v['per_seed']})")
    i = s["in_distribution"]
    out.append(f"  in-distribution: {i['false_alarms']} false alarm(s) in {i['requests']:,} requests (worst seed; per seed {i['per_seed']})")
    out.append(f"  cost: {s['detector_ms_per_request']:.3f} ms per request of {s['ingress_ms_per_request']:.1f} ms at the ingress ({100 * s['overhead_frac']:.2f}%)")
    return "\n".join(out)


def format_section(section: str, s: dict) -> str:
    """The printer of ``section`` (core for any section without its own)."""
    from dynray.bench.calibration import format_calibration
    from dynray.bench.cluster import format_cluster
    from dynray.bench.compress import format_compress
    from dynray.bench.federated import format_federated
    from dynray.bench.gan import format_gan
    from dynray.bench.security import format_security

    return {"core": format_core, "serve": format_serve, "router": format_router, "moe": format_moe, "nas": format_nas, "cluster": format_cluster,
            "security": format_security, "drift": format_drift, "compress": format_compress,
            "gan": format_gan, "federated": format_federated, "calibration": format_calibration}.get(section, format_core)(s)
