"""raysys/core/sources.py: globs over local paths and URIs, fingerprints (content, not path), streamed documents."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysys.config import CorpusConfig, TaskConfig
from raysys.core import sources
from raysys.core.sources import DataError, DigestCache


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _corpus(tmp_path, pattern="*.txt"):
    return CorpusConfig("wb", source="text", path=str(tmp_path / pattern))


def test_glob_matches_within_one_component_skips_hidden_files_and_sorts(tmp_path):
    for name in ("b.txt", "a.txt", ".hidden.txt", "sub/c.txt", "notes.md"):
        _write(tmp_path / name, "x\n")
    assert [f.name for f in sources.glob_files(str(tmp_path / "*.txt"), "c")] == ["a.txt", "b.txt"]
    assert [f.name for f in sources.glob_files(str(tmp_path / "*" / "*.txt"), "c")] == ["sub/c.txt"]
    with pytest.raises(DataError, match=r"corpus wb: no files match '.*\*\.json'"):
        sources.glob_files(str(tmp_path / "*.json"), "corpus wb")


def test_a_file_uri_reads_like_a_local_path(tmp_path):
    _write(tmp_path / "a.txt", "one\n\n  \ntwo\n")
    local = list(sources.documents(_corpus(tmp_path)))
    uri = list(sources.documents(CorpusConfig("wb", source="text", path=f"file://{tmp_path}/*.txt")))
    assert local == uri == ["one", "two"]


def test_fingerprint_follows_content_names_and_sizes_not_the_folder(tmp_path):
    cache = DigestCache(tmp_path / "digests.json")
    _write(tmp_path / "one" / "a.txt", "alpha\n")
    _write(tmp_path / "one" / "b.txt", "beta\n")
    first = sources.fingerprint(_corpus(tmp_path / "one"), cache)
    (tmp_path / "one").rename(tmp_path / "two")
    assert sources.fingerprint(_corpus(tmp_path / "two"), cache) == first
    _write(tmp_path / "two" / "b.txt", "betb\n")  # same size, other content
    edited = sources.fingerprint(_corpus(tmp_path / "two"), cache)
    assert edited != first
    (tmp_path / "two" / "b.txt").rename(tmp_path / "two" / "c.txt")
    assert sources.fingerprint(_corpus(tmp_path / "two"), cache) not in (first, edited)


def test_digests_are_cached_by_file_size_and_mtime(tmp_path):
    path = _write(tmp_path / "a.txt", "alpha\n")
    cache = DigestCache(tmp_path / "digests.json")
    digest = cache.digest(sources.glob_files(str(path), "c")[0])
    cache.save()
    assert json.loads((tmp_path / "digests.json").read_text()) == {f"{path}|6|{os.stat(path).st_mtime_ns}": digest}
    again = DigestCache(tmp_path / "digests.json")
    assert again.digest(sources.glob_files(str(path), "c")[0]) == digest and not again.changed


def test_large_files_are_hashed_by_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FULL_HASH_BYTES", 1000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 10)
    monkeypatch.setattr(sources, "SAMPLE_BLOCKS", 4)
    path = tmp_path / "big.txt"
    body = bytearray(b"a" * 5000)
    path.write_bytes(bytes(body))
    digest = lambda: sources._digest(sources.glob_files(str(path), "c")[0])
    sampled = digest()
    assert sampled.startswith("sampled-sha256:")
    body[2500] = ord("b")  # between the sampled blocks (0, 1663, 3326, 4990): unseen, as documented
    path.write_bytes(bytes(body))
    assert digest() == sampled
    body[4995] = ord("b")  # in the last block
    path.write_bytes(bytes(body))
    assert digest() != sampled


def test_documents_stream_jsonl_and_parquet_with_max_documents(tmp_path):
    _write(tmp_path / "c.jsonl", "".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(5)))
    spec = CorpusConfig("bio", source="jsonl", path=str(tmp_path / "c.jsonl"), text_field="body", max_documents=3)
    assert list(sources.documents(spec)) == ["doc 0", "doc 1", "doc 2"]
    pq.write_table(pa.table({"text": ["p", "", "q"]}), tmp_path / "c.parquet")
    assert list(sources.documents(CorpusConfig("rev", source="parquet", path=str(tmp_path / "c.parquet")))) == [
        "p", "q"]
    _write(tmp_path / "bad.jsonl", '{"body": "ok"}\n{oops\n')
    bad = CorpusConfig("bio", source="jsonl", path=str(tmp_path / "bad.jsonl"), text_field="body")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(sources.documents(bad))


def test_task_fingerprint_covers_its_three_files(tmp_path):
    for split in ("train", "dev", "test"):
        _write(tmp_path / "t" / f"{split}.jsonl", json.dumps({"text": split, "label": "a"}) + "\n")
    cache = DigestCache(tmp_path / "d.json")
    spec = TaskConfig("t", "d1", source="jsonl", path=str(tmp_path))
    before = sources.fingerprint(spec, cache)
    _write(tmp_path / "t" / "test.jsonl", json.dumps({"text": "tesT", "label": "a"}) + "\n")
    assert sources.fingerprint(spec, cache) != before
    with pytest.raises(DataError, match=r"missing task file .*nope/train\.jsonl"):
        sources.fingerprint(TaskConfig("nope", "d1", source="jsonl", path=str(tmp_path)), cache)


def test_a_hub_source_is_identified_by_name_configuration_revision_and_splits():
    base = CorpusConfig("c4", source="hf", path="allenai/c4", config_name="en", streaming=True)
    fp = lambda **kw: sources.fingerprint(CorpusConfig(**{**vars(base), **kw}), None)
    assert fp() == fp(streaming=False)  # how it is read is not what it holds
    assert len({fp(), fp(config_name="realnewslike"), fp(revision="abc"), fp(split="validation")}) == 4
