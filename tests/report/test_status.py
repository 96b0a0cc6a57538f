"""Where a storage stands: the plan's training compute, `--dry-run` (no Ray started, nothing written), and the
per-stage counts, all from the stages' one done rule."""

import os
import re
import subprocess
import sys
from pathlib import Path

from raysys.config import load_study
from raysys.report import status
from raysys.stages.chain import plan_chain
from raysys.stages.data_check import check_data
from raysys.stages.registry import NAMES, stage
from raysys.sweep import driver as sweep
from tests.conftest import write_paper_data

SCRIPT = Path(__file__).resolve().parents[2] / "sweeps" / "full_paper.py"


def test_training_flops_scale_with_the_steps():
    base = status.training_flops(load_study("tiny"))
    double = status.training_flops(load_study("tiny", ["pretrain.continual_steps=4000", "pretrain.initial_steps=600"]))
    assert double["pretrain"] == 2 * base["pretrain"] and double["tuning"] == base["tuning"]
    assert set(base) == {"pretrain", "tuning", "methods", "training_free"}  # the stages that train


def test_evaluation_flops_count_every_forward_pass_of_the_stages_that_only_evaluate():
    study = load_study("tiny")
    planned = status.plans(study)
    flops, unknown = status.evaluation_flops(study, planned)
    m, w = study.model, study.world
    per_example = 2 * m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size) \
        * study.tuning.max_length
    transfer = planned["transfer"]
    by_hand = sum(len(study.transfer.grid(c.method)) * w.task_dev + w.task_test for c in transfer) * per_example
    assert flops["transfer"] == by_hand and not unknown
    assert flops["compatibility"] == len(planned["compatibility"]) * (w.task_dev + w.task_test) * per_example
    assert set(flops) == {"compatibility", "interpolation", "transfer", "recycle"}


def test_a_task_files_size_is_counted_from_the_files_and_a_hub_tasks_is_unknown(tmp_path):
    import dataclasses

    from raysys.config import TaskConfig
    from raysys.core.sources import split_examples

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "dev.jsonl").write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    jsonl = TaskConfig(name="t", domain="d", source="jsonl", path=str(tmp_path))
    assert split_examples(jsonl, "dev", {}) == 2  # the blank line is not an example
    assert split_examples(jsonl, "test", {}) is None  # not there (yet): the plan says it is not counted
    hub = TaskConfig(name="t", domain="d", source="hf", path="org/t")
    assert split_examples(hub, "dev", {}) is None
    study = load_study("tiny")
    hubbed = dataclasses.replace(study, tasks=(dataclasses.replace(study.tasks[0], source="hf", path="org/t",
                                                                   fingerprint="hf:stand-in"), *study.tasks[1:]))
    flops, unknown = status.evaluation_flops(hubbed)
    assert unknown == {study.tasks[0].name} and flops["transfer"] < status.evaluation_flops(study)[0]["transfer"]


def test_dry_run_prints_the_plan_without_starting_ray(tmp_path, monkeypatch):
    storage = tmp_path / "plan"
    write_paper_data(tmp_path)
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--preset", "paper", "--storage", str(storage)],
                         capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
                         env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr
    monkeypatch.chdir(tmp_path)
    study = check_data(load_study("paper"), NAMES)
    planned = len(stage("tuning").plan(study, plan_chain(study)))
    line = next(x for x in out.stdout.splitlines() if x.startswith("tuning"))
    assert line.split()[1:5] == [str(planned), "0", "0", str(planned)]
    assert [x.split()[0] for x in out.stdout.splitlines()[2:2 + len(NAMES)]] == list(NAMES)
    assert "device-hours" in out.stdout and "PFLOP" in out.stdout
    transfer = next(x for x in out.stdout.splitlines() if x.startswith("transfer")).split()
    assert transfer[5] == "—" and float(transfer[6]) > 0  # evaluation only: no training, its passes counted
    assert re.search(r"evaluation-only stages ≈ \S+ PFLOP .*: \S+ device-hours", out.stdout)
    assert not storage.exists()  # nothing written, no Ray session under it


def test_search_flags_map_onto_the_config(tmp_path, capsys):
    storage = tmp_path / "plan"
    assert sweep.main(["--storage", str(storage), "--dry-run", "--search", "optuna", "--search-trials", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"search\s+(\d+)\s+0\s+0\s+\1\s", out) and "Optuna searches x 3 trials" in out
    assert sweep.main(["--storage", str(storage), "--dry-run", "--search-trials", "0"]) == 2
    assert "--search-trials: must be >= 1, got 0" in capsys.readouterr().err  # the flag typed, not the field


def test_a_finished_study_counts_every_planned_cell_done(micro_run):
    study, store, _ = micro_run
    counts = status.stage_status(study, store)
    assert list(counts) == list(NAMES)
    for name, c in counts.items():
        expected = len(stage(name).plan(study, plan_chain(study)))
        assert c == {"planned": expected, "done": expected, "failed": 0, "todo": 0, "errors": {}}, name
    assert status.missing_cells(study, store) == {name: 0 for name in NAMES}


def test_the_plan_counts_every_replicate_chain(tmp_path):
    """`pretrain.replicate_seeds`: status and --dry-run plan each chain's cells; what chains share, once."""
    from raysys.report.status import plans, stage_status
    from raysys.storage.store import Store

    study = load_study("tiny", ["pretrain.replicate_seeds=[2]"])
    alone = {name: len(cells) for name, cells in plans(load_study("tiny")).items()}
    counts = stage_status(study, Store(tmp_path))
    assert counts["pretrain"]["planned"] == alone["pretrain"] + 4  # the replicate's M0..M3; one control chain
    grid = len(study.tasks) * len(study.tuning.types) * len(study.seeds)
    assert counts["tuning"]["planned"] == alone["tuning"] + 4 * grid  # the control C1's tuned models: once
    assert counts["compatibility"]["planned"] == 2 * alone["compatibility"]
    assert {name: len(cells) for name, cells in plans(study, seed=2).items()} == alone


def test_durations_read_as_seconds_minutes_or_hours():
    assert [status.duration(s) for s in (0, 42.4, 59.6, 61, 3599, 3600, 7620, 90061)] == \
        ["0s", "42s", "1m 00s", "1m 01s", "59m 59s", "1h 00m", "2h 07m", "25h 01m"]


def test_running_trials_show_where_their_last_report_stood():
    from raysys.report.status import SHOWN_TRIALS, running_trials_lines

    lines = running_trials_lines([
        {"name": "pretrain-a177f_00000", "chain": "main", "link": 2, "step": 1200, "loss": 4.21875},
        {"name": "tuning-main-1-d1_rel-lora-20-b2c3d_00004", "step": 90, "dev_accuracy": 0.71289, "train_loss": 0.4125},
        {"name": "methods-x_00001"}])
    assert lines == ["    pretrain-a177f_00000: main link 2, step 1200, masked-LM loss 4.219",
                     "    tuning-main-1-d1_rel-lora-20-b2c3d_00004: step 90, dev accuracy 71.3%, train loss 0.412",
                     "    methods-x_00001: starting"]
    many = running_trials_lines([{"name": f"t{i}"} for i in range(SHOWN_TRIALS + 3)])
    assert len(many) == SHOWN_TRIALS + 1 and many[-1] == "    ... and 3 more running"
