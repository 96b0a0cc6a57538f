"""The sweep end to end on a real Ray cluster: every stage as a Tune experiment, rows keyed by cell hash, reruns
that recompute nothing, failed cells recorded and retried."""

import dataclasses
import json
import os

from raysys import results, stages, sweep, world
from raysys.config import TaskConfig, load_study
from raysys.store import Store
from tests.conftest import MICRO_OVERRIDES


def _ok(store, table):
    return [r for r in results.read_table(store, table).to_pylist() if r["status"] == "ok"]


def test_every_stage_writes_its_rows(micro_run):
    study, store, ran = micro_run
    n_plms, n_tasks, n_seeds, n_alphas = len(study.corpora), len(study.tasks), len(study.seeds), 3
    assert ran["tuning"]["ran"] == n_plms * n_tasks * n_seeds
    tuning = _ok(store, "tuning_runs")
    assert len(tuning) == n_plms * n_tasks * n_seeds
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["best_step"] in (4, 8, 12) for r in tuning)
    curves = results.read_table(store, "tuning_curves").to_pylist()
    assert len(curves) == len(tuning) * 3  # evaluations at steps 4, 8, 12
    hops = n_plms - 1
    assert len(_ok(store, "compatibility")) == hops * n_tasks * n_seeds
    interp = _ok(store, "interpolation")
    assert len(interp) == hops * n_tasks * n_seeds * n_alphas
    assert len({r["cell_hash"] for r in interp}) == len(interp)


def test_interpolation_ends_reproduce_the_tuned_models(micro_run):
    _, store, _ = micro_run
    tuned = {r["cell_hash"]: r for r in _ok(store, "tuning_runs")}
    for row in _ok(store, "interpolation"):
        if row["alpha"] == 0.0:
            assert row["test_accuracy"] == tuned[row["tuned_hash_a"]]["test_accuracy"]
            assert abs(row["test_loss"] - tuned[row["tuned_hash_a"]]["test_loss"]) < 1e-5
        if row["alpha"] == 1.0:
            assert row["test_accuracy"] == tuned[row["tuned_hash_b"]]["test_accuracy"]


def test_compatibility_of_a_zero_hop_delta_is_the_tuned_model(micro_run):
    """Sanity of the transplant on real checkpoints: Δ_i applied to M_i itself gives the tuned model back."""
    study, store, _ = micro_run
    chain = stages.plan_chain(study)
    cell = stages.plan_compatibility(study, chain)[0]
    same = {**cell, "cell_hash": "self-" + cell["cell_hash"], "target_plm_hash": cell["source_plm_hash"],
            "target_plm_index": cell["source_plm_index"]}
    stages.run_compatibility_cell(study, store, chain, same)
    row = next(r for r in _ok(store, "compatibility") if r["cell_hash"] == same["cell_hash"])
    tuned = next(r for r in _ok(store, "tuning_runs") if r["cell_hash"] == cell["source_tuned_hash"])
    assert row["test_accuracy"] == tuned["test_accuracy"]
    os.remove(store.results_dir("compatibility") / f"{same['cell_hash']}.parquet")


def test_rerun_recomputes_nothing(micro_run):
    study, store, _ = micro_run
    artifacts = sorted(store.root.joinpath("artifacts").rglob("model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in artifacts]
    counts = {t: results.read_table(store, t).num_rows for t in results.SCHEMAS}
    ran = sweep.run_study(study, store, log=lambda *_: None)
    assert all(stage["ran"] == 0 and stage["blocked"] == 0 for stage in ran.values()), ran
    assert [p.stat().st_mtime_ns for p in artifacts] == mtimes
    assert {t: results.read_table(store, t).num_rows for t in results.SCHEMAS} == counts


def _write_task(root, name, rows_by_split):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_failed_cells_are_recorded_and_only_they_rerun(micro_run, tmp_path):
    """A jsonl task whose dev split has a label unseen in training fails every tuning cell with a recorded error;
    the sweep goes on; once the file is fixed, a rerun runs exactly those cells."""
    study, store, _ = micro_run
    splits = world.task_splits(world.build_world(study.world), "d1")
    broken = {**splits, "dev": splits["dev"] + [{"text": "x y", "label": "no-such-label"}]}
    _write_task(tmp_path, "d1_copy", broken)
    extra = TaskConfig(name="d1_copy", domain="d1", source="jsonl", path=str(tmp_path))
    study2 = dataclasses.replace(study, tasks=study.tasks + (extra,), tune_plms=(2, 3))
    ran = sweep.run_study(study2, store, only=("tuning",), log=lambda *_: None)
    assert ran["tuning"]["ran"] == 2 * len(study.seeds)
    failed = [r for r in results.read_table(store, "tuning_runs").to_pylist() if r["status"] == "failed"]
    assert len(failed) == 2 * len(study.seeds)
    assert all("no-such-label" in r["error"] and r["task"] == "d1_copy" for r in failed)
    assert sweep.missing_cells(study2, store)["tuning"] == len(failed)

    _write_task(tmp_path, "d1_copy", splits)
    ran = sweep.run_study(study2, store, only=("tuning",), log=lambda *_: None)
    assert ran["tuning"]["ran"] == len(failed)
    assert sweep.missing_cells(study2, store)["tuning"] == 0
    assert all(r["status"] == "ok" for r in results.read_table(store, "tuning_runs").to_pylist())


def test_cli_rejects_bad_input_before_starting_anything(tmp_path, capsys):
    storage = tmp_path / "never"
    assert sweep.main(["--storage", str(storage), "--set", "tuning.lr=-1"]) == 2
    assert "tuning.lr" in capsys.readouterr().err
    assert sweep.main(["--storage", str(storage), "--preset", "nope"]) == 2
    assert sweep.main(["--storage", "s3://bucket/x"]) == 2
    assert not storage.exists()


def test_every_preset_builds_and_plans():
    for preset in ("tiny", "paper"):
        study = load_study(preset)
        chain = stages.plan_chain(study)
        assert len(set(chain.plm_hashes)) == len(study.corpora)
        cells = stages.plan_tuning(study, chain)
        assert len(cells) == len(study.plms_to_tune) * len(study.tasks) * len(study.seeds)


def test_micro_overrides_change_identity_but_resources_do_not():
    base = stages.plan_chain(load_study("tiny", MICRO_OVERRIDES))
    assert stages.plan_chain(load_study("tiny", MICRO_OVERRIDES + ["pretrain.num_workers=1"])) == base
    assert stages.plan_chain(load_study("tiny", MICRO_OVERRIDES + ["pretrain.lr=0.002"])) != base
    assert Store("/tmp/x").root.is_absolute()
