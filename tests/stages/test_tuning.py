"""Stage `tuning` on the micro study: what a tuned artifact holds, and the one done rule (row and artifact)."""

import shutil

from safetensors.torch import load_file

from raysys.stages.base import View
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store


def test_pet_artifacts_hold_only_trainable_weights(micro_run):
    _, store, _ = micro_run
    for row in results.ok_rows(store, "tuning_runs"):
        path = store.artifact("tuned", row["cell_hash"])
        if row["tuning_type"] == "finetune":
            assert (path / "model.safetensors").is_file()
            continue
        assert not (path / "model.safetensors").exists()
        weights = load_file(str(path / "trainable.safetensors"))
        assert sum(v.numel() for v in weights.values()) == row["num_trainable_parameters"]
        assert not any(k.endswith("attention.self.key.weight") for k in weights)


def test_a_tuned_cell_is_done_with_its_row_and_its_model_not_either_alone(micro_run, tmp_path):
    study, shared, _ = micro_run
    tuning = stage("tuning")
    cell = tuning.plan(study, plan_chain(study))[0]
    store = Store(tmp_path / "s")
    done = lambda: (tuning.done(cell, View(store)), tuning.done(cell, View(store, scan=False)))
    results.write_rows(store, "tuning_runs", cell.cell_hash, results.read_cell(shared, "tuning_runs", cell.cell_hash))
    assert done() == (False, False)  # a row without its model (deleted, or lost with a node's disk)
    shutil.copytree(shared.artifact("tuned", cell.cell_hash), store.local / "artifacts" / "tuned" / cell.cell_hash)
    assert done() == (True, True)
    store.delete_file(f"results/tuning_runs/{cell.cell_hash}.parquet")
    assert done() == (False, False)  # a model without its row
