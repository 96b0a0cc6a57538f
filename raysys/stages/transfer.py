"""Stage `transfer` (issue 21, beyond the paper): the training-free transfer methods published since the paper
(raysys.core.transfer; docs/transfer.md) applied to Δ_i for M_j on the compatibility matrix's pairs
(`StudyConfig.transfer_pairs`). A cell is one method on one pair (task, tuning type, seed, i → j): every setting of
its grid scored on the full dev set, the best one (dev accuracy, then dev loss, then grid order) also on test. A
method that does not apply to the type, or to M_0's weights, writes one row saying why.

Every method acts on the same object: the tuned model's update against its own start (its PLM with the seeded head
and module), on the start's names — a LoRA model merged (W + s·B·A), so every method sees the dense update s·B·A.
M_j's weights are then its own start plus the method's delta. The classification head is carried as tuned (a task
vector in the task-arithmetic sense is the backbone's update), as are a PET type's trained LayerNorms under
`tuning.pet_norms = "absolute"`; under "delta" they are part of the update, as the compatibility test moves them.
`copy` (λ = 1) is therefore the compatibility test itself: the same weights, up to rounding.

A trial runs the cells of several pairs, loading each pair's models once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from raysys.config import StudyConfig
from raysys.identity import config_hash, recycling_identity, tuned_hash
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage, View, cell_columns, run_guarded
from raysys.stages.chain import ChainPlan, task_grid
from raysys.stages.compatibility import CompatibilityCell
from raysys.storage import results


@dataclass(frozen=True)
class TransferCell(CompatibilityCell):
    """A transfer method on one compatibility pair."""

    method: str
    history: tuple[str, ...]  # the task's tuned hashes on M_k for k < i (tuned PLMs only), oldest first


class TransferStage(Stage):
    name = "transfer"
    light = True  # a cell evaluates a few weight sets: the grid launcher packs several pairs into one trial
    tables = ("transfer",)
    cell_types = (TransferCell,)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[TransferCell]:
        config = study.transfer
        if not config.enabled:
            return []
        plms, cells = chain.plm_hashes, []
        for task, tuning_type, seed in task_grid(study):
            tuned = {k: tuned_hash(study, plms[k], task, tuning_type, seed) for k in study.plms_to_tune}
            moved = recycling_identity(study.tuning, tuning_type)
            for i, j in study.transfer_pairs:
                history = tuple(tuned[k] for k in sorted(tuned) if k < i)
                for method in config.names:
                    uses = history if method == "multi_version" else ()
                    cell_hash = config_hash("transfer", method, config.grid(method), tuned[i], uses, plms[i], plms[j],
                                            *moved)
                    cells.append(TransferCell(cell_hash, task.name, tuning_type, seed, i, j, tuned[i], plms[i],
                                              plms[j], method, history))
        return cells

    def outputs(self, cell: TransferCell):
        return (Rows("transfer", cell.cell_hash),)

    def inputs(self, cell: TransferCell):
        history = cell.history if cell.method == "multi_version" else ()
        return (Artifact("tuned", cell.source_tuned_hash), Artifact("plm", cell.target_plm_hash),
                *(Artifact("tuned", h) for h in history))

    def groups(self, cells: list) -> list[list]:
        pairs: dict[tuple, list] = {}
        for cell in cells:
            pairs.setdefault((cell.source_tuned_hash, cell.target_plm_hash), []).append(cell)
        return list(pairs.values())

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.transfer)

    def eval_passes(self, study: StudyConfig, cell) -> dict[str, int]:
        return {"dev": len(study.transfer.grid(cell.method)), "test": 1}  # every setting on dev, the chosen on test

    def plan_note(self, study: StudyConfig, cells: list) -> str:
        """Evaluation only: how many weight sets the grids score on dev (each cell's chosen one on test too)."""
        if not cells:
            return ""
        pairs = len({(c.source_tuned_hash, c.target_plm_hash) for c in cells})
        return f"({pairs} pairs, {sum(len(study.transfer.grid(c.method)) for c in cells)} weight sets scored on dev)"

    def decode(self, payload: dict):
        cell = super().decode(payload)
        return dataclasses.replace(cell, history=tuple(cell.history))  # a trial's config carries it as a list

    def run_group(self, ctx: Context, cells: list) -> int:
        """Per pair, its models loaded once; cells already done are skipped, a failing cell is recorded."""
        from raysys.stages.transfer_run import PairWeights

        view = View(ctx.store, scan=False)
        done = 0
        for pair in self.groups(cells):
            todo = [c for c in pair if not self.done(c, view)]
            done += len(pair) - len(todo)
            weights = PairWeights(ctx, todo[0]) if todo else None
            done += sum(run_guarded(ctx, self, c, lambda c=c, w=weights: self._run(ctx, c, w)) for c in todo)
        return done

    def run(self, ctx: Context, cell: TransferCell) -> None:
        from raysys.stages.transfer_run import PairWeights

        self._run(ctx, cell, PairWeights(ctx, cell))

    def _run(self, ctx: Context, cell: TransferCell, weights) -> None:
        started = results.now()
        common = cell_columns(cell, "transfer")
        reason = weights.not_applicable(cell)
        if reason:
            rows = [{**results.provenance(started), **common, "applicable": False, "reason": reason}]
        else:
            scored = weights.score(cell)
            rows = [{**results.provenance(started), **common, "applicable": True, "setting": json.dumps(s.setting),
                     "selected": s.selected, "num_versions": s.num_versions, "relative_change": s.relative_change,
                     **s.metrics} for s in scored]
        results.write_rows(ctx.store, "transfer", cell.cell_hash, rows)


STAGE = TransferStage()
