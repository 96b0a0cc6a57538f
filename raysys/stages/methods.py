"""Stage `methods`: recycling the outdated Δ_i, tuned on M_i, when tuning the upgraded M_j.

Every method of `config.RECYCLING_METHODS` is one run of the one classifier loop; what differs is where it starts
and what it minimises (raysys.stages.method_starts), in the full-data and K-shot regimes. The T × a × β grid multiplies
only the distilling methods; every other cell names its reference (vanilla) run, which runs first: convergence is
measured against it. The teacher's outputs on a training set are computed once and cached in the store for every
cell that shares them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from raysys.config import RECYCLING_METHODS, REFERENCE_METHOD, StudyConfig, TuningConfig, transfer_not_applicable
from raysys.identity import (
    config_hash,
    data_spec,
    recycling_identity,
    reference_identity,
    tuned_hash,
    tuning_identity,
    world_if_builtin,
)
from raysys.stages.base import Artifact, Context, MissingInputError, Resources, Rows, Stage, View
from raysys.stages.chain import ChainPlan
from raysys.storage import results
from raysys.storage.store import Store


@dataclass(frozen=True)
class MethodSetting:
    """A method on one grid cell of the study: upgrade, task, tuning type, seed, regime."""

    cell_hash: str
    method: str
    task: str
    tuning_type: str
    seed: int
    source_plm_index: int
    target_plm_index: int
    regime: str  # "full" | "kshot"
    shots: int | None  # K per class in the K-shot regime
    old_tuned_hash: str  # Δ_i: the model tuned on M_i
    target_plm_hash: str  # M_j
    vanilla_hash: str  # the reference run this cell is measured against (its own hash for the reference)


@dataclass(frozen=True)
class MethodCell(MethodSetting):
    needs_reference: bool  # the reference run is planned too, and must be done before this cell starts
    temperature: float | None = None  # the distillation knobs (None unless distilling)
    kd_weight: float | None = None
    beta: float | None = None
    transfer: str | None = None  # a transferred start: the transfer method (transfer_init only)
    transfer_hash: str | None = None  # ... and the transfer cell whose dev-chosen setting it starts from


def method_tuning_config(study: StudyConfig, tuning_type: str, regime: str) -> TuningConfig:
    """The tuning settings of one run: the type's learning rate and step budget; the K-shot overrides on top."""
    tuning, kshot = study.tuning, study.methods.kshot
    cfg = dataclasses.replace(tuning, types=(tuning_type,), lr=tuning.lr_for(tuning_type),
                              max_steps=tuning.max_steps_for(tuning_type))
    if regime == "kshot":
        lr = kshot.lr if tuning_type == "finetune" else (kshot.pet_lr or kshot.lr)
        overrides = {"lr": lr, "batch_size": kshot.batch_size, "max_steps": kshot.max_steps,
                     "warmup_fraction": kshot.warmup_fraction, "eval_every_steps": kshot.eval_every_steps}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return cfg


def regimes(study: StudyConfig) -> list[tuple[str, int | None]]:
    out = []
    for regime in study.methods.regimes:
        out += [("kshot", k) for k in study.methods.shots] if regime == "kshot" else [("full", None)]
    return out


def distillation_grid(study: StudyConfig) -> list[dict]:
    m = study.methods
    return [{"temperature": t, "kd_weight": a, "beta": b} for t in m.temperatures for a in m.kd_weights
            for b in m.betas]


def _variants(study: StudyConfig) -> list[tuple[str, dict]]:
    """(method, knobs) of one setting: each method once, the distilling ones once per grid point (none when an
    Optuna search chooses their knobs: the search stage), a transferred start once per transfer method."""
    grid = distillation_grid(study) if study.methods.search.algorithm == "grid" else []
    out = []
    for name, method in RECYCLING_METHODS.items():
        if name not in study.methods.names:
            continue
        if method.distils:
            out += [(name, knobs) for knobs in grid]
        elif method.start == "transferred":
            out += [(name, {"transfer": t}) for t in study.methods.transfer_starts]
        else:
            out.append((name, {}))
    return out


def _transfer_cells(study: StudyConfig, chain: ChainPlan) -> dict[tuple, object]:
    """(task, type, seed, i, j, method) -> the transfer stage's cell, where it applies: what a transferred start
    starts from. None planned (no `transfer_init` cell) where the stage is off or the upgrade is not one of its
    pairs (`transfer.hops`)."""
    from raysys.stages.transfer import STAGE as TRANSFER

    if "transfer_init" not in study.methods.names:
        return {}
    return {(c.task, c.tuning_type, c.seed, c.source_plm_index, c.target_plm_index, c.method): c
            for c in TRANSFER.plan(study, chain)
            if not transfer_not_applicable(c.method, c.tuning_type, len(c.history) + 1)}


def plan_methods(study: StudyConfig, chain: ChainPlan) -> list[MethodCell]:
    """Every method cell, per (upgrade, task, tuning type, seed, regime)."""
    has_reference = REFERENCE_METHOD in study.methods.names
    transfers, cells = _transfer_cells(study, chain), []
    for i, j in study.upgrades:
        source_plm, target_plm = chain.plm_hashes[i], chain.plm_hashes[j]
        for task in study.method_tasks:
            world = world_if_builtin(study, task.source)
            for tuning_type in study.method_types:
                for seed in study.seeds:
                    old = tuned_hash(study, source_plm, task, tuning_type, seed)
                    for regime, shots in regimes(study):
                        identity = tuning_identity(method_tuning_config(study, tuning_type, regime), tuning_type)
                        vanilla = config_hash("method", REFERENCE_METHOD, target_plm, data_spec(task), world, identity, seed,
                                              regime, shots, *reference_identity(study))
                        for method, knobs in _variants(study):
                            reference = method == REFERENCE_METHOD
                            start = RECYCLING_METHODS[method].start
                            if start == "distilled_on_text" and regime != "kshot":
                                continue  # taught without labels, then the K-shot fine-tune
                            if "transfer" in knobs:
                                source = transfers.get((task.name, tuning_type, seed, i, j, knobs["transfer"]))
                                if source is None:
                                    continue
                                knobs = {**knobs, "transfer_hash": source.cell_hash}  # the start is its row's
                            cell_hash = vanilla if reference else config_hash(
                                "method", method, vanilla, old, knobs, study.methods.teacher_dropout,
                                study.methods.target_fraction, *start_identity(study, method, tuning_type, j))
                            cells.append(MethodCell(cell_hash, method, task.name, tuning_type, seed, i, j, regime,
                                                    shots, old, target_plm, vanilla, not reference and has_reference,
                                                    **knobs))
    return cells


def start_identity(study: StudyConfig, method: str, tuning_type: str, target: int | None = None) -> tuple:
    """What a method's start adds to its hash: a start from the old weights moves them onto M_j, so how their
    LayerNorms move counts (`recycling_identity`); a fresh start, and the teacher on the old PLM, move nothing; a
    start taught on text adds that text (M_j's corpus, `target`) and how it was taught."""
    start = RECYCLING_METHODS[method].start
    if start == "distilled_on_text":
        corpus = study.corpora[target]
        return (text_distill_config(study), data_spec(corpus), world_if_builtin(study, corpus.source))
    return recycling_identity(study.tuning, tuning_type) if start == "old_weights" else ()


def text_distill_config(study: StudyConfig) -> dict:
    """The label-free phase's settings, unset batch size and lr filled from the K-shot tuning's."""
    text, kshot = study.methods.text_distill, study.methods.kshot
    return {**dataclasses.asdict(text), "batch_size": text.batch_size or kshot.batch_size or study.tuning.batch_size,
            "lr": text.lr}


class MethodsStage(Stage):
    name = "methods"
    tables = ("methods_runs", "methods_curves")
    cell_types = (MethodCell,)

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[MethodCell]:
        return plan_methods(study, chain)

    def outputs(self, cell: MethodCell):
        return (Rows("methods_runs", cell.cell_hash),)

    def inputs(self, cell: MethodCell):
        """The new PLM; a recycling method's outdated model; the reference run a method is measured against."""
        needs = [Artifact("plm", cell.target_plm_hash)]
        if RECYCLING_METHODS[cell.method].recycles:
            needs.append(Artifact("tuned", cell.old_tuned_hash))
        if cell.needs_reference:
            needs.append(Rows("methods_runs", cell.vanilla_hash))
        if cell.transfer_hash:
            needs.append(Rows("transfer", cell.transfer_hash))
        return tuple(needs)

    def resources(self, study: StudyConfig) -> Resources:
        return Resources.per_trial(study.methods)

    def check(self, study: StudyConfig, store: Store, chain: ChainPlan, cells: list, selected: tuple[str, ...]) -> None:
        super().check(study, store, chain, cells, selected)
        needed = {c.old_tuned_hash for c in cells if RECYCLING_METHODS[c.method].recycles}
        check_old_weights(study, store, needed, "tuning" in selected, "the methods")
        if "transfer" not in selected:
            view = View(store)
            waiting = [c for c in cells if c.transfer_hash and not self.done(c, view)
                       and not view.present(Rows("transfer", c.transfer_hash))]
            if waiting:
                raise MissingInputError(
                    f"{len(waiting)} transfer_init cells start from the transfer stage's rows, which do not exist "
                    f"(e.g. {store.uri('results/transfer/' + waiting[0].transfer_hash + '.parquet')}); run the "
                    "'transfer' stage too, or set methods.transfer_starts=[]")

    def train_tokens(self, study: StudyConfig, cell: MethodCell) -> int:
        cfg = method_tuning_config(study, cell.tuning_type, cell.regime)
        tokens = cfg.max_steps * cfg.batch_size * cfg.max_length
        if RECYCLING_METHODS[cell.method].start == "distilled_on_text":  # its text phase trains too
            text = text_distill_config(study)
            tokens += text["steps"] * text["batch_size"] * cfg.max_length
        return tokens

    def run(self, ctx: Context, cell: MethodCell) -> None:
        run_method_cell(ctx, cell, ctx.checkpointer(cell.cell_hash, ctx.study.tuning.checkpoint_every_seconds))


def check_old_weights(study: StudyConfig, store: Store, needed: set[str], tuning_planned: bool,
                      who: str) -> dict[str, list]:
    """Before any trial: every outdated model a stage recycles must exist (or be made by this run's tuning
    stage), and its label set must be the task's. Returns task -> labels of the tasks checked."""
    from raysys.core import data
    from raysys.core.recycle import WeightMismatchError
    from raysys.stages.recipe import task_config
    from raysys.storage import artifacts

    missing = sorted(h for h in needed if not store.has_artifact("tuned", h))
    if missing and not tuning_planned:
        raise MissingInputError(f"{who} need {len(missing)} outdated tuned model(s) that do not exist, e.g. "
                                f"{store.artifact_uri('tuned', missing[0])}; run the 'tuning' stage first")
    labels: dict[str, list] = {}
    for h in sorted(needed - set(missing)):
        meta = artifacts.tuned_meta(store, h)
        if meta["task"] not in labels:
            labels[meta["task"]] = list(data.load_task(task_config(study, meta["task"]), study.world).labels)
        if meta["labels"] != labels[meta["task"]]:
            raise WeightMismatchError(
                f"teacher {store.artifact_uri('tuned', h)} was tuned with labels {meta['labels']}, but task "
                f"'{meta['task']}' now has labels {labels[meta['task']]}: its outputs do not match the student's")
    return labels


# ------------------------------------------------------------------------------------------------------ run


def convergence(curve: list[dict], dev: str, vanilla_best: float | None, fraction: float) -> dict:
    """Area under the dev curve and the steps/seconds to reach `fraction` of the vanilla run's best dev accuracy
    (the vanilla run measures itself)."""
    from raysys.core.classifier_loop import area_under_curve, steps_to_target

    target = None if vanilla_best is None else fraction * vanilla_best
    reached = steps_to_target(curve, target, f"{dev}_accuracy") if target is not None else None
    return {"auc": area_under_curve(curve, f"{dev}_accuracy"), "target": target,
            "steps": reached[0] if reached else None, "seconds": reached[1] if reached else None}


def _reference_best(store: Store, cell: MethodCell, result) -> dict[str, float | None]:
    if cell.method == REFERENCE_METHOD:
        return {name: s.best_dev_accuracy for name, s in result.selections.items()}
    row = results.ok_cell(store, "methods_runs", cell.vanilla_hash)
    if row is None:
        return {"dev": None, "full_dev": None}
    return {"dev": row["best_dev_accuracy"], "full_dev": row["full_dev_best_accuracy"]}


KEY_COLUMNS = ("method", "task", "tuning_type", "seed", "source_plm_index", "target_plm_index", "regime", "shots",
               "temperature", "kd_weight", "beta", "transfer")


def run_method_cell(ctx: Context, cell: MethodCell, checkpointer=None, table: str = "methods_runs",
                    lr: float | None = None, extra: dict | None = None) -> dict:
    """Run one method cell, write its row to `table` (and, for the grid's own table, its curve); returns the row.
    An Optuna trial passes its own `lr`, its table and the columns naming its search (`extra`)."""
    from raysys.core import compute
    from raysys.core.classifier_loop import train_classifier
    from raysys.stages.method_starts import OBJECTIVES, STARTS
    from raysys.stages.recipe import encoded_task

    study, store = ctx.study, ctx.store
    started = results.now()
    task = encoded_task(ctx, cell.task, cell.regime, cell.shots, cell.seed)
    cfg = method_tuning_config(study, cell.tuning_type, cell.regime)
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    recipe = RECYCLING_METHODS[cell.method]
    compute.seed_all(cell.seed)
    model, start_seconds = STARTS[recipe.start](ctx, cell, len(task.task.labels))
    objective, teacher = OBJECTIVES[recipe.objective](ctx, cell, task)
    compute.seed_all(cell.seed)
    result = train_classifier(model, task.encoded, cfg, cell.seed, task.pad_id, objective, device=ctx.device,
                              eval_at_start=True, checkpointer=checkpointer)
    full_dev = "full_dev" if "full_dev" in result.selections else "dev"
    reference = _reference_best(store, cell, result)
    fraction = study.methods.target_fraction
    conv = {name: convergence(result.curve, name, reference[name], fraction) for name in {"dev", full_dev}}
    key = {k: getattr(cell, k) for k in KEY_COLUMNS}
    recycles_norms = recipe.start in ("old_weights", "transferred") and study.tuning.trains_norms(cell.tuning_type)
    moved = {"pet_norms": study.tuning.pet_norms} if recycles_norms else {}  # in the row's config, either policy
    if table == "methods_runs":
        curve = [{**key, **row, "full_dev_accuracy": row.get(f"{full_dev}_accuracy"),
                  "full_dev_loss": row.get(f"{full_dev}_loss")} for row in result.curve]
        results.write_rows(store, "methods_curves", cell.cell_hash, curve)
    dev, full = result.primary, result.selections[full_dev]
    row = {
        **(extra or {}), **results.provenance(started), **key, "old_tuned_hash": cell.old_tuned_hash,
        "target_plm_hash": cell.target_plm_hash, "vanilla_hash": cell.vanilla_hash, "lr": cfg.lr,
        "max_steps": cfg.max_steps, "num_train": len(task.encoded["train"][0]), "num_dev": len(task.encoded["dev"][0]),
        "start_dev_accuracy": result.curve[0]["dev_accuracy"],
        "best_step": dev.best_step, "best_dev_accuracy": dev.best_dev_accuracy, "test_accuracy": dev.test_accuracy,
        "test_loss": dev.test_loss, "dev_auc": conv["dev"]["auc"], "target_dev_accuracy": conv["dev"]["target"],
        "steps_to_target": conv["dev"]["steps"], "seconds_to_target": conv["dev"]["seconds"],
        "full_dev_best_step": full.best_step, "full_dev_best_accuracy": full.best_dev_accuracy,
        "full_dev_test_accuracy": full.test_accuracy, "full_dev_auc": conv[full_dev]["auc"],
        "full_dev_target_accuracy": conv[full_dev]["target"], "full_dev_steps_to_target": conv[full_dev]["steps"],
        "full_dev_seconds_to_target": conv[full_dev]["seconds"], "teacher": teacher,
        "train_seconds": result.train_seconds, "start_train_seconds": start_seconds,
        "resumed_from_step": result.resumed_from_step,
        "device": compute.device_name(ctx.device),
        "config": json.dumps({**tuning_identity(cfg, cell.tuning_type), **moved,
                              "teacher_dropout": study.methods.teacher_dropout, "target_fraction": fraction}),
    }
    results.write_rows(store, table, cell.cell_hash, [row])
    if checkpointer:
        checkpointer.done()
    return row


STAGE = MethodsStage()
