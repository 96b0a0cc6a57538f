"""PLM-seed replication: rows written for the planned cells of a study whose main chain is replicated
(`pretrain.replicate_seeds`), each chain judged alone and the chains side by side (real Parquet rows, no Ray)."""

from raysys.config import load_study
from raysys.report import findings, replication, summary, tables
from raysys.report.scope import StudyRows
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store
from raysys.storage.study import save_study

OVERRIDES = ["pilot.control_length=0", 'tuning.types=["finetune"]']
OWN = {"d1_rel": 1, "d2_rel": 2, "d3_rel": 3}
JITTER = {20: 0.01, 30: -0.01}


def _write_chain(store, study, seed, kept, compatible):
    """Rows for the cells of the main chain of `seed`: tuned 85% on a task's own PLM, `kept` of the gain over the
    25% floor one upgrade later; an outdated model on the next PLM at `compatible` (± a seed's jitter)."""
    chain, written = plan_chain(study).replica(seed), 0
    for cell in stage("tuning").plan(study, chain):
        own = OWN[cell.task]
        accuracy = 0.85 if cell.plm_index == own else 0.25 + kept * 0.6 if cell.plm_index == own + 1 else 0.30
        results.write_rows(store, "tuning_runs", cell.cell_hash, [{
            "status": "ok", "chain": cell.chain, "task": cell.task, "tuning_type": cell.tuning_type,
            "plm_index": cell.plm_index, "seed": cell.seed, "test_accuracy": accuracy}])
        written += 1
    for cell in stage("compatibility").plan(study, chain):
        if type(cell).__name__ == "BaselineCell":
            results.write_rows(store, "baselines", cell.cell_hash, [{
                "status": "ok", "task": cell.task, "plm_index": cell.plm_index, "seed": cell.seed, "kind": kind,
                "test_accuracy": 0.25} for kind in ("majority", "untrained_head")])
        else:
            results.write_rows(store, "compatibility", cell.cell_hash, [{
                "status": "ok", "task": cell.task, "tuning_type": cell.tuning_type, "seed": cell.seed,
                "source_plm_index": cell.source_plm_index, "target_plm_index": cell.target_plm_index,
                "test_accuracy": compatible + JITTER[cell.seed]}])
        written += 1
    return written


def test_each_chain_is_judged_alone_and_the_chains_side_by_side(tmp_path):
    store = Store(tmp_path)
    study = load_study("tiny", OVERRIDES + ["pretrain.replicate_seeds=[2]"])
    save_study(study, store)
    written = _write_chain(store, study, 0, kept=0.5, compatible=0.55)
    written += _write_chain(store, study, 2, kept=0.8, compatible=0.45)
    scope = StudyRows(study, store)
    per_chain = len(study.tasks) * len(study.seeds) * len(study.corpora)
    # the main chain's rows only: two chains' cells of one (task, type, PLM index, seed) are never averaged
    assert len(scope.ok_rows("tuning_runs")) == per_chain
    assert {r["test_accuracy"] for r in scope.chain(2).ok_rows("tuning_runs")} == {0.85, 0.25 + 0.8 * 0.6, 0.30}
    assert scope.others() == 0  # the replicate's rows are this study's, not another's
    found, total = scope.cells_found()
    assert found == written and total > written  # every chain's cells count (the other stages wrote none)
    chains = replication.judged(scope, findings.findings(scope, tables.methods_table(scope)))
    assert [s.seed for s, _ in chains] == [0, 2]
    compat = [claims[0] for _, claims in chains]
    assert [round(100 * c.pooled.mean, 6) for c in compat] == [30.0, 20.0]  # over the 25% floor
    header, rows = replication.side_by_side(chains)
    assert header == ["claim", "seed 0 (main)", "seed 2", "across PLM seeds"]
    assert rows[0][3].startswith("+25.0 ± 7.1 (sd over 2 chains); within a chain ±")
    assert rows[0][3].endswith("verdict as the main chain's on 2/2")
    assert rows[-1][1:] == ["50%", "80%", "sd 21 points"]
    text = summary.summary(scope)
    assert summary.REPLICATION_TITLE in text and "main chain of seed 0" in text
    assert f"## {summary.REPLICATION_TITLE}" in summary.write_report(scope, tmp_path / "report").read_text()


def test_a_study_without_replicates_shows_no_replication(tmp_path):
    store = Store(tmp_path)
    study = load_study("tiny", OVERRIDES)
    _write_chain(store, study, 0, kept=0.5, compatible=0.55)
    scope = StudyRows(study, store)
    assert replication.replica_scopes(scope) == [scope]
    assert summary.REPLICATION_TITLE not in summary.summary(scope)
