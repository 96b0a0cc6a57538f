"""Stage `training_free` (the paper's appendix): per upgrade, PET type and seed, a weight map of old PET weights
trained by distillation on one task's old weights (`map_task`), then applied without training to every task's
old weights on the new PLM — against the old weights applied directly."""

from __future__ import annotations

from dataclasses import dataclass

from raysys.config import FULL_FINETUNING, StudyConfig
from raysys.identity import config_hash, recycling_identity, tuned_hash
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage
from raysys.stages.chain import ChainPlan
from raysys.stages.methods import check_old_weights
from raysys.storage import results
from raysys.storage.store import Store


@dataclass(frozen=True)
class TrainingFreeCell:
    cell_hash: str
    tuning_type: str
    seed: int
    source_plm_index: int
    target_plm_index: int
    map_task: str
    target_plm_hash: str
    old_tuned: dict  # task -> the outdated tuned model of that task (on M_i)


class TrainingFreeStage(Stage):
    name = "training_free"
    tables = ("training_free",)
    cell_types = (TrainingFreeCell,)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[TrainingFreeCell]:
        config = study.methods.training_free
        if not config.enabled:
            return []
        cells = []
        tasks = study.training_free_tasks
        for i, j in study.upgrades:
            source_plm, target_plm = chain.plm_hashes[i], chain.plm_hashes[j]
            for tuning_type in (t for t in study.method_types if t != FULL_FINETUNING):
                for seed in study.seeds:
                    old = {t.name: tuned_hash(study, source_plm, t, tuning_type, seed) for t in tasks}
                    moved = recycling_identity(study.tuning, tuning_type)  # the map's inputs and the direct baseline
                    cells += [TrainingFreeCell(config_hash("training_free", old, map_task.name, target_plm, config,
                                                           study.tuning.max_length, seed, *moved),
                                               tuning_type, seed, i, j, map_task.name, target_plm, old)
                              for map_task in tasks]
        return cells

    def outputs(self, cell: TrainingFreeCell):
        return (Rows("training_free", cell.cell_hash),)

    def inputs(self, cell: TrainingFreeCell):
        return (Artifact("plm", cell.target_plm_hash), *(Artifact("tuned", h) for h in cell.old_tuned.values()))

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.methods)

    def check(self, study: StudyConfig, store: Store, chain: ChainPlan, cells: list, selected: tuple[str, ...]) -> None:
        """Also: a map trained on one task's classifier applies only to tasks with as many labels."""
        from raysys.core.recycle import WeightMismatchError

        super().check(study, store, chain, cells, selected)
        labels = check_old_weights(study, store, {h for c in cells for h in c.old_tuned.values()},
                                   "tuning" in selected, "the training-free maps")
        counts = {t: len(labels[t]) for t in {t for c in cells for t in c.old_tuned} if t in labels}
        if len(set(counts.values())) > 1:
            raise WeightMismatchError(f"methods.training_free.tasks: a weight map trained on one task's classifier "
                                      f"applies only to tasks with as many labels, but the label counts are {counts}")

    def train_tokens(self, study: StudyConfig, cell: TrainingFreeCell) -> int:
        config = study.methods.training_free
        return config.steps * config.batch_size * study.tuning.max_length

    def run(self, ctx: Context, cell: TrainingFreeCell) -> None:
        import torch

        from raysys.core import pet
        from raysys.core.classifier_loop import evaluate
        from raysys.core.weight_map import train_weight_map
        from raysys.stages.recipe import encoded_task
        from raysys.storage import artifacts

        study, store, device = ctx.study, ctx.store, ctx.device
        started = results.now()
        config = study.methods.training_free
        map_data = encoded_task(ctx, cell.map_task, "full", None, cell.seed)
        old_hash = cell.old_tuned[cell.map_task]
        teacher, _ = artifacts.teacher_cache(store).get(
            old_hash, map_data.data_key, False, lambda: artifacts.load_tuned(store, old_hash)[0].to(device),
            map_data.encoded["train"][0], study.pilot.eval_batch_size, map_data.pad_id)
        pet_norms = study.tuning.pet_norms  # the student, the map's inputs and the direct baseline all follow it
        student, _ = artifacts.load_tuned(store, old_hash, on_plm=cell.target_plm_hash, pet_norms=pet_norms)
        student.to(device)
        old_state = pet.trainable_state_dict(student)
        weight_map, final_loss = train_weight_map(student, old_state, map_data.encoded["train"], map_data.pad_id,
                                                  teacher, config.steps, config.lr, config.batch_size,
                                                  config.temperature, config.kd_weight, config.rank, cell.seed)
        batch = study.pilot.eval_batch_size
        rows = []
        for task_name, tuned in cell.old_tuned.items():
            target = map_data if task_name == cell.map_task else encoded_task(ctx, task_name, "full", None, cell.seed)
            model, _ = artifacts.load_tuned(store, tuned, on_plm=cell.target_plm_hash, pet_norms=pet_norms)
            model.to(device)
            direct = {s: evaluate(model, *target.encoded[s], batch, target.pad_id, device)[0] for s in ("dev", "test")}
            with torch.no_grad():
                mapped = weight_map(pet.trainable_state_dict(model))
            pet.load_trainable_state(model, {**pet.trainable_state_dict(model), **mapped})
            after = {s: evaluate(model, *target.encoded[s], batch, target.pad_id, device)[0] for s in ("dev", "test")}
            rows.append({**results.provenance(started), "tuning_type": cell.tuning_type, "seed": cell.seed,
                         "source_plm_index": cell.source_plm_index, "target_plm_index": cell.target_plm_index,
                         "map_task": cell.map_task, "task": task_name, "rank": config.rank, "map_steps": config.steps,
                         "map_final_loss": final_loss, "mapped_dev_accuracy": after["dev"],
                         "mapped_test_accuracy": after["test"], "direct_dev_accuracy": direct["dev"],
                         "direct_test_accuracy": direct["test"]})
        results.write_rows(store, "training_free", cell.cell_hash, rows)


STAGE = TrainingFreeStage()
