"""Stage `compatibility`: Δ_i tuned on M_i applied, without training, to every later tuned M_j of the main chain —
and the references of that matrix that need no tuning (majority class; the PLM with an untrained head)."""

from __future__ import annotations

from dataclasses import dataclass

from raysys.config import StudyConfig
from raysys.identity import config_hash, data_spec, recycling_identity, tuned_hash, world_if_builtin
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage, cell_columns
from raysys.stages.chain import ChainPlan, task_grid
from raysys.storage import results


@dataclass(frozen=True)
class CompatibilityCell:
    cell_hash: str
    task: str
    tuning_type: str
    seed: int
    source_plm_index: int
    target_plm_index: int
    source_tuned_hash: str
    source_plm_hash: str
    target_plm_hash: str


@dataclass(frozen=True)
class BaselineCell:
    """PET modules start as the identity, so one untrained model serves every tuning type."""

    cell_hash: str
    task: str
    seed: int
    plm_index: int
    plm_hash: str


class CompatibilityStage(Stage):
    name = "compatibility"
    light = True  # a cell evaluates one model (or pair) on a split: a fraction of a trial's cost
    tables = ("compatibility", "baselines")
    cell_types = (CompatibilityCell, BaselineCell)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list:
        tuned, plms = sorted(study.plms_to_tune), chain.plm_hashes
        cells = []
        for task, tuning_type, seed in task_grid(study):
            for i in tuned:
                source = tuned_hash(study, plms[i], task, tuning_type, seed)
                moved = recycling_identity(study.tuning, tuning_type)  # how its LayerNorms move, where it counts
                cells += [CompatibilityCell(config_hash("compat", source, plms[i], plms[j], *moved), task.name,
                                            tuning_type, seed, i, j, source, plms[i], plms[j]) for j in tuned if j > i]
        cells += [BaselineCell(config_hash("baseline", plms[i], data_spec(task), world_if_builtin(study, task.source), seed,
                                           study.tuning.max_length), task.name, seed, i, plms[i])
                  for i in tuned for task in study.tasks for seed in study.seeds]
        return cells

    def outputs(self, cell):
        table = "baselines" if isinstance(cell, BaselineCell) else "compatibility"
        return (Rows(table, cell.cell_hash),)

    def inputs(self, cell):
        if isinstance(cell, BaselineCell):
            return (Artifact("plm", cell.plm_hash),)
        return Artifact("tuned", cell.source_tuned_hash), Artifact("plm", cell.target_plm_hash)

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.pilot)

    def eval_passes(self, study: StudyConfig, cell) -> dict[str, int]:
        return {"dev": 1, "test": 1}  # a baseline's majority class costs nothing; its untrained head one pass

    def run(self, ctx: Context, cell) -> None:
        from raysys.stages.recipe import Evaluator
        from raysys.storage import artifacts

        started = results.now()
        evaluator = Evaluator(ctx, cell.task)
        if isinstance(cell, BaselineCell):
            self._run_baseline(ctx, cell, evaluator, started)
            return
        model, _ = artifacts.load_tuned(ctx.store, cell.source_tuned_hash, on_plm=cell.target_plm_hash,
                                        pet_norms=ctx.study.tuning.pet_norms)
        metrics = evaluator.metrics(model)  # before the row's clock stops: its seconds are the cell's
        results.write_rows(ctx.store, "compatibility", cell.cell_hash, [{
            **results.provenance(started), **cell_columns(cell, "compatibility"), **metrics}])

    def _run_baseline(self, ctx: Context, cell: BaselineCell, evaluator, started) -> None:
        from raysys.config import FULL_FINETUNING
        from raysys.core import compute
        from raysys.storage import artifacts

        compute.seed_all(cell.seed)
        untrained = artifacts.adapted_classifier(ctx.store, cell.plm_hash, len(evaluator.data.task.labels),
                                                 FULL_FINETUNING, None, cell.seed)
        kinds = {"majority": evaluator.majority_metrics(), "untrained_head": evaluator.metrics(untrained)}
        common = {**results.provenance(started), **cell_columns(cell, "baselines")}
        results.write_rows(ctx.store, "baselines", cell.cell_hash,
                           [{**common, "kind": kind, **metrics} for kind, metrics in kinds.items()])


STAGE = CompatibilityStage()
