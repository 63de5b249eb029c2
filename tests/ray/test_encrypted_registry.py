"""Encrypted versions cross Ray sealed: the registry actor sends the ciphertext, and the
replica that receives it decrypts with its own process's master key (issue 16, item 6)."""

import pytest
import ray
import torch

from actors.registry import RegistryServer, RemoteRegistry
from dynray.errors import CryptoError
from dynray.registry import ModelRegistry
from dynray.registry_bytes import ENC_WEIGHTS_FILE
from dynray.security.crypto import Keyring, MasterKey, generate_master_key

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
def _load_remote(handle, ref: str):
    try:
        return RemoteRegistry(handle).load(ref).tensors
    except CryptoError as e:
        return e


def test_replica_decrypts_sealed_bytes(ray_session, tmp_path):
    key = generate_master_key()
    w = torch.arange(512, dtype=torch.float32)
    info = ModelRegistry(tmp_path, keyring=Keyring((MasterKey.parse(key, source="test"),))).register("net", {"w": w}, {})
    server = ray.remote(RegistryServer).options(num_cpus=0).remote(str(tmp_path))
    try:
        sent = ray.get(server.fetch.remote(info.ref))
        assert set(sent.files) == {ENC_WEIGHTS_FILE} and w.numpy().tobytes()[:64] not in sent.files[ENC_WEIGHTS_FILE]
        with_key = _load_remote.options(runtime_env={"env_vars": {"DYNRAY_MASTER_KEY": key}}).remote(server, info.ref)
        without = _load_remote.options(runtime_env={"env_vars": {"DYNRAY_MASTER_KEY": ""}}).remote(server, info.ref)
        got, refused = ray.get([with_key, without])
        assert torch.equal(got["w"], w)
        assert isinstance(refused, CryptoError) and "no master key" in refused.what
    finally:
        ray.kill(server)
