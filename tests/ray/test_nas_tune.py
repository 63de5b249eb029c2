"""Architecture search through Ray Tune on the session's Ray: a tiny run end to end."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from dynray.nas import Candidate, NASConfig, SearchSpace, default_candidate, run_search
from dynray.nas.evolution_searcher import EvolutionSearcher
from dynray.nas.config import SEARCHERS, register_searcher
from dynray.nas.searchers import SearchPlan
from dynray.nas.trainable import REFERENCE_KEY, nas_trainable
from dynray.registry import ModelRegistry
from dynray.store import load_model

pytestmark = pytest.mark.ray
TINY = dict(epochs=1, grace=1, train_limit=256, time_budget_min=5.0, concurrency=2, register_top=1)
# fixed score per candidate (keyed by its lr), in the order the searcher suggests them: the
# reference (the default candidate's lr, 3e-3) is the worst, so only its protection keeps it
RUNG_SCORES = {1.5e-3: 0.9, 3e-3: 0.1, 5e-3: 0.3}


@pytest.fixture
def crash_searcher():
    """Evolution seeded with the reference and a candidate outside the space (its trial crashes)."""
    space = SearchSpace()
    bad = {**replace(default_candidate(space.max_stages), widths=(16, 32, 64, 7)).to_dict(), REFERENCE_KEY: False}

    @register_searcher("test-crash")
    def _plan(cfg, settings):
        ref = {**default_candidate(space.max_stages).to_dict(), REFERENCE_KEY: True}
        return SearchPlan(nas_trainable, EvolutionSearcher(space, max_epochs=cfg.epochs, seeds=[ref, bad]), {}, cfg.trials, True)

    yield "test-crash"
    SEARCHERS.pop("test-crash")


@pytest.fixture
def rung_searcher(tmp_path):
    """Three candidates in a fixed order, each reporting one fixed score at every iteration
    and writing when it ran to ``tmp_path/spans``.

    Run one at a time under ASHA (max_t 3, grace 1, reduction 3), the first rung is
    deterministic: the first trial sets the cutoff and runs to the end; the reference and
    the third trial fall below the cutoff, and only the third is stopped.
    """
    space = SearchSpace()
    spans = tmp_path / "spans"
    spans.mkdir()
    base = default_candidate(space.max_stages)
    assert base.lr == 3e-3 and base.lr in RUNG_SCORES
    points = [{**replace(base, lr=lr).to_dict(), REFERENCE_KEY: lr == base.lr} for lr in RUNG_SCORES]

    # defined here, not at module level, so that Ray pickles it by value: no worker imports this file
    def fixed_score_trainable(config, settings, scores, spans):
        import time
        from pathlib import Path

        from ray import tune

        s = scores[config["lr"]]
        start = time.time()
        for it in range(settings.epochs):
            time.sleep(0.2)  # long enough that trials run side by side would overlap
            Path(spans, f"{config['lr']}").write_text(f"{start} {time.time()}")
            tune.report({"score": s, "accuracy": s, "macs": 1e5 * (2 - s), "test_accuracy": s, "test_macs": 1e5 * (2 - s), "latency_ms": 1.0, "epoch": it + 1, REFERENCE_KEY: config[REFERENCE_KEY]})

    @register_searcher("test-rungs")
    def _plan(cfg, settings):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # the points fill every key of the space (BasicVariantGenerator needs the keys), no sampling
        alg = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=cfg.concurrency)
        return SearchPlan(fixed_score_trainable, alg, {**space.tune_space(), REFERENCE_KEY: False}, len(points), True, params={"scores": RUNG_SCORES, "spans": str(spans)})

    yield "test-rungs"
    SEARCHERS.pop("test-rungs")


def test_asha_stops_trials_at_its_first_rung_but_runs_the_reference_to_max_t(ray_session, tmp_path, rung_searcher):
    cfg = NASConfig(searcher=rung_searcher, trials=3, epochs=3, grace=1, reduction=3, concurrency=1, time_budget_min=5.0, register_top=0, storage_path=str(tmp_path / "tune"))
    res = run_search(cfg, ModelRegistry(tmp_path / "home"), out_dir=tmp_path / "rungs", progress=False)
    by_lr = {t.candidate["lr"]: t for t in res.trials}
    assert sorted(by_lr) == sorted(RUNG_SCORES) and len(res.trials) == 3
    # --concurrency 1 held: no two trials ran at once (Tune ignores max_concurrent_trials for a
    # variant generator; the searcher must pass it)
    ran = sorted(tuple(map(float, f.read_text().split())) for f in (tmp_path / "spans").iterdir())
    assert len(ran) == 3 and all(a[1] <= b[0] for a, b in zip(ran, ran[1:])), ran
    summary = {lr: (t.status, t.epochs, t.reference) for lr, t in by_lr.items()}
    # the first trial set the rung's cutoff and ran to max_t
    assert summary[1.5e-3] == ("completed", 3, False), summary
    # the reference scored worst of all at the first rung, and still ran to max_t
    assert summary[3e-3] == ("completed", 3, True), summary
    # below the cutoff at the first rung: stopped there, after one iteration
    assert summary[5e-3] == ("stopped", 1, False), summary
    assert res.asha_stopped_frac == pytest.approx(1 / 2)  # of the non-reference trials
    assert json.loads(Path(res.files["json"]).read_text())["status_counts"] == {"completed": 2, "stopped": 1, "budget": 0, "failed": 0}


def test_tiny_tune_run_ends_with_a_front_file_and_a_registered_best_config(ray_session, tmp_path, crash_searcher):
    registry = ModelRegistry(tmp_path / "home")
    cfg = NASConfig(searcher=crash_searcher, trials=3, storage_path=str(tmp_path / "tune"), **TINY)
    res = run_search(cfg, registry, out_dir=tmp_path / "out", progress=False)
    status = {t.trial_id: t.status for t in res.trials}
    assert len(res.trials) == 3
    failed = [t for t in res.trials if t.status == "failed"]
    assert len(failed) == 1 and "outside the search space" in failed[0].error  # recorded; the search went on
    assert sum(s == "completed" for s in status.values()) == 2
    assert any(t.reference and t.status == "completed" for t in res.trials)
    # the results table, the front PNG and the JSON summary
    rows = list(csv.DictReader(open(res.files["table"])))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed", "failed"}
    assert Path(res.files["front"]).stat().st_size > 5000
    section = json.loads(Path(res.files["json"]).read_text())
    assert section["trials"] == 3 and section["front"] and section["status_counts"]["failed"] == 1
    # the best front member is registered and loads with its calibrated thresholds
    assert len(res.registered) == 1 and res.registered[0].startswith("nas-mnist-5k:v")
    stored = load_model(registry, res.registered[0])
    assert stored.info.meta["nas"]["candidate"] in [t.candidate for t in res.trials]
    assert stored.rule is not None and stored.model.num_exits >= 2


def test_random_search_through_tune(ray_session, tmp_path):
    """Tune's BasicVariantGenerator over the space's domains, the reference first (ASHA's
    stopping and its protection of the reference: the rung test above)."""
    cfg = NASConfig(searcher="random", trials=3, storage_path=str(tmp_path / "tune"), **{**TINY, "register_top": 0})
    res = run_search(cfg, ModelRegistry(tmp_path / "home"), out_dir=tmp_path / "rand", progress=False)
    assert len(res.trials) == 3 and all(t.status == "completed" for t in res.trials)
    assert sum(t.reference for t in res.trials) == 1
    others = [t for t in res.trials if not t.reference]
    assert all(SearchSpace().check(Candidate.from_dict(t.candidate)) is None for t in others)
    assert len({json.dumps(t.candidate, sort_keys=True) for t in res.trials}) == 3  # three different candidates
