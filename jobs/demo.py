"""The main job: train -> calibrate -> promote -> bench -> PPO router -> serve traffic, on an embedded local Ray.

    python -m jobs.demo        (what `make demo` and `dynray demo` run)
"""

from __future__ import annotations

import argparse
import logging
import time
from types import SimpleNamespace

from dynray.routing.ppo import PPOTrainConfig
from dynray.training import TrainConfig


def add_demo_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", default="mnist-5k", help="dataset (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--max-drop", type=float, default=0.002, help="calibration target: accuracy drop vs the last exit on val (default: %(default)s)")
    p.add_argument("--json", default="out/bench.json", help="bench JSON output (default: %(default)s)")
    r = PPOTrainConfig()
    p.add_argument("--router-minutes", type=float, default=r.minutes, help="PPO router training budget in minutes (default: %(default)s)")
    p.add_argument("--router-iterations", type=int, default=r.iterations, help="most PPO iterations (default: %(default)s)")
    p.add_argument("--no-serve", action="store_true", help="skip step 5 (deploy the Serve graph and send the test split over HTTP)")


def run(a: argparse.Namespace) -> int:
    from dynray.cli import _print_core
    from jobs import bench, calibrate, train

    t0 = time.perf_counter()
    print(f"[1/5] training a DynamicNet on {a.dataset} with Ray Train ({a.workers} workers, {a.epochs} epochs)", flush=True)
    d = TrainConfig()
    targs = SimpleNamespace(dataset=a.dataset, epochs=a.epochs, workers=a.workers, batch_size=d.batch_size, lr=d.lr, seed=d.seed,
                            distill=d.distill_alpha, schedule=d.schedule, no_augment=False, name=None)
    r = train.run(targs)
    print(f"      registered {r['model']} in {r['seconds']:.0f}s; val accuracy per exit {[round(x, 4) for x in r['metrics']['val_exit_accuracy']]}", flush=True)
    print(f"[2/5] calibrating thresholds on val (max accuracy drop {a.max_drop}) and promoting to production", flush=True)
    c = calibrate.run(SimpleNamespace(model=r["model"], max_drop=a.max_drop, macs_budget=None, promote="production"))
    cal = c["calibration"]
    print(f"      {c['model']}: val accuracy {cal['val_accuracy']:.4f} (last exit {cal['val_reference_accuracy']:.4f}), {cal['val_macs_saving']:.2f}x fewer MACs", flush=True)
    print(f"[3/5] benchmarking {c['model']} on the {a.dataset} test split -> {a.json}", flush=True)
    s = bench.run(SimpleNamespace(section="core", model=c["model"], dataset=a.dataset, json=a.json, plot=None))
    _print_core(s)
    from jobs import train_router

    print(f"[4/5] training the PPO router of {c['model']} with RLlib (budget {a.router_minutes:g} min, at most {a.router_iterations} iterations)", flush=True)
    rt = train_router.run(SimpleNamespace(model=c["model"], minutes=a.router_minutes, iterations=a.router_iterations, batch_size=4000, env_runners=1, train_splits="train+val", seed=0))
    print(f"      registered {rt['router']}: {rt['iterations']} iterations in {rt['train_minutes']:.1f} min", flush=True)
    if not a.no_serve:
        from jobs import http_traffic as traffic

        print(f"[5/5] deploying the edge/cloud Serve graph with {c['model']} and the hybrid router, sending the {a.dataset} test split over HTTP", flush=True)
        t = traffic.run(SimpleNamespace(model=c["model"], dataset=a.dataset, split="test", concurrency=8, router="hybrid"))
        mix = ", ".join(f"exit {k}: {v:.1%}" for k, v in t["exit_mix"].items())
        print(f"      {t['answered']}/{t['requests']} answered over HTTP by router {t['router']}, accuracy {t['accuracy']:.4f}; {mix}", flush=True)
        print(f"      escalated to the cloud tier {t['escalated_frac']:.1%}, degraded {t['degraded']}; latency p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms at concurrency 8 ({t['rps']:.0f} req/s)", flush=True)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    add_demo_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
