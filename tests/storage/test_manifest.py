"""Committed directories carry a manifest of sizes and checksums: a local store tells a whole directory from a
spoiled one, sets the spoiled one aside and lets it be made again."""

import hashlib
import json

import pytest

from raysys.storage import manifest
from raysys.storage.store import MANIFEST, CorruptArtifact, Store


def _commit(store: Store, key: str = "h", weights: bytes = b"weights") -> None:
    with store.writing_artifact("tuned", key) as tmp:
        (tmp / "model.safetensors").write_bytes(weights)
        (tmp / "raysys.json").write_text('{"seed": 1}')


def test_a_committed_directory_lists_every_file_with_its_size_and_checksum(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    listed = json.loads((tmp_path / "artifacts/tuned/h" / MANIFEST).read_text())
    assert listed == {"files": {"model.safetensors": 7, "raysys.json": 11},
                      "sha256": {"model.safetensors": hashlib.sha256(b"weights").hexdigest(),
                                 "raysys.json": hashlib.sha256(b'{"seed": 1}').hexdigest()}}
    assert store.has_artifact("tuned", "h") and store.artifact("tuned", "h") == tmp_path / "artifacts/tuned/h"


def test_a_truncated_or_deleted_file_makes_the_directory_missing_and_a_new_commit_replaces_it(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    (tmp_path / "artifacts/tuned/h/model.safetensors").write_bytes(b"wei")  # a full disk, a half copy
    assert not store.has_artifact("tuned", "h")
    _commit(store)  # the cell runs again
    assert store.has_artifact("tuned", "h")
    assert (store.artifact("tuned", "h") / "model.safetensors").read_bytes() == b"weights"
    assert store.quarantined() == 1
    (aside,) = [p for p in (tmp_path / "quarantine").iterdir() if p.is_dir()]
    assert (aside / "model.safetensors").read_bytes() == b"wei"  # kept, not deleted
    assert "model.safetensors has 3 bytes, its manifest says 7" in (tmp_path / "quarantine" /
                                                                   f"{aside.name}.reason.txt").read_text()

    (tmp_path / "artifacts/tuned/h/raysys.json").unlink()
    assert not store.has_artifact("tuned", "h")


def test_a_flipped_bit_is_caught_when_the_files_are_used_and_the_directory_is_set_aside(tmp_path, capsys):
    store = Store(tmp_path)
    _commit(store)
    (tmp_path / "artifacts/tuned/h/model.safetensors").write_bytes(b"weightz")  # same size: only the checksum sees it
    assert store.has_artifact("tuned", "h")  # sizes still agree
    with pytest.raises(CorruptArtifact, match="model.safetensors does not match its checksum"):
        store.artifact("tuned", "h")
    assert "set aside to" in capsys.readouterr().err
    assert not store.has_artifact("tuned", "h") and not (tmp_path / "artifacts/tuned/h").exists()
    assert store.quarantined() == 1
    assert isinstance(CorruptArtifact("x"), FileNotFoundError)  # for every reader it is now simply missing


def test_one_file_read_alone_is_checked_against_its_checksum(tmp_path):
    store = Store(tmp_path)
    _commit(store)
    assert store.artifact_file("tuned", "h", "raysys.json") == b'{"seed": 1}'
    (tmp_path / "artifacts/tuned/h/raysys.json").write_text('{"seed": 2}')
    with pytest.raises(CorruptArtifact, match="raysys.json does not match its checksum"):
        store.artifact_file("tuned", "h", "raysys.json")
    assert not store.has_artifact("tuned", "h")


def test_a_folder_is_hashed_once_per_process_while_its_files_keep_their_size_and_time(tmp_path, monkeypatch):
    store = Store(tmp_path)
    _commit(store)
    calls = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: calls.append(path.name) or real(path))
    for _ in range(3):
        store.artifact("tuned", "h")
    assert sorted(calls) == ["model.safetensors", "raysys.json"]
    _commit(store, "h2")
    calls.clear()
    store.artifact("tuned", "h2")
    assert len(calls) == 2


def test_a_directory_written_before_manifests_existed_is_trusted_as_whole(tmp_path):
    legacy = tmp_path / "artifacts/plm/old"
    legacy.mkdir(parents=True)
    (legacy / "model.safetensors").write_bytes(b"x")
    store = Store(tmp_path)
    assert store.has_artifact("plm", "old") and store.artifact("plm", "old") == legacy


def test_manifests_without_checksums_still_read_and_bad_checksums_are_refused():
    assert manifest.parse(b'{"files": {"a": 1}}', "m") == {"files": {"a": 1}, "sha256": {}}
    with pytest.raises(manifest.UnsafeManifest, match="not a SHA-256 of a listed file"):
        manifest.parse(json.dumps({"files": {"a": 1}, "sha256": {"b": "0" * 64}}).encode(), "m")
    with pytest.raises(manifest.UnsafeManifest, match="not a SHA-256"):
        manifest.parse(json.dumps({"files": {"a": 1}, "sha256": {"a": "xyz"}}).encode(), "m")
