"""Result tables and the artifact store: explicit schemas, atomic files, one file per cell, plain pyarrow reads."""

import pyarrow.dataset as ds
import pytest

from raysys.storage import results
from raysys.storage.store import Store


def _row(task="t1", acc=0.5, status="ok"):
    return {**results.provenance(results.now(), status), "task": task, "tuning_type": "finetune", "seed": 1,
            "source_plm_index": 0, "target_plm_index": 1, "test_accuracy": acc}


def test_rows_round_trip_with_the_declared_schema(tmp_path):
    store = Store(tmp_path)
    results.write_rows(store, "compatibility", "abc", [_row()])
    table = results.read_table(store, "compatibility")
    assert table.schema.equals(results.SCHEMAS["compatibility"], check_metadata=False)
    assert table.num_rows == 1 and table["test_accuracy"].to_pylist() == [0.5]
    assert table["cell_hash"].to_pylist() == ["abc"]
    assert table["schema_version"].to_pylist() == [results.SCHEMA_VERSION]
    # readable with plain pyarrow.dataset, no raysys needed
    plain = ds.dataset(tmp_path / "results" / "compatibility", format="parquet").to_table()
    assert plain.num_rows == 1 and plain["task"].to_pylist() == ["t1"]


def test_rewriting_a_cell_replaces_its_rows(tmp_path):
    store = Store(tmp_path)
    results.write_rows(store, "compatibility", "abc", [_row(status="failed")])
    assert results.finished_cells(store, "compatibility") == set()
    results.write_rows(store, "compatibility", "abc", [_row(acc=0.75)])
    results.write_rows(store, "compatibility", "def", [_row(task="t2")])
    table = results.read_table(store, "compatibility")
    assert table.num_rows == 2
    assert results.finished_cells(store, "compatibility") == {"abc", "def"}
    assert sorted(table["test_accuracy"].to_pylist()) == [0.5, 0.75]


def test_unknown_column_is_an_error_and_writes_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(KeyError, match="test_acuracy"):
        results.write_rows(store, "compatibility", "abc", [{"test_acuracy": 0.5}])
    assert results.read_table(store, "compatibility").num_rows == 0


def test_empty_table_has_its_schema(tmp_path):
    table = results.read_table(Store(tmp_path), "interpolation")
    assert table.num_rows == 0 and "alpha" in table.schema.names


def test_temporary_files_are_invisible_to_readers(tmp_path):
    store = Store(tmp_path)
    results.write_rows(store, "compatibility", "abc", [_row()])
    (tmp_path / "results" / "compatibility" / ".tmp-half-written.parquet").write_bytes(b"not parquet")
    assert results.read_table(store, "compatibility").num_rows == 1


def test_artifact_appears_only_when_complete(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.writing_artifact("plm", "h1") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert not store.has_artifact("plm", "h1")
    assert list((tmp_path / "artifacts" / "plm").iterdir()) == []  # no temporary left behind
    with store.writing_artifact("plm", "h1") as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert (store.artifact("plm", "h1") / "model.safetensors").read_bytes() == b"whole"


def test_concurrent_identical_artifact_keeps_the_first(tmp_path):
    store = Store(tmp_path)
    with store.writing_artifact("tuned", "h") as first:
        with store.writing_artifact("tuned", "h") as second:
            (second / "x").write_text("second")
        (first / "x").write_text("first")
    assert (store.artifact("tuned", "h") / "x").read_text() == "second"
    assert [p.name for p in (tmp_path / "artifacts" / "tuned").iterdir()] == ["h"]


def test_a_table_of_schema_4_files_reads_on_with_node_id_null(tmp_path, ray_cluster):
    import io

    import pyarrow.parquet as pq
    import ray

    store = Store(tmp_path)
    old_schema = results.SCHEMAS["compatibility"].remove(results.SCHEMAS["compatibility"].get_field_index("node_id"))
    old = {k: v for k, v in _row().items() if k != "node_id"}
    buffer = io.BytesIO()
    pq.write_table(results.pa.Table.from_pylist([{"cell_hash": "old", **old, "schema_version": 4}], schema=old_schema),
                   buffer)
    store.write_bytes("results/compatibility/old.parquet", buffer.getvalue())
    results.write_rows(store, "compatibility", "new", [_row()])  # written in a process attached to Ray
    rows = {r["cell_hash"]: r for r in results.read_table(store, "compatibility").to_pylist()}
    assert rows["old"]["node_id"] is None and rows["old"]["schema_version"] == 4
    assert rows["new"]["node_id"] == ray.get_runtime_context().get_node_id()
    assert rows["new"]["schema_version"] == results.SCHEMA_VERSION


def _failed(error: str) -> dict:
    return {**results.provenance(results.now(), "failed", f"{error}\nTraceback (most recent call last): ..."),
            "task": "t1"}


def test_rows_count_their_attempts_and_how_often_a_cell_failed_the_same_way(tmp_path):
    store = Store(tmp_path)
    seen = []
    for row in [_failed("OSError: disk full"), _failed("OSError: disk full"), _failed("ValueError: nan loss"),
                _failed("ValueError: nan loss"), _failed("ValueError: nan loss"), _row()]:
        results.write_rows(store, "compatibility", "abc", [row])
        (only,) = results.read_cell(store, "compatibility", "abc")
        seen.append((only["status"], only["attempts"], only["repeated_failures"]))
    assert seen == [("failed", 1, 1), ("failed", 2, 2), ("failed", 3, 1), ("failed", 4, 2), ("failed", 5, 3),
                    ("ok", 6, None)]
    assert results.given_up(store, "compatibility", 3) == set()  # it succeeded in the end
    results.write_rows(store, "compatibility", "xyz", [_failed("ValueError: nan loss")])
    for _ in range(2):
        results.write_rows(store, "compatibility", "xyz", [_failed("ValueError: nan loss")])
    assert results.given_up(store, "compatibility", 3) == {"xyz"} and results.given_up(store, "compatibility", 4) == set()
