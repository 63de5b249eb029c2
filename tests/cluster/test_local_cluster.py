"""A real local cluster: `dynray cluster up --local` (the fake multi-node autoscaler), `serve up`
on it, nodes that come for the replicas and leave after the idle timeout, a job through
`dynray submit` and through Ray's own `ray job submit`, and `cluster down`.

Every command runs by subprocess from a clean shell (no RAY_* variables, the venv not on
PATH unless a step needs the console script), against a temporary registry. The fake nodes
are real raylets on this machine: a node the autoscaler removes is really gone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from dynray.models import DynamicNetConfig, build
from dynray.registry import ModelRegistry
from dynray.serving.payload import encode_array
from dynray.store import save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port, psutil  # Ray ships psutil (ray/thirdparty_files); jobs._ray puts it on the path

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DYNRAY = str(BIN / "dynray")
HEAD_MARK = "DYNRAY_RAY_HEAD"


def _run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DYNRAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _status(env: dict) -> dict:
    p = _run(["cluster", "status", "--json"], env, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def _alive_types(env: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in _status(env)["nodes"]:
        if n["alive"]:
            out[n["type"]] = out.get(n["type"], 0) + 1
    return out


def _wait_for(pred, timeout_s: float, step_s: float = 1.0):
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        got = pred()
        if got:
            return got
        time.sleep(step_s)
    return pred()


def _last_json(stdout: str) -> dict:
    """The script's JSON line: the last line that is a JSON object (a raylet's log line can
    land on the driver's stdout after it, as once in CI)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the script's output: {stdout[-2000:]}")


def _head_procs(temp_dir: str) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(HEAD_MARK) == temp_dir and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, clean_env):
    home = tmp_path_factory.mktemp("cluster-home")
    env = clean_env(home)
    reg = ModelRegistry(home)
    torch.manual_seed(0)
    model = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)).eval()
    model.complexity.fit(torch.rand(256, 1, 28, 28))
    # thresholds 0: every sample leaves at the first exit, so every request is an edge call (the node kill hits them)
    reg.promote(save_model(reg, "srv", model, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.0, 0.0)), metrics={}).ref, "production")
    t0 = time.monotonic()
    p = _run(["cluster", "up", "--local"], env, timeout=180)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    state = json.loads((home / "cluster.json").read_text())
    k = _run(["keys", "create", "--name", "cluster-test", "--rate", "100000"], env, timeout=60)  # `serve up` turns auth on
    assert k.returncode == 0, k.stderr[-2000:]
    yield {"env": env, "home": home, "state": state, "up_s": time.monotonic() - t0, "up_out": p.stdout, "key": k.stdout.strip().splitlines()[-1]}
    _run(["cluster", "down"], env, timeout=120)
    for pid in _head_procs(state["temp_dir"]):  # whatever `down` left (its test checks there is none)
        psutil.Process(pid).kill()


def test_up_starts_a_head_without_tier_resources_and_a_second_up_says_where_it_runs(cluster):
    assert "edge.worker" in cluster["up_out"] and "cloud.worker" in cluster["up_out"]
    nodes = _status(cluster["env"])["nodes"]
    assert [n["type"] for n in nodes if n["alive"]] == ["ray.head.default"]
    assert "edge" not in nodes[0]["total"] and "cloud" not in nodes[0]["total"]
    again = _run(["cluster", "up", "--local"], cluster["env"], timeout=60)
    assert again.returncode == 2 and "already up" in again.stderr and cluster["state"]["address"] in again.stderr, again.stderr


def test_serve_up_makes_the_autoscaler_add_edge_and_cloud_nodes_for_the_replicas(cluster):
    env, port = cluster["env"], free_port()
    t0 = time.monotonic()
    p = _run(["serve", "up", "--port", str(port)], env, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "the autoscaler adds one (edge.worker)" in p.stderr and "(cloud.worker)" in p.stderr
    cluster["serve_up_s"] = time.monotonic() - t0
    types = _alive_types(env)
    assert types.get("edge.worker", 0) >= 1 and types.get("cloud.worker") == 1, types
    st = _run(["serve", "status"], env, timeout=60)
    assert st.returncode == 0, st.stderr[-2000:]
    replicas = json.loads(st.stdout)["replicas"]
    # device replicas run where their tier's resource is, the ingress on the head
    assert {r["node_type"] for r in replicas["Edge"]} == {"edge.worker"} and len(replicas["Edge"]) == 2, replicas
    assert {r["node_type"] for r in replicas["Cloud"]} == {"cloud.worker"}, replicas
    assert {r["node_type"] for r in replicas["Ingress"]} == {"ray.head.default"}, replicas
    # the replicas on the worker nodes got the model through the registry actor on the head
    r = requests.post(f"http://127.0.0.1:{port}/v1/predict", json=encode_array(torch.rand(4, 1, 28, 28)), headers={"Authorization": f"Bearer {cluster['key']}"}, timeout=30)
    assert r.status_code == 200 and r.json()["model_version"] == "srv:v1", r.text
    # the ingress replicas verify keys through the key-store actor on the head
    assert requests.post(f"http://127.0.0.1:{port}/v1/predict", json=encode_array(torch.rand(1, 1, 28, 28)), timeout=30).status_code == 401


NODE_KILL = """
import json, sys
import ray
from dynray.data import load_dataset
from jobs._ray import ensure_auth_env
from jobs.cluster_chaos import kill_node_under_load
from jobs.serve_chaos import ChaosConfig
address, auth, url, key = sys.argv[1:5]
ensure_auth_env(auth)
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
images = (load_dataset("mnist-5k", "test").images[:64].numpy() * 255).astype("uint8")
res, node = kill_node_under_load(ChaosConfig(url=url, requests=400, concurrency=4, kill_after_s=1.0, recovery_timeout_s=90, retries=1, api_key=key), images, address=address)
print(json.dumps({**res.to_dict(), "node": node.__dict__}))
"""


def test_killing_an_edge_nodes_raylet_under_load_loses_no_request_and_the_node_is_replaced(cluster):
    """The edge replicas' node dies for real (SIGKILL to its raylet): the ingress fails over
    to the cloud tier meanwhile, and the autoscaler brings a new edge node for the replicas."""
    env, state = {**cluster["env"], "PATH": f"{BIN}:/usr/bin:/bin"}, cluster["state"]
    url = json.loads(_run(["serve", "status"], cluster["env"], timeout=60).stdout)["url"] + "/v1/predict"
    p = subprocess.run([sys.executable, "-c", NODE_KILL, state["address"], state["auth_mode"], url, cluster["key"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    out = _last_json(p.stdout)
    print("node kill:", {k: out[k] for k in ("requests", "answered", "answered_no_retry", "errors", "recovery_s", "answered_by_tier", "node")})
    assert out["kills_during_load"] and out["node"]["replicas_on_it"] >= 1, out
    # with one client retry every request is answered; at the first try a few requests in
    # flight on the dying node can fail (0 and 4 of 400 in two runs here)
    assert out["answered"] == out["requests"] == 400 and out["errors"] == 0, json.dumps(out)
    assert out["answered_no_retry"] >= 380, json.dumps(out)
    # every sample of this model leaves at the edge's first exit: answers from the cloud are
    # the ones the ingress sent there while the edge node was gone
    assert out["answered_by_tier"].get("cloud", 0) > 0 and out["answered_by_tier"].get("edge", 0) > 0, json.dumps(out)
    assert out["node"]["node_replaced_s"] is not None and out["recovery_s"] <= 90, out
    types = _alive_types(cluster["env"])
    assert types.get("edge.worker", 0) >= 1, types
    # the edge tier (autoscaling 2..4) may hold a third replica for a while after the burst of
    # failovers (seen once in CI): what must hold is that none is left on the dead node
    def moved():
        reps = json.loads(_run(["serve", "status"], cluster["env"], timeout=60).stdout)["replicas"]
        return reps if len(reps["Edge"]) >= 2 and out["node"]["node_id"] not in {r["node_id"] for r in reps["Edge"]} else None
    assert _wait_for(moved, 60, step_s=2), json.loads(_run(["serve", "status"], cluster["env"], timeout=60).stdout)["replicas"]


AUTOSCALE = """
import json, sys
import ray
from dynray.bench.serve import wire_images
from dynray.data import load_dataset
from jobs._ray import ensure_auth_env
from jobs.bench_cluster import BurstConfig, Sampler, burst_autoscale
address, auth, url, serve_json, idle, key = sys.argv[1:7]
ensure_auth_env(auth)
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
images = wire_images(load_dataset("mnist-5k", "test"))[:64]
sampler = Sampler("dynray", every_s=0.5).start()
served = json.loads(open(serve_json).read())
cfg = BurstConfig(url=url, replicas_max=3, concurrency=16, timeout_s=90, settle_nodes=1, wait_nodes_down=True, idle_timeout_s=float(idle), api_key=key)
out = burst_autoscale(cfg, served["config"], images, sampler)
sampler.stop()
print(json.dumps(out))
"""


def test_serve_replica_autoscaling_follows_a_burst_and_drives_node_scaling_up_and_down(cluster):
    """The edge tier autoscales 1..3 replicas; one edge node holds 2, so the burst's third
    replica makes the autoscaler add an edge node, which leaves after the burst (idle timeout)."""
    env, state = {**cluster["env"], "PATH": f"{BIN}:/usr/bin:/bin"}, cluster["state"]
    url = json.loads(_run(["serve", "status"], cluster["env"], timeout=60).stdout)["url"] + "/v1/predict"
    p = subprocess.run([sys.executable, "-c", AUTOSCALE, state["address"], state["auth_mode"], url, str(cluster["home"] / "serve.json"), str(state["spec"]["idle_timeout_s"]), cluster["key"]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    a = _last_json(p.stdout)
    print("autoscale:", a)
    assert (a["replicas_start"], a["replicas_peak"], a["nodes_start"], a["nodes_peak"]) == (1, 3, 1, 2), a
    assert a["up_s"] is not None and a["down_s"] is not None, a
    # on CI's 2 cores, nodes starting under the burst can push a few requests past the 3 s
    # deadline (2 of 448 once): those may only be shed as 503 + Retry-After, never a 500 or a drop
    assert set(a["burst_status"]) <= {"200", "503"} and a["burst_errors"] <= 0.02 * a["burst_requests"], a
    assert a["nodes_down_s"] is not None and a["nodes_end"] == 1, a  # the burst's node left once idle


def test_serve_down_lets_the_worker_nodes_go_after_the_idle_timeout(cluster):
    env = cluster["env"]
    p = _run(["serve", "down"], env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    idle_s = cluster["state"]["spec"]["idle_timeout_s"]
    t0 = time.monotonic()
    left = _wait_for(lambda: _alive_types(env) == {"ray.head.default": 1}, idle_s + 60, step_s=2)
    assert left, _alive_types(env)
    assert time.monotonic() - t0 <= idle_s + 60


def test_dynray_submit_runs_a_train_job_and_the_model_shows_in_models_list(cluster):
    """No --address: the job goes to the cluster `cluster up` recorded; the model it trains
    reaches the registry on the head through the registry actor (the job's own working dir
    is a temporary copy that vanishes)."""
    env = {**cluster["env"], "PATH": f"{BIN}:/usr/bin:/bin"}  # `python` in the entrypoint resolves on the head's PATH; the client needs none
    p = subprocess.run([DYNRAY, "submit", "train", "--", "--epochs", "1", "--workers", "1", "--name", "submitted"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "SUCCEEDED" in p.stdout and "registered submitted:v1" in p.stdout, p.stdout[-2000:]
    listed = _run(["models", "list"], cluster["env"], timeout=60)
    assert re.search(r"^submitted:v1\s", listed.stdout, re.M), listed.stdout


def test_ray_job_submit_with_rays_own_cli_registers_into_the_head_registry(cluster):
    env = {**cluster["env"], "PATH": f"{BIN}:/usr/bin:/bin", "RAY_AUTH_MODE": cluster["state"]["auth_mode"]}
    p = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["state"]["dashboard"], "--working-dir", ".",
                        "--runtime-env-json", json.dumps({"excludes": [".venv", ".dynray", ".git", "out"]}), "--",
                        "python", "-m", "jobs.calibrate", "--model", "submitted:v1", "--max-drop", "0.05"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    refs = [i.ref for i in ModelRegistry(cluster["home"]).list("submitted")]
    assert refs == ["submitted:v1", "submitted:v2"], refs  # the calibrated child landed on the head


def test_a_failing_job_exits_non_zero_with_its_last_log_lines(cluster):
    p = _run(["submit", "calibrate", "--", "--model", "no-such-model", "--max-drop", "0.05"], {**cluster["env"], "PATH": f"{BIN}:/usr/bin:/bin"}, timeout=300)
    assert p.returncode == 1, (p.stdout + p.stderr)[-3000:]
    assert "FAILED" in p.stderr and "last" in p.stderr and "no-such-model" in p.stderr, p.stderr[-2000:]


def test_the_job_api_listens_on_loopback_and_refuses_a_submission_without_the_cluster_token(cluster, tmp_path):
    """The job-submission API runs any entrypoint for whoever reaches it: no token, no job."""
    dash, marker = cluster["state"]["dashboard"], tmp_path / "pwned"
    port = int(dash.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening
    job = {"entrypoint": f"touch {marker}"}
    anon = requests.post(f"{dash}/api/jobs/", json=job, timeout=30)
    wrong = requests.post(f"{dash}/api/jobs/", json=job, headers={"Authorization": "Bearer not-the-token"}, timeout=30)
    assert (anon.status_code, wrong.status_code) == (401, 403), (anon.text, wrong.text)
    # Ray's own CLI from a shell that does not pass the token (no RAY_AUTH_MODE=token)
    p = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dash, "--no-wait", "--", "touch", str(marker)],
                       cwd=ROOT, env={**cluster["env"], "PATH": f"{BIN}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and ("401" in p.stdout + p.stderr or "nauthorized" in p.stdout + p.stderr), (p.stdout + p.stderr)[-2000:]
    token = (Path(cluster["env"]["HOME"]) / ".ray" / "auth_token").read_text().strip()
    ok = requests.post(f"{dash}/api/jobs/", json={"entrypoint": "true"}, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert ok.status_code == 200 and ok.json().get("job_id"), ok.text  # the refusals above were for the token, nothing else
    time.sleep(2)
    assert not marker.exists()


def test_down_stops_every_process_and_leaves_no_state(cluster):
    temp_dir = cluster["state"]["temp_dir"]
    p = _run(["cluster", "down"], cluster["env"], timeout=120)
    assert p.returncode == 0 and "stopped the cluster" in p.stdout, p.stdout + p.stderr
    assert _wait_for(lambda: not _head_procs(temp_dir), 15), _head_procs(temp_dir)
    assert not (cluster["home"] / "cluster.json").exists() and not Path(temp_dir).exists()
    again = _run(["cluster", "status"], cluster["env"], timeout=60)
    assert again.returncode == 2 and "dynray cluster up" in again.stderr
