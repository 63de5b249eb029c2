"""A registered version as bytes, and its verification: how a model travels without a
shared filesystem.

:class:`VersionBytes` is what the registry holds for one version, read as it is on disk:
the ``meta.json`` bytes, the digest recorded for them and every file the meta lists. The
registry's host sends it through Ray (``actors/registry.py``); the receiver checks every
sha256 with :func:`verify_bytes` before a weight is parsed, exactly as a local
``ModelRegistry.load`` does (it uses the same function), so a file corrupted on the host or
in transit never loads.

An **encrypted** version (registered while a master key is set, :mod:`dynray.security.crypto`)
holds ``model.safetensors.enc`` (sealed, listed in ``files``) and ``model.dek`` (its wrapped
data key, not listed: it changes when the master key rotates, and AES-GCM authenticates it).
Its bytes travel encrypted and are decrypted by :func:`verify_bytes` on the receiving
replica, with the master key of that process. The sealed header authenticates the model's
name, an artifact id and the sha256 of its meta.json (:func:`meta_digest`), so an edited or
swapped meta.json is refused even when its plain sha256 files were recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dynray.errors import IntegrityError, RegistryError
from dynray.fileio import fsync_path, sha256_bytes, write_durable
from dynray.security.crypto import Keyring, MasterKey, Sealed, open_sealed, rewrap, seal

__all__ = ["VersionBytes", "verify_bytes", "listed_files", "key_file", "weights_file", "meta_digest", "FORMAT", "WEIGHTS_FILE", "ENC_WEIGHTS_FILE",
           "DEK_FILE", "ENCRYPTION_SCHEME", "write_weights", "rewrap_dir", "META_FILE", "META_DIGEST_FILE", "INTEGRITY_FIX"]

FORMAT = "dynray-model/1"
WEIGHTS_FILE = "model.safetensors"
ENC_WEIGHTS_FILE = "model.safetensors.enc"
DEK_FILE = "model.dek"
ENCRYPTION_SCHEME = "dynray-envelope/1"
_UNSIGNED_META = ("version", "created_at", "files")
"""meta.json keys set after the weights are sealed (the version is allocated last)."""
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
    wrapped_key: bytes | None = None
    """An encrypted version's wrapped data key (``model.dek``), as stored."""

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


def meta_digest(meta: dict) -> str:
    """sha256 of ``meta`` without the keys set after sealing: what the sealed weights authenticate."""
    # as meta.json will read back: tuples become lists, int keys strings (mixed keys then sort)
    signed = json.loads(json.dumps({k: v for k, v in meta.items() if k not in _UNSIGNED_META}))
    return hashlib.sha256(json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def key_file(meta_bytes: bytes) -> str | None:
    """An encrypted version's wrapped-key file name, else None."""
    try:
        enc = json.loads(meta_bytes).get("encryption")
    except (ValueError, AttributeError):
        return None
    return DEK_FILE if isinstance(enc, dict) else None


def weights_file(meta: dict) -> str:
    """The weights file of a version: sealed when it is encrypted."""
    return ENC_WEIGHTS_FILE if isinstance(meta.get("encryption"), dict) else WEIGHTS_FILE


def _decrypt(vb: VersionBytes, meta: dict, data: bytes, keyring: Keyring | None) -> bytes:
    enc, path = meta["encryption"], Path(vb.path)
    if enc.get("scheme") != ENCRYPTION_SCHEME or not isinstance(enc.get("artifact"), str):
        raise _integrity(f"{META_FILE} of {vb.ref}: unknown encryption scheme {enc.get('scheme')!r}", path / META_FILE)
    if vb.wrapped_key is None:
        raise _integrity(f"{DEK_FILE} of {vb.ref} (its wrapped data key) is missing or unreadable", path / DEK_FILE)
    expect = {"kind": "dynray-model-weights/1", "model": meta.get("name"), "artifact": enc["artifact"], "meta_sha256": meta_digest(meta)}
    plaintext, _ = open_sealed(Sealed(data, vb.wrapped_key), keyring if keyring is not None else Keyring.from_env(), what=f"{ENC_WEIGHTS_FILE} of {vb.ref}",
                               expect_metadata=expect)
    return plaintext


def verify_bytes(vb: VersionBytes, keyring: Keyring | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Check meta.json's digest and every listed file's digest, decrypt sealed weights
    (with ``keyring``, default: this process's master key), then parse the weights:
    ``(meta, tensors)``. Raises :class:`IntegrityError` (:class:`CryptoError` for
    encryption) naming the file at fault."""
    path, ref = Path(vb.path), vb.ref
    actual = sha256_bytes(vb.meta_bytes)
    if actual != vb.digest:
        raise _digest_error(f"{META_FILE} of {ref}", path / META_FILE, vb.digest, actual)
    try:  # the digest matched, so these should be the bytes register wrote
        meta = json.loads(vb.meta_bytes)
    except ValueError as e:
        raise _integrity(f"{META_FILE} of {ref} is not valid JSON ({e})", path / META_FILE) from e
    files = meta.get("files") if isinstance(meta, dict) else None
    wfile = weights_file(meta) if isinstance(meta, dict) else WEIGHTS_FILE
    if not isinstance(files, dict) or meta.get("format") != FORMAT or wfile not in files:
        raise _integrity(f"{META_FILE} of {ref} is not {FORMAT} with {wfile} in files", path / META_FILE)
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
        if fname == wfile:
            if wfile == ENC_WEIGHTS_FILE:
                data = _decrypt(vb, meta, data, keyring)
            try:
                tensors = st_load(data)
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise _integrity(f"{fname} of {ref} does not parse as safetensors ({e})", path / fname) from e
    return meta, tensors


def write_weights(vdir: Path, tensors: dict[str, torch.Tensor], meta: dict, master: MasterKey | None) -> None:
    """Write a new version's weights into ``vdir``: plain safetensors, or (with ``master``)
    sealed, with its wrapped data key: the plaintext never reaches the disk then.
    ``meta``: the version's meta as it will be signed (``meta["encryption"]`` set when sealing)."""
    try:
        plaintext = st_save(tensors)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise RegistryError("cannot save tensors as safetensors", got=str(e), fix="pass dense tensors (no sparse or quantized layouts)") from e
    if master is None:
        write_durable(vdir / WEIGHTS_FILE, plaintext)
        return
    sealed = seal(plaintext, {"kind": "dynray-model-weights/1", "model": meta["name"], "artifact": meta["encryption"]["artifact"], "meta_sha256": meta_digest(meta)}, master)
    write_durable(vdir / ENC_WEIGHTS_FILE, sealed.data)
    write_durable(vdir / DEK_FILE, sealed.wrapped)


def rewrap_dir(vdir: Path, ref: str, keyring: Keyring, new: MasterKey) -> None:
    """Replace the wrapped data key of the encrypted version in ``vdir`` by one under ``new`` (atomically)."""
    fresh = rewrap(Sealed((vdir / ENC_WEIGHTS_FILE).read_bytes(), (vdir / DEK_FILE).read_bytes()), keyring, new, what=f"{ENC_WEIGHTS_FILE} of {ref}")
    tmp = vdir / f".dek-{uuid.uuid4().hex}.tmp"
    write_durable(tmp, fresh.wrapped)
    os.replace(tmp, vdir / DEK_FILE)
    fsync_path(vdir)
