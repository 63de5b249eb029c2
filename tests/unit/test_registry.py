"""Unit tests for dynray.registry: pure torch + filesystem, no Ray."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from dynray import registry as registry_mod
from dynray import registry_bytes
from dynray.errors import IntegrityError, RegistryError, UnknownNameError
from dynray.registry import STAGES, LoadedModel, ModelInfo, ModelRegistry, default_home


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    return {
        "s1.weight": base,
        "s1.bias": torch.randn(6, generator=g, dtype=torch.float64),
        "exit1.weight": base.t(),  # non-contiguous and sharing storage with s1.weight
        "counts": torch.arange(5, dtype=torch.int64),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
    }


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "home")


def _version_dirs(reg: ModelRegistry, name: str) -> list[str]:
    d = reg.models_dir / name
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------- round trip
def test_round_trip_tensors_meta_and_added_fields(reg: ModelRegistry) -> None:
    tensors = _tensors()
    meta = {"config": {"stages": 3, "widths": [8, 16]}, "dataset": "mnist-5k", "metrics": {"acc": 0.97}}
    info = reg.register("dynnet-mnist-5k", tensors, meta)

    assert isinstance(info, ModelInfo)
    assert (info.name, info.version, info.ref) == ("dynnet-mnist-5k", 1, "dynnet-mnist-5k:v1")
    assert info.path == reg.models_dir / "dynnet-mnist-5k" / "v1"
    assert info.stages == ()
    assert meta == {"config": {"stages": 3, "widths": [8, 16]}, "dataset": "mnist-5k",
                    "metrics": {"acc": 0.97}}, "caller's dict must not be mutated"

    loaded = reg.load("dynnet-mnist-5k:v1")
    assert isinstance(loaded, LoadedModel)
    assert set(loaded.tensors) == set(tensors)
    for k, t in tensors.items():
        assert loaded.tensors[k].dtype == t.dtype
        assert torch.equal(loaded.tensors[k], t), k

    m = loaded.info.meta
    for k, v in meta.items():
        assert m[k] == v
    assert m["name"] == "dynnet-mnist-5k" and m["version"] == 1
    assert m["format"] == "dynray-model/1"
    assert m["parent"] is None
    assert "git_commit" in m and (m["git_commit"] is None or len(m["git_commit"]) >= 40)
    assert m["created_at"].endswith("+00:00")
    weights = info.path / "model.safetensors"
    assert m["files"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    meta_bytes = (info.path / "meta.json").read_bytes()
    assert (info.path / "meta.json.sha256").read_text().strip() == hashlib.sha256(meta_bytes).hexdigest()
    assert json.loads(meta_bytes) == m == info.meta
    assert reg.verify("dynnet-mnist-5k").ref == "dynnet-mnist-5k:v1"


def test_version_numbering_parent_and_list(reg: ModelRegistry) -> None:
    v1 = reg.register("net", _tensors(1), {"i": 1})
    v2 = reg.register("net", _tensors(2), {"i": 2}, parent="net")
    other = reg.register("alpha", _tensors(3), {}, parent="net:v1")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v2.meta["parent"] == "net:v1"
    assert other.meta["parent"] == "net:v1"
    assert [i.ref for i in reg.list()] == ["alpha:v1", "net:v1", "net:v2"]
    assert [i.ref for i in reg.list("net")] == ["net:v1", "net:v2"]
    assert reg.list("nope") == []
    assert _version_dirs(reg, "net") == ["v1", "v2"]
    with pytest.raises(UnknownNameError):
        reg.register("net", _tensors(), {}, parent="missing")
    assert _version_dirs(reg, "net") == ["v1", "v2"]


def test_resolve_forms_and_promote(reg: ModelRegistry) -> None:
    reg.register("net", _tensors(1), {})
    reg.register("net", _tensors(2), {})
    reg.register("other", _tensors(3), {})  # newest overall

    assert reg.resolve().ref == "other:v1"  # no production: newest by creation time
    assert reg.resolve("net").ref == "net:v2"
    assert reg.resolve("net:v1").ref == "net:v1"
    assert reg.resolve("net:1").ref == "net:v1"
    assert reg.show("net:v2").ref == "net:v2"
    for stage in STAGES:
        with pytest.raises(RegistryError, match=f"no model in stage '{stage}'.*promote"):
            reg.resolve(stage)

    info = reg.promote("net:v1", "production")
    assert info.stages == ("production",)
    assert reg.resolve().ref == "net:v1"
    assert reg.resolve("production").ref == "net:v1"
    assert reg.promote("net:2", "staging").stages == ("staging",)
    assert reg.resolve("staging").ref == "net:v2"

    # a stage holds one version: promoting moves it
    assert reg.promote("staging", "production").stages == ("staging", "production")
    assert reg.resolve().ref == "net:v2"
    by_ref = {i.ref: i.stages for i in reg.list()}
    assert by_ref == {"net:v1": (), "net:v2": ("staging", "production"), "other:v1": ()}
    assert json.loads((reg.models_dir / "stages.json").read_text()) == {
        "production": "net:v2", "staging": "net:v2"}
    assert reg.load().info.stages == ("staging", "production")

    with pytest.raises(UnknownNameError, match="known stages: production, staging"):
        reg.promote("net:v1", "prod")
    for bad in ("net:x", "net:v0", ":v1", "net:v1:v2"):
        with pytest.raises(RegistryError, match="invalid model ref"):
            reg.resolve(bad)


def test_unknown_name_and_version_list_close_matches(reg: ModelRegistry) -> None:
    reg.register("dynnet-mnist", _tensors(), {})
    reg.register("dynnet-mnist", _tensors(), {})
    with pytest.raises(UnknownNameError) as e:
        reg.resolve("dynnet-mnits")
    assert e.value.kind == "model"
    assert "did you mean dynnet-mnist" in str(e.value)
    with pytest.raises(UnknownNameError) as e:
        reg.load("dynnet-mnist:v3")
    assert e.value.kind == "version"
    assert e.value.known == ["dynnet-mnist:v1", "dynnet-mnist:v2"]
    assert "dynnet-mnist:v1" in str(e.value) and "dynnet-mnist:v2" in str(e.value)


def test_empty_registry_says_train(reg: ModelRegistry) -> None:
    for ref in (None, "production", "net", "net:v1"):
        with pytest.raises(RegistryError, match="dynray train") as e:
            reg.load(ref)
        assert not isinstance(e.value, UnknownNameError)
    assert reg.list() == []


# ------------------------------------------------------------------------------- integrity
@pytest.fixture
def stored(reg: ModelRegistry) -> ModelInfo:
    return reg.register("net", _tensors(), {"dataset": "mnist-5k"})


def test_flipped_weight_byte_is_refused(reg: ModelRegistry, stored: ModelInfo,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    weights = stored.path / "model.safetensors"
    _flip_byte(weights, weights.stat().st_size - 3)  # inside tensor data
    parsed: list[bytes] = []
    monkeypatch.setattr(registry_bytes, "st_load", lambda data: parsed.append(data) or {})
    with pytest.raises(IntegrityError) as e:
        reg.load("net")
    msg = str(e.value)
    assert "model.safetensors" in msg and "expected " + stored.meta["files"]["model.safetensors"][:12] in msg
    assert "dynray train" in msg and "\n" not in msg
    assert parsed == [], "weights must never be parsed from a file whose hash mismatches"
    with pytest.raises(IntegrityError):
        reg.verify("net:v1")
    assert reg.resolve("net").ref == "net:v1"  # resolve/show/list do not hash


def test_truncated_weights_are_refused(reg: ModelRegistry, stored: ModelInfo) -> None:
    weights = stored.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(IntegrityError, match="model.safetensors"):
        reg.load("net:v1")


def test_unparsable_weights_with_matching_hash_are_refused(reg: ModelRegistry, stored: ModelInfo) -> None:
    # rewrite the weights and both digests consistently: only the parse check can catch it
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"
    (stored.path / "model.safetensors").write_bytes(garbage)
    meta = dict(stored.meta, files={"model.safetensors": hashlib.sha256(garbage).hexdigest()})
    meta_bytes = json.dumps(meta).encode()
    (stored.path / "meta.json").write_bytes(meta_bytes)
    (stored.path / "meta.json.sha256").write_text(hashlib.sha256(meta_bytes).hexdigest())
    with pytest.raises(IntegrityError, match="does not parse as safetensors"):
        reg.load("net:v1")


def test_tampered_meta_is_refused(reg: ModelRegistry, stored: ModelInfo) -> None:
    meta_path = stored.path / "meta.json"
    meta_path.write_text(meta_path.read_text().replace("mnist-5k", "mnist-6k"))
    assert reg.show("net:v1").meta["dataset"] == "mnist-6k"  # readable, so listed
    with pytest.raises(IntegrityError, match="meta.json of net:v1 does not match"):
        reg.load("net:v1")


@pytest.mark.parametrize("missing", ["model.safetensors", "meta.json.sha256"])
def test_missing_file_is_refused(reg: ModelRegistry, stored: ModelInfo, missing: str) -> None:
    (stored.path / missing).unlink()
    with pytest.raises(IntegrityError, match=missing.replace(".", r"\.")):
        reg.load("net:v1")


def test_unreadable_meta_is_skipped_by_list_but_refused_by_load(
    reg: ModelRegistry, stored: ModelInfo, caplog: pytest.LogCaptureFixture
) -> None:
    reg.register("net", _tensors(1), {})
    (stored.path / "meta.json").write_text("{truncated")
    with caplog.at_level("WARNING", logger="dynray.registry"):
        assert [i.ref for i in reg.list()] == ["net:v2"]
    assert "net:v1" in caplog.text
    with pytest.raises(IntegrityError, match="meta.json"):
        reg.load("net:v1")
    assert reg.resolve("net").ref == "net:v2"


# ------------------------------------------------------------------------------- atomicity
def test_non_json_meta_leaves_nothing_behind(reg: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="not JSON-serialisable"):
        reg.register("net", _tensors(), {"labels": {1, 2, 3}})
    assert not (reg.models_dir / "net").exists()
    reg.register("net", _tensors(), {})
    with pytest.raises(RegistryError, match="not JSON-serialisable"):
        reg.register("net", _tensors(), {"obj": object()})
    assert _version_dirs(reg, "net") == ["v1"]


def test_failure_mid_write_removes_temp_dir(reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    reg.register("net", _tensors(), {})

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry_mod, "_write_durable", boom)
    with pytest.raises(OSError, match="disk full"):
        reg.register("net", _tensors(), {})
    assert _version_dirs(reg, "net") == ["v1"]
    with pytest.raises(OSError):
        reg.register("fresh", _tensors(), {})
    assert not (reg.models_dir / "fresh").exists()


def test_version_collision_retries_next_number(reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    reg.register("net", _tensors(), {})
    monkeypatch.setattr(ModelRegistry, "_next_version", staticmethod(lambda name_dir: 1))
    info = reg.register("net", _tensors(1), {"second": True})
    assert info.ref == "net:v2" and info.meta["version"] == 2
    assert reg.load("net:v2").info.meta["second"] is True
    assert reg.load("net:v1").info.meta.get("second") is None
    assert _version_dirs(reg, "net") == ["v1", "v2"]


def test_concurrent_registers_get_distinct_versions(reg: ModelRegistry) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            ModelRegistry(reg.home).register("net", _tensors(i), {"i": i})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [i.version for i in reg.list("net")] == [1, 2, 3, 4, 5, 6]
    assert sorted(reg.load(f"net:v{v}").info.meta["i"] for v in range(1, 7)) == list(range(6))


# ------------------------------------------------------------------------------- validation, home
@pytest.mark.parametrize("bad", ["Net", "-net", "", "a b", "net/x", "production", "net:v1", ".tmp-x"])
def test_bad_names_are_refused(reg: ModelRegistry, bad: str) -> None:
    with pytest.raises(RegistryError) as e:
        reg.register(bad, _tensors(), {})
    assert e.value.fix
    assert not reg.models_dir.exists() or not any(reg.models_dir.iterdir())


def test_bad_tensors_and_meta_are_refused(reg: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="torch.Tensor"):
        reg.register("net", {"w": [1.0, 2.0]}, {})  # type: ignore[dict-item]
    with pytest.raises(RegistryError, match="meta must be a dict"):
        reg.register("net", _tensors(), [("a", 1)])  # type: ignore[arg-type]
    assert reg.list() == []


def test_dynray_home_env_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNRAY_HOME", str(tmp_path / "envhome"))
    assert default_home() == (tmp_path / "envhome").resolve()
    reg = ModelRegistry()
    assert reg.home == (tmp_path / "envhome").resolve()
    reg.register("net", _tensors(), {})
    assert (tmp_path / "envhome" / "models" / "net" / "v1" / "model.safetensors").is_file()

    monkeypatch.delenv("DYNRAY_HOME")
    monkeypatch.chdir(tmp_path)
    assert default_home() == (tmp_path / ".dynray").resolve()
    assert ModelRegistry("rel").home == (tmp_path / "rel").resolve()
    assert ModelRegistry().home.is_absolute()


def test_git_commit_is_best_effort(reg: ModelRegistry, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import subprocess

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    monkeypatch.chdir(outside)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert reg.register("net", _tensors(), {}).meta["git_commit"] is None
    monkeypatch.setenv("PATH", "")  # no git at all: still registers
    assert reg.register("net", _tensors(), {}).meta["git_commit"] is None
    monkeypatch.undo()

    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *a: subprocess.run([git, "-C", str(repo), *a], check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    run("init", "-q")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    monkeypatch.chdir(repo)
    assert reg.register("net", _tensors(), {}).meta["git_commit"] == run("rev-parse", "HEAD")
