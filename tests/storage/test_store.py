"""The store on a URI: a local S3 (moto's server) through pyarrow.fs — committed directories appear only whole,
results and checkpoints round-trip, the local cache is filled once, and bad roots fail before any work."""

import hashlib
import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import torch

from raysys import cli
from raysys.storage import checkpoint, results
from raysys.storage.lease import Lease
from raysys.storage.store import MANIFEST, CorruptArtifact, Store


def _row(acc):
    return {**results.provenance(results.now()), "task": "t", "tuning_type": "finetune", "seed": 1,
            "source_plm_index": 0, "target_plm_index": 1, "test_accuracy": acc}


def test_a_uri_pyarrow_cannot_open_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--storage 'nosuch://x/y'"):
        Store("nosuch://x/y")


def test_a_file_uri_is_a_local_store(tmp_path):
    store = Store(f"file://{tmp_path}")
    assert not store.remote and store.local == tmp_path and store.root == str(tmp_path)


def test_uris_put_paths_before_the_query(s3_uri):
    store = Store(s3_uri("named"))
    assert store.uri("results") == s3_uri("named/results")
    assert store.uri(suffix=".old-1") == s3_uri("named.old-1")


def test_on_s3_a_directory_is_visible_only_once_its_manifest_is_written(s3_uri, tmp_path, monkeypatch):
    store = Store(s3_uri("commit"))
    assert store.remote and not store.exists()
    store.ensure_writable()
    with pytest.raises(RuntimeError), store.writing_artifact("plm", "h") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert not store.has_artifact("plm", "h") and store.list_files("artifacts/plm/h") == []
    # An upload killed before its manifest: the files are there, the directory is not.
    store.write_bytes("artifacts/plm/h/model.safetensors", b"orphan")
    assert not store.has_artifact("plm", "h") and store.list_dirs("artifacts/plm") == []
    with pytest.raises(FileNotFoundError, match="artifacts/plm/h"):
        store.artifact("plm", "h")

    with store.writing_artifact("plm", "h") as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert store.has_artifact("plm", "h") and store.list_dirs("artifacts/plm") == ["h"]
    manifest = json.loads(store.read_bytes(f"artifacts/plm/h/{MANIFEST}"))
    assert manifest["files"] == {"model.safetensors": 5, "sub/config.json": 2}
    assert manifest["sha256"]["sub/config.json"] == hashlib.sha256(b"{}").hexdigest()
    assert store.artifact_file("plm", "h", "sub/config.json") == b"{}"

    store.write_bytes("artifacts/plm/h/stray.bin", b"from another writer")  # not in the manifest: never fetched
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "node2"))  # another machine, empty cache
    fetched = Store(s3_uri("commit")).artifact("plm", "h")
    assert str(fetched).startswith(str(tmp_path / "node2"))
    assert sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()) == [
        MANIFEST, "model.safetensors", "sub/config.json"]  # the manifest too: the node checks its copy by it
    assert (fetched / "model.safetensors").read_bytes() == b"whole"

    store.write_bytes("artifacts/plm/h/model.safetensors", b"truncated")  # not what the manifest says
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "node3"))
    with pytest.raises(OSError, match="manifest says 5"):
        Store(s3_uri("commit")).artifact("plm", "h")
    assert not any((tmp_path / "node3").rglob("model.safetensors"))  # no half-fetched folder left
    # set aside in the bucket: missing for every reader, kept for a person to look at
    assert not store.has_artifact("plm", "h") and store.quarantined() == 1
    assert store.list_dirs("quarantine")[0].startswith("artifacts__plm__h-")

    with store.writing_artifact("plm", "h") as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    store.write_bytes("artifacts/plm/h/model.safetensors", b"whale")  # same size, another content
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "node4"))
    with pytest.raises(CorruptArtifact, match="model.safetensors does not match its checksum"):
        Store(s3_uri("commit")).artifact("plm", "h")
    assert not store.has_artifact("plm", "h") and store.quarantined() == 2

    store.remove_dir("artifacts/plm/h")
    assert not store.has_artifact("plm", "h") and store.list_files("artifacts/plm/h") == []
    assert not (store.local / "artifacts" / "plm" / "h").exists()


def test_results_on_s3_are_one_parquet_file_per_cell_readable_with_plain_pyarrow(s3_uri):
    store = Store(s3_uri("results"))
    assert results.read_table(store, "compatibility").num_rows == 0
    results.write_rows(store, "compatibility", "c1", [_row(0.25)])
    results.write_rows(store, "compatibility", "c2", [_row(0.75)])
    results.write_rows(store, "compatibility", "c1", [_row(0.5)])  # a retry replaces its cell
    assert store.list_files("results/compatibility") == ["c1.parquet", "c2.parquet"]
    assert sorted(results.read_table(store, "compatibility")["test_accuracy"].to_pylist()) == [0.5, 0.75]
    assert results.read_cell(store, "compatibility", "c2")[0]["test_accuracy"] == 0.75
    assert results.read_cell(store, "compatibility", "c3") == []
    fs, path = pafs.FileSystem.from_uri(s3_uri("results/results/compatibility"))
    assert ds.dataset(path, filesystem=fs, format="parquet").to_table().num_rows == 2


def test_checkpoints_on_s3_keep_the_newest_and_go_when_the_cell_is_done(s3_uri, tmp_path, monkeypatch):
    store = Store(s3_uri("ckpt"))
    checkpoint.write(store, "cell", 4, {"cell_hash": "cell", "step": 4, "w": torch.zeros(3)})
    checkpoint.write(store, "cell", 8, {"cell_hash": "cell", "step": 8, "w": torch.ones(3)})
    assert store.list_dirs("checkpoints/cell") == ["step-000000008"]
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "other-node"))  # a retry on another machine
    state = checkpoint.Checkpointer(Store(s3_uri("ckpt")), 0, "cell").resume()
    assert state["step"] == 8 and torch.equal(state["w"], torch.ones(3))
    checkpoint.Checkpointer(store, 0, "cell").done()
    assert store.list_dirs("checkpoints") == [] and store.list_files("checkpoints/cell/step-000000008") == []


def test_a_missing_bucket_fails_before_any_work(s3_uri):
    uri = s3_uri("x").replace("s3://raysys-test/", "s3://no-such-bucket/")
    with pytest.raises(ValueError, match="--storage .*no-such-bucket.* is not writable"):
        Store(uri).ensure_writable()


def test_the_cli_on_an_empty_uri_says_there_is_no_storage(s3_uri, capsys):
    assert cli.main(["status", s3_uri("nothing-here")]) == 2
    assert "no such storage" in capsys.readouterr().err


def test_fresh_on_s3_moves_the_objects_aside_and_forgets_the_cache(s3_uri):
    from raysys.sweep import driver as sweep

    store = Store(s3_uri("fresh"))
    with store.writing_artifact("plm", "h") as tmp:
        (tmp / "w").write_bytes(b"kept")
    store.write_bytes("study.json", b"{}")
    lease = Lease(store).acquire()
    aside = sweep.fresh_start(store, lease)
    assert aside.startswith(s3_uri("fresh.old-").split("?")[0]) and aside.endswith(s3_uri("").split("?", 1)[1])
    assert not store.exists() and not store.local.exists()
    assert Store(aside).artifact_file("plm", "h", "w") == b"kept" and Store(aside).has_artifact("plm", "h")
    assert Store(aside).read_bytes(".raysys-lease") is None  # the lease stays with the storage's name
    assert sweep.fresh_start(store, lease) is None


def test_on_s3_a_concurrent_writer_on_another_node_keeps_the_committed_copy(s3_uri, tmp_path, monkeypatch):
    first = Store(s3_uri("race"))
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "node2"))
    second = Store(s3_uri("race"))  # same storage, its own cache
    with second.writing_artifact("tuned", "h") as late:
        (late / "w").write_bytes(b"second")
        with first.writing_artifact("tuned", "h") as early:
            (early / "w").write_bytes(b"first")
    assert (second.artifact("tuned", "h") / "w").read_bytes() == b"first"  # the bucket's copy, not its own
    assert (first.artifact("tuned", "h") / "w").read_bytes() == b"first"
    assert json.loads(first.read_bytes(f"artifacts/tuned/h/{MANIFEST}"))["files"] == {"w": 5}


@pytest.mark.parametrize("name", ["../../evil.pth", "/tmp/evil.pth", "sub/../../evil.pth", "./evil.pth",
                                  "sub//evil.pth", "C:evil.pth", "sub\\..\\..\\evil.pth", "", "evil\0.pth"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused_and_nothing_is_written(name):
    from raysys.storage.store import UnsafeManifest, manifest_files

    with pytest.raises(UnsafeManifest, match="not a plain relative path inside its folder"):
        manifest_files(json.dumps({"files": {"model.safetensors": 5, name: 3}}).encode(), "s3://b/x/.raysys-complete")


def test_a_manifest_lists_sizes_that_are_byte_counts():
    from raysys.storage.store import UnsafeManifest, manifest_files

    assert manifest_files(b'{"files": {"a/b.json": 2, "c": 0}}', "m") == {"a/b.json": 2, "c": 0}
    for bad in (b'{"files": {"a": -1}}', b'{"files": {"a": "5"}}', b'{"files": {"a": true}}', b"[]", b"{"):
        with pytest.raises(UnsafeManifest, match="^m: "):
            manifest_files(bad, "m")


def test_on_s3_a_bucket_manifest_cannot_make_a_node_write_outside_the_directory(s3_uri, tmp_path, monkeypatch):
    """Whoever can write to the bucket writes a manifest naming `../../../evil.pth`: a node fetching the directory
    refuses it and writes nothing, inside its cache or beside it."""
    from raysys.storage.store import UnsafeManifest

    store = Store(s3_uri("traversal"))
    store.write_bytes("artifacts/plm/h/model.safetensors", b"whole")
    store.write_bytes("evil.pth", b"import os")
    store.write_bytes(f"artifacts/plm/h/{MANIFEST}",
                      json.dumps({"files": {"model.safetensors": 5, "../../../evil.pth": 9}}).encode())
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "node"))
    with pytest.raises(UnsafeManifest, match=r"'\.\./\.\./\.\./evil\.pth' is not a plain relative path"):
        Store(s3_uri("traversal")).artifact("plm", "h")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # not even model.safetensors


def test_credentials_in_a_uri_are_redacted_wherever_it_is_shown():
    from raysys.storage.store import redact

    assert redact("s3://AKIAEXAMPLE:wJalrXUt@bucket/run?region=eu-west-1") == "s3://***@bucket/run?region=eu-west-1"
    assert redact("s3://b/run?access_key=AKIA1&secret_key=s3cr3t&session_token=tok&endpoint_override=minio:9000") == \
        "s3://b/run?access_key=***&secret_key=***&session_token=***&endpoint_override=minio:9000"
    assert redact("abfs://c@acct.dfs.core.windows.net/run?account_key=K&sas_token=T") == \
        "abfs://***@acct.dfs.core.windows.net/run?account_key=***&sas_token=***"
    assert redact("/data/run1") == "/data/run1" and redact("gs://bucket/run") == "gs://bucket/run"


def test_a_store_opened_with_credentials_never_shows_them(s3_uri, capsys):
    uri = s3_uri("secret").replace("s3://", "s3://raysys-test:SUPERSECRET@")  # pyarrow's form: key:secret@bucket
    store = Store(uri)
    assert store.root == uri  # what workers are handed: it must still open the bucket
    store.ensure_writable()
    for shown in (store.shown, store.uri("results"), store.uri(suffix=".old-1"), repr(store), str(store.local),
                  store.artifact_uri("plm", "h")):
        assert "SUPERSECRET" not in shown and "raysys-test:" not in shown, shown
    assert store.shown.startswith("s3://***@raysys-test/secret?")
    assert cli.main(["status", uri]) == 2  # no study there yet: the message names the storage, redacted
    err = capsys.readouterr().err
    assert "s3://***@raysys-test/secret" in err and "SUPERSECRET" not in err


def test_a_file_and_a_committed_folder_reach_the_disk_before_their_names_do(tmp_path, monkeypatch):
    """A power loss must not leave a committed name on bytes still in the page cache (a zero-length Parquet file
    made its whole table unreadable): every file is fsynced before the rename, and the folder after it."""
    import os

    from raysys.storage import store as store_module

    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    monkeypatch.setattr(Path, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    store = Store(tmp_path / "s")
    store.write_bytes("results/t/cell.parquet", b"rows")
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert ".tmp-cell.parquet-" in events[0][1] and events[2][1] == str(tmp_path / "s" / "results" / "t")
    events.clear()
    with store.writing_artifact("plm", "h") as temp:
        (temp / "model.safetensors").write_bytes(b"weights")
        (temp / "sub").mkdir()
        (temp / "sub" / "config.json").write_text("{}")
    renamed = events.index(("rename", str(tmp_path / "s" / "artifacts" / "plm" / "h")))
    synced = {path.split("/.tmp-h-", 1)[1].partition("/")[2] for kind, path in events[:renamed] if kind == "fsync"}
    assert synced == {"model.safetensors", "sub/config.json", "sub", MANIFEST, ""}  # "": the folder itself
    assert events[renamed + 1] == ("fsync", str(tmp_path / "s" / "artifacts" / "plm"))


def test_on_s3_a_writer_that_lost_the_race_to_commit_keeps_no_copy_of_its_own_bytes(s3_uri, tmp_path, monkeypatch):
    """Two nodes upload the same directory at once; the other's manifest lands just after ours. Our node must not
    keep its own bytes in its cache as if they were the store's: it drops them and fetches what the store holds."""
    monkeypatch.setenv("RAYSYS_CACHE", str(tmp_path / "ours"))
    store = Store(s3_uri("lost-race"))
    theirs = {"files": {"w": 6}, "sha256": {"w": hashlib.sha256(b"theirs").hexdigest()}}
    real_write = store.write_bytes

    def write_then_lose(rel, payload):
        real_write(rel, payload)
        if rel.endswith(MANIFEST):  # the other writer: its file and then its manifest, after ours
            real_write(rel.replace(MANIFEST, "w"), b"theirs")
            real_write(rel, json.dumps(theirs).encode())

    monkeypatch.setattr(store, "write_bytes", write_then_lose)
    with store.writing_artifact("tuned", "h") as tmp:
        (tmp / "w").write_bytes(b"ours!!")
    assert not (store.local / "artifacts/tuned/h").exists()  # no copy of ours taken for the store's
    assert (store.artifact("tuned", "h") / "w").read_bytes() == b"theirs"
