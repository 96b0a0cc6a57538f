"""The report describes one study: a storage holding the rows of two studies that differ in `tuning.lr` (the
README's `--set` example run into the same storage) reports the current study's seeds only, `--all` every row,
`--version 1` the first study's; the head says which."""


from raysys import cli
from raysys.config import load_study
from raysys.report.scope import StudyRows
from raysys.stages.base import cell_columns
from raysys.stages.chain import plan_chain
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store
from raysys.storage.study import save_study

FIRST = load_study("tiny", ["seeds=[1,2]"])
SECOND = load_study("tiny", ["seeds=[1,2]", "tuning.lr=5e-4"])  # finetune cells change; PET and pre-training stay


def _tuning_cells(study):
    """The finetune cells on M1 of the first task, one per seed: the same setting in both studies."""
    return [c for c in stage("tuning").plan(study, plan_chain(study))
            if (c.chain, c.plm_index, c.task, c.tuning_type) == ("main", 1, study.tasks[0].name, "finetune")]


def _write(store, study, accuracies):
    for cell, accuracy in zip(_tuning_cells(study), accuracies, strict=True):
        results.write_rows(store, "tuning_runs", cell.cell_hash, [
            {"status": "ok", **cell_columns(cell, "tuning_runs"), "test_accuracy": accuracy}])


def _storage(tmp_path) -> Store:
    store = Store(tmp_path / "store")
    link = plan_chain(FIRST).links[0]  # a pre-training row both studies share
    results.write_rows(store, "pretrain_runs", link.plm_hash, [
        {"status": "ok", "chain": link.chain, "link": link.index, "domain": link.domain, "steps": 10}])
    save_study(FIRST, store)
    _write(store, FIRST, [0.5, 0.6])
    assert save_study(SECOND, store) is not None
    _write(store, SECOND, [0.9, 0.8])
    return store


def _tuning_line(report: str) -> list[str]:
    """The cells of the tuning table's row of the first task's fine-tuning (a Markdown table's row)."""
    line = next(line for line in report.splitlines() if line.startswith(f"| {FIRST.tasks[0].name} | finetune |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_both_studies_plan_the_setting_under_other_hashes():
    first, second = _tuning_cells(FIRST), _tuning_cells(SECOND)
    assert len(first) == len(second) == 2 and not {c.cell_hash for c in first} & {c.cell_hash for c in second}


def test_the_report_averages_only_the_current_studys_seeds(tmp_path, capsys):
    store = _storage(tmp_path)
    reports = {}
    for name, extra in (("current", []), ("all", ["--all"]), ("first", ["--version", "1"])):
        assert cli.main(["report", str(store.root), "--out", str(tmp_path / name), *extra]) == 0
        reports[name] = (tmp_path / name / "report.md").read_text()
    assert _tuning_line(reports["current"])[2:] == ["85.0±7.1"]  # 0.9, 0.8
    assert _tuning_line(reports["first"])[2:] == ["55.0±7.1"]  # 0.5, 0.6
    assert _tuning_line(reports["all"])[2:] == ["70.0±18.3"]  # all four, as if seeds: what --all means
    total = sum(len(keys) for table, keys in StudyRows(SECOND, store).keys.items() if not table.endswith("_curves"))
    assert "Study 'tiny', version 2 of 2 in `" in reports["current"] and "; the current one)" in reports["current"]
    assert f": 3 of its {total} planned result cells have rows" in reports["current"]  # 2 tuning + the shared link
    assert "2 result rows of other studies in this storage" in reports["current"]
    assert "`raysys report" in reports["current"] and "--all` shows every row" in reports["current"]
    assert "version 1 of 2" in reports["first"] and "the current one is version 2" in reports["first"]
    assert "2 result rows of other studies" in reports["first"]
    assert "every row of the storage (--all), 2 of them from other studies" in reports["all"]
    assert "55.0" not in reports["current"] and "85.0" not in reports["first"]


def test_reports_of_other_rows_go_beside_the_current_one(tmp_path, capsys):
    store = _storage(tmp_path)
    for extra, folder in (([], "report"), (["--all"], "report-all"), (["--version", "1"], "report-v1"),
                          (["--version", "2"], "report")):
        assert cli.main(["report", str(store.root), *extra]) == 0
        assert f"{store.local / folder / 'report.md'}" in capsys.readouterr().out
    assert "85.0±7.1" in (store.local / "report" / "report.md").read_text()
    assert cli.main(["report", str(store.root), "--version", "3"]) == 2
    assert "holds versions [1, 2]" in capsys.readouterr().err


def test_the_plan_names_every_row_a_study_writes(micro_run):
    """On the micro study's real rows: every planned result cell is found, and every run has its curve."""
    study, store, _ = micro_run
    scope = StudyRows(study, store)
    found, total = scope.cells_found()
    assert found == total == sum(len(scope.keys[t]) for t in results.SCHEMAS if not t.endswith("_curves")) > 0
    assert [t for t in results.SCHEMAS if not scope.ok_rows(t)] == ["methods_search"]  # no Optuna in the micro study
    for curves, runs in (("pretrain_curves", "pretrain_runs"), ("tuning_curves", "tuning_runs"),
                         ("methods_curves", "methods_runs")):
        assert {r["cell_hash"] for r in scope.ok_rows(curves)} == {r["cell_hash"] for r in scope.ok_rows(runs)}
