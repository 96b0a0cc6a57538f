"""Where a method of the methods stage begins (`STARTS`, by `RecyclingMethod.start`) and what it minimises
(`OBJECTIVES`, by its objective): the run code's pieces that differ between methods (raysys.stages.methods runs
them in its one loop). Run code: each imports torch when called.

A start is (ctx, cell, number of labels) -> (the model tuning begins from, the seconds spent training the start
itself or None); an objective is (ctx, cell, task) -> (the loop's objective or None for cross-entropy, what the
row's `teacher` column says).
"""

from __future__ import annotations

import dataclasses
import json

from raysys.stages.base import Context
from raysys.stages.methods import MethodCell, method_tuning_config, text_distill_config
from raysys.storage import results


def fresh_start(ctx: Context, cell: MethodCell, num_labels: int):
    """A fresh seeded head (and PET module) on M_j."""
    from raysys.storage import artifacts

    return artifacts.adapted_classifier(ctx.store, cell.target_plm_hash, num_labels, cell.tuning_type,
                                        ctx.study.tuning.pet_spec(cell.tuning_type), cell.seed)


def recycled_start(ctx: Context, cell: MethodCell, num_labels: int):
    """Δ_i recycled onto M_j: θ_j + (θ_i^τ − θ_i) with the old head; PET: the old module and head on M_j."""
    from raysys.storage import artifacts

    model, _ = artifacts.load_tuned(ctx.store, cell.old_tuned_hash, on_plm=cell.target_plm_hash,
                                    pet_norms=ctx.study.tuning.pet_norms)
    return model.train()


def transferred_start(ctx: Context, cell: MethodCell, num_labels: int):
    """The weights the transfer stage made for M_j with method `cell.transfer` and the setting it chose on dev,
    rebuilt from Δ_i: the run starts where that row scored. A LoRA model's transferred update is in M_j's frozen
    base weights, with fresh factors (B = 0) to tune on top: a DARE or TIES update is not of rank r, and folding it
    keeps the start exact."""
    from raysys.stages.chain import plan_chain, planned_cells
    from raysys.stages.transfer import STAGE as TRANSFER
    from raysys.stages.transfer_run import PairWeights

    source = next(c for c in planned_cells(TRANSFER, ctx.study, plan_chain(ctx.study))
                  if c.cell_hash == cell.transfer_hash)
    chosen = next(r for r in results.read_cell(ctx.store, "transfer", cell.transfer_hash) if r["selected"])
    return PairWeights(ctx, source).transferred(source, json.loads(chosen["setting"])).train()


def text_distilled_start(ctx: Context, cell: MethodCell, num_labels: int):
    """A fresh start on M_j taught by the old model on unlabeled documents of M_j's own domain corpus — no task
    example, no label: T²·KL (and β·½·MSE) for `methods.text_distill.steps`, keeping the state best on the K-shot
    dev set (the regime's only labels besides its training set). The K-shot fine-tune then starts from it. Not
    checkpointed: a resumed cell teaches again (the same seeded run), then its fine-tune continues."""
    import torch

    from raysys.core.classifier_loop import train_classifier
    from raysys.core.objectives import DistillationObjective
    from raysys.stages.recipe import encoded_task, unlabeled_text
    from raysys.storage import artifacts

    study, settings = ctx.study, text_distill_config(ctx.study)
    model = fresh_start(ctx, cell, num_labels)
    text = unlabeled_text(ctx, cell.target_plm_index, settings["sentences"])
    task = encoded_task(ctx, cell.task, cell.regime, cell.shots, cell.seed)
    outputs, _ = artifacts.teacher_cache(ctx.store).get(
        cell.old_tuned_hash, text.data_key, settings["beta"] > 0, lambda: _teacher(ctx, cell), text.ids,
        study.pilot.eval_batch_size, task.pad_id)
    objective = DistillationObjective(settings["temperature"], 1.0, settings["beta"], cached=outputs)
    cfg = method_tuning_config(study, cell.tuning_type, cell.regime)
    cfg = dataclasses.replace(cfg, max_steps=settings["steps"], eval_every_steps=settings["eval_every_steps"],
                              batch_size=settings["batch_size"], lr=settings["lr"] or cfg.lr)
    no_labels = torch.zeros(len(text.ids), dtype=torch.long)  # a = 1: the loss never reads them
    dev = task.encoded["dev"]  # selection only; the phase reports nothing on test, so dev stands in for it
    phase = train_classifier(model, {"train": (text.ids, no_labels), "dev": dev, "test": dev}, cfg, cell.seed,
                             task.pad_id, objective, device=ctx.device)
    return model.train(), phase.train_seconds


# ------------------------------------------------------------------------------------------------- objectives


def cross_entropy(ctx: Context, cell: MethodCell, task) -> tuple:
    return None, None  # the loop's default objective; no teacher


def distillation(ctx: Context, cell: MethodCell, task) -> tuple:
    """(objective, teacher column): the old model on the old PLM as a frozen teacher, its outputs on the training
    set cached once for every cell (and β) of the grid — or run live, in train mode, with `teacher_dropout`."""
    from raysys.core.objectives import DistillationObjective
    from raysys.storage import artifacts

    study = ctx.study
    knobs = {"temperature": cell.temperature, "a": cell.kd_weight, "beta": cell.beta}
    if study.methods.teacher_dropout:
        return DistillationObjective(**knobs, live_teacher=_teacher(ctx, cell)), "live"
    with_hidden = max(study.methods.betas) > 0  # one cache entry serves every β of the grid
    outputs, hit = artifacts.teacher_cache(ctx.store).get(cell.old_tuned_hash, task.data_key, with_hidden,
                                                          lambda: _teacher(ctx, cell), task.encoded["train"][0],
                                                          study.pilot.eval_batch_size, task.pad_id)
    return DistillationObjective(**knobs, cached=outputs), "cache-hit" if hit else "cache-miss"


def _teacher(ctx: Context, cell: MethodCell):
    """The outdated tuned model on its own PLM M_i, on the trial's device: every distilling method's teacher."""
    from raysys.storage import artifacts

    return artifacts.load_tuned(ctx.store, cell.old_tuned_hash)[0].to(ctx.device)


def _untrained(start):
    """A start that trains nothing: (its model, None)."""
    return lambda ctx, cell, num_labels: (start(ctx, cell, num_labels), None)


# start -> (ctx, cell, labels) -> (the model tuning begins from, the seconds spent training it, or None)
STARTS = {"fresh": _untrained(fresh_start), "old_weights": _untrained(recycled_start),
          "transferred": _untrained(transferred_start), "distilled_on_text": text_distilled_start}
OBJECTIVES = {"cross_entropy": cross_entropy, "distillation": distillation}
