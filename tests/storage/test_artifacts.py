"""The models in the store: the teacher cache on the micro study's real checkpoints (one teacher pass, then hits,
in this process and another), and tuned models recycled onto another PLM."""

import os

import torch

from raysys.stages import methods
from raysys.stages.base import Context
from raysys.stages.chain import plan_chain
from raysys.stages.recipe import encoded_task
from raysys.storage import artifacts


def test_teacher_cache_hits_skip_the_teacher_forward(micro_run):
    study, store, _ = micro_run
    ctx = Context(study, store, plan_chain(study))
    cell = next(c for c in methods.plan_methods(study, ctx.chain) if c.method == "distill")
    task = encoded_task(ctx, cell.task, cell.regime, cell.shots, cell.seed)
    ids = task.encoded["train"][0]
    calls = []

    def load_teacher():
        model = artifacts.load_tuned(store, cell.old_tuned_hash)[0]
        model.register_forward_hook(lambda *_: calls.append(1))
        return model

    key = f"test-data-{os.getpid()}"
    first = artifacts.TeacherCache(store)
    outputs, hit = first.get(cell.old_tuned_hash, key, True, load_teacher, ids, 3, task.pad_id)
    batches = len(calls)
    assert not hit and first.forwards == 1 and batches == -(-len(ids) // 3)
    again, hit = first.get(cell.old_tuned_hash, key, True, load_teacher, ids, 3, task.pad_id)
    assert hit and first.hits == 1 and len(calls) == batches and again.logits is outputs.logits
    other_process = artifacts.TeacherCache(store)  # a new process finds it on disk
    from_disk, hit = other_process.get(cell.old_tuned_hash, key, True, load_teacher, ids, 3, task.pad_id)
    assert hit and other_process.forwards == 0 and len(calls) == batches
    assert torch.equal(from_disk.logits, outputs.logits) and torch.equal(from_disk.hidden, outputs.hidden)
    store.remove_dir(f"artifacts/teacher/{first.key(cell.old_tuned_hash, key, True)}")


def test_a_tuned_model_loads_from_its_own_record_whatever_the_study_says_now(micro_run):
    """raysys.json names the PLM, labels, seed and PET spec: loading needs nothing else, so a later study with
    other PET settings still reads the old adapters right (they are its outdated weights)."""
    _, store, _ = micro_run
    for tuning_type in ("lora", "adapter"):
        tuned = next(h for h in store.list_dirs("artifacts/tuned")
                     if artifacts.tuned_meta(store, h).get("tuning_type") == tuning_type)
        meta = artifacts.tuned_meta(store, tuned)
        model, loaded = artifacts.load_tuned(store, tuned)
        assert loaded == meta and model.pet_spec == {"tuning_type": tuning_type, "seed": meta["seed"],
                                                     "spec": meta["pet"]}
        assert not model.training and model.config.num_labels == len(meta["labels"])
