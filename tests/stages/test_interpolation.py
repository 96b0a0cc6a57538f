"""Stage `interpolation` on the micro study: the path's ends are the tuned models, the summaries follow from their
rows, and a summary over fewer α than the study now asks for is not done."""

import dataclasses

from raysys.stages.base import Context, View
from raysys.stages.chain import plan_chain, plan_pairs
from raysys.stages.interpolation import PathPoint, PathSummary
from raysys.stages.recipe import Evaluator
from raysys.stages.registry import stage
from raysys.storage import artifacts, results


def test_interpolation_ends_reproduce_the_tuned_models(micro_run):
    """α = 0 and α = 1 are the two tuned models exactly — for PET too, each end keeping its own backbone."""
    _, store, _ = micro_run
    tuned = {r["cell_hash"]: r for r in results.ok_rows(store, "tuning_runs")}
    checked = set()
    for row in results.ok_rows(store, "interpolation"):
        end = {0.0: "tuned_hash_a", 1.0: "tuned_hash_b"}.get(row["alpha"])
        if end:
            assert row["test_accuracy"] == tuned[row[end]]["test_accuracy"]
            assert abs(row["test_loss"] - tuned[row[end]]["test_loss"]) < 1e-5
            checked.add(row["tuning_type"])
    assert checked == {"finetune", "lora", "adapter"}


def test_path_summaries_match_their_rows(micro_run):
    _, store, _ = micro_run
    interp = results.ok_rows(store, "interpolation")
    for path in results.ok_rows(store, "interpolation_paths"):
        rows = sorted((r for r in interp if r["tuned_hash_a"] == path["tuned_hash_a"]
                       and r["tuned_hash_b"] == path["tuned_hash_b"]), key=lambda r: r["alpha"])
        losses = [r[f"{path['split']}_loss"] for r in rows]
        assert path["num_alphas"] == len(rows) == 3
        mid = losses[1] - (losses[0] + losses[2]) / 2
        assert abs(path["loss_barrier"] - max(0.0, mid)) < 1e-9


def test_a_summary_over_other_alphas_is_not_done(micro_run):
    study, store, _ = micro_run
    interpolation = stage("interpolation")
    summaries = [c for c in interpolation.plan(study, plan_chain(study)) if isinstance(c, PathSummary)]
    for view in (View(store), View(store, scan=False)):  # the driver's reading and a trial's agree
        assert all(interpolation.done(c, view) for c in summaries)
        assert not any(interpolation.done(dataclasses.replace(c, num_alphas=4), view) for c in summaries)
    groups = interpolation.groups(interpolation.plan(study, plan_chain(study)))
    assert len(groups) == len(summaries) and all(len(g) == len(study.pilot.alphas) + 1 for g in groups)
    assert all(len({c.pair_hash for c in g}) == 1 and isinstance(g[-1], PathSummary) for g in groups)


def test_a_merged_lora_midpoint_is_the_model_with_the_averaged_effective_weights(micro_run):
    """pilot.lora_path = "merged" (the default): the α = 0.5 point of a LoRA path is each end merged by peft itself
    (W + s·B·A) and averaged — a path of its own, hashed apart from the factor-wise one."""
    study, store, _ = micro_run
    chain = plan_chain(study)
    interpolation = stage("interpolation")
    point = next(c for c in interpolation.plan(study, chain)
                 if isinstance(c, PathPoint) and c.tuning_type == "lora" and c.alpha == 0.5)
    pair = next(p for p in plan_pairs(study, chain) if p.tuned_hash_a == point.tuned_hash_a
                and p.tuned_hash_b == point.tuned_hash_b)
    assert point.pair_hash != pair.pair_hash  # factor-wise, the path keeps the pair's hash
    row = next(r for r in results.ok_rows(store, "interpolation") if r["cell_hash"] == point.cell_hash)
    ends = []
    for tuned_hash in (point.tuned_hash_a, point.tuned_hash_b):
        model, _ = artifacts.load_tuned(store, tuned_hash)
        for layer in [m for m in model.modules() if hasattr(m, "merge") and hasattr(m, "lora_A")]:
            layer.merge()  # peft's own merge: the base weight becomes W + s·B·A, the factors are then unused
        ends.append(model)
    averaged = {k: (v + ends[1].state_dict()[k]) / 2 if v.is_floating_point() else v
                for k, v in ends[0].state_dict().items()}
    ends[0].load_state_dict(averaged)
    expected = Evaluator(Context(study, store, chain), point.task).metrics(ends[0])
    for split in ("dev", "test"):
        assert row[f"{split}_accuracy"] == expected[f"{split}_accuracy"]
        assert abs(row[f"{split}_loss"] - expected[f"{split}_loss"]) < 1e-6
