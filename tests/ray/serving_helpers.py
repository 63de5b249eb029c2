"""Helpers of tests/ray/test_serving.py: a slow chunked client, the metrics scrape, the
recalibration job check (kept here so the test module stays readable)."""

from __future__ import annotations

import select
import socket
import time

from dynray.registry import ModelRegistry
from dynray.serving.prometheus import parse, required_missing, scrape


def chunked_post_until_answered(port: int, key: str, total: int, rate: float, chunk: int = 64 * 1024) -> tuple[int, bytes, int]:
    """POST a chunked body of up to ``total`` bytes at ``rate`` bytes/s, stopping as soon as the
    server answers: (bytes sent by then, the raw response, total).

    Paced, because Serve's proxy reads a body as fast as it comes (and queues it for the
    replica): unpaced on loopback, tens of MB are queued before the replica has seen 8 MB."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                     + f"Authorization: Bearer {key}\r\n\r\n".encode())
        frame = b"%x\r\n" % chunk + b"[" * chunk + b"\r\n"
        t0 = time.monotonic()
        sent, deadline = 0, t0 + 120
        sock.settimeout(0.5)
        while sent < total and time.monotonic() < deadline:
            time.sleep(max(0.0, sent / rate - (time.monotonic() - t0)))
            if select.select([sock], [], [], 0)[0]:  # the answer (or a close) is there
                break
            try:
                sock.sendall(frame)
            except (TimeoutError, BlockingIOError):  # the server stopped reading: look for its answer
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += chunk
        if sent >= total:
            sock.sendall(b"0\r\n\r\n")
        sock.settimeout(30)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < int(raw.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            part = sock.recv(65536)
            if not part:
                break
            raw += part
        return sent, raw, total
    finally:
        sock.close()


def scrape_until(port: int, required: list[str], timeout_s: float = 30.0) -> dict:
    """Parsed families of the node's metrics endpoint once every ``required`` series is non-zero
    (replicas report every second in this session), else the last scrape."""
    t0 = time.monotonic()
    while True:
        fams = parse(scrape(port))
        if not required_missing(fams, required) or time.monotonic() - t0 > timeout_s:
            return fams
        time.sleep(1.0)


def the_alarm_submitted_a_recalibration_job_that_registered_a_calibrated_child(served: dict, ray_session) -> None:
    """drift.on_alarm = recalibrate (tests/ray/conftest.py): an alarm on v1 sent
    `python -m jobs.calibrate --model v1` to the cluster's job API; it ran and registered a
    calibrated child of v1, with its own drift reference."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs: dict[str, dict] = {}
    t0 = time.monotonic()
    while not jobs and time.monotonic() - t0 < 75:  # either replica may have sent it (retrying a busy job API for up to 60 s); each answers for itself
        for rec in served["http"].get(f"{served['url']}/v1/models", timeout=10).json()["drift"].get("on_alarm", []):
            assert "error" not in rec, rec
            jobs[rec["job_id"]] = rec
        time.sleep(0.5)
    assert jobs and all(r["version"] == served["v1"] for r in jobs.values()), jobs
    client = JobSubmissionClient(f"http://{ray_session._private.worker.global_worker.node.address_info['webui_url']}")
    for jid in jobs:
        while (st := client.get_job_status(jid)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.monotonic() - t0 < 180:
            time.sleep(1.0)
        assert st == JobStatus.SUCCEEDED, client.get_job_logs(jid)[-3000:]
    versions = ModelRegistry(served["home"]).list("srv")
    calibrated = [i for i in versions if i.meta.get("parent") == served["v1"] and i.meta.get("thresholds_source") == "calibrated" and i.meta.get("drift_reference")]
    # >=: the other replica may have sent one too (each replica answers /v1/models for itself)
    assert len(calibrated) >= len(jobs) >= 1, [(i.ref, i.meta.get("parent"), i.meta.get("thresholds_source")) for i in versions]
