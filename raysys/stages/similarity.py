"""Stage `similarity`: functional similarity of the pair's two tuned models — per attention head, 1 − JS/ln 2
between corresponding heads against non-corresponding ones, on the first dev examples — and the distances between
their PLMs, tuned weights and updates."""

from __future__ import annotations

from dataclasses import dataclass

from raysys.config import FULL_FINETUNING, StudyConfig
from raysys.identity import config_hash
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage, View, cell_columns
from raysys.stages.chain import ChainPlan, Pair, plan_pairs
from raysys.storage import results


@dataclass(frozen=True)
class SimilarityCell(Pair):
    cell_hash: str


def distance_kinds(tuning_type: str) -> tuple[str, ...]:
    """The `what` of a pair's distance rows: a PET pair's also what tuning learned from where it started."""
    return ("plm", "tuned", "update") + (() if tuning_type == FULL_FINETUNING else ("update_from_start",))


class SimilarityStage(Stage):
    name = "similarity"
    light = True  # a cell evaluates one model (or pair) on a split: a fraction of a trial's cost
    tables = ("head_similarity", "distances")
    cell_types = (SimilarityCell,)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[SimilarityCell]:
        pilot = study.pilot
        return [SimilarityCell(**vars(pair), cell_hash=config_hash("similarity", pair.pair_hash,
                                                                   pilot.similarity_examples, study.tuning.max_length))
                for pair in plan_pairs(study, chain)]

    def outputs(self, cell: SimilarityCell):
        return Rows("head_similarity", cell.cell_hash), Rows("distances", cell.cell_hash)

    def inputs(self, cell: SimilarityCell):
        return Artifact("tuned", cell.tuned_hash_a), Artifact("tuned", cell.tuned_hash_b)

    def done(self, cell: SimilarityCell, view: View) -> bool:
        """Done once its distances hold every kind this code writes: a PET cell written before `update_from_start`
        existed runs again (evaluation only), in place, its rows keyed by the same hash."""
        kinds = {r["what"] for r in view.rows_of("distances", cell.cell_hash)}
        return super().done(cell, view) and kinds >= set(distance_kinds(cell.tuning_type))

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.pilot)

    def run(self, ctx: Context, cell: SimilarityCell) -> None:
        import torch

        from raysys.core import analysis, data
        from raysys.stages.recipe import Evaluator
        from raysys.storage import artifacts

        study, store = ctx.study, ctx.store
        started = results.now()
        evaluator = Evaluator(ctx, cell.task)
        model_a, meta_a = artifacts.load_tuned(store, cell.tuned_hash_a)
        model_b, meta_b = artifacts.load_tuned(store, cell.tuned_hash_b)
        ids, labels = evaluator.data.encoded["dev"]
        n = min(study.pilot.similarity_examples, len(ids))
        batches = [(x, mask) for x, mask, _ in data.iterate_batches(ids[:n], labels[:n], study.pilot.eval_batch_size,
                                                                    evaluator.data.pad_id)]
        maps_a, mask = analysis.attention_maps(model_a.to(evaluator.device), batches)
        maps_b, _ = analysis.attention_maps(model_b.to(evaluator.device), batches)
        model_a.cpu(), model_b.cpu()  # the distances below are taken against the PLMs' weights, on the CPU
        rows = []
        for layer, (a, b) in enumerate(zip(maps_a, maps_b)):
            js = analysis.head_divergence(a, b, mask)  # (heads, heads)
            heads = js.shape[0]
            for head in range(heads):
                others = torch.cat([js[head, :head], js[head, head + 1:]])
                rows.append({"layer": layer, "head": head, "num_examples": n,
                             "js_corresponding": float(js[head, head]),
                             "js_noncorresponding": float(others.mean()) if heads > 1 else None,
                             "similarity_corresponding": float(analysis.similarity(js[head, head])),
                             "similarity_noncorresponding":
                                 float(analysis.similarity(others.mean())) if heads > 1 else None})
        distances = [{"what": what, **dist} for what, dist in pair_distances(store, model_a, meta_a, model_b, meta_b)]
        # the rows' clock stops once everything is measured: their seconds are the cell's
        common = {**results.provenance(started), **cell_columns(cell, "head_similarity")}
        results.write_rows(store, "head_similarity", cell.cell_hash, [{**common, **row} for row in rows])
        results.write_rows(store, "distances", cell.cell_hash, [{**common, **row} for row in distances])


def pair_distances(store, model_a, meta_a: dict, model_b, meta_b: dict):
    """(what, {num_parameters, l2, l2_per_parameter, cosine}) for the two PLMs' encoders (the base model), the two
    tuned models (classifier head excluded, as the paper does), and the two updates: Δ = θ^τ − θ of the encoder for
    fine-tuning, the trained weights for PET — and, for PET, `update_from_start`: what tuning learned, each trained
    weight minus where its run started (the module's seeded init, the PLM's own LayerNorms). The raw `update`
    compares absolute weights, so LayerNorm γ ≈ 1 and the init the two ends share make its cosine high whatever
    was learned."""
    from raysys.core import architectures, pet, recycle
    from raysys.stages.recipe import clone_state
    from raysys.storage import artifacts

    encoder, head = model_a.base_model_prefix + ".", architectures.of(model_a).head_prefixes
    plm_a, plm_b = (recycle.select(artifacts.plm_state(store, m["plm_hash"]), encoder) for m in (meta_a, meta_b))
    tuned_a, tuned_b = (recycle.drop(clone_state(m), head) for m in (model_a, model_b))
    pairs = [("plm", plm_a, plm_b), ("tuned", tuned_a, tuned_b)]
    if meta_a["tuning_type"] == FULL_FINETUNING:
        pairs.append(("update", recycle.delta(recycle.select(tuned_a, encoder), plm_a),
                      recycle.delta(recycle.select(tuned_b, encoder), plm_b)))
    else:
        trained_a, trained_b = (recycle.drop(pet.trainable_state_dict(m), head) for m in (model_a, model_b))
        pairs += [("update", trained_a, trained_b),
                  ("update_from_start", learned(store, trained_a, meta_a), learned(store, trained_b, meta_b))]
    for what, a, b in pairs:
        n = sum(v.numel() for v in a.values() if v.is_floating_point())
        yield what, {"num_parameters": n, **recycle.distance(a, b)}


def learned(store, trained: dict, meta: dict) -> dict:
    """A PET run's trained weights (head dropped) minus those its run started from, re-created from its record:
    the module's seeded initialisation, the PLM's LayerNorms."""
    from raysys.core import pet, recycle
    from raysys.storage import artifacts

    start = pet.trainable_state_dict(artifacts.tuning_start(store, meta))
    return recycle.delta(trained, recycle.restrict(start, trained, "the run's start"))


STAGE = SimilarityStage()
