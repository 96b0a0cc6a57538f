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
