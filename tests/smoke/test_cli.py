"""The `dynray` CLI and every `python -m jobs.*` entrypoint, run as subprocesses.

Every subprocess runs in an environment stripped the way a new user's shell is: HOME, a
PATH with the venv first, the test's DYNRAY_HOME/DYNRAY_DATA, and no RAY_* variable. The
long commands (the demo, the job entrypoints, the benches) run as one chain in one
interpreter sharing one Ray (``chain`` in conftest.py); these tests read its results.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from smoke_chain import Step  # tests/smoke is on sys.path (pytest's rootdir-less import mode)

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]
DYNRAY = str(Path(sys.executable).with_name("dynray"))


def run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(chain, out_dir) -> tuple[Step, Path]:
    return chain["demo"], out_dir / "bench.json"


def _ok(step: Step) -> Step:
    assert step.returncode == 0, f"{step.name}: rc {step.returncode}\n" + (step.stdout + step.stderr)[-3000:]
    return step


def test_demo_runs_end_to_end_on_a_small_configuration(demo):
    p, out = demo
    _ok(p)
    assert "[5/5]" in p.stdout and "MAC saving" in p.stdout
    assert "registered dynnet-mnist-5k-router:v1" in p.stdout  # step 4 trained and registered a PPO router
    # auth is on as shipped: step 5 made an API key, sent it and revoked it
    assert re.search(r"300/300 answered over HTTP with API key [0-9a-f]{12} \(made for the run, revoked after it\) by router hybrid", p.stdout), p.stdout[-2000:]
    assert "escalated to the cloud tier" in p.stdout
    core = json.loads(out.read_text())["core"]
    assert core["dataset"] == "mnist-5k" and core["n_test"] == 1000
    assert core["macs_adaptive"] < core["macs_full"]
    assert Path(core["plot"]).exists()


def test_after_the_demo_prometheus_served_every_dynray_series_with_non_zero_counts(demo):
    """The demo's last step read Ray's metrics endpoint after its traffic and operations tour
    and saved the text; parsed here with prometheus_client: every series of the graph (no
    remote experts in it) is there, non-zero, with its tags and the node tag."""
    from dynray.serving import metrics as M
    from dynray.serving.prometheus import dynray_series, parse, required_missing

    p, out = demo
    _ok(p)
    from jobs.ops_tour import REQUIRED

    fams = parse((out.parent / "metrics.prom").read_text())
    required = list(REQUIRED)
    assert set(M.SPECS) - set(required) == {M.EXPERT_TOKENS, M.FAILOVERS, M.ERRORS}  # no remote experts, no outage in the demo
    assert required_missing(fams, required) == [], p.stdout[-2000:]
    series = dynray_series(fams)
    for name in required:
        assert {M.TAG_NODE, *M.SPECS[name].tags} <= series[name].labels(), name
    assert re.search(r"drift alarms raised during the tour: [1-9]\d*", p.stdout) and "drift watch on dynnet-mnist-5k:v2: ok" in p.stdout, p.stdout[-2000:]
    assert re.search(r"cloud replica killed under load: (\d+)/\1 answered, [1-9]\d* degraded", p.stdout), p.stdout[-2000:]


def test_the_demo_wrote_the_report_pngs_from_its_run_log(demo):
    p, out = demo
    _ok(p)
    for name in ("exit_mix", "latency_tiers", "drift"):
        png = out.parent / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "wrote drift:" in p.stdout and (out.parent / "runlog.jsonl").stat().st_size > 0


def test_bench_drift_small_writes_every_contract_key(chain, out_dir):
    step = _ok(chain["bench_drift"])
    d = json.loads((out_dir / "drift.json").read_text())["drift"]
    # the smoke demo's model trained 1 epoch: only the pixel-level shift is sure to alarm within 200 requests here
    # (the three shifts and the false alarms on the real model: the README's `dynray bench drift` numbers)
    assert isinstance(d["shifts"]["inverted"]["requests_to_alarm"], int), (d["shifts"], step.stdout[-1500:])
    assert set(d["shifts"]) == {"inverted", "rotated90", "noise"} and all(len(v["per_seed"]) == 1 for v in d["shifts"].values())
    assert d["in_distribution"]["requests"] == 300 and isinstance(d["in_distribution"]["false_alarms"], int), step.stdout[-1500:]
    assert 0 < d["overhead_frac"] < 0.2 and Path(d["runlog"]).stat().st_size > 0


def test_automl_interrupted_after_calibrate_resumes_and_leaves_a_service_that_answers(chain, env):
    from conftest import AUTOML_PORT

    first, second = _ok(chain["automl_stop"]), _ok(chain["automl_resume"])
    assert "stopped after calibrate; continue with --resume --name smoke" in first.stdout, first.stdout[-2000:]
    assert "[4/7] router" not in first.stdout and "[1/7] nas" not in second.stdout and "at router" in second.stdout, second.stdout[-2000:]
    state = json.loads((Path(env["DYNRAY_HOME"]) / "automl" / "smoke" / "state.json").read_text())
    assert state["interruptions"] == 1 and all(state["steps"][s]["seconds"] is not None for s in ("nas", "train", "calibrate", "router", "register", "deploy", "check"))
    check = state["steps"]["check"]["result"]
    assert check["answered"] == check["requests"] == 200 and check["accuracy"] > 0.5, check
    assert "where the time went" in second.stdout and "wall" in second.stdout
    model = state["steps"]["register"]["result"]["model"]
    key = run([DYNRAY, "keys", "create", "--name", "automl-test"], env)
    token, kid = key.stdout.strip().splitlines()[-1], re.search(r"created key ([0-9a-f]{12})", key.stdout).group(1)
    import requests

    try:
        r = requests.post(f"http://127.0.0.1:{AUTOML_PORT}/v1/predict", json={"inputs": [[[[0.0] * 28] * 28]]}, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200 and r.json()["model_version"] == model, r.text
    finally:
        assert run([DYNRAY, "keys", "revoke", kid], env).returncode == 0  # leave no live key behind (the key-material scan checks)
    down = run([DYNRAY, "serve", "down"], env, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]


KEY_PATTERN = re.compile(rb"dk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")  # dynray.security.keys: dk_<id>_<secret>


def _secrets_found(root: Path, secrets: list[bytes]) -> list[str]:
    """Files under ``root`` holding an API key or any of ``secrets`` (as bytes)."""
    hits = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = f.read_bytes()
        if KEY_PATTERN.search(data) or any(s in data for s in secrets):
            hits.append(str(f.relative_to(root)))
    return hits


def test_after_the_demo_dynray_home_holds_no_plaintext_key_material(demo, env, tmp_path):
    """The demo made an API key and served with it (and the chain's security bench made more):
    $DYNRAY_HOME keeps digests only, and neither the pepper nor Ray's cluster token lands there."""
    _ok(demo[0])
    home = Path(env["DYNRAY_HOME"])
    from dynray.security.keys import KeyStore

    pepper_file = Path(env["HOME"]) / ".config" / "dynray" / "pepper"
    pepper_text = pepper_file.read_text().strip().encode()
    secrets = [pepper_text, base64.urlsafe_b64decode(pepper_text)]
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    if token.exists():
        secrets.append(token.read_bytes().strip())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", env["HOME"])
        listed = KeyStore.at_home(home).list()
    assert ("http-traffic", True) in [(k.name, k.revoked is not None) for k in listed], listed  # the demo's key is there, hashed, revoked
    assert all(k.revoked is not None for k in listed), listed  # so is every key the chain's benches made
    assert _secrets_found(home, secrets) == []
    # the scan itself finds what it looks for
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "log.txt").write_bytes(b"x dk_0123456789ab_" + b"A" * 43 + b" y")
    (planted / "p.bin").write_bytes(b"..." + secrets[1] + b"...")
    assert _secrets_found(planted, secrets) == ["log.txt", "p.bin"]


def _cli(args: list[str], env: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    """``dynray.cli.main`` in-process (what the console script calls), for commands that
    start no Ray: a subprocess would only add its start-up time."""
    from dynray.cli import main

    for k in ("DYNRAY_HOME", "DYNRAY_DATA"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_models_list_show_promote(demo, env, monkeypatch, capsys):
    rc, out, _ = _cli(["models", "list"], env, monkeypatch, capsys)
    assert rc == 0 and "dynnet-mnist-5k:v2" in out and "production" in out
    rc, out, _ = _cli(["models", "show", "production"], env, monkeypatch, capsys)
    meta = json.loads(out)
    assert meta["version"] == 2 and meta["parent"] == "dynnet-mnist-5k:v1" and meta["thresholds"]["thresholds"]
    rc, out, _ = _cli(["models", "promote", "dynnet-mnist-5k:v1", "staging"], env, monkeypatch, capsys)
    assert rc == 0 and "staging" in out


def test_job_entrypoints(chain, out_dir, env):
    """train (an MoE model) -> calibrate -> bench core -> bench moe, each by its job entrypoint."""
    p = _ok(chain["train_moe"])
    assert "registered jobs-smoke:v1" in p.stdout and "experts: least share" in p.stdout + p.stderr
    assert "registered jobs-smoke:v2" in _ok(chain["calibrate"]).stdout
    p = _ok(chain["bench_core"])
    out = out_dir / "b.json"
    core = json.loads(out.read_text())["core"]
    assert core["macs_adaptive"] <= 1_000_000 * 1.5
    # the static baseline, trained as a Ray task, and both frontiers
    assert [(r["width"], r["convs"], r["seed"]) for r in core["static_sweep"]] == [(2, 2, 0)] and core["static_sweep"][0]["macs"] > 0
    assert core["frontier_adaptive"] and "static CNNs (1 nets, 1 runs)" in p.stdout
    assert len(json.loads((Path(env["DYNRAY_HOME"]) / "bench" / "static-sweep.json").read_text())) == 1  # the cache a rerun reads
    _ok(chain["bench_moe"])
    m = json.loads(out.read_text())["moe"]
    assert m["model"] == "jobs-smoke:v2" and m["dense_model"] == "jobs-smoke-dense:v1" and m["seeds"] == 1
    assert m["actor_max_abs_diff"] <= 1e-5 and m["actor_rerouted"] == 0
    assert abs(m["active_macs_moe"] - m["macs_dense"]) <= 0.01 * m["macs_dense"]  # equal active MACs, by construction
    assert 0 <= m["dropped_frac"] < 0.2 and 0 < m["expert_share_min"] <= 1 / 4 + 1e-9
    assert 0 < m["accuracy_moe"] <= 1 and 0 < m["accuracy_dense"] <= 1 and isinstance(m["remote_overhead_ms"], float)
    assert "core" in json.loads(out.read_text())  # merged, not overwritten


def test_nas_bench_with_darts_through_tune(chain, out_dir, env, monkeypatch, capsys):
    """`dynray bench nas --nas-searcher darts` on a tiny budget: the DARTS supernet searched,
    discretised, trained and measured as a Tune trial; the nas section, the front PNG and a
    registered config (the evolutionary and random searchers run in tests/ray)."""
    p = _ok(chain["bench_nas"])
    n = json.loads((out_dir / "nas_run" / "b.json").read_text())["nas"]
    assert n["searcher"] == "darts" and n["trials"] == 1 and n["status_counts"]["completed"] == 1 and len(n["front"]) == 1
    assert {"minutes", "asha_stopped_frac", "predictor_spearman", "dominates_default"} <= set(n)
    assert Path(n["files"]["front"]).exists() and Path(n["files"]["table"]).parent == out_dir / "nas_run" / "nas"
    assert "Pareto front" in p.stdout and "registered: nas-mnist-5k:v1" in p.stdout
    meta = json.loads(_cli(["models", "show", "nas-mnist-5k:v1"], env, monkeypatch, capsys)[1])
    assert meta["nas"]["searcher"] == "darts" and meta["thresholds"]["thresholds"]


def test_finetune_registers_a_child(chain, env, monkeypatch, capsys):
    _ok(chain["finetune"])
    meta = json.loads(_cli(["models", "show", "ft"], env, monkeypatch, capsys)[1])
    assert meta["parent"] == "dynnet-mnist-5k:v2" and meta["training"]["finetune"]["gradual"] is True


def test_compress_int8_registers_a_smaller_child_that_loads(chain, env, monkeypatch, capsys):
    p = _ok(chain["compress_int8"])
    assert "registered dynnet-mnist-5k-int8:v1 (int8 variant of dynnet-mnist-5k:v2)" in p.stdout
    meta = json.loads(_cli(["models", "show", "dynnet-mnist-5k-int8:v1"], env, monkeypatch, capsys)[1])
    c = meta["compression"]
    assert meta["parent"] == "dynnet-mnist-5k:v2" and meta["weights_format"].startswith("int8") and c["calib_samples"] == 128
    assert c["parent_stats"]["size_bytes"] >= 2 * c["size_bytes"] and meta["thresholds"]["thresholds"] and meta["calibration"]["target"]
    assert c["accuracy"] >= c["parent_stats"]["accuracy"] - 0.02  # a 1-epoch model: a loose bound; the bench measures the real one
    monkeypatch.setenv("DYNRAY_HOME", env["DYNRAY_HOME"])
    import torch

    from dynray.registry import ModelRegistry
    from dynray.store import load_model

    assert load_model(ModelRegistry(), "dynnet-mnist-5k-int8:v1").model.forward_full(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_gan_registers_a_generator_whose_samples_train_a_model(chain, out_dir, env, monkeypatch, capsys):
    """`dynray gan` registers cgan-mnist-5k with its quality check and grid; `dynray train
    --synthetic` adds its samples to 10% of the digits; `dynray bench gan` writes the section."""
    p = _ok(chain["gan"])
    assert "registered cgan-mnist-5k:v1: trained on 350 real images" in p.stdout and "labels" in p.stdout
    meta = json.loads(_cli(["models", "show", "cgan-mnist-5k:v1"], env, monkeypatch, capsys)[1])
    assert meta["kind"] == "cgan" and meta["train_images"] == 350 and meta["gan_config"]["steps"] == 60
    q = meta["quality"]
    assert q["judge"] == "dynnet-mnist-5k:v2" and 0 <= q["sample_accuracy"] <= 1 and q["samples"] == 100
    assert (Path(env["DYNRAY_HOME"]) / "gan" / "cgan-mnist-5k-v1.png").read_bytes()[:4] == b"\x89PNG"
    _ok(chain["train_synthetic"])
    meta = json.loads(_cli(["models", "show", "syn"], env, monkeypatch, capsys)[1])
    assert meta["synthetic"] == {"images": 200, "generator": "cgan-mnist-5k:v1"} and meta["training"]["train_fraction"] == 0.1
    _ok(chain["bench_gan"])
    g = json.loads((out_dir / "gan.json").read_text())["gan"]
    assert {"accuracy_10pct_real", "accuracy_10pct_plus_synthetic", "sample_accuracy", "worst_gain", "per_seed"} <= set(g)
    assert g["per_seed"][0]["real_images"] == 350 and g["per_seed"][0]["synthetic_images"] == 100 and g["judge"] == "dynnet-mnist-5k:v2"
    assert Path(g["grid"]).read_bytes()[:4] == b"\x89PNG"


def _models(env: dict) -> list[str]:
    return sorted(p.name for p in (Path(env["DYNRAY_HOME"]) / "models").glob("*/v*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--dataset", "mnist5k", "--epochs", "1"], "did you mean mnist-5k"),
        (["train", "--dataset", "cifar10", "--epochs", "1"], "DYNRAY_DOWNLOAD"),
        (["bench", "core", "--model", "nosuch", "--json", "x.json"], "unknown model"),
        (["bench", "core", "--model", "dynnet-mnist-5k:v9", "--json", "x.json"], "unknown version"),
        (["calibrate", "--model", "dynnet-mnist-5k:v1", "--macs-budget", "10"], "MAC budget"),
        (["calibrate", "--model", "dynnet-mnist-5k:v1", "--max-drop", "-1"], "impossible"),
        (["bench", "gann", "--json", "x.json"], "did you mean gan"),
        (["bench", "gan", "--fraction", "1.5", "--json", "x.json"], "the real fraction must lie in (0, 1)"),
        (["gan", "--steps", "0"], "steps, batch_size, latent and width must be >= 1"),
        (["gan", "--fraction", "0"], "the training fraction must lie in (0, 1]"),
        (["train", "--synthetic", "-5"], "--synthetic must be >= 0"),
        (["train", "--synthetic", "100", "--gan", "nosuch", "--epochs", "1"], "--synthetic needs a cGAN generator"),
        (["train", "--train-fraction", "0", "--epochs", "1"], "train_fraction must lie in (0, 1]"),
        (["bench", "drift", "--model", "dynnet-mnist-5k:v1", "--json", "x.json"], "no drift reference"),
        (["automl", "--budget-minutes", "1"], "give --budget-minutes 5.2 or more"),
        (["automl", "--resume", "--name", "nosuch"], "no AutoML run to resume"),
        (["report", "--runlog", "no-such-runlog.jsonl"], "no run log at this path"),
        (["bench", "security", "--json", "x.json", "--seeds"], "--seeds"),
        (["bench", "core", "--json", "x.json", "--bogus", "1"], "Unrecognized options: --bogus"),
        (["train", "--epochs", "many"], "--epochs"),
        (["frobnicate"], "unknown command"),
        (["submit", "train", "--", "--epochs", "1"], "no cluster to submit to"),
        (["submit", "trian", "--address", "http://127.0.0.1:1"], "did you mean train"),
        (["submit", "train", "--address", "http://127.0.0.1:1", "--", "--epochs", "x"], "--epochs"),
        (["models", "promote", "dynnet-mnist-5k:v1"], "promote needs a model and a stage"),
        (["router", "fly"], "needs an action"),
        (["router", "train", "--model", "nosuch"], "unknown model"),
        (["bench", "router", "--model", "dynnet-mnist-5k:v7", "--json", "x.json"], "unknown version"),
        (["train", "--arch", "moe", "--top-k", "5", "--epochs", "1"], "top_k is larger than the experts"),
        (["train", "--arch", "moe", "--experts", "6", "--groups", "4", "--epochs", "1"], "groups must divide num_experts"),
        (["train", "--arch", "moe", "--capacity-factor", "0", "--epochs", "1"], "capacity factors must be > 0"),
        (["bench", "moe", "--model", "dynnet-mnist-5k:v2", "--json", "x.json"], "needs a model with MoE stages"),
        (["nas", "run", "--time-budget", "0"], "time budget must be a positive"),
        (["nas", "run", "--searcher", "evolutoin"], "did you mean evolution"),
        (["nas", "run", "--trials", "0"], "at least one trial"),
        (["bench", "router", "--shift-requests", "5", "--json", "x.json"], "--shift-requests must be at least 100"),
        (["demo", "--http-limit", "0"], "--http-limit must be at least 1 image"),
        (["compress", "int8", "--model", "nosuch"], "unknown model"),
        (["compress", "int8", "--calib-samples", "0"], "the calibration set is empty"),
        (["compress", "prune", "--ratio", "1.5"], "the pruning ratio must be in (0, 1)"),
        (["federated", "--clients", "2", "--secure-agg"], "fewer clients than the secure-aggregation threshold"),
        (["federated", "--secure-agg", "--kind", "topk"], "a compressed update cannot be masked"),
        (["federated", "--drop-client", "7"], "name no client and round"),
        (["bench", "federated", "--kind", "dense", "--json", "x.json"], "--kind must name a compressing codec"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(demo, env, args, message, monkeypatch, capsys):
    """In-process (see ``_cli``): every case fails before Ray or training starts."""
    before = _models(env)
    rc, _, err = _cli(args, env, monkeypatch, capsys)
    assert rc == 2, err[-2000:]
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _models(env) == before  # nothing half-written in the registry


@pytest.mark.parametrize("args, message", [(["train", "--dataset", "mnist5k", "--epochs", "1"], "did you mean mnist-5k"), (["nas", "run", "--time-budget", "0"], "time budget")])
def test_bad_input_through_the_console_script(env, args, message):
    p = run([DYNRAY, *args], env)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]


def test_bench_serve_small(chain, out_dir):
    _ok(chain["bench_serve"])
    out = out_dir / "serve.json"
    s = json.loads(out.read_text())["serve"]
    assert set(s["systems"]) == {"noop", "dynray", "all_cloud", "cloud_adaptive"}
    for name, m in s["systems"].items():
        assert m["errors"] == 0 and m["rps"] > 0, (name, m)
    sy = s["systems"]
    # cloud_adaptive: the early-exit net, every answer from the cloud tier, cheaper than the full net there, dearer than the edge/cloud split
    assert sy["cloud_adaptive"]["escalated_frac"] == 1.0 and sy["cloud_adaptive"]["mean_macs"] < sy["all_cloud"]["mean_macs"] / 3
    assert sy["dynray"]["cost_per_1k"] < sy["cloud_adaptive"]["cost_per_1k"] < sy["all_cloud"]["cost_per_1k"]
    assert s["ratios"]["cost_vs_cloud_adaptive"] == pytest.approx(sy["dynray"]["cost_per_1k"] / sy["cloud_adaptive"]["cost_per_1k"], abs=1e-3)
    assert s["chaos"]["answered"] == s["chaos"]["requests"] == 150 and s["chaos"]["errors"] == 0
    k = s["ingress_kill"]  # one of the two ingress replicas killed under load
    assert k["killed"] and k["kills_during_load"] and k["answered"] == k["requests"] == 150


def test_bench_security_small_writes_every_contract_key(chain, out_dir):
    p = _ok(chain["bench_security"])
    s = json.loads((out_dir / "security.json").read_text())["security"]
    for k in ("fgsm_detection_rate", "fgsm_fpr", "poison_precision", "poison_recall", "extraction_queries_to_flag", "extraction_false_flags",
              "ratelimit_error_frac", "fuzz_cases", "fuzz_5xx"):
        assert k in s, k
    assert 0 <= s["fgsm_fpr"] <= 0.2 and s["fgsm_detection_rate"] > 0.5 and s["poison_precision"] > 0.5 and s["poison_recall"] > 0.5
    assert s["fuzz_cases"] == 40 and s["fuzz_5xx"] == 0 and s["fuzz"]["healthy_after"]
    assert s["extraction_queries_to_flag"] is not None and s["extraction_false_flags"] == 0  # refused, over HTTP, by the ingress's detector
    assert s["ratelimit"]["allowed"] > 0 and s["ratelimit"]["status"].get("429", 0) > 0 and s["ratelimit_error_frac"] < 0.5
    assert Path(s["plot"]).exists() and "FGSM eps=0.1" in p.stdout


def test_bench_router_uses_the_demo_router(chain, out_dir):
    p = _ok(chain["bench_router"])
    out = out_dir / "router.json"
    assert "no router registered" not in p.stdout  # the demo's router was found, not retrained
    s = json.loads(out.read_text())["router"]
    assert s["router"] == "dynnet-mnist-5k-router:v1" and s["n_test"] == 1000
    for name in ("thresholds", "ppo", "hybrid", "oracle"):
        assert s["curves"][name] and all(0 < pt["accuracy"] <= 1 and pt["cost"] > 0 for pt in s["curves"][name])
    assert set(s["load_shift"]["slo_misses"]) == {"thresholds", "ppo", "hybrid"}
    assert set(s["equal_accuracy_cost_saving"]) == {"ppo", "hybrid"} and len(s["lambda_sweep"]) == 5
    # the safety gate: where it is shut (fitted on val), the hybrid point is its calibrated rule's point on test
    calibrated = {pt["source"]: pt for pt in s["thresholds_points"] if pt["source"].startswith("max_drop")}
    for pt in s["curves"]["hybrid"]:
        assert pt["gate"]["n"] == 500 and (pt["gate"]["open"] or (pt["policy_share"] == 0 and (pt["accuracy"], pt["cost"]) == pytest.approx((calibrated[pt["source"]]["accuracy"], calibrated[pt["source"]]["cost"]))))
    assert s["load_shift"]["hybrid_gate"]["n"] > 0
    assert isinstance(s["lambda_sweep_max_gap"], float) and 0 < s["train_minutes"] < 5
    # bounds: no router is more accurate than the oracle, none is cheaper than leaving every sample at exit 1
    top = max(pt["accuracy"] for pt in s["curves"]["oracle"])
    floor = s["costs"]["stage_macs"][0] / 1e6 * s["costs"]["edge"]["cost_per_mmac"]
    assert all(pt["accuracy"] <= top + 1e-9 and pt["cost"] >= floor - 1e-9 for name in ("thresholds", "ppo", "hybrid") for pt in s["curves"][name])
    assert Path(s["plot"]).stat().st_size > 10_000


def test_tampered_checkpoint_is_refused(demo, env, tmp_path, clean_env):
    """On a copy of the module's registry: the other tests keep their intact v1."""
    home = tmp_path / "home"
    shutil.copytree(env["DYNRAY_HOME"], home)
    env = clean_env(home)
    f = home / "models" / "dynnet-mnist-5k" / "v1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    p = run([DYNRAY, "bench", "core", "--model", "dynnet-mnist-5k:v1", "--json", "x.json"], env)
    assert p.returncode == 2 and "model.safetensors" in p.stderr and "Traceback" not in p.stderr


JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py") if not p.stem.startswith("_") and "\ndef main(" in p.read_text())  # jobs, not driver libraries
HELP = [[], ["demo"], ["train"], ["finetune"], ["calibrate"], ["bench"], *[["bench", s] for s in ("core", "serve", "router", "moe", "nas")],
        ["router", "train"], ["router", "cache"], ["router"], ["nas", "run"], ["models"], ["keys"], ["serve"], ["submit"], ["compress"], ["compress", "int8"], ["federated"], ["bench", "federated"], ["bench", "compress"], ["gan"], ["bench", "gan"]]


def test_every_job_module_runs_as_python_m_with_help(env):
    """Each `python -m jobs.X --help` through its real ``__main__`` block, in one interpreter
    (runpy runs the module as __main__, as ``python -m`` does): exit 0 and a usage line."""
    script = (
        "import contextlib, io, runpy, sys\n"
        f"for m in {JOBS!r}:\n"
        "    sys.argv = [m, '--help']; buf = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf): runpy.run_module('jobs.' + m, run_name='__main__', alter_sys=True)\n"
        "        code = 'no exit'\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    print(m, code, 'usage:' in buf.getvalue(), flush=True)\n"
    )
    p = run([sys.executable, "-c", script], env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = dict((line.split()[0], line.split()[1:]) for line in p.stdout.splitlines() if line.split() and line.split()[0] in JOBS)
    assert got == {m: ["0", "True"] for m in JOBS}, p.stdout[-3000:]


@pytest.mark.parametrize("args", HELP, ids=lambda a: " ".join(a) or "dynray")
def test_every_dynray_command_has_help(args, env, monkeypatch, capsys):
    rc, out, err = _cli([*args, "--help"], env, monkeypatch, capsys)
    assert rc == 0, err
    assert "usage:" in out and len(out.splitlines()) >= 3 or (args == ["router"] and "usage:" in out)
