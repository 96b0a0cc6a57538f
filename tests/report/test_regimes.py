"""Retention and the two regimes of forgetting side by side: rows written for the planned cells of two versions of
one study that differ in pretrain.replay alone (real Parquet rows and study versions, no Ray)."""

from raysys.config import load_study
from raysys.report import findings, regimes, summary, tables
from raysys.report.evidence import retention
from raysys.report.scope import StudyRows
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store
from raysys.storage.study import save_study

OVERRIDES = ["pilot.control_length=0", 'tuning.types=["finetune"]']


def _tuned(store, study, accuracy):
    """A tuning row for every planned tuning cell of the study: accuracy(task, plm_index)."""
    for cell in stage("tuning").plan(study, plan_chain(study)):
        results.write_rows(store, "tuning_runs", cell.cell_hash, [{
            "status": "ok", "chain": cell.chain, "task": cell.task, "tuning_type": cell.tuning_type,
            "plm_index": cell.plm_index, "seed": cell.seed, "test_accuracy": accuracy(cell.task, cell.plm_index)}])
    for cell in stage("compatibility").plan(study, plan_chain(study)):
        if type(cell).__name__ == "BaselineCell":
            results.write_rows(store, "baselines", cell.cell_hash, [{
                "status": "ok", "task": cell.task, "plm_index": cell.plm_index, "seed": cell.seed, "kind": kind,
                "test_accuracy": 0.25} for kind in ("majority", "untrained_head")])


def test_retention_is_the_share_of_the_own_plms_gain_kept_one_upgrade_later(tmp_path):
    store = Store(tmp_path)
    study = load_study("tiny", OVERRIDES)
    own = {"d1_rel": 1, "d2_rel": 2, "d3_rel": 3}
    _tuned(store, study, lambda task, plm: 0.85 if plm == own[task] else 0.55 if plm == own[task] + 1 else 0.30)
    rows = retention(StudyRows(study, store))
    assert [(r["task"], r["own"]) for r in rows] == [("d1_rel", 1), ("d2_rel", 2)]  # d3's domain is the last
    assert all(abs(r["kept"] - 0.5) < 1e-9 for r in rows)  # (55 − 25) / (85 − 25)
    assert "Retention" in summary.summary(StudyRows(study, store))


def test_the_report_puts_the_regimes_side_by_side_when_the_storage_holds_both(tmp_path):
    store = Store(tmp_path)
    replay = load_study("tiny", OVERRIDES + ["pretrain.replay=0.5"])
    forgetting = load_study("tiny", OVERRIDES + ["pretrain.replay=0.0"])
    other = load_study("tiny", OVERRIDES + ["pretrain.replay=0.0", "tuning.lr=5e-4"])  # not a regime: another study
    for study in (replay, other, forgetting):
        save_study(study, store)
    own = {"d1_rel": 1, "d2_rel": 2, "d3_rel": 3}
    _tuned(store, replay, lambda task, plm: 0.85 if plm == own[task] else 0.80 if plm == own[task] + 1 else 0.30)
    _tuned(store, forgetting, lambda task, plm: 0.85 if plm == own[task] else 0.31 if plm == own[task] + 1 else 0.30)
    current = StudyRows(forgetting, store)
    scopes = regimes.regime_scopes(current)
    assert [s.study.pretrain.replay for s in scopes] == [0.5, 0.0]
    header, rows = regimes.side_by_side(regimes.judged(current, findings.findings(current, tables.methods_table(current))))
    assert header == ["claim", "replay 0.5", "replay 0"]
    assert rows[-1][1:] == ["92%", "10%"]  # (80 − 25) / 60 and (31 − 25) / 60
    assert len(rows) == 8  # seven claims and the retention
    path = summary.write_report(StudyRows(forgetting, store), tmp_path / "report")
    assert "## The findings under each regime of forgetting" in path.read_text()
    alone = StudyRows(other, store)
    assert len(regimes.regime_scopes(alone)) == 1
    assert "regime of forgetting" not in summary.summary(alone)
