"""Loaders on files the tests write (official jsonl layout, `datasets` on local text/jsonl/parquet), and the
tensor helpers: packing, 80/10/10 masking, padding and batching."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysys import data, models
from raysys.config import CorpusConfig, TaskConfig, WorldConfig

WORLD = WorldConfig(general_sentences=200, domain_sentences=200)
ROWS = {
    "train": [{"text": f"train sentence {i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(9)],
    "dev": [{"text": f"dev sentence {i}", "label": ["pos", "neg"][i % 2]} for i in range(4)],
    "test": [{"text": f"test sentence {i}", "label": "mid"} for i in range(3)],
}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _official_layout(root, name="chemprot", rows=ROWS):
    for split, split_rows in rows.items():
        _write_jsonl(root / name / f"{split}.jsonl", split_rows)
    return TaskConfig(name=name, domain="bio", source="jsonl", path=str(root))


def test_jsonl_task_in_the_official_layout(tmp_path):
    task = data.load_task(_official_layout(tmp_path), WORLD)
    assert task.labels == ("mid", "neg", "pos")  # sorted training labels: a stable label -> id map
    assert {s: len(rows) for s, rows in task.splits.items()} == {"train": 9, "dev": 4, "test": 3}
    assert task.splits["train"][0] == ("train sentence 0", 1)
    assert task.splits["test"][2] == ("test sentence 2", 0)


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "chemprot" / "dev.jsonl").unlink(), r"missing task file .*dev\.jsonl"),
    (lambda root: (root / "chemprot" / "train.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n'),
     r"train\.jsonl:2: invalid JSON"),
    (lambda root: _write_jsonl(root / "chemprot" / "test.jsonl", [{"sentence": "a", "label": "mid"}]),
     r"test\.jsonl:1: missing field 'text'"),
    (lambda root: _write_jsonl(root / "chemprot" / "test.jsonl", [{"text": "a", "label": "unseen"}]),
     r"chemprot/test: labels \['unseen'\] not in training labels"),
    (lambda root: (root / "chemprot" / "dev.jsonl").write_text("\n"), r"dev\.jsonl: no examples"),
])
def test_bad_task_files_are_named(tmp_path, damage, message):
    spec = _official_layout(tmp_path)
    damage(tmp_path)
    with pytest.raises(data.DataError, match=message):
        data.load_task(spec, WORLD)


def test_task_through_datasets_from_a_local_folder(tmp_path):
    folder = tmp_path / "hub_like"
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        _write_jsonl(folder / f"{name}.jsonl", [{"sentence": r["text"], "y": r["label"]} for r in ROWS[split]])
    spec = TaskConfig(name="hub_like", domain="bio", source="hf", path=str(folder), text_field="sentence",
                      label_field="y", splits=("train", "validation", "test"))
    task = data.load_task(spec, WORLD)
    assert task.labels == ("mid", "neg", "pos")
    assert len(task.splits["dev"]) == 4 and task.splits["dev"][0] == ("dev sentence 0", 2)
    wrong = TaskConfig(name="hub_like", domain="bio", source="hf", path=str(folder), splits=spec.splits)
    with pytest.raises(data.DataError, match="missing field 'text'"):
        data.load_task(wrong, WORLD)


def test_corpora_from_text_jsonl_and_parquet_files(tmp_path):
    docs = [f"document number {i} about kinases" for i in range(7)]
    (tmp_path / "a.txt").write_text("\n".join(docs[:4]) + "\n\n")
    (tmp_path / "b.txt").write_text("\n".join(docs[4:]) + "\n")
    _write_jsonl(tmp_path / "shard.jsonl", [{"body": d} for d in docs])
    pq.write_table(pa.table({"body": docs}), tmp_path / "shard.parquet")
    text = data.load_corpus(CorpusConfig(name="bio", source="text", path=str(tmp_path / "*.txt")), WORLD)
    assert text == docs  # files in sorted order, empty lines dropped
    jsonl = data.load_corpus(CorpusConfig(name="bio", source="jsonl", path=str(tmp_path / "*.jsonl"),
                                          text_field="body", max_documents=5), WORLD)
    assert jsonl == docs[:5]
    parquet = data.load_corpus(CorpusConfig(name="bio", source="parquet", path=str(tmp_path / "*.parquet"),
                                            text_field="body"), WORLD)
    assert parquet == docs
    with pytest.raises(data.DataError, match="corpus bio: no files match"):
        data.load_corpus(CorpusConfig(name="bio", source="text", path=str(tmp_path / "*.none")), WORLD)
    with pytest.raises(data.DataError, match="field 'text' not in records"):
        data.load_corpus(CorpusConfig(name="bio", source="parquet", path=str(tmp_path / "*.parquet")), WORLD)


def test_builtin_data_is_deterministic():
    spec = TaskConfig(name="d1_rel", domain="d1")
    assert data.load_task(spec, WORLD) == data.load_task(spec, WORLD)
    corpus = CorpusConfig(name="d2")
    assert data.load_corpus(corpus, WORLD) == data.load_corpus(corpus, WORLD)
    other = data.load_corpus(corpus, WorldConfig(seed=1, general_sentences=200, domain_sentences=200))
    assert other != data.load_corpus(corpus, WORLD)


def test_packing_keeps_documents_whole():
    docs = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    packed = data.pack_sequences(docs, max_length=6, bos_id=0, eos_id=99)
    assert packed == [[0, 1, 2, 99], [0, 3, 4, 5, 99], [0, 6, 99], [0, 7, 8, 9, 10, 11], [0, 12, 13, 14, 15, 99]]
    assert all(len(s) <= 6 for s in packed)


def test_masking_is_robertas_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (400, 64), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[:50, 40:] = 1  # padding
    special = (ids == 0) | (ids == 1) | (ids == 2)
    corrupted, labels = data.mask_tokens(ids, special, mask_id=4, vocab_size=500, first_regular_id=5,
                                         mask_prob=0.15, generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    fraction = chosen.sum() / (~special).sum()
    assert abs(float(fraction) - 0.15) < 0.01
    n = int(chosen.sum())
    masked = int((corrupted[chosen] == 4).sum())
    kept = int((corrupted[chosen] == ids[chosen]).sum())
    assert abs(masked / n - 0.8) < 0.02
    assert abs(kept / n - 0.1) < 0.02  # includes the rare random draw of the same token
    assert (corrupted[chosen & (corrupted != 4)] >= 5).all()  # random replacements are regular tokens
    assert torch.equal(corrupted[~chosen], ids[~chosen])


def test_padding_and_batching():
    ids = [[5, 6, 7], [8], [9, 10]]
    batch, mask = data.pad_batch(ids, pad_id=1)
    assert batch.tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    labels = torch.arange(7)
    seqs = [[i] * (1 + i % 3) for i in range(7)]
    epoch = lambda seed: [y for _, _, ys in data.iterate_batches(seqs, labels, 3, 1, torch.Generator().manual_seed(seed))
                          for y in ys.tolist()]
    assert sorted(epoch(0)) == list(range(7)) and epoch(0) == epoch(0) and epoch(0) != epoch(1)
    ordered = [ys.tolist() for _, _, ys in data.iterate_batches(seqs, labels, 3, 1)]
    assert ordered == [[0, 1, 2], [3, 4, 5], [6]]


def test_encoding_truncates_to_max_length():
    texts = [f"word{i} " * (3 + i) for i in range(40)]
    tokenizer = models.train_tokenizer(texts, vocab_size=300)
    task = data.TaskData("t", ("a", "b"), {"train": [(texts[-1], 0), ("word1", 1)]})
    encoded = data.encode_task(task, tokenizer, max_length=8)
    ids, labels = encoded["train"]
    assert len(ids[0]) == 8 and ids[0][0] == tokenizer.bos_token_id and ids[0][-1] == tokenizer.eos_token_id
    assert len(ids[1]) < 8 and labels.tolist() == [0, 1]
