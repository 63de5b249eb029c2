"""Envelope encryption of artifacts with AES-256-GCM (``cryptography``).

Every artifact gets a fresh random 256-bit *data key*. The data is encrypted under it; the
data key is *wrapped* (AES-256-GCM again) under a *master key* that never touches the
artifact. Two byte strings come out:

``sealed`` (immutable once written)::

    b"DYNENC1\\n" | u32 header length | header JSON | ciphertext || 16-byte GCM tag

    header = {"v": 1, "alg": "AES-256-GCM", "nonce": b64, "length": plaintext bytes,
              "metadata": {...}}          (canonical JSON: sorted keys, no spaces)

    The magic and the header bytes are the GCM associated data: the metadata (for a model,
    its name and the digest of its meta.json) is authenticated, not encrypted.

``wrapped`` (the data key; rewritten when the master key rotates)::

    {"v": 1, "kid": master key id, "nonce": b64, "wrapped": b64}

    The associated data of the wrap is ``sha256(magic | header)``: a wrapped key only opens
    the one artifact it was made for, so swapping key files between artifacts is refused.

Rotating the master key (:func:`rewrap`) unwraps the data key with the old master key and
wraps it under the new one; the sealed data is not touched.

Master keys are 32 random bytes, written as url-safe base64 (:func:`generate_master_key`),
and are read from ``DYNRAY_MASTER_KEY`` or from the file named by
``DYNRAY_MASTER_KEY_FILE`` (:meth:`Keyring.from_env`). ``DYNRAY_MASTER_KEY_PREVIOUS`` may
hold the key being rotated away from, so both open artifacts during a rotation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dynray.errors import ConfigError, CryptoError

__all__ = [
    "ENV_KEY",
    "ENV_KEY_FILE",
    "ENV_KEY_PREVIOUS",
    "MAGIC",
    "MasterKey",
    "Keyring",
    "Sealed",
    "generate_master_key",
    "seal",
    "open_sealed",
    "read_header",
    "rewrap",
    "is_sealed",
]

ENV_KEY = "DYNRAY_MASTER_KEY"
ENV_KEY_FILE = "DYNRAY_MASTER_KEY_FILE"
ENV_KEY_PREVIOUS = "DYNRAY_MASTER_KEY_PREVIOUS"
MAGIC = b"DYNENC1\n"
ALG = "AES-256-GCM"
_NONCE = 12
_TAG = 16
_MAX_HEADER = 1 << 20
_WRAP_AAD = b"dynray-data-key/1|"
_KEY_FIX = f"set {ENV_KEY} (or {ENV_KEY_FILE}) to the master key the artifact was encrypted with; `dynray models keygen` makes a new one"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(str(text).encode())
    except (ValueError, TypeError) as e:
        raise CryptoError(f"{what} is not base64", fix="the file was altered; restore it from backup") from e


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, repr=False)
class MasterKey:
    """A 256-bit master key and its id (the first 16 hex digits of its sha256: it names the
    key in wrapped data keys and errors without revealing it)."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != 32:
            raise ConfigError("a master key must be 32 bytes", got=len(self.key) if isinstance(self.key, bytes) else type(self.key).__name__,
                              fix="make one with `dynray models keygen`")

    @property
    def kid(self) -> str:
        return hashlib.sha256(b"dynray-kid|" + self.key).hexdigest()[:16]

    def __repr__(self) -> str:  # never print the key itself
        return f"MasterKey(kid={self.kid})"

    @classmethod
    def parse(cls, text: str, *, source: str) -> MasterKey:
        """A key as :func:`generate_master_key` writes it (url-safe base64 of 32 bytes)."""
        raw = text.strip()
        try:
            key = base64.urlsafe_b64decode(raw.encode() + b"=" * (-len(raw) % 4))
        except (ValueError, TypeError):
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{source} does not hold a master key (url-safe base64 of 32 bytes)", got=f"{len(raw)} characters",
                              fix="make one with `dynray models keygen`")
        return cls(key)


def generate_master_key() -> str:
    """A new master key from ``secrets``, as url-safe base64 text."""
    return _b64(secrets.token_bytes(32))


@dataclass(frozen=True)
class Keyring:
    """The master keys this process may use: ``keys[0]`` encrypts, any of them decrypts."""

    keys: tuple[MasterKey, ...] = ()

    @property
    def current(self) -> MasterKey | None:
        return self.keys[0] if self.keys else None

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, kid: str) -> MasterKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Keyring:
        """``DYNRAY_MASTER_KEY`` or the file in ``DYNRAY_MASTER_KEY_FILE`` (current), then
        ``DYNRAY_MASTER_KEY_PREVIOUS``; empty when none is set (encryption off)."""
        env = os.environ if env is None else env
        keys: list[MasterKey] = []
        if env.get(ENV_KEY) and env.get(ENV_KEY_FILE):
            raise ConfigError(f"both {ENV_KEY} and {ENV_KEY_FILE} are set", fix="set only one of them")
        if env.get(ENV_KEY):
            keys.append(MasterKey.parse(env[ENV_KEY], source=ENV_KEY))
        elif env.get(ENV_KEY_FILE):
            keys.append(cls.read_file(env[ENV_KEY_FILE]))
        if env.get(ENV_KEY_PREVIOUS):
            prev = MasterKey.parse(env[ENV_KEY_PREVIOUS], source=ENV_KEY_PREVIOUS)
            if prev not in keys:
                keys.append(prev)
        return cls(tuple(keys))

    @staticmethod
    def read_file(path: str | os.PathLike) -> MasterKey:
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError("cannot read the master key file", got=f"{p}: {e.strerror}", fix=f"point {ENV_KEY_FILE} at a file made by `dynray models keygen --out FILE`") from e
        return MasterKey.parse(text, source=f"master key file {p}")


@dataclass(frozen=True)
class Sealed:
    """An encrypted artifact: the sealed data and its wrapped data key."""

    data: bytes
    wrapped: bytes


def is_sealed(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def _split(data: bytes, what: str) -> tuple[dict, bytes, bytes]:
    """(header, magic+header bytes = the AAD, ciphertext with tag)."""
    if not is_sealed(data):
        raise CryptoError(f"{what} is not a dynray encrypted artifact (bad magic)", fix="the file was altered or replaced; restore it from backup")
    if len(data) < len(MAGIC) + 4:
        raise CryptoError(f"{what} is truncated (no header)", got=f"{len(data)} bytes", fix="restore the file from backup")
    (n,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > _MAX_HEADER or start + n > len(data):
        raise CryptoError(f"{what} is truncated or corrupt (header of {n} bytes, file of {len(data)})", fix="restore the file from backup")
    try:
        header = json.loads(data[start : start + n])
    except ValueError as e:
        raise CryptoError(f"{what}'s header is not JSON", fix="the file was altered; restore it from backup") from e
    if not isinstance(header, dict) or header.get("v") != 1 or header.get("alg") != ALG or not isinstance(header.get("length"), int):
        raise CryptoError(f"{what}'s header is not a version-1 {ALG} header", got={k: header.get(k) for k in ("v", "alg")} if isinstance(header, dict) else None,
                          fix="the file was altered, or was written by another tool")
    body = data[start + n :]
    expected = header["length"] + _TAG
    if len(body) != expected:
        kind = "truncated" if len(body) < expected else "longer than it was written"
        raise CryptoError(f"{what} is {kind}: {len(body)} bytes of ciphertext, the header says {expected}", fix="restore the file from backup")
    return header, data[: start + n], body


def read_header(data: bytes, what: str = "artifact") -> dict:
    """The (not yet authenticated) header of sealed ``data``; :func:`open_sealed` checks it."""
    return _split(data, what)[0]


def _wrap_aad(aad: bytes) -> bytes:
    return _WRAP_AAD + hashlib.sha256(aad).digest()


def _wrap(dek: bytes, aad: bytes, master: MasterKey) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    wrapped = AESGCM(master.key).encrypt(nonce, dek, _wrap_aad(aad))
    return _canonical({"v": 1, "kid": master.kid, "nonce": _b64(nonce), "wrapped": _b64(wrapped)})


def _unwrap(wrapped: bytes, aad: bytes, keyring: Keyring, what: str) -> bytes:
    try:
        w = json.loads(wrapped)
        kid, nonce, blob = w["kid"], _unb64(w["nonce"], "the wrapped key's nonce"), _unb64(w["wrapped"], "the wrapped key")
    except (ValueError, KeyError, TypeError) as e:
        raise CryptoError(f"the data key of {what} is unreadable", fix="the key file was altered; restore it from backup") from e
    if not keyring:
        raise CryptoError(f"{what} is encrypted and no master key is set", got=f"needs key {kid}", fix=_KEY_FIX)
    master = keyring.find(str(kid))
    if master is None:
        raise CryptoError(f"{what} was encrypted under another master key", got={"needs": kid, "have": [k.kid for k in keyring.keys]}, fix=_KEY_FIX)
    try:
        return AESGCM(master.key).decrypt(nonce, blob, _wrap_aad(aad))
    except InvalidTag:
        raise CryptoError(f"the data key of {what} does not open with master key {kid}: the key file was altered, or belongs to another artifact",
                          fix="restore the artifact's key file from backup") from None


def seal(plaintext: bytes, metadata: Mapping[str, object], master: MasterKey) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key; ``metadata`` (JSON) is authenticated with it."""
    dek, nonce = AESGCM.generate_key(bit_length=256), secrets.token_bytes(_NONCE)
    header = _canonical({"v": 1, "alg": ALG, "nonce": _b64(nonce), "length": len(plaintext), "metadata": dict(metadata)})
    aad = MAGIC + struct.pack(">I", len(header)) + header
    ct = AESGCM(dek).encrypt(nonce, plaintext, aad)
    return Sealed(data=aad + ct, wrapped=_wrap(dek, aad, master))


def open_sealed(sealed: Sealed, keyring: Keyring, *, what: str = "artifact", expect_metadata: Mapping[str, object] | None = None) -> tuple[bytes, dict]:
    """Decrypt and authenticate: ``(plaintext, metadata)``.

    ``expect_metadata``: the metadata the caller knows the artifact must carry (checked
    after authentication; a mismatch means the artifact was swapped for another one).
    Raises :class:`CryptoError` naming what is wrong: not sealed, truncated, no or the
    wrong master key, an altered key file, altered data or metadata.
    """
    header, aad, body = _split(sealed.data, what)
    dek = _unwrap(sealed.wrapped, aad, keyring, what)
    try:
        plaintext = AESGCM(dek).decrypt(_unb64(header.get("nonce"), "the nonce"), body, aad)
    except InvalidTag:
        raise CryptoError(f"{what} failed authentication: its data or metadata was altered", fix="restore the file from backup, or re-register the model") from None
    meta = header.get("metadata", {})
    if expect_metadata is not None:
        bad = sorted(k for k, v in expect_metadata.items() if meta.get(k) != v)
        if bad:
            raise CryptoError(f"{what} belongs to another artifact: authenticated metadata {', '.join(bad)} does not match", got={k: meta.get(k) for k in bad},
                              fix="the files were swapped or edited; restore them from backup")
    return plaintext, meta


def rewrap(sealed: Sealed, keyring: Keyring, new: MasterKey, *, what: str = "artifact") -> Sealed:
    """The same sealed data with its data key wrapped under ``new`` (``keyring`` opens the old wrap).

    The data is not decrypted or re-encrypted: only the small wrapped key changes.
    """
    _, aad, _ = _split(sealed.data, what)
    dek = _unwrap(sealed.wrapped, aad, keyring, what)
    return Sealed(data=sealed.data, wrapped=_wrap(dek, aad, new))
