"""Command lines from frozen config dataclasses, and the exit-code contract of every entry point.

Every job's flags come from its ``Config``: :func:`parse` builds the parser with `tyro`_
(field docstrings become ``--help``, nested dataclasses become groups, ``Literal`` fields
become choices, ``bool`` fields get ``--x/--no-x``). tyro prints its errors as a boxed
panel; :func:`parse` turns that into the one line the CLI contract asks for (exit 2).

:func:`guarded` runs an entry point under the contract (DESIGN.md §4): 0 success, 2 bad
usage or input with one line naming the fix, 1 any other failure, 130 on Ctrl-C.

.. _tyro: https://brentyi.github.io/tyro/
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from dynray.errors import DynrayError

__all__ = ["UsageError", "parse", "guarded", "dynray_cause", "setup_logging"]

T = TypeVar("T")
_RULE = re.compile(r"^[\s\-─━═╌┄]+$")


class UsageError(DynrayError):
    """The command line itself is wrong (unknown flag, bad value, missing argument)."""


def _one_line(panel: str, prog: str) -> str:
    """tyro's error panel as one line: title, then the message, without rules and boxes."""
    lines = []
    for raw in panel.splitlines():
        s = raw.strip().strip("│╭╮╰╯─").strip()
        if s.startswith(("Argument helptext", "For full helptext", "Arguments are applied", "Perhaps you meant")):
            break  # what follows repeats the flag's help; the one line names the flag already
        if not s or _RULE.match(s):
            continue
        lines.append(s)
    if not lines:
        return f"bad arguments (see {prog} --help)"
    title, body = lines[0], " ".join(lines[1:])
    # the Config's own validation (ConfigError from __post_init__, of a nested config too, which tyro
    # names "__tyro-dummy-inner__.fed"): its message names the fix. A bad flag value ("Error parsing
    # --epochs: ...") keeps tyro's whole line, so the flag stays named.
    config_error = re.search(r"Error parsing (?!-)[\w.-]+: (.*)", body)
    if config_error:
        return config_error.group(1)
    return f"{title.rstrip(':')}: {body} (see {prog} --help)" if body else f"{title} (see {prog} --help)"


def parse(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str | None = None) -> T:
    """``cls`` built from ``argv`` (None: ``sys.argv[1:]``); ``--help`` prints and exits 0.

    Raises :class:`UsageError` (one line) for a bad command line, and lets the config's own
    ``ConfigError`` through, so both reach the caller before any work starts.
    """
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        return tyro.cli(cls, args=args, prog=prog, description=description)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(cls, args=args, prog=prog, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError(_one_line(buf.getvalue(), prog)) from None


def dynray_cause(e: BaseException) -> DynrayError | None:
    """A DynrayError raised inside a Ray worker arrives wrapped; find it in the chain."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if isinstance(cur, DynrayError):
            return cur
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "cause", None)
        seen += 1
    return None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for noisy in ("ray", "matplotlib", "PIL", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(fn: Callable[[], int | None], *, prog: str, verbose: bool = False) -> int:
    """Run ``fn`` under the exit-code contract; errors print one line to stderr."""
    try:
        rc = fn()
        return 0 if rc is None else int(rc)
    except SystemExit as e:  # --help, or an entry point that exits on its own
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the entry point's last line of defence
        if verbose:
            raise
        cause = dynray_cause(e)
        if cause is not None:
            print(f"{prog}: error: {cause.message}", file=sys.stderr)
            return 2
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"{prog}: failed: {type(e).__name__}: {first} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
