"""Stage `search` (`--search optuna`) on a copy of the micro store: each search runs its budget with knobs inside
their ranges, all searches at once, a rerun runs nothing, a larger budget later runs only the extra trials."""

import dataclasses
import shutil

from raysys.stages.base import View
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store
from raysys.sweep import driver as sweep


def test_optuna_search_runs_its_budget_inside_each_grid_cell_and_resumes(micro_run, tmp_path):
    study, shared, _ = micro_run
    store = Store(tmp_path / "copy")
    shutil.copytree(shared.root, store.root)
    search = dataclasses.replace(study.methods.search, algorithm="optuna", trials=2, lr=(1e-4, 1e-2),
                                 temperature=(2.0, 8.0), beta=(0.0, 5.0))
    narrowed = dataclasses.replace(study, methods=dataclasses.replace(
        study.methods, search=search, types=("lora",), names=("vanilla", "distill"), regimes=("kshot",),
        tasks=("d1_rel",)))
    chain = plan_chain(narrowed)
    searches = stage("search").plan(narrowed, chain)
    assert len(searches) == 2 * len(study.seeds) * len(narrowed.upgrades)
    assert {s.method for s in searches} == {"vanilla", "distill"}
    ran = sweep.run_study(narrowed, store, only=("methods", "search"), log=lambda *_: None)
    assert ran["methods"]["ran"] == 0  # the vanilla references exist; no distill grid cell in search mode
    assert ran["search"]["ran"] == len(searches) and ran["search"]["finished_before"] == 0
    rows = results.ok_rows(store, "methods_search")
    assert len(rows) == 2 * len(searches) and len({r["cell_hash"] for r in rows}) == len(rows)
    assert {r["search_hash"] for r in rows} == {s.cell_hash for s in searches}
    for r in rows:
        assert 1e-4 <= r["lr"] <= 1e-2
        if r["method"] == "distill":
            assert 2.0 <= r["temperature"] <= 8.0 and 0.0 <= r["kd_weight"] <= 1.0 and 0.0 <= r["beta"] <= 5.0
        else:
            assert r["temperature"] is None
    first = {r["cell_hash"]: r["started_at"] for r in rows}
    assert all(stage("search").done(s, View(store)) for s in searches)
    # all searches in one Tune experiment, their trials side by side (2 CPUs, a CPU a trial): some trial of one
    # search ran while a trial of another did
    assert len([d for d in store.list_dirs("ray/tune") if d.startswith("search-")]) == 1
    spans = [(r["search_hash"], r["started_at"].timestamp(), r["started_at"].timestamp() + r["seconds"]) for r in rows]
    assert any(a != b and s1 < e2 and s2 < e1 for a, s1, e1 in spans for b, s2, e2 in spans)

    again = sweep.run_study(narrowed, store, only=("methods", "search"), log=lambda *_: None)
    assert again["search"]["ran"] == 0 and again["search"]["finished_before"] == len(searches)
    # A larger budget continues each search: Optuna is told the finished trials, only the extra one runs.
    wider = dataclasses.replace(narrowed, methods=dataclasses.replace(
        narrowed.methods, search=dataclasses.replace(search, trials=3)))
    assert [s.cell_hash for s in stage("search").plan(wider, chain)] == [s.cell_hash for s in searches]
    assert not any(stage("search").done(s, View(store)) for s in stage("search").plan(wider, chain))
    more = sweep.run_study(wider, store, only=("search",), log=lambda *_: None)
    assert more["search"]["ran"] == len(searches)
    after = results.ok_rows(store, "methods_search")
    assert len(after) == 3 * len(searches)
    assert {r["cell_hash"]: r["started_at"] for r in after if r["cell_hash"] in first} == first
