"""One federated client: local training from the broadcast weights, the update as bytes.

:class:`LocalClient` is plain torch (``actors/federated.py`` hosts one per device actor). A
round takes the global weights as the exact bytes the server sent and their sha256, refuses
them on a mismatch, trains ``local_epochs`` on the client's shard with training's own recipe
(:func:`dynray.training.train_epoch`; the learning-rate schedule runs over all rounds), and
returns the weighted difference ``w * (after - before)`` encoded by the run's codec (with error
feedback), or masked for secure aggregation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from safetensors.numpy import save as numpy_save
from safetensors.torch import load as safetensors_load

from dynray.data import Split
from dynray.errors import IntegrityError
from dynray.federated.codec import CodecSpec, ErrorFeedback, Layout
from dynray.federated.secagg import MaskingClient
from dynray.fileio import sha256_bytes
from dynray.models.build import build
from dynray.models.config import DynamicNetConfig
from dynray.training import TrainConfig, make_optimizer, train_epoch

__all__ = ["ClientUpdate", "LocalClient", "load_broadcast"]


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after a round."""

    client: int
    round: int
    payload: bytes  # the encoded (or masked) update: the bytes that cross to the server
    samples: int
    loss: float  # last exit's training loss, last local epoch
    seconds: float
    bytes_received: int  # the broadcast this round, as it arrived


def load_broadcast(payload: bytes, digest: str) -> dict[str, torch.Tensor]:
    """The global state dict from the broadcast bytes, after checking their sha256."""
    got = sha256_bytes(payload)
    if got != digest:
        raise IntegrityError("the broadcast weights do not match their checksum", got={"sha256": got[:16], "expected": digest[:16]},
                             fix="the server resends the round's weights; a client never trains on weights it cannot verify")
    return safetensors_load(payload)


class LocalClient:
    """Client ``client_id`` holding ``shard`` (its private data)."""

    def __init__(self, client_id: int, shard: Split, model: DynamicNetConfig, recipe: TrainConfig, codec: CodecSpec, *, local_epochs: int) -> None:
        self.id, self.shard, self.local_epochs = client_id, shard, local_epochs
        # each client draws its own data order and augmentation; the schedule spans every round
        self.recipe = dataclasses.replace(recipe, seed=recipe.seed * 100 + client_id, model=model)
        self.model = build(model)
        self.layout = Layout.of(self.model)
        self.feedback = ErrorFeedback(codec, compressible=self.layout.params)
        self._masker: MaskingClient | None = None

    def public_key(self, round_: int) -> bytes:
        """A fresh key pair for this round's secure aggregation; the public half."""
        self._masker = MaskingClient(self.id, round_)
        return self._masker.public_key()

    def train_round(self, round_: int, weights: bytes, digest: str, weight: float, peers: dict[int, bytes] | None = None) -> ClientUpdate:
        """Train from the broadcast ``weights``; send ``weight * delta`` (masked when ``peers`` is given)."""
        t0 = time.perf_counter()
        self.model.load_state_dict(load_broadcast(weights, digest))
        before = self.layout.flatten(self.model.state_dict())  # [n]
        if round_ == 0:  # the complexity normalisation from this client's data, sent in the update; the server averages it
            self.model.complexity.fit(self.shard.images)
        opt = make_optimizer(self.model, self.recipe)
        steps = len(self.shard) // self.recipe.batch_size
        stats: dict = {}
        for e in range(self.local_epochs):
            epoch = round_ * self.local_epochs + e
            stats = train_epoch(self.model, self.model, self.shard, opt, self.recipe, epoch, step0=epoch * steps)
        delta = (self.layout.flatten(self.model.state_dict()) - before) * weight  # [n]
        if peers is None:
            payload = self.feedback.encode(delta)
        else:
            if self._masker is None or self._masker.round != round_:
                raise IntegrityError("secure aggregation needs this round's key pair first", got=round_, fix="call public_key(round) before train_round")
            payload = numpy_save({"masked": self._masker.mask(delta, peers)})
        return ClientUpdate(self.id, round_, payload, len(self.shard), float(stats.get("loss_per_exit", [float("nan")])[-1]), time.perf_counter() - t0, len(weights))

    def correction(self, round_: int, dropped: list[int]) -> bytes:
        """The sum of this round's masks with the clients that dropped out."""
        if self._masker is None or self._masker.round != round_:
            raise IntegrityError("no masks for that round", got=round_, fix="corrections are asked for in the round that masked")
        return numpy_save({"correction": self._masker.correction(dropped, self.layout.size)})
