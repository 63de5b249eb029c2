"""Federated learning parts without Ray: the split, the update codecs, secure aggregation, the server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynray.errors import ConfigError, IntegrityError
from dynray.federated.client import LocalClient, load_broadcast
from dynray.federated.codec import CodecSpec, ErrorFeedback, Layout, decode, encode
from dynray.federated.secagg import MaskingClient, check_threshold, from_ring, to_ring, unmask_sum
from dynray.federated.server import FedConfig, Server
from dynray.federated.split import dirichlet_split, label_histogram
from dynray.models import DynamicNetConfig, build
from dynray.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _labels(n: int = 2000, classes: int = 10) -> torch.Tensor:
    return torch.arange(n) % classes


# -- split --------------------------------------------------------------------------------


def test_dirichlet_split_is_a_deterministic_partition():
    y = _labels()
    a = dirichlet_split(y, 4, alpha=0.5, seed=3)
    b = dirichlet_split(y, 4, alpha=0.5, seed=3)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    flat = torch.cat(a)
    assert len(flat) == len(y) and len(set(flat.tolist())) == len(y)  # disjoint and covering
    assert min(len(s) for s in a) >= 10


def test_small_alpha_gives_less_alike_clients_than_large_alpha():
    y = _labels()

    def skew(alpha: float) -> float:  # mean share of a client's samples in its largest class
        h = np.array(label_histogram(y, dirichlet_split(y, 4, alpha=alpha, seed=0), 10), dtype=float)
        return float((h.max(1) / h.sum(1)).mean())

    assert skew(0.1) > 0.4 > 0.15 > skew(100.0)


@pytest.mark.parametrize("kwargs, match", [({"clients": 0, "alpha": 0.5}, "at least one client"), ({"clients": 4, "alpha": 0.0}, "must be positive"),
                                           ({"clients": 500, "alpha": 0.5}, "too few samples")])
def test_bad_splits_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dirichlet_split(_labels(), seed=0, **kwargs)


# -- codecs -------------------------------------------------------------------------------


def test_dense_payload_round_trips_exactly():
    v = torch.randn(10_000)
    assert torch.equal(decode(encode(v, CodecSpec()), v.numel(), CodecSpec()), v)


def test_topk_keeps_the_largest_entries_in_a_fifth_of_the_bytes():
    v = torch.randn(50_000)
    spec = CodecSpec(kind="topk", topk_frac=0.1)
    p = encode(v, spec)
    out = decode(p, v.numel(), spec)
    kept = out != 0
    assert int(kept.sum()) == 5_000
    assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())  # exactly the top 10% by magnitude
    assert torch.equal(out[kept], v[kept])
    assert len(encode(v, CodecSpec())) / len(p) >= 4.9


def test_int8_payload_is_a_quarter_and_close():
    v = torch.randn(50_000)
    spec = CodecSpec(kind="int8", int8_chunk=1024)
    p = encode(v, spec)
    assert len(encode(v, CodecSpec())) / len(p) > 3.8
    assert float((decode(p, v.numel(), spec) - v).abs().max()) <= float(v.abs().max()) / 127 / 2 + 1e-6


@pytest.mark.parametrize("kind", ["topk", "int8"])
def test_error_feedback_loses_nothing_for_good(kind):
    """What the payloads left out is exactly the residual: sum(decoded) + residual = sum(deltas)."""
    spec = CodecSpec(kind=kind, topk_frac=0.05)
    ef = ErrorFeedback(spec)
    deltas = [torch.randn(4_000) for _ in range(6)]
    sent = sum(decode(ef.encode(d), d.numel(), spec) for d in deltas)
    assert torch.allclose(sent + ef.residual, sum(deltas), atol=1e-4)
    assert float(ef.residual.abs().sum()) > 0  # something really was held back


def test_a_payload_of_another_codec_or_layout_is_refused():
    p = encode(torch.randn(100), CodecSpec())
    with pytest.raises(IntegrityError, match="wrong length"):
        decode(p, 99, CodecSpec())
    with pytest.raises(IntegrityError, match="does not parse"):
        decode(b"not a payload", 100, CodecSpec())


def test_layout_flattens_float_entries_parameters_first_and_back():
    net = build(DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8))
    state = net.state_dict()
    lay = Layout.of(net)
    back = lay.unflatten(lay.flatten(state))
    assert set(back) == {k for k, v in state.items() if v.is_floating_point()}
    assert not any(k.endswith("num_batches_tracked") for k in back) and any(k.endswith("running_var") for k in back)
    assert all(torch.equal(back[k], state[k]) for k in back)
    assert lay.params == sum(p.numel() for p in net.parameters()) < lay.size
    assert list(lay.names[: len(list(net.parameters()))]) == [k for k, _ in net.named_parameters()]


@pytest.mark.parametrize("kind", ["topk", "int8"])
def test_compressed_payloads_carry_the_buffers_dense(kind):
    v = torch.randn(10_000)
    spec = CodecSpec(kind=kind, topk_frac=0.01)
    out = decode(encode(v, spec, compressible=9_000), v.numel(), spec)
    assert torch.equal(out[9_000:], v[9_000:])
    assert not torch.equal(out[:9_000], v[:9_000])


# -- secure aggregation -------------------------------------------------------------------


def _masked_round(updates: list[torch.Tensor]) -> tuple[list[MaskingClient], list[np.ndarray]]:
    clients = [MaskingClient(i, round_=7) for i in range(len(updates))]
    peers = {i: c.public_key() for i, c in enumerate(clients)}
    return clients, [c.mask(u, peers) for c, u in zip(clients, updates)]


def test_pairwise_masks_cancel_in_the_sum_and_hide_each_update():
    updates = [torch.randn(5_000) * 0.01 for _ in range(4)]
    _, masked = _masked_round(updates)
    total = unmask_sum(masked, [], threshold=3)
    assert float((total - sum(updates)).abs().max()) < 1e-6
    for m, u in zip(masked, updates):  # one masked vector alone says nothing about its update
        assert float((from_ring(m) - u).abs().median()) > 1e6


def test_a_dropped_clients_masks_are_removed_by_the_survivors_corrections():
    updates = [torch.randn(3_000) for _ in range(4)]
    clients, masked = _masked_round(updates)
    alive = [0, 1, 3]
    fixes = [clients[i].correction([2], 3_000) for i in alive]
    total = unmask_sum([masked[i] for i in alive], fixes, threshold=3)
    assert float((total - (updates[0] + updates[1] + updates[3])).abs().max()) < 1e-5
    broken = unmask_sum([masked[i] for i in alive], [], threshold=3)  # without the corrections: garbage
    assert float((broken - (updates[0] + updates[1] + updates[3])).abs().max()) > 1e3


def test_fewer_updates_than_the_threshold_are_never_unmasked():
    _, masked = _masked_round([torch.randn(10) for _ in range(3)])
    with pytest.raises(IntegrityError, match="threshold"):
        unmask_sum(masked[:2], [], threshold=3)


def test_fixed_point_round_trip_and_overflow_refused():
    v = torch.randn(1000)
    assert float((from_ring(to_ring(v)) - v).abs().max()) <= 2.0**-24
    with pytest.raises(IntegrityError, match="too large"):
        to_ring(torch.tensor([1e12]))


@pytest.mark.parametrize("clients, threshold, match", [(2, 3, "fewer clients than the secure-aggregation threshold"), (4, 1, "at least 2")])
def test_secure_aggregation_threshold_is_checked_before_a_run(clients, threshold, match):
    with pytest.raises(ConfigError, match=match):
        check_threshold(clients, threshold)
    with pytest.raises(ConfigError, match=match):
        FedConfig(clients=clients, secure_agg=True, secagg_threshold=threshold)


def test_secure_aggregation_refuses_a_compressed_codec():
    with pytest.raises(ConfigError, match="cannot be masked"):
        FedConfig(secure_agg=True, codec=CodecSpec(kind="topk"))


# -- server and client --------------------------------------------------------------------


def _tiny() -> DynamicNetConfig:
    return DynamicNetConfig(widths=(4, 8, 8), layers=(1, 1, 1), exit_hidden=8)


def test_server_fedavg_is_the_sample_weighted_mean_and_secure_gives_the_same(mnist5k):
    torch.manual_seed(0)
    server = Server(build(_tiny()), FedConfig(clients=3, secure_agg=True, secagg_threshold=2))
    n = server.layout.size
    deltas = {i: torch.randn(n) * 0.01 for i in range(3)}
    w = server.weights({0: 100, 1: 300, 2: 600})
    plain = server.aggregate({i: encode(deltas[i] * w[i], CodecSpec()) for i in range(3)}, w)
    assert torch.allclose(plain, 0.1 * deltas[0] + 0.3 * deltas[1] + 0.6 * deltas[2], atol=1e-7)
    _, masked = _masked_round([deltas[i] * w[i] for i in range(3)])
    from safetensors.numpy import save as np_save

    secure = server.aggregate_masked({i: np_save({"masked": masked[i]}) for i in range(3)}, [], w)
    assert float((secure - plain).abs().max()) < 1e-7


def test_a_client_refuses_weights_that_do_not_match_their_checksum(mnist5k):
    torch.manual_seed(0)
    server = Server(build(_tiny()), FedConfig())
    payload, digest = server.broadcast()
    assert set(load_broadcast(payload, digest)) == set(server.model.state_dict())
    tampered = bytearray(payload)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError, match="checksum"):
        load_broadcast(bytes(tampered), digest)


def test_a_client_round_sends_its_weighted_update(mnist5k):
    torch.manual_seed(0)
    train = mnist5k["train"]
    import dataclasses

    shard = dataclasses.replace(train, images=train.images[:256], labels=train.labels[:256])
    server = Server(build(_tiny()), FedConfig(rounds=2))
    client = LocalClient(0, shard, _tiny(), TrainConfig(epochs=2, workers=1, batch_size=64), CodecSpec(), local_epochs=1)
    payload, digest = server.broadcast()
    up = client.train_round(0, payload, digest, weight=0.5)
    delta = decode(up.payload, server.layout.size, CodecSpec())
    after = server.layout.flatten(client.model.state_dict())
    assert torch.allclose(delta, 0.5 * (after - server.layout.flatten(server.model.state_dict())), atol=1e-6)
    assert up.samples == 256 and up.bytes_received == len(payload) and float(delta.abs().max()) > 0
    with pytest.raises(IntegrityError, match="key pair"):
        client.train_round(1, payload, digest, weight=0.5, peers={1: b"x" * 32})
