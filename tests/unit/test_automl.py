"""The AutoML pipeline's budget plan, its run record (resume) and its architecture pick.
(tests/smoke/test_cli.py runs a short pipeline end to end, interrupted and resumed.)"""

import pytest

from dynray.automl import FLOOR_MIN, RESERVE_MIN, SHARES, STEPS, RunState, minimum_budget, pick_architecture, plan_budget, time_table
from dynray.errors import ConfigError


def test_the_budget_is_split_by_shares_after_the_fixed_reserves():
    plan = plan_budget(12.0)
    assert list(plan) == list(STEPS) and sum(plan.values()) == pytest.approx(12.0, abs=1e-2)
    fixed = sum(RESERVE_MIN.values())
    assert plan["nas"] == pytest.approx((12 - fixed) * SHARES["nas"], abs=1e-3) and plan["deploy"] == RESERVE_MIN["deploy"]


def test_a_budget_too_small_for_one_trial_names_the_minimum():
    least = minimum_budget()
    assert least == pytest.approx(sum(RESERVE_MIN.values()) + FLOOR_MIN["train"] / SHARES["train"], abs=0.1)  # train binds at the default shares
    plan_budget(least)  # the minimum itself works
    with pytest.raises(ConfigError) as e:
        plan_budget(least - 0.5)
    assert f"--budget-minutes {least:g}" in e.value.fix and "nas 1" in e.value.fix


def test_a_resumed_run_plans_only_the_steps_left():
    plan = plan_budget(5.0, todo=("router", "register", "deploy", "check"))
    assert set(plan) == {"router", "register", "deploy", "check"} and plan["router"] == pytest.approx(5.0 - 0.05 - 1.0 - 0.5)


def test_the_run_record_survives_a_save_and_names_what_is_missing(tmp_path):
    st = RunState.new("r", "mnist-5k", 12.0)
    st.finish("nas", 4.8, 250.0, {"front": [{"ref": "nas-mnist-5k:v1"}]})
    st.wall_s = 260.0
    st.save(tmp_path / "state.json")
    back = RunState.load(tmp_path / "state.json")
    assert back.done == ["nas"] and back.todo[0] == "train" and back.result("nas")["front"][0]["ref"] == "nas-mnist-5k:v1"
    with pytest.raises(ConfigError, match="has not finished"):
        back.result("train")
    assert "nas" in time_table(back) and "wall" in time_table(back)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        RunState.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="no AutoML run to resume"):
        RunState.load(tmp_path / "none.json")


def test_the_pick_is_the_cheapest_architecture_near_the_best():
    front = [{"ref": "a", "accuracy": 0.990, "macs": 300e3}, {"ref": "b", "accuracy": 0.987, "macs": 120e3}, {"ref": "c", "accuracy": 0.970, "macs": 50e3}]
    assert pick_architecture(front)["ref"] == "b"
    assert pick_architecture(front, tolerance=0.0)["ref"] == "a"
    with pytest.raises(ConfigError, match="registered no architecture"):
        pick_architecture([])
