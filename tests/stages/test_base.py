"""The stage protocol's shared machinery: a retried trial keeps the cells it finished; a failing cell is recorded
with its error and its columns, and the others go on."""

import dataclasses

from raysys.stages.base import Context, View
from raysys.stages.chain import plan_chain
from raysys.stages.compatibility import CompatibilityCell, CompatibilityStage
from raysys.storage import results


class Recording(CompatibilityStage):
    """The compatibility stage, with a run that records which cells it was asked to run and fails on one."""

    def __init__(self, fail: str):
        self.ran, self.fail = [], fail

    def run(self, ctx, cell):
        self.ran.append(cell.cell_hash)
        if cell.cell_hash == self.fail:
            raise RuntimeError("this cell breaks")


def test_a_retried_trial_runs_only_the_cells_it_did_not_finish(micro_run):
    study, store, _ = micro_run
    chain = plan_chain(study)
    cells = [c for c in CompatibilityStage().plan(study, chain) if isinstance(c, CompatibilityCell)]
    finished = [c for c in cells if CompatibilityStage().done(c, View(store, scan=False))][:2]
    new = [dataclasses.replace(finished[0], cell_hash=f"not-run-yet-{i}") for i in range(2)]
    stage = Recording(fail=new[1].cell_hash)
    assert stage.run_group(Context(study, store, chain), finished + new) == 3
    assert len(finished) == 2 and stage.ran == [c.cell_hash for c in new]
    (row,) = results.read_cell(store, "compatibility", new[1].cell_hash)
    assert row["status"] == "failed" and row["error"].startswith("RuntimeError: this cell breaks")
    assert (row["task"], row["source_plm_index"], row["target_plm_hash"]) == (
        new[1].task, new[1].source_plm_index, new[1].target_plm_hash)
    assert stage.failed(new[1], View(store)) and not stage.failed(new[0], View(store))
    store.delete_file(f"results/compatibility/{new[1].cell_hash}.parquet")
