"""Fuzz a running ingress from its own OpenAPI schema: random bodies, headers and keys.

Cases are drawn by Hypothesis: for each path and method the ingress publishes at
``/openapi.json``, a body that follows the request schema (:func:`from_schema`),
random JSON, or raw bytes; a content type; an ``Authorization`` that is the valid key, a
mangled one, a random string or none; a random ``X-Request-Id``; now and then an unknown
path. The run counts every status and keeps each 5xx case. The ingress must answer none:
every bad input is a 4xx, and it keeps serving (``/v1/health`` answers 200 after the run).

Hypothesis comes with the test extras (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import requests

from dynray.errors import ConfigError

__all__ = ["FuzzResult", "from_schema", "fuzz_ingress"]


@dataclass(frozen=True)
class FuzzResult:
    cases: int
    status: dict[int, int]
    five_xx: list[dict] = field(default_factory=list)
    """The cases answered 5xx (method, path, headers without the key, body head, status)."""
    healthy_after: bool = False

    @property
    def n_5xx(self) -> int:
        return len(self.five_xx)


def from_schema(schema: dict, st, depth: int = 0):
    """Values following a JSON schema, for the subset pydantic emits for request models
    (``type``, ``anyOf``, ``enum``, ``properties``, ``items``, ``minItems``/``maxItems``);
    anything else gets arbitrary JSON. (hypothesis-jsonschema would do this, but its release
    breaks on current Hypothesis.)"""
    text = st.text(max_size=40)
    anything = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
    if depth > 5:
        return anything
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of(*(from_schema(s, st, depth + 1) for s in schema["anyOf"]))
    t = schema.get("type")
    if t == "object":
        props = schema.get("properties", {})
        return st.fixed_dictionaries({}, optional={k: from_schema(v, st, depth + 1) for k, v in props.items()})
    if t == "array":
        items = from_schema(schema.get("items", {}), st, depth + 1) if schema.get("items") else st.recursive(anything, lambda c: st.lists(c, max_size=4), max_leaves=20)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 8), 8))
    return {"string": text, "integer": st.integers(-(2**40), 2**40), "number": st.floats(allow_nan=False), "boolean": st.booleans(), "null": st.none()}.get(t, anything)


def _strategies(spec: dict, key: str | None):
    from hypothesis import strategies as st

    ops = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            ops.append((method.upper(), path, schema))
    if not ops:
        raise ConfigError("the OpenAPI spec lists no paths", fix="fuzz the ingress's /openapi.json")
    printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
    header = printable.map(str.strip)  # what a client library sends (requests refuses a value with edge whitespace before sending)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | printable,
                               lambda c: st.lists(c, max_size=6) | st.dictionaries(printable, c, max_size=6), max_leaves=30)
    auths = [st.none(), header, header.map(lambda s: "Bearer " + s)]
    if key:
        auths += [st.just(f"Bearer {key}"), st.integers(1, len(key) - 1).map(lambda n: f"Bearer {key[:n]}"),
                  st.just(f"Bearer {key[:-4]}AAAA"), st.just(key)]
    ctypes = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain", "image/png", "application/x-www-form-urlencoded"]) | header

    @st.composite
    def case(draw):
        method, path, schema = draw(st.sampled_from(ops))
        if draw(st.integers(0, 19)) == 0:
            path = "/" + draw(printable).replace("?", "").replace("#", "").lstrip("/")
        kind = draw(st.sampled_from(["schema", "json", "bytes"] if schema else ["json", "bytes", "none"]))
        if kind == "schema":
            body = json.dumps(draw(from_schema(schema, st))).encode()
        elif kind == "json":
            body = json.dumps(draw(json_values)).encode()
        elif kind == "bytes":
            body = draw(st.binary(max_size=2048))
        else:
            body = b""
        headers = {}
        if (auth := draw(st.one_of(*auths))) is not None:
            headers["Authorization"] = auth
        if (ct := draw(ctypes)) is not None:
            headers["Content-Type"] = ct
        if draw(st.booleans()):
            headers["X-Request-Id"] = draw(header)
        if draw(st.integers(0, 9)) == 0:
            method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
        return method, path, headers, body

    return case()


def fuzz_ingress(base_url: str, *, key: str | None, cases: int = 300, seed: int = 0, timeout_s: float = 30.0) -> FuzzResult:
    """Send ``cases`` drawn requests to the ingress at ``base_url`` (no trailing slash)."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import seed as hseed
    except ImportError:
        raise ConfigError("the fuzz run needs hypothesis", fix="pip install -e '.[test]' (make venv installs it)") from None
    spec = requests.get(f"{base_url}/openapi.json", timeout=timeout_s).json()
    status: Counter[int] = Counter()
    bad: list[dict] = []
    session = requests.Session()

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(c=_strategies(spec, key))
    def one(c) -> None:
        method, path, headers, body = c
        try:
            r = session.request(method, f"{base_url}{path}", data=body, headers=headers, timeout=timeout_s)
            code = r.status_code
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL) as e:  # refused by the client library, never sent
            raise ConfigError("the fuzz drew a request the client cannot send", got=repr(e), fix="a bug in dynray.bench.fuzz's strategies") from e
        except requests.RequestException as e:  # the ingress dropped the connection: as bad as a 5xx
            code, r = 599, None
            body = body + f" [{type(e).__name__}]".encode()
        status[code] += 1
        if code >= 500:
            shown = {k: ("<key>" if key and key in v else v) for k, v in headers.items()}
            bad.append({"method": method, "path": path, "headers": shown, "body": body[:200].decode("latin-1"), "status": code,
                        "answer": (r.text[:300] if r is not None else "")})

    one()
    healthy = requests.get(f"{base_url}/v1/health", timeout=timeout_s).status_code == 200
    return FuzzResult(cases=sum(status.values()), status=dict(sorted(status.items())), five_xx=bad, healthy_after=healthy)
