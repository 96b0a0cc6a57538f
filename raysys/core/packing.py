"""A corpus tokenized and packed once, on disk, read through memory maps.

At the paper's scale a domain corpus is gigabytes of text: held as Python lists of token ids it would not fit, and
tokenizing it in every DDP worker for every rerun would cost more than the training. `write_packed` streams the
documents through the tokenizer in batches and appends the packed sequences to two flat files — the tokens
(uint16, or uint32 for vocabularies over 65,535) and each sequence's end offset (int64) — so its memory is one
batch whatever the corpus size. `PackedCorpus` maps them back: indexing a sequence reads only its own pages, so a
worker's memory follows the sequences it samples, not the corpus.

The packing is the one of `data.pack_stream` (RoBERTa's FULL-SENTENCES) over the same token ids, so a packed
corpus holds exactly the sequences the in-memory path made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from raysys.core import architectures, data

TOKENS_FILE = "tokens.bin"
ENDS_FILE = "ends.bin"
META_FILE = "packed.json"
BATCH_DOCUMENTS = 2048  # documents tokenized per call: large enough for the fast tokenizer's batching


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in documents:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_lists(documents: Iterable[str], tokenizer, stats: dict) -> Iterator[list[int]]:
    # the Rust tokenizer directly: the same ids as `tokenizer(batch)["input_ids"]` without building the masks and
    # BatchEncoding the training path never reads
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for batch in _batches(documents, BATCH_DOCUMENTS):
        if backend is not None:
            ids = [encoding.ids for encoding in backend.encode_batch(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        stats["documents"] += len(batch)
        stats["characters"] += sum(map(len, batch))
        yield from ids


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_packed(documents: Iterable[str], tokenizer, max_length: int, folder: Path,
                 flush_tokens: int = 1 << 22) -> dict:
    """Tokenize and pack `documents` into `folder` (which the caller commits when this returns); returns the
    metadata also written beside the files: counts and the tokenization rate."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    bos, eos = architectures.start_token_id(tokenizer), architectures.end_token_id(tokenizer)
    stats = {"documents": 0, "characters": 0}
    started, total, sequences = time.time(), 0, 0
    tokens_buffer, ends_buffer = [], []
    with (folder / TOKENS_FILE).open("wb") as tokens_out, (folder / ENDS_FILE).open("wb") as ends_out:
        def flush():
            tokens_out.write(np.asarray(tokens_buffer, dtype=dtype).tobytes())
            ends_out.write(np.asarray(ends_buffer, dtype=np.int64).tobytes())
            tokens_buffer.clear()
            ends_buffer.clear()

        for sequence in data.pack_stream(_token_lists(documents, tokenizer, stats), max_length, bos, eos):
            tokens_buffer.extend(sequence)
            total += len(sequence)
            sequences += 1
            ends_buffer.append(total)
            if len(tokens_buffer) >= flush_tokens:
                flush()
        flush()
    seconds = time.time() - started
    meta = {**stats, "sequences": sequences, "tokens": total, "dtype": dtype.name, "max_length": max_length,
            "seconds": seconds, "tokens_per_second": total / seconds if seconds > 0 else None}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


class PackedCorpus:
    """The packed sequences of a folder `write_packed` made, as a read-only sequence of token-id lists."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.meta = json.loads((folder / META_FILE).read_text())
        count = self.meta["sequences"]
        # np.memmap refuses empty files: an empty corpus is an empty sequence
        self.ends = np.memmap(folder / ENDS_FILE, dtype=np.int64, mode="r") if count else np.zeros(0, np.int64)
        self.tokens = (np.memmap(folder / TOKENS_FILE, dtype=np.dtype(self.meta["dtype"]), mode="r") if count
                       else np.zeros(0, np.uint16))

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> list[int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} of {len(self)}")
        index %= len(self)
        start = int(self.ends[index - 1]) if index else 0
        return self.tokens[start : int(self.ends[index])].tolist()
