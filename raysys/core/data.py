"""Corpora and tasks from the built-in world, local files, or `datasets`; tokenization, packing, MLM masking,
batching. Everything returns plain Python/torch objects so the training loops know nothing of where data came from."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from raysys.config import CorpusConfig, TaskConfig, WorldConfig
from raysys.core import sources
from raysys.core import world as world_mod
from raysys.core.sources import DataError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskData:
    name: str
    labels: tuple[str, ...]  # label names; the index is the class id
    splits: dict  # split -> list[(text, label_id)]


# ------------------------------------------------------------------------------------------------------ corpora


def corpus_documents(spec: CorpusConfig, world_config: WorldConfig):
    """The documents (lines/sentences) of one domain corpus, as an iterable: files and hub data are streamed."""
    if spec.source != "builtin":
        return sources.documents(spec)
    texts = world_mod.domain_corpus(world_mod.build_world(world_config), spec.name)
    return texts if spec.max_documents is None else texts[: spec.max_documents]


def load_corpus(spec: CorpusConfig, world_config: WorldConfig) -> list[str]:
    """All of a corpus's documents in memory: for small corpora and tests. Pre-training streams its corpus into a
    packed cache instead (raysys.core.packing)."""
    texts = list(corpus_documents(spec, world_config))
    if not texts:
        raise DataError(f"corpus {spec.name}: no documents")
    return texts


# -------------------------------------------------------------------------------------------------------- tasks


def _example(where: str, text, label, text_field: str, label_field: str) -> tuple[str, object]:
    """One (text, label) row, its types checked: the tokenizer takes text only, and a label is a class name or
    number (a null, list or object label would be a class of its own, or fail mid-run)."""
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' is {json.dumps(text, default=str)[:40]}, not text")
    if not isinstance(label, (str, int, float)):
        raise DataError(f"{where}: field '{label_field}' is {json.dumps(label, default=str)[:40]}, not a class name "
                        "or number")
    return text, label


def _read_jsonl(file: sources.DataFile, text_field: str, label_field: str) -> list[tuple[str, object]]:
    rows = []
    for lineno, record in sources.jsonl_records(file):
        if not isinstance(record, dict):
            raise DataError(f"{file.uri}:{lineno}: expected a JSON object with '{text_field}' and '{label_field}'")
        for key in (text_field, label_field):
            if key not in record:
                raise DataError(f"{file.uri}:{lineno}: missing field '{key}'")
        rows.append(_example(f"{file.uri}:{lineno}", record[text_field], record[label_field], text_field,
                             label_field))
    if not rows:
        raise DataError(f"{file.uri}: no examples")
    return rows


def _read_parquet(file: sources.DataFile, text_field: str, label_field: str) -> list[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        with file.fs.open_input_file(file.path) as f:
            table = pq.read_table(f)
    except Exception as err:  # noqa: BLE001 — any unreadable file is a data error naming the file
        raise DataError(f"{file.uri}: not a readable Parquet file ({err})") from None
    for key in (text_field, label_field):
        if key not in table.column_names:
            raise DataError(f"{file.uri}: missing column '{key}' (have {table.column_names})")
    rows = [_example(f"{file.uri}: row {i}", text, label, text_field, label_field)
            for i, (text, label) in enumerate(zip(table[text_field].to_pylist(), table[label_field].to_pylist()), 1)]
    if not rows:
        raise DataError(f"{file.uri}: no examples")
    return rows


def _hf_split(spec: TaskConfig, name: str) -> list[tuple[str, object]]:
    import datasets  # heavy import, only on the hub path

    ds = datasets.load_dataset(spec.path, spec.config_name, split=name, revision=spec.revision)
    for key in (spec.text_field, spec.label_field):
        if key not in ds.column_names:
            raise DataError(f"task {spec.name} ({spec.path}:{name}): missing field '{key}'")
    return list(zip(ds[spec.text_field], ds[spec.label_field]))


def read_split(spec: TaskConfig, split: str, files: dict | None = None) -> list[tuple[str, object]]:
    """The (text, raw label) rows of one split of a file or hub task."""
    if spec.source == "hf":
        return _hf_split(spec, dict(zip(SPLITS, spec.splits))[split])
    file = (files or sources.task_files(spec))[split]
    read = _read_jsonl if spec.source == "jsonl" else _read_parquet
    return read(file, spec.text_field, spec.label_field)


def _raw_task_splits(spec: TaskConfig, world_config: WorldConfig) -> tuple[dict, list | None]:
    if spec.source == "builtin":
        w = world_mod.build_world(world_config)
        splits = world_mod.task_splits(w, spec.domain)
        return {s: [(r["text"], r["label"]) for r in rows] for s, rows in splits.items()}, world_mod.task_label_names(w)
    files = sources.task_files(spec) if spec.source != "hf" else None
    return {split: read_split(spec, split, files) for split in SPLITS}, None


def _label_order(label) -> tuple:
    """Numbers in numeric order (0, 1, 2, …, 10), anything else by its text, numbers first."""
    numeric = isinstance(label, (int, float)) and not isinstance(label, bool)
    return (0, label, "") if numeric else (1, 0, str(label))


def label_names(train_rows: list[tuple[str, object]]) -> list:
    """The label set of a task: its training split's labels, sorted, so the same task always maps them alike."""
    return sorted({label for _, label in train_rows}, key=_label_order)


def unknown_labels(rows: list[tuple[str, object]], known) -> list[str]:
    known = set(known)
    return sorted({str(label) for _, label in rows if label not in known})


def first_unknown(rows: list[tuple[str, object]], known, file: sources.DataFile | None, source: str) -> str:
    """Where the first label outside `known` is: '<file>:<line>' (jsonl), '<file>: row <n>' (parquet), '' (hub)."""
    index = next(i for i, (_, label) in enumerate(rows) if label not in set(known))
    if file is None or source not in ("jsonl", "parquet"):
        return ""
    if source == "parquet":
        return f"{file.uri}: row {index + 1}"
    lineno = [n for n, _ in sources.jsonl_records(file)][index]  # blank lines are no rows
    return f"{file.uri}:{lineno}"


def load_task(spec: TaskConfig, world_config: WorldConfig) -> TaskData:
    """Load train/dev/test and map labels to ids. The label set comes from the training split (sorted); a dev/test
    label unseen in training is an error."""
    raw, names = _raw_task_splits(spec, world_config)
    if names is None:
        names = label_names(raw["train"])
    index = {label: i for i, label in enumerate(names)}
    splits = {}
    for split, rows in raw.items():
        unknown = unknown_labels(rows, index)
        if unknown:
            raise DataError(f"task {spec.name}/{split}: labels {unknown} not in training labels")
        splits[split] = [(text, index[label]) for text, label in rows]
    return TaskData(spec.name, tuple(str(x) for x in names), splits)


def sample_per_class(rows: list[tuple[str, int]], k: int, seed: int) -> list[tuple[str, int]]:
    """K examples of every class, drawn without replacement with `seed`; a class with <= K examples is taken
    whole. The result keeps the rows' original order, so it depends only on (rows, k, seed)."""
    if k < 1:
        raise ValueError(f"K: must be >= 1, got {k}")
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(rows):
        by_class.setdefault(label, []).append(i)
    chosen = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) <= k:
            chosen += members
        else:
            chosen += [members[j] for j in torch.randperm(len(members), generator=generator)[:k].tolist()]
    return [rows[i] for i in sorted(chosen)]


def k_shot(task: TaskData, k: int, seed: int) -> TaskData:
    """The paper's few-shot regime: K per class for train and for dev (seeded), the full test set; the full dev
    set is kept as `full_dev` so model selection can be reported both ways."""
    splits = {"train": sample_per_class(task.splits["train"], k, seed),
              "dev": sample_per_class(task.splits["dev"], k, seed + 1),
              "test": task.splits["test"], "full_dev": task.splits["dev"]}
    return TaskData(task.name, task.labels, splits)


# ------------------------------------------------------------------------------------------------ tensors


def pack_stream(token_lists, max_length: int, bos_id: int, eos_id: int):
    """RoBERTa's FULL-SENTENCES packing, as a stream: consecutive whole documents in one sequence of at most
    `max_length` tokens, `<s> doc </s> doc </s> ...` (BERT's `[CLS] doc [SEP] ...`: `bos_id` opens, `eos_id`
    closes). A document is never split across sequences unless it alone is longer than the window, in which case
    it is cut into windows."""
    current = [bos_id]
    for tokens in token_lists:
        piece = tokens + [eos_id]
        if len(current) > 1 and len(current) + len(piece) > max_length:
            yield current
            current = [bos_id]
        while len(current) + len(piece) > max_length:
            room = max_length - len(current)
            yield current + piece[:room]
            current, piece = [bos_id], piece[room:]
        current = current + piece
    if len(current) > 1:
        yield current


def pack_sequences(token_lists: list[list[int]], max_length: int, bos_id: int, eos_id: int) -> list[list[int]]:
    return list(pack_stream(token_lists, max_length, bos_id, eos_id))


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding to the longest sequence in the batch."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_id: int,
    regular_ids: torch.Tensor,
    mask_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa's dynamic masking: choose `mask_prob` of the non-special tokens; of those 80% become <mask>, 10% a
    random regular token (uniform over `regular_ids`), 10% stay. Returns (corrupted ids, labels with -100 where no
    prediction is made)."""
    probs = torch.full(input_ids.shape, mask_prob)
    probs.masked_fill_(special_mask.bool(), 0.0)
    chosen = torch.bernoulli(probs, generator=generator).bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    corrupted = input_ids.clone()
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    corrupted[to_mask] = mask_id
    # an index into the regular ids: for a contiguous range [first, vocab) the same draws as randint(first, vocab)
    random_ids = regular_ids[torch.randint(0, len(regular_ids), input_ids.shape, generator=generator)]
    corrupted[to_random] = random_ids[to_random]
    return corrupted, labels


def encode_task(task: TaskData, tokenizer, max_length: int) -> dict:
    """split -> (list of token id lists, label tensor)."""
    out = {}
    for split, rows in task.splits.items():
        texts = [t for t, _ in rows]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        out[split] = (ids, torch.tensor([y for _, y in rows], dtype=torch.long))
    return out


BUCKET_BATCHES = 50  # length bucketing sorts windows of this many batches: similar lengths, still well mixed


def _bucketed(order: list[int], ids: list[list[int]], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` regrouped so that each batch holds examples of similar length: sort windows of BUCKET_BATCHES
    batches by length, cut them into batches, and shuffle the batches (with the same generator, so that a resumed
    epoch finds the same order)."""
    window = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), window):
        by_length = sorted(order[start : start + window], key=lambda i: len(ids[i]))
        batches += [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


def iterate_batches(ids: list[list[int]], labels: torch.Tensor, batch_size: int, pad_id: int,
                    generator: torch.Generator | None = None, with_index: bool = False, by_length: bool = False,
                    skip: int = 0, bucketing: bool = False):
    """Yield (input_ids, attention_mask, labels) batches, plus the examples' indices with `with_index` (to look
    up per-example cached values such as teacher outputs); shuffled when a generator is given (with `bucketing`,
    into batches of similar length: less padding), else in order, or shortest first with `by_length` (for
    evaluation: batches of similar length waste little on padding). `skip` drops the first batches of the order
    (a resumed run re-enters its epoch)."""
    if generator is not None:
        order = torch.randperm(len(ids), generator=generator).tolist()
        if bucketing:
            order = _bucketed(order, ids, batch_size, generator)
    elif by_length:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    else:
        order = list(range(len(ids)))
    for start in range(skip * batch_size, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in chunk], pad_id)
        if with_index:
            yield input_ids, mask, labels[chunk], torch.tensor(chunk, dtype=torch.long)
        else:
            yield input_ids, mask, labels[chunk]
