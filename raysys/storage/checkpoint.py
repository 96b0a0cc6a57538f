"""Mid-run checkpoints of long cells (a PLM link, a tuning run): the whole training state — weights, optimizer,
scheduler, data position, random generators, the curve so far — so that an interrupted cell continues where it
stopped and ends exactly where an uninterrupted run would have (on CPU).

The state is stored as safetensors (every tensor) plus JSON (everything else), never as a pickle: loading a
checkpoint from shared storage must not be able to run code. A checkpoint is the committed directory
`<storage>/checkpoints/<cell hash>/step-<n>/` of the store (whole or absent, on a local path or a URI); only the
newest is kept, and the cell's folder goes when the cell's result exists.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raysys.storage.store import Store

TENSORS, SKELETON = "state.safetensors", "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# --------------------------------------------------------------------------------- state <-> tensors + JSON


def flatten(obj, tensors: dict[str, torch.Tensor], path: str = "t"):
    """Replace every tensor in a nested structure of dicts, lists and JSON scalars by a reference into `tensors`.
    Dicts with non-string keys (an optimizer's per-parameter state) are kept as lists of pairs."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__pairs__": [[k, flatten(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} at {path}")


def unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__pairs__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__pairs__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_state(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    save_file(tensors, str(directory / TENSORS))
    (directory / SKELETON).write_text(json.dumps(skeleton))


def load_state(directory: Path) -> dict:
    tensors = load_file(str(directory / TENSORS))
    return unflatten(json.loads((directory / SKELETON).read_text()), tensors)


# ------------------------------------------------------------------------------------------- per-cell folder


def cell_folder(key: str) -> str:
    return f"checkpoints/{key}"


def latest(store: Store, key: str) -> Path | None:
    """The newest complete checkpoint of a cell, as a local folder."""
    steps = [name for name in store.list_dirs(cell_folder(key)) if _STEP_DIR.match(name)]
    return store.fetch_dir(f"{cell_folder(key)}/{max(steps)}") if steps else None


def write(store: Store, key: str, step: int, state: dict) -> Path:
    """Save `state` as the cell's checkpoint at `step`, then drop the older ones. A retried run that reaches the
    same step again keeps the copy already there (same content)."""
    name = f"step-{step:09d}"
    rel = f"{cell_folder(key)}/{name}"
    if not store.has_dir(rel):
        with store.writing_dir(rel) as temp:
            save_state(temp, state)
    for older in store.list_dirs(cell_folder(key)):
        if _STEP_DIR.match(older) and older < name:
            store.remove_dir(f"{cell_folder(key)}/{older}")
    return store.fetch_dir(rel)


class Checkpointer:
    """What a training loop is given to checkpoint with: `resume()` returns the saved state (or None), `due()`
    says whether to save now, `save(step, state, metrics)` saves, `report(metrics)` passes progress on (to Tune,
    or nowhere), `done()` removes the checkpoints once the cell's result is stored.

    `every_seconds` bounds the work an interruption can lose; 0 saves at every evaluation. The store is the only
    place a checkpoint lives: Ray is told the metrics (`on_save(metrics, path)`, `on_report(metrics)`, which
    connect it to Tune or Train without this module importing Ray) but never handed the folder, because a copy
    in Ray's trial folders is written a second time, kept after the cell finishes (about 1.5 GB per fine-tuning
    cell at paper scale) and is never the newer one."""

    def __init__(self, store: Store, every_seconds: float, cell_hash: str,
                 on_save: Callable[[dict, Path], None] | None = None,
                 on_report: Callable[[dict], None] | None = None):
        self.store, self.every_seconds, self.cell_hash = store, every_seconds, cell_hash
        self.on_save, self.on_report = on_save, on_report
        self.last_save = time.time()
        self.saves = 0
        self.resumed_from: int | None = None  # the step `resume()` found a checkpoint of

    def resume(self) -> dict | None:
        """The newest checkpoint's state, or None. One that cannot be read (spoiled files, a state from other
        code) is set aside and the cell starts over: losing a checkpoint costs time, a crash would block the
        cell for good."""
        try:
            state = self._load(latest(self.store, self.cell_hash))
        except FileNotFoundError:  # CorruptArtifact included: set aside already
            state = None
        except Exception as err:  # noqa: BLE001 — whatever the reader raised, the checkpoint is unusable
            steps = [n for n in self.store.list_dirs(cell_folder(self.cell_hash)) if _STEP_DIR.match(n)]
            self.store.set_aside(f"{cell_folder(self.cell_hash)}/{max(steps)}",
                                 f"unreadable checkpoint ({type(err).__name__}: {err}); the cell starts over")
            state = None
        self.resumed_from = state["step"] if state else None
        return state

    def _load(self, directory: Path | None) -> dict | None:
        if directory is None or not (directory / SKELETON).is_file():
            return None
        state = load_state(directory)
        return state if state.get("cell_hash") == self.cell_hash else None

    def due(self) -> bool:
        return time.time() - self.last_save >= self.every_seconds

    def save(self, step: int, state: dict, metrics: dict) -> Path:
        path = write(self.store, self.cell_hash, step, {**state, "cell_hash": self.cell_hash, "step": step})
        self.last_save = time.time()
        self.saves += 1
        if self.on_save:
            self.on_save(metrics, path)
        return path

    def report(self, metrics: dict) -> None:
        if self.on_report:
            self.on_report(metrics)

    def done(self) -> None:
        self.store.remove_dir(cell_folder(self.cell_hash))
