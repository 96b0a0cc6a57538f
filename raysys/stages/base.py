"""The stage protocol: what a stage of the study is, and the one rule for "is this cell done?".

A stage (torchtune's recipe, peft's tuner: one module following one small interface) says

- `plan(study, chain)`: its cells, typed (a frozen dataclass per kind of cell), each with the `cell_hash` of
  everything that determines its result;
- `outputs(cell)` and `inputs(cell)`: the rows and artifacts a cell leaves, and those it needs. A cell is *done*
  when all its outputs are in the store — its rows say ok *and* its artifacts are whole by their manifests
  (raysys.storage.manifest) — and *ready* when all its inputs are: one rule, used by the driver, progress,
  `raysys status` and `--dry-run` alike (`done`, `ready`; a stage with a finer rule overrides them). An artifact
  found spoiled when used is set aside, so the cell that made it is no longer done and runs again;
- `groups(cells)`: how cells share a trial; `resources(study)`: what a trial holds, from the stage's own config;
  `launcher`: which Ray pattern runs it ("grid": a Tune experiment over the groups; "chain": one Ray Train job
  walking the cells in order; "search": an Optuna search per group);
- `run(ctx, cell)`: compute one cell and write its outputs, knowing nothing of Ray.

Stage modules import the ML stack (torch, transformers) inside their run code only: planning and the done rule
serve `raysys status`, which reads a storage without loading torch or Ray.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raysys.config import StudyConfig, section_name
from raysys.stages.chain import ChainPlan
from raysys.storage import results
from raysys.storage.store import Store


class MissingInputError(RuntimeError):
    """A stage needs an artifact (outdated tuned weights, a PLM) that does not exist and will not be made."""


# ------------------------------------------------------------------------------------------- outputs, inputs


@dataclass(frozen=True)
class Rows:
    """A cell's rows in a result table: those whose `cell_hash` is `key`, in the file `file` (default: `key`;
    the cells of one interpolation path share their pair's file)."""

    table: str
    key: str
    file: str | None = None


@dataclass(frozen=True)
class Artifact:
    """A committed artifact directory `artifacts/<kind>/<key>/`."""

    kind: str
    key: str


Output = Rows | Artifact


class View:
    """What the store holds, as the done and ready rules ask it. `scan=True` reads each table whole once and lists
    each artifact kind once (the driver, progress and status ask about thousands of cells); `scan=False` reads only
    the files asked about (a trial checking its own few cells)."""

    def __init__(self, store: Store, scan: bool = True):
        self.store, self.scan = store, scan
        self._statuses: dict[str, dict[str, set[str]]] = {}
        self._artifacts: dict[str, set[str]] = {}
        self._rows: dict[str, list[dict]] = {}
        self._by_cell: dict[str, dict[str | None, list[dict]]] = {}
        self._given_up: dict[tuple[str, int], set[str]] = {}

    def _status(self, out: Rows, status: str) -> bool:
        if self.scan:
            if out.table not in self._statuses:
                self._statuses[out.table] = results.cell_statuses(self.store, out.table)
            return out.key in self._statuses[out.table].get(status, set())
        return any(r["cell_hash"] == out.key and r["status"] == status
                   for r in results.read_cell(self.store, out.table, out.file or out.key))

    def present(self, out: Output) -> bool:
        if isinstance(out, Rows):
            return self._status(out, "ok")
        if not self.scan:
            return self.store.has_artifact(out.kind, out.key)
        if out.kind not in self._artifacts:
            self._artifacts[out.kind] = set(self.store.list_dirs(f"artifacts/{out.kind}"))
        # listed, and (locally) its files have their manifest's sizes: a stat per file
        return out.key in self._artifacts[out.kind] and (self.store.remote or self.store.has_artifact(out.kind, out.key))

    def failed(self, out: Output) -> bool:
        return isinstance(out, Rows) and self._status(out, "failed")

    def given_up(self, out: Output, after: int) -> bool:
        """Its row failed the same way `after` tries in a row."""
        if not isinstance(out, Rows):
            return False
        if not self.scan:
            return any(r["cell_hash"] == out.key and r["status"] == "failed" and (r["repeated_failures"] or 0) >= after
                       for r in results.read_cell(self.store, out.table, out.file or out.key))
        if (out.table, after) not in self._given_up:
            self._given_up[out.table, after] = results.given_up(self.store, out.table, after)
        return out.key in self._given_up[out.table, after]

    def all_rows(self, table: str) -> list[dict]:
        """Every row of a table, whatever its status (read once)."""
        if table not in self._rows:
            self._rows[table] = results.read_table(self.store, table).to_pylist()
        return self._rows[table]

    def ok_rows(self, table: str) -> list[dict]:
        return self._ok_by_cell(table)[None]

    def rows_of(self, table: str, key: str) -> list[dict]:
        """The ok rows of one cell (whose rows are in the file named by its hash)."""
        if not self.scan:
            return [r for r in results.read_cell(self.store, table, key) if r["status"] == "ok"]
        return self._ok_by_cell(table).get(key, [])

    def _ok_by_cell(self, table: str) -> dict[str | None, list[dict]]:
        """cell hash -> its ok rows, and None -> all of them."""
        if table not in self._by_cell:
            ok = [r for r in self.all_rows(table) if r.get("status", "ok") == "ok"]
            self._by_cell[table] = {None: ok}
            for row in ok:
                self._by_cell[table].setdefault(row["cell_hash"], []).append(row)
        return self._by_cell[table]


# ------------------------------------------------------------------------------------------------ context


@dataclass
class Workers:
    """A stage run by several processes at once (Ray Train): this process's rank, how many there are, how the
    model is wrapped for data parallelism, and how the processes wait for each other and report."""

    rank: int = 0
    world_size: int = 1
    wrap: Callable = lambda model: model
    barrier: Callable[[], None] = lambda: None
    report: Callable[[dict], None] = lambda metrics: None


@dataclass
class Context:
    """What a stage's run code is given: the study, its store and chain, the device of this trial, how to
    checkpoint a training cell (`checkpointer(cell_hash, every_seconds)`, or None outside Ray) and, for a chain
    stage, its workers. Built once per trial by the Ray edge (or by a test)."""

    study: StudyConfig
    store: Store
    chain: ChainPlan
    device: Any = "cpu"
    checkpointer: Callable[[str, float], Any] = lambda cell_hash, every_seconds: None
    workers: Workers = field(default_factory=Workers)


@dataclass(frozen=True)
class Resources:
    """What one trial holds: CPUs and GPUs (a fraction below 1 shares a GPU), or, with `workers`, a Ray Train job
    of that many workers each holding them. `threads` is what torch may use in one process."""

    cpus: float
    gpus: float = 0.0
    workers: int = 0
    worker_resource: str = ""  # a custom resource each Train worker asks one unit of (pretrain.worker_resource)
    settings: str = field(default="", compare=False)  # the config fields that ask this, for messages

    @classmethod
    def per_trial(cls, section) -> Resources:
        """What a stage config section with `cpus_per_trial` and `gpus_per_trial` reserves for one trial."""
        name = section_name(section)
        return cls(section.cpus_per_trial, section.gpus_per_trial,
                   settings=f"{name}.cpus_per_trial, {name}.gpus_per_trial")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


# ------------------------------------------------------------------------------------------------- stages


class Stage:
    """The base of every stage; see the module docstring. Subclasses set the class attributes and implement
    `plan`, `outputs`, `resources` and `run`."""

    name: str
    tables: tuple[str, ...]  # the result tables it writes
    cell_types: tuple[type, ...]  # the dataclasses of its cells
    launcher: str = "grid"
    # Evaluation-only cells, each shorter than a Tune trial's own cost (~0.4 s on 2 cores): the grid launcher runs
    # several in one trial (raysys.sweep.launchers.trial_groups). Only for stages whose cells are independent
    # (the base `run_group`).
    light: bool = False

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list:
        raise NotImplementedError

    def outputs(self, cell) -> tuple[Output, ...]:
        raise NotImplementedError

    def inputs(self, cell) -> tuple[Output, ...]:
        return ()

    def done(self, cell, view: View) -> bool:
        return all(view.present(out) for out in self.outputs(cell))

    def failed(self, cell, view: View) -> bool:
        """Not done, and its last attempt recorded an error (the next run retries it)."""
        return not self.done(cell, view) and any(view.failed(out) for out in self.outputs(cell))

    def given_up(self, cell, view: View, after: int) -> bool:
        """Not done, and failed the same way `after` tries in a row: the driver leaves it until `--retry-failed`."""
        return not self.done(cell, view) and any(view.given_up(out, after) for out in self.outputs(cell))

    def ready(self, cell, view: View) -> bool:
        return all(view.present(inp) for inp in self.inputs(cell))

    def groups(self, cells: list) -> list[list]:
        """How cells share a trial: one each by default."""
        return [[cell] for cell in cells]

    def resources(self, study: StudyConfig) -> Resources:
        raise NotImplementedError

    def check(self, study: StudyConfig, store: Store, chain: ChainPlan, cells: list, selected: tuple[str, ...]) -> None:
        """Refuse, before this stage launches any of its `cells`, what would fail every trial (`selected`: the
        stages this run includes). Every stage consumes PLMs, so by default: the chain's checkpoints can be
        recycled between."""
        from raysys.stages.chain import preflight

        preflight(study, store, chain)

    def train_tokens(self, study: StudyConfig, cell) -> int:
        """Tokens a cell trains on (the `--dry-run` compute estimate); 0 for evaluation-only cells."""
        return 0

    def eval_passes(self, study: StudyConfig, cell) -> dict[str, int]:
        """Forward passes a cell makes over each split of its task ({"dev": n, "test": m}) outside training (the
        `--dry-run` evaluation estimate, for the stages that only evaluate); none by default."""
        return {}

    def plan_note(self, study: StudyConfig, cells: list) -> str:
        """A remark beside the stage's line in the `--dry-run` plan."""
        return ""

    def prepare(self, ctx: Context, cells: list) -> None:
        """Work a group needs done once, in one process, before its workers start (a chain stage: the trial that
        fits the Train job calls it before the job; the workers find it done). None by default."""

    def run(self, ctx: Context, cell) -> None:
        raise NotImplementedError

    def run_group(self, ctx: Context, cells: list) -> int:
        """Run a trial's cells, skipping those already done (a trial Tune retries after its process died keeps the
        cells it finished); a failing cell is recorded and the others go on. Returns how many are done."""
        view = View(ctx.store, scan=False)
        return sum(self.done(cell, view) or run_guarded(ctx, self, cell, lambda c=cell: self.run(ctx, c))
                   for cell in cells)

    def failure_columns(self, study: StudyConfig, cell, table: str) -> dict:
        """The columns a failed row of `cell` carries beside the error: the cell's fields the table has."""
        return cell_columns(cell, table)

    # ------------------------------------------------------------------------------- cells <-> trial configs

    def encode(self, cell) -> dict:
        """A cell as plain values for a Tune trial's config."""
        return {"kind": type(cell).__name__, **dataclasses.asdict(cell)}

    def decode(self, payload: dict):
        kinds = {cls.__name__: cls for cls in self.cell_types}
        values = dict(payload)
        return kinds[values.pop("kind")](**values)


def cell_columns(cell, table: str) -> dict:
    """The fields of `cell` that are columns of `table` (its hash aside: rows get it from their file's key)."""
    names = set(results.SCHEMAS[table].names)
    return {k: v for k, v in dataclasses.asdict(cell).items() if k in names and k != "cell_hash"}


def error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"


def write_failure(store: Store, study: StudyConfig, stage: Stage, cell, started, error: str) -> None:
    """A `failed` row for `cell` in its first table, carrying the error: the cell runs again next time."""
    out = next(o for o in stage.outputs(cell) if isinstance(o, Rows))
    row = {**results.provenance(started, "failed", error), **stage.failure_columns(study, cell, out.table)}
    results.write_rows(store, out.table, out.key, [row])


def run_guarded(ctx: Context, stage: Stage, cell, fn: Callable[[], None]) -> bool:
    """Run one cell; on failure record its error and go on (any failure of a cell is data, not a crash)."""
    started = results.now()
    try:
        fn()
        return True
    except Exception as err:  # noqa: BLE001 — recorded per cell, not fatal to the sweep
        write_failure(ctx.store, ctx.study, stage, cell, started, error_text(err))
        return False


def hashes(cells) -> set[str]:
    return {cell.cell_hash for cell in cells}
