"""A corpus tokenized and packed once, on disk, read back a sequence at a time.

At the paper's scale a domain corpus is gigabytes of text: held as Python lists of token ids it would not fit, and
tokenizing it in every DDP worker for every rerun would cost more than the training. `write_packed` streams the
documents through the tokenizer in batches and appends the packed sequences to two flat files — the tokens
(uint16, or uint32 for vocabularies over 65,535) and each sequence's end offset (int64), little-endian — so its memory is one
batch whatever the corpus size. `PackedCorpus` reads them back: indexing a sequence reads only its own bytes, so a
worker's memory does not grow with the corpus.

The packing is the one of `data.pack_stream` (RoBERTa's FULL-SENTENCES) over the same token ids, so a packed
corpus holds exactly the sequences the in-memory path made.
"""

from __future__ import annotations

import json
import os
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
            tokens_out.write(np.asarray(tokens_buffer, dtype=dtype.newbyteorder("<")).tobytes())
            ends_out.write(np.asarray(ends_buffer, dtype="<i8").tobytes())
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
    """The packed sequences of a folder `write_packed` made, as a read-only sequence of token-id lists. Each lookup
    reads its sequence's offsets and tokens with `os.pread`, nothing else: no memory map, so a worker's resident
    memory holds none of the corpus (a map would count every page fault-around brings in, growing with the file)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.meta = json.loads((folder / META_FILE).read_text())
        self.count = self.meta["sequences"]
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")  # the files are little-endian on any machine
        self._tokens = os.open(folder / TOKENS_FILE, os.O_RDONLY)
        self._ends = os.open(folder / ENDS_FILE, os.O_RDONLY)

    def __len__(self) -> int:
        return self.count

    def _end(self, index: int) -> int:
        return int.from_bytes(os.pread(self._ends, 8, 8 * index), "little", signed=True)

    def __getitem__(self, index: int) -> list[int]:
        if not -self.count <= index < self.count:
            raise IndexError(f"sequence {index} of {self.count}")
        index %= self.count
        start, end = (self._end(index - 1) if index else 0), self._end(index)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self._tokens, (end - start) * size, start * size), self.dtype).tolist()

    def __del__(self):
        for fd in (getattr(self, "_tokens", None), getattr(self, "_ends", None)):
            if fd is not None:
                os.close(fd)


class ReplayMix:
    """A continual link's training sequences: its own corpus, plus replayed sequences of the earlier corpora so
    that they make `fraction` of the whole (in expectation, of every batch). Replayed sequences are drawn once,
    seeded, spread evenly over the earlier corpora; indices below `len(new)` are the new corpus's own, in order.
    Replay is what keeps M_{i+1} knowing what M_i knew (continual pre-training at scale forgets little; a small
    model on a small world forgets nearly everything without it)."""

    def __init__(self, new, earlier: list, fraction: float, seed: int):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"pretrain.replay must be in [0, 1), got {fraction}")
        self.new, self.earlier = new, earlier
        total = round(len(new) * fraction / (1.0 - fraction)) if earlier else 0
        rng = np.random.default_rng(seed)
        self.source = np.arange(total) % max(1, len(earlier))  # which earlier corpus each replayed sequence is from
        self.index = np.zeros(total, dtype=np.int64)
        for s, corpus in enumerate(earlier):
            drawn = self.source == s
            self.index[drawn] = rng.integers(len(corpus), size=int(drawn.sum()))

    def __len__(self) -> int:
        return len(self.new) + len(self.source)

    def __getitem__(self, index: int) -> list[int]:
        if index < len(self.new):
            return self.new[index]
        k = index - len(self.new)
        return self.earlier[int(self.source[k])][int(self.index[k])]
