"""Ray job: calibrate a registered model's thresholds on its validation split.

    python -m jobs.calibrate --model production --max-drop 0.005
"""

from __future__ import annotations

import argparse
import logging

from dynray.pipeline import calibrate_and_register
from dynray.registry import ModelRegistry
from dynray.thresholds import CalibrationTarget


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model ref (name, name:vN, production, staging; default: production, else newest)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-drop", type=float, help="largest allowed accuracy drop vs the last exit on val, e.g. 0.005")
    g.add_argument("--macs-budget", type=float, help="largest allowed mean MACs per sample on val")
    p.add_argument("--promote", choices=["staging", "production"], default=None, help="promote the calibrated version")


def run(a: argparse.Namespace) -> dict:
    registry = ModelRegistry()
    info, res = calibrate_and_register(registry, a.model, CalibrationTarget(max_drop=a.max_drop, macs_budget=a.macs_budget))
    if a.promote:
        info = registry.promote(info.ref, a.promote)
    return {"model": info.ref, "rule": res.rule.to_dict(), "calibration": info.meta["calibration"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.calibrate", description=__doc__.splitlines()[0])
    add_calibrate_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = main()
    c = r["calibration"]
    print(f"registered {r['model']}: val accuracy {c['val_accuracy']:.4f} (last exit {c['val_reference_accuracy']:.4f}), {c['val_macs_saving']:.2f}x fewer MACs")
