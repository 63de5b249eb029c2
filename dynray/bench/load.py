"""Closed-loop HTTP load generator for ``dynray bench serve`` and the serving tests.

``concurrency`` workers share one keep-alive ``aiohttp`` session; each sends its next request
only when its previous answer arrived, until ``requests`` have been sent. Every request has a
client timeout and the whole run (warmup included) stops at ``max_duration_s``, so a run never hangs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from dynray.errors import ConfigError

__all__ = ["LoadConfig", "RequestRecord", "LoadResult", "run_load", "run_load_sync"]

log = logging.getLogger(__name__)

STATUS_ERROR = 0
"""Status recorded for a connection error or a per-request timeout."""
STATUS_CANCELLED = -1
"""Status recorded for a request still in flight when ``max_duration_s`` expired."""

Payload = Callable[[int], "dict | bytes"]
_HEADERS = {"Content-Type": "application/json"}


def _positive_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"LoadConfig.{name} must be an integer >= {minimum}", got=value, fix=f"pass {name}={max(minimum, 1)} or more")


def _positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"LoadConfig.{name} must be a finite number > 0", got=value, fix=f"e.g. {name}=10.0")


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """What to send, how many at once and how long to wait."""

    url: str
    """Full URL, e.g. ``http://127.0.0.1:8000/v1/predict``."""
    requests: int = 1000
    """Total measured requests (>= 1)."""
    concurrency: int = 16
    """Requests in flight; closed loop: a worker sends its next request when the previous answer arrives (>= 1)."""
    timeout_s: float = 10.0
    """Per-request client timeout (connect + send + read the whole body)."""
    warmup: int = 0
    """Requests sent before the measured run and left out of the stats (>= 0)."""
    max_duration_s: float = 600.0
    """Whole-run safety limit, warmup included: on expiry stop issuing and cancel in-flight requests (status -1)."""
    api_key: str | None = field(default=None, repr=False)
    """Sent as ``Authorization: Bearer <key>`` (the ingress asks for one unless auth is off); never printed."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError("LoadConfig.url must be an http(s) URL", got=self.url, fix="e.g. http://127.0.0.1:8000/v1/predict")
        _positive_int("requests", self.requests, 1)
        _positive_int("concurrency", self.concurrency, 1)
        _positive_int("warmup", self.warmup, 0)
        _positive_float("timeout_s", self.timeout_s)
        _positive_float("max_duration_s", self.max_duration_s)


@dataclass(frozen=True)
class RequestRecord:
    """The outcome of one measured request."""

    index: int
    """Which payload was sent (``0..requests-1``)."""
    status: int
    """HTTP status; 0 = connection error or timeout; -1 = cancelled at ``max_duration_s``."""
    latency_ms: float
    """Time from sending to the whole body read (or to the error / cancellation)."""
    body: dict | None
    """Parsed JSON body when the response was JSON, else None."""
    started_s: float
    """``perf_counter`` offset of the send from the start of the measured run."""
    retry_after: str | None
    """The ``Retry-After`` header, if present."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class LoadResult:
    """All measured records (sorted by index) and the measured wall time."""

    records: list[RequestRecord]
    """One per issued request, sorted by index (requests never issued before ``max_duration_s`` are absent)."""
    wall_s: float
    """Seconds from the start of the measured run to its last answer or cancellation."""
    concurrency: int = 1
    """The concurrency the run used (reported in :meth:`summary`)."""

    @property
    def rps(self) -> float:
        """Successful (2xx) requests per second."""
        ok = sum(r.ok for r in self.records)
        return ok / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        """Latency percentile ``q`` (0..100) over 2xx records; nan when there are none."""
        if not 0 <= q <= 100:
            raise ConfigError("percentile must be within 0..100", got=q, fix="e.g. latency_ms(99)")
        lat = [r.latency_ms for r in self.records if r.ok]
        return float(np.percentile(lat, q)) if lat else math.nan

    @property
    def p50_ms(self) -> float:
        return self.latency_ms(50)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms(99)

    @property
    def errors(self) -> int:
        """Non-2xx records, connection errors (0) and cancellations (-1) included."""
        return sum(not r.ok for r in self.records)

    def status_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(r.status for r in self.records).items()))

    def summary(self) -> dict:
        """A JSON-able digest; latencies are None when no request succeeded."""

        def ms(q: float) -> float | None:
            v = self.latency_ms(q)
            return None if math.isnan(v) else round(v, 2)

        return {
            "requests": len(self.records), "concurrency": self.concurrency, "rps": round(self.rps, 1),
            "p50_ms": ms(50), "p95_ms": ms(95), "p99_ms": ms(99), "errors": self.errors, "status": self.status_counts(),
        }


def _encode(data: dict | bytes) -> bytes:
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else json.dumps(data).encode()


async def _phase(session: aiohttp.ClientSession, cfg: LoadConfig, payload: Payload, indices: list[int], deadline: float,
                 record: Callable[[int, int, float, dict | None, str | None], None] | None) -> None:
    """Send ``indices`` with ``cfg.concurrency`` closed-loop workers until done or ``deadline`` (perf_counter)."""
    todo = iter(indices)  # shared counter: a single-threaded event loop needs no lock
    in_flight: dict[int, float] = {}  # index -> perf_counter at send, for cancellation records
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    headers = {**_HEADERS, "Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else _HEADERS

    async def worker() -> None:
        for i in todo:
            data = _encode(payload(i))
            t0 = time.perf_counter()
            in_flight[i] = t0
            status, body, retry = STATUS_ERROR, None, None
            try:
                async with session.post(cfg.url, data=data, headers=headers, timeout=timeout) as resp:
                    raw = await resp.read()
                    status, retry = resp.status, resp.headers.get("Retry-After")
                    if resp.content_type == "application/json" or resp.content_type.endswith("+json"):
                        try:
                            body = json.loads(raw)
                        except ValueError:
                            log.debug("request %d: response claims JSON but does not parse", i)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.debug("request %d failed: %r", i, exc)
            del in_flight[i]
            if record is not None:
                record(i, status, t0, body if isinstance(body, dict) else None, retry)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(cfg.concurrency, len(indices)))]
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()), return_when=asyncio.FIRST_EXCEPTION)
    failed = [t for t in done if t.exception() is not None]
    if pending and not failed:
        log.warning("load run hit max_duration_s=%s; cancelling %d in-flight request(s)", cfg.max_duration_s, len(in_flight))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if failed:
        raise failed[0].exception()  # a failing payload() is a bug in the caller: surface it
    if record is not None:
        for i, t0 in sorted(in_flight.items()):
            record(i, STATUS_CANCELLED, t0, None, None)


async def run_load(cfg: LoadConfig, payload: Payload, *, on_progress: Callable[[int], None] | None = None) -> LoadResult:
    """Run ``cfg.warmup`` unrecorded then ``cfg.requests`` measured requests; request i sends ``payload(i)``.

    ``payload(i)`` returns a JSON-able dict (serialised once) or raw bytes, both sent as
    ``Content-Type: application/json``. ``on_progress(done)`` runs after each measured answer.
    """
    deadline = time.perf_counter() + cfg.max_duration_s
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, force_close=False)
    records: list[RequestRecord] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        if cfg.warmup:
            await _phase(session, cfg, payload, [i % cfg.requests for i in range(cfg.warmup)], deadline, None)
        start = time.perf_counter()

        def record(i: int, status: int, t0: float, body: dict | None, retry: str | None) -> None:
            now = time.perf_counter()
            records.append(RequestRecord(i, status, (now - t0) * 1e3, body, t0 - start, retry))
            if on_progress is not None and status != STATUS_CANCELLED:
                on_progress(len(records))

        await _phase(session, cfg, payload, list(range(cfg.requests)), deadline, record)
        wall = time.perf_counter() - start
    records.sort(key=lambda r: r.index)
    log.debug("load run: %d records in %.3f s", len(records), wall)
    return LoadResult(records, wall, cfg.concurrency)


def run_load_sync(cfg: LoadConfig, payload: Payload, **kw: Callable[[int], None] | None) -> LoadResult:
    """:func:`run_load` from synchronous code; refuses to run inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_load(cfg, payload, **kw))
    raise ConfigError("run_load_sync was called from a running event loop", got=cfg.url, fix="use `await run_load(cfg, payload)` instead")
