"""The drift watch's ``recalibrate`` action: submit ``python -m jobs.calibrate`` as a Ray job.

An ingress replica calls :class:`Recalibrator` when its drift watch raises an alarm (with
``drift.on_alarm: recalibrate``). The job is sent to this cluster's job API, found through
the GCS this replica is connected to; the client carries the cluster's token when token
auth is on (the replica runs in the cluster's auth mode). It runs the replica's own
interpreter, with ``DYNRAY_HOME`` set to the app's registry, so the new calibrated version
lands beside the served one (roll to it with `dynray serve roll`). The submission happens
in a thread, off the request path; at most one per version in ``cooldown_s``. A job API that
answers "no available agent … try again later" (its agent is still starting, or busy) is
asked again with backoff for up to ``retry_s``; any other error is recorded at once.

What it can and cannot fix: calibration re-fits the thresholds (and the drift reference) on
the dataset's val split. That helps when the val split has been refreshed with data like
the new traffic; on the same val split it reproduces the same rule.
"""

from __future__ import annotations

import logging
import shlex
import sys
import threading
import time

import ray

from dynray.drift import DriftAlarm

__all__ = ["Recalibrator"]

log = logging.getLogger(__name__)


class Recalibrator:
    """``on_alarm`` hook of :class:`dynray.serving.drift.DriftWatch` that submits the calibration job."""

    def __init__(self, *, home: str | None, args: list[str], cooldown_s: float, retry_s: float = 60.0) -> None:
        self.home, self.args, self.cooldown_s, self.retry_s = home, list(args), cooldown_s, retry_s
        self.last: dict[str, float] = {}
        self.submitted: list[dict] = []
        """Jobs sent: ``{"version", "job_id", "at"}`` (or ``"error"``)."""
        self._lock = threading.Lock()

    def history(self) -> list[dict]:
        with self._lock:
            return list(self.submitted)

    def entrypoint(self, version: str) -> str:
        return " ".join([shlex.quote(sys.executable), "-m", "jobs.calibrate", "--model", shlex.quote(version), *map(shlex.quote, self.args)])

    def __call__(self, version: str, alarm: DriftAlarm) -> None:
        now = time.monotonic()
        with self._lock:
            if version in self.last and now - self.last[version] < self.cooldown_s:
                log.info("drift on %s: a recalibration job was sent %.0f s ago (cooldown %.0f s); not sending another", version, now - self.last[version], self.cooldown_s)
                return
            self.last[version] = now
        threading.Thread(target=self._submit, args=(version,), daemon=True, name="recalibrate").start()

    def _submit(self, version: str) -> None:
        from ray.job_submission import JobSubmissionClient

        entry = self.entrypoint(version)
        until, wait, attempts = time.monotonic() + self.retry_s, 0.5, 0
        while True:
            attempts += 1
            try:
                client = JobSubmissionClient(ray.get_runtime_context().gcs_address)
                env = {"DYNRAY_HOME": self.home} if self.home else {}
                job_id = client.submit_job(entrypoint=entry, runtime_env={"env_vars": env} if env else None,
                                           metadata={"dynray": "drift-recalibration", "model": version})
                log.warning("drift on %s: submitted recalibration job %s: %s", version, job_id, entry)
                rec = {"version": version, "job_id": job_id, "at": time.time(), "attempts": attempts}
                break
            except Exception as e:  # noqa: BLE001 - the alarm stands; the operator can run the job by hand
                if _transient(e) and time.monotonic() + wait < until:
                    log.info("drift on %s: the job API asked to try again later (%s); retrying in %.1f s", version, str(e)[:200], wait)
                    time.sleep(wait)
                    wait = min(wait * 2, 8.0)
                    continue
                log.error("drift on %s: could not submit the recalibration job (%s: %s); run it by hand: %s", version, type(e).__name__, str(e)[:300], entry)
                rec = {"version": version, "error": f"{type(e).__name__}: {str(e)[:200]}", "at": time.time(), "attempts": attempts}
                break
        with self._lock:
            self.submitted.append(rec)


def _transient(e: Exception) -> bool:
    """The job API's "no available agent to submit job, please try again later" (HTTP 500/503)."""
    msg = str(e).lower()
    return "try again later" in msg or "no available agent" in msg
