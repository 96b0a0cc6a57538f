"""Stage `similarity` on the micro study's real checkpoints."""

import dataclasses
import os

from raysys.stages.base import Context
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results


def test_similarity_of_a_model_with_itself_is_maximal(micro_run):
    """Run the similarity cell on a pair made of one tuned model twice: every corresponding head has similarity
    1, at least that of any real pair, and all distances are 0."""
    study, store, _ = micro_run
    similarity = stage("similarity")
    chain = plan_chain(study)
    cell = next(c for c in similarity.plan(study, chain) if c.tuning_type == "adapter")
    same = dataclasses.replace(cell, cell_hash="self-" + cell.cell_hash, tuned_hash_b=cell.tuned_hash_a)
    similarity.run(Context(study, store, chain), same)
    rows = [r for r in results.ok_rows(store, "head_similarity") if r["cell_hash"] == same.cell_hash]
    assert len(rows) == study.model.num_layers * study.model.num_heads
    assert all(abs(r["similarity_corresponding"] - 1.0) < 1e-5 for r in rows)
    real = [r for r in results.ok_rows(store, "head_similarity") if r["cell_hash"] == cell.cell_hash]
    assert min(r["similarity_corresponding"] for r in rows) >= max(r["similarity_corresponding"] for r in real) - 1e-6
    dist = [r for r in results.ok_rows(store, "distances") if r["cell_hash"] == same.cell_hash]
    assert {r["what"] for r in dist} == {"plm", "tuned", "update"} and all(r["l2"] == 0.0 for r in dist)
    for table in ("head_similarity", "distances"):
        os.remove(store.local / "results" / table / f"{same.cell_hash}.parquet")
