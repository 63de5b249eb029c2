"""The cluster commands' bad input, each refused with one line that names the fix (no cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
DYNRAY = str(Path(sys.executable).with_name("dynray"))


def _one_line(args: list[str], env: dict) -> str:
    p = subprocess.run([DYNRAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (args, p.stdout, p.stderr)
    line = p.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    return line


@pytest.mark.parametrize("args, address", [
    (["submit", "train", "--address", "http://127.0.0.1:9", "--", "--epochs", "1"], "http://127.0.0.1:9"),
    (["serve", "up", "--address", "127.0.0.1:9"], "127.0.0.1:9"),
    (["serve", "status", "--address", "127.0.0.1:9"], "127.0.0.1:9"),
])
def test_an_unreachable_address_names_it_and_cluster_up(args, address, tmp_path, clean_env):
    line = _one_line(args, clean_env(tmp_path))
    assert address in line and "dynray cluster up" in line, line


def test_submit_without_any_cluster_says_how_to_get_one(tmp_path, clean_env):
    line = _one_line(["submit", "train", "--", "--epochs", "1"], clean_env(tmp_path))
    assert "no cluster to submit to" in line and "dynray cluster up --local" in line, line


def test_submit_of_an_unknown_step_lists_the_steps(tmp_path, clean_env):
    line = _one_line(["submit", "trian"], clean_env(tmp_path))
    assert "did you mean train?" in line and all(s in line for s in ("calibrate", "nas", "train_router", "bench", "deploy")), line


@pytest.mark.parametrize("args, match", [
    (["cluster", "up"], "dynray cluster up --local"),
    (["cluster", "status", "--local"], "takes no --local"),
    (["cluster", "status"], "no cluster is up"),
])
def test_cluster_command_misuse(args, match, tmp_path, clean_env):
    assert match in _one_line(args, clean_env(tmp_path))
