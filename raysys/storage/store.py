"""The storage root of a study: results, content-addressed artifacts, mid-run checkpoints and Ray's own files.

A root is a local (or shared-filesystem) path, or any URI `pyarrow.fs` understands (`s3://bucket/prefix`,
`gs://…`, `file://…`). Whatever the backend, a reader sees a directory of the store ("committed directory":
an artifact, a checkpoint) either whole or not at all:

- on a local filesystem the directory is written under a temporary name and renamed;
- on an object store, where there is no rename, its files are uploaded first and a manifest
  (`.raysys-complete`, the file names, sizes and checksums) last: the manifest is the commit, and readers download
  exactly the files it names. A killed upload leaves no manifest, so the cell runs again.

Either way the manifest travels with the directory, and a directory whose files do not match it (truncated by a
full disk, edited, a deleted file, a bit flipped) is set aside into `quarantine/` and counts as missing
(raysys.storage.manifest), so the cell that made it runs again.

Single files (Parquet result files, the study config) are written whole: a temporary name and `os.replace`
locally; one object PUT, which object stores make visible only once complete, on a URI.

Workers need local files (HF `from_pretrained`, safetensors), so a remote store keeps a local read-through cache
of committed directories under `$RAYSYS_CACHE` (default `~/.cache/raysys`), one folder per storage URI. Committed
directories never change once written (artifacts are addressed by the hash of the config that made them,
checkpoints by step), so a cached copy is never stale.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raysys.storage import manifest
from raysys.storage.manifest import MANIFEST, CorruptArtifact, UnsafeManifest, manifest_files  # noqa: F401

QUARANTINE = "quarantine"


_SECRET_OPTION = re.compile(r"([?&])([^=&]*(?:key|secret|token|password|credential)[^=&]*)=([^&]*)", re.IGNORECASE)
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@?]*@", re.IGNORECASE)


def redact(uri: str) -> str:
    """A URI as it may be printed or stored: credentials in it (`s3://KEY:SECRET@bucket`, `?secret_key=…`,
    `access_key`, `session_token`, an account key or SAS token) replaced by `***`; anything else as given."""
    return _SECRET_OPTION.sub(lambda m: f"{m[1]}{m[2]}=***", _USERINFO.sub(r"\1***@", uri))


class Store:
    """`root` is what the user gave (an absolute path or the URI) and what workers are handed; `local` is the
    folder this process works in: the store itself when it is local, its cache when it is remote."""

    def __init__(self, root: str | os.PathLike):
        text = str(root)
        if "://" in text:
            try:
                self.fs, base = pafs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, OSError, ValueError) as err:
                first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(f"--storage '{redact(text)}': pyarrow.fs cannot open it ({first_line})") from err
            self.remote = not isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, base, self.remote = pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), False
        self.base = base.rstrip("/")
        if self.remote:
            self.root = text
            # Options ride in a URI's query (`?endpoint_override=…&region=…`): paths go before it.
            location, _, query = text.partition("?")
            self._location, self._query = location.rstrip("/"), f"?{query}" if query else ""
            self.local = cache_dir(self.root)
        else:
            self.root = self._location = self.base
            self._query = ""
            self.local = Path(self.base)

    def __repr__(self) -> str:
        return f"Store({self.shown!r})"

    @property
    def shown(self) -> str:
        """The root as messages, logs and stored tags name it: credentials redacted (`root` keeps them, for the
        workers that must open it)."""
        return redact(self.root)

    # ------------------------------------------------------------------------------------------ addressing

    def path(self, rel: str) -> str:
        """`rel` as a path in `self.fs`."""
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, rel: str = "", suffix: str = "") -> str:
        """`rel` as the user would name it, or with `suffix` a sibling of the root (`<root><suffix>`), for messages:
        credentials redacted."""
        return redact(f"{self._location}{suffix}{'/' + rel if rel else ''}{self._query}")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.base).type != pafs.FileType.NotFound

    def ensure_writable(self) -> None:
        """Fail before any work if the root cannot be created or written (a missing bucket, no credentials)."""
        try:
            self.fs.create_dir(self.base, recursive=True)
            self.write_bytes(".raysys-probe", b"ok")
            self.fs.delete_file(self.path(".raysys-probe"))
        except OSError as err:
            raise ValueError(f"--storage '{self.shown}' is not writable: {str(err).splitlines()[0]}") from err

    def ray_storage(self, sub: str) -> dict:
        """`storage_path` (and `storage_filesystem` for a URI) for a Tune or Train `RunConfig`."""
        if self.remote:
            return {"storage_path": self.path(f"ray/{sub}"), "storage_filesystem": self.fs}
        return {"storage_path": str(self.local / "ray" / sub)}

    # ---------------------------------------------------------------------------------------- single files

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content, or None if it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except OSError:
            if not self.is_file(rel):
                return None
            raise

    def write_bytes(self, rel: str, payload: bytes) -> None:
        """Readers see either nothing (or the previous version) or all of `payload`."""
        if not self.remote:
            atomic_write_bytes(Path(self.path(rel)), payload)
            return
        with self.fs.open_output_stream(self.path(rel)) as stream:
            stream.write(payload)

    def delete_file(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def list_files(self, rel: str, suffix: str = "") -> list[str]:
        """Names of the files directly in `rel` (none if it does not exist); temporary names are skipped."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                      and not i.base_name.startswith("."))

    # ---------------------------------------------------------------------------------- committed directories

    def has_dir(self, rel: str) -> bool:
        """Whether `rel` is committed (on a URI: its manifest is there) and, locally, its files have the sizes its
        manifest lists (a truncated or deleted file makes the directory missing; checksums are checked on use)."""
        if self.remote:
            return self.is_file(f"{rel}/{MANIFEST}")
        folder = self.local / rel
        return folder.is_dir() and manifest.verify(folder, full=False) is None

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the committed directories directly in `rel` (locally: every folder; `has_dir` checks one)."""
        if not self.remote:
            parent = self.local / rel
            return sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if parent.is_dir() else []
        prefix = self.path(rel) + "/"
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True))
        return sorted(i.path[len(prefix):].split("/")[0] for i in infos
                      if i.base_name == MANIFEST and i.path[len(prefix):].count("/") == 1)

    @contextmanager
    def writing_dir(self, rel: str):
        """Yield an empty local folder; when the block succeeds it becomes the committed directory `rel`, with a
        manifest of its files' sizes and checksums (if a concurrent identical writer committed it first, that copy
        is kept; a copy already there that fails its manifest is set aside and replaced); when it fails it is
        removed."""
        final = self.local / rel
        temp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        temp.mkdir(parents=True)
        try:
            yield temp
            listing = manifest.describe(temp)
            (temp / MANIFEST).write_bytes(manifest.encode(listing))
            if self.remote:
                if self.has_dir(rel) or not self._upload(temp, rel, listing):
                    return  # the store's copy wins; ours (in `finally`) goes, and the cache fetches theirs
            else:
                sync_tree(temp)  # the cache of a URI store can be fetched again; a local store is the only copy
                problem = manifest.verify(final, full=False) if final.is_dir() else None
                if problem:
                    self.set_aside(rel, problem)
            try:
                temp.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
            if not self.remote:
                sync_folder(final.parent)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    def fetch_dir(self, rel: str) -> Path:
        """The committed directory `rel` as a local folder (downloaded into the cache once, for a URI), its files
        checked against their checksums once per process. A directory that fails is set aside (CorruptArtifact):
        for every reader it is now missing, so whatever made it runs again."""
        local = self.local / rel
        if local.is_dir():
            problem = manifest.verify(local)
            if problem is None:
                return local
            if not self.remote:
                raise CorruptArtifact(f"{self.uri(rel)}: {problem}; set aside to {self.set_aside(rel, problem)}, "
                                      "so the cell that made it runs again")
            shutil.rmtree(local, ignore_errors=True)  # a spoiled cache copy: fetch it again
        if not self.remote:
            raise FileNotFoundError(f"{local}: not in the store")
        payload = self.read_bytes(f"{rel}/{MANIFEST}")
        if payload is None:
            raise FileNotFoundError(f"{self.uri(rel)}: not in the store")
        listing = manifest.parse(payload, self.uri(f"{rel}/{MANIFEST}"))
        temp = local.parent / f".tmp-{local.name}-{uuid.uuid4().hex[:8]}"
        temp.mkdir(parents=True)
        try:
            for name in listing["files"]:
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(self.path(f"{rel}/{name}"), str(temp / name), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            (temp / MANIFEST).write_bytes(payload)
            problem = manifest.content_problem(temp, listing)
            if problem:
                raise CorruptArtifact(f"{self.uri(rel)}: {problem}; set aside to {self.set_aside(rel, problem)}, "
                                      "so the cell that made it runs again")
            try:
                temp.rename(local)
            except OSError:
                if not local.is_dir():
                    raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return local

    def set_aside(self, rel: str, reason: str) -> str:
        """Move the committed directory `rel` into `quarantine/` (never delete: a person may want to look at it),
        with the reason beside it; returns where it went. On a URI its objects are copied there, then removed."""
        name = f"{rel.replace('/', '__')}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        target = f"{QUARANTINE}/{name}"
        if self.remote:
            pafs.copy_files(self.path(rel), self.path(target), source_filesystem=self.fs,
                            destination_filesystem=self.fs)
            self.remove_dir(rel)
        else:
            (self.local / QUARANTINE).mkdir(exist_ok=True)
            os.replace(self.local / rel, self.local / target)
        self.write_bytes(f"{QUARANTINE}/{name}.reason.txt", f"{rel}: {reason}\n".encode())
        print(f"raysys: {self.uri(rel)}: {reason}; set aside to {self.uri(target)}", file=sys.stderr, flush=True)
        return self.uri(target)

    def quarantined(self) -> int:
        """How many directories have been set aside so far."""
        return len(self.list_files(QUARANTINE, ".reason.txt"))

    def remove_dir(self, rel: str) -> None:
        """Remove `rel` (committed or not) from the store and from the local cache."""
        if self.remote:
            self.delete_file(f"{rel}/{MANIFEST}")  # first: a half-deleted directory must not look whole
            try:
                self.fs.delete_dir(self.path(rel))
            except FileNotFoundError:
                pass
        shutil.rmtree(self.local / rel, ignore_errors=True)

    def publish_dir(self, local: Path, rel: str) -> str:
        """Replace `rel` in a remote store by the files of `local` (a regenerated report); returns its URI."""
        try:
            self.fs.delete_dir(self.path(rel))
        except FileNotFoundError:
            pass
        pafs.copy_files(str(local), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        return self.uri(rel)

    def _upload(self, folder: Path, rel: str, listing: dict) -> bool:
        """Upload a folder, its manifest last; whether the manifest now in the store is ours (a second writer
        that raced us may have won: then its files, possibly mixed with ours, are what the checksums decide)."""
        for name in listing["files"]:
            pafs.copy_files(str(folder / name), self.path(f"{rel}/{name}"), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        payload = manifest.encode(listing)
        self.write_bytes(f"{rel}/{MANIFEST}", payload)
        return self.read_bytes(f"{rel}/{MANIFEST}") == payload

    def clean_temporaries(self) -> int:
        """Remove the `.tmp-*` files and folders writers killed mid-write left (in this process's folder: the store,
        or a URI's cache), Ray's own folder aside; returns how many. Only safe while no writer runs: the driver
        calls it once it holds the storage's lease, before any trial starts."""
        removed = 0
        for folder in self._temporary_homes():
            for entry in os.scandir(folder):
                if not entry.name.startswith(".tmp-"):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed += 1
        return removed

    def _temporary_homes(self) -> list[Path]:
        """Where temporaries can be: the root, each results table, each artifact kind, each cell's checkpoints."""
        homes = [self.local]
        for sub in ("results", "artifacts", "checkpoints", "configs", "studies", "report"):
            parent = self.local / sub
            if parent.is_dir():
                homes += [parent] + [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [home for home in homes if home.is_dir()]

    # ------------------------------------------------------------------------------------------- artifacts

    def has_artifact(self, kind: str, key: str) -> bool:
        return self.has_dir(f"artifacts/{kind}/{key}")

    def artifact(self, kind: str, key: str) -> Path:
        """The artifact's local folder (fetched into the cache for a URI); FileNotFoundError if it is missing."""
        return self.fetch_dir(f"artifacts/{kind}/{key}")

    def artifact_file(self, kind: str, key: str, name: str) -> bytes:
        """One file of an artifact, without fetching the rest (a PLM's config.json on the driver), checked against
        its checksum."""
        rel = f"artifacts/{kind}/{key}"
        payload = self.read_bytes(f"{rel}/{name}")
        if payload is None:
            raise FileNotFoundError(f"{self.artifact_uri(kind, key)}/{name}: not in the store")
        listed = self.read_bytes(f"{rel}/{MANIFEST}")
        digest = manifest.parse(listed, self.uri(f"{rel}/{MANIFEST}"))["sha256"].get(name) if listed else None
        if digest and hashlib.sha256(payload).hexdigest() != digest:
            problem = f"{name} does not match its checksum"
            raise CorruptArtifact(f"{self.uri(rel)}: {problem}; set aside to {self.set_aside(rel, problem)}")
        return payload

    def artifact_uri(self, kind: str, key: str) -> str:
        return self.uri(f"artifacts/{kind}/{key}")

    def writing_artifact(self, kind: str, key: str):
        return self.writing_dir(f"artifacts/{kind}/{key}")

    def results_path(self, table: str) -> str:
        """A result table's folder in `self.fs` (one Parquet file per cell)."""
        return self.path(f"results/{table}")


def cache_dir(root: str) -> Path:
    """Where a remote store's committed directories are cached on this machine."""
    base = Path(os.environ.get("RAYSYS_CACHE") or Path.home() / ".cache" / "raysys").expanduser()
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in redact(root).split("://", 1)[-1])[-48:]
    return base / f"{readable}-{hashlib.sha256(root.encode()).hexdigest()[:12]}"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so readers see either nothing or all of it, after a power loss too: the bytes reach the disk
    before the rename does (without the fsync a crash can leave the new name on a zero-length file). Temporary
    names start with '.', which `pyarrow.dataset` ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    with open(temp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make the renames and new names in `folder` durable (a directory's entries are flushed on its own fsync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder` and the folders themselves: a directory about to be renamed into place
    (a PLM, a checkpoint) must be whole on the disk first."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            sync_folder(path)
    sync_folder(folder)
