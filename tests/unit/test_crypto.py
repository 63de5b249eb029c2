"""Envelope encryption (dynray.security.crypto) and encrypted registry versions: round trip,
and a refusal for each tamper: bit flip, truncation, wrong key, swapped metadata, swapped key."""

import hashlib
import json

import pytest
import torch

from dynray.errors import CryptoError, IntegrityError
from dynray.registry import ModelRegistry
from dynray.security.crypto import Keyring, MasterKey, Sealed, generate_master_key, open_sealed, rewrap, seal

META = {"kind": "test", "model": "net", "artifact": "a1"}


def _key() -> MasterKey:
    return MasterKey.parse(generate_master_key(), source="test")


@pytest.fixture
def k1():
    return _key()


def test_round_trip_and_fresh_data_key(k1):
    s1, s2 = seal(b"weights" * 100, META, k1), seal(b"weights" * 100, META, k1)
    assert s1.data != s2.data and s1.wrapped != s2.wrapped  # fresh data key and nonce each time
    assert b"weights" not in s1.data
    plain, meta = open_sealed(s1, Keyring((k1,)), expect_metadata=META)
    assert plain == b"weights" * 100 and meta == META


def test_bit_flip_in_ciphertext_refused(k1):
    s = seal(b"x" * 64, META, k1)
    data = bytearray(s.data)
    data[-20] ^= 0x01
    with pytest.raises(CryptoError, match="failed authentication"):
        open_sealed(Sealed(bytes(data), s.wrapped), Keyring((k1,)))


@pytest.mark.parametrize("cut", [1, 16, 70])
def test_truncation_refused(k1, cut):
    s = seal(b"x" * 64, META, k1)
    with pytest.raises(CryptoError, match="truncated"):
        open_sealed(Sealed(s.data[:-cut], s.wrapped), Keyring((k1,)))


def test_wrong_and_missing_key_refused(k1):
    s = seal(b"x", META, k1)
    with pytest.raises(CryptoError, match="another master key"):
        open_sealed(s, Keyring((_key(),)))
    with pytest.raises(CryptoError, match="no master key is set"):
        open_sealed(s, Keyring())


def test_swapped_metadata_refused(k1):
    a, b = seal(b"a" * 32, META, k1), seal(b"b" * 32, {**META, "artifact": "a2"}, k1)
    # b's header (metadata) on a's ciphertext: the wrap is bound to the header, so it fails there
    hb = b.data[: len(b.data) - 48]
    with pytest.raises(CryptoError):
        open_sealed(Sealed(hb + a.data[-48:], a.wrapped), Keyring((k1,)))
    # edited metadata with the right length: authentication fails
    forged = a.data.replace(b'"artifact":"a1"', b'"artifact":"a9"')
    assert forged != a.data
    with pytest.raises(CryptoError):
        open_sealed(Sealed(forged, a.wrapped), Keyring((k1,)))
    # a whole other artifact presented as this one: its authenticated metadata does not match
    with pytest.raises(CryptoError, match="belongs to another artifact"):
        open_sealed(b, Keyring((k1,)), expect_metadata=META)
    # a's data key file on b: bound to a's header, refused
    with pytest.raises(CryptoError, match="belongs to another artifact|does not open"):
        open_sealed(Sealed(b.data, a.wrapped), Keyring((k1,)))


def test_rewrap_keeps_data_and_retires_old_key(k1):
    k2 = _key()
    s = seal(b"payload" * 10, META, k1)
    s2 = rewrap(s, Keyring((k1,)), k2)
    assert s2.data == s.data and s2.wrapped != s.wrapped  # data not re-encrypted
    assert open_sealed(s2, Keyring((k2,)))[0] == b"payload" * 10
    with pytest.raises(CryptoError, match="another master key"):
        open_sealed(s2, Keyring((k1,)))


def test_keyring_from_env(tmp_path, k1):
    text = generate_master_key()
    f = tmp_path / "mk"
    f.write_text(text + "\n")
    assert Keyring.from_env({"DYNRAY_MASTER_KEY_FILE": str(f)}).current == MasterKey.parse(text, source="t")
    assert not Keyring.from_env({})
    with pytest.raises(Exception, match="32 bytes"):
        Keyring.from_env({"DYNRAY_MASTER_KEY": "short"})
    assert "kid=" in repr(k1) and text not in repr(MasterKey.parse(text, source="t"))


# -- encrypted registry versions ---------------------------------------------------------

def _reg(tmp_path, *keys):
    return ModelRegistry(tmp_path / "home", keyring=Keyring(tuple(keys)))


def test_registry_encrypted_round_trip_no_plaintext_on_disk(tmp_path, k1):
    w = torch.arange(1000, dtype=torch.float32) * 0.37
    info = _reg(tmp_path, k1).register("net", {"w": w}, {"thresholds": [0.9]})
    names = sorted(p.name for p in info.path.iterdir())
    assert names == ["meta.json", "meta.json.sha256", "model.dek", "model.safetensors.enc"]
    raw = w.numpy().tobytes()
    assert all(raw[:64] not in p.read_bytes() for p in info.path.iterdir())
    assert torch.equal(_reg(tmp_path, k1).load("net").tensors["w"], w)
    with pytest.raises(CryptoError, match="no master key"):
        _reg(tmp_path).load("net")


def test_registry_edited_meta_refused_even_with_recomputed_digest(tmp_path, k1):
    info = _reg(tmp_path, k1).register("net", {"w": torch.ones(4)}, {"thresholds": [0.9]})
    meta = json.loads((info.path / "meta.json").read_text())
    meta["thresholds"] = [0.1]  # an attacker who can write files recomputes the plain sha256
    data = json.dumps(meta, indent=2).encode()
    (info.path / "meta.json").write_bytes(data)
    (info.path / "meta.json.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    with pytest.raises(CryptoError, match="does not match"):
        _reg(tmp_path, k1).load("net")


def test_registry_swapped_versions_refused(tmp_path, k1):
    reg = _reg(tmp_path, k1)
    a, b = reg.register("net", {"w": torch.ones(4)}, {}), reg.register("net", {"w": torch.zeros(4)}, {})
    (a.path / "model.dek").write_bytes((b.path / "model.dek").read_bytes())
    with pytest.raises(CryptoError):
        reg.load(a.ref)
    assert torch.equal(reg.load(b.ref).tensors["w"], torch.zeros(4))


def test_registry_bit_flip_and_truncation_refused(tmp_path, k1):
    reg = _reg(tmp_path, k1)
    info = reg.register("net", {"w": torch.ones(64)}, {})
    f = info.path / "model.safetensors.enc"
    good = f.read_bytes()
    f.write_bytes(good[:-10])
    with pytest.raises(IntegrityError):
        reg.load("net")
    flipped = bytearray(good)
    flipped[-5] ^= 0x80
    f.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError):
        reg.load("net")


def test_registry_rewrap_under_new_master_key(tmp_path, k1):
    k2 = _key()
    info = _reg(tmp_path, k1).register("net", {"w": torch.ones(4)}, {})
    sealed_before = (info.path / "model.safetensors.enc").read_bytes()
    assert _reg(tmp_path, k1).rewrap(k2) == ["net:v1"]
    assert (info.path / "model.safetensors.enc").read_bytes() == sealed_before
    assert torch.equal(_reg(tmp_path, k2).load("net").tensors["w"], torch.ones(4))
    with pytest.raises(CryptoError, match="another master key"):
        _reg(tmp_path, k1).load("net")


def test_cli_keygen_and_rewrap(tmp_path, monkeypatch, capsys):
    from dynray.cli import main

    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    assert main(["models", "keygen", "--out", str(k1)]) == 0 and main(["models", "keygen", "--out", str(k2)]) == 0
    assert k1.stat().st_mode & 0o077 == 0
    assert main(["models", "keygen", "--out", str(k1)]) == 2  # never overwrites a key
    monkeypatch.setenv("DYNRAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DYNRAY_MASTER_KEY_FILE", str(k1))
    ModelRegistry().register("net", {"w": torch.ones(2)}, {})
    assert main(["models", "rewrap", "--new-key-file", str(k2)]) == 0
    assert "net:v1" in capsys.readouterr().out
    assert main(["models", "show", "net:v1"]) == 2  # k1 no longer opens it
    monkeypatch.setenv("DYNRAY_MASTER_KEY_FILE", str(k2))
    assert main(["models", "show", "net:v1"]) == 0


def test_registry_encrypted_meta_survives_json_round_trip(tmp_path, k1):
    meta = {"sizes": (3, 4), "exit_fractions": {0: 0.5, "1": 0.25}, "lr": 0.1, "nested": {"t": (0.9, 0.8)}}
    _reg(tmp_path, k1).register("net", {"w": torch.ones(2)}, meta)
    assert _reg(tmp_path, k1).load("net").info.meta["sizes"] == [3, 4]
