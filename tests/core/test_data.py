"""raysys/core/data.py: corpora and tasks from the built-in world, local files (jsonl/text/parquet) and `datasets`;
packing, padding, batching, MLM masking and task encoding. Every file is real and written under tmp_path."""

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysys.config import CorpusConfig, TaskConfig, WorldConfig
from raysys.core import data, models, world

SMALL_WORLD = WorldConfig(general_sentences=300, domain_sentences=300, task_train=24, task_dev=12, task_test=20)


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def write_task(root: Path, name: str, splits: dict, ext: str = "jsonl") -> Path:
    for split, rows in splits.items():
        write_jsonl(root / name / f"{split}.{ext}", rows)
    return root


TASK_ROWS = {
    "train": [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
              {"text": "a dull plot", "label": "neg"}, {"text": "fine acting", "label": "pos"},
              {"text": "so so", "label": "mixed"}],
    "dev": [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}],
    "test": [{"text": "meh", "label": "mixed"}, {"text": "superb", "label": "pos"}, {"text": "boring", "label": "neg"}],
}


@pytest.fixture(scope="module")
def tokenizer():
    w = world.build_world(SMALL_WORLD)
    return models.train_tokenizer(world.domain_corpus(w, "d0") + world.domain_corpus(w, "d1"), vocab_size=300)


# ------------------------------------------------------------------------------------------------ jsonl tasks


def test_jsonl_task_in_the_official_layout(tmp_path):
    rows = {s: list(r) for s, r in TASK_ROWS.items()}
    rows["dev"].insert(1, "   ")  # blank lines are skipped
    write_task(tmp_path, "sent", rows)
    task = data.load_task(TaskConfig("sent", "d1", source="jsonl", path=str(tmp_path)), WorldConfig())
    assert task.name == "sent"
    assert task.labels == ("mixed", "neg", "pos")  # sorted label set of the training split
    assert set(task.splits) == {"train", "dev", "test"}
    assert {s: len(r) for s, r in task.splits.items()} == {"train": 5, "dev": 2, "test": 3}
    assert task.splits["train"] == [("good film", 2), ("bad film", 1), ("a dull plot", 1), ("fine acting", 2),
                                    ("so so", 0)]
    assert task.splits["dev"] == [("great", 2), ("awful", 1)]
    assert task.splits["test"] == [("meh", 0), ("superb", 2), ("boring", 1)]


def test_parquet_task_in_the_official_layout_matches_the_jsonl_one(tmp_path):
    write_task(tmp_path / "j", "sent", TASK_ROWS)
    for split, rows in TASK_ROWS.items():
        (tmp_path / "p" / "sent").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p" / "sent" / f"{split}.parquet")
    from_jsonl = data.load_task(TaskConfig("sent", "d1", source="jsonl", path=str(tmp_path / "j")), WorldConfig())
    from_parquet = data.load_task(TaskConfig("sent", "d1", source="parquet", path=str(tmp_path / "p")), WorldConfig())
    assert from_parquet == from_jsonl and from_parquet.labels == ("mixed", "neg", "pos")


def test_parquet_task_errors_name_the_file_and_column(tmp_path):
    spec = TaskConfig("t", "d1", source="parquet", path=str(tmp_path))
    with pytest.raises(data.DataError, match=r"missing task file .*t.train\.parquet"):
        data.load_task(spec, WorldConfig())
    (tmp_path / "t").mkdir()
    for split in ("train", "dev", "test"):
        pq.write_table(pa.table({"sentence": ["x"], "label": ["a"]}), tmp_path / "t" / f"{split}.parquet")
    with pytest.raises(data.DataError, match=r"train\.parquet: missing column 'text' \(have \['sentence', 'label'\]"):
        data.load_task(spec, WorldConfig())
    (tmp_path / "t" / "train.parquet").write_bytes(b"not parquet")
    with pytest.raises(data.DataError, match=r"train\.parquet: not a readable Parquet file"):
        data.load_task(spec, WorldConfig())


def test_jsonl_task_label_order_does_not_depend_on_row_order(tmp_path):
    write_task(tmp_path / "a", "t", TASK_ROWS)
    shuffled = {s: list(reversed(r)) for s, r in TASK_ROWS.items()}
    write_task(tmp_path / "b", "t", shuffled)
    a = data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path / "a")), WorldConfig())
    b = data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path / "b")), WorldConfig())
    assert a.labels == b.labels
    assert sorted(a.splits["train"]) == sorted(b.splits["train"])


def test_jsonl_task_integer_labels_and_custom_fields_and_split_names(tmp_path):
    records = {
        "tr": [{"sentence": f"s{i}", "y": i % 3} for i in range(9)],
        "va": [{"sentence": "v", "y": 2}],
        "te": [{"sentence": "t0", "y": 0}, {"sentence": "t1", "y": 1}],
    }
    write_task(tmp_path, "num", records)
    spec = TaskConfig("num", "d1", source="jsonl", path=str(tmp_path), text_field="sentence", label_field="y",
                      splits=("tr", "va", "te"))
    task = data.load_task(spec, WorldConfig())
    assert task.labels == ("0", "1", "2")
    assert [y for _, y in task.splits["train"]] == [0, 1, 2] * 3
    assert task.splits["dev"] == [("v", 2)]
    assert task.splits["test"] == [("t0", 0), ("t1", 1)]


def test_jsonl_task_missing_split_file_names_the_file(tmp_path):
    write_task(tmp_path, "t", {"train": TASK_ROWS["train"], "test": TASK_ROWS["test"]})
    spec = TaskConfig("t", "d1", source="jsonl", path=str(tmp_path))
    with pytest.raises(data.DataError, match=r"missing task file .*dev\.jsonl"):
        data.load_task(spec, WorldConfig())


def test_jsonl_task_missing_directory_names_the_file(tmp_path):
    spec = TaskConfig("nope", "d1", source="jsonl", path=str(tmp_path))
    with pytest.raises(data.DataError, match=r"missing task file .*nope.train\.jsonl"):
        data.load_task(spec, WorldConfig())


def test_jsonl_task_malformed_line_names_file_and_line(tmp_path):
    bad = [json.dumps(TASK_ROWS["dev"][0]), '{"text": "oops", "label": ', json.dumps(TASK_ROWS["dev"][1])]
    write_task(tmp_path, "t", {"train": TASK_ROWS["train"], "dev": bad, "test": TASK_ROWS["test"]})
    with pytest.raises(data.DataError, match=r"dev\.jsonl:2: invalid JSON") as err:
        data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path)), WorldConfig())
    assert str(tmp_path / "t" / "dev.jsonl") in str(err.value)


@pytest.mark.parametrize("field,record", [("text", {"label": "pos"}), ("label", {"text": "no label here"})])
def test_jsonl_task_line_without_field_names_field_file_and_line(tmp_path, field, record):
    rows = TASK_ROWS["test"][:2] + [record]
    write_task(tmp_path, "t", {"train": TASK_ROWS["train"], "dev": TASK_ROWS["dev"], "test": rows})
    with pytest.raises(data.DataError, match=rf"test\.jsonl:3: missing field '{field}'"):
        data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path)), WorldConfig())


def test_jsonl_task_custom_field_missing_is_named(tmp_path):
    write_task(tmp_path, "t", TASK_ROWS)
    spec = TaskConfig("t", "d1", source="jsonl", path=str(tmp_path), label_field="gold")
    with pytest.raises(data.DataError, match=r"train\.jsonl:1: missing field 'gold'"):
        data.load_task(spec, WorldConfig())


def test_jsonl_task_empty_split_is_an_error(tmp_path):
    write_task(tmp_path, "t", {"train": TASK_ROWS["train"], "dev": ["", "  "], "test": TASK_ROWS["test"]})
    with pytest.raises(data.DataError, match=r"dev\.jsonl: no examples"):
        data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path)), WorldConfig())


def test_jsonl_task_label_unseen_in_training_is_an_error(tmp_path):
    test_rows = TASK_ROWS["test"] + [{"text": "??", "label": "sarcastic"}]
    write_task(tmp_path, "t", {"train": TASK_ROWS["train"], "dev": TASK_ROWS["dev"], "test": test_rows})
    with pytest.raises(data.DataError, match=r"task t/test: labels \['sarcastic'\] not in training labels"):
        data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path)), WorldConfig())


@pytest.mark.parametrize("line", ["5", '"some text and a label"', "null"])
def test_jsonl_task_non_object_line_is_a_data_error(tmp_path, line):
    write_task(tmp_path, "t", {"train": TASK_ROWS["train"][:1] + [line], "dev": TASK_ROWS["dev"],
                               "test": TASK_ROWS["test"]})
    with pytest.raises(data.DataError, match=r"train\.jsonl:2"):
        data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(tmp_path)), WorldConfig())


# --------------------------------------------------------------------------------------- tasks via `datasets`


def test_hf_task_from_a_local_dataset_directory(tmp_path):
    # `datasets` infers splits from file names: train / validation (dev.* would also map to "validation") / test
    write_task(tmp_path, "hfsent", {"train": TASK_ROWS["train"], "validation": TASK_ROWS["dev"],
                                    "test": TASK_ROWS["test"]})
    spec = TaskConfig("hfsent", "d1", source="hf", path=str(tmp_path / "hfsent"), splits=("train", "validation", "test"))
    task = data.load_task(spec, WorldConfig())
    assert task.labels == ("mixed", "neg", "pos")
    assert {s: len(r) for s, r in task.splits.items()} == {"train": 5, "dev": 2, "test": 3}
    assert task.splits["dev"] == [("great", 2), ("awful", 1)]
    assert task.splits["test"] == [("meh", 0), ("superb", 2), ("boring", 1)]
    # same content via the jsonl loader maps identically
    jsonl = data.load_task(TaskConfig("t", "d1", source="jsonl", path=str(write_task(
        tmp_path / "j", "t", TASK_ROWS))), WorldConfig())
    assert jsonl.labels == task.labels and jsonl.splits == task.splits


def test_hf_task_missing_field_names_task_split_and_field(tmp_path):
    write_task(tmp_path, "x", {"train": TASK_ROWS["train"], "validation": TASK_ROWS["dev"],
                               "test": TASK_ROWS["test"]})
    spec = TaskConfig("x", "d1", source="hf", path=str(tmp_path / "x"), label_field="gold",
                      splits=("train", "validation", "test"))
    with pytest.raises(data.DataError, match=r"task x \(.*x:train\): missing field 'gold'"):
        data.load_task(spec, WorldConfig())


# ----------------------------------------------------------------------------------------------------- corpora


def test_text_corpus_from_glob_skips_blank_lines_in_file_order(tmp_path):
    (tmp_path / "b.txt").write_text("third doc\nfourth doc\n")
    (tmp_path / "a.txt").write_text("first doc\n\n   \nsecond doc\n")
    (tmp_path / "ignored.md").write_text("not matched\n")
    spec = CorpusConfig("wb", source="text", path=str(tmp_path / "*.txt"))
    assert data.load_corpus(spec, WorldConfig()) == ["first doc", "second doc", "third doc", "fourth doc"]
    limited = CorpusConfig("wb", source="text", path=str(tmp_path / "*.txt"), max_documents=3)
    assert data.load_corpus(limited, WorldConfig()) == ["first doc", "second doc", "third doc"]


def test_jsonl_corpus_with_text_field_and_max_documents(tmp_path):
    records = [{"body": f"document {i}", "id": i} for i in range(10)]
    records[3]["body"] = "  "  # whitespace-only documents are dropped
    write_jsonl(tmp_path / "part-0.jsonl", records[:6])
    write_jsonl(tmp_path / "part-1.jsonl", records[6:])
    spec = CorpusConfig("bio", source="jsonl", path=str(tmp_path / "part-*.jsonl"), text_field="body")
    assert data.load_corpus(spec, WorldConfig()) == [f"document {i}" for i in range(10) if i != 3]
    spec = CorpusConfig("bio", source="jsonl", path=str(tmp_path / "part-*.jsonl"), text_field="body",
                        max_documents=4)
    assert data.load_corpus(spec, WorldConfig()) == ["document 0", "document 1", "document 2", "document 4"]


def test_jsonl_corpus_missing_text_field_names_it(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"body": "x"}])
    spec = CorpusConfig("bio", source="jsonl", path=str(tmp_path / "c.jsonl"))
    with pytest.raises(data.DataError, match=r"c\.jsonl:1: field 'text' not in the record \(have \['body'\]\)"):
        data.load_corpus(spec, WorldConfig())


def test_parquet_corpus_with_text_field_and_max_documents(tmp_path):
    for part in range(2):
        table = pa.table({"content": [f"p{part} doc {i}" for i in range(5)], "n": list(range(5))})
        pq.write_table(table, tmp_path / f"shard-{part}.parquet")
    spec = CorpusConfig("rev", source="parquet", path=str(tmp_path / "*.parquet"), text_field="content")
    texts = data.load_corpus(spec, WorldConfig())
    assert texts == [f"p{p} doc {i}" for p in range(2) for i in range(5)]
    spec = CorpusConfig("rev", source="parquet", path=str(tmp_path / "*.parquet"), text_field="content",
                        max_documents=7)
    assert data.load_corpus(spec, WorldConfig()) == texts[:7]
    wrong = CorpusConfig("rev", source="parquet", path=str(tmp_path / "*.parquet"))
    with pytest.raises(data.DataError, match=r"shard-0\.parquet: no column 'text' \(have \['content', 'n'\]\)"):
        data.load_corpus(wrong, WorldConfig())


def test_hf_corpus_from_a_local_dataset_directory(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"doc": f"train {i}"} for i in range(4)])
    write_jsonl(tmp_path / "ds" / "test.jsonl", [{"doc": "held out"}])
    spec = CorpusConfig("c", source="hf", path=str(tmp_path / "ds"), text_field="doc")
    assert data.load_corpus(spec, WorldConfig()) == [f"train {i}" for i in range(4)]
    spec = CorpusConfig("c", source="hf", path=str(tmp_path / "ds"), text_field="doc", split="test")
    assert data.load_corpus(spec, WorldConfig()) == ["held out"]


def test_corpus_without_matching_files_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "missing" / "*.txt")
    with pytest.raises(data.DataError, match=r"corpus wb: no files match '.*missing/\*\.txt'"):
        data.load_corpus(CorpusConfig("wb", source="text", path=pattern), WorldConfig())


def test_corpus_of_only_blank_lines_has_no_documents(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(data.DataError, match=r"corpus wb: no documents"):
        data.load_corpus(CorpusConfig("wb", source="text", path=str(tmp_path / "empty.txt")), WorldConfig())


# ----------------------------------------------------------------------------------------------------- builtin


def test_builtin_corpus_and_task_are_deterministic_in_the_seed():
    a = data.load_corpus(CorpusConfig("d1"), SMALL_WORLD)
    assert a == data.load_corpus(CorpusConfig("d1"), dataclasses.replace(SMALL_WORLD))
    assert len(a) == SMALL_WORLD.domain_sentences
    assert len(data.load_corpus(CorpusConfig("d0"), SMALL_WORLD)) == SMALL_WORLD.general_sentences
    assert data.load_corpus(CorpusConfig("d1", max_documents=10), SMALL_WORLD) == a[:10]
    other_seed = dataclasses.replace(SMALL_WORLD, seed=1)
    assert data.load_corpus(CorpusConfig("d1"), other_seed) != a

    task = data.load_task(TaskConfig("d2_rel", "d2"), SMALL_WORLD)
    again = data.load_task(TaskConfig("d2_rel", "d2"), dataclasses.replace(SMALL_WORLD))
    assert task == again
    assert task.labels == ("rel0", "rel1", "rel2", "rel3")
    assert {s: len(r) for s, r in task.splits.items()} == {"train": 24, "dev": 12, "test": 20}
    assert all(0 <= y < 4 for rows in task.splits.values() for _, y in rows)
    assert data.load_task(TaskConfig("d2_rel", "d2"), other_seed).splits != task.splits
    # the ids follow the world's label names, not the training split's
    raw = world.task_splits(world.build_world(SMALL_WORLD), "d2")
    assert task.splits["test"] == [(r["text"], int(r["label"][3:])) for r in raw["test"]]


# ------------------------------------------------------------------------------------------------------ packing

BOS, EOS = 0, 2


def test_pack_sequences_fills_windows_with_whole_documents():
    docs = [[10, 11], [12, 13, 14], [15], [16, 17, 18, 19]]
    assert data.pack_sequences(docs, 8, BOS, EOS) == [
        [0, 10, 11, 2, 12, 13, 14, 2],  # exactly full
        [0, 15, 2, 16, 17, 18, 19, 2],  # 15 and the next document both fit
    ]
    # one token less room: the 3-token document no longer fits after the first, so it starts a new window
    assert data.pack_sequences(docs, 7, BOS, EOS) == [[0, 10, 11, 2], [0, 12, 13, 14, 2, 15, 2], [0, 16, 17, 18, 19, 2]]


def test_pack_sequences_cuts_only_documents_longer_than_the_window():
    long_doc = list(range(100, 111))  # 11 tokens + </s> = 12 > window of 8
    packed = data.pack_sequences([[5, 6], long_doc, [30]], 8, BOS, EOS)
    assert packed == [
        [0, 5, 6, 2],  # closed early rather than starting the long document mid-window
        [0, 100, 101, 102, 103, 104, 105, 106],
        [0, 107, 108, 109, 110, 2, 30, 2],
    ]


def test_pack_sequences_invariants_on_random_documents():
    rng = random.Random(7)
    docs = [[rng.randrange(5, 300) for _ in range(rng.randint(1, 40))] for i in range(300)]
    max_length = 24
    packed = data.pack_sequences(docs, max_length, BOS, EOS)
    assert all(seq[0] == BOS and 2 <= len(seq) <= max_length for seq in packed)
    assert all(BOS not in seq[1:] for seq in packed)
    # nothing lost, reordered or duplicated
    flat = [t for seq in packed for t in seq[1:]]
    assert flat == [t for d in docs for t in d + [EOS]]
    # the document at each position: a document that fits in a window lies in exactly one window
    owner = [i for i, d in enumerate(docs) for _ in d + [EOS]]
    windows, pos = [], 0
    for seq in packed:
        windows.append(set(owner[pos : pos + len(seq) - 1]))
        pos += len(seq) - 1
    for i, d in enumerate(docs):
        spans = sum(i in w for w in windows)
        if len(d) + 2 <= max_length:
            assert spans == 1, f"document {i} of {len(d)} tokens was split"
        else:
            assert spans == -(-(len(d) + 1) // (max_length - 1))
    # greedy: a window is closed early only when the next document would not fit
    for seq, nxt in itertools.pairwise(packed):
        if len(seq) < max_length:
            assert seq[-1] == EOS
            next_doc_len = nxt.index(EOS) if EOS in nxt else len(nxt) - 1  # tokens of nxt's first doc (+ eos below)
            assert len(seq) + next_doc_len + 1 > max_length


# ------------------------------------------------------------------------------------------ padding and batches


def test_pad_batch_pads_to_the_longest_with_attention_mask():
    ids, mask = data.pad_batch([[0, 7, 8, 2], [0, 9, 2], [0, 2]], pad_id=1)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[0, 7, 8, 2], [0, 9, 2, 1], [0, 2, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]


def test_iterate_batches_in_order_without_generator():
    ids = [[0] + [i + 10] * (i % 4 + 1) + [2] for i in range(10)]
    labels = torch.arange(10) % 3
    batches = list(data.iterate_batches(ids, labels, 4, pad_id=1))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    first_ids, first_mask, first_labels = batches[0]
    assert first_ids.shape == (4, 6) and first_mask.shape == (4, 6)
    assert first_ids[0].tolist() == [0, 10, 2, 1, 1, 1]
    assert first_mask.sum(1).tolist() == [3, 4, 5, 6]
    assert first_labels.tolist() == [0, 1, 2, 0]
    assert torch.cat([b[2] for b in batches]).tolist() == labels.tolist()
    # each batch is padded to its own longest sequence only
    assert batches[2][0].shape == (2, 4)


def test_iterate_batches_by_length_pads_less_and_keeps_labels_aligned():
    ids = [[0] + [i + 10] * (i % 4 + 1) + [2] for i in range(10)]
    labels = torch.arange(10)
    batches = list(data.iterate_batches(ids, labels, 4, pad_id=1, by_length=True))
    assert [b[0].shape for b in batches] == [(4, 4), (4, 5), (2, 6)]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(10))
    for input_ids, mask, y in batches:
        for row, m, label in zip(input_ids.tolist(), mask.tolist(), y.tolist()):
            assert row[: sum(m)] == ids[label]


def test_iterate_batches_shuffles_deterministically_each_example_once():
    n = 37
    ids = [[0] + [100 + i] * (i % 5 + 1) + [2] for i in range(n)]
    labels = torch.arange(n)

    def epoch(seed):
        out = list(data.iterate_batches(ids, labels, 8, pad_id=1, generator=torch.Generator().manual_seed(seed)))
        seen = []
        for input_ids, mask, y in out:
            assert input_ids.shape == mask.shape and input_ids.shape[0] == y.shape[0] <= 8
            for row, m, label in zip(input_ids.tolist(), mask.tolist(), y.tolist()):
                length = sum(m)
                assert row[:length] == ids[label]  # labels stay aligned with their example
                assert all(t == 1 for t in row[length:])
            seen += y.tolist()
        return seen

    a, b, c = epoch(3), epoch(3), epoch(4)
    assert sorted(a) == list(range(n))  # every example exactly once
    assert a == b
    assert a != c and sorted(c) == list(range(n))
    assert a != list(range(n))
    # one generator across epochs gives a fresh order each epoch
    g = torch.Generator().manual_seed(3)
    e1 = torch.cat([y for *_, y in data.iterate_batches(ids, labels, 8, 1, g)]).tolist()
    e2 = torch.cat([y for *_, y in data.iterate_batches(ids, labels, 8, 1, g)]).tolist()
    assert e1 == a and e2 != e1 and sorted(e2) == list(range(n))


def test_length_bucketing_pads_less_covers_each_example_once_and_resumes_with_skip():
    g = torch.Generator().manual_seed(0)
    n = 400
    ids = [[0] + [100 + i] * int(torch.randint(1, 60, (1,), generator=g)) + [2] for i in range(n)]
    labels = torch.arange(n)

    def epoch(bucketing, skip=0, seed=5):
        gen = torch.Generator().manual_seed(seed)
        return list(data.iterate_batches(ids, labels, 8, 1, gen, skip=skip, bucketing=bucketing))

    def padding(batches):
        return sum(int((m == 0).sum()) for _, m, _ in batches)

    bucketed, plain = epoch(True), epoch(False)
    order = torch.cat([y for *_, y in bucketed]).tolist()
    assert sorted(order) == list(range(n))  # every example exactly once
    for input_ids, mask, y in bucketed:
        for row, m, label in zip(input_ids.tolist(), mask.tolist(), y.tolist()):
            assert row[: sum(m)] == ids[label]
    assert padding(bucketed) < padding(plain) / 5, (padding(bucketed), padding(plain))
    assert order == torch.cat([y for *_, y in epoch(True)]).tolist()  # deterministic in the generator
    assert order != torch.cat([y for *_, y in epoch(True, seed=6)]).tolist()
    # the batches are shuffled, not served shortest first
    widths = [x.shape[1] for x, _, _ in bucketed]
    assert widths != sorted(widths)
    resumed = torch.cat([y for *_, y in epoch(True, skip=7)]).tolist()
    assert resumed == order[7 * 8:]


# ------------------------------------------------------------------------------------------------------ masking


def _mlm_batch(tokenizer, rows=96, width=256, seed=0):
    """Packed-like rows of regular tokens with <s>/</s> and trailing padding, and the special mask the
    pre-training loop builds (every special id, padding included)."""
    g = torch.Generator().manual_seed(seed)
    regular = models.regular_token_ids(tokenizer)
    ids = torch.randint(int(regular[0]), len(tokenizer), (rows, width), generator=g)
    ids[:, 0] = tokenizer.bos_token_id
    ids[:, 40::41] = tokenizer.eos_token_id
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        ids[i, length:] = tokenizer.pad_token_id
    special = sum(ids == s for s in tokenizer.all_special_ids).bool()
    return ids, special, regular


def test_mask_tokens_roberta_80_10_10(tokenizer):
    ids, special, regular_ids = _mlm_batch(tokenizer)
    mask_id = tokenizer.mask_token_id
    corrupted, labels = data.mask_tokens(ids, special, mask_id, regular_ids, 0.15, torch.Generator().manual_seed(1))
    assert corrupted.shape == labels.shape == ids.shape
    chosen = labels != -100
    regular = ~special
    assert int(special.sum()) > 1000 and int((ids == tokenizer.pad_token_id).sum()) > 1000

    # never selects padding or special tokens; labels are -100 there and wherever nothing is chosen
    assert not (chosen & special).any()
    assert (labels[special] == -100).all()
    assert torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # unselected positions are untouched

    rate = chosen.sum().item() / regular.sum().item()
    assert abs(rate - 0.15) < 0.01, rate

    n = chosen.sum().item()
    to_mask = chosen & (corrupted == mask_id)
    unchanged = chosen & (corrupted == ids)
    randomized = chosen & (corrupted != ids) & (corrupted != mask_id)
    assert to_mask.sum() + unchanged.sum() + randomized.sum() == n
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    assert abs(randomized.sum().item() / n - 0.1) < 0.015
    assert abs(unchanged.sum().item() / n - 0.1) < 0.015
    # random replacements are regular tokens, spread over the vocabulary, never a special id
    replacements = corrupted[randomized]
    assert torch.isin(replacements, regular_ids).all()
    assert not torch.isin(replacements, torch.tensor(tokenizer.all_special_ids)).any()
    assert replacements.unique().numel() > 0.5 * len(regular_ids)  # ~270 draws over 295 ids: ~180 distinct
    # <mask> appears only at chosen positions
    assert not ((corrupted == mask_id) & ~chosen).any()


@pytest.mark.parametrize("mask_prob", [0.05, 0.4])
def test_mask_tokens_rate_follows_mask_prob(tokenizer, mask_prob):
    ids, special, regular_ids = _mlm_batch(tokenizer, seed=2)
    _, labels = data.mask_tokens(ids, special, tokenizer.mask_token_id, regular_ids, mask_prob,
                                 torch.Generator().manual_seed(5))
    rate = (labels != -100).sum().item() / (~special).sum().item()
    assert abs(rate - mask_prob) < 0.015, rate
    assert not ((labels != -100) & special).any()


def test_mask_tokens_is_deterministic_in_the_generator(tokenizer):
    ids, special, regular_ids = _mlm_batch(tokenizer, rows=8, width=64)

    def run(seed):
        return data.mask_tokens(ids, special, tokenizer.mask_token_id, regular_ids, 0.15,
                                torch.Generator().manual_seed(seed))

    (c1, l1), (c2, l2), (c3, l3) = run(11), run(11), run(12)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert not torch.equal(l1, l3) and not torch.equal(c1, c3)
    assert torch.equal(ids, _mlm_batch(tokenizer, rows=8, width=64)[0])  # the input is not modified in place


# ------------------------------------------------------------------------------------------------- encode_task


def test_encode_task_truncates_to_max_length(tokenizer):
    long_text = " ".join(world.domain_corpus(world.build_world(SMALL_WORLD), "d1")[:10])
    short_text = "the cat ."
    task = data.TaskData("t", ("a", "b"), {
        "train": [(long_text, 1), (short_text, 0)],
        "dev": [(short_text, 1)],
        "test": [(long_text, 0)],
    })
    encoded = data.encode_task(task, tokenizer, max_length=12)
    assert set(encoded) == {"train", "dev", "test"}
    train_ids, train_labels = encoded["train"]
    assert train_labels.dtype == torch.long and train_labels.tolist() == [1, 0]
    full_long = tokenizer(long_text)["input_ids"]
    assert len(full_long) > 12
    assert len(train_ids[0]) == 12
    assert train_ids[0][0] == tokenizer.bos_token_id and train_ids[0][-1] == tokenizer.eos_token_id
    assert train_ids[0][:-1] == full_long[:11]  # truncation keeps the head and re-appends </s>
    assert train_ids[1] == tokenizer(short_text)["input_ids"]
    assert len(train_ids[1]) < 12
    assert encoded["dev"][1].tolist() == [1]
    assert encoded["test"][0] == [train_ids[0]]
    # a larger budget keeps everything
    assert data.encode_task(task, tokenizer, max_length=len(full_long))["train"][0][0] == full_long


# ------------------------------------------------------------------------------------------------- K-shot


def _rows(counts: dict[int, int]) -> list[tuple[str, int]]:
    return [(f"{label}-{i}", label) for label, n in counts.items() for i in range(n)]


def test_k_shot_takes_k_per_class_and_small_classes_whole():
    rows = _rows({0: 50, 1: 3, 2: 10})
    sample = data.sample_per_class(rows, 5, seed=7)
    by_class = {label: [t for t, y in sample if y == label] for label in (0, 1, 2)}
    assert {k: len(v) for k, v in by_class.items()} == {0: 5, 1: 3, 2: 5}
    assert len(set(sample)) == len(sample)  # without replacement
    assert set(sample) <= set(rows)
    assert sample == sorted(sample, key=rows.index)  # original order kept


def test_k_shot_is_deterministic_in_the_seed_and_varies_with_it():
    rows = _rows({0: 40, 1: 40})
    assert data.sample_per_class(rows, 8, seed=1) == data.sample_per_class(rows, 8, seed=1)
    assert data.sample_per_class(rows, 8, seed=1) != data.sample_per_class(rows, 8, seed=2)


def test_k_shot_task_keeps_test_and_full_dev():
    task = data.TaskData("t", ("a", "b"), {"train": _rows({0: 20, 1: 20}), "dev": _rows({0: 9, 1: 9}),
                                           "test": _rows({0: 30, 1: 5})})
    few = data.k_shot(task, 4, seed=3)
    assert len(few.splits["train"]) == 8 and len(few.splits["dev"]) == 8
    assert few.splits["test"] == task.splits["test"] and few.splits["full_dev"] == task.splits["dev"]
    assert few.labels == task.labels


def test_k_shot_rejects_k_below_one():
    with pytest.raises(ValueError, match="K"):
        data.sample_per_class(_rows({0: 3}), 0, seed=0)


def test_hf_corpus_names_its_configuration_and_streams(tmp_path):
    """A dataset with two configurations (declared in its card, as on the hub), one of them read as a stream."""
    for lang in ("en", "de"):
        write_jsonl(tmp_path / "ds" / lang / "train.jsonl", [{"text": f"{lang} {i}"} for i in range(3)])
    (tmp_path / "ds" / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n"
        "- config_name: de\n  data_files:\n  - split: train\n    path: de/train.jsonl\n---\n")
    for streaming in (False, True):
        spec = CorpusConfig("c", source="hf", path=str(tmp_path / "ds"), config_name="de", streaming=streaming)
        assert data.load_corpus(spec, WorldConfig()) == ["de 0", "de 1", "de 2"]
