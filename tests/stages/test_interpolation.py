"""Stage `interpolation` on the micro study: the path's ends are the tuned models, the summaries follow from their
rows, and a summary over fewer α than the study now asks for is not done."""

import dataclasses

from raysys.stages.base import View
from raysys.stages.chain import plan_chain
from raysys.stages.interpolation import PathSummary
from raysys.stages.registry import stage
from raysys.storage import results


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
