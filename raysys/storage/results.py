"""Result tables: one explicit `pyarrow` schema per table (documented in docs/results.md), one Parquet file per
cell named by the cell's hash, written atomically. A table is the Parquet dataset `<storage>/results/<table>/`."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysys.storage.store import QUARANTINE, Store  # quarantine/<the file's path>: result files that do not parse

SCHEMA_VERSION = 9  # 6: attempts, repeated_failures; 7: the pair tables' seed_b; 8: the training tables' device;
# 9: the method tables' transfer, methods_runs' start_train_seconds
# (older files read the new columns null)

_COMMON = [
    ("cell_hash", pa.string()),
    ("status", pa.string()),  # "ok" | "failed"
    ("error", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("seconds", pa.float64()),
    ("host", pa.string()),
    ("node_id", pa.string()),  # the Ray node that ran the cell (hosts can share a name; nodes cannot)
    ("code_version", pa.string()),
    ("schema_version", pa.int32()),
    ("attempts", pa.int32()),  # which try of the cell this row records: 1, 2, ...
    ("repeated_failures", pa.int32()),  # failed rows: how many tries in a row failed with this error's first line
]
_CURVE_COMMON = [("cell_hash", pa.string())]

_PAIR = [
    # "continual": tuned M_i vs tuned M_j of one chain; "control": vs the control chain; "same_plm": two seeds on M_i
    ("pair_kind", pa.string()),
    ("task", pa.string()), ("tuning_type", pa.string()), ("seed", pa.int64()), ("plm_index_a", pa.int32()),
    ("plm_index_b", pa.int32()), ("chain_b", pa.string()), ("tuned_hash_a", pa.string()),
    ("tuned_hash_b", pa.string()),
    ("seed_b", pa.int64()),  # end b's seed: `seed` but in same_plm pairs (null in files before schema 7)
]
_METRICS = [("dev_accuracy", pa.float64()), ("dev_loss", pa.float64()), ("test_accuracy", pa.float64()),
            ("test_loss", pa.float64())]

_METHOD = [
    ("method", pa.string()),  # vanilla | init | distill | combined | transfer_init
    ("task", pa.string()), ("tuning_type", pa.string()), ("seed", pa.int64()), ("source_plm_index", pa.int32()),
    ("target_plm_index", pa.int32()), ("regime", pa.string()),  # "full" | "kshot"
    ("shots", pa.int32()),  # K per class (null for full data)
    ("temperature", pa.float64()), ("kd_weight", pa.float64()), ("beta", pa.float64()),  # null unless distilling
    ("transfer", pa.string()),  # transfer_init: the transfer method its start came from (null otherwise)
]

_TABLE_FIELDS = {
    "pretrain_runs": _COMMON + [
        ("chain", pa.string()), ("link", pa.int32()), ("domain", pa.string()), ("parent_hash", pa.string()),
        ("init", pa.string()), ("steps", pa.int64()), ("lr", pa.float64()), ("num_workers", pa.int32()),
        ("num_parameters", pa.int64()), ("final_loss", pa.float64()), ("tokens", pa.int64()),
        ("tokens_per_second", pa.float64()), ("config", pa.string()), ("resumed_from_step", pa.int64()),
    ],
    "pretrain_curves": _CURVE_COMMON + [
        ("chain", pa.string()), ("link", pa.int32()), ("domain", pa.string()), ("step", pa.int64()),
        ("loss", pa.float64()), ("lr", pa.float64()), ("tokens", pa.int64()), ("seconds", pa.float64()),
        ("tokens_per_second", pa.float64()),
    ],
    "tuning_runs": _COMMON + [
        ("chain", pa.string()), ("plm_hash", pa.string()), ("plm_index", pa.int32()), ("plm_domain", pa.string()),
        ("task", pa.string()), ("task_domain", pa.string()), ("tuning_type", pa.string()), ("seed", pa.int64()),
        ("lr", pa.float64()), ("max_steps", pa.int64()), ("num_train", pa.int64()), ("num_labels", pa.int32()),
        ("num_parameters", pa.int64()), ("num_trainable_parameters", pa.int64()), ("best_step", pa.int64()),
        ("best_dev_accuracy", pa.float64()), ("best_dev_loss", pa.float64()), ("test_accuracy", pa.float64()),
        ("test_loss", pa.float64()), ("train_seconds", pa.float64()), ("config", pa.string()),
        ("resumed_from_step", pa.int64()),
        ("device", pa.string()),  # the device it trained on: a GPU's model, or "cpu (N threads)" (the cost ledger)
    ],
    "tuning_curves": _CURVE_COMMON + [
        ("chain", pa.string()), ("plm_index", pa.int32()), ("task", pa.string()), ("tuning_type", pa.string()),
        ("seed", pa.int64()), ("step", pa.int64()), ("train_loss", pa.float64()), ("dev_accuracy", pa.float64()),
        ("dev_loss", pa.float64()), ("seconds", pa.float64()),
    ],
    "compatibility": _COMMON + [
        ("task", pa.string()), ("tuning_type", pa.string()), ("seed", pa.int64()), ("source_plm_index", pa.int32()),
        ("target_plm_index", pa.int32()), ("source_tuned_hash", pa.string()), ("target_plm_hash", pa.string()),
    ] + _METRICS,
    "baselines": _COMMON + [
        ("task", pa.string()), ("seed", pa.int64()), ("plm_index", pa.int32()), ("plm_hash", pa.string()),
        ("kind", pa.string()),  # "majority" (most frequent training label) | "untrained_head" (PLM + fresh head)
    ] + _METRICS,
    "interpolation": _COMMON + _PAIR + [("alpha", pa.float64())] + _METRICS,
    "interpolation_paths": _COMMON + _PAIR + [
        ("split", pa.string()), ("num_alphas", pa.int32()), ("loss_a", pa.float64()), ("loss_b", pa.float64()),
        ("accuracy_a", pa.float64()), ("accuracy_b", pa.float64()), ("min_accuracy", pa.float64()),
        ("loss_barrier", pa.float64()), ("accuracy_drop", pa.float64()),
    ],
    "head_similarity": _COMMON + _PAIR + [
        ("layer", pa.int32()), ("head", pa.int32()), ("num_examples", pa.int32()),
        ("js_corresponding", pa.float64()), ("js_noncorresponding", pa.float64()),
        ("similarity_corresponding", pa.float64()), ("similarity_noncorresponding", pa.float64()),
    ],
    "distances": _COMMON + _PAIR + [
        ("what", pa.string()),  # "plm" | "tuned" | "update" (Δ for fine-tuning, the PET module otherwise)
        ("num_parameters", pa.int64()), ("l2", pa.float64()), ("l2_per_parameter", pa.float64()),
        ("cosine", pa.float64()),
    ],
}
_TABLE_FIELDS.update({
    "methods_runs": _COMMON + _METHOD + [
        ("old_tuned_hash", pa.string()), ("target_plm_hash", pa.string()), ("vanilla_hash", pa.string()),
        ("lr", pa.float64()), ("max_steps", pa.int64()), ("num_train", pa.int64()), ("num_dev", pa.int64()),
        ("start_dev_accuracy", pa.float64()),  # step 0: what the start point scores before any training
        # selection on `dev` (the K-shot dev set in the few-shot regime, as the paper selects)
        ("best_step", pa.int64()), ("best_dev_accuracy", pa.float64()), ("test_accuracy", pa.float64()),
        ("test_loss", pa.float64()), ("dev_auc", pa.float64()), ("target_dev_accuracy", pa.float64()),
        ("steps_to_target", pa.int64()), ("seconds_to_target", pa.float64()),
        # the same on the full dev set (equal to the above for full data)
        ("full_dev_best_step", pa.int64()), ("full_dev_best_accuracy", pa.float64()),
        ("full_dev_test_accuracy", pa.float64()), ("full_dev_auc", pa.float64()),
        ("full_dev_target_accuracy", pa.float64()), ("full_dev_steps_to_target", pa.int64()),
        ("full_dev_seconds_to_target", pa.float64()),
        ("teacher", pa.string()),  # "cache-hit" | "cache-miss" | "live" | null (no teacher)
        ("train_seconds", pa.float64()), ("config", pa.string()), ("resumed_from_step", pa.int64()),
        ("device", pa.string()),  # as in tuning_runs
        ("start_train_seconds", pa.float64()),  # training the start itself took (text_distill's text phase) or null
    ],
    "methods_curves": _CURVE_COMMON + _METHOD + [
        ("step", pa.int64()), ("train_loss", pa.float64()), ("dev_accuracy", pa.float64()),
        ("dev_loss", pa.float64()), ("full_dev_accuracy", pa.float64()), ("full_dev_loss", pa.float64()),
        ("seconds", pa.float64()),
    ],
    "training_free": _COMMON + [
        ("tuning_type", pa.string()), ("seed", pa.int64()), ("source_plm_index", pa.int32()),
        ("target_plm_index", pa.int32()),
        ("map_task", pa.string()),  # the task whose old weights the map was trained on
        ("task", pa.string()),  # the task whose old weights were mapped and evaluated
        ("rank", pa.int32()), ("map_steps", pa.int64()), ("map_final_loss", pa.float64()),
        ("mapped_dev_accuracy", pa.float64()), ("mapped_test_accuracy", pa.float64()),
        ("direct_dev_accuracy", pa.float64()), ("direct_test_accuracy", pa.float64()),
    ],
    # one row per setting of a transfer method's grid on one pair (raysys.stages.transfer); a method that does not
    # apply writes one row, applicable false, with the reason; test_* only on the setting chosen on dev
    "transfer": _COMMON + [
        ("method", pa.string()), ("task", pa.string()), ("tuning_type", pa.string()), ("seed", pa.int64()),
        ("source_plm_index", pa.int32()), ("target_plm_index", pa.int32()), ("source_tuned_hash", pa.string()),
        ("target_plm_hash", pa.string()), ("applicable", pa.bool_()), ("reason", pa.string()),
        ("setting", pa.string()),  # JSON: the method's arguments, e.g. {"rank": 8, "null_space": true}
        ("selected", pa.bool_()), ("num_versions", pa.int32()), ("relative_change", pa.float64()),
    ] + _METRICS,
    "recycle": _COMMON + [
        ("task", pa.string()), ("tuning_type", pa.string()), ("source_plm_index", pa.int32()),
        ("target_plm_index", pa.int32()), ("target_plm_hash", pa.string()), ("seed", pa.int64()),
        ("source_tuned_hash", pa.string()), ("method", pa.string()),
        ("setting", pa.string()),  # JSON, as in `transfer`
        ("probe_examples", pa.int32()), ("probe_accuracy", pa.float64()), ("probe_loss", pa.float64()),
        ("chosen", pa.bool_()),  # the (method, setting) the rule picked for this (task, type, upgrade)
        ("dev_accuracy", pa.float64()), ("dev_loss", pa.float64()),  # the chosen one's, on the full dev set
        ("test_accuracy", pa.float64()), ("test_loss", pa.float64()),
        ("recycled_hash", pa.string()),  # the chosen weights' artifact (artifacts/recycled/)
    ],
})
# One row per trial of an Optuna search (`--search optuna`): a methods row with its own lr, under its search.
_TABLE_FIELDS["methods_search"] = _TABLE_FIELDS["methods_runs"] + [("search_hash", pa.string())]
SCHEMAS = {name: pa.schema(fields, metadata={"raysys_schema_version": str(SCHEMA_VERSION)})
           for name, fields in _TABLE_FIELDS.items()}


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code that produced a row (with '+dirty' for uncommitted changes), or 'unknown'."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=False,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=False, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def provenance(started_at: dt.datetime, status: str = "ok", error: str | None = None) -> dict:
    """The outcome and provenance columns shared by every run table."""
    return {
        "status": status,
        "error": error,
        "started_at": started_at,
        "seconds": (dt.datetime.now(dt.timezone.utc) - started_at).total_seconds(),
        "host": socket.gethostname(),
        "node_id": _ray_node_id(),
        "code_version": code_version(),
        "schema_version": SCHEMA_VERSION,
    }


def _ray_node_id() -> str | None:
    ray = sys.modules.get("ray")  # never imported here: a process that has not loaded Ray runs on no Ray node
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def to_table(table: str, rows: list[dict]) -> pa.Table:
    """Rows -> Arrow table of the declared schema. A key outside the schema is an error (catches typos); a
    missing key is null."""
    schema = SCHEMAS[table]
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"table {table}: unknown column(s) {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


def _cell_file(table: str, cell_hash: str) -> str:
    return f"results/{table}/{cell_hash}.parquet"


def write_rows(store: Store, table: str, cell_hash: str, rows: list[dict]) -> str:
    """All rows of one cell, as one Parquet file replacing any earlier attempt of the same cell; returns its URI.
    A run table's rows are numbered by attempt, counting the rows they replace."""
    if "attempts" in SCHEMAS[table].names:
        try:
            before = read_cell(store, table, cell_hash)
        except (pa.ArrowInvalid, OSError):  # a spoiled earlier file: this row replaces it
            before = []
        rows = _numbered(rows, before)
    arrow = to_table(table, [{"cell_hash": cell_hash, **row} for row in rows])
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer)
    store.write_bytes(_cell_file(table, cell_hash), buffer.getvalue())
    return store.uri(_cell_file(table, cell_hash))


_IDS = re.compile(r"\b(?:0x)?[0-9a-f]*\d[0-9a-f]*\b", re.IGNORECASE)


def failure_kind(error: str | None) -> str:
    """What tells two failures apart: the error's first line (its type and message, not the traceback), numbers
    and ids in it aside (a dead actor's id and pid change from try to try; the failure does not)."""
    text = (error or "").strip()
    return _IDS.sub("#", text.splitlines()[0]) if text else ""


def _numbered(rows: list[dict], before: list[dict]) -> list[dict]:
    """`attempts` one more than the rows replaced had; a failed row's `repeated_failures` one more than theirs when
    they failed the same way, else 1."""
    last = before[0] if before else {}
    attempt = (last.get("attempts") or (1 if before else 0)) + 1
    repeated = (last.get("repeated_failures") or 1) + 1 if last.get("status") == "failed" else 1
    out = []
    for row in rows:
        row = {"attempts": attempt, **row}
        if row.get("status") == "failed":
            same = last.get("status") == "failed" and failure_kind(last.get("error")) == failure_kind(row["error"])
            row.setdefault("repeated_failures", repeated if same else 1)
        out.append(row)
    return out


def given_up(store: Store, table: str, after: int) -> set[str]:
    """Hashes of the cells whose row failed the same way `after` tries in a row: not retried until asked."""
    t = read_table(store, table, ["cell_hash", "status", "repeated_failures"])
    return {h for h, status, n in zip(t["cell_hash"].to_pylist(), t["status"].to_pylist(),
                                      t["repeated_failures"].to_pylist()) if status == "failed" and (n or 0) >= after}


def read_table(store: Store, table: str, columns: list[str] | None = None) -> pa.Table:
    """A whole table (empty, with its schema, when nothing has been written). A file that does not parse (a disk
    that lost its tail, a copy cut short) is quarantined, its cell counting as not run, and the rest is read."""
    directory = store.results_path(table)
    if store.fs.get_file_info(directory).type != pafs.FileType.Directory:
        return SCHEMAS[table].empty_table() if columns is None else SCHEMAS[table].empty_table().select(columns)
    try:
        return _dataset(store, table, directory, columns)
    except _UNREADABLE:  # damage reads as ArrowInvalid or OSError (thrift); so does a failing disk
        sound = _quarantine_damaged(store, table)
        if sound is None:
            raise  # every file reads: the error was the storage's, not a file's
        return _dataset(store, table, [store.path(f"results/{table}/{name}") for name in sound], columns)


class ResultFileError(ValueError):
    """A result file is Parquet, but of a schema this code cannot read; the message names it."""


# what pyarrow raises for a file it cannot read (its ArrowInvalid is a ValueError, ArrowIOError an OSError)
_UNREADABLE = (OSError, ValueError, pa.ArrowException)


def _dataset(store: Store, table: str, source: str | list[str], columns: list[str] | None) -> pa.Table:
    return ds.dataset(source, filesystem=store.fs, format="parquet", schema=SCHEMAS[table]).to_table(columns=columns)


def _damage(payload: bytes) -> str | None:
    """Why these bytes are not a Parquet file, or None (they parse, whatever their schema)."""
    try:
        pq.read_table(pa.BufferReader(payload))
    except _UNREADABLE as err:  # parsed in memory: no I/O error can be among them
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def _parse(store: Store, table: str, rel: str, payload: bytes) -> pa.Table | None:
    """One result file's rows; None once quarantined for damage; ResultFileError for another schema."""
    try:
        return pq.read_table(pa.BufferReader(payload), schema=SCHEMAS[table])
    except _UNREADABLE as err:
        why = _damage(payload)
        if why is None:  # a Parquet file all the same: not to be moved
            raise ResultFileError(f"{store.uri(rel)}: not of the {table} schema this code reads ({err})") from err
        quarantine(store, rel, why)
        return None


def _quarantine_damaged(store: Store, table: str) -> list[str] | None:
    """Quarantine every file of the table that does not parse; the names of the sound ones, or None if every file
    reads (ResultFileError names one of another schema)."""
    sound, damaged = [], False
    for name in store.list_files(f"results/{table}", ".parquet"):
        rel = f"results/{table}/{name}"
        payload = store.read_bytes(rel)
        if payload is None:
            continue  # moved meanwhile
        if _parse(store, table, rel, payload) is None:
            damaged = True
        else:
            sound.append(name)
    return sound if damaged else None


def quarantine(store: Store, rel: str, why: str) -> str:
    """Move a damaged file to `quarantine/<rel>` (a numbered name beside an earlier one), its bytes as they were,
    saying so on stderr; returns where it went. A reader that finds it gone (another moved it first) moves nothing."""
    target, n = f"{QUARANTINE}/{rel}", 0
    while store.is_file(target):
        n += 1
        target = f"{QUARANTINE}/{rel}.{n}"
    try:
        if store.remote:
            payload = store.read_bytes(rel)
            if payload is None:
                return target
            store.write_bytes(target, payload)
            store.delete_file(rel)
        else:
            Path(store.path(target)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(store.path(rel), store.path(target))
    except FileNotFoundError:
        return target
    except OSError as err:  # a storage this process may only read (`raysys status`): skipped, not moved
        print(f"warning: {store.uri(rel)} does not parse ({why}) and could not be moved to quarantine ({err}); "
              "read as if its cell had not run", file=sys.stderr)
        return target
    print(f"warning: {store.uri(rel)} does not parse ({why}); moved to {store.uri(target)}: its cell counts as "
          "not run and runs again", file=sys.stderr)
    return target


def cell_statuses(store: Store, table: str) -> dict[str, set[str]]:
    """Status (`ok`, `failed`) -> the hashes of the cells with a row of that status."""
    t = read_table(store, table, ["cell_hash", "status"])
    out: dict[str, set[str]] = {}
    for h, status in zip(t["cell_hash"].to_pylist(), t["status"].to_pylist()):
        out.setdefault(status, set()).add(h)
    return out


def finished_cells(store: Store, table: str) -> set[str]:
    """Hashes of the cells whose rows say `ok`: the source of truth for what a rerun may skip."""
    return cell_statuses(store, table).get("ok", set())


def ok_rows(store: Store, table: str) -> list[dict]:
    """The rows of a table whose cell succeeded (tables without a status column: every row)."""
    return [r for r in read_table(store, table).to_pylist() if r.get("status", "ok") == "ok"]


def ok_cell(store: Store, table: str, cell_hash: str) -> dict | None:
    """The row of a one-row cell that succeeded, or None (not run, or failed)."""
    rows = [r for r in read_cell(store, table, cell_hash) if r["status"] == "ok"]
    return rows[0] if rows else None


def read_cell(store: Store, table: str, cell_hash: str) -> list[dict]:
    """The rows one cell wrote (empty if it has not run): a single file, no dataset scan."""
    payload = store.read_bytes(_cell_file(table, cell_hash))
    if payload is None:
        return []
    rows = _parse(store, table, _cell_file(table, cell_hash), payload)
    return [] if rows is None else rows.to_pylist()
