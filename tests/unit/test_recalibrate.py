"""The drift alarm's recalibration hook, with the job client replaced by a recorder (the real
submission to a cluster's job API runs in tests/ray/test_serving.py)."""

import sys
import time
from types import SimpleNamespace

import pytest

from actors import recalibrate as R
from dynray.drift import DriftAlarm

ALARM = DriftAlarm(score=0.9, threshold=0.4, feature="density", samples=120)


class _Client:
    sent: list = []
    fail = False
    busy = 0  # answers "no available agent" this many more times

    def __init__(self, address):
        self.address = address

    def submit_job(self, *, entrypoint, runtime_env, metadata):
        if _Client.fail:
            raise ConnectionError("job API down")
        if _Client.busy:
            _Client.busy -= 1
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
        _Client.sent.append({"address": self.address, "entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata})
        return f"raysubmit_{len(_Client.sent)}"


@pytest.fixture
def client(monkeypatch):
    import ray.job_submission

    _Client.sent, _Client.fail, _Client.busy = [], False, 0
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _Client)
    monkeypatch.setattr(R.ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="10.0.0.1:6379"))
    return _Client


def _wait(hook: R.Recalibrator, n: int) -> list[dict]:
    t0 = time.monotonic()
    while len(hook.history()) < n and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    return hook.history()


def test_an_alarm_submits_the_calibration_job_once_per_cooldown(client):
    hook = R.Recalibrator(home="/data/dynray", args=["--max-drop", "0.002"], cooldown_s=3600)
    hook("dynnet-mnist-5k:v2", ALARM)
    hook("dynnet-mnist-5k:v2", ALARM)  # within the cooldown: not sent again
    hook("other:v1", ALARM)
    hist = _wait(hook, 2)
    time.sleep(0.1)
    assert len(client.sent) == 2 and len(hook.history()) == 2
    job = next(j for j in client.sent if "dynnet-mnist-5k:v2" in j["entrypoint"])
    assert job["address"] == "10.0.0.1:6379" and job["runtime_env"] == {"env_vars": {"DYNRAY_HOME": "/data/dynray"}}
    assert job["entrypoint"] == f"{sys.executable} -m jobs.calibrate --model dynnet-mnist-5k:v2 --max-drop 0.002"
    assert {h["job_id"] for h in hist} == {"raysubmit_1", "raysubmit_2"}


def test_a_failed_submission_is_recorded_not_raised(client):
    client.fail = True
    hook = R.Recalibrator(home=None, args=[], cooldown_s=0)
    hook("m:v1", ALARM)
    (rec,) = _wait(hook, 1)
    assert rec["version"] == "m:v1" and "job API down" in rec["error"] and "job_id" not in rec


def test_a_busy_job_api_is_asked_again_until_the_retry_budget_runs_out(client):
    client.busy = 2
    hook = R.Recalibrator(home=None, args=[], cooldown_s=0, retry_s=10)
    hook("m:v1", ALARM)
    (rec,) = _wait(hook, 1)
    assert rec["job_id"] == "raysubmit_1" and rec["attempts"] == 3 and client.busy == 0
    client.busy = 100
    short = R.Recalibrator(home=None, args=[], cooldown_s=0, retry_s=1.0)
    short("m:v2", ALARM)
    (rec,) = _wait(short, 1)
    assert "try again later" in rec["error"] and 2 <= rec["attempts"] <= 3  # 0.5 s, then 1 s would pass the budget
