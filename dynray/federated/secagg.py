"""Secure aggregation with pairwise masks that cancel in the sum.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017), one round:

1. every client makes a fresh X25519 key pair and the server relays the public keys;
2. clients ``i`` and ``j`` derive the same seed from their Diffie-Hellman secret (HKDF-SHA256,
   bound to the round and the pair) and expand it into a mask ``m_ij`` (PCG64);
3. client ``i`` sends ``u_i + sum_{j>i} m_ij - sum_{j<i} m_ij``, its weighted update in
   fixed point in the ring of 2^64 integers, where the masks cancel exactly in the sum;
4. for clients that dropped out, every survivor sends the sum of its (signed) masks with them,
   which the server subtracts.

The server learns the sum of at least ``threshold`` updates and nothing about any one of them
(masks are uniform in the ring). What this leaves out of the paper's protocol, and so what it
does not defend against: the double masking and the Shamir sharing of each client's key. A
survivor lost between sending its update and its correction therefore fails the round (the
server keeps the previous model), and a server that lies about who dropped can unmask that
client: the server here is trusted to be honest-but-curious, and late updates are discarded.
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dynray.errors import ConfigError, IntegrityError

__all__ = ["FRACTION_BITS", "to_ring", "from_ring", "MaskingClient", "unmask_sum", "check_threshold"]

FRACTION_BITS = 24
"""Fixed point: a value x travels as round(x * 2^24) in the ring of 2^64 integers."""
_LIMIT = 2.0 ** (63 - FRACTION_BITS - 8)  # headroom for the sum of up to 256 clients


def to_ring(vec: torch.Tensor) -> np.ndarray:
    """[n] float -> [n] uint64 fixed point (two's complement)."""
    v = vec.detach().double().numpy()
    if not np.all(np.isfinite(v)) or np.abs(v).max(initial=0.0) >= _LIMIT:
        raise IntegrityError("an update is too large (or not finite) for secure aggregation's fixed point", got=float(np.abs(v).max(initial=0.0)),
                             fix=f"keep weighted updates below {_LIMIT:.3g}; lower the learning rate")
    return np.round(v * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)


def from_ring(vec: np.ndarray) -> torch.Tensor:
    """[n] uint64 ring element -> [n] float32."""
    return torch.from_numpy(vec.view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS).float()


def check_threshold(clients: int, threshold: int) -> None:
    """Refuse a run that could never aggregate ``threshold`` updates."""
    if threshold < 2:
        raise ConfigError("the secure-aggregation threshold must be at least 2 (one update alone is that client's update)", got=threshold, fix="e.g. --secagg-threshold 3")
    if clients < threshold:
        raise ConfigError("fewer clients than the secure-aggregation threshold", got={"clients": clients, "threshold": threshold},
                          fix=f"run at least {threshold} clients, or lower --secagg-threshold (>= 2)")


def _pair_mask(secret: bytes, round_: int, i: int, j: int, size: int) -> np.ndarray:
    lo, hi = min(i, j), max(i, j)
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"dynray-secagg|{round_}|{lo}|{hi}".encode()).derive(secret)
    return np.random.PCG64(int.from_bytes(seed, "little")).random_raw(size).astype(np.uint64)  # [size]


class MaskingClient:
    """One client's side of one round."""

    def __init__(self, client_id: int, round_: int) -> None:
        self.id, self.round = client_id, round_
        self._key = X25519PrivateKey.generate()
        self._peers: dict[int, bytes] = {}

    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def _mask(self, j: int, size: int) -> np.ndarray:
        m = _pair_mask(self._key.exchange(X25519PublicKey.from_public_bytes(self._peers[j])), self.round, self.id, j, size)
        return m if self.id < j else (np.uint64(0) - m)  # +m_ij for j > i, -m_ij for j < i (mod 2^64)

    def mask(self, update: torch.Tensor, peers: dict[int, bytes]) -> np.ndarray:
        """``update`` ([n] float, already weighted) in the ring, plus this client's pairwise masks."""
        self._peers = {j: k for j, k in peers.items() if j != self.id}
        out = to_ring(update)
        for j in self._peers:
            out += self._mask(j, out.size)  # uint64 arithmetic wraps: the ring of 2^64
        return out

    def correction(self, dropped: list[int], size: int) -> np.ndarray:
        """The sum of this client's masks with the clients that dropped out."""
        out = np.zeros(size, dtype=np.uint64)
        for j in dropped:
            if j in self._peers:
                out += self._mask(j, size)
        return out


def unmask_sum(masked: list[np.ndarray], corrections: list[np.ndarray], threshold: int) -> torch.Tensor:
    """The sum of the survivors' updates (float32), from their masked vectors and corrections."""
    if len(masked) < threshold:
        raise IntegrityError("fewer updates than the secure-aggregation threshold", got={"updates": len(masked), "threshold": threshold},
                             fix="the round is skipped; keep more clients online or lower --secagg-threshold")
    total = np.zeros_like(masked[0])
    for v in masked:
        total += v
    for c in corrections:
        total -= c
    return from_ring(total)
