"""The cost ledger on hand-made methods rows (written as real Parquet files): device seconds to vanilla's target,
a run that never reached it charged its whole training, the saving paired by seed; and the micro study's runs
record the device they trained on."""

import re

from raysys.config import load_study
from raysys.report import ledger, tables
from raysys.report.findings import statistics_of
from raysys.report.scope import StudyRows
from raysys.storage import results
from raysys.storage.store import Store

SEEDS = (20, 30, 40)


def _runs(method, to_target, train, knobs=(None, None, None)):
    return [{"status": "ok", "method": method, "task": "t", "tuning_type": "lora", "seed": s, "source_plm_index": 1,
             "target_plm_index": 2, "regime": "full", "shots": None, "temperature": knobs[0], "kd_weight": knobs[1],
             "beta": knobs[2], "best_dev_accuracy": 0.8, "test_accuracy": 0.8, "seconds_to_target": t,
             "train_seconds": train, "device": "cpu (1 thread)"} for s, t in zip(SEEDS, to_target)]


def test_the_ledger_charges_a_run_that_never_reached_the_target_its_whole_training(tmp_path):
    store = Store(tmp_path)
    rows = _runs("vanilla", [30.0, 32.0, 31.0], 60.0) + _runs("init", [10.0, 12.0, None], 60.0)
    for n, row in enumerate(rows):
        results.write_rows(store, "methods_runs", f"m{n}", [row])
    scope = StudyRows(load_study("tiny"), store, everything=True)
    out = ledger.ledger_rows(scope, tables.methods_table(scope), statistics_of(scope))
    init = next(r for r in out if r[4] == "init")
    assert init[5] == "2/3"  # the seed-40 run never reached vanilla's target
    assert init[6] == "27.3" and init[7] == "31.0"  # (10 + 12 + 60) / 3: charged its 60 s budget
    assert init[8].startswith("+3.7 s") and "n=3" in init[8]  # (20 + 20 − 29) / 3 saved
    assert init[9] == "180" and init[10] == "cpu (1 thread)"
    vanilla = next(r for r in out if r[4] == "vanilla")
    assert vanilla[5] == "3/3" and vanilla[8] == "—"


def test_a_resumed_run_has_no_time_to_target():
    assert ledger.time_to_target({"resumed_from_step": 40, "train_seconds": 9.0, "seconds_to_target": 3.0}) is None
    assert ledger.time_to_target({"resumed_from_step": None, "train_seconds": 9.0, "seconds_to_target": None}) == (
        9.0, False)


def test_a_start_that_trains_is_charged_its_seconds():
    """text_distill's text phase is part of what the recycled run cost."""
    run = {"resumed_from_step": None, "train_seconds": 9.0, "seconds_to_target": 3.0, "start_train_seconds": 4.5}
    assert ledger.time_to_target(run) == (7.5, True)
    assert ledger.time_to_target({**run, "seconds_to_target": None}) == (13.5, False)


def test_a_device_name_says_how_many_threads():
    import torch

    from raysys.core.compute import device_name

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert device_name("cpu") == "cpu (1 thread)"
        torch.set_num_threads(2)
        assert device_name("cpu") == "cpu (2 threads)"
    finally:
        torch.set_num_threads(before)


def test_every_training_run_of_the_micro_study_records_its_device(micro_run):
    _, store, _ = micro_run
    for table in ("tuning_runs", "methods_runs"):
        devices = {r["device"] for r in results.read_table(store, table).to_pylist() if r["status"] == "ok"}
        assert devices and all(re.fullmatch(r"cpu \((1 thread|[2-9]\d* threads)\)", d) for d in devices), devices
