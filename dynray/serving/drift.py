"""The ingress's drift watch: one :class:`~dynray.drift.DriftMonitor` per served version.

Every answered request's images and probabilities are queued for the monitor of its version;
every ``check_every`` samples the queue's features are computed in one vectorised pass and
the monitor tests its window (the per-call overhead of the feature ops, not their
arithmetic, dominates their cost at one image: batching divides it). After each test the
score is exported (``dynray_drift_score``); a raised alarm is logged, counted
(``dynray_drift_alarms_total``) and handed to ``on_alarm``. ``GET /v1/models`` and
`dynray serve status` show :meth:`DriftWatch.status`, including what the watch costs per
request (measured here, in the replica).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Protocol

import torch

from dynray.drift import DriftAlarm, DriftConfig, DriftMonitor, DriftReference, sample_features
from dynray.serving import metrics as M

__all__ = ["DriftWatch", "OnAlarm"]

log = logging.getLogger(__name__)


class OnAlarm(Protocol):
    """What an alarm triggers beyond the log line and the metric (e.g. the recalibration job)."""

    def __call__(self, version: str, alarm: DriftAlarm) -> None: ...

    def history(self) -> list[dict]:
        """What it did so far, for ``GET /v1/models`` (JSON)."""
        ...


class DriftWatch:
    """Per-version monitors; the references come with each reconfigure's plan."""

    def __init__(self, cfg: DriftConfig, metrics: M.MetricsSink, *, on_alarm: OnAlarm | None = None) -> None:
        self.cfg, self.metrics, self.on_alarm = cfg, metrics, on_alarm
        self.monitors: dict[str, DriftMonitor] = {}
        self.pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.requests = 0
        self.seconds = 0.0

    def serve(self, references: Mapping[str, DriftReference | None]) -> None:
        """The versions now served; a version served before keeps its window and alarm state."""
        self.monitors = {v: self.monitors.get(v) or DriftMonitor(ref, self.cfg) for v, ref in references.items()}
        self.pending = {v: self.pending.get(v, []) for v in self.monitors}
        for v, ref in references.items():
            if ref is None:
                log.warning("%s has no drift reference (registered before drift detection, or not calibrated): drift reports 'no reference' for it", v)

    def observe(self, version: str, images: torch.Tensor, probs: torch.Tensor) -> DriftAlarm | None:
        """Feed one answered request; returns the alarm it raised, if any."""
        mon = self.monitors.get(version)
        if mon is None or mon.reference is None:
            return None
        t0 = time.perf_counter()
        queue = self.pending[version]
        queue.append((images, probs))
        self.requests += 1
        if sum(len(x) for x, _ in queue) < self.cfg.check_every:
            self.seconds += time.perf_counter() - t0
            return None
        self.pending[version] = []
        before = mon.score
        alarm = mon.observe(sample_features(torch.cat([x for x, _ in queue]), torch.cat([p for _, p in queue])))
        self.seconds += time.perf_counter() - t0
        if mon.score is not None and mon.score != before:
            self.metrics.set(M.DRIFT_SCORE, mon.score, tags={M.TAG_VERSION: version})
        if alarm is not None:
            log.warning(alarm.message(version))
            self.metrics.inc(M.DRIFT_ALARMS, tags={M.TAG_VERSION: version})
            if self.on_alarm is not None:
                try:
                    self.on_alarm(version, alarm)
                except Exception:  # noqa: BLE001 - the alarm is logged and counted whatever the hook does
                    log.exception("drift alarm hook failed for %s", version)
        return alarm

    def export_gauges(self) -> None:
        """Set every score gauge again: Ray drops a gauge about 20 s after its last set, and
        the score must stay on the endpoint while traffic pauses (the ingress calls this every few seconds)."""
        for v, m in self.monitors.items():
            if m.score is not None:
                self.metrics.set(M.DRIFT_SCORE, m.score, tags={M.TAG_VERSION: v})

    def status(self) -> dict:
        """Per version: the monitor's status; plus the watch's cost per request in this replica."""
        out = {"versions": {v: m.status() for v, m in self.monitors.items()},
               "cost_ms_per_request": 1000 * self.seconds / self.requests if self.requests else None, "requests": self.requests}
        if self.on_alarm is not None:
            out["on_alarm"] = self.on_alarm.history()
        return out
