"""Chaos drivers for a running dynray Serve app: kill replicas under load, count what was answered.

Both drive the app with the closed-loop load generator (:mod:`dynray.bench.load`), one test
image per request as ``array_b64`` uint8, and kill Serve replicas (``ray.kill``, no restart:
Serve must replace them) while the load runs:

- :func:`kill_devices_under_load`: one replica of each listed device deployment in turn
  (default Edge, then Cloud), waiting for each to be replaced; the ingress's retries and
  failover must answer everything.
- :func:`kill_ingress_under_load`: one ingress replica. Serve's proxy does not retry a
  request the dying replica had accepted (RAY_NOTES §1b), so those fail; a client that
  retries once gets them answered. Both fractions are reported.

The client retry is a second pass: after the load, each request that did not get a 2xx
(connection error, timeout or 5xx; never a 4xx) is sent once more (``ChaosConfig.retries``
passes). The caller owns ``ray.init`` and the deployed app.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from dynray.bench.load import LoadConfig, LoadResult, RequestRecord, run_load_sync
from dynray.errors import ConfigError, ServingError
from dynray.serving.config import CLOUD, EDGE, INGRESS
from dynray.serving.payload import encode_array

__all__ = ["ChaosConfig", "ChaosResult", "Kill", "under_load", "kill_devices_under_load", "kill_ingress_under_load", "replicas", "running_replicas"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    """The app, the load, and when to kill."""

    url: str
    """Predict URL, e.g. ``http://127.0.0.1:8000/v1/predict``."""
    app: str = "dynray"
    """Serve application name (replica actors are ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
    requests: int = 1500
    """Requests in the measured run."""
    concurrency: int = 8
    """Closed-loop concurrency."""
    timeout_s: float = 30.0
    """Per-request client timeout."""
    kill_after_s: float = 1.0
    """Seconds into the load before the first kill."""
    recovery_timeout_s: float = 60.0
    """Longest wait for a killed replica's replacement to be RUNNING."""
    retries: int = 0
    """Client retry passes over the requests that did not get a 2xx (0: report first tries only)."""
    api_key: str | None = field(default=None, repr=False)
    """API key the load sends (the ingress asks for one unless auth is off)."""

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.retries < 0:
            raise ConfigError("requests and concurrency must be >= 1, retries >= 0", got=(self.requests, self.concurrency, self.retries), fix="e.g. requests=400, concurrency=8, retries=1")
        if self.kill_after_s < 0 or self.timeout_s <= 0 or self.recovery_timeout_s <= 0:
            raise ConfigError("kill_after_s must be >= 0, timeouts > 0", got=(self.kill_after_s, self.timeout_s, self.recovery_timeout_s), fix="e.g. kill_after_s=1.0")


@dataclass(frozen=True, kw_only=True)
class ChaosResult:
    """What the clients saw. ``to_dict`` gives the bench JSON keys (``serve.chaos``, ``cluster.ingress_kill``)."""

    requests: int
    answered: int
    """2xx after at most ``retries`` client retries."""
    answered_no_retry: int
    """2xx at the first try."""
    degraded: int
    """Answered with ``degraded`` set (a fallback answered)."""
    errors: int
    """Never answered (``requests - answered``)."""
    status: dict[str, int]
    """First-try HTTP status counts (0: connection error or timeout)."""
    recovery_s: float
    """Longest kill-to-replaced time."""
    recovery_s_per_kill: dict[str, float]
    retried: int = 0
    """Requests sent again by the client."""
    device_failures: int = 0
    """Failed device calls the ingress survived (sum of the answers' ``device_failures``)."""
    killed: list[str] = field(default_factory=list)
    """Replica actors killed."""
    kills_during_load: bool = True
    """Every kill happened before the load's last answer (else the run proves nothing)."""
    load_s: float = 0.0
    answered_by_tier: dict[str, int] = field(default_factory=dict)
    """Answers by the tier that gave them (an answer's last tier: ``cloud`` when it escalated or failed over)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answered_frac"] = round(self.answered / self.requests, 4)
        d["answered_frac_no_retry"] = round(self.answered_no_retry / self.requests, 4)
        return d


def replicas(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of ``deployment`` in ``app``."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def running_replicas(app: str, deployment: str) -> int:
    from actors.serve_apps import app_status

    return app_status(app).get("deployments", {}).get(deployment, {}).get("replicas", {}).get("RUNNING", 0)


def _kill_and_wait(app: str, deployment: str, timeout_s: float) -> tuple[str, float]:
    """Kill one replica of ``deployment``; seconds until it is replaced and as many are RUNNING again."""
    import ray

    names = replicas(app, deployment)
    if not names:
        raise ServingError(f"no running {deployment} replica to kill", got=app, fix="deploy the app first and wait until it is RUNNING")
    n, victim = len(names), names[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed = time.monotonic()
    while time.monotonic() - killed < timeout_s:
        now = replicas(app, deployment)
        if victim not in now and len(now) >= n and running_replicas(app, deployment) >= n:
            break
        time.sleep(0.2)
    else:
        log.warning("%s replica %s not replaced within %.0f s", deployment, victim, timeout_s)
    took = round(time.monotonic() - killed, 2)
    log.info("killed %s: %d %s replicas running again after %.1f s", victim, n, deployment, took)
    return victim, took


def _payloads(images: np.ndarray) -> list[dict]:
    return [encode_array(images[i : i + 1], dtype="uint8") for i in range(len(images))]


Kill = Callable[[], tuple[str, float]]
"""Kills one thing and waits until it is replaced: (what was killed, seconds to recover)."""


def under_load(cfg: ChaosConfig, images: np.ndarray, kills: dict[str, Kill]) -> ChaosResult:
    """Run the load; ``cfg.kill_after_s`` into it, run each kill in turn (named by its key)."""
    if len(images) == 0:
        raise ConfigError("images is empty", fix="pass [N, C, H, W] test images, N >= 1")
    bodies = _payloads(images)
    load = LoadConfig(url=cfg.url, requests=cfg.requests, concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, api_key=cfg.api_key)
    out: dict[str, LoadResult] = {}
    done_at: list[float] = []

    def drive() -> None:
        out["res"] = run_load_sync(load, lambda i: bodies[i % len(bodies)])
        done_at.append(time.monotonic())

    t = threading.Thread(target=drive, daemon=True)
    t0 = time.monotonic()
    t.start()
    time.sleep(cfg.kill_after_s)
    killed, recovery, kill_times = [], {}, []
    for name, kill in kills.items():
        kill_times.append(time.monotonic())
        victim, took = kill()
        killed.append(victim)
        recovery[name] = took
    t.join(timeout=cfg.requests * cfg.timeout_s)
    if "res" not in out:
        raise ServingError("the load run did not finish", got=f"{cfg.requests} requests", fix="check the app's health; lower requests or raise timeout_s")
    first = out["res"]
    final: dict[int, RequestRecord] = {r.index: r for r in first.records}
    retried = 0
    for _ in range(cfg.retries):  # the client's retry: send each unanswered request once more
        again = sorted(i for i, r in final.items() if not r.ok and not 400 <= r.status < 500)
        if not again:
            break
        retried += len(again)
        res = run_load_sync(LoadConfig(url=cfg.url, requests=len(again), concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, api_key=cfg.api_key), lambda j: bodies[again[j] % len(bodies)])
        for r in res.records:
            final[again[r.index]] = r
    ok = [r for r in final.values() if r.ok]
    return ChaosResult(
        requests=cfg.requests,
        answered=len(ok),
        answered_no_retry=sum(r.ok for r in first.records),
        degraded=sum(bool(r.body and r.body.get("degraded")) for r in ok),
        errors=cfg.requests - len(ok),
        status={str(k): v for k, v in first.status_counts().items()},
        recovery_s=max(recovery.values()),
        recovery_s_per_kill=recovery,
        retried=retried,
        device_failures=sum(int((r.body or {}).get("device_failures", 0)) for r in ok),
        killed=killed,
        kills_during_load=bool(done_at) and all(k < done_at[0] for k in kill_times),
        load_s=round((done_at[0] if done_at else time.monotonic()) - t0, 2),
        answered_by_tier=_by_tier(ok),
    )


def _by_tier(records: list[RequestRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        tiers = (r.body or {}).get("tier") or ["?"]
        last = "cloud" if "cloud" in tiers else tiers[0]
        out[last] = out.get(last, 0) + 1
    return out


def kill_devices_under_load(cfg: ChaosConfig, images: np.ndarray, deployments: tuple[str, ...] = (EDGE, CLOUD)) -> ChaosResult:
    """Kill one replica of each of ``deployments`` in turn under load (each waited for until replaced)."""
    return under_load(cfg, images, {dep.lower(): functools.partial(_kill_and_wait, cfg.app, dep, cfg.recovery_timeout_s) for dep in deployments})


def kill_ingress_under_load(cfg: ChaosConfig, images: np.ndarray) -> ChaosResult:
    """Kill one ingress replica under load; ``answered`` counts ``cfg.retries`` client retries."""
    if len(replicas(cfg.app, INGRESS)) < 2:
        raise ServingError("killing the only ingress replica proves nothing", got=len(replicas(cfg.app, INGRESS)), fix="deploy with ingress: {replicas: 2} (the default)")
    return under_load(cfg, images, {"ingress": functools.partial(_kill_and_wait, cfg.app, INGRESS, cfg.recovery_timeout_s)})
