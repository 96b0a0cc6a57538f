"""A result file that does not parse (cut short by a full disk, a copy interrupted) is moved to
<storage>/quarantine/results/<table>/, its bytes as they were, with a warning naming it; its cell counts as not
run, and every other row reads on. A readable file of another schema is not damage and stays where it is."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.storage import results
from raysys.storage.store import Store


def _row(task="t1"):
    return {**results.provenance(results.now()), "task": task, "tuning_type": "finetune", "seed": 1,
            "source_plm_index": 0, "target_plm_index": 1, "test_accuracy": 0.5}


def _damage(store: Store, table: str, key: str) -> bytes:
    """Write cell `key`, then cut its file in half; returns the bytes left."""
    results.write_rows(store, table, key, [_row(task=key)])
    rel = f"results/{table}/{key}.parquet"
    cut = store.read_bytes(rel)[:300]
    store.write_bytes(rel, cut)
    return cut


def test_a_truncated_file_is_quarantined_and_the_table_reads_on(tmp_path, capsys):
    store = Store(tmp_path)
    results.write_rows(store, "compatibility", "good", [_row("good")])
    cut = _damage(store, "compatibility", "bad")
    table = results.read_table(store, "compatibility")
    assert table["cell_hash"].to_pylist() == ["good"]
    moved = tmp_path / "quarantine" / "results" / "compatibility" / "bad.parquet"
    assert moved.read_bytes() == cut and not (tmp_path / "results" / "compatibility" / "bad.parquet").exists()
    err = capsys.readouterr().err
    assert f"warning: {tmp_path}/results/compatibility/bad.parquet does not parse" in err
    assert f"moved to {moved}: its cell counts as not run and runs again" in err
    assert results.cell_statuses(store, "compatibility") == {"ok": {"good"}}  # a second read: clean, silent
    assert capsys.readouterr().err == ""


def test_reading_one_damaged_cell_quarantines_it_beside_an_earlier_copy(tmp_path, capsys):
    store = Store(tmp_path)
    first = _damage(store, "compatibility", "bad")
    assert results.read_cell(store, "compatibility", "bad") == []
    second = _damage(store, "compatibility", "bad")
    store.write_bytes("results/compatibility/bad.parquet", second + b"more")
    assert results.ok_cell(store, "compatibility", "bad") is None
    folder = tmp_path / "quarantine" / "results" / "compatibility"
    assert (folder / "bad.parquet").read_bytes() == first
    assert (folder / "bad.parquet.1").read_bytes() == second + b"more"
    assert capsys.readouterr().err.count("does not parse") == 2
    assert results.read_cell(store, "compatibility", "bad") == []  # gone: not run, so it runs again


def test_a_readable_file_of_another_schema_is_not_moved(tmp_path):
    store = Store(tmp_path)
    (tmp_path / "results" / "compatibility").mkdir(parents=True)
    path = tmp_path / "results" / "compatibility" / "other.parquet"
    pq.write_table(pa.table({"cell_hash": ["other"], "seed": [[1, 2]]}), path)
    for read in (lambda: results.read_table(store, "compatibility"),
                 lambda: results.read_cell(store, "compatibility", "other")):
        with pytest.raises(results.ResultFileError, match=rf"^{path}: not of the compatibility schema this code "
                                                          r"reads \(Unsupported cast from list"):
            read()
    assert path.is_file() and not (tmp_path / "quarantine").exists()


def test_a_damaged_file_in_a_bucket_is_quarantined_in_the_bucket(s3_uri, capsys):
    store = Store(s3_uri("quarantine"))
    results.write_rows(store, "compatibility", "good", [_row("good")])
    cut = _damage(store, "compatibility", "bad")
    assert results.finished_cells(store, "compatibility") == {"good"}
    assert store.read_bytes("quarantine/results/compatibility/bad.parquet") == cut
    assert store.read_bytes("results/compatibility/bad.parquet") is None
    assert "quarantine/results/compatibility/bad.parquet" in capsys.readouterr().err
