"""API keys: made by ``secrets``, shown once, stored only as HMAC-SHA256 digests in SQLite.

A key reads ``dk_<id>_<secret>``: ``id`` (12 hex digits) finds the row, and the whole key,
HMAC-ed with a server-side *pepper*, must equal the stored digest (``hmac.compare_digest``,
constant time). A stolen ``keys.db`` alone therefore opens nothing: the pepper is not in it.

Each key has scopes (``predict``, ``admin``), an optional expiry and its own rate limit.
Rotation makes a new key with the same name, scopes and limits, and lets the old one work
for a grace window; revocation is immediate.

The pepper comes from ``DYNRAY_KEY_PEPPER`` (url-safe base64 of 32 bytes), else from the
file ``DYNRAY_KEY_PEPPER_FILE`` names, else from ``~/.config/dynray/pepper`` (made on first
use, mode 0600): never from ``$DYNRAY_HOME``, which holds the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dynray.errors import ConfigError, DynrayError

__all__ = ["SCOPES", "KeyRecord", "Verified", "KeyStore", "KeyError_", "load_pepper", "keys_path", "DEFAULT_PEPPER_FILE"]

SCOPES = ("predict", "admin")
DEFAULT_PEPPER_FILE = Path("~/.config/dynray/pepper")
_PREFIX = "dk_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, digest BLOB NOT NULL, name TEXT NOT NULL, scopes TEXT NOT NULL,
    rate_per_s REAL NOT NULL, burst REAL NOT NULL, created REAL NOT NULL,
    expires REAL, revoked REAL, grace_until REAL, replaced_by TEXT)
"""


class KeyError_(DynrayError):  # noqa: N801 - KeyError is a builtin
    """An API key operation cannot be done (unknown id, bad scope, …)."""


@dataclass(frozen=True)
class KeyRecord:
    """One stored key, without its secret."""

    id: str
    name: str
    scopes: tuple[str, ...]
    rate_per_s: float
    burst: float
    created: float
    expires: float | None
    revoked: float | None
    grace_until: float | None
    replaced_by: str | None

    def state(self, now: float) -> str:
        """``active``, ``revoked``, ``expired`` or ``grace`` (rotated, still accepted)."""
        if self.revoked is not None and self.revoked <= now:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        if self.grace_until is not None:
            return "grace" if now < self.grace_until else "expired"
        return "active"


@dataclass(frozen=True)
class Verified:
    """The answer to a presented key: ``ok``, or why not (``reason``)."""

    ok: bool
    reason: str
    """``ok``, ``missing``, ``malformed``, ``unknown``, ``revoked``, ``expired``."""
    record: KeyRecord | None = None

    def allows(self, scope: str) -> bool:
        return self.ok and self.record is not None and (scope in self.record.scopes or "admin" in self.record.scopes)


def load_pepper(env: Mapping[str, str] | None = None, default_file: Path = DEFAULT_PEPPER_FILE) -> bytes:
    """The server-side pepper (see the module doc); made and saved on first use."""
    env = os.environ if env is None else env
    if env.get("DYNRAY_KEY_PEPPER"):
        return _parse_pepper(env["DYNRAY_KEY_PEPPER"], "DYNRAY_KEY_PEPPER")
    path = Path(env.get("DYNRAY_KEY_PEPPER_FILE") or default_file).expanduser()
    try:
        return _parse_pepper(path.read_text(), str(path))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made concurrently
        return _parse_pepper(path.read_text(), str(path))
    with os.fdopen(fd, "w") as f:
        f.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n")
    return _parse_pepper(path.read_text(), str(path))


def keys_path(home: str | os.PathLike | None = None) -> Path:
    """The key database of registry home ``home`` (default: ``$DYNRAY_HOME`` or ``./.dynray``)."""
    from dynray.registry import default_home

    return default_home(home) / "keys.db"


def _parse_pepper(text: str, source: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text.strip().encode())
    except ValueError:
        raw = b""
    if len(raw) < 16:
        raise ConfigError(f"{source} does not hold a pepper (url-safe base64 of at least 16 bytes)", fix="remove the file to have a new one made (every key must then be created again)")
    return raw


class KeyStore:
    """The keys in the SQLite file ``path``; ``clock`` gives epoch seconds (injectable for tests)."""

    def __init__(self, path: str | os.PathLike, pepper: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(pepper) < 16:
            raise ConfigError("the pepper must be at least 16 bytes", got=len(pepper), fix="use load_pepper()")
        self.path, self._pepper, self.clock = Path(path), pepper, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(_SCHEMA)
        os.chmod(self.path, 0o600)  # digests only, but nobody else needs to read them (SQLite gives its -wal file the same mode)

    @classmethod
    def at_home(cls, home: str | os.PathLike | None = None) -> KeyStore:
        """The store of registry home ``home``, with this machine's pepper (:func:`load_pepper`)."""
        return cls(keys_path(home), load_pepper())

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _digest(self, key: str) -> bytes:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).digest()

    # -- writing ------------------------------------------------------------------------
    def create(self, name: str, *, scopes: Iterable[str] = ("predict",), rate_per_s: float = 50.0, burst: float | None = None,
               ttl_s: float | None = None) -> tuple[str, KeyRecord]:
        """A new key: ``(the key, shown only now; its record)``."""
        scopes = tuple(dict.fromkeys(scopes))
        bad = [s for s in scopes if s not in SCOPES]
        if not scopes or bad:
            raise KeyError_("unknown scope", got=bad or list(scopes), fix=f"use {', '.join(SCOPES)}")
        if not name or len(name) > 64:
            raise KeyError_("a key needs a name of 1-64 characters", got=name, fix="e.g. --name ci-client")
        if rate_per_s <= 0 or (burst is not None and burst < 1) or (ttl_s is not None and ttl_s <= 0):
            raise KeyError_("rate, burst and ttl must be positive", got={"rate_per_s": rate_per_s, "burst": burst, "ttl_s": ttl_s}, fix="e.g. --rate 50 --burst 100 --ttl-days 90")
        kid = secrets.token_hex(6)
        key = f"{_PREFIX}{kid}_{secrets.token_urlsafe(32)}"
        now = self.clock()
        rec = KeyRecord(kid, name, scopes, float(rate_per_s), float(burst if burst is not None else max(1.0, rate_per_s)), now,
                        now + ttl_s if ttl_s else None, None, None, None)
        with self._db() as db:
            db.execute("INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (rec.id, self._digest(key), rec.name, ",".join(rec.scopes), rec.rate_per_s, rec.burst, rec.created, rec.expires, None, None, None))
        return key, rec

    def revoke(self, kid: str) -> KeyRecord:
        """Refuse the key from now on."""
        self.get(kid)
        with self._db() as db:
            db.execute("UPDATE api_keys SET revoked=? WHERE id=? AND revoked IS NULL", (self.clock(), kid))
        return self.get(kid)

    def rotate(self, kid: str, *, grace_s: float = 3600.0) -> tuple[str, KeyRecord]:
        """A new key like ``kid``; the old one keeps working for ``grace_s`` seconds."""
        old = self.get(kid)
        if old.state(self.clock()) not in ("active",):
            raise KeyError_(f"only an active key can be rotated; {kid} is {old.state(self.clock())}", got=kid, fix="create a new key: dynray keys create")
        if grace_s < 0:
            raise KeyError_("the grace window cannot be negative", got=grace_s, fix="e.g. --grace-s 3600")
        ttl = (old.expires - self.clock()) if old.expires is not None else None
        key, new = self.create(old.name, scopes=old.scopes, rate_per_s=old.rate_per_s, burst=old.burst, ttl_s=ttl if ttl and ttl > 0 else None)
        with self._db() as db:
            db.execute("UPDATE api_keys SET grace_until=?, replaced_by=? WHERE id=?", (self.clock() + grace_s, new.id, kid))
        return key, new

    # -- reading ------------------------------------------------------------------------
    def get(self, kid: str) -> KeyRecord:
        with self._db() as db:
            row = db.execute("SELECT id,name,scopes,rate_per_s,burst,created,expires,revoked,grace_until,replaced_by FROM api_keys WHERE id=?", (kid,)).fetchone()
        if row is None:
            raise KeyError_("no such key id", got=kid, fix="see `dynray keys list`")
        return _record(row)

    def list(self) -> list[KeyRecord]:
        with self._db() as db:
            rows = db.execute("SELECT id,name,scopes,rate_per_s,burst,created,expires,revoked,grace_until,replaced_by FROM api_keys ORDER BY created").fetchall()
        return [_record(r) for r in rows]

    def verify(self, key: str | None) -> Verified:
        """Check a presented key (constant-time digest comparison)."""
        if not key:
            return Verified(False, "missing")
        parts = key.split("_")
        if len(key) > 128 or len(parts) < 3 or not key.startswith(_PREFIX) or len(parts[1]) != 12:
            return Verified(False, "malformed")
        with self._db() as db:
            row = db.execute("SELECT digest,id,name,scopes,rate_per_s,burst,created,expires,revoked,grace_until,replaced_by FROM api_keys WHERE id=?",
                             (parts[1],)).fetchone()
        presented = self._digest(key)
        if row is None:
            hmac.compare_digest(presented, presented)  # the same work whether or not the id exists
            return Verified(False, "unknown")
        if not hmac.compare_digest(presented, row[0]):
            return Verified(False, "unknown")
        rec = _record(row[1:])
        state = rec.state(self.clock())
        return Verified(state in ("active", "grace"), "ok" if state in ("active", "grace") else state, rec)


def _record(row) -> KeyRecord:
    return KeyRecord(row[0], row[1], tuple(row[2].split(",")), row[3], row[4], row[5], row[6], row[7], row[8], row[9])
