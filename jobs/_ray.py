"""Connecting a job to Ray, the auth mode its clients use, and a private local Ray head.

Auth (RAY_NOTES §0): ``ray start --head`` turns token auth on by itself whenever a token
exists (``~/.ray/auth_token``, which any local ``ray.init()`` leaves behind), but
``ray.init(address=...)`` with an explicit address never turns it on: such a driver talks
to that head in mode ``disabled``, without the token, and every GCS call fails with
``InvalidAuthToken``. :func:`ensure_auth_env` settles ``RAY_AUTH_MODE`` in this process's
environment once, before any head starts or any client connects, so a head started from
here, its driver and every CLI/SDK client (``JobSubmissionClient``, ``serve``) agree.

A head from :func:`start_local_head` marks its environment with :data:`HEAD_MARK`; every
process it starts inherits it, workers included (they leave the head's process group), so
:func:`stop_local_head` finds them all even after the ``ray start`` process is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import psutil  # after ray: Ray ships psutil in ray/thirdparty_files and puts it on sys.path

from dynray.errors import ServingError

__all__ = [
    "AUTH_MODE_VAR",
    "HEAD_MARK",
    "connect",
    "free_port",
    "ensure_auth_env",
    "client_env",
    "LocalHead",
    "start_local_head",
    "stop_local_head",
    "head_processes",
    "gcs_reachable",
    "recorded_head",
    "read_state_file",
    "job_registry",
]

log = logging.getLogger(__name__)

AUTH_MODE_VAR = "RAY_AUTH_MODE"
HEAD_MARK = "DYNRAY_RAY_HEAD"
"""Environment variable set (to the head's temp dir) in every process of a local head."""
HEAD_START_TIMEOUT_S = 90.0
LOCAL_CPUS = 16
"""Logical CPUs of a one-node local Ray (embedded or ``dynray serve up``'s head)."""
LOCAL_RESOURCES = {"edge": 16, "cloud": 16}
"""The one local node stands in for both device tiers: it offers both tier resources."""
STOP_GRACE_S = 5.0


def connect(num_cpus: int | None = None, *, log_to_driver: bool = True) -> None:
    """Attach to ``RAY_ADDRESS`` (set inside `ray job submit`), else start a local Ray.

    ``address="local"`` ignores stale ``ray_current_cluster`` files (see RAY_NOTES §0). The
    dashboard stays on: Ray Train's placement-group cleaner polls the State API, which needs it.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ensure_auth_env()
        ray.init(log_to_driver=log_to_driver)
    else:
        # this one node stands in for both device tiers: it offers the `edge` and `cloud`
        # resources the Serve tiers are placed by (a real cluster has node types for them)
        # logical CPUs: every device replica reserves one (what the scheduler sees as its load), and
        # Ray does not check logical CPUs against cores; trials and workers are limited by their own flags
        # Serve's controller and replicas write their logs to files (the session's logs/serve/),
        # not to this terminal: with RAY_SERVE_LOG_TO_STDERR=0 a replica's stderr, dynray's own
        # warnings included, goes to its Serve log file too. The processes inherit it from here.
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        ray.init(address="local", num_cpus=max(num_cpus or 0, LOCAL_CPUS), resources=dict(LOCAL_RESOURCES), include_dashboard=True, log_to_driver=log_to_driver, logging_level="WARNING")


def job_registry():
    """Where a job reads and registers models: ``$DYNRAY_HOME`` if it is set (an explicit
    choice, e.g. ``dynray submit --env DYNRAY_HOME=…``); else the cluster's registry actor if
    this job runs on a cluster that has one (``dynray cluster up``, ``dynray serve up``); else
    the local ``./.dynray``.

    With ``RAY_ADDRESS`` set (always, inside a Ray job) it attaches to that cluster first.
    Inside a job the working directory is a temporary copy of the project, so a local
    ``./.dynray`` there would vanish with the job: that case gets a warning naming the fix.
    """
    from actors.registry import REGISTRY_ACTOR, RemoteRegistry, find_registry
    from dynray.registry import ModelRegistry, default_home

    if os.environ.get("DYNRAY_HOME"):
        return ModelRegistry()
    if os.environ.get("RAY_ADDRESS"):
        connect()
    handle = find_registry() if ray.is_initialized() else None
    if handle is not None:
        remote = RemoteRegistry(handle)
        log.info("models go to the cluster's registry at %s (through the %s actor)", remote.home, REGISTRY_ACTOR)
        return remote
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set in a Ray job's driver
        log.warning("this Ray job registers into %s, inside the job's temporary working directory, and the cluster runs no registry actor: "
                    "start the cluster with `dynray cluster up --local`, or pass --runtime-env-json '{\"env_vars\": {\"DYNRAY_HOME\": \"/abs/path\"}}'", default_home())
    return ModelRegistry()


def free_port() -> int:
    """A TCP port nothing listens on now (for a Serve HTTP port or a private Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_available() -> bool:
    """Whether Ray finds a token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # it caches the answer, and a token may have been written since
    return bool(loader.has_token(ignore_auth_mode=True))


def ensure_auth_env(mode: str | None = None, *, create_token: bool = False) -> str:
    """Settle ``RAY_AUTH_MODE`` for this process and every child it starts; returns the mode.

    An explicit ``RAY_AUTH_MODE`` in the environment always wins. Otherwise ``mode`` (the
    one a recorded head was started with) is used, else ``token`` if a token exists (what
    ``ray start --head`` would pick), else ``disabled`` (the variable then stays unset).
    ``create_token`` generates the default token first when none exists, as ``ray.init()``
    does for a new local cluster: pass it when about to start a head. Call it before ``ray.init`` and before starting
    ``ray start`` or any Ray CLI/SDK client.
    """
    from ray._private.authentication.authentication_token_setup import generate_and_save_token
    from ray._raylet import Config

    chosen = os.environ.get(AUTH_MODE_VAR) or mode
    if create_token and (chosen or "token").lower() == "token" and not _token_available():
        generate_and_save_token()
    if chosen is None:
        if not _token_available():
            return "disabled"  # what Ray assumes when unset; left unset so a later local ray.init keeps its default
        chosen = "token"
    if os.environ.get(AUTH_MODE_VAR) != chosen:
        os.environ[AUTH_MODE_VAR] = chosen
        Config.initialize("")  # Ray caches its config at import; re-read it, as Ray's own _enable_token_auth does
    return chosen.lower()


def client_env(*, mode: str | None = None, create_token: bool = False, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a Ray child process (``ray start``, ``serve``, ``ray job``) that
    agrees with this process on auth, with this interpreter's bin dir first on PATH (so the
    head's ``python`` is this venv's, RAY_NOTES §7)."""
    ensure_auth_env(mode, create_token=create_token)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class LocalHead:
    """A ``ray start --head --block`` process this host runs for one client (``dynray serve up``)."""

    pid: int
    """PID of the ``ray start`` process (leader of the head's process group)."""
    address: str
    """GCS address, HOST:PORT."""
    dashboard: str
    """Dashboard URL."""
    temp_dir: str
    """The head's ``--temp-dir`` (sessions, logs, ``head.log``); removed when it stops."""
    auth_mode: str
    """RAY_AUTH_MODE the head and its clients use."""

    def to_state(self) -> dict:
        d = asdict(self)
        d["head_pid"] = d.pop("pid")
        return d


def _wait_listening(port: int, head: subprocess.Popen, until: float) -> bool:
    while time.monotonic() < until:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if head.poll() is not None:
                return False
            time.sleep(0.5)
    return False


def start_local_head(resources: Mapping[str, float], *, cwd: str | Path, num_cpus: float = LOCAL_CPUS, timeout_s: float = HEAD_START_TIMEOUT_S,
                     autoscaling_config: str | Path | None = None, extra_env: Mapping[str, str | None] | None = None, gcs_port: int | None = None,
                     temp_dir: str | None = None) -> LocalHead:
    """Start a private Ray head in its own session, every port picked free; wait until it serves.

    It outlives this process (stop it with :func:`stop_local_head`). SIGTERM does not make it
    drain for 30 s first (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``): nothing else routes to
    this one node. If it does not come up, it is stopped and :class:`ServingError` raised.

    ``autoscaling_config`` makes it an autoscaling head (its monitor launches the config's
    node types); ``gcs_port`` and ``temp_dir`` fix what that config must name in advance.
    """
    dash, agent, agent_grpc, metrics, rt_env, client = (free_port() for _ in range(6))
    gcs = gcs_port or free_port()
    tmp = temp_dir or tempfile.mkdtemp(prefix="dynray-ray-", dir="/tmp")  # unix socket paths must stay short
    env = client_env(create_token=True, extra={HEAD_MARK: tmp, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH")) if p)  # import paths of the Serve config
    # loopback: the job API (the dashboard, which runs code for whoever reaches it) listens on
    # 127.0.0.1 only, and every address the head advertises is 127.0.0.1. Ray 2.60 still opens
    # its GCS and raylet ports on all interfaces (no flag binds them); token auth guards those
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--resources={json.dumps(dict(resources))}", f"--temp-dir={tmp}", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--ray-client-server-port={client}", "--disable-usage-stats",
           f"--num-cpus={num_cpus:g}"]
    if autoscaling_config is not None:
        cmd.append(f"--autoscaling-config={autoscaling_config}")
    for k, v in (extra_env or {}).items():  # None: leave the variable out of the head's environment
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    log_path = Path(tmp) / "head.log"
    with open(log_path, "w") as logf:  # the child keeps its own descriptor
        head = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(cwd))
    until = time.monotonic() + timeout_s
    try:
        if not (_wait_listening(gcs, head, until) and _wait_listening(dash, head, until)):
            tail = log_path.read_text()[-500:] if log_path.exists() else ""
            raise ServingError("could not start a local Ray head", got=tail, fix="pass --address of a running cluster, or read the Ray log above")
        return LocalHead(pid=head.pid, address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", temp_dir=tmp, auth_mode=env.get(AUTH_MODE_VAR, "disabled"))
    except BaseException:  # Ctrl-C too: the head runs in its own session and would outlive us
        stop_local_head(head.pid, tmp)
        raise


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _started_by_ray_start(pid: int, temp_dir: str) -> bool:
    """Whether ``pid`` is the ``ray start --temp-dir=temp_dir`` process (heads from before the mark)."""
    try:
        cmd = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "start" in cmd and f"--temp-dir={temp_dir}" in cmd


def head_processes(temp_dir: str, pid: int | None = None) -> list[psutil.Process]:
    """Every live process of the head with this temp dir: those carrying :data:`HEAD_MARK`,
    and, when ``pid`` is that head's ``ray start``, the members of its process group."""
    group = pid if pid is not None and _started_by_ray_start(pid, temp_dir) else None
    found = []
    for p in psutil.process_iter():
        try:
            ours = p.environ().get(HEAD_MARK) == temp_dir or (group is not None and os.getpgid(p.pid) == group)
            if ours and _alive(p):
                found.append(p)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    return found


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _wait_gone(temp_dir: str, pid: int | None, seconds: float) -> list[psutil.Process]:
    until = time.monotonic() + seconds
    while (left := head_processes(temp_dir, pid)) and time.monotonic() < until:
        time.sleep(0.1)
    return left


def stop_local_head(pid: int | None, temp_dir: str | None, *, grace_s: float = STOP_GRACE_S) -> bool:
    """Stop a head from :func:`start_local_head` and remove its temp dir; True if any of it ran.

    SIGTERM to its process group and every other process of it (:func:`head_processes`),
    ``grace_s`` to exit, then SIGKILL to what is left. Only the head's own processes are
    signalled, so a recycled PID is never hit. Safe on a head already dead or half dead.
    """
    if not temp_dir:
        return False
    procs = head_processes(temp_dir, pid)
    if procs:
        leader = next((p for p in procs if p.pid == pid), None)
        if leader is not None:
            with contextlib.suppress(OSError):
                os.killpg(leader.pid, signal.SIGTERM)
        _signal_all(procs, signal.SIGTERM)
        left = _wait_gone(temp_dir, pid, grace_s)
        if left:
            _signal_all(left, signal.SIGKILL)
            if left := _wait_gone(temp_dir, pid, 5.0):
                raise ServingError("the local Ray head's processes did not exit", got=[p.pid for p in left], fix=f"kill them by PID, then delete {temp_dir}")
    shutil.rmtree(temp_dir, ignore_errors=True)
    return bool(procs)


def read_state_file(path: Path, what: str) -> dict:
    """A recorded head's JSON state (``{}`` if the file is absent)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ServingError(f"the {what} state file is not JSON", got=f"{path}: {e}", fix=f"stop what it names by hand, then delete {path}") from None


def recorded_head(state: Mapping) -> tuple[bool, str]:
    """(running, what was found) for a head recorded as ``{head_pid, temp_dir, address}``."""
    pid, tmp = state.get("head_pid"), state.get("temp_dir")
    procs = {p.pid for p in head_processes(tmp, pid)} if tmp else set()
    if not procs:
        return False, f"the recorded Ray head (pid {pid}) was not running"
    if pid not in procs or not gcs_reachable(state.get("address", "")):
        return False, f"the recorded Ray head (pid {pid}) was broken (GCS at {state.get('address')} not answering, {len(procs)} processes left)"
    return True, f"the Ray head (pid {pid}) is running at {state.get('address')}"


def gcs_reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether something listens at a ``HOST:PORT`` GCS address (other forms: assumed yes)."""
    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return True
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False
