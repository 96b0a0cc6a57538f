"""Stage `recycle` (issue 21, beyond the paper): every stored Δ recycled when a new PLM arrives. A cell is one
(task, tuning type, upgrade i → j of the transfer pairs) with every seed's Δ_i: a cheap probe — each setting of
each method of `recycle.methods` on a small seeded dev subset — picks one (method, setting) by the rule of
`RecycleConfig`, and the chosen weights are made for M_j for every seed, scored on the full dev and test sets and
stored as `artifacts/recycled/<hash>/` (the entries that differ from the tuned model's start on M_j, and its
raysys.json). The transfer stage's full grid, on the full dev set, is the ground truth the report judges the probe
against (raysys.report.transfer.recycle_section).
"""

from __future__ import annotations

from dataclasses import dataclass

from raysys.config import StudyConfig
from raysys.identity import config_hash, recycling_identity, tuned_hash
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage
from raysys.stages.chain import ChainPlan


@dataclass(frozen=True)
class RecycleCell:
    cell_hash: str
    task: str
    tuning_type: str
    source_plm_index: int
    target_plm_index: int
    source_plm_hash: str
    target_plm_hash: str
    seeds: tuple[int, ...]
    source_tuned_hashes: tuple[str, ...]  # Δ_i of each seed, in `seeds` order


def recycled_hash(cell: RecycleCell, seed: int) -> str:
    """The artifact of one seed's recycled weights: its cell and its Δ (the choice is the cell's)."""
    return config_hash("recycled", cell.cell_hash, cell.source_tuned_hashes[cell.seeds.index(seed)])


class RecycleStage(Stage):
    name = "recycle"
    light = True  # a probe on a few dozen examples, then one full evaluation per seed
    tables = ("recycle",)
    cell_types = (RecycleCell,)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[RecycleCell]:
        config = study.recycle
        if not config.enabled:
            return []
        plms, cells = chain.plm_hashes, []
        for task in study.tasks:
            for tuning_type in study.tuning.types:
                moved = recycling_identity(study.tuning, tuning_type)
                for i, j in study.transfer_pairs:
                    sources = tuple(tuned_hash(study, plms[i], task, tuning_type, seed) for seed in study.seeds)
                    grids = {m: study.transfer.grid(m) for m in config.methods}
                    cell_hash = config_hash("recycle", sources, plms[i], plms[j], grids, config.probe_examples,
                                            config.probe_seed, *moved)
                    cells.append(RecycleCell(cell_hash, task.name, tuning_type, i, j, plms[i], plms[j],
                                             tuple(study.seeds), sources))
        return cells

    def outputs(self, cell: RecycleCell):
        return (Rows("recycle", cell.cell_hash),
                *(Artifact("recycled", recycled_hash(cell, seed)) for seed in cell.seeds))

    def inputs(self, cell: RecycleCell):
        return (*(Artifact("tuned", h) for h in cell.source_tuned_hashes), Artifact("plm", cell.target_plm_hash))

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.recycle)

    def eval_passes(self, study: StudyConfig, cell) -> dict[str, int]:
        return {"dev": len(cell.seeds), "test": len(cell.seeds)}  # the probe's few examples aside

    def plan_note(self, study: StudyConfig, cells: list) -> str:
        if not cells:
            return ""
        settings = sum(len(study.transfer.grid(m)) for m in study.recycle.methods)
        return f"(probe: {settings} settings x {study.recycle.probe_examples} dev examples per Δ)"

    def decode(self, payload: dict):
        cell = super().decode(payload)
        return RecycleCell(**{**vars(cell), "seeds": tuple(cell.seeds),
                              "source_tuned_hashes": tuple(cell.source_tuned_hashes)})

    def run(self, ctx: Context, cell: RecycleCell) -> None:
        from raysys.stages.recycle_run import run_recycle_cell

        run_recycle_cell(ctx, cell)


STAGE = RecycleStage()
