"""Stage `tuning`: every tuned PLM × task × tuning type × seed, through the one classifier loop. The tuned model is
an artifact (fine-tuning: the whole classifier; PET: its trainable weights), with its run row and dev curve."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from raysys.config import StudyConfig
from raysys.identity import tuned_hash, tuning_identity
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage
from raysys.stages.chain import ChainPlan, control_indices
from raysys.storage import results


@dataclass(frozen=True)
class TuningCell:
    cell_hash: str
    chain: str
    plm_index: int
    plm_hash: str
    task: str
    tuning_type: str
    seed: int


def type_config(study: StudyConfig, tuning_type: str):
    """The tuning settings of one type: its own learning rate and step budget."""
    tuning = study.tuning
    return dataclasses.replace(tuning, types=(tuning_type,), lr=tuning.lr_for(tuning_type),
                               max_steps=tuning.max_steps_for(tuning_type))


class TuningStage(Stage):
    name = "tuning"
    tables = ("tuning_runs", "tuning_curves")
    cell_types = (TuningCell,)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[TuningCell]:
        """The main chain's tuned PLMs, and the control PLMs some control pair needs."""
        targets = [("main", i) for i in study.plms_to_tune] + [("control", j) for j in control_indices(study)]
        cells = []
        for chain_name, index in targets:
            plm_hash = chain.hashes(chain_name)[index]
            for task in study.tasks:
                for tuning_type in study.tuning.types:
                    for seed in study.seeds:
                        cells.append(TuningCell(tuned_hash(study, plm_hash, task, tuning_type, seed), chain_name,
                                                index, plm_hash, task.name, tuning_type, seed))
        return cells

    def outputs(self, cell: TuningCell):
        return Rows("tuning_runs", cell.cell_hash), Artifact("tuned", cell.cell_hash)

    def inputs(self, cell: TuningCell):
        return (Artifact("plm", cell.plm_hash),)

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.tuning)

    def train_tokens(self, study: StudyConfig, cell: TuningCell) -> int:
        t = study.tuning
        return t.max_steps_for(cell.tuning_type) * t.batch_size * t.max_length

    def run(self, ctx: Context, cell: TuningCell) -> None:
        from raysys.core import compute, models
        from raysys.core.classifier_loop import train_classifier
        from raysys.stages.recipe import encoded_task, task_config
        from raysys.storage import artifacts

        study, store = ctx.study, ctx.store
        started = results.now()
        spec = task_config(study, cell.task)
        task = encoded_task(ctx, cell.task)
        compute.seed_all(cell.seed)
        labels = task.task.labels
        model = artifacts.adapted_classifier(store, cell.plm_hash, len(labels), cell.tuning_type,
                                             study.tuning.pet_spec(cell.tuning_type), cell.seed)
        cfg = type_config(study, cell.tuning_type)
        checkpointer = ctx.checkpointer(cell.cell_hash, study.tuning.checkpoint_every_seconds)
        result = train_classifier(model, task.encoded, cfg, cell.seed, task.pad_id, device=ctx.device,
                                  checkpointer=checkpointer)
        model.cpu()
        best = result.primary
        meta = {"tuning_type": cell.tuning_type, "plm_hash": cell.plm_hash, "task": cell.task, "seed": cell.seed,
                "labels": list(labels), "pet": study.tuning.pet_spec(cell.tuning_type)}
        artifacts.save_tuned(store, cell.cell_hash, model, labels, meta)  # the best-dev state
        key = {"chain": cell.chain, "plm_index": cell.plm_index, "task": cell.task, "tuning_type": cell.tuning_type,
               "seed": cell.seed}
        results.write_rows(store, "tuning_curves", cell.cell_hash, [{**key, **row} for row in result.curve])
        results.write_rows(store, "tuning_runs", cell.cell_hash, [{
            **results.provenance(started), **key, "plm_hash": cell.plm_hash,
            "plm_domain": study.corpora[cell.plm_index].name, "task_domain": spec.domain,
            "lr": cfg.lr, "max_steps": cfg.max_steps, "num_train": len(task.task.splits["train"]),
            "num_labels": len(labels), "num_parameters": models.count_parameters(model),
            "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "best_step": best.best_step, "best_dev_accuracy": best.best_dev_accuracy,
            "best_dev_loss": best.best_dev_loss, "test_accuracy": best.test_accuracy, "test_loss": best.test_loss,
            "train_seconds": result.train_seconds, "resumed_from_step": result.resumed_from_step,
            "device": compute.device_name(ctx.device),
            "config": json.dumps(tuning_identity(study.tuning, cell.tuning_type)),
        }])
        if checkpointer:
            checkpointer.done()


STAGE = TuningStage()
