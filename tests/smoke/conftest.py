"""The smoke tier's shared registry and its chain of jobs.

The chain (:mod:`smoke_chain`) is every long CLI invocation the smoke tests check, run as
the commands a user types, in one interpreter that shares one Ray: one Ray start and one
set of imports instead of one per command. It runs once, when a test first needs it.
(Running it in the background beside the serve-CLI tests saved nothing: both are CPU-bound
on 2 cores, 99% busy together, and the pair took as long as one after the other.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from smoke_chain import ChainRun, Step  # tests/smoke is on sys.path (pytest's rootdir-less import mode)

from jobs._ray import free_port

CHAIN_TIMEOUT_S = 1800
DEMO = ["demo", "--epochs", "1", "--workers", "1", "--max-drop", "0.02", "--router-iterations", "2", "--http-limit", "300"]
AUTOML_PORT = free_port()
AUTOML_TINY = ["--name", "smoke", "--budget-minutes", "6", "--nas-trials", "2", "--nas-epochs", "1", "--max-epochs", "1", "--workers", "1",
               "--router-iterations", "2", "--check-limit", "200", "--port", str(AUTOML_PORT)]
NAS_TINY = ["--nas-searcher", "darts", "--nas-trials", "1", "--nas-darts-epochs", "1", "--nas-epochs", "1", "--nas-grace", "1", "--nas-train-limit", "256", "--nas-register-top", "1"]


def chain_steps(o: Path) -> list[tuple[str, str, list[str]]]:
    """(name, kind, argv): `dynray ARGS` or `python -m MODULE ARGS`, in order; outputs under ``o``."""
    return [
        ("demo", "dynray", [*DEMO, "--json", str(o / "bench.json")]),
        # train (an MoE model) -> calibrate -> bench core -> bench moe, each by its job entrypoint
        ("train_moe", "module", ["jobs.train", "--arch", "moe", "--epochs", "1", "--workers", "1", "--name", "jobs-smoke"]),
        ("calibrate", "module", ["jobs.calibrate", "--model", "jobs-smoke", "--macs-budget", "1000000"]),
        ("bench_core", "module", ["jobs.bench", "core", "--model", "jobs-smoke:v2", "--json", str(o / "b.json"),
                                  "--static.widths", "2", "--static.convs", "2", "--static.seeds", "0", "--static.epochs", "1"]),
        # the MoE bench trains the missing dense twin, starts one actor per expert and compares
        ("bench_moe", "dynray", ["bench", "moe", "--model", "jobs-smoke:v2", "--moe-epochs", "1", "--moe-workers", "1", "--moe-latency-calls", "3", "--json", str(o / "b.json")]),
        ("finetune", "dynray", ["finetune", "--model", "dynnet-mnist-5k:v2", "--epochs", "1", "--workers", "1", "--gradual", "--name", "ft"]),
        # an int8 edge variant of the demo's calibrated model, registered as its child
        ("compress_int8", "dynray", ["compress", "int8", "--model", "dynnet-mnist-5k:v2", "--calib-samples", "128"]),
        # a tiny cGAN on 10% of the digits, its samples in a low-data training run, and the gan bench at a tiny size
        ("gan", "dynray", ["gan", "--fraction", "0.1", "--steps", "60", "--width", "8", "--check-samples", "100"]),
        ("train_synthetic", "dynray", ["train", "--train-fraction", "0.1", "--synthetic", "200", "--epochs", "1", "--workers", "1", "--name", "syn"]),
        ("bench_gan", "dynray", ["bench", "gan", "--seeds", "0", "--gan-steps", "40", "--gan-width", "8", "--synthetic", "100", "--real-repeats", "1", "--epochs", "2",
                                 "--check-samples", "50", "--json", str(o / "gan.json")]),
        ("bench_nas", "dynray", ["bench", "nas", "--dataset", "mnist-5k", *NAS_TINY, "--json", str(o / "nas_run" / "b.json")]),
        ("bench_router", "dynray", ["bench", "router", "--shift-requests", "400", "--json", str(o / "router.json")]),
        # edge_only is all_cloud's deploy path on the other tier
        # the security bench end to end at a small size: one seed, a few clients, a short fuzz run,
        # a rate low enough that CI's slow load still goes over it
        ("bench_security", "dynray", ["bench", "security", "--seeds", "0", "--attack-n", "60", "--normal-clients", "4", "--extraction-rounds", "5",
                                      "--ratelimit-rate", "5", "--ratelimit-s", "2", "--overhead-requests", "40", "--overhead-runs", "2", "--fuzz-cases", "40", "--json", str(o / "security.json")]),
        ("bench_serve", "module", ["jobs.bench", "serve", "--json", str(o / "serve.json"), "--requests", "60", "--warmup", "5", "--concurrency", "4",
                                   "--chaos-requests", "150", "--light-requests", "20", "--autoscale-requests", "0", "--systems", "noop", "dynray", "all_cloud", "cloud_adaptive"]),
        # the drift watch over HTTP on the demo's calibrated model (its reference came with calibration), one seed, short streams
        ("bench_drift", "dynray", ["bench", "drift", "--seeds", "0", "--in-distribution-requests", "300", "--shift-requests", "200", "--calm-requests", "120",
                                   "--json", str(o / "drift.json")]),
        # last: AutoML's deploy step leaves the chain's Ray for a `serve up` head. Interrupted after calibrate, then resumed.
        ("automl_stop", "dynray", ["automl", *AUTOML_TINY, "--stop-after", "calibrate"]),
        ("automl_resume", "dynray", ["automl", *AUTOML_TINY, "--resume"]),
    ]


@pytest.fixture(scope="session")
def env(tmp_path_factory, clean_env) -> dict[str, str]:
    """The smoke tier's clean environment and registry (the chain writes it, the tests read it)."""
    return clean_env(tmp_path_factory.mktemp("dynray_home"))


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="session")
def chain(env, out_dir, request) -> dict[str, Step]:
    """The chain's steps by name."""
    (out_dir / "nas_run").mkdir(exist_ok=True)
    run = ChainRun(chain_steps(out_dir), env, spec_dir=out_dir)
    # the AutoML step leaves a service up; its test stops it, and this does if that test did not run
    request.addfinalizer(lambda: subprocess.run([str(Path(sys.executable).with_name("dynray")), "serve", "down"], env=env, capture_output=True, timeout=120))
    try:
        done = run.wait(CHAIN_TIMEOUT_S)
    finally:
        run.stop()
    times = ", ".join(f"{s.name} {s.seconds:.0f}s" + ("" if s.returncode == 0 else f" (rc {s.returncode})") for s in done.values())
    (out_dir / "chain_times.txt").write_text(times + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nsmoke chain, one interpreter: {times}")
    return done
