"""A reduced study of the encoder least like RoBERTa, through Ray (the session's cluster): pre-training M0 -> M1,
full fine-tuning, LoRA and adapters, compatibility, interpolation, head similarity and distances, the recycling
methods (vanilla, init, distill with the hidden-state term) — every cell done, every number finite, and the pilot
analyses consistent with the tuned models. A few steps per stage: these are about
wiring, not accuracy (tests/sweep/test_driver.py has the micro study's RoBERTa run)."""

import dataclasses
import math
import os
import time

import pytest

from raysys.config import ARCHITECTURES, load_study
from raysys.report.status import missing_cells
from raysys.stages.base import Context
from raysys.stages.chain import plan_chain
from raysys.stages.compatibility import CompatibilityCell
from raysys.stages.registry import stage
from raysys.storage import results
from raysys.storage.store import Store
from raysys.sweep.driver import run_study

REDUCED = [
    "world.num_domains=1", "world.general_sentences=1000", "world.domain_sentences=1000",
    "world.task_train=32", "world.task_dev=32", "world.task_test=48",
    'corpora=[{"name": "d0"}, {"name": "d1"}]', 'tasks=[{"name": "d1_rel", "domain": "d1"}]', "seeds=[20]",
    "model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.intermediate_size=64",
    "pretrain.initial_steps=4", "pretrain.continual_steps=4", "pretrain.batch_size=16", "pretrain.log_every_steps=2",
    "pretrain.num_workers=1", "pretrain.cpus_per_worker=1",
    "tuning.max_steps=8", "tuning.eval_every_steps=4",
    "pilot.hops=[1]", "pilot.control_length=0", "pilot.alphas=[0.0,0.5,1.0]", "pilot.similarity_examples=8",
    'methods.names=["vanilla","init","distill"]', 'methods.types=["finetune","lora"]', "methods.sources=[0]",
    'methods.regimes=["full"]', "methods.temperatures=[5.0]", "methods.kd_weights=[0.9]", "methods.betas=[10.0]",
    "methods.training_free.enabled=false",  # its weight maps are state-dict arithmetic, the same for every encoder
]
SECONDS: dict[str, float] = {}


# Through Ray: the encoder whose computation differs most from RoBERTa's, whose reduced study is the micro study
# every stage test shares (tests/conftest.py) — DeBERTa-v2 (disentangled eager attention, its own projection names,
# the head similarity read from eager attention). What differs for every architecture (MLM head, head prefixes, PET
# sites — ModernBERT's fused Wqkv —, recycling) is tested per architecture in tests/core/test_architectures.py.
RAY_STUDIES = [a for a in ARCHITECTURES if a == "deberta-v2"]


@pytest.fixture(scope="module", params=RAY_STUDIES)
def arch_run(request, ray_cluster, tmp_path_factory):
    """(architecture, study, store): the reduced study of one architecture, run once."""
    architecture = request.param
    study = load_study("tiny", [*REDUCED, f"model.architecture={architecture}"])
    store = Store(tmp_path_factory.mktemp(f"study-{architecture}"))
    started = time.time()
    run_study(study, store, log=lambda *_: None)
    SECONDS[architecture] = time.time() - started
    print(f"\n[{architecture}] reduced study through Ray: {SECONDS[architecture]:.1f}s")
    return architecture, study, store


def test_every_stage_finishes_with_finite_numbers(arch_run):
    architecture, study, store = arch_run
    assert missing_cells(study, store) == {name: 0 for name in missing_cells(study, store)}
    config = store.artifact("plm", plan_chain(study).plm_hashes[1]) / "config.json"
    assert f'"model_type": "{architecture}"' in config.read_text()
    runs = results.ok_rows(store, "pretrain_runs")
    assert len(runs) == 2 and all(math.isfinite(r["final_loss"]) and r["steps"] == 4 for r in runs)
    tuning = results.ok_rows(store, "tuning_runs")
    assert sorted(r["tuning_type"] for r in tuning) == sorted(2 * ["finetune", "lora", "adapter"])
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"]) for r in tuning)
    assert all(r["num_trainable_parameters"] < r["num_parameters"] / 2 for r in tuning if r["tuning_type"] != "finetune")
    methods = results.ok_rows(store, "methods_runs")
    assert sorted(r["method"] for r in methods) == sorted(2 * ["vanilla", "init", "distill"])
    assert all(math.isfinite(r["test_loss"]) and 0.0 <= r["best_dev_accuracy"] <= 1.0 for r in methods)
    assert {r["beta"] for r in methods if r["method"] == "distill"} == {10.0}  # hidden states distilled


def test_the_pilot_analyses_agree_with_the_tuned_models(arch_run):
    """Interpolation's ends are the tuned models; the head similarity has one row per layer and head; Δ_0 applied
    to M_0 itself (a zero-hop compatibility cell) gives the tuned model back."""
    _, study, store = arch_run
    tuned = {r["cell_hash"]: r for r in results.ok_rows(store, "tuning_runs")}
    ends = 0
    for row in results.ok_rows(store, "interpolation"):
        end = {0.0: "tuned_hash_a", 1.0: "tuned_hash_b"}.get(row["alpha"])
        assert math.isfinite(row["test_loss"])
        if end:
            assert row["test_accuracy"] == tuned[row[end]]["test_accuracy"]
            assert abs(row["test_loss"] - tuned[row[end]]["test_loss"]) < 1e-4
            ends += 1
    assert ends == 2 * 3  # two ends of one path per tuning type
    heads = results.ok_rows(store, "head_similarity")
    assert len(heads) == 3 * study.model.num_layers * study.model.num_heads
    assert all(0.0 <= r["similarity_corresponding"] <= 1.0 + 1e-6 for r in heads)
    distances = results.ok_rows(store, "distances")
    assert len(distances) == 3 + 4 + 4 and all(r["l2"] > 0 and math.isfinite(r["cosine"]) for r in distances)
    assert len(results.ok_rows(store, "compatibility")) == 3

    compatibility, chain = stage("compatibility"), plan_chain(study)
    for cell in (c for c in compatibility.plan(study, chain) if isinstance(c, CompatibilityCell)):
        same = dataclasses.replace(cell, cell_hash="self-" + cell.cell_hash, target_plm_hash=cell.source_plm_hash,
                                   target_plm_index=cell.source_plm_index)
        compatibility.run(Context(study, store, chain), same)
        row = next(r for r in results.ok_rows(store, "compatibility") if r["cell_hash"] == same.cell_hash)
        assert row["test_accuracy"] == tuned[cell.source_tuned_hash]["test_accuracy"], cell.tuning_type
        os.remove(store.local / "results" / "compatibility" / f"{same.cell_hash}.parquet")
