"""FedAvg over real device actors: a client killed mid-round, secure aggregation, compressed bytes."""

from __future__ import annotations

import pytest

from actors.federated import DropPlan, run_federated
from dynray.federated.codec import CodecSpec, Layout, encode
from dynray.federated.server import FedConfig
from dynray.models import DynamicNetConfig, build
from dynray.training import TrainConfig

TINY = DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)


@pytest.fixture(scope="module")
def dropped_run(ray_session, mnist5k):
    """Secure aggregation, 4 clients on `edge`, client 2's actor killed while round 1 trains."""
    cfg = FedConfig(clients=4, rounds=3, local_epochs=4, secure_agg=True, secagg_threshold=3, seed=0)
    return run_federated(cfg, dataset="mnist-5k", model=TINY, recipe=TrainConfig(workers=1), test=mnist5k["test"], cpus_per_client=0.5,
                         drop=DropPlan(client=2, round=1, after_s=0.0))


def test_clients_are_placed_on_edge_resources(dropped_run):
    assert len(dropped_run.placement) == 4
    assert all(p["resources"].get("edge") == 1.0 for p in dropped_run.placement)


def test_a_client_killed_mid_round_does_not_stop_the_round(dropped_run):
    r0, r1, r2 = dropped_run.records
    assert r0.clients == [0, 1, 2, 3] and not r0.skipped
    assert r1.dropped == [2] and r1.clients == [0, 1, 3] and not r1.skipped  # averaged without it
    assert r2.clients == [0, 1, 2, 3] and not r2.skipped  # the actor restarted (a device that rebooted) and is back
    assert r2.accuracy is not None and r2.accuracy > r0.accuracy + 0.1  # the unmasked sums make a model that learns
    # the corrections for the dropped client's masks crossed too: round 1 sent 3 updates plus 3 corrections
    per_update = r0.bytes_up // 4
    assert r1.bytes_up == 3 * per_update + 3 * (r1.bytes_up - 3 * per_update) // 3 and r1.bytes_up > 3 * per_update
    assert r0.bytes_keys == 4 * 32 * 4  # four public keys, each sent once and relayed to three peers


def test_compressed_updates_cross_in_fewer_bytes(ray_session, mnist5k):
    cfg = FedConfig(clients=4, rounds=1, codec=CodecSpec(kind="topk", topk_frac=0.1), seed=1)
    run = run_federated(cfg, dataset="mnist-5k", model=TINY, recipe=TrainConfig(workers=1), test=None, cpus_per_client=0.5)
    net = build(TINY)
    dense_payload = len(encode(Layout.of(net).flatten(net.state_dict()), CodecSpec()))
    assert run.records[0].clients == [0, 1, 2, 3]
    assert 4 * dense_payload / run.bytes_up >= 4.0
    assert run.bytes_down == 4 * run.records[0].bytes_down // 4 > 0


def test_clients_that_cannot_be_placed_get_an_error_naming_the_fix(ray_session):
    from dynray.errors import ServingError

    with pytest.raises(ServingError, match="could not be placed on `nosuch` nodes"):
        run_federated(FedConfig(clients=2, rounds=1), dataset="mnist-5k", model=TINY, recipe=TrainConfig(workers=1), test=None, tier="nosuch", round_timeout_s=3)
