"""int8 quantisation of a DynamicNet with PyTorch's own eager-mode stack (``torch.ao.quantization``).

Why this stack: with the pinned torch 2.14.1, ``torch.ao.quantization`` still runs and gives
real int8 CPU kernels (fbgemm / x86) in eager mode, though it warns that it is deprecated
for torchao. torchao 0.18's eager ``quantize_`` covers ``nn.Linear`` only (a conv stays
float), and its static conv path is PT2E, whose int8 kernels appear only after
``torch.compile`` with Inductor, which every serving replica would have to pay for. The
warnings are silenced in this module only.

What is quantised, as the issue asks:
- **convolutions, static**: every run of Conv2d / BatchNorm2d / ReLU / MaxPool2d inside a stage
  becomes ``quant -> fused int8 ConvReLU ... -> dequant``, with activation ranges observed on a
  calibration set. Stages keep float tensors at their boundaries, so batch compaction, the
  edge/cloud split and the MoE blocks (kept float) work unchanged.
- **linear layers, dynamic**: the exit heads' (and MLP stages') ``nn.Linear`` become int8
  weights with per-batch activation scales.

The registry stores flat plain tensors (safetensors, no pickle): :func:`int8_state` turns each
quantised tensor into its int8 values, scales and zero points, and :func:`int8_from_state`
rebuilds the quantised model from the float config and those tensors.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from dynray.errors import ConfigError, InputValidationError
from dynray.models.dynamic import DynamicNet
from dynray.models.moe import MoEBlock

__all__ = ["ENGINES", "quantize_int8", "int8_state", "int8_from_state", "is_int8"]

ENGINES = ("x86", "fbgemm", "qnnpack")
_STATIC = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)


@contextlib.contextmanager
def _ao() -> Iterator[None]:
    """torch.ao.quantization warns on every call that it is deprecated (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def _use_engine(engine: str) -> None:
    if engine not in ENGINES or engine not in torch.backends.quantized.supported_engines:
        raise ConfigError("unknown or unsupported quantisation engine", got=engine, fix=f"use one of {[e for e in ENGINES if e in torch.backends.quantized.supported_engines]}")
    if torch.backends.quantized.engine != engine:  # process-wide: the int8 kernels read it at call time
        torch.backends.quantized.engine = engine


class Int8Segment(nn.Module):
    """A run of static-quantisable layers: float in, int8 inside, float out."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.body = body
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.body(self.quant(x)))  # [b, ...] float -> int8 -> float


def _fuse(body: nn.Sequential) -> None:
    mods, groups, i = list(body), [], 0
    while i < len(mods):
        if isinstance(mods[i], nn.Conv2d):
            j = i + 1
            if j < len(mods) and isinstance(mods[j], nn.BatchNorm2d):
                j += 1
            if j < len(mods) and isinstance(mods[j], nn.ReLU):
                j += 1
            if j - i > 1:
                groups.append([str(k) for k in range(i, j)])
            i = j
        else:
            i += 1
    if groups:
        torch.ao.quantization.fuse_modules(body, groups, inplace=True)


def _segment(stage: nn.Sequential) -> nn.Sequential:
    """Group the stage's layers: static-quantisable runs become :class:`Int8Segment`."""
    out: list[nn.Module] = []
    run: list[nn.Module] = []
    for m in stage:
        if isinstance(m, _STATIC):
            run.append(m)
            continue
        if any(isinstance(r, nn.Conv2d) for r in run):
            out.append(Int8Segment(nn.Sequential(*run)))
        else:
            out += run
        run = []
        out.append(m)
    if any(isinstance(r, nn.Conv2d) for r in run):
        out.append(Int8Segment(nn.Sequential(*run)))
    else:
        out += run
    return nn.Sequential(*out)


def _structure(model: DynamicNet, engine: str) -> list[Int8Segment]:
    """In place: segment and fuse the stages, attach qconfigs. Returns the static segments."""
    segments: list[Int8Segment] = []
    qconfig = torch.ao.quantization.get_default_qconfig(engine)
    for k, stage in enumerate(model.stages):
        if not isinstance(stage, nn.Sequential):
            raise ConfigError("int8 quantisation needs Sequential stages", got=type(stage).__name__, fix="quantise a model built by dynray.models.build")
        model.stages[k] = seg = _segment(stage)
        for m in seg:
            if isinstance(m, Int8Segment):
                _fuse(m.body)
                m.qconfig = qconfig
                segments.append(m)
    return segments


def _dynamic_linears(model: DynamicNet) -> None:
    """In place: int8 dynamic quantisation of every Linear outside the MoE blocks."""
    parts: list[nn.Module] = list(model.exits)
    for stage in model.stages:
        parts += [m for m in stage if not isinstance(m, (MoEBlock, Int8Segment))]
    for part in parts:
        torch.ao.quantization.quantize_dynamic(part, {nn.Linear}, dtype=torch.qint8, inplace=True)


def quantize_int8(model: DynamicNet, calib: torch.Tensor, *, engine: str = "x86", batch_size: int = 256) -> DynamicNet:
    """An int8 copy of ``model``: static int8 convolutions calibrated on ``calib``
    ([N, *input_shape] in [0, 1], e.g. 512 training images), dynamic int8 linear layers."""
    _use_engine(engine)
    if not isinstance(calib, torch.Tensor) or calib.dim() != len(model.cfg.input_shape) + 1 or calib.shape[0] == 0:
        raise InputValidationError(
            "the calibration set is empty or not a batch of inputs", got=tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__,
            fix=f"pass [N, {', '.join(map(str, model.cfg.input_shape))}] images with N >= 1 (e.g. 512 training images)",
        )
    q = copy.deepcopy(model).eval()
    with _ao():
        segments = _structure(q, engine)
        for s in segments:
            torch.ao.quantization.prepare(s, inplace=True)
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch_size):
                q(calib[i : i + batch_size].float())  # observers record each segment's activation ranges
        for s in segments:
            torch.ao.quantization.convert(s, inplace=True)
        _dynamic_linears(q)
    q.int8_engine = engine  # type: ignore[attr-defined]
    return q


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Segment) for m in model.modules()) or any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def int8_state(model: DynamicNet) -> dict[str, torch.Tensor]:
    """The quantised model's state as plain tensors (int8 values, float scales, int zero points)."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        if t.is_quantized:
            if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                out[key + "::int8"] = t.int_repr()
                out[key + "::scales"] = t.q_per_channel_scales().to(torch.float64)
                out[key + "::zero_points"] = t.q_per_channel_zero_points().to(torch.int64)
                out[key + "::axis"] = torch.tensor(t.q_per_channel_axis())
            else:
                out[key + "::int8"] = t.int_repr()
                out[key + "::scales"] = torch.tensor([t.q_scale()], dtype=torch.float64)
                out[key + "::zero_points"] = torch.tensor([t.q_zero_point()], dtype=torch.int64)
        else:
            out[key] = t

    with _ao():
        for key, v in model.state_dict().items():
            if isinstance(v, torch.Tensor):
                put(key, v)
            elif isinstance(v, tuple):  # dynamic Linear: _packed_params._packed_params = (weight, bias)
                put(key + ".0", v[0])
                if v[1] is not None:
                    put(key + ".1", v[1])
            # else: the packed params' dtype (always torch.qint8 here) is rebuilt by the skeleton
    return out


def _qtensor(flat: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    values, scales, zps = flat[key + "::int8"], flat[key + "::scales"], flat[key + "::zero_points"]
    if key + "::axis" in flat:
        return torch._make_per_channel_quantized_tensor(values, scales, zps, int(flat[key + "::axis"]))
    return torch._make_per_tensor_quantized_tensor(values, float(scales[0]), int(zps[0]))


def int8_from_state(model: DynamicNet, flat: dict[str, torch.Tensor], *, engine: str = "x86") -> DynamicNet:
    """Rebuild an int8 model from ``model`` (the float network built from the stored config) and
    the plain tensors of :func:`int8_state`. Raises KeyError naming a missing tensor."""
    _use_engine(engine)
    skel = quantize_int8(model, torch.zeros(1, *model.cfg.input_shape), engine=engine)
    with _ao():
        ref = skel.state_dict()
        state = type(ref)()
        state._metadata = ref._metadata  # type: ignore[attr-defined]  # the quantised modules' load reads their format version from it
        for key, v in ref.items():
            if isinstance(v, torch.Tensor):
                state[key] = _qtensor(flat, key) if v.is_quantized else flat[key]
            elif isinstance(v, tuple):
                w = _qtensor(flat, key + ".0")
                b = flat.get(key + ".1")
                state[key] = (w, b)
            else:
                state[key] = v
        skel.load_state_dict(state)
    return skel.eval()
