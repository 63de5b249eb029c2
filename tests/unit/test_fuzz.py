"""The fuzz harness itself, on a small local HTTP server: it finds a planted 5xx, keeps the
key out of what it reports, and reports none from a server that has none."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dynray.bench.fuzz import fuzz_ingress
from dynray.serving.payload import PredictRequest

KEY = "dk_0123456789ab_" + "s" * 43
SPEC = {"openapi": "3.1.0", "paths": {
    "/v1/predict": {"post": {"requestBody": {"content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}}},
    "/v1/health": {"get": {}},
}}


def _server(bug: bool):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _answer(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/openapi.json":
                return self._answer(200, SPEC)
            return self._answer(200 if self.path == "/v1/health" else 404, {})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw)
            except ValueError:
                return self._answer(400, {"error": "not JSON"})
            if bug and isinstance(body, dict) and "shape" in body:  # the planted bug: a schema field crashes it
                return self._answer(500, {"error": "internal error"})
            return self._answer(422 if self.path == "/v1/predict" else 404, {"error": "no"})

        do_PUT = do_DELETE = do_PATCH = do_POST

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("bug", [True, False])
def test_the_fuzz_run_finds_a_planted_5xx_and_reports_none_without_it(bug):
    srv = _server(bug)
    try:
        res = fuzz_ingress(f"http://127.0.0.1:{srv.server_address[1]}", key=KEY, cases=200, seed=0)
    finally:
        srv.shutdown()
    assert res.cases == 200 and res.healthy_after
    if bug:
        assert res.n_5xx > 0 and all(c["status"] == 500 for c in res.five_xx)
        assert not any(KEY in json.dumps(c) for c in res.five_xx)  # the key never lands in a report
    else:
        assert res.n_5xx == 0 and res.status.keys() <= {200, 400, 404, 422}, res.status
