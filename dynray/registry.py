"""Versioned model store: flat tensor dicts (safetensors, never pickle) plus JSON metadata.

Layout under ``$DYNRAY_HOME`` (default ``./.dynray``)::

    models/<name>/v<N>/model.safetensors   the weights
    models/<name>/v<N>/meta.json           caller meta + name, version, created_at, git_commit,
                                           parent, format, files {filename: sha256}
    models/<name>/v<N>/meta.json.sha256    hex digest of the meta.json bytes
    models/stages.json                     {"production": "name:v2", "staging": ...}
    models/.lock                           flock for version allocation and stage updates

A version is built in ``models/<name>/.tmp-<uuid>`` and renamed into place, so a half-written
version is never visible. ``load`` and ``verify`` check every digest before any weight is parsed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import torch

from dynray.errors import IntegrityError, RegistryError, UnknownNameError
from dynray.fileio import fsync_path as _fsync_path
from dynray.fileio import git_commit as _git_commit
from dynray.fileio import sha256_bytes as _sha256
from dynray.fileio import sha256_file as _sha256_file
from dynray.fileio import write_durable as _write_durable
from dynray.registry_bytes import (DEK_FILE, ENCRYPTION_SCHEME, FORMAT, INTEGRITY_FIX, META_DIGEST_FILE, META_FILE, VersionBytes, key_file, listed_files,
                                   rewrap_dir, verify_bytes, write_weights)
from dynray.security.crypto import Keyring, MasterKey

__all__ = ["ModelRegistry", "RegistryReader", "ModelInfo", "LoadedModel", "STAGES", "default_home"]

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("staging", "production")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_VERSION_DIR_RE = re.compile(r"v([1-9][0-9]*)")
_REF_VERSION_RE = re.compile(r"v?([1-9][0-9]*)")
_CANONICAL_REF_RE = re.compile(r"[a-z0-9][a-z0-9._-]*:v[1-9][0-9]*")
_MAX_RENAME_TRIES = 100
_TRAIN_FIX = "run `dynray train --dataset mnist-5k` (or `make demo`) to train and register a model"
_REF_FIX = "use NAME, NAME:vN, NAME:N, production or staging"


def default_home(home: str | os.PathLike | None = None) -> Path:
    """The registry home as an absolute path: ``home`` if given, else ``$DYNRAY_HOME``, else ``./.dynray``.

    The one place the home is resolved; every job, actor and the CLI go through it.
    """
    return Path(home or os.environ.get("DYNRAY_HOME") or "./.dynray").expanduser().resolve()


@dataclass(frozen=True)
class ModelInfo:
    """One registered version, as read from its ``meta.json`` (not integrity-checked)."""

    name: str
    """The model name, e.g. ``dynnet-mnist-5k``."""
    version: int
    """The version number, 1, 2, …"""
    path: Path
    """The version directory."""
    meta: dict
    """The full ``meta.json`` content."""
    stages: tuple[str, ...]
    """The stages this version holds now, e.g. ``("production",)``."""

    @property
    def ref(self) -> str:
        """The canonical reference ``name:vN``."""
        return f"{self.name}:v{self.version}"


@dataclass(frozen=True)
class LoadedModel:
    """A verified version and its tensors (on CPU)."""

    info: ModelInfo
    """The version's info, built from the verified ``meta.json``."""
    tensors: dict[str, torch.Tensor]
    """The stored tensors, by key."""


class RegistryReader(Protocol):
    """What serving and loading need of a registry: a local :class:`ModelRegistry`, or one
    on another node reached through Ray (``actors.registry.RemoteRegistry``)."""

    def resolve(self, ref: str | None = None) -> ModelInfo: ...

    def list(self, name: str | None = None) -> list[ModelInfo]: ...

    def load(self, ref: str | None = None) -> LoadedModel: ...


def _validate_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(
            "invalid model name", got=name,
            fix="use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    if name in STAGES:  # the ref "production" must stay unambiguous
        raise RegistryError("model name is reserved for a stage", got=name, fix="pick another name")
    return name


def _integrity(what: str, path: Path) -> IntegrityError:
    return IntegrityError(what, got=str(path), fix=INTEGRITY_FIX)


class ModelRegistry:
    """A versioned model store rooted at ``home`` (default :func:`default_home`)."""

    def __init__(self, home: str | Path | None = None, *, keyring: Keyring | None = None) -> None:
        self.home: Path = Path(home).expanduser().resolve() if home is not None else default_home()
        self.models_dir: Path = self.home / "models"
        self.keyring: Keyring = keyring if keyring is not None else Keyring.from_env()
        """Master keys: with one, new versions are encrypted (envelope, AES-256-GCM) and
        encrypted ones can be loaded. Default: ``DYNRAY_MASTER_KEY`` / ``_FILE`` (none: plaintext)."""

    # ----------------------------------------------------------------------------- writing
    def register(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        *,
        parent: str | None = None,
    ) -> ModelInfo:
        """Store ``tensors`` and ``meta`` as the next version of ``name`` and return its info.

        ``meta`` gains ``name``, ``version``, ``created_at``, ``git_commit``, ``parent``, ``format``
        and ``files`` (overwriting caller keys of those names). Everything is validated before
        anything is written; on failure nothing is left behind.
        """
        _validate_name(name)
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and k and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise RegistryError(
                "tensors must be a dict of non-empty str keys to torch.Tensor values",
                got=type(tensors).__name__, fix="pass model.state_dict() or a flat dict of tensors",
            )
        if not isinstance(meta, dict):
            raise RegistryError("meta must be a dict", got=type(meta).__name__,
                                fix="pass a JSON-serialisable dict")
        parent_ref = self.resolve(parent).ref if parent is not None else None
        extra = {"name": name, "version": 0, "created_at": "", "git_commit": _git_commit(),
                 "parent": parent_ref, "format": FORMAT, "files": {}}
        master = self.keyring.current
        if master is not None:
            extra["encryption"] = {"scheme": ENCRYPTION_SCHEME, "artifact": uuid.uuid4().hex}
        full = {**meta, **extra}
        try:  # reject before writing anything
            json.dumps(full)
        except (TypeError, ValueError) as e:
            raise RegistryError("meta is not JSON-serialisable", got=str(e),
                                fix="store only dicts, lists, str, numbers, bools and None in meta") from e
        overwritten = sorted(set(meta) & set(extra))
        if overwritten:
            log.debug("register %s: overwriting caller meta keys %s", name, overwritten)

        name_dir = self.models_dir / name
        tmp = name_dir / f".tmp-{uuid.uuid4().hex}"
        with self._lock():  # serialised with the cleanup below, which may remove name_dir
            created_name_dir = not name_dir.exists()
            name_dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        try:
            weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            write_weights(tmp, weights, full, master)
            full["files"] = {p.name: _sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != DEK_FILE}
            with self._lock():
                version = self._next_version(name_dir)
                for _ in range(_MAX_RENAME_TRIES):
                    full["version"] = version
                    full["created_at"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
                    meta_bytes = json.dumps(full, indent=2).encode()
                    _write_durable(tmp / META_FILE, meta_bytes)
                    _write_durable(tmp / META_DIGEST_FILE, (_sha256(meta_bytes) + "\n").encode())
                    _fsync_path(tmp)
                    target = name_dir / f"v{version}"
                    if not target.exists():  # rename() would silently replace an empty dir
                        try:
                            os.rename(tmp, target)
                            break
                        except OSError as e:
                            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                                raise
                    log.warning("register %s: v%d appeared concurrently, retrying", name, version)
                    version = max(version + 1, self._next_version(name_dir))
                else:
                    raise RegistryError(f"could not allocate a version for {name}", got=version,
                                        fix=f"check for stray directories in {name_dir}")
            _fsync_path(name_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_name_dir:
                with self._lock(), contextlib.suppress(OSError):
                    name_dir.rmdir()  # only succeeds if empty
            raise
        log.debug("registered %s:v%d at %s", name, version, target)
        return self._read_info(name, version)

    def promote(self, ref: str, stage: str) -> ModelInfo:
        """Point ``stage`` at the version ``ref`` resolves to (one version per stage)."""
        if stage not in STAGES:
            raise UnknownNameError("stage", str(stage), STAGES)
        info = self.resolve(ref)
        with self._lock():
            stages = self._read_stages(strict=True)
            previous = stages.get(stage)
            stages[stage] = info.ref
            self._write_stages(stages)
        log.debug("promoted %s to %s (was %s)", info.ref, stage, previous)
        return self._read_info(info.name, info.version)

    def rewrap(self, new: MasterKey) -> list[str]:
        """Re-wrap the data key of every encrypted version under ``new`` (the registry's
        keyring must open the old wraps); the sealed weights are not touched. Returns the refs."""
        done = []
        with self._lock():
            for v_name, version in self._version_dirs(None):
                path = self.models_dir / v_name / f"v{version}"
                if not (path / DEK_FILE).is_file():
                    continue
                rewrap_dir(path, f"{v_name}:v{version}", self.keyring, new)
                done.append(f"{v_name}:v{version}")
        return done

    # ----------------------------------------------------------------------------- reading
    def list(self, name: str | None = None) -> list[ModelInfo]:
        """All readable versions (of ``name`` if given; ``[]`` if it has none), sorted by name, version.

        Temp dirs are skipped; a version whose ``meta.json`` cannot be read is skipped with a
        warning (``load`` of it raises :class:`IntegrityError`).
        """
        stages = self._read_stages(strict=False)
        infos = []
        for v_name, version in self._version_dirs(name):
            try:
                infos.append(self._read_info(v_name, version, stages))
            except IntegrityError as e:
                log.warning("skipping %s:v%d: %s", v_name, version, e)
        return sorted(infos, key=lambda i: (i.name, i.version))

    def resolve(self, ref: str | None = None) -> ModelInfo:
        """Find a version: None (production, else newest), a stage, ``name``, ``name:vN`` or ``name:N``."""
        if not self._version_dirs(None):
            raise RegistryError(f"no models registered in {self.home}", fix=_TRAIN_FIX)
        if ref is None:
            if "production" in self._read_stages(strict=True):
                return self.resolve("production")
            # artifacts attached to a model version (e.g. its router) and other kinds (a cGAN
            # generator) are never the default model
            infos = [i for i in self.list() if not i.meta.get("attached_to") and i.meta.get("kind", "dynamic_net") == "dynamic_net"]
            if not infos:
                raise RegistryError(f"no readable models in {self.home}", fix=_TRAIN_FIX)
            return max(infos, key=lambda i: (_created(i), i.name, i.version))
        if not isinstance(ref, str) or not ref:
            raise RegistryError("invalid model ref", got=ref, fix=_REF_FIX)
        if ref in STAGES:
            target = self._read_stages(strict=True).get(ref)
            if target is None:
                raise RegistryError(f"no model in stage {ref!r}",
                                    fix=f"promote one: dynray models promote NAME:vN {ref}")
            name, version = self._parse_ref(target)
            if not (self.models_dir / name / f"v{version}").is_dir():
                raise RegistryError(f"stage {ref!r} points to missing version {target}",
                                    fix=f"promote another one: dynray models promote NAME:vN {ref}")
            return self._read_info(name, version)
        name, version = self._parse_ref(ref)
        versions = self._version_dirs(name)
        if not versions:
            names = sorted({n for n, _ in self._version_dirs(None)})
            raise UnknownNameError("model", name, names)
        if version is None:
            infos = self.list(name)
            if not infos:
                raise _integrity(f"no readable version of model {name}", self.models_dir / name)
            return infos[-1]
        if (name, version) not in versions:
            known = [f"{name}:v{v}" for _, v in sorted(versions, key=lambda nv: nv[1])]
            raise UnknownNameError("version", f"{name}:v{version}", known)
        return self._read_info(name, version)

    def show(self, ref: str | None = None) -> ModelInfo:
        """The info of ``ref`` (same forms as :meth:`resolve`); does not verify digests."""
        return self.resolve(ref)

    def verify(self, ref: str | None = None) -> ModelInfo:
        """Check every digest of ``ref`` and that its weights parse; raise IntegrityError if not."""
        info, _ = self._verified(self.resolve(ref))
        return info

    def load(self, ref: str | None = None) -> LoadedModel:
        """Resolve ``ref``, verify its integrity and return its tensors.

        The weights are hashed and parsed from the same bytes, so a file changed between the
        check and the load can never slip through.
        """
        info, tensors = self._verified(self.resolve(ref))
        return LoadedModel(info=info, tensors=tensors)

    # ----------------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.models_dir / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _next_version(name_dir: Path) -> int:
        nums = [int(m.group(1)) for p in name_dir.iterdir() if (m := _VERSION_DIR_RE.fullmatch(p.name))]
        return max(nums, default=0) + 1

    def _version_dirs(self, name: str | None) -> list[tuple[str, int]]:
        """(name, version) of every version directory, whether or not its meta is readable."""
        if not self.models_dir.is_dir():
            return []
        if name is not None:
            name_dirs = [self.models_dir / name] if _NAME_RE.fullmatch(name) else []
        else:
            name_dirs = [p for p in self.models_dir.iterdir() if _NAME_RE.fullmatch(p.name)]
        out = []
        for nd in name_dirs:
            if not nd.is_dir():
                continue
            for p in nd.iterdir():
                m = _VERSION_DIR_RE.fullmatch(p.name)
                if m and p.is_dir():
                    out.append((nd.name, int(m.group(1))))
        return sorted(out)

    @staticmethod
    def _parse_ref(ref: str) -> tuple[str, int | None]:
        name, sep, ver = ref.partition(":")
        if not name or (sep and not (m := _REF_VERSION_RE.fullmatch(ver))):
            raise RegistryError("invalid model ref", got=ref, fix=_REF_FIX)
        return name, (int(m.group(1)) if sep else None)

    def _read_stages(self, *, strict: bool) -> dict[str, str]:
        path = self.models_dir / "stages.json"
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not all(
                k in STAGES and isinstance(v, str) and _CANONICAL_REF_RE.fullmatch(v)
                for k, v in data.items()
            ):
                raise ValueError("expected {stage: 'name:vN'}")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            if strict:
                raise RegistryError(f"stage pointers unreadable: {e}", got=str(path),
                                    fix="fix or delete the file, then promote again: "
                                        "dynray models promote NAME:vN production") from e
            log.warning("ignoring unreadable %s: %s", path, e)
            return {}
        return data

    def _write_stages(self, stages: dict[str, str]) -> None:
        path = self.models_dir / "stages.json"
        tmp = self.models_dir / f".stages-{uuid.uuid4().hex}.tmp"
        try:
            _write_durable(tmp, (json.dumps(stages, indent=2, sort_keys=True) + "\n").encode())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_path(self.models_dir)

    def _read_info(self, name: str, version: int, stages: dict[str, str] | None = None) -> ModelInfo:
        path = self.models_dir / name / f"v{version}"
        try:
            meta = json.loads((path / META_FILE).read_bytes())
        except (OSError, ValueError) as e:
            raise _integrity(f"{META_FILE} of {name}:v{version} is unreadable ({e})", path / META_FILE) from e
        if not isinstance(meta, dict):
            raise _integrity(f"{META_FILE} of {name}:v{version} is not a JSON object", path / META_FILE)
        return self._info(name, version, path, meta, stages)

    def _info(self, name: str, version: int, path: Path, meta: dict,
              stages: dict[str, str] | None = None) -> ModelInfo:
        stages = self._read_stages(strict=False) if stages is None else stages
        ref = f"{name}:v{version}"
        held = tuple(s for s in STAGES if stages.get(s) == ref)
        return ModelInfo(name=name, version=version, path=path, meta=meta, stages=held)

    def read_bytes(self, ref: str | None = None) -> VersionBytes:
        """``ref``'s files as stored, unverified (for sending it to another node; the
        receiver checks it with :func:`dynray.registry_bytes.verify_bytes`)."""
        return self._bytes(self.resolve(ref))

    def _bytes(self, info: ModelInfo) -> VersionBytes:
        path, ref = info.path, info.ref
        try:
            meta_bytes = (path / META_FILE).read_bytes()
            digest = (path / META_DIGEST_FILE).read_text().strip()
        except OSError as e:
            raise _integrity(f"{ref}: cannot read {Path(e.filename or path / META_FILE).name}", path) from e
        files, missing = {}, {}
        for fname in listed_files(meta_bytes):
            if Path(fname).name != fname:
                continue  # verify_bytes refuses it
            try:
                files[fname] = (path / fname).read_bytes()
            except OSError as e:
                missing[fname] = str(e.strerror)
        wrapped = None
        if (kf := key_file(meta_bytes)) is not None:
            try:
                wrapped = (path / kf).read_bytes()
            except OSError:
                wrapped = None  # verify_bytes names it
        return VersionBytes(name=info.name, version=info.version, path=str(path), meta_bytes=meta_bytes, digest=digest, files=files, missing=missing,
                            stages=info.stages, wrapped_key=wrapped)

    def _verified(self, info: ModelInfo) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
        """Check meta.json's digest, every listed file's digest, and parse the weights."""
        meta, tensors = verify_bytes(self._bytes(info), self.keyring)
        return self._info(info.name, info.version, info.path, meta), tensors


def _created(info: ModelInfo) -> datetime:
    """The creation time from meta, for ordering; unparsable values sort first."""
    try:
        dt = datetime.fromisoformat(str(info.meta.get("created_at")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
