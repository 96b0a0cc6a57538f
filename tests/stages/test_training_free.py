"""Stage `training_free` on the micro study: every map cell ran, one row per mapped task, PET types only."""

from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results


def test_every_training_free_cell_mapped_every_task(micro_run):
    study, store, ran = micro_run
    cells = stage("training_free").plan(study, plan_chain(study))
    free = results.ok_rows(store, "training_free")
    assert ran["training_free"]["ran"] == len(cells) == 2 * 2  # LoRA and adapter x two map tasks
    assert len(free) == len(cells) * 2 == 2 * 2 * 2
    assert {r["tuning_type"] for r in free} == {"lora", "adapter"}
    assert all(0.0 <= r["mapped_test_accuracy"] <= 1.0 and 0.0 <= r["direct_test_accuracy"] <= 1.0 for r in free)
    assert {(r["map_task"], r["task"]) for r in free} == {(a, b) for a in ("d1_rel", "d2_rel")
                                                          for b in ("d1_rel", "d2_rel")}


def test_the_direct_baseline_is_the_compatibility_test_under_the_same_layer_norm_policy(micro_run):
    """Old weights applied directly are loaded as compatibility loads them (tuning.pet_norms): the same scores."""
    study, store, _ = micro_run
    compat = {(r["source_tuned_hash"], r["target_plm_index"]): r for r in results.ok_rows(store, "compatibility")}
    cells = {c.cell_hash: c for c in stage("training_free").plan(study, plan_chain(study))}
    free = results.ok_rows(store, "training_free")
    for row in free:
        old = cells[row["cell_hash"]].old_tuned[row["task"]]
        reference = compat[(old, row["target_plm_index"])]
        assert (row["direct_dev_accuracy"], row["direct_test_accuracy"]) == (reference["dev_accuracy"],
                                                                            reference["test_accuracy"])
    assert {r["tuning_type"] for r in free} == {"lora", "adapter"}
