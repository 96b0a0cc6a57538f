"""Stage `search` (`--search optuna`): instead of the methods' T × a × β grid, a seeded Optuna TPE search inside
each grid cell — upgrade × task × tuning type × regime × seed × method — over the learning rate (log-uniform,
every method) and T, a, β (uniform, the distilling methods), `methods.search.trials` runs each, maximising dev
accuracy.
The fixed-lr reference (vanilla) runs of the methods stage are what convergence is measured against.

A search is a cell; its trials are cells of `methods_search` (a trial's hash comes from the knobs Optuna proposed,
so trials cannot be planned ahead). A search is done once it has its budget of finished trials; a larger budget
continues it (Optuna is told the finished trials and runs only the rest).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raysys.config import RECYCLING_METHODS, StudyConfig
from raysys.identity import config_hash
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage, View, run_guarded
from raysys.stages.chain import ChainPlan
from raysys.stages.methods import (
    MethodCell,
    MethodSetting,
    method_tuning_config,
    plan_methods,
    run_method_cell,
    start_identity,
)
from raysys.storage import results


@dataclass(frozen=True)
class SearchCell(MethodSetting):
    """Its hash is the search's identity: its method, reference run, outdated model and search space."""

    trials: int  # the budget (not part of the identity: a larger one continues the search)


@dataclass(frozen=True)
class SearchTrial(MethodCell):
    """A method cell with the knobs one trial of a search proposed."""

    lr: float = 0.0
    search_hash: str = ""


class SearchStage(Stage):
    name = "search"
    tables = ("methods_search",)
    cell_types = (SearchCell, SearchTrial)
    launcher = "search"
    metric = "best_dev_accuracy"  # what the searches maximise (K-shot dev in the few-shot regime)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[SearchCell]:
        """One search per reference run of the methods stage and method (the reference's own lr among them)."""
        search = study.methods.search
        if search.algorithm != "optuna":
            return []
        # The budget is not part of a search's identity (a larger one continues the same search), nor its pace.
        space = {k: v for k, v in dataclasses.asdict(search).items() if k not in ("algorithm", "trials", "parallel")}
        cells = []
        # the paper's starts only: a transferred start is the transfer stage's dev choice, a start taught on text
        # its own phase (their lr is the grid's)
        searched = [m for m in study.methods.names if RECYCLING_METHODS[m].start in ("fresh", "old_weights")]
        for ref in (c for c in plan_methods(study, chain) if c.cell_hash == c.vanilla_hash):
            for method in searched:
                search_hash = config_hash("search", method, ref.vanilla_hash, ref.old_tuned_hash, space,
                                          study.methods.teacher_dropout, study.methods.target_fraction,
                                          *start_identity(study, method, ref.tuning_type))
                cells.append(SearchCell(search_hash, method, ref.task, ref.tuning_type, ref.seed, ref.source_plm_index,
                                        ref.target_plm_index, ref.regime, ref.shots, ref.old_tuned_hash,
                                        ref.target_plm_hash, ref.vanilla_hash, search.trials))
        return cells

    def outputs(self, cell):
        return () if isinstance(cell, SearchCell) else (Rows("methods_search", cell.cell_hash),)

    def inputs(self, cell: SearchCell):
        return (Artifact("plm", cell.target_plm_hash), Artifact("tuned", cell.old_tuned_hash),
                Rows("methods_runs", cell.vanilla_hash))

    def done(self, cell: SearchCell, view: View) -> bool:
        return len(self.finished(cell, view)) >= cell.trials

    def failed(self, cell: SearchCell, view: View) -> bool:
        return not self.done(cell, view) and any(
            r["search_hash"] == cell.cell_hash and r["status"] == "failed" for r in view.all_rows("methods_search"))

    def finished(self, cell: SearchCell, view: View) -> list[dict]:
        """The search's finished trials, oldest first."""
        rows = [r for r in view.ok_rows("methods_search") if r["search_hash"] == cell.cell_hash]
        return sorted(rows, key=lambda r: r["started_at"])

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.methods)

    def train_tokens(self, study: StudyConfig, cell: SearchCell) -> int:
        cfg = method_tuning_config(study, cell.tuning_type, cell.regime)
        return cell.trials * cfg.max_steps * cfg.batch_size * cfg.max_length

    def plan_note(self, study: StudyConfig, cells: list) -> str:
        return f"({len(cells)} Optuna searches x {study.methods.search.trials} trials)" if cells else ""

    # --------------------------------------------------------------------- what the search launcher asks

    def sampler_seed(self, study: StudyConfig, trials_done: int) -> int:
        """Seeded by the trials done too: a continued search must not redraw its first random proposals. Optuna
        seeds NumPy, whose seeds are 32-bit."""
        return (study.methods.search.seed * 100003 + trials_done) % 2**32

    def space(self, study: StudyConfig, cell: SearchCell) -> dict[str, tuple[float, float, bool]]:
        """knob -> (low, high, log scale): lr for every method, T, a and β for the distilling ones."""
        s = study.methods.search
        knobs = {"lr": (*s.lr, True)}
        if RECYCLING_METHODS[cell.method].distils:
            knobs.update(temperature=(*s.temperature, False), kd_weight=(*s.kd_weight, False),
                         beta=(*s.beta, False))
        return knobs

    def describe(self, cell: SearchCell) -> str:
        return f"{cell.method} {cell.tuning_type} {cell.task} {cell.regime} seed {cell.seed}"

    def trial(self, cell: SearchCell, knobs: dict) -> SearchTrial:
        """The method cell of one trial. Knobs are rounded to 6 significant digits so that a value proposed again
        (a resumed search) addresses the same cell."""
        knobs = {k: float(f"{v:.6g}") for k, v in knobs.items()}
        fields = {k: v for k, v in dataclasses.asdict(cell).items() if k not in ("cell_hash", "trials")}
        return SearchTrial(**fields, cell_hash=config_hash("search-trial", cell.cell_hash, knobs),
                           needs_reference=True, temperature=knobs.get("temperature"),
                           kd_weight=knobs.get("kd_weight"), beta=knobs.get("beta"), lr=knobs["lr"],
                           search_hash=cell.cell_hash)

    def run_trial(self, ctx: Context, trial: SearchTrial) -> dict:
        """The trial's metrics for Optuna (from the store when a resumed search proposes it again); a failed
        trial is recorded, then raised for Tune."""
        row = results.ok_cell(ctx.store, "methods_search", trial.cell_hash)
        if row is None:
            run = lambda: run_method_cell(ctx, trial, table="methods_search", lr=trial.lr,
                                          extra={"search_hash": trial.search_hash})
            if not run_guarded(ctx, self, trial, run):
                raise RuntimeError(results.read_cell(ctx.store, "methods_search", trial.cell_hash)[0]["error"])
            row = results.ok_cell(ctx.store, "methods_search", trial.cell_hash)
        return {self.metric: row[self.metric], "test_accuracy": row["test_accuracy"]}


STAGE = SearchStage()
