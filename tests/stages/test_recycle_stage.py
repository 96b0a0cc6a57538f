"""The recycle stage: its probe rule and subset on hand-made numbers, its plan, and on the micro study every cell's
choice is the rule's over its own probe rows, the chosen weights score what the transfer stage's full grid scored
with the same (method, setting), and the stored artifact loads back into a model that scores its row."""

import json
import statistics

import pytest

from raysys.config import ConfigError, load_study
from raysys.stages.base import Context
from raysys.stages.chain import plan_chain
from raysys.stages.recycle_run import choose, probe_subset
from raysys.stages.registry import stage
from raysys.storage import artifacts, results


def test_the_probe_subset_is_seeded_sorted_and_whole_when_small():
    assert probe_subset(10, 4, 0) == probe_subset(10, 4, 0) == sorted(probe_subset(10, 4, 0))
    assert len(set(probe_subset(10, 4, 0))) == 4 and probe_subset(10, 4, 0) != probe_subset(10, 4, 1)
    assert probe_subset(3, 64, 0) == [0, 1, 2]


def test_the_rule_takes_accuracy_then_loss_then_order():
    assert choose([(0.5, 1.0), (0.7, 2.0), (0.6, 0.1)]) == 1
    assert choose([(0.7, 2.0), (0.7, 1.5), (0.6, 0.1)]) == 1  # equal accuracy: the lower loss
    assert choose([(0.7, 1.5), (0.7, 1.5)]) == 0  # a full tie: the first (copy before the schemes)


def test_one_cell_per_task_type_and_transfer_pair_with_every_seed():
    study = load_study("tiny")
    cells = stage("recycle").plan(study, plan_chain(study))
    assert len(cells) == len(study.tasks) * len(study.tuning.types) * len(study.transfer_pairs)
    assert all(c.seeds == tuple(study.seeds) and len(c.source_tuned_hashes) == len(study.seeds) for c in cells)
    outputs = stage("recycle").outputs(cells[0])
    assert [o.kind for o in outputs[1:]] == ["recycled"] * len(study.seeds)  # done only with every seed's weights
    more = load_study("tiny", ["recycle.probe_examples=128"])
    assert {c.cell_hash for c in stage("recycle").plan(more, plan_chain(more))}.isdisjoint(c.cell_hash for c in cells)
    off = load_study("tiny", ["recycle.enabled=false"])
    assert not stage("recycle").plan(off, plan_chain(off))
    with pytest.raises(ConfigError, match="recycle.methods: multi_version merges"):
        load_study("tiny", ['recycle.methods=["copy","multi_version"]'])
    with pytest.raises(ConfigError, match="recycle.methods: unknown method 'lerp'"):
        load_study("tiny", ['recycle.methods=["lerp"]'])


def _cells(rows):
    out = {}
    for r in rows:
        out.setdefault(r["cell_hash"], []).append(r)
    return out


def test_each_cell_chose_by_its_rule_and_its_choice_scores_as_the_full_grid_did(micro_run):
    study, store, _ = micro_run
    rows = results.ok_rows(store, "recycle")
    cells = _cells(rows)
    assert len(cells) == len(stage("recycle").plan(study, plan_chain(study)))
    transfer = {(r["task"], r["tuning_type"], r["seed"], r["source_plm_index"], r["target_plm_index"], r["method"],
                 r["setting"]): r for r in results.read_table(store, "transfer").to_pylist() if r.get("applicable")}
    for cell_rows in cells.values():
        candidates = list(dict.fromkeys((r["method"], r["setting"]) for r in cell_rows))
        means = [tuple(statistics.mean(r[k] for r in cell_rows if (r["method"], r["setting"]) == c)
                       for k in ("probe_accuracy", "probe_loss")) for c in candidates]
        chosen = {(r["method"], r["setting"]) for r in cell_rows if r["chosen"]}
        assert chosen == {candidates[choose(means)]}
        for r in (r for r in cell_rows if r["chosen"]):
            same = transfer[(r["task"], r["tuning_type"], r["seed"], r["source_plm_index"], r["target_plm_index"],
                             r["method"], r["setting"])]
            assert r["dev_accuracy"] == pytest.approx(same["dev_accuracy"], abs=1e-12)
            assert r["probe_examples"] == min(study.recycle.probe_examples, 48)  # the micro dev set has 48
    assert {r["tuning_type"] for r in rows if r["method"] == "scaled"} == set(study.tuning.types)


def test_a_recycled_artifact_loads_into_a_model_that_scores_its_row(micro_run):
    from raysys.core.classifier_loop import evaluate
    from raysys.stages.recipe import encoded_task

    study, store, _ = micro_run
    row = next(r for r in results.ok_rows(store, "recycle") if r["chosen"] and r["tuning_type"] == "lora")
    model, meta = artifacts.load_recycled(store, row["recycled_hash"])
    assert meta["plm_hash"] == row["target_plm_hash"] and meta["recycled_from"] == row["source_tuned_hash"]
    assert meta["method"] == row["method"] and meta["setting"] == json.loads(row["setting"])
    data = encoded_task(Context(study, store, plan_chain(study)), row["task"])
    accuracy, _ = evaluate(model, *data.encoded["dev"], study.pilot.eval_batch_size, data.pad_id, "cpu")
    assert accuracy == pytest.approx(row["dev_accuracy"], abs=1e-12)
