"""The report reads its methods from the registry: a method added to `RECYCLING_METHODS` is validated, planned, and
shows in the methods table and the convergence figure's colours without any other edit."""

from raysys import config
from raysys.config import RecyclingMethod, load_study
from raysys.report import figures, tables
from raysys.report.scope import StudyRows
from raysys.stages import methods
from raysys.stages.chain import plan_chain
from raysys.storage import results
from raysys.storage.store import Store


def _row(method: str, accuracy: float) -> dict:
    return {"status": "ok", "method": method, "task": "d1_rel", "tuning_type": "lora", "seed": 20,
            "source_plm_index": 1, "target_plm_index": 2, "regime": "full", "shots": None, "temperature": None,
            "kd_weight": None, "beta": None, "best_dev_accuracy": accuracy, "test_accuracy": accuracy,
            "full_dev_test_accuracy": accuracy, "steps_to_target": 30, "dev_auc": accuracy / 2,
            "start_dev_accuracy": 0.25}


def test_a_registered_method_needs_no_other_edit(monkeypatch, tmp_path):
    monkeypatch.setitem(config.RECYCLING_METHODS, "scaled_init", RecyclingMethod("old_weights", "cross_entropy"))
    study = load_study("tiny", ['methods.names=["vanilla","scaled_init"]'])
    cells = methods.plan_methods(study, plan_chain(study))
    scaled = [c for c in cells if c.method == "scaled_init"]
    assert len(scaled) == len(cells) // 2 and all(c.needs_reference for c in scaled)
    assert {type(n).__name__ for n in methods.STAGE.inputs(scaled[0])} == {"Artifact", "Rows"}
    store = Store(tmp_path)
    for i, (method, accuracy) in enumerate((("vanilla", 0.5), ("scaled_init", 0.75))):
        results.write_rows(store, "methods_runs", f"cell-{i}", [_row(method, accuracy)])
    table = tables.methods_table(StudyRows(study, store, everything=True))  # made-up hashes: no study's cells
    assert [(r["method"], r["test"]) for r in table] == [("vanilla", [0.5]), ("scaled_init", [0.75])]
    colours = figures.method_colours()
    assert colours["vanilla"] == "tab:gray" and colours["scaled_init"] not in (colours["init"], "tab:gray")
