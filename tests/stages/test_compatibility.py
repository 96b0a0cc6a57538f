"""Stage `compatibility` on the micro study's real checkpoints."""

import dataclasses
import os

from raysys.stages.base import Context
from raysys.stages.chain import plan_chain
from raysys.stages.compatibility import CompatibilityCell
from raysys.stages.registry import stage
from raysys.storage import results


def test_compatibility_of_a_zero_hop_delta_is_the_tuned_model(micro_run):
    """Sanity of the transplant on real checkpoints, for every tuning type: Δ_i applied to M_i itself gives the
    tuned model back."""
    study, store, _ = micro_run
    compatibility = stage("compatibility")
    chain = plan_chain(study)
    tuned = {r["cell_hash"]: r for r in results.ok_rows(store, "tuning_runs")}
    cells = [c for c in compatibility.plan(study, chain) if isinstance(c, CompatibilityCell)]
    for tuning_type in study.tuning.types:
        cell = next(c for c in cells if c.tuning_type == tuning_type)
        same = dataclasses.replace(cell, cell_hash="self-" + cell.cell_hash, target_plm_hash=cell.source_plm_hash,
                                   target_plm_index=cell.source_plm_index)
        compatibility.run(Context(study, store, chain), same)
        row = next(r for r in results.ok_rows(store, "compatibility") if r["cell_hash"] == same.cell_hash)
        assert row["test_accuracy"] == tuned[cell.source_tuned_hash]["test_accuracy"]
        os.remove(store.local / "results" / "compatibility" / f"{same.cell_hash}.parquet")


def test_the_references_need_only_the_plm_one_per_task_seed_and_plm(micro_run):
    study, store, _ = micro_run
    rows = results.ok_rows(store, "baselines")
    assert {r["kind"] for r in rows} == {"majority", "untrained_head"}
    assert len(rows) == 2 * len(study.corpora) * len(study.tasks) * len(study.seeds)
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
