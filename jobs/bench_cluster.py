"""Cluster benchmark: a local autoscaling cluster scaled up and down, bursted, broken and used; the "cluster" section.

It starts and stops everything it needs, through the same commands a user types (each run as
a subprocess from a clean environment, against a temporary registry holding a copy of the
model, so the user's registry and any cluster of theirs are untouched):

1. ``dynray cluster up --local``: the head and the fake multi-node autoscaler.
2. ``dynray serve up`` with ``--edge-replicas`` fixed edge replicas (default 4: two per
   ``edge.worker`` node): ``scale_up_s`` is the time from 0 to 2 edge nodes.
3. Node kill: SIGKILL to the raylet of the edge node hosting the most edge replicas, and
   everything under it, under closed-loop HTTP load (``jobs.cluster_chaos``).
4. Ingress kill: one of the two ingress replicas, under load (``jobs.serve_chaos``).
5. Serve autoscaling: the edge tier becomes 1 to ``--burst-replicas`` replicas (a lightweight
   update); once it is down to 1 replica and 1 node, a burst of load drives it up, which
   needs a second edge node, and back down after the burst.
6. ``dynray serve down``: ``scale_down_s`` is the time until no worker node is left.
7. ``dynray submit train`` on the cluster: ``job_roundtrip_s`` until ``dynray models list``
   shows the model.
8. ``dynray cluster down``.

A sampler thread records the live nodes by type and the RUNNING replicas by deployment about
once a second throughout; the timeline and its plot (``--plot``, default next to the JSON)
are in the section. The summarising is :mod:`dynray.bench.cluster`.

    python -m jobs.bench_cluster --json out/bench.json
    dynray bench cluster --json out/bench.json
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dynray.bench import BenchResult, BenchTarget, check_bench_file, merge_section
from dynray.bench.cluster import autoscale_summary, count, first_time, plot_timeline
from dynray.bench.load import LoadConfig, run_load_sync
from dynray.bench.serve import wire_images
from dynray.data import data_root, load_dataset
from dynray.errors import ConfigError, ServingError
from dynray.flags import guarded, parse, setup_logging
from dynray.registry import ModelInfo, ModelRegistry
from dynray.serving.config import EDGE
from dynray.serving.payload import encode_array

__all__ = ["Config", "Sampler", "BurstConfig", "burst_autoscale", "run", "main"]

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
EDGE_TYPE = "edge.worker"
HEAD_TYPES = ("ray.head.default", "head")


@dataclass(frozen=True, kw_only=True)
class Config(BenchTarget):
    """Scale a local autoscaling cluster, burst its replicas, kill a node and an ingress replica under load, round-trip a job; merge the "cluster" section."""

    cluster_config: str | None = None
    """Autoscaling config for `dynray cluster up --local` (default: cluster/local-autoscale.yaml)."""
    edge_replicas: int = 4
    """Edge replicas for the scale-up (each reserves 1 CPU + 1 edge: 4 need two edge.worker nodes)."""
    chaos_requests: int = 2000
    """Requests in each kill run (enough load to last through the node's replacement)."""
    chaos_concurrency: int = 4
    """Closed-loop concurrency of the kill runs."""
    burst_replicas: int = 3
    """Autoscaling ceiling of the burst: more edge replicas than one edge node holds (2)."""
    burst_concurrency: int = 16
    """Closed-loop concurrency of the autoscaling burst."""
    burst_timeout_s: float = 120.0
    """Longest burst: it ends as soon as the edge tier is at its ceiling."""
    job_epochs: int = 1
    """Epochs of the round-trip train job."""
    sample_s: float = 1.0
    """Seconds between two samples of the nodes and replicas."""

    def __post_init__(self) -> None:
        if self.edge_replicas < 3 or self.burst_replicas < 3:
            raise ConfigError("--edge-replicas and --burst-replicas must be >= 3, so that the edge tier needs a second edge node", got=(self.edge_replicas, self.burst_replicas), fix="e.g. --edge-replicas 4 --burst-replicas 3")
        if min(self.chaos_requests, self.chaos_concurrency, self.burst_concurrency, self.job_epochs) < 1:
            raise ConfigError("--chaos-requests, --chaos-concurrency, --burst-concurrency and --job-epochs must be >= 1",
                              got=(self.chaos_requests, self.chaos_concurrency, self.burst_concurrency, self.job_epochs), fix="e.g. --chaos-requests 2000")
        if self.burst_timeout_s <= 0 or not 0.1 <= self.sample_s <= 10:
            raise ConfigError("--burst-timeout-s must be > 0 and --sample-s in [0.1, 10]", got=(self.burst_timeout_s, self.sample_s), fix="e.g. --sample-s 1")


class Sampler:
    """Live nodes by type and RUNNING replicas by deployment, about every ``every_s`` seconds, in a thread.

    The caller owns ``ray.init``. ``replicas=False`` stops asking Serve (after ``serve down``
    its controller is gone); nodes are sampled until :meth:`stop`."""

    def __init__(self, app: str, *, every_s: float = 1.0, t0: float | None = None) -> None:
        self.app, self.every_s = app, every_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.samples: list[dict] = []
        self.phases: list[dict] = []
        self.replicas = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cluster-sampler", daemon=True)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> dict:
        from actors.serve_apps import app_status
        from jobs.cluster import nodes_by_type

        t = self.now()
        nodes: dict[str, int] = {}
        for n in nodes_by_type():
            if n["alive"]:
                nodes[n["type"]] = nodes.get(n["type"], 0) + 1
        replicas: dict[str, int] = {}
        if self.replicas:
            try:
                deps = app_status(self.app).get("deployments", {})
            except Exception as e:  # noqa: BLE001 - Serve mid-(re)deploy or shut down: no replicas to count
                log.debug("no Serve status: %s", e)
                deps = {}
            replicas = {d: s["replicas"].get("RUNNING", 0) for d, s in deps.items()}
        s = {"t": t, "nodes": nodes, "replicas": replicas}
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - one failed sample (GCS busy) must not end the timeline
                log.warning("sample failed: %s", e)
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))

    def wait_for(self, pred: Callable[[dict], bool], timeout_s: float, what: str) -> float:
        """Seconds until a fresh sample satisfies ``pred``; raises naming ``what`` after ``timeout_s``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.samples and self.samples[-1]["t"] >= self.now() - 2 * self.every_s and pred(self.samples[-1]):
                return round(time.monotonic() - t0, 2)
            time.sleep(min(0.5, self.every_s))
        last = self.samples[-1] if self.samples else {}
        raise ServingError(f"timed out after {timeout_s:.0f} s waiting for {what}", got=last, fix="see `dynray cluster status` and the Serve logs; the bench cleans up after itself")

    def phase(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, sampler: Sampler, name: str) -> None:
        self.sampler, self.name = sampler, name

    def __enter__(self) -> dict:
        self.rec = {"name": self.name, "start": self.sampler.now(), "end": None}
        self.sampler.phases.append(self.rec)
        log.info("phase %s (t=%.1f s)", self.name, self.rec["start"])
        return self.rec

    def __exit__(self, *exc) -> None:
        self.rec["end"] = self.sampler.now()


@dataclass(frozen=True, kw_only=True)
class BurstConfig:
    """The edge tier's autoscaling for the burst, and the burst itself."""

    url: str
    """Predict URL."""
    app: str = "dynray"
    replicas_max: int = 4
    """Autoscaling ceiling: more replicas than one edge node holds, so the burst needs a node."""
    target_ongoing_requests: float = 0.1
    """Per replica. The ingress coalesces concurrent requests into few, large device calls (about one in flight per ingress replica), so the target is small."""
    concurrency: int = 16
    timeout_s: float = 120.0
    """Longest burst; it ends once the tier is at its ceiling."""
    settle_nodes: int | None = 1
    """Before the burst, wait until at most this many edge nodes are left (None: don't wait)."""
    wait_nodes_down: bool = True
    """After the burst, wait until the extra edge node has left (the idle timeout)."""
    idle_timeout_s: float = 30.0
    api_key: str | None = field(default=None, repr=False)
    """API key the burst sends (the ingress asks for one unless auth is off)."""


FAST_AUTOSCALE = {"upscale_delay_s": 0.5, "downscale_delay_s": 3.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
"""Serve's autoscaler made to react within seconds (its defaults suit traffic that shifts over minutes)."""


def edge_autoscaling(serve_cfg: dict, *, replicas_min: int, replicas_max: int, target: float) -> dict:
    """The deployed Serve config with the edge tier set to autoscale between the two bounds."""
    cfg = copy.deepcopy(serve_cfg)
    args = cfg["applications"][0]["args"]
    args["edge"] = {**args["edge"], "min_replicas": replicas_min, "max_replicas": replicas_max, "target_ongoing_requests": target, **FAST_AUTOSCALE}
    args["edge"].pop("initial_replicas", None)
    return cfg


def burst_autoscale(cfg: BurstConfig, serve_cfg: dict, images: np.ndarray, sampler: Sampler) -> dict:
    """Set the edge tier to autoscale 1..``replicas_max``, let it settle at 1 replica, burst,
    and wait for it to come back down; the summary is :func:`dynray.bench.cluster.autoscale_summary`."""
    from actors.serve_apps import deploy

    deploy(edge_autoscaling(serve_cfg, replicas_min=1, replicas_max=cfg.replicas_max, target=cfg.target_ongoing_requests), timeout_s=180, check=False)
    edge = lambda s: count(s, "replicas", EDGE)  # noqa: E731
    nodes = lambda s: count(s, "nodes", EDGE_TYPE)  # noqa: E731
    settle_s = sampler.wait_for(lambda s: edge(s) == 1, 90, "the edge tier to scale down to 1 replica")
    if cfg.settle_nodes is not None:
        try:
            settle_s += sampler.wait_for(lambda s: nodes(s) <= cfg.settle_nodes, cfg.idle_timeout_s + 90, f"at most {cfg.settle_nodes} edge node(s)")
        except ServingError as e:  # measured anyway: nodes_start then says the burst found more
            log.warning("%s: the burst starts with more edge nodes", e.what)
    bodies = [encode_array(images[i : i + 1], dtype="uint8") for i in range(min(len(images), 64))]
    stop, results = threading.Event(), []

    def load() -> None:
        while not stop.is_set():  # closed loop at fixed concurrency until told to stop
            results.append(run_load_sync(LoadConfig(url=cfg.url, requests=4 * cfg.concurrency, concurrency=cfg.concurrency, timeout_s=30, api_key=cfg.api_key), lambda i: bodies[i % len(bodies)]))

    driver = threading.Thread(target=load, daemon=True)
    start = sampler.now()
    driver.start()
    try:
        sampler.wait_for(lambda s: edge(s) >= cfg.replicas_max, cfg.timeout_s, f"{cfg.replicas_max} edge replicas under the burst")
    except ServingError as e:
        log.warning("%s: the burst ends at its timeout", e.what)
    finally:
        stop.set()
        driver.join(timeout=120)
    end = sampler.now()
    sampler.wait_for(lambda s: edge(s) <= 1, 90, "the edge tier back at 1 replica after the burst")
    if cfg.wait_nodes_down:
        low = cfg.settle_nodes if cfg.settle_nodes is not None else 1
        try:
            sampler.wait_for(lambda s: nodes(s) <= low, cfg.idle_timeout_s + 90, f"the extra edge node to leave ({low} left)")
        except ServingError as e:
            log.warning("%s", e.what)
    summary = autoscale_summary(sampler.samples, deployment=EDGE, node_type=EDGE_TYPE, burst_start=start, burst_end=end, replicas_min=1, replicas_max=cfg.replicas_max)
    return {**summary, "target_ongoing_requests": cfg.target_ongoing_requests, "concurrency": cfg.concurrency, "settle_s": settle_s,
            "burst_requests": sum(len(r.records) for r in results), "burst_errors": sum(r.errors for r in results),
            "burst_status": {str(k): v for k, v in sorted(sum((Counter(r.status_counts()) for r in results), Counter()).items())}}


# ------------------------------------------------------------------------------------ the driver
def _cli_env(home: Path) -> dict[str, str]:
    """A new user's shell (no RAY_* or DYNRAY_* but the bench's registry and the datasets),
    with this venv's ``python`` first on PATH for the job entrypoints the head runs."""
    return {"HOME": os.environ.get("HOME", "/root"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "DYNRAY_HOME": str(home), "DYNRAY_DATA": str(data_root()), "PYTHONUNBUFFERED": "1"}


def _cli(args: list[str], env: dict, *, timeout_s: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "dynray.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise ServingError(f"`dynray {' '.join(args)}` failed (exit {p.returncode})", got=(p.stdout + p.stderr)[-1500:], fix="see its output above")
    return p


def _copy_model(src: ModelRegistry, info: ModelInfo, dst: ModelRegistry) -> str:
    """The served version, copied (verified) into the bench's own registry as its production model."""
    loaded = src.load(info.ref)
    copied = dst.register(info.name, loaded.tensors, {**loaded.info.meta, "copied_from": info.ref})
    dst.promote(copied.ref, "production")
    return copied.ref


def _worker_nodes(s: dict) -> int:
    return sum(n for t, n in s["nodes"].items() if t not in HEAD_TYPES)


def run(cfg: Config) -> BenchResult:
    import ray

    from jobs._ray import ensure_auth_env, free_port, read_state_file
    from jobs.cluster import DEFAULT_CONFIG, load_local_config
    from jobs.cluster_chaos import kill_node_under_load
    from jobs.serve_chaos import ChaosConfig, kill_ingress_under_load

    check_bench_file(cfg.json)
    _, spec = load_local_config(cfg.cluster_config or DEFAULT_CONFIG)  # refused before anything starts
    idle = float(spec.idle_timeout_s or 0)
    src = ModelRegistry()
    info = src.resolve(cfg.model)
    images = wire_images(load_dataset(cfg.dataset or info.meta["dataset"], "test"))[:256]
    plot = cfg.plot or str(Path(cfg.json).with_name("cluster_timeline.png"))
    section: dict = {"config": str(cfg.cluster_config or DEFAULT_CONFIG.relative_to(ROOT)), "idle_timeout_s": idle, "model": info.ref,
                     "scale_up_replicas": cfg.edge_replicas, "chaos_concurrency": cfg.chaos_concurrency}
    with tempfile.TemporaryDirectory(prefix="dynray-bench-cluster-") as tmp:
        home = Path(tmp)
        ref = _copy_model(src, info, ModelRegistry(home))
        env = _cli_env(home)
        sampler: Sampler | None = None
        t0 = time.monotonic()
        try:
            up_args = ["cluster", "up", "--local"] + (["--config", str(Path(cfg.cluster_config).resolve())] if cfg.cluster_config else [])
            _cli(up_args, env, timeout_s=240)
            section["cluster_up_s"] = round(time.monotonic() - t0, 2)
            state = read_state_file(home / "cluster.json", "cluster")
            ensure_auth_env(state["auth_mode"])
            ray.init(address=state["address"], logging_level="WARNING", log_to_driver=False)
            sampler = Sampler("dynray", every_s=cfg.sample_s, t0=t0).start()
            sampler.phases.append({"name": "cluster up", "start": 0.0, "end": section["cluster_up_s"]})

            serve_yaml = home / "serve-bench.yaml"
            from actors.serve_apps import load_config

            base = load_config()
            args = base["applications"][0]["args"]
            args["edge"] = {**args["edge"], "min_replicas": cfg.edge_replicas, "max_replicas": cfg.edge_replicas}
            serve_yaml.write_text(yaml.safe_dump(base))
            with sampler.phase("serve up") as ph:
                _cli(["serve", "up", "--config", str(serve_yaml), "--port", str(free_port()), "--model", ref], env, timeout_s=400)
                section["serve_up_s"] = round(sampler.now() - ph["start"], 2)
                sampler.wait_for(lambda s: count(s, "nodes", EDGE_TYPE) >= 2, 60, "2 edge nodes")
            section["scale_up_s"] = first_time(sampler.samples, lambda s: count(s, "nodes", EDGE_TYPE) >= 2, after=ph["start"])
            served = json.loads((home / "serve.json").read_text())
            url = served["url"] + "/v1/predict"
            key = _cli(["keys", "create", "--name", "bench-cluster", "--rate", "100000"], env, timeout_s=120).stdout.strip().splitlines()[-1]  # auth is on

            chaos = ChaosConfig(url=url, requests=cfg.chaos_requests, concurrency=cfg.chaos_concurrency, kill_after_s=1.0, recovery_timeout_s=90, retries=1, api_key=key)
            with sampler.phase("node kill"):
                res, node = kill_node_under_load(chaos, images, address=state["address"])
            section["node_kill"] = {**res.to_dict(), "node": asdict(node)}
            log.info("node kill: %s", section["node_kill"])
            with sampler.phase("ingress kill"):
                section["ingress_kill"] = kill_ingress_under_load(chaos, images).to_dict()
            log.info("ingress kill: %s", section["ingress_kill"])

            with sampler.phase("serve autoscale"):
                burst = BurstConfig(url=url, replicas_max=cfg.burst_replicas, concurrency=cfg.burst_concurrency, timeout_s=cfg.burst_timeout_s, idle_timeout_s=idle, api_key=key)
                section["serve_autoscale"] = burst_autoscale(burst, served["config"], images, sampler)
            log.info("serve autoscale: %s", section["serve_autoscale"])

            with sampler.phase("serve down") as ph:
                _cli(["serve", "down"], env, timeout_s=120)
                sampler.replicas = False
                sampler.wait_for(lambda s: _worker_nodes(s) == 0, idle + 120, "every worker node to leave")
            section["scale_down_s"] = first_time(sampler.samples, lambda s: _worker_nodes(s) == 0, after=ph["start"])

            with sampler.phase("job round trip") as ph:
                _cli(["submit", "train", "--", "--epochs", str(cfg.job_epochs), "--workers", "1", "--name", "bench-job"], env, timeout_s=900)
                until = time.monotonic() + 60
                while "bench-job:v1" not in _cli(["models", "list"], env, timeout_s=60).stdout.split():
                    if time.monotonic() > until:
                        raise ServingError("the submitted job's model is not in `dynray models list`", got="bench-job:v1", fix="see the job's log (`ray job logs`)")
                    time.sleep(1)
                section["job_roundtrip_s"] = round(sampler.now() - ph["start"], 2)
        finally:
            if sampler is not None:
                sampler.stop()
            ray.shutdown()
            try:
                _cli(["cluster", "down"], env, timeout_s=120)
            except (ServingError, subprocess.TimeoutExpired) as e:
                log.error("`dynray cluster down` failed: %s", e)
    section["timeline"] = sampler.samples
    section["phases"] = sampler.phases
    section["plot"] = plot_timeline(sampler.samples, sampler.phases, plot, title=f"dynray bench cluster: nodes and replicas ({section['config']})")
    section["bench_s"] = round(time.monotonic() - t0, 1)
    merge_section(cfg.json, "cluster", section)
    return BenchResult("cluster", section, cfg.json)


def main(argv: list[str] | None = None, *, prog: str = "python -m jobs.bench_cluster") -> int:
    cfg = parse(Config, argv, prog=prog, description=__doc__)
    print(run(cfg).summary(), flush=True)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(guarded(main, prog="python -m jobs.bench_cluster"))
