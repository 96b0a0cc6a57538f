"""Faults the store and the driver recover from, on copies of the micro run's storage with real driver processes
attached to the session's Ray: trials killed as the OOM killer would kill them, cells that keep failing, and
artifacts deleted or spoiled behind rows that say ok."""

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from raysys.stages.chain import plan_chain
from raysys.stages.compatibility import CompatibilityCell
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store
from tests.conftest import MICRO_OVERRIDES, session_workers

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "sweeps" / "full_paper.py"
sys.path.insert(0, str(REPO / "bench"))
from compare_runs import PROVENANCE  # the columns no two runs share


@pytest.fixture(scope="module")
def address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


def _driver(storage: Path, address: str, *extra: str) -> subprocess.CompletedProcess:
    sets = [x for o in MICRO_OVERRIDES for x in ("--set", o)]
    return subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(storage), "--address",
                           address, *sets, *extra], capture_output=True, text=True, timeout=600, check=False)


def _copy(micro_run, tmp_path: Path, name: str) -> Store:
    _, shared, _ = micro_run
    shutil.copytree(shared.local, tmp_path / name, ignore=shutil.ignore_patterns("ray", "report"))
    return Store(tmp_path / name)


def _values(store: Store, table: str) -> dict[str, tuple]:
    """cell hash -> what the cell measured (its own columns, provenance aside)."""
    keep = [n for n in results.SCHEMAS[table].names if n not in PROVENANCE | {"repeated_failures"}]
    return {r["cell_hash"]: tuple(r[n] for n in keep) for r in results.read_table(store, table).to_pylist()}


class _Reaper:
    """SIGKILLs every process of one stage's trials as soon as it appears, as the OOM killer would (this session's
    Ray only)."""

    def __init__(self, name: str):
        self.name, self.killed, self._stop = name, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for proc in session_workers(self.name):
                try:
                    proc.send_signal(signal.SIGKILL)
                    self.killed += 1
                except psutil.Error:
                    pass
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_cells_whose_trials_die_get_failed_rows_and_stop_being_retried_after_max_failures(micro_run, tmp_path,
                                                                                          address):
    study, shared, _ = micro_run
    store = _copy(micro_run, tmp_path, "oom")
    cells = [c for c in stage("compatibility").plan(study, plan_chain(study)) if isinstance(c, CompatibilityCell)][:3]
    for cell in cells:  # three cells to run again; the others are done
        (store.local / "results" / "compatibility" / f"{cell.cell_hash}.parquet").unlink()
    runs = []
    for _ in range(2):  # twice: the same death counts as the same failure, whatever ids Tune's error names
        with _Reaper("ImplicitFunc") as reaper:  # a Tune trial's process (only this stage's trials run now)
            runs.append(_driver(store.local, address, "--only", "compatibility", "--max-failures", "2"))
        assert reaper.killed > 0
        assert runs[-1].returncode == 1, runs[-1].stderr[-2000:]
        rows = _rows_of(store, cells)
        assert len(rows) == len(cells) and {r["status"] for r in rows} == {"failed"}
        assert {(r["attempts"], r["repeated_failures"]) for r in rows} == {(len(runs), len(runs))}
        assert all(r["error"].startswith("the trial ended without recording this cell: its process died")
                   for r in rows), rows[0]["error"]
    assert f"[compatibility] {len(cells)} cells lost their trial's process without a row: launching them once more" \
        in runs[0].stdout
    assert f"[compatibility] {len(cells)} cells lost their trial's process without a row: recorded as failed" \
        in runs[0].stdout

    given_up = _driver(store.local, address, "--only", "compatibility", "--max-failures", "2")
    assert given_up.returncode == 1
    assert f"[compatibility] {len(cells)} cells not retried: they failed the same way 2 times" in given_up.stdout
    assert {r["attempts"] for r in _rows_of(store, cells)} == {2}  # not run

    retried = _driver(store.local, address, "--only", "compatibility", "--max-failures", "2", "--retry-failed")
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert {(r["status"], r["attempts"], r["repeated_failures"]) for r in _rows_of(store, cells)} == {("ok", 3, None)}
    assert _values(store, "compatibility") == _values(shared, "compatibility")


def test_cells_whose_trial_died_with_its_retry_are_launched_once_more_and_end_ok(micro_run, tmp_path, address):
    """Every trial process killed until the driver says it launches the lost cells once more (Tune's own retry of
    each trial died too, as when it lands on a reused actor that died with its node): the relaunch records them ok,
    first try, values equal to the uninterrupted run's."""
    study, shared, _ = micro_run
    store = _copy(micro_run, tmp_path, "relaunch")
    cells = [c for c in stage("compatibility").plan(study, plan_chain(study)) if isinstance(c, CompatibilityCell)][:2]
    for cell in cells:
        (store.local / "results" / "compatibility" / f"{cell.cell_hash}.parquet").unlink()
    sets = [x for o in MICRO_OVERRIDES for x in ("--set", o)]
    driver = subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "tiny", "--storage", str(store.local),
                               "--address", address, *sets, "--only", "compatibility"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = []
    try:
        with _Reaper("ImplicitFunc") as reaper:
            for line in driver.stdout:
                out.append(line)
                if "launching them once more" in line:
                    break
        out.extend(driver.stdout)
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    text = "".join(out)
    assert driver.returncode == 0, text[-3000:]
    assert reaper.killed >= 2 and f"{len(cells)} cells lost their trial's process without a row: launching" in text
    assert "recorded as failed" not in text
    rows = _rows_of(store, cells)
    assert {(r["status"], r["attempts"]) for r in rows} == {("ok", 1)} and len(rows) == len(cells)
    assert _values(store, "compatibility") == _values(shared, "compatibility")


def _rows_of(store: Store, cells: list) -> list[dict]:
    hashes = {c.cell_hash for c in cells}
    return [r for r in results.read_table(store, "compatibility").to_pylist() if r["cell_hash"] in hashes]


def test_missing_and_spoiled_artifacts_behind_ok_rows_are_remade_with_what_needed_them(micro_run, tmp_path,
                                                                                       address):
    """One tuned model deleted, another with a flipped bit (same size: only its checksum tells), both behind ok
    rows, and the compatibility rows that used them gone: the sweep remakes both (the spoiled one once a
    compatibility cell finds it, in a second pass), byte for byte, then the cells that needed them."""
    study, shared, _ = micro_run
    store = _copy(micro_run, tmp_path, "spoiled")
    compat = [c for c in stage("compatibility").plan(study, plan_chain(study)) if isinstance(c, CompatibilityCell)]
    deleted, spoiled = compat[0].source_tuned_hash, compat[-1].source_tuned_hash
    assert deleted != spoiled
    weights = {h: next(p for p in (store.local / "artifacts" / "tuned" / h).glob("*.safetensors")) for h in
               (deleted, spoiled)}
    original = {h: p.read_bytes() for h, p in weights.items()}
    shutil.rmtree(store.local / "artifacts" / "tuned" / deleted)
    flipped = bytearray(original[spoiled])
    flipped[len(flipped) // 2] ^= 0x01
    weights[spoiled].write_bytes(bytes(flipped))
    for cell in compat:
        if cell.source_tuned_hash in (deleted, spoiled):
            (store.local / "results" / "compatibility" / f"{cell.cell_hash}.parquet").unlink()
    tuning_before = _values(store, "tuning_runs")

    run = _driver(store.local, address, "--only", "tuning", "compatibility")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "does not match its checksum" in run.stderr and "another pass remakes them" in run.stdout
    for h in (deleted, spoiled):
        assert weights[h].read_bytes() == original[h]  # remade, byte for byte
    assert store.quarantined() == 1
    assert _values(store, "tuning_runs") == tuning_before  # the same rows, values and all
    assert _values(store, "compatibility") == _values(shared, "compatibility")
    assert {r["status"] for r in results.read_table(store, "compatibility").to_pylist()} == {"ok"}
