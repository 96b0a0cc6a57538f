"""Stage `similarity` on the micro study's real checkpoints."""

import dataclasses
import math
import os

import torch

from raysys.core import architectures, pet, recycle
from raysys.stages.base import Context, View
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.stages.similarity import learned
from raysys.storage import artifacts, results


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
    assert {r["what"] for r in dist} == {"plm", "tuned", "update", "update_from_start"}
    assert all(r["l2"] == 0.0 for r in dist)
    # a PET cell whose distances lack `update_from_start` (written before it existed) is not done
    assert similarity.done(same, View(store, scan=False))
    results.write_rows(store, "distances", same.cell_hash, [r for r in dist if r["what"] != "update_from_start"])
    assert not similarity.done(same, View(store, scan=False)) and not similarity.done(same, View(store))
    for table in ("head_similarity", "distances"):
        os.remove(store.local / "results" / table / f"{same.cell_hash}.parquet")


def test_a_pet_update_is_measured_from_where_its_run_started(micro_run):
    """`update_from_start`: the trained weights minus the seeded module init and the PLM's LayerNorms, re-created
    from the run's record — zero for a model saved untrained; for a tuned pair, the learned part of `update`."""
    study, store, _ = micro_run
    for tuning_type in ("lora", "adapter"):
        cell = next(c for c in stage("similarity").plan(study, plan_chain(study)) if c.tuning_type == tuning_type)
        meta = artifacts.tuned_meta(store, cell.tuned_hash_a)
        untrained = artifacts.tuning_start(store, meta)
        head = architectures.of(untrained).head_prefixes
        zero = learned(store, recycle.drop(pet.trainable_state_dict(untrained), head), meta)
        assert zero and all(torch.equal(v, torch.zeros_like(v)) for v in zero.values())
        model, _ = artifacts.load_tuned(store, cell.tuned_hash_a)
        trained = recycle.drop(pet.trainable_state_dict(model), head)
        update = learned(store, trained, meta)
        start = pet.trainable_state_dict(untrained)
        assert set(update) == set(trained) and all(torch.equal(update[k], trained[k] - start[k]) for k in update)
        norms = pet.trained_norms(model)
        assert (len(norms) > 0) == (tuning_type == "adapter")
        plm = artifacts.plm_state(store, meta["plm_hash"])
        assert all(torch.equal(update[k], trained[k] - plm[k]) for k in norms)  # LN^τ − LN_plm
    rows = [r for r in results.ok_rows(store, "distances") if r["what"] == "update_from_start"]
    assert rows and {r["tuning_type"] for r in rows} == {"lora", "adapter"}
    assert all(r["l2"] > 0 and math.isfinite(r["cosine"]) for r in rows)


def test_a_rows_seconds_cover_the_cells_distances(micro_run, monkeypatch):
    """The rows' clock stops after the last measurement (the distances), not before it."""
    import time

    from raysys.stages import similarity

    study, store, _ = micro_run
    chain = plan_chain(study)
    real = similarity.pair_distances
    monkeypatch.setattr(similarity, "pair_distances", lambda *a: (time.sleep(0.4), real(*a))[1])
    cell = similarity.STAGE.plan(study, chain)[0]
    timed = dataclasses.replace(cell, cell_hash="timed-" + cell.cell_hash)
    try:
        similarity.STAGE.run(Context(study, store, chain), timed)
        for table in ("head_similarity", "distances"):
            rows = results.read_cell(store, table, timed.cell_hash)
            assert rows and all(r["seconds"] >= 0.4 for r in rows), table
    finally:  # the shared micro store keeps the planned rows only
        for table in ("head_similarity", "distances"):
            (store.local / "results" / table / f"{timed.cell_hash}.parquet").unlink(missing_ok=True)
