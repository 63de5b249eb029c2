"""POST /v1/predict body: round trips of the three input forms, every refusal and a fuzz loop."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dynray.errors import ConfigError, RequestError
from dynray.serving.payload import (
    read_body,
    ALLOWED_KEYS,
    DecodedRequest,
    ErrorResponse,
    PayloadLimits,
    PredictRequest,
    PredictResponse,
    decode_json,
    decode_request,
    encode_array,
    encode_inputs,
    encode_png,
)

JSON = "application/json"
GRAY = PayloadLimits(input_shape=(1, 8, 8), max_items=4, max_body_bytes=64 * 1024)
RGB = PayloadLimits(input_shape=(3, 8, 8), max_items=4, max_body_bytes=64 * 1024)


def _images(n: int = 3, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _png_b64(arr: np.ndarray, mode: str | None = None) -> str:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(obj: object, limits: PayloadLimits = GRAY) -> DecodedRequest:
    return decode_request(_body(obj), JSON, limits)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 3])
def test_array_float32_round_trip_is_exact(c):
    x = _images(c=c)
    out = _decode(encode_array(x), GRAY if c == 1 else RGB)
    assert out.images.dtype == torch.float32 and out.images.is_contiguous()
    assert torch.equal(out.images, x)
    assert out.model_version is None and out.router is None


def test_array_uint8_round_trip_within_half_a_step():
    x = _images(n=4)
    body = encode_array(x, dtype="uint8")
    assert body["dtype"] == "uint8" and body["shape"] == [4, 1, 8, 8]
    assert len(base64.b64decode(body["array_b64"])) == 4 * 64
    out = _decode(body).images
    assert (out - x).abs().max() <= 0.5 / 255 + 1e-6
    assert out.min() >= 0 and out.max() <= 1


def test_array_accepts_numpy_and_exact_endpoints():
    x = np.array([0.0, 1.0] * 32, dtype=np.float64).reshape(1, 1, 8, 8)
    for dtype in ("float32", "uint8"):
        assert torch.equal(_decode(encode_array(x, dtype=dtype)).images, torch.from_numpy(x).float())


@pytest.mark.parametrize("c", [1, 3])
def test_png_round_trip_within_one_step(c):
    x = _images(c=c, seed=1)
    body = encode_png(x)
    assert len(body["images_png_b64"]) == 3
    assert base64.b64decode(body["images_png_b64"][0]).startswith(b"\x89PNG")
    out = _decode(body, GRAY if c == 1 else RGB).images
    assert out.shape == x.shape and (out - x).abs().max() <= 1 / 255


def test_inputs_round_trip_is_exact_and_options_pass_through():
    x = _images(n=2)
    out = _decode({**encode_inputs(x), "model_version": "v3", "router": "learned"})
    assert torch.equal(out.images, x)
    assert (out.model_version, out.router) == ("v3", "learned")


def test_inputs_accept_hw_items_when_one_channel():
    x = _images(n=2)
    out = _decode({"inputs": x[:, 0].tolist()}).images
    assert out.shape == (2, 1, 8, 8) and torch.equal(out, x)
    with pytest.raises(RequestError) as ei:
        _decode({"inputs": _images(n=2, c=3)[:, 0].tolist()}, RGB)
    assert ei.value.status == 422 and "shape" in ei.value.message


def test_null_options_mean_default_and_integers_are_numbers():
    out = _decode({"inputs": [[[0, 1] * 4] * 8], "model_version": None, "router": None})
    assert out.images.shape == (1, 1, 8, 8) and out.model_version is None and out.router is None


@pytest.mark.parametrize("ct", ["application/json", "application/json; charset=utf-8", "Application/JSON ;x=y"])
def test_content_type_parameters_are_accepted(ct):
    assert decode_request(_body(encode_array(_images(n=1))), ct, GRAY).images.shape == (1, 1, 8, 8)


def test_decode_json_takes_a_parsed_object():
    assert decode_json(encode_array(_images(n=1)), GRAY).images.shape == (1, 1, 8, 8)


# --- refusals -----------------------------------------------------------------------------

_ARR = encode_array(_images(n=2))
_U8 = encode_array(_images(n=2), dtype="uint8")
_PNG = encode_png(_images(n=1))["images_png_b64"][0]
_NAN = np.full((1, 1, 8, 8), 0.5, dtype="<f4")
_NAN[0, 0, 3, 3] = np.nan
_INF = np.full((1, 1, 8, 8), 0.5, dtype="<f4")
_INF[0, 0, 0, 0] = np.inf
_ROW = [0.5] * 8


def _raw(a: np.ndarray) -> dict:
    return {"array_b64": base64.b64encode(a.tobytes()).decode(), "dtype": "float32", "shape": list(a.shape)}


REFUSALS = [
    # 415: content type
    (415, _body(_ARR), None),
    (415, _body(_ARR), "text/plain"),
    (415, _body(_ARR), "application/jsonl"),
    (415, _body(_ARR), "multipart/form-data; boundary=x"),
    # 413: body size and batch limit
    (413, b" " * (GRAY.max_body_bytes + 1), JSON),
    (413, _body(encode_inputs(_images(n=5))), JSON),
    (413, _body(encode_array(_images(n=5), dtype="uint8")), JSON),
    (413, _body({**_ARR, "shape": [10**30, 1, 8, 8]}), JSON),
    (413, _body({"images_png_b64": [_PNG] * 5}), JSON),
    # 400: not JSON, not an object, not exactly one form
    (400, b"", JSON),
    (400, b"{not json", JSON),
    (400, b"\xff\xfe{}", JSON),
    (400, '{"inputs": "\u00e9"}'.encode("latin-1"), JSON),
    (400, b"[" * 20_000, JSON),
    (400, b"[1, 2]", JSON),
    (400, b'"inputs"', JSON),
    (400, b"null", JSON),
    (400, b"{}", JSON),
    (400, _body({"model_version": "v1"}), JSON),
    (400, _body({**_ARR, "inputs": [[_ROW] * 8]}), JSON),
    (400, _body({"inputs": [], "images_png_b64": []}), JSON),
    # 422: unknown keys, wrong option types
    (422, _body({**_ARR, "input": 1}), JSON),
    (422, _body({**_ARR, "model_version": 3}), JSON),
    (422, _body({**_ARR, "router": ["a"]}), JSON),
    (422, _body({"inputs": [[_ROW] * 8], "dtype": "float32"}), JSON),
    # 422: inputs
    (422, _body({"inputs": []}), JSON),
    (422, _body({"inputs": "abc"}), JSON),
    (422, _body({"inputs": {"a": 1}}), JSON),
    (422, _body({"inputs": [[_ROW] * 7 + [[0.5] * 7]]}), JSON),
    (422, _body({"inputs": [[_ROW] * 8, [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[_ROW] * 7 + [0.5]]}), JSON),
    (422, _body({"inputs": [0.5, 0.5]}), JSON),
    (422, _body({"inputs": [[[[_ROW] * 8]]]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + ["0.5"]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [True]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [None]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [{}]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [1.5]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [-0.1]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [10**400]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [1e300]] + [_ROW] * 7]}), JSON),
    (422, _body({"inputs": [[[0.5] * 7 + [float("nan")]] + [_ROW] * 7]}), JSON),  # json.dumps writes NaN
    (422, _body({"inputs": [[[0.5] * 7 + [float("-inf")]] + [_ROW] * 7]}), JSON),  # and -Infinity
    # 422: array_b64
    (422, _body({**_ARR, "dtype": "int8"}), JSON),
    (422, _body({**_ARR, "dtype": None}), JSON),
    (422, _body({"array_b64": _ARR["array_b64"], "dtype": "float32"}), JSON),
    (422, _body({**_ARR, "shape": [2, 1, 64]}), JSON),
    (422, _body({**_ARR, "shape": [2, 1, 8, 8, 1]}), JSON),
    (422, _body({**_ARR, "shape": [2, 1, 8, "8"]}), JSON),
    (422, _body({**_ARR, "shape": [2, True, 8, 8]}), JSON),
    (422, _body({**_ARR, "shape": [2.0, 1, 8, 8]}), JSON),
    (422, _body({**_ARR, "shape": "2,1,8,8"}), JSON),
    (422, _body({**_ARR, "shape": [0, 1, 8, 8]}), JSON),
    (422, _body({**_ARR, "shape": [-1, 1, 8, 8]}), JSON),
    (422, _body({**_ARR, "shape": [2, 3, 8, 8]}), JSON),
    (422, _body({**_ARR, "shape": [1, 1, 8, 8]}), JSON),
    (422, _body({**_U8, "dtype": "float32"}), JSON),
    (422, _body({**_ARR, "array_b64": _ARR["array_b64"][:-4]}), JSON),
    (422, _body({**_ARR, "array_b64": "!!!!"}), JSON),
    (422, _body({**_ARR, "array_b64": _ARR["array_b64"][:-1]}), JSON),
    (422, _body({**_ARR, "array_b64": "\u00e9\u00e9\u00e9\u00e9"}), JSON),
    (422, _body({**_ARR, "array_b64": 12}), JSON),
    (422, _body(_raw(_NAN)), JSON),
    (422, _body(_raw(_INF)), JSON),
    (422, _body(_raw(np.full((1, 1, 8, 8), 1.001, dtype="<f4"))), JSON),
    (422, _body(_raw(np.full((1, 1, 8, 8), -0.001, dtype="<f4"))), JSON),
    # 422: PNG
    (422, _body({"images_png_b64": []}), JSON),
    (422, _body({"images_png_b64": _PNG}), JSON),
    (422, _body({"images_png_b64": [7]}), JSON),
    (422, _body({"images_png_b64": ["not base64!"]}), JSON),
    (422, _body({"images_png_b64": [base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 40).decode()]}), JSON),
    (422, _body({"images_png_b64": [_PNG[:40] + "A" * 8 + _PNG[48:]]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 9), np.uint8))]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 8, 3), np.uint8))]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 8, 4), np.uint8))]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 8), np.uint8), "LA")]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 8), np.uint8), "P")]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 8), np.uint8), "I;16")]}), JSON),
    (422, _body({"images_png_b64": [_png_b64(np.zeros((8, 8), np.uint8), "1")]}), JSON),
    (422, _body({"images_png_b64": [_PNG, 5]}), JSON),
]


@pytest.mark.parametrize(("status", "body", "ct"), REFUSALS, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(REFUSALS)])
def test_refusals_carry_status_and_fix(status, body, ct):
    with pytest.raises(RequestError) as ei:
        decode_request(body, ct, GRAY)
    assert ei.value.status == status, ei.value.message
    assert "fix: " in ei.value.message and "\n" not in ei.value.message


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"inputs": [[[0.5] * 7 + [float("nan")]] + [_ROW] * 7]}, "NaN or Inf"),
        ({"inputs": [[[0.5] * 7 + [1.5]] + [_ROW] * 7]}, "must be in [0, 1]"),
        ({"inputs": [[_ROW] * 8, [_ROW] * 7]}, "ragged"),
        ({"inputs": [[[0.5] * 7 + [10**400]] + [_ROW] * 7]}, "too large"),
        ({"inputs": [[[0.5] * 7 + [True]] + [_ROW] * 7]}, "got 'bool'"),
        ({**_ARR, "array_b64": _ARR["array_b64"][:-4]}, "send exactly 512 bytes"),
        ({**_ARR, "shape": [2, 3, 8, 8]}, "send shape [N, 1, 8, 8]"),
        ({"images_png_b64": [_png_b64(np.zeros((8, 9), np.uint8))]}, "got '8x9'; fix: resize to 8x8"),
    ],
)
def test_refusal_messages_say_what_and_how_to_fix(obj, needle):
    with pytest.raises(RequestError) as ei:
        _decode(obj)
    assert needle in ei.value.message


def test_body_may_be_any_bytes_like():
    body = _body(encode_array(_images(n=1)))
    for b in (bytearray(body), memoryview(body)):
        assert decode_request(b, JSON, GRAY).images.shape == (1, 1, 8, 8)


def test_png_channels_must_match_the_model_both_ways():
    with pytest.raises(RequestError, match="channels") as ei:
        _decode({"images_png_b64": [_PNG]}, RGB)
    assert ei.value.status == 422 and "RGB" in ei.value.fix


def test_unknown_key_names_the_allowed_keys_and_suggests():
    with pytest.raises(RequestError) as ei:
        _decode({"input": [[_ROW] * 8]})
    assert ei.value.status == 422 and "did you mean inputs" in ei.value.fix
    assert all(k in ei.value.fix for k in ALLOWED_KEYS)


def test_limits_are_per_instance():
    roomy = PayloadLimits(input_shape=(1, 8, 8), max_items=8)
    assert _decode(encode_array(_images(n=8)), roomy).images.shape[0] == 8
    body = _body(encode_array(_images(n=4)))
    with pytest.raises(RequestError) as ei:
        decode_request(body, JSON, PayloadLimits(input_shape=(1, 8, 8), max_body_bytes=len(body) - 1))
    assert ei.value.status == 413
    exact = PayloadLimits(input_shape=(1, 8, 8), max_body_bytes=len(body))
    assert decode_request(body, JSON, exact).images.shape[0] == 4


def test_payload_limits_validate_and_normalise():
    assert PayloadLimits(input_shape=[1, 28, 28]).input_shape == (1, 28, 28)
    assert PayloadLimits(input_shape=(1, 28, 28)).max_items == 256
    for bad in [dict(input_shape=(1, 28)), dict(input_shape=(0, 28, 28)), dict(input_shape=(1, 28, 28.0)),
                dict(input_shape="128"), dict(input_shape=(1, 28, 28), max_items=0),
                dict(input_shape=(1, 28, 28), max_items=True), dict(input_shape=(1, 28, 28), max_body_bytes=-5)]:
        with pytest.raises(ConfigError):
            PayloadLimits(**bad)


def test_encoders_refuse_bad_input():
    with pytest.raises(ValueError):
        encode_array(np.zeros((8, 8)))
    with pytest.raises(ValueError):
        encode_array(np.zeros((1, 1, 8, 8)), dtype="float16")
    with pytest.raises(ValueError):
        encode_png(np.zeros((1, 2, 8, 8)))


def test_openapi_models_document_the_contract():
    schema = PredictRequest.model_json_schema()
    assert set(schema["properties"]) == set(ALLOWED_KEYS) and schema["additionalProperties"] is False
    assert all(p.get("description") for p in schema["properties"].values())
    resp = PredictResponse(predictions=[3], probabilities=[[0.1, 0.9]], exit=[1], tier=["edge"],
                           model_version="v1", degraded=False, latency_ms=1.5)
    assert json.loads(resp.model_dump_json())["tier"] == ["edge"]
    with pytest.raises(ValueError):
        PredictResponse(**{**resp.model_dump(), "tier": ["moon"]})
    assert ErrorResponse(error="x").error == "x"


# --- fuzz ---------------------------------------------------------------------------------


def _random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, 1, -1, 0.5, 1e308, 10**20, float("nan"), float("inf")])
    if kind == 2:
        return rng.random()
    if kind == 3:
        return rng.choice(["", "uint8", "float32", "AAAA", "x" * rng.randrange(20), _PNG[: rng.randrange(len(_PNG))]])
    if kind == 4:
        return [rng.random() for _ in range(rng.randrange(10))]
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = list(ALLOWED_KEYS) + ["x", ""]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(rng: random.Random, obj: dict) -> object:
    obj = dict(obj)
    key = rng.choice(list(obj) + ["shape", "dtype", "model_version"])
    if rng.random() < 0.3:
        obj.pop(key, None)
    else:
        obj[key] = _random_json(rng)
    return obj


def _fuzz_bodies(n: int) -> list[bytes]:
    rng = random.Random(1234)
    valid = [_body(_ARR), _body(_U8), _body({"images_png_b64": [_PNG]}), _body(encode_inputs(_images(n=1)))]
    valid_objs = [_ARR, _U8, {"images_png_b64": [_PNG]}, encode_inputs(_images(n=1))]
    out = []
    for i in range(n):
        mode = i % 5
        if mode == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
        elif mode == 1:
            b = rng.choice(valid)
            out.append(b[: rng.randrange(len(b))])
        elif mode == 2:
            out.append(json.dumps(_random_json(rng)).encode())
        elif mode == 3:
            out.append(json.dumps(_mutate(rng, rng.choice(valid_objs))).encode())
        else:
            b = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(32, 127)  # stays UTF-8: reaches the decoder
            out.append(bytes(b))
    return out


def test_fuzz_only_request_errors_or_success(caplog):
    outcomes = {"ok": 0}
    for body in _fuzz_bodies(1000):
        try:
            out = decode_request(body, JSON, GRAY)
        except RequestError as exc:
            assert 400 <= exc.status < 500
            outcomes[exc.status] = outcomes.get(exc.status, 0) + 1
        else:
            assert out.images.dtype == torch.float32 and out.images.shape[1:] == (1, 8, 8)
            assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
            outcomes["ok"] += 1
    assert outcomes[400] > 100 and outcomes[422] > 100 and outcomes["ok"] > 10  # it reaches past parsing
    assert not [r for r in caplog.records if r.name == "dynray.serving.payload"], "a parser gap was wrapped"


async def _counted(n_chunks: int, size: int, consumed: list[int]):
    for _ in range(n_chunks):
        consumed.append(size)
        yield b"x" * size


def test_read_body_stops_at_the_chunk_that_passes_the_limit():
    consumed: list[int] = []
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(_counted(1000, 100, consumed), 1000))
    assert e.value.status == 413 and "stopped reading" in e.value.message
    assert len(consumed) == 11  # 1100 bytes > 1000: the 989 chunks after it were never pulled
    assert asyncio.run(read_body(_counted(10, 100, []), 1000)) == b"x" * 1000  # exactly the limit is fine


@pytest.mark.parametrize("declared, status", [("1001", 413), ("-5", 400), ("ten", 400), ("\u0663", 400), ("", 400)])
def test_read_body_checks_a_declared_length_before_reading(declared, status):
    consumed: list[int] = []
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(_counted(5, 100, consumed), 1000, declared))
    assert e.value.status == status and consumed == []
    assert asyncio.run(read_body(_counted(5, 100, []), 1000, " 500 ")) == b"x" * 500
