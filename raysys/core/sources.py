"""Where a study's data lives: the files a corpus glob or a task names (local paths or `s3://`/`gs://`/`file://`
URIs, through `pyarrow.fs`), their fingerprints, and the documents of a corpus as a stream.

A fingerprint is the data's identity in every hash, in place of its path: moving the data folder keeps every
artifact; editing a file makes new ones of exactly what depends on it. It covers each file's name relative to
the glob's fixed prefix (or the task folder), its size and a SHA-256 of its content. Files up to FULL_HASH_BYTES
are hashed in full; a larger file by SAMPLE_BLOCKS blocks of BLOCK_BYTES spread evenly over it (first and last
included) with its exact size: hashing a 100 GB corpus in full would cost minutes of reading at every driver
start, while an append, a truncation or a rewrite is caught by the size or the sampled blocks. (An edit of the
same length that touches no sampled block of a file over 256 MiB goes unseen: rename such a file to be sure.)
Digests are cached on this machine by (file, size, modification time), so a rerun reads nothing again.
"""

from __future__ import annotations

import codecs
import fnmatch
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raysys.config import CorpusConfig, TaskConfig, is_uri

FULL_HASH_BYTES = 256 * 1024**2
SAMPLE_BLOCKS = 64
BLOCK_BYTES = 1024**2
_MAGIC = set("*?[")


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file or field."""


@dataclass(frozen=True)
class DataFile:
    """One file of a source: its filesystem, its path there, its name relative to the source's root, its size."""

    fs: pafs.FileSystem
    path: str
    name: str
    size: int
    mtime_ns: int

    @property
    def uri(self) -> str:
        kind = self.fs.type_name
        return self.path if kind == "local" else f"{kind}://{self.path}"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a local path or a URI, and the path within it."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: cannot open its filesystem ({err})") from None
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _split_glob(pattern: str) -> tuple[str, list[str]]:
    """The fixed folder before the first component with a wildcard, and the components from there on."""
    parts = pattern.split("/")
    fixed = next((i for i, part in enumerate(parts) if set(part) & _MAGIC), len(parts) - 1)
    return "/".join(parts[:fixed]) or "/", parts[fixed:]


def _info(fs: pafs.FileSystem, path: str, name: str) -> DataFile:
    info = fs.get_file_info(path)
    return DataFile(fs, path, name, info.size, info.mtime_ns or 0)


def glob_files(pattern: str, what: str) -> list[DataFile]:
    """The files matching a glob (a wildcard matches within one path component, as `glob.glob` does; names
    starting with '.' only match a pattern that starts with '.'), sorted by path."""
    fs, path = filesystem(pattern)
    root, components = _split_glob(path)
    try:
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=len(components) > 1, allow_not_found=True))
    except OSError as err:
        raise DataError(f"{what}: cannot list '{root}' ({err})") from None
    matched = []
    for info in listing:
        if info.type != pafs.FileType.File:
            continue
        rel = os.path.relpath(info.path, root).split(os.sep)
        if len(rel) == len(components) and all(
                fnmatch.fnmatchcase(part, pat) and (pat.startswith(".") or not part.startswith("."))
                for part, pat in zip(rel, components)):
            matched.append(DataFile(fs, info.path, "/".join(rel), info.size, info.mtime_ns or 0))
    if not matched:
        raise DataError(f"{what}: no files match '{pattern}'")
    return sorted(matched, key=lambda f: f.path)


def named_file(path: str, name: str, kind: str) -> DataFile:
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise DataError(f"missing {kind} file {path}")
    return _info(fs, inner, name)


# ------------------------------------------------------------------------------------------------ fingerprints


def _digest(file: DataFile) -> str:
    h = hashlib.sha256()
    with file.fs.open_input_file(file.path) as f:
        if file.size <= FULL_HASH_BYTES:
            while chunk := f.read(8 * BLOCK_BYTES):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        for k in range(SAMPLE_BLOCKS):
            h.update(f.read_at(BLOCK_BYTES, k * (file.size - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1)))
    return f"sampled-sha256:{h.hexdigest()}"


class DigestCache:
    """File digests already computed on this machine, keyed by (file, size, modification time)."""

    def __init__(self, path: Path | None = None):
        base = Path(os.environ.get("RAYSYS_CACHE") or Path.home() / ".cache" / "raysys").expanduser()
        self.path = path or base / "digests.json"
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, file: DataFile) -> str:
        key = f"{file.uri}|{file.size}|{file.mtime_ns}"
        if key not in self.entries:
            self.entries[key] = _digest(file)
            self.changed = True
        return self.entries[key]

    def checked(self, file: DataFile, kind: str, check) -> str | None:
        """`check(file)`'s problem, or None; a file that passed is not read again until it changes."""
        key = f"{kind}|{file.uri}|{file.size}|{file.mtime_ns}"
        if key in self.entries:
            return None
        problem = check(file)
        if problem is None:
            self.entries[key] = "ok"
            self.changed = True
        return problem

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            temp.write_text(json.dumps(self.entries))
            os.replace(temp, self.path)
        except OSError:  # a read-only home only costs rehashing next time
            pass


def fingerprint_files(files: list[DataFile], cache: DigestCache) -> str:
    listing = [[f.name, f.size, cache.digest(f)] for f in files]
    return "files:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:24]


def checkpoint_fingerprint(path: str | None, cache: DigestCache) -> str:
    """A local checkpoint folder by its files (names, sizes, content; hidden ones such as `.cache` and Python's
    `__pycache__` aside), so that moving it keeps what was made from it and editing it in place does not; "" for
    a hub name or nothing."""
    if not path or not os.path.isdir(path):
        return ""
    fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    files = [DataFile(fs, info.path, os.path.relpath(info.path, root), info.size, info.mtime_ns or 0)
             for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if info.type == pafs.FileType.File
             and not any(part.startswith(".") or part == "__pycache__"
                         for part in os.path.relpath(info.path, root).split(os.sep))]
    return fingerprint_files(sorted(files, key=lambda f: f.name), cache)


def hub_fingerprint(spec: CorpusConfig | TaskConfig, splits: list[str]) -> str:
    """A hub dataset is identified by what names it: pin `revision` to make that its content too."""
    named = [spec.path, spec.config_name, spec.revision, splits]
    return "hf:" + hashlib.sha256(json.dumps(named).encode()).hexdigest()[:24]


def corpus_files(spec: CorpusConfig) -> list[DataFile]:
    return glob_files(spec.path, f"corpus {spec.name}")


def task_file(spec: TaskConfig, name: str) -> DataFile:
    """The file of split `name` of a jsonl/parquet task: `<path>/<task>/<name>.<source>`."""
    return named_file(f"{spec.path.rstrip('/')}/{spec.name}/{name}.{spec.source}", f"{spec.name}/{name}.{spec.source}",
                      "task")


def task_files(spec: TaskConfig) -> dict[str, DataFile]:
    """split -> its file."""
    from raysys.core.data import SPLITS

    return {split: task_file(spec, name) for split, name in zip(SPLITS, spec.splits)}


def split_examples(spec: TaskConfig, split: str, world_split_sizes: dict[str, int]) -> int | None:
    """How many examples split `split` of a task holds, without parsing it (the `--dry-run` evaluation estimate):
    the world's config for built-in tasks, non-blank lines of a jsonl file, a Parquet file's row count from its
    footer. None for a hub task (learning its size means downloading it) or a file not there."""
    if spec.source == "builtin":
        return world_split_sizes[split]
    if spec.source == "hf":
        return None
    try:
        file = task_file(spec, spec.splits[("train", "dev", "test").index(split)])
    except DataError:
        return None
    if spec.source == "parquet":
        import pyarrow.parquet as pq

        with file.fs.open_input_file(file.path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    with file.fs.open_input_stream(file.path) as raw:
        return sum(1 for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace") if line.strip())


def fingerprint(spec: CorpusConfig | TaskConfig, cache: DigestCache) -> str | None:
    """The identity of a source's data (None for built-in data: the world's config is its identity)."""
    if spec.source == "builtin":
        return None
    if spec.source == "hf":
        return hub_fingerprint(spec, [spec.split] if isinstance(spec, CorpusConfig) else list(spec.splits))
    files = corpus_files(spec) if isinstance(spec, CorpusConfig) else list(task_files(spec).values())
    return fingerprint_files(files, cache)


# --------------------------------------------------------------------------------------------- documents


def text_lines(file: DataFile) -> Iterator[str]:
    """The file's lines. A byte that is not UTF-8 is an error naming the file and line: replacing it would train
    on text of the wrong encoding without a word."""
    with file.fs.open_input_stream(file.path) as raw:
        try:
            yield from (line.rstrip("\n") for line in io.TextIOWrapper(raw, encoding="utf-8"))
        except UnicodeDecodeError:
            pass
        else:
            return
    raise DataError(_scan_utf8(file) or f"{file.uri}: not UTF-8 text")


def _not_utf8(uri: str, line: int, byte: int | None) -> str:
    what = f"byte {byte:#04x}" if byte is not None else "a character cut off at the end"
    return f"{uri}:{line}: not UTF-8 text ({what}); convert the file to UTF-8"


def _scan_utf8(file: DataFile) -> str | None:
    """The first line of the whole file that is not UTF-8 ('<file>:<line>: ...'), or None."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with file.fs.open_input_stream(file.path) as raw:
        while chunk := raw.read(8 * BLOCK_BYTES):
            pending = len(decoder.getstate()[0])  # the cut character the last chunk ended on, after its last newline
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                at = err.start - pending
                return _not_utf8(file.uri, line + chunk.count(b"\n", 0, max(0, at)), chunk[at] if at >= 0 else None)
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return _not_utf8(file.uri, line, None)
    return None


def utf8_problem(file: DataFile) -> str | None:
    """Where a text or jsonl file is not UTF-8, or None. Read whole up to FULL_HASH_BYTES; a larger file by the
    blocks its digest samples (a bad byte between them is named when training reaches it)."""
    if file.size <= FULL_HASH_BYTES:
        return _scan_utf8(file)
    with file.fs.open_input_file(file.path) as f:
        for k in range(SAMPLE_BLOCKS):
            offset = k * (file.size - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1)
            block = f.read_at(BLOCK_BYTES, offset)
            # a block starts inside a character (continuation bytes 10xxxxxx) and may end inside one: both are fine
            start = 0 if offset == 0 else next((i for i, b in enumerate(block[:4]) if b & 0xC0 != 0x80), 0)
            try:
                codecs.getincrementaldecoder("utf-8")().decode(block[start:])
            except UnicodeDecodeError as err:
                return (f"{file.uri}: not UTF-8 text (byte {block[start + err.start]:#04x} at offset "
                        f"{offset + start + err.start}); convert the file to UTF-8")
    return None


def parquet_problem(file: DataFile, field: str) -> str | None:
    """Why a Parquet corpus file cannot be read for `field` (its footer, its schema), or None."""
    import pyarrow.parquet as pq

    try:
        with file.fs.open_input_file(file.path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        return f"{file.uri}: not a readable Parquet file ({err})"
    if field not in schema.names:
        return f"{file.uri}: no column '{field}' (have {schema.names})"
    kind = schema.field(field).type
    return None if pa.types.is_string(kind) or pa.types.is_large_string(kind) else \
        f"{file.uri}: column '{field}' holds {kind}, not text"


def file_problem(spec: CorpusConfig, file: DataFile) -> str | None:
    """What keeps one file of a corpus from being read as its source says, or None."""
    return parquet_problem(file, spec.text_field) if spec.source == "parquet" else utf8_problem(file)


def jsonl_records(file: DataFile) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) of every non-blank line; a line that is not JSON is an error naming it."""
    for lineno, line in enumerate(text_lines(file), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file.uri}:{lineno}: invalid JSON ({err.msg})") from None


def _jsonl_texts(file: DataFile, field: str) -> Iterator[str]:
    for lineno, record in jsonl_records(file):
        if not isinstance(record, dict) or field not in record:
            have = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{file.uri}:{lineno}: field '{field}' not in the record (have {have})")
        yield record[field]


def _parquet_texts(file: DataFile, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    problem = parquet_problem(file, field)  # a damaged file or a missing column, named with its file
    if problem:
        raise DataError(problem)
    with file.fs.open_input_file(file.path) as f:
        parquet = pq.ParquetFile(f)
        for batch in parquet.iter_batches(columns=[field], batch_size=8192):
            yield from batch.column(0).to_pylist()


def _hub_texts(spec: CorpusConfig) -> Iterator[str]:
    import datasets  # heavy import, only on the hub path

    ds = datasets.load_dataset(spec.path, spec.config_name, split=spec.split, revision=spec.revision,
                               streaming=spec.streaming)
    for record in ds:
        if spec.text_field not in record:
            raise DataError(f"corpus {spec.name}: field '{spec.text_field}' not in records (have {sorted(record)})")
        yield record[spec.text_field]


def documents(spec: CorpusConfig) -> Iterator[str]:
    """The non-empty documents (lines of text files, records of jsonl/parquet/hub data) of a file or hub corpus,
    in file order, at most `max_documents` of them; read as a stream, never all at once."""
    if spec.source == "hf":
        texts = _hub_texts(spec)
    else:
        read = {"text": text_lines, "jsonl": lambda f: _jsonl_texts(f, spec.text_field),
                "parquet": lambda f: _parquet_texts(f, spec.text_field)}[spec.source]
        texts = (text for file in corpus_files(spec) for text in read(file))
    count = 0
    for text in texts:
        if text and text.strip():
            yield text
            count += 1
            if spec.max_documents is not None and count >= spec.max_documents:
                return
