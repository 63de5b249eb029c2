"""The body of ``POST /v1/predict``: reading, decoding, validation, client encoders, OpenAPI models.

Pure (no Ray, no FastAPI). :func:`read_body` reads a body from its chunks and stops with a
413 as soon as it passes the size limit (a chunked upload has no Content-Length to check
first). :func:`decode_request` turns the raw body into an
``[N, C, H, W]`` float32 tensor in [0, 1] or raises :class:`~dynray.errors.RequestError`
with the 4xx status to answer (400 malformed, 413 too large, 415 not JSON, 422 invalid
values). The body holds exactly one input form: ``inputs`` (nested lists),
``images_png_b64`` (8-bit PNGs) or ``array_b64`` + ``dtype`` + ``shape`` (raw
little-endian bytes, the fast path), plus optional ``model_version`` and ``router``.
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from dynray.errors import ConfigError, RequestError

__all__ = [
    "FORMS", "ALLOWED_KEYS", "PayloadLimits", "DecodedRequest", "read_body", "decode_request", "decode_json",
    "encode_array", "encode_png", "encode_inputs", "PredictRequest", "PredictResponse", "FeedbackRequest", "FeedbackResponse", "ErrorResponse",
]

logger = logging.getLogger(__name__)

FORMS = ("inputs", "images_png_b64", "array_b64")
ALLOWED_KEYS = (*FORMS, "dtype", "shape", "model_version", "router")
_DTYPES = {"uint8": "<u1", "float32": "<f4"}
_PNG_MODES = {"L": 1, "RGB": 3}


@dataclass(frozen=True, kw_only=True)
class PayloadLimits:
    """What a request may hold for the served model."""

    input_shape: tuple[int, int, int]
    """(C, H, W) of one image, as the served model expects it."""
    max_items: int = 256
    """Most images in one request (the batch limit); more is a 413."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body in bytes; more is a 413."""

    def __post_init__(self) -> None:
        shape = self.input_shape
        if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(_pos_int(d) for d in shape)):
            raise ConfigError("input_shape must be 3 positive ints (C, H, W)", got=shape, fix="e.g. (1, 28, 28)")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in shape))
        for name in ("max_items", "max_body_bytes"):
            if not _pos_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive int", got=getattr(self, name), fix="pass an int >= 1")


@dataclass(frozen=True)
class DecodedRequest:
    """A validated predict request."""

    images: torch.Tensor
    """[N, C, H, W] float32 in [0, 1], contiguous."""
    model_version: str | None
    """Version the client asked for, or None for the served default."""
    router: str | None
    """Router the client asked for, or None for the default."""


def _pos_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _err(status: int, what: str, got: object = None, fix: str = "") -> RequestError:
    return RequestError(what, status=status, got=got, fix=fix)


def _too_large(limit: int, got: object) -> RequestError:
    return _err(413, f"request body over {limit} bytes", got,
                "send fewer images per request, or array_b64 with dtype uint8 (the most compact form)")


async def read_body(chunks: AsyncIterable[bytes], max_bytes: int, content_length: str | None = None) -> bytes:
    """The whole body, read chunk by chunk; 413 as soon as it passes ``max_bytes``.

    A declared ``content_length`` over the limit is refused before reading anything, one that
    is not a number is a 400; a chunked body (no length) is refused at the first chunk that
    takes it past the limit, and the rest is never read.
    """
    if content_length is not None:
        text = content_length.strip()
        if not (text.isascii() and text.isdigit()):
            raise _err(400, "Content-Length is not a non-negative integer", content_length[:40], "send the body's byte count, or use chunked transfer encoding")
        if int(text) > max_bytes:
            raise _too_large(max_bytes, int(text))
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > max_bytes:
            raise _too_large(max_bytes, f"more than {len(buf) - len(chunk)} bytes (stopped reading)")
    return bytes(buf)


def decode_request(body: bytes, content_type: str | None, limits: PayloadLimits) -> DecodedRequest:
    """Check the content type and size, parse the JSON and decode it (see :func:`decode_json`)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise _err(415, "request body must be JSON", content_type or "(no Content-Type)",
                   "send header Content-Type: application/json")
    if len(body) > limits.max_body_bytes:
        raise _too_large(limits.max_body_bytes, len(body))
    try:
        obj = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _err(400, "request body is not UTF-8", str(exc)[:80], "encode the JSON body as UTF-8") from None
    except Exception as exc:  # JSONDecodeError, RecursionError (deep nesting), int-digit limit
        raise _err(400, "request body is not valid JSON", str(exc)[:80], "send one JSON object") from None
    return decode_json(obj, limits)


def decode_json(obj: object, limits: PayloadLimits) -> DecodedRequest:
    """Validate a parsed JSON body and decode its one input form into images."""
    try:
        return _decode_json(obj, limits)
    except RequestError:
        raise
    except Exception as exc:  # a parser gap: still the client's 4xx, never a 500
        logger.warning("unexpected error decoding a predict body", exc_info=True)
        raise _err(422, "request body could not be decoded", type(exc).__name__,
                   f"send one of {', '.join(FORMS)} as documented in /docs") from None


def _decode_json(obj: object, limits: PayloadLimits) -> DecodedRequest:
    if not isinstance(obj, dict):
        raise _err(400, "request body must be a JSON object", type(obj).__name__, f"send {{\"{FORMS[0]}\": [...]}}")
    unknown = sorted(str(k) for k in obj if k not in ALLOWED_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], ALLOWED_KEYS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise _err(422, "unknown field(s) in request body", ", ".join(unknown)[:120],
                   f"{hint}allowed keys: {', '.join(ALLOWED_KEYS)}")
    forms = [k for k in FORMS if k in obj]
    if len(forms) != 1:
        raise _err(400, "request body must hold exactly one input form", forms or None,
                   f"send exactly one of {', '.join(FORMS)}")
    if forms[0] != "array_b64" and ("dtype" in obj or "shape" in obj):
        got = [k for k in ("dtype", "shape") if k in obj]
        raise _err(422, f"dtype and shape go with array_b64 only, not {forms[0]}", got, "drop dtype and shape")
    opts: dict[str, str | None] = {}
    for key in ("model_version", "router"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise _err(422, f"{key} must be a string", type(value).__name__, f'send "{key}": "..." or leave it out')
        opts[key] = value
    if forms[0] == "inputs":
        images = _decode_inputs(obj["inputs"], limits)
    elif forms[0] == "images_png_b64":
        images = _decode_pngs(obj["images_png_b64"], limits)
    else:
        images = _decode_array(obj["array_b64"], obj.get("dtype"), obj.get("shape"), limits)
    return DecodedRequest(images=images.contiguous(), model_version=opts["model_version"], router=opts["router"])


def _check_count(n: int, form: str, limits: PayloadLimits) -> None:
    if n > limits.max_items:
        raise _err(413, f"{form} holds more than {limits.max_items} images", n, "split the batch into smaller requests")
    if n == 0:
        raise _err(422, f"{form} holds no images", 0, "send at least one image")


def _check_range(arr: np.ndarray, form: str) -> None:
    lo, hi = float(arr.min()), float(arr.max())  # NaN propagates; inf shows up at an end
    got = f"min {lo:.6g}, max {hi:.6g}"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise _err(422, f"{form} holds NaN or Inf", got, "send finite values in [0, 1]")
    if lo < 0.0 or hi > 1.0:
        raise _err(422, f"{form} values must be in [0, 1]", got, "scale pixels to [0, 1] (uint8 / 255)")


def _check_leaves(node: list | tuple, depth: int) -> None:
    """Walk nested lists: every leaf a real number (no str, bool or null), at most 4 deep."""
    if depth > 4:
        raise _err(422, "inputs nests deeper than [N, C, H, W]", depth, "send a list of [C, H, W] images")
    if node and isinstance(node[0], (list, tuple)):
        for child in node:
            if not isinstance(child, (list, tuple)):
                raise _err(422, "inputs is ragged (lists mixed with numbers)", type(child).__name__,
                           "give every image the same nested shape")
            _check_leaves(child, depth + 1)
        return
    bad = set(map(type, node)) - {int, float}
    if bad:
        names = ", ".join(sorted(t.__name__ for t in bad))
        what = "inputs is ragged (lists mixed with numbers)" if bad & {list, tuple} else "inputs must hold numbers only"
        raise _err(422, what, names, "send numbers in [0, 1] (no strings, booleans or null)")


def _decode_inputs(items: object, limits: PayloadLimits) -> torch.Tensor:
    if not isinstance(items, list):
        raise _err(422, "inputs must be a list of images", type(items).__name__, "send [[C, H, W] nested lists, ...]")
    _check_count(len(items), "inputs", limits)
    _check_leaves(items, 1)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.asarray(items, dtype=np.float32)
    except OverflowError:
        raise _err(422, "inputs holds a number too large for float32", fix="send numbers in [0, 1]") from None
    except (ValueError, TypeError):
        raise _err(422, "inputs is ragged (nested lists of different lengths)",
                   fix="give every image the same nested shape") from None
    c, h, w = limits.input_shape
    if arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        arr = arr.reshape(arr.shape[0], 1, h, w)
    if arr.shape[1:] != (c, h, w) or arr.ndim != 4:
        fix = f"send a list of [{c}, {h}, {w}] images" + (f" (or [{h}, {w}])" if c == 1 else "")
        raise _err(422, "inputs images have the wrong shape", f"inputs of shape {list(arr.shape)}", fix)
    _check_range(arr, "inputs")
    return torch.from_numpy(arr)


def _b64(s: object, what: str) -> bytes:
    if not isinstance(s, str):
        raise _err(422, f"{what} must be a base64 string", type(s).__name__, "send standard base64 text")
    try:
        return base64.b64decode(s, validate=True)
    except ValueError as exc:  # binascii.Error, non-ASCII text
        raise _err(422, f"{what} is not valid base64", str(exc)[:80],
                   "send standard padded base64 (A-Z a-z 0-9 + /), no line breaks or data: prefix") from None


def _decode_pngs(items: object, limits: PayloadLimits) -> torch.Tensor:
    from PIL import Image  # a dependency of torchvision; torchvision.io image codecs are deprecated

    if not isinstance(items, list):
        raise _err(422, "images_png_b64 must be a list of strings", type(items).__name__, 'send ["<base64 png>", ...]')
    _check_count(len(items), "images_png_b64", limits)
    c, h, w = limits.input_shape
    out = np.empty((len(items), c, h, w), dtype=np.uint8)
    for i, s in enumerate(items):
        raw = _b64(s, f"images_png_b64[{i}]")
        undecodable = _err(422, f"images_png_b64[{i}] is not a decodable PNG", fix="send PNG files")
        try:
            img = Image.open(io.BytesIO(raw), formats=["PNG"])  # lazy: size and mode from the header
        except Exception:
            raise undecodable from None
        if img.size != (w, h):
            raise _err(422, f"images_png_b64[{i}] has the wrong size", f"{img.size[1]}x{img.size[0]}",
                       f"resize to {h}x{w} (height x width)")
        if _PNG_MODES.get(img.mode) != c:
            want = "8-bit grayscale (mode L)" if c == 1 else "8-bit RGB (no alpha, no palette)"
            raise _err(422, f"images_png_b64[{i}] has the wrong channels for a {c}-channel model", img.mode,
                       f"save it as {want}")
        try:
            px = np.asarray(img, dtype=np.uint8)  # decodes only now, after the size check
        except Exception:
            raise undecodable from None
        out[i] = px[None] if c == 1 else px.transpose(2, 0, 1)
    return torch.from_numpy(out).to(torch.float32).div_(255.0)


def _decode_array(s: object, dtype: object, shape: object, limits: PayloadLimits) -> torch.Tensor:
    want = "[N, {}, {}, {}]".format(*limits.input_shape)
    if not (isinstance(dtype, str) and dtype in _DTYPES):
        got = dtype[:40] if isinstance(dtype, str) else type(dtype).__name__
        raise _err(422, "dtype must be uint8 or float32", got, 'send "dtype": "uint8" or "float32"')
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d >= 0 for d in shape)):
        raise _err(422, "shape must be 4 non-negative ints [N, C, H, W]", str(shape)[:60], f"send {want}")
    _check_count(shape[0], "array_b64", limits)
    if tuple(shape[1:]) != limits.input_shape:
        raise _err(422, "array_b64 images have the wrong shape", shape[1:], f"send shape {want}")
    raw = _b64(s, "array_b64")
    need = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
    if len(raw) != need:
        raise _err(422, "array_b64 byte count does not match shape and dtype", f"{len(raw)} bytes",
                   f"send exactly {need} bytes: N*C*H*W little-endian {dtype} values")
    flat = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
    if dtype == "uint8":
        return torch.from_numpy(np.divide(flat, np.float32(255.0), dtype=np.float32))
    _check_range(flat, "array_b64")
    return torch.from_numpy(flat.astype(np.float32))  # copies: native order, writable


def _as_uint8_or_f32(images: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if dtype == "uint8":
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype="<f4")
    raise ValueError(f"dtype must be uint8 or float32, got {dtype!r}")


def encode_array(images: np.ndarray | torch.Tensor, *, dtype: str = "float32") -> dict[str, Any]:
    """``{"array_b64", "dtype", "shape"}`` for [N, C, H, W] images in [0, 1]; uint8 stores round(x*255)."""
    arr = _as_uint8_or_f32(images, dtype)
    return {"array_b64": base64.b64encode(arr.tobytes()).decode("ascii"), "dtype": dtype, "shape": list(arr.shape)}


def encode_png(images: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """``{"images_png_b64": [...]}``: one 8-bit PNG per [C, H, W] image (C is 1 or 3)."""
    from PIL import Image

    arr = _as_uint8_or_f32(images, "uint8")
    if arr.shape[1] not in (1, 3):
        raise ValueError(f"PNG needs 1 or 3 channels, got {arr.shape[1]}")
    out = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"images_png_b64": out}


def encode_inputs(images: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """``{"inputs": nested lists}`` for [N, C, H, W] images in [0, 1]."""
    return {"inputs": _as_uint8_or_f32(images, "float32").tolist()}


class PredictRequest(BaseModel):
    """Body of POST /v1/predict: exactly one of inputs, images_png_b64 or array_b64."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[Any] | None = Field(None, description="Batch of images as nested lists [N, C, H, W] "
                                     "(or [N, H, W] for 1-channel models), values in [0, 1].")
    images_png_b64: list[str] | None = Field(None, description="Base64 8-bit PNGs of size H x W; grayscale for "
                                             "1-channel models, RGB for 3-channel. Pixels are divided by 255.")
    array_b64: str | None = Field(None, description="Base64 raw little-endian array of `shape` and `dtype`.")
    dtype: Literal["uint8", "float32"] | None = Field(None, description="array_b64 dtype: uint8 (/255) or "
                                                      "float32 (in [0, 1]).")
    shape: list[int] | None = Field(None, min_length=4, max_length=4, description="array_b64 shape [N, C, H, W].")
    model_version: str | None = Field(None, description="Model version to serve from; default: the served one.")
    router: str | None = Field(None, description="Router to use; default: the deployment's.")


class PredictResponse(BaseModel):
    """200 answer of POST /v1/predict, one entry per image in each list."""

    predictions: list[int] = Field(description="Predicted class per image.")
    probabilities: list[list[float]] = Field(description="Class probabilities per image.")
    exit: list[int] = Field(description="Exit index each image left the network at.")
    tier: list[Literal["edge", "cloud"]] = Field(description="Where each image was finished.")
    model_version: str = Field(description="Model version that answered.")
    degraded: bool = Field(description="True when the answer came from a fallback (e.g. cloud unreachable, or a failed MoE expert's work rerouted).")
    latency_ms: float = Field(description="Server-side time to answer, in milliseconds.")
    expert_rerouted: list[bool] | None = Field(None, description="Per image: an MoE expert failed and the next-best expert by gate score answered instead.")
    device_failures: int = Field(0, description="Device calls that failed while answering (each retried or failed over); 0 normally.")
    failed_calls: dict[Literal["edge", "cloud"], int] = Field(default_factory=dict, description="device_failures per tier, e.g. {\"edge\": 1}; {} normally.")


class FeedbackRequest(BaseModel):
    """Body of POST /v1/feedback: the true label(s) of an earlier predict answer."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(description="The X-Request-Id of the predict answer (send your own X-Request-Id with the predict to know it in advance).")
    label: int | None = Field(None, description="True class of a one-image request.")
    labels: list[int] | None = Field(None, description="True class of each image, in the request's order (instead of label).")


class FeedbackResponse(BaseModel):
    """200 answer of POST /v1/feedback."""

    request_id: str = Field(description="The answered request the labels were for.")
    model_version: str = Field(description="Model version that answered it.")
    router: str = Field(description="Router that answered it.")
    exit: list[int] = Field(description="Exit each image left at.")
    correct: list[bool] = Field(description="Whether each answer was right.")
    evidence: int = Field(description="Images where the hybrid's policy overrode the thresholds: they moved rl_weight.")
    rl_weight: float | None = Field(None, description="The hybrid's trust in its policy after this label (null: not a hybrid answer).")
    live_accuracy: dict[str, float] = Field(description="Live accuracy of the exits these labels touched, after them.")


class ErrorResponse(BaseModel):
    """4xx/5xx answer: one line saying what was wrong, what was received and the fix."""

    error: str = Field(description="What was wrong; got ...; fix: ... (500: just \"internal error\")")
    request_id: str | None = Field(None, description="The request's id, also in the X-Request-Id header: quote it when reporting a 500.")
