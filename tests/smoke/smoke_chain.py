"""Run several CLI invocations in one interpreter, one after another, sharing one Ray.

Each step is what a user types, ``python -m jobs.X ARGS`` (run through ``runpy`` as
``__main__``, the way ``python -m`` runs it) or ``dynray ARGS`` (the console script's
``dynray.cli:main``). The first job that calls ``jobs._ray.connect`` starts the embedded
local Ray and every later step attaches to it, so the smoke tier pays for one Ray start,
one interpreter start and one set of imports instead of one per command.

Run as a script (``python tests/smoke/smoke_chain.py SPEC.json``); :class:`ChainRun` starts
that in the background in a clean environment and splits the output back into one
:class:`Step` per invocation, by the marker lines this script prints to stdout and stderr
around every step.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_BEGIN = "<<<chain-begin {name}>>>"
_END = "<<<chain-end {name} rc={rc} s={s:.1f}>>>"
_MARK = re.compile(r"^<<<chain-(begin|end) (\S+)(?: rc=(-?\d+) s=([\d.]+))?>>>$")


@dataclass(frozen=True)
class Step:
    """One invocation's outcome, shaped like ``subprocess.CompletedProcess``."""

    name: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _invoke(kind: str, argv: list[str]) -> int:
    if kind == "module":  # python -m MODULE ARGS
        sys.argv = list(argv)
        import runpy

        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        return 0  # a __main__ block that returns without sys.exit
    if kind == "dynray":  # the console script
        from dynray.cli import main

        return main(list(argv))
    raise ValueError(f"unknown step kind {kind!r}: 'module' or 'dynray'")


def _run_steps(spec: list[dict]) -> int:
    for step in spec:
        name = step["name"]
        for stream in (sys.stdout, sys.stderr):
            print(_BEGIN.format(name=name), file=stream, flush=True)
        t0 = time.perf_counter()
        try:
            rc = _invoke(step["kind"], step["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except BaseException:  # noqa: BLE001 - the step fails, the later steps still run
            import traceback

            traceback.print_exc()
            rc = 99
        for stream in (sys.stdout, sys.stderr):
            print(_END.format(name=name, rc=rc, s=time.perf_counter() - t0), file=stream, flush=True)
    return 0


def _split(text: str) -> tuple[dict[str, list[str]], dict[str, tuple[int, float]]]:
    parts: dict[str, list[str]] = {}
    ends: dict[str, tuple[int, float]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _MARK.match(line.strip())
        if m and m.group(1) == "begin":
            current = m.group(2)
            parts[current] = []
        elif m:
            ends[m.group(2)] = (int(m.group(3)), float(m.group(4)))
            current = None
        elif current is not None:
            parts[current].append(line)
    return parts, ends


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


class ChainRun:
    """A chain started in the background (output to files, so no pipe fills and blocks it);
    :meth:`wait` gives one :class:`Step` per invocation."""

    def __init__(self, steps: list[tuple[str, str, list[str]]], env: dict[str, str], *, spec_dir: Path) -> None:
        self.names = [n for n, _, _ in steps]
        spec = spec_dir / "chain.json"
        spec.write_text(json.dumps([{"name": n, "kind": k, "argv": a} for n, k, a in steps]))
        self._out, self._err = spec_dir / "chain.stdout", spec_dir / "chain.stderr"
        with open(self._out, "w") as out, open(self._err, "w") as err:  # the child keeps its own descriptors
            self._proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec)], cwd=ROOT, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self._steps: dict[str, Step] | None = None

    def wait(self, timeout: float) -> dict[str, Step]:
        """Wait for the chain (killing it past ``timeout``); a step it never finished (a crash,
        the timeout) gets return code -1 and whatever output it had printed."""
        if self._steps is None:
            note = ""
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                note = f"\nchain: killed after {timeout:.0f}s"
            self._steps = self._parse(self._out.read_text(errors="replace"), self._err.read_text(errors="replace") + note)
        return self._steps

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _parse(self, out: str, err: str) -> dict[str, Step]:
        o_parts, ends = _split(out)
        e_parts, _ = _split(err)
        steps: dict[str, Step] = {}
        for name in self.names:
            rc, seconds = ends.get(name, (-1, 0.0))
            stderr = "\n".join(e_parts.get(name, []))
            if name not in ends:
                stderr += f"\n(step never finished; the interpreter's stderr ends with:)\n{err[-3000:]}"
            steps[name] = Step(name, rc, "\n".join(o_parts.get(name, [])), stderr, seconds)
        return steps

if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # what `python -m` puts first: the working directory, not this file's
    sys.exit(_run_steps(json.loads(Path(sys.argv[1]).read_text())))
