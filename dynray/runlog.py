"""The run log: what a serving run or a bench saw, one JSON line per event, for `dynray report`.

Two kinds of line, each with a wall-clock time ``t`` (seconds since the epoch, so logs of
several load runs append into one timeline):

- ``{"kind": "request", "t", "status", "latency_ms", "exit": [..], "tier": [..], "model_version", "phase"}``:
  one answered (or refused) HTTP request, as the client saw it; ``phase`` names the part of
  the run it belongs to (e.g. ``split``, ``inverted``);
- ``{"kind": "drift", "t", "replica", "version", "score", "threshold", "status", "alarms"}``:
  one reading of an ingress replica's drift watch (``GET /v1/models``).

:class:`RunLog` appends (thread-safe, flushed per batch); :func:`read_runlog` reads a log
back and says what is missing when a report cannot be made from it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dynray.errors import ConfigError

__all__ = ["RunLog", "RunData", "read_runlog", "DriftPoller"]


class RunLog:
    """Appends events to a JSONL file (created with its parent directory)."""

    def __init__(self, path: str | Path, *, fresh: bool = False) -> None:
        """``fresh``: start a new log (an existing file at ``path`` is replaced)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        self._lock = threading.Lock()

    def write(self, events: Iterable[dict]) -> None:
        lines = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)
        with self._lock, self.path.open("a") as f:
            f.write(lines)

    def requests(self, records, *, wall_s: float, phase: str, end_t: float | None = None) -> None:
        """Log a load run's records (``dynray.bench.load.RequestRecord``): ``wall_s`` is the
        run's ``LoadResult.wall_s``; the run ended at ``end_t`` (default: now)."""
        start = (end_t if end_t is not None else time.time()) - wall_s
        self.write({"kind": "request", "t": round(start + r.started_s + r.latency_ms / 1000, 4), "status": r.status,
                    "latency_ms": round(r.latency_ms, 3), "exit": (r.body or {}).get("exit") if r.ok else None,
                    "tier": (r.body or {}).get("tier") if r.ok else None, "model_version": (r.body or {}).get("model_version") if r.ok else None,
                    "phase": phase} for r in records)

    def drift(self, models_body: dict, t: float | None = None) -> None:
        """Log the drift part of a ``GET /v1/models`` answer."""
        d = models_body.get("drift") or {}
        now = time.time() if t is None else t
        self.write({"kind": "drift", "t": round(now, 4), "replica": d.get("replica", "?"), "version": v, "score": st.get("score"),
                    "threshold": st.get("threshold"), "status": st.get("status"), "alarms": st.get("alarms", 0)}
                   for v, st in (d.get("versions") or {}).items())


class DriftPoller:
    """Reads the drift watch every ``period_s`` in a background thread into a :class:`RunLog`."""

    def __init__(self, log: RunLog, fetch: Callable[[], dict], period_s: float = 0.5) -> None:
        self.log, self.fetch, self.period_s = log, fetch, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="drift-poller")

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.log.drift(self.fetch())
            except Exception:  # noqa: BLE001 - a missed reading leaves a gap in the plot, nothing more
                continue

    def __enter__(self) -> DriftPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class RunData:
    requests: list[dict]
    drift: list[dict]
    path: Path

    @property
    def answered(self) -> list[dict]:
        return [r for r in self.requests if r["status"] == 200 and r.get("exit")]


def read_runlog(path: str | Path) -> RunData:
    """Read a run log; a missing, empty or foreign file is refused with what it needs."""
    p = Path(path)
    need = "a run log: `dynray demo` writes out/runlog.jsonl, `dynray bench drift` writes drift_runlog.jsonl next to its --json"
    if not p.is_file():
        raise ConfigError("no run log at this path", got=str(p), fix=f"pass {need}")
    reqs, drift = [], []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            kind = e["kind"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError("not a run log line", got=f"{p}:{n}: {line[:80]}", fix=f"pass {need}") from None
        (reqs if kind == "request" else drift if kind == "drift" else []).append(e)
    if not reqs:
        raise ConfigError("the run log holds no requests", got=str(p), fix=f"a report needs answered requests (their exits, tiers and latencies): pass {need}")
    return RunData(sorted(reqs, key=lambda e: e["t"]), sorted(drift, key=lambda e: e["t"]), p)
