"""How `dynray` splits its own arguments from a job's (no Ray, no subprocess)."""

from __future__ import annotations

import pytest

from dynray.cli import _split_submit
from dynray.flags import UsageError


@pytest.mark.parametrize("args", [
    ["train", "--address", "http://h:8265", "--", "--epochs", "1"],
    ["--address", "http://h:8265", "train", "--epochs", "1"],
    ["train", "--epochs", "1", "--address=http://h:8265"],
    ["train", "--address", "http://h:8265", "--epochs", "1"],
])
def test_submit_finds_address_wherever_it_stands(args):
    own, rest = _split_submit(args, "dynray submit")
    assert own["address"] == "http://h:8265"
    assert rest == ["train", "--epochs", "1"]


def test_after_the_separator_everything_is_the_jobs():
    own, rest = _split_submit(["nas", "--env", "A=1", "--", "--address", "x", "--trials", "2"], "dynray submit")
    assert own == {"env": ["A=1"]} and rest == ["nas", "--address", "x", "--trials", "2"]


def test_a_flag_without_its_value_is_refused():
    with pytest.raises(UsageError, match="--address needs a value"):
        _split_submit(["train", "--address"], "dynray submit")


@pytest.mark.parametrize("module, argv, says, not_says", [
    ("train", ["--epochs", "many"], ["--epochs", "invalid literal"], []),  # a bad flag value keeps the flag's name
    ("bench", ["federated", "--json", "x.json", "--rounds", "0"], ["clients, rounds and local_epochs must be >= 1", "fix:"], ["Error parsing", "tyro"]),  # a nested config's own error, as written
    ("bench", ["compress", "--json", "x.json", "--calib-samples", "0"], ["the compress bench needs", "fix:"], ["Error parsing", "tyro"]),
])
def test_parse_errors_are_one_line_that_names_the_flag_or_the_fix(module, argv, says, not_says):
    import importlib

    from dynray.errors import DynrayError
    from dynray.flags import parse

    with pytest.raises(DynrayError) as e:
        parse(importlib.import_module(f"jobs.{module}").Config, argv, prog="x")
    msg = str(e.value)
    assert "\n" not in msg and all(s in msg for s in says) and not any(s in msg for s in not_says), msg
