"""The `dynray` command: parses arguments, calls jobs and the library, prints results.

This is the one module of ``dynray`` allowed to import ``jobs`` (lazily, per command).
Exit codes: 0 success, 2 bad usage or input (one-line message), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from dynray.errors import DynrayError

__all__ = ["main", "build_parser"]


def _cmd_train(a: argparse.Namespace) -> int:
    from jobs import train

    r = train.run(a)
    print(f"registered {r['model']}: val accuracy per exit {[round(x, 4) for x in r['metrics']['val_exit_accuracy']]} in {r['seconds']:.0f}s")
    return 0


def _cmd_finetune(a: argparse.Namespace) -> int:
    from dynray.finetune import FinetuneConfig
    from jobs import train

    ft = FinetuneConfig(freeze_backbone=a.freeze_backbone, unfreeze_last=a.unfreeze_last, gradual=a.gradual, head_lr=a.head_lr, backbone_lr=a.backbone_lr)
    r = train.run(a, finetune=ft, init_ref=a.model)
    print(f"registered {r['model']} (fine-tuned from {a.model}): val accuracy per exit {[round(x, 4) for x in r['metrics']['val_exit_accuracy']]}")
    return 0


def _cmd_calibrate(a: argparse.Namespace) -> int:
    from jobs import calibrate

    r = calibrate.run(a)
    c = r["calibration"]
    print(f"registered {r['model']}: thresholds {[round(t, 4) for t in r['rule']['thresholds']]} ({r['rule']['confidence']}, complexity weight {r['rule']['complexity_weight']}, agreement bonus {r['rule']['agreement_bonus']})")
    print(f"  val accuracy {c['val_accuracy']:.4f} vs last exit {c['val_reference_accuracy']:.4f}; {c['val_macs_saving']:.2f}x fewer MACs; exits {[round(f, 3) for f in c['val_exit_fractions']]}")
    for s in c["sensitivity"]:
        print(f"  exit {s['exit'] + 1}: tau {s['threshold']:.4f}  d(acc)/d(tau) {s['d_accuracy_d_threshold']:+.4f}  d(MACs)/d(tau) {s['d_macs_d_threshold']:+,.0f}")
    return 0


def _print_core(s: dict) -> None:
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
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    if "plot" in s:
        print(f"  plot: {s['plot']}")


def _print_serve(s: dict) -> None:
    print(f"  {'system':<10} {'rps':>7} {'p50 ms':>8} {'p99 ms':>8} {'accuracy':>9} {'cost/1k':>9} {'escalated':>9}")
    for name, m in s["systems"].items():
        acc, cost, esc = (f"{m[k]:.4f}" if k in m else "-" for k in ("accuracy", "cost_per_1k", "escalated_frac"))
        print(f"  {name:<10} {m['rps']:>7.1f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {acc:>9} {cost:>9} {esc:>9}")
        if "light" in m:
            lt = m["light"]
            print(f"  {'  light':<10} {lt['rps']:>7.1f} {lt['p50_ms']:>8.2f} {lt['p99_ms']:>8.2f}   (concurrency {lt['concurrency']})")
    r = s["ratios"]
    if r:
        print(f"  dynray vs all-cloud: cost {r['cost_vs_all_cloud']:.3f}x, p50 {r['p50_vs_all_cloud']:.3f}x (light load {r['p50_vs_all_cloud_light'] or float('nan'):.3f}x), accuracy gap {r['accuracy_gap_pt']:+.2f} pt; rps vs no-op {r['rps_vs_noop']:.3f}x")
    if s.get("chaos"):
        c = s["chaos"]
        print(f"  chaos: {c['answered']}/{c['requests']} answered, {c['degraded']} degraded, {c['errors']} errors, replicas back in {c['recovery_s']:.1f} s")
    if s.get("autoscale"):
        au = s["autoscale"]
        print(f"  autoscale: edge {au['replicas_start']} -> {au['replicas_peak']} replicas under concurrency {au['concurrency']}, first scale-up after {au['seconds_to_first_scale_up']} s")


def _print_router(s: dict) -> None:
    print(f"  model {s['model']}, router {s['router']} (PPO trained in {s['train_minutes'] or float('nan'):.1f} min), {s['n_test']} test samples")
    sav, det = s["equal_accuracy_cost_saving"], s["equal_accuracy_detail"]
    for k in ("ppo", "hybrid"):
        print(f"  {k:<7} cost saving vs thresholds at equal accuracy: median {sav[k]:+.1%} (worst {det[k]['worst']:+.1%}, best {det[k]['best']:+.1%})")
    print(f"  one PPO policy at {len(s['lambda_sweep'])} lambdas vs thresholds re-tuned per lambda: worst cost gap {s['lambda_sweep_max_gap']:+.1%} "
          f"(vs the re-tuned frontier: {s['lambda_sweep_max_gap_vs_frontier']:+.1%})")
    for w in s["lambda_sweep"]:
        print(f"    lambda {w['lambda']:<6g} PPO acc {w['ppo']['accuracy']:.4f} cost {w['ppo']['cost']:.4f} | re-tuned thresholds acc {w['thresholds']['accuracy']:.4f} cost {w['thresholds']['cost']:.4f}"
              f" | gap {w['gap']:+.1%} ({w['compared_with']}), vs frontier {w['gap_vs_frontier']:+.1%}")
    ls = s["load_shift"]
    print(f"  load shift (cloud x{ls['slowdown']:g} for a window, SLO {ls['slo_ms']:g} ms, {ls['requests']} requests, lambda_cost {ls['lambda_cost']:.4g}, lambda_lat {ls['lambda_lat']:g}/ms):")
    for k in ("thresholds", "ppo", "hybrid"):
        red = f", {ls['miss_reduction'][k]:+.0%} misses vs thresholds" if k in ls["miss_reduction"] else ""
        print(f"    {k:<10} SLO misses {ls['slo_misses'][k]:>4}  accuracy {ls['accuracy'][k]:.4f}{red}")
    print(f"  plot: {s['plot']}")


def _print_moe(s: dict) -> None:
    mc = s["moe_config"]
    print(f"  MoE {s['model'].split(':')[0]} ({mc['num_experts']} experts, top-{mc['top_k']} {mc['gate']}, stages {mc['stages']}) vs its dense twin, {s['n_test']} test samples")
    print(f"  accuracy (last exit) MoE {s['accuracy_moe']:.4f} vs dense {s['accuracy_dense']:.4f} ({100 * (s['accuracy_moe'] - s['accuracy_dense']):+.2f} pt) "
          f"at {s['active_macs_moe']:,.0f} vs {s['macs_dense']:,.0f} active MACs/sample")
    if s["seeds"] > 1:
        print(f"  (mean of {s['seeds']} seed pairs)")
    for p in s["per_seed"]:
        m, d = p["moe"], p["dense"]
        print(f"    seed {p['seed']}: {p['model']} {m['accuracy']:.4f} vs {p['dense_model']} {d['accuracy']:.4f} ({p['gap_pt']:+.2f} pt); "
              f"early exits at {m['adaptive']['threshold']}: {m['adaptive']['accuracy']:.4f} at {m['adaptive']['active_macs']:,.0f} MACs vs {d['adaptive']['accuracy']:.4f} at {d['adaptive']['active_macs']:,.0f}")
    print(f"  expert shares {s['expert_share']} (least {s['expert_share_min_vs_uniform']:.2f}x uniform), dropped {100 * s['dropped_frac']:.2f}% (batches of {s['usage_batch_size']})")
    lat = s["remote_latency_ms"]
    print(f"  expert actors vs local: max |logit diff| {s['actor_max_abs_diff']:.2e}; p50 overhead "
          + ", ".join(f"{b} {v['overhead_p50_ms']:+.2f} ms ({v['local']['p50']:.2f} -> {v['remote']['p50']:.2f})" for b, v in lat.items()))


def _print_nas(s: dict) -> None:
    print(f"  {s['trials']} trials in {s['minutes']:.1f} min ({s['searcher']}); ASHA stopped {100 * s['asha_stopped_frac']:.0f}% early")
    rho = s["predictor_spearman"]
    print(f"  predictor Spearman (held-out trials, accuracy at the first rung): {'n/a (too few trials)' if rho is None else f'{rho:.2f}'}")
    print(f"  a found architecture dominates the default on test: {s['dominates_default']}")
    for f in s["front"]:
        print(f"    front: val {f['accuracy']:.4f} at {f['macs']:,.0f} MACs, test {f['test_accuracy']:.4f} at {f['test_macs']:,.0f}  {f['describe']}")
    print(f"  files: {', '.join(s['files'].values())}")


def _cmd_nas(a: argparse.Namespace) -> int:
    from jobs import nas

    nas.run(a)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from jobs import bench

    s = bench.run(a)
    print(f"wrote section '{a.section}' to {a.json}")
    printers = {"serve": _print_serve, "router": _print_router, "moe": _print_moe, "nas": _print_nas}
    printers.get(a.section, _print_core)(s)
    return 0


def _cmd_router(a: argparse.Namespace) -> int:
    from jobs import train_router

    if a.action == "cache":
        from dynray.registry import ModelRegistry
        from dynray.routing.cache import write_exit_cache
        from dynray.store import load_model

        reg = ModelRegistry()
        stored = load_model(reg, a.model)
        for split in a.split.split("+"):
            print(f"cached {stored.info.ref} exit outputs on {split}: {write_exit_cache(reg, stored, split)}")
        return 0
    r = train_router.run(a)
    print(f"registered {r['router']} for {r['model']}: {r['iterations']} PPO iterations in {r['train_minutes']:.1f} min (last mean episode reward, shaped: {r['final_return']:.4f})")
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from dynray.registry import ModelRegistry

    reg = ModelRegistry()
    if a.action == "list":
        infos = reg.list()
        if not infos:
            print(f"no models in {reg.home}; run `dynray train` or `make demo`")
        for i in infos:
            m = i.meta.get("metrics", {})
            acc = m.get("val_accuracy_full")
            print(f"{i.ref:<28} {','.join(i.stages) or '-':<12} {i.meta.get('dataset', '?'):<14} val_acc={acc if acc is None else round(acc, 4)}  {i.meta.get('thresholds_source', '')}  {i.meta.get('created_at', '')[:19]}")
    elif a.action == "show":
        info = reg.verify(a.ref)
        print(json.dumps({k: v for k, v in info.meta.items() if k != "history"}, indent=2))
    else:
        if not a.ref or not a.stage:
            raise DynrayError("promote needs a model and a stage", got=(a.ref, a.stage), fix="dynray models promote NAME:vN production")
        info = reg.promote(a.ref, a.stage)
        print(f"{info.ref} is now {a.stage}")
    return 0


def _cmd_submit(a: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = a.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise DynrayError("no cluster to submit to", fix="pass --address http://HEAD:8265 or set RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60 CLI/SDK clients need it (RAY_NOTES §0)
    client = JobSubmissionClient(address)
    entry = " ".join([sys.executable if a.local_python else "python", "-m", f"jobs.{a.step}", *a.args])
    jid = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(Path.cwd()), "excludes": [".venv", ".dynray", ".git", "out"]})
    print(f"submitted {jid}: {entry}")
    while (st := client.get_job_status(jid)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
    print(client.get_job_logs(jid))
    print(f"job {jid}: {st}")
    return 0 if st == JobStatus.SUCCEEDED else 1


def _cmd_serve(a: argparse.Namespace) -> int:
    from jobs import deploy

    out = deploy.run(a)
    if a.action == "up":
        print(f"serving {out['app']} at {out['url']}/v1/predict (Ray at {out['address']}); `dynray serve status` to inspect, `dynray serve down` to stop")
    else:
        print(json.dumps(out, indent=2, default=str))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from jobs import demo

    return demo.run(a)


def build_parser() -> argparse.ArgumentParser:
    from jobs.bench import add_bench_args
    from jobs.calibrate import add_calibrate_args
    from jobs.demo import add_demo_args
    from jobs.nas import add_nas_args
    from jobs.deploy import add_deploy_args
    from jobs.train import add_train_args
    from jobs.train_router import add_train_router_args

    p = argparse.ArgumentParser(prog="dynray", description="Adaptive inference on Ray: train, calibrate, benchmark and manage early-exit networks.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", help="the main job: train -> calibrate -> promote -> bench on mnist-5k")
    add_demo_args(s)
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("train", help="train a DynamicNet with Ray Train and register it")
    add_train_args(s)
    s.set_defaults(fn=_cmd_train)

    s = sub.add_parser("finetune", help="fine-tune a registered model (freeze, unfreeze last N, gradual, split LRs)")
    add_train_args(s)
    s.add_argument("--model", required=True, help="model ref to start from")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--freeze-backbone", action="store_true", help="train only the exit heads")
    g.add_argument("--unfreeze-last", type=int, default=0, help="train the last N stages and the heads")
    s.add_argument("--gradual", action="store_true", help="unfreeze one more stage per epoch, from the last")
    s.add_argument("--head-lr", type=float, default=1e-3, help="exit-head learning rate")
    s.add_argument("--backbone-lr", type=float, default=1e-4, help="backbone learning rate")
    s.set_defaults(fn=_cmd_finetune, epochs=5)

    s = sub.add_parser("calibrate", help="calibrate thresholds on the val split (registers a child version)")
    add_calibrate_args(s)
    s.set_defaults(fn=_cmd_calibrate)

    s = sub.add_parser("bench", help="measure a model; writes/merges a section of the bench JSON")
    add_bench_args(s)
    s.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("router", help="train the PPO router of a model (train), or cache its exit outputs (cache)")
    s.add_argument("action", choices=["train", "cache"])
    add_train_router_args(s)
    s.add_argument("--split", default="train+val+test", help="cache: splits to cache, joined by + (default: %(default)s)")
    s.set_defaults(fn=_cmd_router)

    s = sub.add_parser("nas", help="neural architecture search with Ray Tune (run)")
    s.add_argument("action", choices=["run"])
    add_nas_args(s)
    s.set_defaults(fn=_cmd_nas)

    s = sub.add_parser("models", help="list, show or promote registered models")
    s.add_argument("action", choices=["list", "show", "promote"])
    s.add_argument("ref", nargs="?", default=None, help="model ref (show/promote)")
    s.add_argument("stage", nargs="?", default=None, choices=["staging", "production"], help="stage (promote)")
    s.set_defaults(fn=_cmd_models)

    s = sub.add_parser("serve", help="start (up), inspect (status), roll versions (roll) or stop (down) the Serve app")
    add_deploy_args(s)
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser("submit", help="submit a job step (train, calibrate, bench, deploy, train_router, nas) to a Ray cluster")
    s.add_argument("step", choices=["train", "calibrate", "bench", "deploy", "train_router", "nas"])
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments for python -m jobs.STEP")
    s.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)")
    s.add_argument("--local-python", action="store_true", help="use this interpreter's path in the entrypoint")
    s.set_defaults(fn=_cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(message)s")
    for noisy in ("ray", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return a.fn(a)
    except DynrayError as e:
        if a.verbose:
            raise
        print(f"dynray: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if a.verbose:
            raise
        cause = _dynray_cause(e)
        if cause is not None:
            print(f"dynray: error: {cause.message}", file=sys.stderr)
            return 2
        print(f"dynray: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


def _dynray_cause(e: BaseException) -> DynrayError | None:
    """A DynrayError raised inside a Ray worker arrives wrapped; find it in the chain."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if isinstance(cur, DynrayError):
            return cur
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "cause", None)
        seen += 1
    return None


if __name__ == "__main__":
    sys.exit(main())
