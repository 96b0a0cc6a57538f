"""The findings table: verdicts follow the stated rules on hand-made tables (written as real Parquet rows)."""

import pytest

from raysys.config import load_study
from raysys.report import findings, tables
from raysys.report.scope import StudyRows
from raysys.storage import results
from raysys.storage.store import Store


def _every_row(store):
    """The rules on every row written here (their made-up cell hashes are no study's plan)."""
    return StudyRows(load_study("tiny"), store, everything=True)


def _write(store, table, rows):
    for i, row in enumerate(rows):
        results.write_rows(store, table, f"{table}-{i}", [{"status": "ok", **row}])


@pytest.mark.parametrize("passed,total,expected", [
    (0, 0, "no data"), (3, 3, "holds"), (0, 3, "does not hold"), (2, 3, "mostly holds (2/3)"),
    (1, 2, "partly (1/2)"), (1, 3, "partly (1/3)")])
def test_verdict_counts_settings(passed, total, expected):
    assert findings.verdict(passed, total) == expected


def test_compatibility_counts_only_old_models_that_learned_their_task(tmp_path):
    store = Store(tmp_path)
    _write(store, "tuning_runs", [
        {"chain": "main", "task": "t", "tuning_type": "finetune", "plm_index": 0, "test_accuracy": 0.80},
        {"chain": "main", "task": "t", "tuning_type": "lora", "plm_index": 0, "test_accuracy": 0.26},  # not learned
        {"chain": "main", "task": "t", "tuning_type": "finetune", "plm_index": 1, "test_accuracy": 0.85}])
    _write(store, "baselines", [
        {"task": "t", "plm_index": 0, "kind": "majority", "test_accuracy": 0.25},
        {"task": "t", "plm_index": 1, "kind": "untrained_head", "test_accuracy": 0.25}])
    _write(store, "compatibility", [
        {"task": "t", "tuning_type": "finetune", "source_plm_index": 0, "target_plm_index": 1, "test_accuracy": 0.60},
        {"task": "t", "tuning_type": "lora", "source_plm_index": 0, "target_plm_index": 1, "test_accuracy": 0.20}])
    f = findings.compatibility(_every_row(store))
    assert f.verdict == "holds"
    assert "1 settings" in f.evidence and "60.0%" in f.evidence and "85.0%" in f.evidence
    # The same Δ barely above the untrained head fails the 2-point margin.
    _write(store, "compatibility", [
        {"task": "t", "tuning_type": "finetune", "source_plm_index": 0, "target_plm_index": 1, "test_accuracy": 0.26}])
    assert findings.compatibility(_every_row(store)).verdict == "does not hold"


def _path(kind, t, drop, ends=(0.8, 0.8)):
    return {"split": "test", "pair_kind": kind, "tuning_type": t, "plm_index_a": 0, "plm_index_b": 1,
            "accuracy_drop": drop, "loss_barrier": drop, "accuracy_a": ends[0], "accuracy_b": ends[1]}


def test_mode_connectivity_per_type_with_weak_control_caveat(tmp_path):
    store = Store(tmp_path)
    _write(store, "interpolation_paths", [
        _path("continual", "finetune", 0.01), _path("control", "finetune", 0.30),
        _path("continual", "lora", 0.20), _path("control", "lora", 0.0, ends=(0.25, 0.25)),
        {**_path("continual", "lora", 0.0), "split": "dev"}])  # dev rows are not the evidence
    f = findings.mode_connectivity(_every_row(store))
    assert f.verdict == "partly (1/2)"
    assert "finetune: acc drop 1.0% continual vs 30.0% control" in f.evidence
    assert "Caveat (lora)" in f.evidence


def test_head_similarity_needs_margin_above_control(tmp_path):
    store = Store(tmp_path)
    row = lambda kind, layer, c, n: {"pair_kind": kind, "tuning_type": "finetune", "layer": layer,
                                     "similarity_corresponding": c, "similarity_noncorresponding": n}
    _write(store, "head_similarity", [row("continual", 0, 0.9, 0.5), row("control", 0, 0.5, 0.5),
                                      row("continual", 1, 0.6, 0.5), row("control", 1, 0.7, 0.5)])
    f = findings.head_similarity(_every_row(store))
    assert f.verdict == "partly (1/2)"
    assert "finetune L0: 0.400 vs control 0.000" in f.evidence


def _method(method, regime, test, auc, steps):
    return {"task": "t", "tuning_type": "finetune", "upgrade": "M0->M1", "regime": regime, "method": method,
            "test": test, "auc": auc, "steps_to_target": steps, "reached": f"{len(steps)}/{len(test)}"}


def test_method_claims_from_a_methods_table():
    table = [_method("vanilla", "full", [0.50, 0.52], [0.30, 0.32], [100, 120]),
             _method("init", "full", [0.60, 0.62], [0.45, 0.47], [10, 20]),
             _method("combined", "full", [0.63, 0.61], [0.5, 0.5], [10]),
             _method("vanilla", "8-shot", [0.40, 0.40], [0.30, 0.30], [50, 50]),
             _method("init", "8-shot", [0.41, 0.41], [0.31, 0.31], [40, 40]),  # AUC +1 point: not faster
             _method("distill", "8-shot", [0.45, 0.47], [0.3, 0.3], []),
             _method("combined", "8-shot", [0.44, 0.44], [0.3, 0.3], [])]
    init = findings.init_convergence(table)
    assert init.verdict == "partly (1/2)"
    assert "finetune full M0->M1 t: AUC 46.0% vs 31.0%, steps to target 15 (2/2) vs 110 (2/2)" in init.evidence
    assert findings.distillation_kshot(table).verdict == "holds"
    combined = findings.combined_best(table)
    assert combined.verdict == "partly (1/2)"
    assert "best other distill 46.0%" in combined.evidence


def test_report_carries_the_findings_table(tmp_path):
    scope = StudyRows(load_study("tiny"), Store(tmp_path / "store"))
    table = findings.markdown(findings.findings(scope, tables.methods_table(scope)))
    assert table.count("\n") == 7  # header, rule, six claims
    assert table.count("**no data**") == 6
