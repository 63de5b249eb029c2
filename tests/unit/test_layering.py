"""Imports go one way, ``jobs -> actors -> dynray``, and no two modules import each other.

Every ``import`` statement counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (never run). The one allowed upward edge is the CLI face,
``dynray/cli.py``, which imports jobs lazily; nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dynray", "actors", "jobs")
RANK = {"dynray": 0, "actors": 1, "jobs": 2}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: set[str]) -> set[tuple[str, tuple[str, ...]]]:
    """(imported internal module, names taken from it) for every import that can run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[tuple[str, tuple[str, ...]]] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] in PACKAGES:
                        out.add((a.name, ()))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                if base.split(".")[0] not in PACKAGES:
                    continue
                names = tuple(a.name for a in child.names)
                subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
                for s in subs:  # `from pkg import submodule` is an edge to the submodule
                    out.add((s, ()))
                rest = tuple(n for n in names if f"{base}.{n}" not in known)
                if rest or not subs:
                    out.add((base, rest))
            visit(child)

    visit(tree)
    return out


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, tuple[str, ...]]]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    edges = []
    for m, p in mods.items():
        for target, names in _imports(p, m, known):
            t = target
            while t not in known and "." in t:  # `import a.b.c` of a name that is not a module
                t = t.rsplit(".", 1)[0]
            assert t in known, f"{m} imports {target}, which is not a module of this project"
            if t != m:
                graph[m].add(t)
                edges.append((m, t, names))
    return graph, edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_circles():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_imports_go_one_way():
    _, edges = _graph()
    upward = [(a, b) for a, b, _ in edges if a != "dynray.cli" and RANK[b.split(".")[0]] > RANK[a.split(".")[0]]]
    assert upward == []


def test_nothing_imports_the_cli_and_no_job_takes_another_jobs_private_names():
    _, edges = _graph()
    assert [(a, b) for a, b, _ in edges if b == "dynray.cli"] == []
    private = [(a, b, n) for a, b, names in edges for n in names
               if b.startswith("jobs.") and a.startswith("jobs.") and a != b and n.startswith("_") and b != "jobs._ray"]
    assert private == []


@pytest.mark.parametrize("bad, expect", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(bad, expect):
    assert _cycles(bad) == expect
