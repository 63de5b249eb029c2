"""API key store: hashed at rest, scopes, expiry, rotation with a grace window, revocation."""

import base64

import pytest

from dynray.errors import ConfigError
from dynray.security.keys import KeyError_, KeyStore, load_pepper


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return KeyStore(tmp_path / "keys.db", b"p" * 32, clock=clock)


def test_key_is_stored_hashed_and_verifies(store, tmp_path):
    key, rec = store.create("client", scopes=["predict"])
    assert key.startswith("dk_") and len(key) > 40
    assert key.encode() not in (tmp_path / "keys.db").read_bytes()
    secret = key.split("_", 2)[2]
    for f in tmp_path.iterdir():  # the WAL too
        assert secret.encode() not in f.read_bytes()
    v = store.verify(key)
    assert v.ok and v.record.id == rec.id and v.allows("predict") and not v.allows("admin")
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")).reason == "unknown"
    assert store.verify(None).reason == "missing" and store.verify("hello").reason == "malformed"


def test_other_pepper_opens_nothing(store, tmp_path, clock):
    key, _ = store.create("client")
    assert KeyStore(tmp_path / "keys.db", b"q" * 32, clock=clock).verify(key).reason == "unknown"


def test_expiry_and_revocation(store, clock):
    key, rec = store.create("c", ttl_s=60)
    assert store.verify(key).ok
    clock.t += 61
    assert store.verify(key).reason == "expired"
    key2, rec2 = store.create("d")
    store.revoke(rec2.id)
    assert store.verify(key2).reason == "revoked"


def test_rotation_grace_window(store, clock):
    old_key, old = store.create("c", scopes=["predict", "admin"], rate_per_s=7)
    new_key, new = store.rotate(old.id, grace_s=30)
    assert new.scopes == old.scopes and new.rate_per_s == 7 and store.get(old.id).replaced_by == new.id
    clock.t += 29
    assert store.verify(old_key).ok and store.verify(new_key).ok
    clock.t += 2
    assert store.verify(old_key).reason == "expired" and store.verify(new_key).ok
    with pytest.raises(KeyError_, match="only an active key"):
        store.rotate(old.id)


def test_bad_input(store):
    with pytest.raises(KeyError_, match="scope"):
        store.create("c", scopes=["root"])
    with pytest.raises(KeyError_, match="no such key"):
        store.revoke("000000000000")


def test_pepper_file_made_once_outside_home(tmp_path):
    f = tmp_path / "cfg" / "pepper"
    p1 = load_pepper({}, default_file=f)
    assert f.stat().st_mode & 0o077 == 0 and load_pepper({}, default_file=f) == p1
    env = {"DYNRAY_KEY_PEPPER": base64.urlsafe_b64encode(b"x" * 32).decode()}
    assert load_pepper(env, default_file=f) == b"x" * 32
    with pytest.raises(ConfigError):
        load_pepper({"DYNRAY_KEY_PEPPER": "c2hvcnQ="}, default_file=f)


def test_cli_create_list_rotate_revoke(tmp_path, monkeypatch, capsys):
    from dynray.cli import main

    monkeypatch.setenv("DYNRAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DYNRAY_KEY_PEPPER_FILE", str(tmp_path / "pepper"))
    assert main(["keys", "create", "--name", "ci", "--scope", "predict", "--rate", "5"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    store = KeyStore(tmp_path / "home" / "keys.db", load_pepper({"DYNRAY_KEY_PEPPER_FILE": str(tmp_path / "pepper")}))
    rec = store.verify(key).record
    assert rec.rate_per_s == 5 and (tmp_path / "home" / "keys.db").stat().st_mode & 0o077 == 0
    assert main(["keys", "rotate", rec.id, "--grace-s", "0"]) == 0
    new_key = capsys.readouterr().out.strip().splitlines()[-1]
    assert store.verify(new_key).ok and not store.verify(key).ok
    assert main(["keys", "revoke", store.verify(new_key).record.id]) == 0 and store.verify(new_key).reason == "revoked"
    assert main(["keys", "list"]) == 0 and "revoked" in capsys.readouterr().out
    assert main(["keys", "create"]) == 2 and main(["keys", "revoke", "nope"]) == 2
