"""Closed-loop load generator against a tiny in-process aiohttp server (no Ray, no Serve)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time

import pytest
from aiohttp import web

from dynray.errors import ConfigError
from dynray.bench.load import LoadConfig, LoadResult, RequestRecord, run_load, run_load_sync


class _Server:
    """Handlers for /ok, /slow, /fail and /text that count requests and peak concurrency."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: list[int] = []

    @contextlib.contextmanager
    def _track(self):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def ok(self, request: web.Request) -> web.Response:
        with self._track():
            assert request.content_type == "application/json"
            i = (await request.json())["i"]
            self.seen.append(i)
            await asyncio.sleep(0.01)
            return web.json_response({"i": i})

    async def slow(self, request: web.Request) -> web.Response:
        with self._track():
            await asyncio.sleep(2.0)
            return web.json_response({})

    async def fail(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "1"})

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text="hello", content_type="text/plain")


@contextlib.asynccontextmanager
async def _serve():
    srv = _Server()
    app = web.Application()
    app.add_routes([web.post("/ok", srv.ok), web.post("/slow", srv.slow), web.post("/fail", srv.fail), web.post("/text", srv.text)])
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield srv, f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _payload(i: int) -> dict:
    return {"i": i}


def test_every_request_answered_once_with_bounded_concurrency():
    progress: list[int] = []

    async def main() -> tuple[LoadResult, _Server]:
        async with _serve() as (srv, base):
            cfg = LoadConfig(url=f"{base}/ok", requests=200, concurrency=8)
            return await run_load(cfg, _payload, on_progress=progress.append), srv

    res, srv = asyncio.run(main())
    assert [r.index for r in res.records] == list(range(200))
    assert all(r.status == 200 and r.body == {"i": r.index} for r in res.records)
    assert sorted(srv.seen) == list(range(200))
    assert srv.max_in_flight == 8
    assert progress == list(range(1, 201))
    assert res.errors == 0 and res.status_counts() == {200: 200}
    assert res.rps > 100  # ideal is 8 / 10 ms = 800 req/s
    assert res.p50_ms >= 10 and res.p99_ms >= res.p50_ms
    assert all(0 <= r.started_s <= res.wall_s and r.retry_after is None for r in res.records)
    s = res.summary()
    assert s["requests"] == 200 and s["concurrency"] == 8 and s["errors"] == 0 and s["status"] == {200: 200}
    assert set(s) == {"requests", "concurrency", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "status"}
    assert s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    json.dumps(s)


def test_bytes_payload_and_warmup_not_recorded():
    async def main() -> tuple[LoadResult, _Server]:
        async with _serve() as (srv, base):
            cfg = LoadConfig(url=f"{base}/ok", requests=5, concurrency=2, warmup=7)
            return await run_load(cfg, lambda i: json.dumps({"i": i}).encode()), srv

    res, srv = asyncio.run(main())
    assert len(srv.seen) == 12  # 7 warmup (indices mod 5) + 5 measured
    assert sorted(srv.seen[:7]) == sorted(i % 5 for i in range(7))
    assert [r.index for r in res.records] == list(range(5))
    assert [r.body for r in res.records] == [{"i": i} for i in range(5)]


def test_per_request_timeout_gives_status_zero_quickly():
    async def main() -> LoadResult:
        async with _serve() as (_, base):
            return await run_load(LoadConfig(url=f"{base}/slow", requests=4, concurrency=4, timeout_s=0.2), _payload)

    t0 = time.perf_counter()
    res = asyncio.run(main())
    assert time.perf_counter() - t0 < 1.5
    assert [r.status for r in res.records] == [0] * 4
    assert all(150 <= r.latency_ms < 1000 and r.body is None for r in res.records)
    assert res.errors == 4 and res.rps == 0
    assert math.isnan(res.p50_ms) and res.summary()["p50_ms"] is None


def test_max_duration_cancels_in_flight_as_minus_one():
    async def main() -> LoadResult:
        async with _serve() as (_, base):
            cfg = LoadConfig(url=f"{base}/slow", requests=10, concurrency=3, timeout_s=5.0, max_duration_s=0.3)
            return await run_load(cfg, _payload)

    t0 = time.perf_counter()
    res = asyncio.run(main())
    assert time.perf_counter() - t0 < 1.5
    assert [r.index for r in res.records] == [0, 1, 2]  # only the first wave was issued
    assert res.status_counts() == {-1: 3} and res.errors == 3
    assert all(r.latency_ms >= 250 for r in res.records)
    assert 0.25 <= res.wall_s < 1.0


def test_503_counted_with_retry_after_and_text_body_is_none():
    async def main() -> tuple[LoadResult, LoadResult]:
        async with _serve() as (_, base):
            fail = await run_load(LoadConfig(url=f"{base}/fail", requests=6, concurrency=2), _payload)
            text = await run_load(LoadConfig(url=f"{base}/text", requests=3, concurrency=1), _payload)
            return fail, text

    fail, text = asyncio.run(main())
    assert fail.errors == 6 and fail.status_counts() == {503: 6}
    assert all(r.retry_after == "1" and r.body == {"error": "busy"} for r in fail.records)
    assert text.errors == 0 and all(r.status == 200 and r.body is None for r in text.records)


def test_connection_refused_is_status_zero():
    async def main() -> LoadResult:
        async with _serve() as (_, base):
            url = f"{base}/ok"
        return await run_load(LoadConfig(url=url, requests=3, concurrency=2, timeout_s=1.0), _payload)

    res = asyncio.run(main())
    assert res.status_counts() == {0: 3}


def test_payload_error_propagates():
    def bad(i: int) -> dict:
        raise KeyError(i)

    async def main() -> None:
        async with _serve() as (_, base):
            await run_load(LoadConfig(url=f"{base}/ok", requests=3, concurrency=2), bad)

    with pytest.raises(KeyError):
        asyncio.run(main())


@pytest.mark.parametrize(
    "kw",
    [
        {"url": "127.0.0.1:8000/v1/predict"},
        {"requests": 0},
        {"requests": 2.5},
        {"concurrency": 0},
        {"concurrency": True},
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"warmup": -1},
        {"max_duration_s": -1.0},
    ],
)
def test_bad_config_raises(kw):
    with pytest.raises(ConfigError):
        LoadConfig(**{"url": "http://127.0.0.1:1/x", **kw})


def test_result_math_and_percentile_bounds():
    recs = [RequestRecord(i, 200 if i < 4 else 500, float(10 * (i + 1)), None, 0.0, None) for i in range(5)]
    res = LoadResult(recs, 2.0, 4)
    assert res.rps == 2.0 and res.errors == 1 and res.status_counts() == {200: 4, 500: 1}
    assert res.latency_ms(0) == 10.0 and res.latency_ms(100) == 40.0 and res.p50_ms == 25.0
    with pytest.raises(ConfigError):
        res.latency_ms(101)


def test_run_load_sync_works_outside_and_refuses_inside_a_loop():
    results: list[LoadResult] = []

    async def main() -> None:
        async with _serve() as (_, base):
            cfg = LoadConfig(url=f"{base}/ok", requests=4, concurrency=2)
            # from a worker thread (no running loop) it works against the server on this loop
            results.append(await asyncio.to_thread(run_load_sync, cfg, _payload))
            with pytest.raises(ConfigError, match="await run_load"):
                run_load_sync(cfg, _payload)

    asyncio.run(main())
    assert [r.body for r in results[0].records] == [{"i": i} for i in range(4)]
