"""Stage `compatibility` on the micro study's real checkpoints."""

import dataclasses
import os

import torch
from safetensors.torch import load_file

from raysys.core import pet
from raysys.stages.base import Context
from raysys.stages.chain import plan_chain
from raysys.stages.compatibility import BaselineCell, CompatibilityCell
from raysys.stages.recipe import Evaluator
from raysys.stages.registry import stage
from raysys.storage import artifacts, results


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


def test_an_adapter_recycled_onto_a_later_plm_moves_its_layer_norms_by_the_policy(micro_run):
    """The LayerNorms an adapter trained on M_i arrive on M_j as LN_j + (LN_i^τ − LN_i) under "delta" and as
    LN_i^τ under "absolute" — exactly; its module and head as tuned. The compatibility cell evaluates that model,
    and the two policies are two cells."""
    study, store, _ = micro_run
    chain = plan_chain(study)
    compatibility = stage("compatibility")
    cell = next(c for c in compatibility.plan(study, chain)
                if isinstance(c, CompatibilityCell) and c.tuning_type == "adapter")
    tuned = load_file(str(store.artifact("tuned", cell.source_tuned_hash) / pet.WEIGHTS_FILE))
    plm_i, plm_j = artifacts.plm_state(store, cell.source_plm_hash), artifacts.plm_state(store, cell.target_plm_hash)
    loaded = {policy: artifacts.load_tuned(store, cell.source_tuned_hash, on_plm=cell.target_plm_hash,
                                           pet_norms=policy)[0] for policy in ("delta", "absolute")}
    norms = pet.trained_norms(loaded["delta"])
    assert "roberta.embeddings.LayerNorm.weight" in norms and len(norms) >= 2 * (1 + 2 * study.model.num_layers)
    weights = {policy: pet.trainable_state_dict(model) for policy, model in loaded.items()}
    for name in norms:
        assert torch.equal(weights["delta"][name], plm_j[name] + (tuned[name] - plm_i[name])), name
        assert torch.equal(weights["absolute"][name], tuned[name]), name
    assert any(not torch.equal(weights["delta"][n], weights["absolute"][n]) for n in norms)
    for name in set(tuned) - norms:  # module and head: the tuned ones under both policies
        assert torch.equal(weights["delta"][name], tuned[name]) and torch.equal(weights["absolute"][name], tuned[name])
    for policy, model in loaded.items():
        run_study = study if policy == "delta" else dataclasses.replace(
            study, tuning=dataclasses.replace(study.tuning, pet_norms=policy))
        ctx = Context(run_study, store, chain)
        planned = next(c for c in compatibility.plan(run_study, chain) if c.source_tuned_hash == cell.source_tuned_hash
                       and c.target_plm_hash == cell.target_plm_hash)
        assert (planned.cell_hash == cell.cell_hash) == (policy == "delta")
        probe = dataclasses.replace(planned, cell_hash=f"probe-{policy}-{planned.cell_hash}")
        compatibility.run(ctx, probe)
        row = next(r for r in results.ok_rows(store, "compatibility") if r["cell_hash"] == probe.cell_hash)
        assert row["dev_loss"] == Evaluator(ctx, cell.task).metrics(model)["dev_loss"]
        os.remove(store.local / "results" / "compatibility" / f"{probe.cell_hash}.parquet")


def test_a_rows_seconds_cover_the_cells_evaluation(micro_run, monkeypatch):
    """The row's clock stops after the evaluation (sweep efficiency and the status ETA read it), for both kinds."""
    import time

    study, store, _ = micro_run
    compatibility, chain = stage("compatibility"), plan_chain(study)
    real = Evaluator.metrics
    monkeypatch.setattr(Evaluator, "metrics", lambda self, model: (time.sleep(0.4), real(self, model))[1])
    for kind, table in ((CompatibilityCell, "compatibility"), (BaselineCell, "baselines")):
        cell = next(c for c in compatibility.plan(study, chain) if isinstance(c, kind))
        timed = dataclasses.replace(cell, cell_hash="timed-" + cell.cell_hash)
        try:
            compatibility.run(Context(study, store, chain), timed)
            rows = results.read_cell(store, table, timed.cell_hash)
            assert rows and all(r["status"] == "ok" and r["seconds"] >= 0.4 for r in rows), (table, rows)
        finally:  # the shared micro store keeps the planned rows only
            (store.local / "results" / table / f"{timed.cell_hash}.parquet").unlink(missing_ok=True)
