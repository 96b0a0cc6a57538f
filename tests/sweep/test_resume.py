"""Interruptions: the driver SIGKILLed mid-stage, a trial process killed, a grid value added. The sweep runs as a
real `sweeps/full_paper.py` process attached to the test session's Ray cluster."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from raysys.config import build, load_study, to_dict
from raysys.report.scope import planned_keys
from raysys.stages.chain import plan_chain, plan_pairs
from raysys.stages.registry import stage
from raysys.storage import checkpoint, results
from raysys.storage.store import Store
from raysys.sweep import driver as sweep
from tests.conftest import MICRO_OVERRIDES, session_workers

SCRIPT = Path(__file__).resolve().parents[2] / "sweeps" / "full_paper.py"
# the killed study: the micro study's main chain (the control chain's links, tuning runs and pairs are cells of the
# same kinds)
# no transfer_init: its cells start from the transfer stage, which the killed runs leave out (KILLED_STAGES)
KILLED_OVERRIDES = [*MICRO_OVERRIDES, "pilot.control_length=0", "methods.transfer_starts=[]"]


def _command(storage: Path, address: str, *extra: str) -> list[str]:
    sets = [x for o in KILLED_OVERRIDES for x in ("--set", o)]
    return [sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(storage), "--address", address,
            "--only", "pretrain", "tuning", *sets, *extra]


def _ok_runs(store: Store) -> dict[str, dict]:
    return {r["cell_hash"]: r for r in results.read_table(store, "tuning_runs").to_pylist() if r["status"] == "ok"}


def _wait_for(predicate, timeout: float, what):
    """`what`: the awaited thing, or a callable giving it (said only on a timeout: it may describe the state)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@pytest.fixture(scope="module")
def address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


# (what the driver is in the middle of when it is killed, table, ok rows to wait for before a cell of that table
# holds a checkpoint and no row): three kills at three stages, each kind of launch (a Train chain, a grid, the
# methods' rounds)
KILLS = (("pretraining", "pretrain_runs", 2), ("tuning", "tuning_runs", 5), ("the recycling methods", "methods_runs", 3))
# A killed driver's cell can still finish before its trial dies; the kill is tried again (the next run resumes
# first), up to this many times, until one leaves a cell stranded mid-way.
ATTEMPTS = 4
# Ray processes that outlive a killed driver by design: idle pooled workers, Ray Train's detached cleaner of
# placement groups (minutes), and its autoscaling coordinator, a session-wide singleton started by the session's
# first Train run (which test ran first on this xdist worker decides whether it predates a kill)
RAY_HELPERS = {"ray::IDLE", "ray::PlacementGroupCleaner", "ray::_AutoscalingCoordinatorActor"}
# Columns an interruption changes by design: where a cell resumed from, whether the teacher cache was warm; and the
# config column, which records checkpoint_every_seconds (checked apart)
INTERRUPTION_COLUMNS = {"resumed_from_step", "teacher", "config"}
# checkpoints at every evaluation, so that kills land in cells holding one (not part of any cell's identity)
EVERY_STEP = ("--set", "pretrain.checkpoint_every_seconds=0", "--set", "tuning.checkpoint_every_seconds=0")
# the stages the killed study runs: every kind of launch (a Train chain, grids, the methods' two rounds); the
# evaluation-only stages left out are launched the same way as interpolation
KILLED_STAGES = ("pretrain", "tuning", "interpolation", "methods")


def _full_command(storage: Path, address: str) -> list[str]:
    sets = [x for o in KILLED_OVERRIDES for x in ("--set", o)]
    return [sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(storage), "--address", address, *sets,
            *EVERY_STEP, "--only", *KILLED_STAGES]


def _planned_rows(store: Store, table: str, keys: set[str]) -> dict[tuple, dict]:
    """The rows of `table` (keyed as bench/compare_runs.py keys them) of the cells in `keys`, minus the columns no
    two runs share and those an interruption changes."""
    import compare_runs

    return {key: {k: v for k, v in row.items() if k not in INTERRUPTION_COLUMNS}
            for key, row in compare_runs._rows(store, table).items() if key[0] in keys}


def _finished(store: Store) -> dict[tuple[str, str], object]:
    """(table, cell hash) -> started_at of every ok row: what a rerun must not make again."""
    return {(table, r["cell_hash"]): r["started_at"] for table in results.SCHEMAS
            if "status" in results.SCHEMAS[table].names
            for r in results.read_table(store, table, ["cell_hash", "status", "started_at"]).to_pylist()
            if r["status"] == "ok"}


def _artifact_times(store: Store) -> dict[tuple[str, str], int]:
    return {(kind, key): max(p.stat().st_mtime_ns for p in (store.local / "artifacts" / kind / key).rglob("*"))
            for kind in ("plm", "tuned") for key in store.list_dirs(f"artifacts/{kind}")}


def _busy_workers() -> dict[int, str]:
    """pid -> title of the Ray worker processes doing something (a task or an actor)."""
    found = {}
    for proc in session_workers("ray::"):
        title = " ".join(proc.info["cmdline"] or []).strip()  # Ray pads the titles it sets
        if title.startswith("ray::") and title not in RAY_HELPERS:
            found[proc.pid] = title
    return found


def _running(driver: subprocess.Popen) -> bool:
    if driver.poll() is not None:
        raise AssertionError(f"the driver exited ({driver.returncode}) before it was killed")
    return True


def _stranded(store: Store, table: str) -> set[str]:
    """The cells holding a mid-run checkpoint and no ok row of `table`: what a resumed run continues."""
    return set(_checkpointed(store)) - results.finished_cells(store, table)


def _kill_mid_cell(storage: Path, address: str, table: str, rows: int, on_start) -> bool:
    """Start the driver, SIGKILL it once `rows` cells of `table` are done and another holds a checkpoint, and wait
    until its trials' processes are gone. True when the kill left a cell stranded (it had not finished meanwhile)."""
    store, before = Store(storage), _busy_workers()
    driver = subprocess.Popen(_full_command(storage, address), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        on_start(driver)
        _wait_for(lambda: _running(driver) and len(results.finished_cells(store, table)) >= rows
                  and _stranded(store, table), 600, f"{rows} rows of {table} and a cell mid-way")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    _wait_for(lambda: not _busy_workers().keys() - before.keys(), 300,
              lambda: f"the killed driver's workers to exit: {sorted(set(_busy_workers().items()) - set(before.items()))}")
    return bool(_stranded(store, table))


@pytest.fixture(scope="module")
def killed_then_resumed(address, tmp_path_factory):
    """The micro study's main chain (two DDP workers), its driver SIGKILLed three times at three stages — the next run
    started at once each time — then run to completion. While the first run holds the storage a second driver is
    refused."""
    storage = tmp_path_factory.mktemp("resume")
    store = Store(storage)
    kills, second, tuning_finished_at_kill, tuned_at_kill = [], [], {}, {}

    def refuse_a_second_driver(driver):
        if not second:
            _wait_for(lambda: store.is_file(".raysys-lease"), 120, "the first driver to take the storage")
            second.append((subprocess.run(_full_command(storage, address), capture_output=True, text=True,
                                          timeout=120, check=False), driver.pid))

    for what, table, rows in KILLS:
        landed = any(_kill_mid_cell(storage, address, table, rows, refuse_a_second_driver) for _ in range(ATTEMPTS))
        assert landed, f"no kill during {what} in {ATTEMPTS} tries left a cell mid-way"
        kills.append((what, _finished(store), _artifact_times(store)))
        if table == "tuning_runs":
            tuning_finished_at_kill = _ok_runs(store)
            tuned_at_kill = {h: t for (kind, h), t in kills[-1][2].items() if kind == "tuned"}
    rerun = subprocess.run(_full_command(storage, address), capture_output=True, text=True, timeout=900, check=False)
    return store, kills, second[0], rerun, tuning_finished_at_kill, tuned_at_kill


def test_a_driver_killed_at_three_stages_ends_exactly_where_an_uninterrupted_run_does(killed_then_resumed, micro_run,
                                                                                    killed_study):
    """Every table equals the uninterrupted micro run's, cell for cell and value for value (timing and
    provenance aside), each cell once; nothing finished before a kill was made again."""
    sys.path.insert(0, str(SCRIPT.parents[1] / "bench"))
    from compare_runs import _same

    store, kills, _, rerun, _, _ = killed_then_resumed
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _, uninterrupted, _ = micro_run
    tables = {t for name in KILLED_STAGES for t in stage(name).tables}
    planned = planned_keys(killed_study)
    differing, rows = {}, 0
    for table in sorted(tables):
        old, new = (_planned_rows(s, table, planned[table]) for s in (uninterrupted, store))
        assert old.keys() == new.keys() and old, table  # every planned row once in each, none missing
        bad = [(key, column) for key in old for column in old[key] if not _same(old[key][column], new[key][column])]
        differing[table], rows = bad, rows + len(new)
    assert {t: bad for t, bad in differing.items() if bad} == {}
    assert len(differing) == 8 and rows > 500, (differing, rows)
    print(f"\n{len(differing)} tables, {rows} rows: equal to the uninterrupted run's, cell for cell")
    final, times = _finished(store), _artifact_times(store)
    for what, finished, artifacts in kills:
        assert finished, f"the kill during {what} came before anything was finished"
        remade = [key for key, started in finished.items() if final[key] != started]
        assert remade == [], f"made again after the kill during {what}"
        assert [k for k, t in artifacts.items() if times[k] != t and (("pretrain_runs" if k[0] == "plm" else
                                                                        "tuning_runs"), k[1]) in finished] == []
    for table in tables:
        rows = results.read_table(store, table).to_pylist()
        assert all(r.get("status", "ok") == "ok" for r in rows), table
        if "config" in results.SCHEMAS[table].names:
            mine = _configs(store, table)
            assert mine == {h: c for h, c in _configs(uninterrupted, table).items() if h in mine}, table
    resumed = {t: sum(r["resumed_from_step"] is not None for r in results.read_table(store, t).to_pylist())
               for t in ("pretrain_runs", "tuning_runs", "methods_runs")}
    assert min(resumed.values()) >= 1, resumed  # kills landed mid-cell: a link, a tuning run, a method run resumed
    assert len(kills) == 3 and len({len(f) for _, f, _ in kills}) == 3  # each kill later in the study


def _configs(store: Store, table: str) -> dict[str, dict]:
    """cell hash -> its config column, checkpoint_every_seconds aside."""
    return {r["cell_hash"]: {k: v for k, v in json.loads(r["config"]).items() if k != "checkpoint_every_seconds"}
            for r in results.read_table(store, table).to_pylist()}


def test_a_second_driver_on_a_storage_in_use_is_refused_naming_the_first(killed_then_resumed):
    _, _, (second, first_pid), _, _, _ = killed_then_resumed
    assert second.returncode == 2, second.stderr[-2000:]
    assert re.search(rf"error: --storage '.*' is in use by another driver: \S+@\S+ \(pid {first_pid}\)", second.stderr)
    assert "Traceback" not in second.stderr + second.stdout


@pytest.fixture(scope="module")
def killed_study():
    return load_study("tiny", KILLED_OVERRIDES)


def test_a_killed_driver_resumes_without_retraining(killed_then_resumed, killed_study):
    store, _, _, _, before, mtimes = killed_then_resumed
    tuning_cells = stage("tuning").plan(killed_study, plan_chain(killed_study))
    assert 5 <= len(before) < len(tuning_cells), "the kill must land in the middle of the stage"
    after = _ok_runs(store)
    assert set(after) == {c.cell_hash for c in tuning_cells}
    for h, row in before.items():
        assert after[h]["started_at"] == row["started_at"]  # the same run's row, not a retrained one
        assert _artifact_times(store)[("tuned", h)] == mtimes[h]
    table = results.read_table(store, "tuning_runs")
    assert table.num_rows == len(set(table["cell_hash"].to_pylist())) == len(tuning_cells)  # each row once
    curves = results.read_table(store, "tuning_curves").to_pylist()
    keys = [(r["cell_hash"], r["step"]) for r in curves]
    assert len(keys) == len(set(keys))


def _trial_processes() -> list[psutil.Process]:
    return [p for p in session_workers("") if any(name in " ".join(p.info["cmdline"] or [])
                                                  for name in ("ImplicitFunc", "_tuning_trainable"))]


LONG, EVERY = 60, 4  # steps of the added cells; the micro study evaluates every 4 steps
LONGER = ("--set", "seeds=[21]", "--set", f"tuning.max_steps={LONG}", "--set", "tuning.checkpoint_every_seconds=0",
          "--set", 'tuning.types=["lora"]')  # new cells: another seed, longer (max_steps is part of their identity)


def _checkpointed(store: Store) -> dict[str, int]:
    """Cell hash -> step of its newest mid-run checkpoint."""
    found = {h: checkpoint.latest(store, h) for h in store.list_dirs("checkpoints")}
    return {h: int(p.name.split("-")[1]) for h, p in found.items() if p is not None}


def test_a_killed_trial_is_retried_from_its_checkpoint(killed_then_resumed, address, killed_study):
    """Another seed adds tuning cells, longer ones (max_steps is part of their identity), checkpointed at every
    evaluation; the trial processes (and any idle one Tune keeps for reuse) are SIGKILLed while they run; Tune's
    FailureConfig retries them (the driver launches once more those a retry did not record), each interrupted cell
    continues from its newest checkpoint, and the sweep ends with every cell done once."""
    store = killed_then_resumed[0]
    tuning_cells = stage("tuning").plan(killed_study, plan_chain(killed_study))
    longer = build(type(killed_study), {**to_dict(killed_study), "seeds": [21],
                                        "tuning": {**to_dict(killed_study.tuning), "max_steps": LONG,
                                                   "types": ["lora"]}})
    new_cells = stage("tuning").plan(longer, plan_chain(longer))
    driver = subprocess.Popen(_command(store.root, address, *LONGER), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        _wait_for(lambda: len(_ok_runs(store)) >= len(tuning_cells) + 2 and _checkpointed(store)
                  and _trial_processes(), 300, "a checkpointed trial of the new cells")
        killed = _trial_processes()
        for proc in killed:
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(killed, timeout=10)
        interrupted = _checkpointed(store)
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    runs = _ok_runs(store)
    assert len(runs) == len(tuning_cells) + len(new_cells) and set(runs) >= {c.cell_hash for c in new_cells}
    assert not [r for r in results.read_table(store, "tuning_runs").to_pylist() if r["status"] != "ok"]
    assert interrupted, "the kill must land while a cell holds a checkpoint"
    for h, step in interrupted.items():
        assert runs[h]["resumed_from_step"] == step
    assert sum(runs[c.cell_hash]["resumed_from_step"] is not None for c in new_cells) == len(interrupted)
    assert _checkpointed(store) == {}  # a finished cell's checkpoints are gone
    curves = results.read_table(store, "tuning_curves").to_pylist()
    keys = [(r["cell_hash"], r["step"]) for r in curves]
    assert len(keys) == len(set(keys))
    for h in interrupted:  # the resumed curve is whole: every evaluation step once
        assert sorted(step for cell, step in keys if cell == h) == list(range(EVERY, LONG + 1, EVERY))


def test_a_new_grid_value_runs_only_the_new_cells(micro_run, tmp_path):
    study, shared, _ = micro_run
    store = Store(tmp_path / "copy")
    shutil.copytree(shared.root, store.root)
    before = {r["cell_hash"]: r["started_at"] for r in results.read_table(store, "interpolation").to_pylist()}
    wider = build(type(study), {**to_dict(study), "pilot": {**to_dict(study.pilot), "alphas": [0.0, 0.25, 0.5, 1.0]}})
    ran = sweep.run_study(wider, store, log=lambda *_: None)
    pairs = plan_pairs(wider, plan_chain(wider))
    assert ran["interpolation"]["ran"] == 2 * len(pairs)  # one new α per path, and the path's summary again
    assert all(s["ran"] == 0 for name, s in ran.items() if name != "interpolation"), ran
    rows = results.read_table(store, "interpolation").to_pylist()
    assert len(rows) == len({r["cell_hash"] for r in rows}) == 4 * len(pairs)
    for r in rows:
        if r["alpha"] != 0.25:
            assert before[r["cell_hash"]] == r["started_at"]
    paths = results.read_table(store, "interpolation_paths").to_pylist()
    assert len(paths) == 2 * len(pairs) and all(p["num_alphas"] == 4 for p in paths)


# one DDP worker here (the driver kills above run two)
PRETRAIN_SETS = ("--set", "pilot.control_length=0", "--set", "pretrain.continual_steps=20",
                 "--set", "pretrain.checkpoint_every_seconds=0", "--set", "pretrain.num_workers=1")


def _pretrain_command(storage: Path, address: str) -> list[str]:
    sets = [x for o in MICRO_OVERRIDES for x in ("--set", o)]
    return [sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(storage), "--address", address,
            "--only", "pretrain", *sets, *PRETRAIN_SETS]


def _train_workers() -> list[psutil.Process]:
    return session_workers("RayTrainWorker")


def _plm_weights(store: Store) -> dict[str, bytes]:
    return {h: (store.artifact("plm", h) / "model.safetensors").read_bytes() for h in store.list_dirs("artifacts/plm")}


def test_a_killed_train_worker_costs_one_checkpoint_interval_of_one_link(address, tmp_path):
    """One DDP worker. Its process is SIGKILLed mid-chain (a spot node reclaimed): Ray Train restarts the worker
    group, the chain skips the links already in the store and continues the interrupted one from its checkpoint.
    Then, in the next link, the driver is SIGKILLed and run again. No finished link is trained again, and the PLMs
    and tables equal an uninterrupted run's, byte for byte and value for value."""
    killed_store = Store(tmp_path / "killed")
    driver = subprocess.Popen(_pretrain_command(killed_store.local, address), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def checkpointed_after(links: int):
        rows = results.read_table(killed_store, "pretrain_runs").to_pylist()
        return len(rows) == links and _checkpointed(killed_store) and _train_workers()

    try:
        _wait_for(lambda: checkpointed_after(2), 300, "link 2 to checkpoint after links 0 and 1 are done")
        finished = {r["cell_hash"]: r["started_at"] for r in results.read_table(killed_store, "pretrain_runs").to_pylist()}
        files = {h: (killed_store.artifact("plm", h) / "model.safetensors").stat().st_mtime_ns for h in finished}
        victim = _train_workers()[-1]
        victim.send_signal(signal.SIGKILL)
        psutil.wait_procs([victim], timeout=10)
        _wait_for(lambda: checkpointed_after(3), 300, "link 3 to checkpoint after link 2 is done")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    rerun = subprocess.run(_pretrain_command(killed_store.local, address), capture_output=True, text=True,
                           timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    rows = {r["cell_hash"]: r for r in results.read_table(killed_store, "pretrain_runs").to_pylist()}
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"ok"}
    for h, started in finished.items():  # 0 finished links retrained
        assert rows[h]["started_at"] == started and rows[h]["resumed_from_step"] is None
        assert (killed_store.artifact("plm", h) / "model.safetensors").stat().st_mtime_ns == files[h]
    resumed = sorted((r["link"], r["resumed_from_step"]) for r in rows.values() if r["resumed_from_step"] is not None)
    assert [link for link, _ in resumed] == [2, 3] and all(1 <= step < 20 for _, step in resumed), resumed
    assert killed_store.list_dirs("checkpoints") == []
    # the checkpoints lived in the store only: Ray's own run folders hold none
    ray_files = [str(p.relative_to(killed_store.local)) for p in (killed_store.local / "ray").rglob("*")]
    assert ray_files and not [f for f in ray_files if "checkpoint_" in f]

    whole_store = Store(tmp_path / "whole")
    for prepared in ("tokenizer", "corpus"):  # the PLMs' inputs, keyed by what made them: not retrained here either
        shutil.copytree(killed_store.local / "artifacts" / prepared, whole_store.local / "artifacts" / prepared)
    whole = subprocess.run(_pretrain_command(whole_store.local, address), capture_output=True, text=True,
                           timeout=600, check=False)
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert _plm_weights(killed_store) == _plm_weights(whole_store)
    sys.path.insert(0, str(SCRIPT.parents[1] / "bench"))
    from compare_runs import compare

    report = compare(whole_store, killed_store, ignore={"resumed_from_step"})
    assert {t: r for t, r in report.items() if r["only_old"] or r["only_new"] or r["differing"]} == {}
    assert report["pretrain_curves"]["rows"][1] > 0 and report["pretrain_runs"]["rows"] == (4, 4)
