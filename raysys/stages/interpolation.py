"""Stage `interpolation`: linear mode connectivity. For every pair (tuned M_i, tuned M_j), the model
θ(α) = (1 − α)·θ_a + α·θ_b at each α of `pilot.alphas` — each end keeping its own backbone, so for PET the
backbone and the module are interpolated together — then the path's loss barrier and accuracy drop. A LoRA path
interpolates each end's effective weights W + s·B·A (`pilot.lora_path = "merged"`) or its factors ("factors").

A path's points share one file (keyed by the pair): one write per path instead of one per α, and the summary
reads back one file, not the table. A trial runs one path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raysys.config import StudyConfig
from raysys.identity import config_hash
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage, View, cell_columns, error_text
from raysys.stages.chain import ChainPlan, Pair, plan_pairs
from raysys.storage import results


def path_of(study: StudyConfig, pair: Pair) -> Pair:
    """The pair as its path's cells see it: `pair_hash` is the path's hash (its file, its summary's hash). The
    pair's own, except a LoRA path on the merged update (`pilot.lora_path = "merged"`): another path than the
    factor-wise one, which was the only one before the field existed and keeps the pair's hash."""
    if pair.tuning_type != "lora" or study.pilot.lora_path == "factors":
        return pair
    return dataclasses.replace(pair, pair_hash=config_hash("path", pair.pair_hash, study.pilot.lora_path))


@dataclass(frozen=True)
class PathPoint(Pair):
    """θ(α) of one pair, evaluated on dev and test."""

    cell_hash: str
    alpha: float


@dataclass(frozen=True)
class PathSummary(Pair):
    """The barrier and accuracy drop of one pair's path over its `num_alphas` points (its hash is the pair's)."""

    cell_hash: str
    num_alphas: int


class InterpolationStage(Stage):
    name = "interpolation"
    tables = ("interpolation", "interpolation_paths")
    cell_types = (PathPoint, PathSummary)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list:
        pairs = [path_of(study, pair) for pair in plan_pairs(study, chain)]
        alphas = study.pilot.alphas
        points = [PathPoint(**vars(pair), cell_hash=config_hash("interp", pair.pair_hash, alpha), alpha=alpha)
                  for pair in pairs for alpha in alphas]
        return points + [PathSummary(**vars(pair), cell_hash=pair.pair_hash, num_alphas=len(alphas)) for pair in pairs]

    def eval_passes(self, study: StudyConfig, cell) -> dict[str, int]:
        return {"dev": 1, "test": 1} if isinstance(cell, PathPoint) else {}  # a summary reads its points' rows

    def outputs(self, cell):
        if isinstance(cell, PathPoint):
            return (Rows("interpolation", cell.cell_hash, file=cell.pair_hash),)
        return (Rows("interpolation_paths", cell.cell_hash),)

    def inputs(self, cell):
        return Artifact("tuned", cell.tuned_hash_a), Artifact("tuned", cell.tuned_hash_b)

    def done(self, cell, view: View) -> bool:
        """A summary is done once written over the study's α: a grid with a new α makes it stale."""
        if isinstance(cell, PathPoint):
            return super().done(cell, view)
        rows = view.rows_of("interpolation_paths", cell.cell_hash)
        return bool(rows) and all(r["num_alphas"] == cell.num_alphas for r in rows)

    def groups(self, cells: list) -> list[list]:
        paths: dict[str, list] = {}
        for cell in cells:
            paths.setdefault(cell.pair_hash, []).append(cell)
        return list(paths.values())

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.pilot)

    def run_group(self, ctx: Context, cells: list) -> int:
        """The path's missing points, then its summary (written once every α has a row)."""
        view = View(ctx.store, scan=False)
        all_points = [c for c in cells if isinstance(c, PathPoint)]
        points = [c for c in all_points if not self.done(c, view)]  # a retried trial keeps what it finished
        pair = cells[0]
        wanted = {c.cell_hash for c in points}
        kept = [r for r in results.read_cell(ctx.store, "interpolation", pair.pair_hash)
                if r["status"] == "ok" and r["cell_hash"] not in wanted]
        new = []
        if points:
            started = results.now()
            try:
                new = _point_rows(ctx, pair, points)
            except Exception as err:  # noqa: BLE001 — recorded; the path runs again next time
                failed = results.provenance(started, "failed", error_text(err))
                new = [{"cell_hash": c.cell_hash, **failed, **cell_columns(c, "interpolation")} for c in points]
            results.write_rows(ctx.store, "interpolation", pair.pair_hash, kept + new)
        summarised = write_path_summary(ctx, pair) and len(all_points) < len(cells)
        return len(all_points) - len(points) + sum(r["status"] == "ok" for r in new) + summarised


def _point_rows(ctx: Context, pair: Pair, points: list[PathPoint]) -> list[dict]:
    from raysys.core import pet, recycle
    from raysys.stages.recipe import Evaluator, clone_state
    from raysys.storage import artifacts

    evaluator = Evaluator(ctx, pair.task)
    model_a, meta_a = artifacts.load_tuned(ctx.store, pair.tuned_hash_a)
    model_b, meta_b = artifacts.load_tuned(ctx.store, pair.tuned_hash_b)
    state_a, state_b = clone_state(model_a.to(evaluator.device)), clone_state(model_b.to(evaluator.device))
    del model_b
    inner_a, inner_b = state_a, state_b  # what the points strictly between the ends interpolate
    if pair.tuning_type == "lora" and ctx.study.pilot.lora_path == "merged":
        inner_a, inner_b = (pet.merge_lora(s, pet.lora_scaling(m["pet"])) for s, m in ((state_a, meta_a),
                                                                                       (state_b, meta_b)))
    ends = {0.0: state_a, 1.0: state_b}  # the tuned models exactly (merged, the same function up to rounding)
    rows = []
    for point in points:
        started = results.now()
        state = ends[point.alpha] if point.alpha in ends else recycle.interpolate(inner_a, inner_b, point.alpha)
        metrics = evaluator.state_metrics(model_a, state)
        rows.append({"cell_hash": point.cell_hash, **results.provenance(started),
                     **cell_columns(point, "interpolation"), **metrics})
    return rows


def write_path_summary(ctx: Context, pair: Pair) -> bool:
    """Loss barrier and largest accuracy drop of one pair's path, per split, once all its α have rows."""
    from raysys.core import analysis

    started = results.now()
    rows = [r for r in results.read_cell(ctx.store, "interpolation", pair.pair_hash) if r["status"] == "ok"]
    by_alpha = {r["alpha"]: r for r in rows}
    if set(by_alpha) != set(ctx.study.pilot.alphas):
        return False
    path = [by_alpha[a] for a in sorted(by_alpha)]
    alphas = [r["alpha"] for r in path]
    out = []
    for split in ("dev", "test"):
        losses, accs = [r[f"{split}_loss"] for r in path], [r[f"{split}_accuracy"] for r in path]
        out.append({**results.provenance(started), **cell_columns(pair, "interpolation_paths"), "split": split,
                    "num_alphas": len(path), "loss_a": losses[0], "loss_b": losses[-1], "accuracy_a": accs[0],
                    "accuracy_b": accs[-1], "min_accuracy": min(accs),
                    "loss_barrier": analysis.loss_barrier(alphas, losses),
                    "accuracy_drop": analysis.accuracy_drop(alphas, accs)})
    results.write_rows(ctx.store, "interpolation_paths", pair.pair_hash, out)
    return True


STAGE = InterpolationStage()
