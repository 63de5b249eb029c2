"""Sending a job step to a cluster with Ray's ``JobSubmissionClient`` (``dynray submit``).

The project goes as the job's ``working_dir`` (without the venv, the registry and outputs);
the logs stream while it runs; Ctrl-C stops the job on the cluster, not only the client;
the exit code is the job's. With no ``--address`` and no ``RAY_ADDRESS`` the job goes to
the cluster ``dynray cluster up`` recorded. What the job registers lands in that cluster's
registry (the registry actor, ``actors/registry.py``), which ``dynray models list`` reads.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from dynray.errors import ServingError
from dynray.flags import UsageError

__all__ = ["EXCLUDES", "resolve_address", "submit", "wait_terminal"]

EXCLUDES = [".venv", ".dynray", ".git", "out", "*.egg-info", "__pycache__", ".pytest_cache"]
"""Left out of the uploaded working_dir: the environment, the registry, outputs and caches."""
FAILED_TAIL_LINES = 20
STOP_WAIT_S = 30.0


def resolve_address(given: str | None) -> tuple[str, str | None]:
    """(dashboard address, the cluster's auth mode if known): ``--address``, else
    ``RAY_ADDRESS``, else the cluster from ``dynray cluster up``."""
    address = given or os.environ.get("RAY_ADDRESS")
    if address:
        return address, None
    from jobs._ray import recorded_head
    from jobs.cluster import read_state

    state = read_state()
    if state and recorded_head(state)[0]:
        return state["dashboard"], state.get("auth_mode")
    raise UsageError("no cluster to submit to", fix="start one with `dynray cluster up --local`, or pass --address http://HEAD:8265 (or set RAY_ADDRESS)")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ServingError(f"no Ray cluster answers at {address}", got=first, fix="check --address (the dashboard, http://HEAD:8265), or start one with `dynray cluster up --local`") from None


def wait_terminal(client, jid: str, timeout_s: float | None = None):
    """The job's status once it is SUCCEEDED, FAILED or STOPPED (or at ``timeout_s``)."""
    from ray.job_submission import JobStatus

    until = None if timeout_s is None else time.monotonic() + timeout_s
    while (st := client.get_job_status(jid)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if until is not None and time.monotonic() > until:
            break
        time.sleep(0.5)
    return st


async def _stream(client, jid: str) -> None:
    async for chunk in client.tail_job_logs(jid):
        print(chunk, end="", flush=True)


def submit(address: str, entrypoint: str, *, env_vars: Mapping[str, str] | None = None, wait: bool = True, auth_mode: str | None = None,
           working_dir: str | Path | None = None) -> int:
    """Submit ``entrypoint``; stream its logs until it ends; return its exit code (0, 1, 130)."""
    from ray.job_submission import JobStatus

    from jobs._ray import ensure_auth_env

    ensure_auth_env(auth_mode)  # the job SDK must use the head's auth mode, which a plain shell does not say (RAY_NOTES §0)
    client = _client(address)
    runtime_env = {"working_dir": str(working_dir or Path.cwd()), "excludes": EXCLUDES, **({"env_vars": dict(env_vars)} if env_vars else {})}
    jid = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {jid} to {address}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow --address {address} {jid}", flush=True)
        return 0
    try:
        asyncio.run(_stream(client, jid))
        status = wait_terminal(client, jid)
    except KeyboardInterrupt:
        print(f"\nstopping {jid} on the cluster…", file=sys.stderr, flush=True)
        client.stop_job(jid)
        status = wait_terminal(client, jid, STOP_WAIT_S)
        print(f"job {jid}: {status}", file=sys.stderr, flush=True)
        return 130
    info = client.get_job_info(jid)
    if status == JobStatus.SUCCEEDED:
        print(f"job {jid}: SUCCEEDED", flush=True)
        return 0
    tail = client.get_job_logs(jid).rstrip().splitlines()[-FAILED_TAIL_LINES:]
    print(f"job {jid}: {status}" + (f" (exit code {info.driver_exit_code})" if info.driver_exit_code is not None else "") + f": {info.message or ''}".rstrip(": "), file=sys.stderr)
    if tail:
        print(f"its last {len(tail)} log lines:\n" + "\n".join(f"  {line}" for line in tail), file=sys.stderr, flush=True)
    return 1
