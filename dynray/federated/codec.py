"""A client's update as the bytes it sends: dense, top-k sparsified or 8-bit, with error feedback.

An update is one flat float32 vector (:class:`Layout` flattens the float entries of a state
dict in a fixed order that server and clients share, so only values and indices travel).
The payload is a safetensors blob: the bytes counted are the bytes sent.

Error feedback (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", 2019):
what compression dropped this round is added to the next round's update, so nothing is lost
for good, only delayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from dynray.errors import ConfigError, IntegrityError

__all__ = ["Layout", "CodecSpec", "encode", "decode", "ErrorFeedback", "CODECS"]

CODECS = ("dense", "topk", "int8")


@dataclass(frozen=True)
class Layout:
    """Which state-dict entries are federated (the floating-point ones), in order, with shapes:
    the model's parameters first, then its float buffers (BatchNorm statistics, the complexity
    normalisation), which compressed payloads carry dense."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    params: int = 0
    """Entries of the vector that are parameters (the rest are buffers)."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> Layout:
        state = model.state_dict()
        names = [k for k, _ in model.named_parameters()]
        keys = tuple(names + [k for k, v in state.items() if v.is_floating_point() and k not in set(names)])
        return cls(keys, tuple(tuple(state[k].shape) for k in keys), sum(math.prod(state[k].shape) for k in names))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[k].detach().reshape(-1).float() for k in self.names])  # [size]

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(self.names, self.shapes):
            n = math.prod(s)
            out[k] = vec[i : i + n].reshape(s).clone()
            i += n
        return out


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """How updates are encoded."""

    kind: Literal["dense", "topk", "int8"] = "dense"
    """dense float32; topk = only the largest-magnitude share (float32 values + int32 indices); int8 = 8-bit values, a float32 scale per chunk."""
    topk_frac: float = 0.1
    """Share of the update's entries a topk payload keeps."""
    int8_chunk: int = 2048
    """Entries sharing one int8 scale."""

    def __post_init__(self) -> None:
        if self.kind not in CODECS:
            raise ConfigError("unknown update codec", got=self.kind, fix=f"use one of {', '.join(CODECS)}")
        if not 0.0 < self.topk_frac <= 1.0:
            raise ConfigError("topk_frac must be in (0, 1]", got=self.topk_frac, fix="e.g. --topk-frac 0.1")
        if self.int8_chunk < 1:
            raise ConfigError("int8_chunk must be >= 1", got=self.int8_chunk, fix="e.g. --int8-chunk 2048")


def encode(vec: torch.Tensor, spec: CodecSpec, *, compressible: int | None = None) -> bytes:
    """The payload of ``vec`` ([n] float32); only its first ``compressible`` entries (default:
    all) are compressed, the rest travel dense (a model's buffers: see :class:`Layout`)."""
    vec = vec.detach().float().contiguous()
    head, tail = vec[:compressible], vec[compressible if compressible is not None else vec.numel() :]
    if spec.kind == "dense":
        return safetensors_save({"dense": vec})
    out = {"tail": tail.contiguous()}
    if spec.kind == "topk":
        k = max(1, math.ceil(spec.topk_frac * head.numel()))
        idx = head.abs().topk(k, sorted=False).indices.sort().values
        return safetensors_save({**out, "idx": idx.to(torch.int32), "val": head[idx].contiguous()})
    pad = (-head.numel()) % spec.int8_chunk
    chunks = torch.cat([head, head.new_zeros(pad)]).reshape(-1, spec.int8_chunk)  # [c, chunk]
    scale = chunks.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [c]
    q = torch.round(chunks / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return safetensors_save({**out, "q": q.reshape(-1)[: head.numel()].contiguous(), "scale": scale.contiguous()})


def decode(payload: bytes, size: int, spec: CodecSpec) -> torch.Tensor:
    """The [size] float32 vector a payload stands for."""
    try:
        t = safetensors_load(payload)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise IntegrityError("an update payload does not parse", got=f"{type(e).__name__}: {str(e)[:100]}", fix="the sender and receiver must use the same codec") from e
    if spec.kind == "dense":
        out = t["dense"]
    else:
        head = size - t["tail"].numel()
        if spec.kind == "topk":
            out = torch.zeros(head)
            out[t["idx"].long()] = t["val"]
        else:
            q = t["q"].float()
            pad = (-head) % spec.int8_chunk
            out = (torch.cat([q, q.new_zeros(pad)]).reshape(-1, spec.int8_chunk) * t["scale"][:, None]).reshape(-1)[:head]
        out = torch.cat([out, t["tail"]])
    if out.numel() != size:
        raise IntegrityError("an update payload has the wrong length", got={"entries": out.numel(), "expected": size}, fix="the sender and receiver must share one model layout")
    return out


@dataclass
class ErrorFeedback:
    """One client's residual: what its compressed payloads have left out so far."""

    spec: CodecSpec
    compressible: int | None = None
    """Leading entries that are compressed (the parameters); the rest travel dense."""
    residual: torch.Tensor | None = field(default=None, repr=False)

    def encode(self, delta: torch.Tensor) -> bytes:
        corrected = delta if self.residual is None else delta + self.residual  # [n]
        payload = encode(corrected, self.spec, compressible=self.compressible)
        if self.spec.kind != "dense":
            self.residual = corrected - decode(payload, corrected.numel(), self.spec)
        return payload
