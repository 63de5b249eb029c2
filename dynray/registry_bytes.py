"""A registered version as bytes, and its verification: how a model travels without a
shared filesystem.

:class:`VersionBytes` is what the registry holds for one version, read as it is on disk:
the ``meta.json`` bytes, the digest recorded for them and every file the meta lists. The
registry's host sends it through Ray (``actors/registry.py``); the receiver checks every
sha256 with :func:`verify_bytes` before a weight is parsed, exactly as a local
``ModelRegistry.load`` does (it uses the same function), so a file corrupted on the host or
in transit never loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from dynray.errors import IntegrityError
from dynray.fileio import sha256_bytes

__all__ = ["VersionBytes", "verify_bytes", "listed_files", "FORMAT", "WEIGHTS_FILE", "META_FILE", "META_DIGEST_FILE", "INTEGRITY_FIX"]

FORMAT = "dynray-model/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
META_DIGEST_FILE = "meta.json.sha256"
INTEGRITY_FIX = "re-register the model: dynray train …, or restore the file from backup"


@dataclass(frozen=True)
class VersionBytes:
    """One version as stored: unverified bytes (verify with :func:`verify_bytes`)."""

    name: str
    version: int
    path: str
    """The version directory on the registry's host (for messages only)."""
    meta_bytes: bytes
    digest: str
    """The recorded sha256 of ``meta_bytes`` (``meta.json.sha256``)."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Every file ``meta.json`` lists, by name (only names that stay inside the version dir)."""
    missing: dict[str, str] = field(default_factory=dict)
    """Listed files that could not be read, with the reason."""
    stages: tuple[str, ...] = ()
    """The stages the version held when it was read (registry state, not a file)."""

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


def _integrity(what: str, path: str | Path) -> IntegrityError:
    return IntegrityError(what, got=str(path), fix=INTEGRITY_FIX)


def _digest_error(label: str, path: str | Path, expected: str, actual: str) -> IntegrityError:
    return _integrity(f"{label} does not match its recorded sha256 (expected {expected[:12]}…, actual {actual[:12]}…)", path)


def listed_files(meta_bytes: bytes) -> list[str]:
    """The file names ``meta.json`` lists (empty if it does not parse: :func:`verify_bytes` says why)."""
    try:
        files = json.loads(meta_bytes).get("files")
    except (ValueError, AttributeError):
        return []
    return sorted(files) if isinstance(files, dict) else []


def verify_bytes(vb: VersionBytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Check meta.json's digest and every listed file's digest, then parse the weights:
    ``(meta, tensors)``. Raises :class:`IntegrityError` naming the file at fault."""
    path, ref = Path(vb.path), vb.ref
    actual = sha256_bytes(vb.meta_bytes)
    if actual != vb.digest:
        raise _digest_error(f"{META_FILE} of {ref}", path / META_FILE, vb.digest, actual)
    try:  # the digest matched, so these should be the bytes register wrote
        meta = json.loads(vb.meta_bytes)
    except ValueError as e:
        raise _integrity(f"{META_FILE} of {ref} is not valid JSON ({e})", path / META_FILE) from e
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or meta.get("format") != FORMAT or WEIGHTS_FILE not in files:
        raise _integrity(f"{META_FILE} of {ref} is not {FORMAT} with {WEIGHTS_FILE} in files", path / META_FILE)
    tensors: dict[str, torch.Tensor] = {}
    for fname, expected in sorted(files.items()):
        if Path(fname).name != fname:
            raise _integrity(f"{ref}: file entry {fname!r} escapes the version dir", path / META_FILE)
        if fname not in vb.files:
            raise _integrity(f"{fname} of {ref} is missing or unreadable ({vb.missing.get(fname, 'not sent')})", path / fname)
        data = vb.files[fname]
        actual = sha256_bytes(data)
        if actual != expected:
            raise _digest_error(f"{fname} of {ref}", path / fname, str(expected), actual)
        if fname == WEIGHTS_FILE:
            try:
                tensors = st_load(data)
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise _integrity(f"{fname} of {ref} does not parse as safetensors ({e})", path / fname) from e
    return meta, tensors
