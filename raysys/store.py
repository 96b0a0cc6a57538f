"""The content-addressed artifact store: `<root>/artifacts/<kind>/<hash>/`, written under a temporary name and
renamed when complete, so a directory that exists is always whole and rerunning is safe."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


class Store:
    """A storage root shared by the driver and every worker (a local path, or a shared filesystem mount on a
    cluster). Results live under `results/`, artifacts under `artifacts/`, Ray's own files under `ray/`."""

    def __init__(self, root: str | os.PathLike):
        if "://" in str(root):
            raise ValueError(f"--storage: '{root}' is a URI; this version needs a local or shared-filesystem path")
        self.root = Path(root).expanduser().resolve()

    def artifact_path(self, kind: str, key: str) -> Path:
        return self.root / "artifacts" / kind / key

    def has_artifact(self, kind: str, key: str) -> bool:
        return self.artifact_path(kind, key).is_dir()

    @contextmanager
    def writing_artifact(self, kind: str, key: str):
        """Yield a temporary directory; on success it becomes the artifact (an artifact that appeared meanwhile,
        written by a concurrent identical cell, wins and the temporary copy is dropped); on failure it is removed."""
        final = self.artifact_path(kind, key)
        temp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        temp.mkdir(parents=True)
        try:
            yield temp
            try:
                temp.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    def checkpoint_dir(self, key: str) -> Path:
        """Mid-run checkpoints of an unfinished cell (raysys.checkpoint); removed when the cell completes."""
        return self.root / "checkpoints" / key

    def results_dir(self, table: str) -> Path:
        return self.root / "results" / table

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so readers see either nothing or all of it. Temporary names start with '.', which
    `pyarrow.dataset` ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    temp.write_bytes(payload)
    os.replace(temp, path)
