"""One error hierarchy for dynray.

Every error carries what was wrong, the value received and the fix, so the CLI can print
one line and exit 2 (bad usage or input) without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "DynrayError",
    "ConfigError",
    "UnknownNameError",
    "DatasetNotFoundError",
    "RegistryError",
    "IntegrityError",
    "InputValidationError",
    "CalibrationError",
    "RequestError",
    "ServingError",
    "CryptoError",
]


class DynrayError(Exception):
    """Base class: a user-facing error with a one-line message that names the fix."""

    def __init__(self, what: str, *, got: object = None, fix: str = "") -> None:
        self.what = what
        self.got = got
        self.fix = fix
        super().__init__(self.message)

    def __reduce__(self):
        # rebuilt from its fields, whatever the subclass's __init__ takes: errors cross Ray
        # actors and tasks pickled
        return _rebuild, (type(self), self.__dict__.copy())

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.got is not None:
            parts.append(f"got {self.got!r}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "; ".join(parts)


def _rebuild(cls: type, state: dict) -> DynrayError:
    err = cls.__new__(cls)
    err.__dict__.update(state)
    Exception.__init__(err, err.message)
    return err


class ConfigError(DynrayError, ValueError):
    """A config field holds an invalid value."""


class UnknownNameError(DynrayError, KeyError):
    """A name (dataset, backbone, model, version, stop rule…) is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str], *, fix: str = "") -> None:
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        super().__init__(
            f"unknown {kind}",
            got=name,
            fix=fix or f"{hint}known {kind}s: {', '.join(known) if known else '(none)'}",
        )
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class DatasetNotFoundError(DynrayError, FileNotFoundError):
    """Dataset files are missing offline and could not be downloaded."""


class RegistryError(DynrayError):
    """The model registry cannot do what was asked (missing model, bad stage, …)."""


class IntegrityError(RegistryError):
    """A stored file is truncated, corrupt or was changed after it was written."""


class CryptoError(IntegrityError):
    """An encrypted artifact cannot be opened: tampered, truncated, or the master key is wrong or missing."""


class InputValidationError(DynrayError, ValueError):
    """An input tensor passed to the model API has the wrong shape, dtype or values."""


class CalibrationError(DynrayError, ValueError):
    """A calibration target cannot be met on the validation split."""


class RequestError(InputValidationError):
    """An HTTP request the server refuses; ``status`` is the 4xx code to answer with.

    400 malformed body, 413 too large or too many items, 415 wrong content type,
    422 well-formed but invalid values (shape, dtype, NaN/Inf).
    """

    def __init__(self, what: str, *, status: int, got: object = None, fix: str = "") -> None:
        if not 400 <= status < 500:
            raise ValueError(f"RequestError status must be a 4xx code, got {status}")
        self.status = status
        super().__init__(what, got=got, fix=fix)


class ServingError(DynrayError):
    """The serving graph cannot be started, reached or stopped as asked."""
