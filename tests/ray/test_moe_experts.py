"""MoE experts as Ray actors and as Serve deployments: equal outputs, and failover when one dies."""

from __future__ import annotations

import time

import pytest
import requests
import torch

from actors.expert import attach_remote_experts, spawn_expert_actors
from dynray.data import load_dataset
from dynray.models import DynamicNetConfig, StopAtExit, build
from dynray.models.moe import ExpertReplies, LocalExperts, MoEConfig
from dynray.serving.payload import encode_array
from dynray.registry import ModelRegistry
from dynray.store import load_model, save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def moe_home(tmp_path_factory):
    """A registry with a small MoE model whose gates spread the samples over all 4 experts."""
    home = tmp_path_factory.mktemp("moe-home")
    torch.manual_seed(0)
    model = build(DynamicNetConfig(widths=(8, 8, 16), layers=(1, 1, 1), exit_hidden=16, moe=MoEConfig(stages=(2,), expert_ratio=0.5))).eval()
    model.complexity.fit(load_dataset("mnist-5k", "train").images[:512])
    for b in model.moe_blocks():
        torch.nn.init.normal_(b.gate.w_expert.weight, std=3.0)
    info = save_model(ModelRegistry(home), "moe-test", model, dataset="mnist-5k", rule=ThresholdRule(thresholds=(0.9, 0.9)), metrics={})
    return home, info.ref


@pytest.fixture(scope="module")
def x_test():
    return load_dataset("mnist-5k", "test").images[:96]


class _DeadExperts:
    """Local experts where the listed ones never answer (the reference for a dead actor)."""

    def __init__(self, experts, dead):
        self.local, self.dead = LocalExperts(experts), set(dead)

    def run(self, block, batches):
        live = {e: x for e, x in batches.items() if e not in self.dead}
        return ExpertReplies(outputs=self.local.run(block, live).outputs, failed=frozenset(set(batches) & self.dead))


def test_actor_parallel_experts_equal_local_and_failover_answers_everyone(ray_session, moe_home, x_test):
    import ray

    home, ref = moe_home
    local = load_model(ModelRegistry(home), ref).model
    remote = load_model(ModelRegistry(home), ref).model
    version, hosts = spawn_expert_actors(ref, home=str(home))
    assert version == ref and len(hosts) == 4
    attach_remote_experts(remote, version, hosts, timeout_s=10.0)
    want = local.forward_exits(x_test, StopAtExit(-1))
    got = remote.forward_exits(x_test, StopAtExit(-1))
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    assert torch.equal(got.macs, want.macs) and not got.rerouted.any()
    # one batched call per expert that received tokens, and every expert got some
    calls = [ray.get(h.stats.remote())["calls"] for h in hosts]
    assert calls == [1, 1, 1, 1]

    # the least-used expert dies: its tokens go to the next-best expert; all answered, those flagged
    tokens = local.moe_blocks()[0].last.expert_tokens
    dead = int(torch.where(tokens > 0, tokens, tokens.max() + 1).argmin())
    ray.kill(hosts[dead])
    time.sleep(0.5)
    hit = remote.forward_exits(x_test, StopAtExit(-1))
    block = local.moe_blocks()[0]
    block.runner = _DeadExperts(block.experts, [dead])
    ref_dead = local.forward_exits(x_test, StopAtExit(-1))
    assert hit.logits.shape == (96, 10) and torch.isfinite(hit.logits).all()
    assert torch.equal(hit.rerouted, ref_dead.rerouted) and hit.rerouted.any() and not hit.rerouted.all()
    assert (hit.logits - ref_dead.logits).abs().max().item() <= 1e-5
    assert ((hit.logits - want.logits).abs().amax(dim=1) > 1e-4)[~hit.rerouted].sum() == 0  # unflagged answers unchanged


def test_expert_hosts_are_checked_against_the_model(ray_session, moe_home):
    from dynray.errors import ServingError

    home, ref = moe_home
    model = load_model(ModelRegistry(home), ref).model
    with pytest.raises(ServingError, match="fewer expert hosts"):
        attach_remote_experts(model, ref, [object()] * 2)


def _expert_series_are_exported(ray) -> None:
    """The expert replicas' series are on the node's metrics endpoint (prometheus_client's
    parser): tokens per expert, and their batch sizes and latency under tier "expert"."""
    import time

    from dynray.serving import metrics as M
    from dynray.serving.prometheus import dynray_series, parse, required_missing, scrape

    port = ray.nodes()[0]["MetricsExportPort"]
    t0 = time.monotonic()
    while required_missing(fams := parse(scrape(port)), [M.EXPERT_TOKENS]) and time.monotonic() - t0 < 30:
        time.sleep(1.0)
    series = dynray_series(fams)
    assert M.EXPERT_TOKENS in series and series[M.EXPERT_TOKENS].total() > 0, sorted(series)
    experts = {lab["expert"] for _, lab, v in series[M.EXPERT_TOKENS].samples if v > 0}
    assert len(experts) >= 2 and {M.TAG_NODE, M.TAG_VERSION} <= series[M.EXPERT_TOKENS].labels(), experts
    for name in (M.BATCH_SIZE, M.REPLICA_LATENCY_MS):
        assert any(lab.get("tier") == "expert" and n.endswith("_count") and v > 0 for n, lab, v in series[name].samples), name


def test_serve_graph_with_remote_experts(ray_session, moe_home, x_test):
    """cluster/serve.yaml with experts.count = 4: answers equal the offline model's; an expert
    replica killed mid-traffic loses no request, and its tokens really are failed over: the
    answers right after the kill equal the offline model with that expert dead, flagged."""
    import ray
    from actors import serve_apps as D

    home, ref = moe_home
    port = free_port()
    cfg = D.load_config()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    app["args"].update(
        home=str(home), models=[ref], auth={"enabled": False}, experts={"count": 4, "timeout_ms": 2000},
        # the cloud call (where the MoE stage runs) outlasts an expert timeout, so a dead expert
        # shows as rerouted tokens, not as a cloud timeout; a slow health check keeps the killed
        # expert dead (not yet replaced) while the answers after the kill are checked
        failover={**app["args"]["failover"], "cloud_timeout_ms": 6000, "deadline_ms": 12000, "health_check_period_s": 10.0},
        edge={**app["args"]["edge"], "min_replicas": 1, "max_replicas": 1}, cloud={**app["args"]["cloud"], "min_replicas": 1, "max_replicas": 1},
        ingress={**app["args"]["ingress"], "replicas": 1},  # the experts are under test: one ingress (and no routing state) saves two replica starts
    )
    args = D.AppArgs.model_validate(app["args"])
    cfg["applications"][0] = D.app_config(args, name=app["name"], route_prefix=app["route_prefix"])
    D.deploy(cfg, timeout_s=180)
    try:
        url = f"http://127.0.0.1:{port}/v1/predict"
        sm = load_model(ModelRegistry(home), ref)
        offline = sm.model.forward_exits(x_test, sm.rule)
        requests.post(url, json=encode_array(x_test[:8]), timeout=60)  # warm the expert handles
        body = requests.post(url, json=encode_array(x_test), timeout=60).json()
        assert body["exit"] == offline.exit_index.tolist() and 2 in body["exit"]
        assert body["predictions"] == offline.logits.argmax(1).tolist()
        assert not body["degraded"] and not any(body["expert_rerouted"])
        # the reference: the offline model with Expert1 dead
        dead = load_model(ModelRegistry(home), ref)
        block = dead.model.moe_blocks()[0]
        block.runner = _DeadExperts(block.experts, [1])
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Expert1" in a["name"]]
        assert names, "no Expert1 replica found"
        ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
        batches = [x_test[i * 8 : (i + 1) * 8] for i in range(4)]
        answers = [requests.post(url, json=encode_array(xb), timeout=60) for xb in batches]
        assert [r.status_code for r in answers] == [200] * 4
        for k, (r, xb) in enumerate(zip(answers, batches, strict=True)):
            b = r.json()
            want_dead = dead.model.forward_exits(xb, dead.rule)
            want_live = sm.model.forward_exits(xb, sm.rule)
            rerouted = torch.tensor(b["expert_rerouted"])
            assert len(b["predictions"]) == 8 and all(len(p) == 10 for p in b["probabilities"])
            assert b["degraded"] == bool(rerouted.any())  # a rerouted answer is flagged, and only that
            if k < 2 or rerouted.any():  # right after the kill Expert1 is surely still dead
                assert want_dead.rerouted.any(), "the batch sends no token to Expert1: pick other samples"
                assert torch.equal(rerouted, want_dead.rerouted), (k, rerouted, want_dead.rerouted)
                assert b["predictions"] == want_dead.logits.argmax(1).tolist() and b["exit"] == want_dead.exit_index.tolist()
            else:  # replaced meanwhile: the live model again
                assert b["predictions"] == want_live.logits.argmax(1).tolist()
        _expert_series_are_exported(ray)
    finally:
        D.delete_apps([app["name"]])
        D.shutdown()
