"""The rows of one study: what the report, its findings and figures read.

A storage can hold the rows of several studies (a rerun with `--set tuning.lr=...` into the same `--storage` adds
its cells beside the old ones), and a table read whole would average them as if they were seeds. The study's plan
names its cells, so its rows are those whose key one of its cells plans: the `cell_hash` of a `Rows` output for
most tables, the run's hash for a curve (a curve is keyed like its run), the search's hash for an Optuna trial
(trials are proposed as the search goes, so only their search is planned). Planning reads no torch and no Ray.
"""

from __future__ import annotations

import copy
from collections import defaultdict

from raysys.config import StudyConfig
from raysys.identity import study_identity
from raysys.report.status import plans
from raysys.stages.base import Rows
from raysys.stages.registry import STAGES
from raysys.storage import results
from raysys.storage.store import Store
from raysys.storage.study import STUDY_FILE, StudyVersion, current_version, study_versions, version_of

CURVES = {"pretrain_curves": "pretrain_runs", "tuning_curves": "tuning_runs", "methods_curves": "methods_runs"}
# Tables whose rows name their planned cell in another column than `cell_hash`, and the stage planning it.
KEY_COLUMN = {"methods_search": ("search_hash", "search")}


def planned_keys(study: StudyConfig, seed: int | None = None) -> dict[str, set[str]]:
    """Per result table, the keys of the rows the study plans (on the main chain of `seed` alone, if given)."""
    planned, keys = plans(study, seed), defaultdict(set)
    for stage in STAGES:
        for cell in planned[stage.name]:
            for out in stage.outputs(cell):
                if isinstance(out, Rows):
                    keys[out.table].add(out.key)
    for table, (_, stage_name) in KEY_COLUMN.items():
        keys[table] |= {cell.cell_hash for cell in planned[stage_name]}
    for curve, run in CURVES.items():
        keys[curve] = keys[run]
    return {table: keys[table] for table in results.SCHEMAS}


def _key(table: str, row: dict) -> str:
    return row[KEY_COLUMN.get(table, ("cell_hash",))[0]]


class StudyRows:
    """The result rows of `study` in `store`; `everything=True`: every row of the storage, whatever study made it
    (`raysys report --all`). Each table is read once.

    A study that replicates its main chain (`pretrain.replicate_seeds`) has one set of rows per chain, alike in
    every column but the PLMs' hashes: these are the rows of one chain, the main one (`pretrain.seed`) unless
    `seed` names a replicate, so that no table averages two chains' cells as if they were tuning seeds."""

    def __init__(self, study: StudyConfig, store: Store, everything: bool = False, seed: int | None = None):
        self.study, self.store, self.everything = study, store, everything
        self.seed = study.pretrain.seed if seed is None else seed
        self.keys = planned_keys(study, self.seed)
        # every chain's: what counts as this study's rather than another's
        self.study_keys = planned_keys(study) if study.pretrain.replicate_seeds else self.keys
        self.versions = study_versions(store)
        self.version: StudyVersion | None = version_of(study, store, self.versions)
        self._all: dict[str, list[dict]] = {}

    def chain(self, seed: int) -> StudyRows:
        """The rows of this study's main chain of `seed` (a replicate's), sharing the tables read so far."""
        other = copy.copy(self)  # the study's versions and every chain's keys are the same: not read again
        other.seed, other.keys = seed, planned_keys(self.study, seed)
        return other

    def all_rows(self, table: str) -> list[dict]:
        """Every row of the table in the storage, any study, any status."""
        if table not in self._all:
            self._all[table] = results.read_table(self.store, table).to_pylist()
        return self._all[table]

    def rows(self, table: str) -> list[dict]:
        """The table's rows of this study (any status)."""
        if self.everything:
            return self.all_rows(table)
        keys = self.keys[table]
        return [r for r in self.all_rows(table) if _key(table, r) in keys]

    def ok_rows(self, table: str) -> list[dict]:
        """The rows of this study whose cell succeeded (tables without a status column: every row)."""
        return [r for r in self.rows(table) if r.get("status", "ok") == "ok"]

    def cells_found(self) -> tuple[int, int]:
        """(planned result cells with ok rows, planned result cells), over the run tables (curves go with their
        runs and are not counted again)."""
        found = total = 0
        for table, keys in self.study_keys.items():
            if table not in CURVES:
                have = {_key(table, r) for r in self.all_rows(table) if r.get("status", "ok") == "ok"}
                found, total = found + len(keys & have), total + len(keys)
        return found, total

    def others(self) -> int:
        """Ok rows of the run tables that are not this study's: what the report leaves out (curve points not
        counted: they go with their runs)."""
        return sum(1 for table, keys in self.study_keys.items() if table not in CURVES for r in self.all_rows(table)
                   if r.get("status", "ok") == "ok" and _key(table, r) not in keys)

    def describe(self) -> list[str]:
        """Which rows these are, for the report's head: the study, its version and identity, how much of its plan
        has rows, and what is left out and how to see it."""
        found, total = self.cells_found()
        others = self.others()
        if self.everything:
            rows = (f"This report shows every row of the storage (--all), {others} of them from other studies: cells "
                    "of different configurations are averaged together as if they were seeds.")
        elif others:
            rows = (f"{others} result rows of other studies in this storage (other versions, or cells a changed "
                    f"config no longer plans) are left out: `raysys report {self.store.shown} --all` shows every "
                    "row, `--version N` the cells of version N.")
        else:
            rows = "The storage holds no rows of other studies."
        study = (f"Study '{self.study.name}', {self._version()}: {found} of its {total} planned result cells have "
                 "rows.")
        replicates = self.study.pretrain.replicate_seeds
        if replicates and not self.everything:
            study += (f" Its tables and findings are those of the main chain of seed {self.seed}; the replicate chains "
                      f"(pretrain.replicate_seeds = {list(replicates)}) are judged each alone, side by side under "
                      "'PLM-seed replication'.")
        return [study, rows]

    def _version(self) -> str:
        where = f"`{self.store.shown}`"
        if self.version is None:
            why = (f"not among its {len(self.versions)} recorded versions" if self.versions
                   else "which records no versions yet: last started before they were kept")
            return f"identity {study_identity(self.study)[:12]}, in {where} ({why})"
        current = current_version(self.store, self.versions) if self.store.is_file(STUDY_FILE) else None
        now = "the current one" if current == self.version else \
            f"the current one is version {current.number}" if current else "none is current"
        return (f"version {self.version.number} of {len(self.versions)} in {where} (identity "
                f"{self.version.identity[:12]}; {now})")
