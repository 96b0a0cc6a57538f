"""A committed directory's manifest, `.raysys-complete`: the name, size and SHA-256 of each of its files.

It is what makes a directory of the store trustworthy. On an object store its upload is the commit (readers
download exactly the files it names); everywhere it is how a reader tells a whole directory from one a crash, a
full disk, a half-finished copy or a second writer spoiled: sizes are checked whenever the store is scanned (a
`stat` per file), checksums once per process before the files are used. A directory that fails is set aside and
counts as missing, so the cell that made it runs again.

    {"files": {"model.safetensors": 497774208, "config.json": 681},
     "sha256": {"model.safetensors": "9f2c…", "config.json": "4be1…"}}

Manifests written before checksums existed have `files` only; a local directory written before manifests
existed has none, and is trusted as whole (it was renamed into place complete).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = ".raysys-complete"
_CHUNK = 1 << 20


class UnsafeManifest(ValueError):
    """A directory's manifest names a file outside that directory."""


class CorruptArtifact(FileNotFoundError):
    """A committed directory whose files are not what its manifest says. It has been set aside: the cell that made
    it runs again (a FileNotFoundError, because for every reader it is now missing)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(folder: Path) -> dict:
    """The manifest of a folder about to be committed: every file under it but the manifest itself."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    names = [p.relative_to(folder).as_posix() for p in files]
    return {"files": {n: p.stat().st_size for n, p in zip(names, files)},
            "sha256": {n: sha256_file(p) for n, p in zip(names, files)}}


def encode(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True).encode()


def parse(payload: bytes, where: str) -> dict:
    """A manifest checked for safety: each name a plain relative path inside its directory (whoever can write to a
    bucket must not be able to make a node write elsewhere: `../`, an absolute path, a drive or a backslash would
    reach site-packages or ~/.ssh when the directory is fetched), each size a byte count, each checksum hex."""
    try:
        manifest = json.loads(payload)
        files, digests = manifest["files"], manifest.get("sha256", {})
        if not isinstance(files, dict) or not isinstance(digests, dict):
            raise TypeError("files and sha256 must be tables")
    except (ValueError, KeyError, TypeError) as err:
        raise UnsafeManifest(f"{where}: not a manifest ({err})") from None
    for name, size in files.items():
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name or ":" in parts[0] or "\0" in name
                or any(part in ("", ".", "..") for part in parts)):
            raise UnsafeManifest(f"{where}: the file name {name!r} is not a plain relative path inside its folder")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnsafeManifest(f"{where}: the size of {name!r} is {size!r}, not a byte count")
    for name, digest in digests.items():
        if name not in files or not isinstance(digest, str) or len(digest) != 64 or \
                any(c not in "0123456789abcdef" for c in digest):
            raise UnsafeManifest(f"{where}: the checksum of {name!r} is {digest!r}, not a SHA-256 of a listed file")
    return {"files": files, "sha256": digests}


def manifest_files(payload: bytes, where: str) -> dict[str, int]:
    """The files a manifest lists (name -> size), checked as `parse` checks them."""
    return parse(payload, where)["files"]


def read(folder: Path) -> dict | None:
    """A local folder's manifest, or None when it has none (written before manifests existed)."""
    path = folder / MANIFEST
    return parse(path.read_bytes(), str(path)) if path.is_file() else None


def size_problem(folder: Path, manifest: dict) -> str | None:
    """What is wrong with a folder's files by their sizes alone (missing, truncated, grown), or None."""
    for name, size in manifest["files"].items():
        try:
            actual = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, its manifest says {size}"
    return None


def content_problem(folder: Path, manifest: dict) -> str | None:
    """What is wrong with a folder's files by size and checksum, or None."""
    problem = size_problem(folder, manifest)
    if problem:
        return problem
    for name, digest in manifest["sha256"].items():
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its checksum (the manifest's {digest[:12]}…)"
    return None


_VERIFIED: dict[str, tuple] = {}


def _signature(folder: Path, manifest: dict) -> tuple:
    """What a verified folder looked like: a change of any file's size or time means hashing it again."""
    stats = [os.stat(folder / name) for name in manifest["files"]]
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def verify(folder: Path, full: bool = True) -> str | None:
    """None when a committed local folder is whole (by checksums when `full`, else by sizes), else what is wrong.
    Full verification is remembered per process while the files keep their sizes and times: a worker loading one
    PLM for forty cells hashes it once."""
    manifest = read(folder)
    if manifest is None:
        return None
    if not full:
        return size_problem(folder, manifest)
    key = str(folder)
    try:
        if _VERIFIED.get(key) == _signature(folder, manifest):
            return None
    except FileNotFoundError:
        pass
    problem = content_problem(folder, manifest)
    if problem is None:
        _VERIFIED[key] = _signature(folder, manifest)
    else:
        _VERIFIED.pop(key, None)
    return problem
