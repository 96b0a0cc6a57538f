"""The storage root of a study: results, content-addressed artifacts, mid-run checkpoints and Ray's own files.

A root is a local (or shared-filesystem) path, or any URI `pyarrow.fs` understands (`s3://bucket/prefix`,
`gs://…`, `file://…`). Whatever the backend, a reader sees a directory of the store ("committed directory":
an artifact, a checkpoint) either whole or not at all:

- on a local filesystem the directory is written under a temporary name and renamed;
- on an object store, where there is no rename, its files are uploaded first and a manifest
  (`.raysys-complete`, the file names and sizes) last: the manifest is the commit, and readers download exactly the
  files it names. A killed upload leaves no manifest, so the cell runs again.

Single files (Parquet result files, the study config) are written whole: a temporary name and `os.replace`
locally; one object PUT, which object stores make visible only once complete, on a URI.

Workers need local files (HF `from_pretrained`, safetensors), so a remote store keeps a local read-through cache
of committed directories under `$RAYSYS_CACHE` (default `~/.cache/raysys`), one folder per storage URI. Committed
directories never change once written (artifacts are addressed by the hash of the config that made them,
checkpoints by step), so a cached copy is never stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

MANIFEST = ".raysys-complete"


_SECRET_OPTION = re.compile(r"([?&])([^=&]*(?:key|secret|token|password|credential)[^=&]*)=([^&]*)", re.IGNORECASE)
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@?]*@", re.IGNORECASE)


def redact(uri: str) -> str:
    """A URI as it may be printed or stored: credentials in it (`s3://KEY:SECRET@bucket`, `?secret_key=…`,
    `access_key`, `session_token`, an account key or SAS token) replaced by `***`; anything else as given."""
    return _SECRET_OPTION.sub(lambda m: f"{m[1]}{m[2]}=***", _USERINFO.sub(r"\1***@", uri))


class UnsafeManifest(ValueError):
    """A directory's manifest names a file outside that directory."""


def manifest_files(manifest: bytes, where: str) -> dict[str, int]:
    """The files a manifest lists (name -> size), each a plain relative path inside its directory: whoever can
    write to a bucket must not be able to make a node write elsewhere (`../`, an absolute path, a drive or a
    backslash would reach site-packages or ~/.ssh when the directory is fetched)."""
    try:
        files = json.loads(manifest)["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise UnsafeManifest(f"{where}: not a manifest ({err})") from None
    for name, size in files.items():
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name or ":" in parts[0] or "\0" in name
                or any(part in ("", ".", "..") for part in parts)):
            raise UnsafeManifest(f"{where}: the file name {name!r} is not a plain relative path inside its folder")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsafeManifest(f"{where}: the size of {name!r} is {size!r}, not a byte count")
    return files


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
        if self.remote:
            return self.is_file(f"{rel}/{MANIFEST}")
        return (self.local / rel).is_dir()

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the committed directories directly in `rel`."""
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
        """Yield an empty local folder; when the block succeeds it becomes the committed directory `rel` (if a
        concurrent identical writer committed it first, that copy is kept — and, on a URI, fetched into the cache
        in place of ours when asked for); when it fails it is removed."""
        final = self.local / rel
        temp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        temp.mkdir(parents=True)
        try:
            yield temp
            if self.remote:
                if self.has_dir(rel):
                    return  # the store's copy wins; ours (in `finally`) goes
                self._upload(temp, rel)
            else:
                sync_tree(temp)  # the cache of a URI store can be fetched again; a local store is the only copy
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
        """The committed directory `rel` as a local folder (downloaded into the cache once, for a URI)."""
        local = self.local / rel
        if local.is_dir():
            return local
        if not self.remote:
            raise FileNotFoundError(f"{local}: not in the store")
        manifest = self.read_bytes(f"{rel}/{MANIFEST}")
        if manifest is None:
            raise FileNotFoundError(f"{self.uri(rel)}: not in the store")
        files = manifest_files(manifest, self.uri(f"{rel}/{MANIFEST}"))
        temp = local.parent / f".tmp-{local.name}-{uuid.uuid4().hex[:8]}"
        temp.mkdir(parents=True)
        try:
            for name, size in files.items():
                (temp / name).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(self.path(f"{rel}/{name}"), str(temp / name), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                if (temp / name).stat().st_size != size:
                    raise OSError(f"{self.uri(f'{rel}/{name}')}: {(temp / name).stat().st_size} bytes, "
                                  f"its manifest says {size}")
            try:
                temp.rename(local)
            except OSError:
                if not local.is_dir():
                    raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return local

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

    def _upload(self, folder: Path, rel: str) -> None:
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        pafs.copy_files(str(folder), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        self.write_bytes(f"{rel}/{MANIFEST}", json.dumps({"files": files}).encode())

    # ------------------------------------------------------------------------------------------- artifacts

    def has_artifact(self, kind: str, key: str) -> bool:
        return self.has_dir(f"artifacts/{kind}/{key}")

    def artifact(self, kind: str, key: str) -> Path:
        """The artifact's local folder (fetched into the cache for a URI); FileNotFoundError if it is missing."""
        return self.fetch_dir(f"artifacts/{kind}/{key}")

    def artifact_file(self, kind: str, key: str, name: str) -> bytes:
        """One file of an artifact, without fetching the rest (a PLM's config.json on the driver)."""
        payload = self.read_bytes(f"artifacts/{kind}/{key}/{name}")
        if payload is None:
            raise FileNotFoundError(f"{self.artifact_uri(kind, key)}/{name}: not in the store")
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
