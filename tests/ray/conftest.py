"""The dynray Serve app that tests/ray/test_serving.py drives over HTTP, deployed once per module."""

from __future__ import annotations

import pytest
import requests
import torch

from actors.keystore import find_keystore
from actors.ratelimiter import RATELIMITER_ACTOR
from actors.registry import REGISTRY_ACTOR, find_registry
from dynray.data import load_dataset
from dynray.models import DynamicNetConfig, build
from dynray.pipeline import drift_reference
from dynray.registry import ModelRegistry
from dynray.routing.features import obs_dim
from dynray.routing.policy import PolicyNet, save_policy
from dynray.security.keys import KeyStore
from dynray.store import save_model
from dynray.thresholds import ThresholdRule
from jobs._ray import free_port


def _register(reg: ModelRegistry, seed: int, train_images: torch.Tensor) -> str:
    """A small random model with fitted complexity and a rule that stops about half the
    samples at each exit, so all three paths (exit 0, exit 1, cloud) are exercised."""
    torch.manual_seed(seed)
    model = build(DynamicNetConfig(widths=(8, 8, 16), layers=(1, 1, 1), exit_hidden=16)).eval()
    model.complexity.fit(train_images)
    with torch.no_grad():
        outs = model(train_images[:512])
        cx = model.complexity(train_images[:512])
    base = ThresholdRule(thresholds=(0.0, 0.0), complexity_weight=0.1)
    taus = tuple(float(base.score(k, outs[k], cx).median()) for k in range(2))
    rule = ThresholdRule(thresholds=taus, complexity_weight=0.1)
    # v1 has a drift reference, as calibration saves one; v2 does not, as a version from before drift detection
    extra = {"drift_reference": drift_reference(model, rule, load_dataset("mnist-5k", "val")).to_dict()} if seed == 1 else None
    info = save_model(reg, "srv", model, dataset="mnist-5k", rule=rule, metrics={}, extra=extra)
    return info.ref


def _register_stop_policy(reg: ModelRegistry, ref: str) -> None:
    """A router for ``ref`` that is sure every sample should stop at the first exit, so its
    answers are easy to tell from the thresholds' (which send samples to every exit)."""
    info = reg.resolve(ref)
    net = PolicyNet([obs_dim(3), 8, 3])
    with torch.no_grad():
        for lin in net.linears():
            lin.weight.zero_()
            lin.bias.zero_()
        net.linears()[-1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # p(stop) = 0.987
    save_policy(reg, info, net, {"costs": None, "note": "test policy"})


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from actors import serve_apps as D

    home = tmp_path_factory.mktemp("serve-home")
    reg = ModelRegistry(home)
    train = load_dataset("mnist-5k", "train").images
    v1, v2 = _register(reg, 1, train), _register(reg, 2, train)
    _register_stop_policy(reg, v1)
    port = free_port()
    cfg = D.load_config()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    # the replicas get every model through the registry actor (which serves `home`): their own
    # DYNRAY_HOME and user_config home point to an empty directory, as on a node with no shared disk
    empty = tmp_path_factory.mktemp("empty-home")
    app["args"].update(home=str(home), registry=REGISTRY_ACTOR, models=[v1], failover={**app["args"]["failover"], "breaker_cooldown_ms": 3000}, edge={**app["args"]["edge"], "min_replicas": 2, "max_replicas": 2}, cloud={**app["args"]["cloud"], "min_replicas": 1, "max_replicas": 1},
                       drift={"on_alarm": "recalibrate"})  # a drift alarm submits the calibration job (checked by the metrics test)
    app["runtime_env"] = {"env_vars": {"DYNRAY_HOME": str(empty)}}
    for d in app["deployments"]:
        d["user_config"] = {**d["user_config"], "models": [v1], "home": str(empty)}
    D.deploy(cfg, timeout_s=180)  # auth on, as shipped: every call below sends a key
    store = KeyStore.at_home(home)
    key, rec = store.create("test-serving", scopes=["predict"], rate_per_s=100_000)
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    state = {"cfg": cfg, "url": f"http://127.0.0.1:{port}", "port": port, "home": home, "empty": empty, "v1": v1, "v2": v2,
             "store": store, "key": key, "key_id": rec.id, "http": http}
    yield state
    D.shutdown()
    for actor in (find_registry(), find_keystore(), ray_session.get_actor(RATELIMITER_ACTOR, namespace="dynray")):
        ray_session.kill(actor)


