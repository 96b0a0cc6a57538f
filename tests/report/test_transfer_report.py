"""The report's transfer table and the claim that plain copying is as good as the transfer schemes, on hand-made
rows written as real Parquet files: the verdict follows the paired intervals, a method that did not apply says so."""

import dataclasses
import json

from raysys.config import ReportConfig, load_study
from raysys.report import findings, transfer
from raysys.report.scope import StudyRows
from raysys.storage import results
from raysys.storage.store import Store

SEEDS = (20, 30, 40, 50, 60)


def _scope(store, **report):
    study = load_study("tiny")
    return StudyRows(dataclasses.replace(study, report=dataclasses.replace(ReportConfig(), **report)), store,
                     everything=True)


def _rows(method, accs, tuning_type="finetune", setting=None, pair=(1, 2)):
    return [{"status": "ok", "method": method, "task": "t", "tuning_type": tuning_type, "seed": s,
             "source_plm_index": pair[0], "target_plm_index": pair[1], "applicable": True, "selected": True,
             "setting": json.dumps(setting or {}), "test_accuracy": a, "dev_accuracy": a} for s, a in zip(SEEDS, accs)]


def _write(store, rows):
    for n, row in enumerate(rows):
        results.write_rows(store, "transfer", f"{row['method']}-{n}", [row])


COPY = [0.60, 0.62, 0.58, 0.61, 0.59]


def test_copying_holds_when_every_methods_gain_is_ruled_out(tmp_path):
    store = Store(tmp_path)
    _write(store, _rows("copy", COPY) + _rows("dare", [a - 0.001 for a in COPY], setting={"drop": 0.5}) +
           _rows("ties", [a + d for a, d in zip(COPY, (0.002, -0.002, 0.001, -0.001, 0.0))], setting={"density": 0.2}))
    f = findings.copying_is_enough(_scope(store))
    assert f.verdict == "holds"
    assert "dare − copy -0.1 points" in f.evidence and "n=5" in f.effect


def test_a_method_clearly_better_than_copying_breaks_the_claim(tmp_path):
    store = Store(tmp_path)
    better = [a + d for a, d in zip(COPY, (0.05, 0.06, 0.04, 0.05, 0.055))]
    _write(store, _rows("copy", COPY) + _rows("svd", better, setting={"rank": 8}) +
           _rows("dare", [a - 0.001 for a in COPY]))
    f = findings.copying_is_enough(_scope(store))
    assert f.verdict == "does not hold (svd better)"
    assert f.effect.startswith("+5.1 points")  # the method with the largest gain
    section = transfer.transfer_section(_scope(store), findings.statistics_of(_scope(store)))
    svd = next(r for r in section.rows if r[0] == "svd")
    assert svd[3:6] == [5, "65.1", "60.0"] and svd[7] == "rank=8"


def test_noise_around_copying_is_neither_shown_nor_ruled_out(tmp_path):
    store = Store(tmp_path)
    _write(store, _rows("copy", COPY) + _rows("scaled", [a + d for a, d in zip(COPY, (0.08, -0.07, 0.09, -0.06, 0.0))]))
    assert findings.copying_is_enough(_scope(store)).verdict == "not shown"
    # a wider margin rules the same gain out
    assert findings.copying_is_enough(_scope(store, transfer_margin=0.2)).verdict == "holds"


def test_a_method_that_did_not_apply_is_a_row_that_says_why(tmp_path):
    store = Store(tmp_path)
    reason = "the adapter's module has no backbone weight whose subspaces it could be projected onto"
    _write(store, _rows("copy", COPY, "adapter") + [
        {"status": "ok", "method": "svd", "task": "t", "tuning_type": "adapter", "seed": 20, "source_plm_index": 1,
         "target_plm_index": 2, "applicable": False, "reason": reason}])
    section = transfer.transfer_section(_scope(store), findings.statistics_of(_scope(store)))
    assert ["svd", "adapter", "—", 0, "n/a", "—", reason, "—"] in section.rows
    assert findings.copying_is_enough(_scope(store)).verdict == "no data"  # nothing but copying ran


def _method_rows(method, accs, transfer_name=None, start=0.5):
    return [{"status": "ok", "method": method, "transfer": transfer_name, "task": "t", "tuning_type": "lora",
             "seed": s, "source_plm_index": 1, "target_plm_index": 2, "regime": "full", "shots": None,
             "test_accuracy": a, "start_dev_accuracy": start, "target_dev_accuracy": 0.5, "max_steps": 4}
            for s, a in zip(SEEDS, accs)]


def test_a_transferred_start_is_paired_with_init_by_setting_and_seed(tmp_path):
    store = Store(tmp_path)
    rows = (_method_rows("init", COPY) + _method_rows("transfer_init", [a + 0.03 for a in COPY], "ties", start=0.7)
            + _method_rows("transfer_init", [a - 0.001 for a in COPY], "scaled"))
    for n, row in enumerate(rows):
        results.write_rows(store, "methods_runs", f"m{n}", [row])
    section = transfer.start_section(_scope(store), findings.statistics_of(_scope(store)))
    assert [r[:5] for r in section.rows] == [["scaled", "lora", 5, "50.0", "59.9"], ["ties", "lora", 5, "70.0", "63.0"]]
    assert section.rows[1][5].startswith("+3.0 points") and "n=5" in section.rows[1][5]
    assert section.rows[1][6] == "n=0"  # no curves written: no AUC to pair


def test_label_free_distillation_is_paired_with_k_shot_distillation_and_vanilla(tmp_path):
    from raysys.report.tables import methods_table

    store = Store(tmp_path)
    knobs = {"temperature": 5.0, "kd_weight": 0.9, "beta": 10.0}
    rows = [{**r, "regime": "kshot", "shots": 8, "best_dev_accuracy": r["test_accuracy"], "steps_to_target": None,
             "dev_auc": 0.5, "full_dev_test_accuracy": r["test_accuracy"], "temperature": None, "kd_weight": None,
             "beta": None} for r in _method_rows("vanilla", COPY) + _method_rows("text_distill", [a + 0.04 for a in COPY])]
    rows += [{**r, **knobs} for r in [{**x, "method": "distill", "test_accuracy": x["test_accuracy"] + 0.01,
                                       "best_dev_accuracy": x["test_accuracy"] + 0.01} for x in rows[:5]]]
    for n, row in enumerate(rows):
        results.write_rows(store, "methods_runs", f"m{n}", [row])
    scope = _scope(store)
    section = transfer.text_distill_section(scope, findings.statistics_of(scope), methods_table(scope))
    assert [r[:2] for r in section.rows] == [["lora", "distill"], ["lora", "vanilla"]]
    assert section.rows[0][2].startswith("+3.0 points") and section.rows[1][2].startswith("+4.0 points")


def test_the_hop_figure_draws_each_methods_mean_per_hop(tmp_path):
    from raysys.report import figures, interactive

    store = Store(tmp_path / "store")
    _write(store, _rows("copy", COPY) + _rows("copy", [a - 0.1 for a in COPY], pair=(1, 3)) +
           _rows("ties", [a - 0.02 for a in COPY]))
    scope = _scope(store)
    assert figures.transfer_hops(scope, tmp_path / "fig").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    traces = {t.name: (list(t.x), [round(y, 4) for y in t.y]) for t in interactive.transfer_hops(scope).data}
    assert traces == {"finetune · copy": ([1, 2], [0.6, 0.5]), "finetune · ties": ([1], [0.58])}
    assert figures.transfer_hops(_scope(Store(tmp_path / "empty")), tmp_path / "fig2") is None


def test_the_recycle_table_judges_the_probes_choice_against_the_full_grid(tmp_path):
    store = Store(tmp_path)
    better = [a + 0.03 for a in COPY]
    _write(store, [{**r, "dev_loss": 1.0} for r in _rows("copy", COPY) + _rows("scaled", better, setting={"scale": 1.5})])
    recycled = [{"status": "ok", "task": "t", "tuning_type": "finetune", "source_plm_index": 1, "target_plm_index": 2,
                 "seed": s, "method": "copy", "setting": "{}", "chosen": True, "probe_accuracy": 0.7,
                 "test_accuracy": a} for s, a in zip(SEEDS, COPY)]
    results.write_rows(store, "recycle", "cell", recycled)
    section = transfer.recycle_section(_scope(store), findings.statistics_of(_scope(store)))
    row, summary = section.rows
    assert row[:6] == ["t", "finetune", "M1->M2", "copy (—)", "70.0", "60.0"]
    assert row[6:9] == ["60.0", "63.0", "—"]  # copy, scaled and ties at their grid choices (no ties rows)
    assert row[9] == "scaled ×5" and row[10].startswith("+3.0 points") and "n=5" in row[10]
    assert summary[3] == "probe picked the grid's method in 0/1" and summary[-1].startswith("+3.0 points")
