"""Recyclable tuning: the outdated weights Δ_i, tuned on M_i, reused when tuning the upgraded M_j.

Every method is one run of the one training loop (`raysys.tune.train_classifier`); what differs is the start
point and the objective:

    vanilla   a fresh head (and PET module) on M_j              cross-entropy
    init      θ_j + (θ_i^τ − θ_i) and the old head / the old module and head plugged into M_j
                                                                cross-entropy
    distill   a fresh start on M_j                              (1 − a)·CE + a·T²·KL + β·½·MSE, teacher Δ_i on M_i
    combined  the init start                                    the distillation loss

in the full-data and K-shot regimes. The teacher's outputs on a training set are computed once and cached in the
store for every cell that shares them. The appendix's training-free recycling (a learned map of old PET weights)
is at the end.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from raysys import data, models, pet, results, stages
from raysys.compute import trial_device
from raysys.config import METHODS, StudyConfig, TuningConfig, config_hash  # noqa: F401 — METHODS re-exported
from raysys.recycle import WeightMismatchError
from raysys.store import Store
from raysys.tune import (
    DistillationObjective,
    TeacherOutputs,
    area_under_curve,
    distillation_loss,
    evaluate,
    steps_to_target,
    teacher_outputs,
    train_classifier,
)

DISTILLING = ("distill", "combined")
RECYCLING = ("init", "distill", "combined")


class MissingInputError(RuntimeError):
    """A method needs an artifact (outdated tuned weights, a PLM) that does not exist and will not be made."""


# ------------------------------------------------------------------------------------------------------ plan


def method_tuning_config(study: StudyConfig, tuning_type: str, regime: str) -> TuningConfig:
    """The tuning settings of one run: the type's learning rate and step budget; the K-shot overrides on top."""
    tuning, kshot = study.tuning, study.methods.kshot
    cfg = dataclasses.replace(study.tuning, types=(tuning_type,), lr=tuning.lr_for(tuning_type),
                              max_steps=tuning.max_steps_for(tuning_type))
    if regime == "kshot":
        lr = kshot.lr if tuning_type == "finetune" else (kshot.pet_lr or kshot.lr)
        overrides = {"lr": lr, "batch_size": kshot.batch_size, "max_steps": kshot.max_steps,
                     "warmup_fraction": kshot.warmup_fraction, "eval_every_steps": kshot.eval_every_steps}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return cfg


def _regimes(study: StudyConfig) -> list[tuple[str, int | None]]:
    out = []
    for regime in study.methods.regimes:
        out += [("kshot", k) for k in study.methods.shots] if regime == "kshot" else [("full", None)]
    return out


def _grid(study: StudyConfig) -> list[dict]:
    m = study.methods
    return [{"temperature": t, "kd_weight": a, "beta": b} for t in m.temperatures for a in m.kd_weights
            for b in m.betas]


def plan_methods(study: StudyConfig, chain: stages.ChainPlan) -> list[dict]:
    """Every method cell. The T × a × β grid multiplies only the distilling methods; vanilla and init appear once
    per (upgrade, task, tuning type, seed, regime). Every non-vanilla cell names its vanilla reference."""
    cells = []
    for i, j in study.upgrades:
        source_plm, target_plm = chain.plm_hashes[i], chain.plm_hashes[j]
        for task in study.method_tasks:
            world = stages._world_if_builtin(study, task.source)
            for tuning_type in study.method_types:
                for seed in study.seeds:
                    old = stages.tuned_hash(study, source_plm, task, tuning_type, seed)
                    for regime, shots in _regimes(study):
                        cfg = method_tuning_config(study, tuning_type, regime)
                        identity = stages.tuning_identity(cfg, tuning_type)
                        base = {"task": task.name, "tuning_type": tuning_type, "seed": seed, "source_plm_index": i,
                                "target_plm_index": j, "regime": regime, "shots": shots, "old_tuned_hash": old,
                                "target_plm_hash": target_plm}
                        vanilla = config_hash("method", "vanilla", target_plm, task, world, identity, seed, regime,
                                              shots)
                        variants = [("vanilla", {})] * ("vanilla" in study.methods.methods)
                        variants += [("init", {})] * ("init" in study.methods.methods)
                        if study.methods.search.algorithm == "grid":  # else Optuna searches them: plan_searches
                            variants += [(m, g) for m in DISTILLING if m in study.methods.methods
                                         for g in _grid(study)]
                        for method, knobs in variants:
                            h = vanilla if method == "vanilla" else config_hash(
                                "method", method, vanilla, old, knobs, study.methods.teacher_dropout,
                                study.methods.target_fraction)
                            cells.append({**base, "cell_hash": h, "method": method, "vanilla_hash": vanilla,
                                          "temperature": None, "kd_weight": None, "beta": None, **knobs})
    return cells


def plan_searches(study: StudyConfig, chain: stages.ChainPlan) -> list[dict]:
    """With `methods.search.algorithm = optuna`: one search per grid cell (upgrade, task, tuning type, seed, regime)
    and method. A search names its fixed-lr vanilla reference; its trials are cells of `methods_search`.
    Needs `vanilla` among the methods (the reference every convergence measure is taken against)."""
    search = study.methods.search
    if search.algorithm != "optuna":
        return []
    references = {c["vanilla_hash"]: c for c in plan_methods(study, chain) if c["method"] == "vanilla"}
    # The budget is not part of a search's identity: a larger one continues the same search.
    space = {k: v for k, v in dataclasses.asdict(search).items() if k not in ("algorithm", "trials")}
    out = []
    for vanilla_hash, ref in references.items():
        for method in study.methods.methods:
            h = config_hash("search", method, vanilla_hash, ref["old_tuned_hash"], space,
                            study.methods.teacher_dropout, study.methods.target_fraction)
            out.append({**ref, "method": method, "search_hash": h})
    return out


def search_space_bounds(study: StudyConfig, method: str) -> dict[str, tuple[float, float]]:
    """The knobs a search of `method` tunes, with their ranges (lr log-uniform, the rest uniform)."""
    s = study.methods.search
    knobs = {"lr": s.lr}
    if method in DISTILLING:
        knobs.update(temperature=s.temperature, kd_weight=s.kd_weight, beta=s.beta)
    return knobs


def search_trial_cell(search: dict, knobs: dict) -> dict:
    """The method cell of one search trial. Knobs are rounded to 6 significant digits so that a value proposed
    again (a resumed search) addresses the same cell."""
    knobs = {k: float(f"{v:.6g}") for k, v in knobs.items()}
    return {**search, **{k: knobs.get(k) for k in ("temperature", "kd_weight", "beta")}, "lr": knobs["lr"],
            "cell_hash": config_hash("search-trial", search["search_hash"], knobs)}


def plan_training_free(study: StudyConfig, chain: stages.ChainPlan) -> list[dict]:
    """One cell per (upgrade, PET type, seed, task the map is trained on); each maps every task's old weights."""
    if not study.methods.training_free.enabled:
        return []
    cells = []
    for i, j in study.upgrades:
        source_plm, target_plm = chain.plm_hashes[i], chain.plm_hashes[j]
        for tuning_type in (t for t in study.method_types if t != "finetune"):
            for seed in study.seeds:
                tasks = study.training_free_tasks
                old = {t.name: stages.tuned_hash(study, source_plm, t, tuning_type, seed) for t in tasks}
                for map_task in tasks:
                    cells.append({
                        "cell_hash": config_hash("training_free", old, map_task.name, target_plm,
                                                 study.methods.training_free, study.tuning.max_length, seed),
                        "tuning_type": tuning_type, "seed": seed, "source_plm_index": i, "target_plm_index": j,
                        "map_task": map_task.name, "target_plm_hash": target_plm, "old_tuned": old})
    return cells


def needed_old_weights(method_cells: list[dict], free_cells: list[dict]) -> set[str]:
    return ({c["old_tuned_hash"] for c in method_cells if c["method"] != "vanilla"}
            | {h for c in free_cells for h in c["old_tuned"].values()})


def check_inputs(study: StudyConfig, store: Store, chain: stages.ChainPlan, method_cells: list[dict],
                 free_cells: list[dict], tuning_planned: bool) -> None:
    """Before any trial: every outdated model a method recycles must exist (or be made by this run's tuning
    stage), and its label set must be the task's."""
    needed = needed_old_weights(method_cells, free_cells)
    missing = sorted(h for h in needed if not store.has_artifact("tuned", h))
    if missing and not tuning_planned:
        raise MissingInputError(f"the methods need {len(missing)} outdated tuned model(s) that do not exist, e.g. "
                                f"{store.artifact_uri('tuned', missing[0])}; run the 'tuning' stage first")
    labels = {}
    for h in sorted(needed - set(missing)):
        meta = stages.tuned_meta(store, h)
        if meta["task"] not in labels:
            labels[meta["task"]] = list(data.load_task(stages._task(study, meta["task"]), study.world).labels)
        if meta["labels"] != labels[meta["task"]]:
            raise WeightMismatchError(
                f"teacher {store.artifact_uri('tuned', h)} was tuned with labels {meta['labels']}, but task "
                f"'{meta['task']}' now has labels {labels[meta['task']]}: its outputs do not match the student's")
    counts = {t: len(labels[t]) for t in {t for c in free_cells for t in c["old_tuned"]} if t in labels}
    if len(set(counts.values())) > 1:
        raise WeightMismatchError(f"methods.training_free.tasks: a weight map trained on one task's classifier "
                                  f"applies only to tasks with as many labels, but the label counts are {counts}")


# ------------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class MethodData:
    task: data.TaskData
    encoded: dict  # split -> (ids, labels); `full_dev` too in the K-shot regime
    pad_id: int
    data_key: str  # identifies the training examples, in order (for the teacher cache)


def method_data(study: StudyConfig, store: Store, chain: stages.ChainPlan, task_name: str, regime: str,
                shots: int | None, seed: int) -> MethodData:
    tokenizer = _tokenizer(str(store.artifact("tokenizer", chain.tokenizer_hash)))
    task_cfg = stages._task(study, task_name)
    task = data.load_task(task_cfg, study.world)
    if regime == "kshot":
        task = data.k_shot(task, shots, seed)
    key = config_hash("data", task_cfg, stages._world_if_builtin(study, task_cfg.source), regime, shots, seed,
                      study.tuning.max_length, chain.tokenizer_hash)
    return MethodData(task, data.encode_task(task, tokenizer, study.tuning.max_length), tokenizer.pad_token_id, key)


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    return models.load_tokenizer(path)


# --------------------------------------------------------------------------------------------- teacher cache


class TeacherCache:
    """Teacher outputs on a training set, stored once per (teacher, data, with hidden states) under
    `artifacts/teacher/` and shared by every cell — in any process — that distils from the same teacher on the
    same examples. `forwards` counts teacher passes actually run, `hits` the times the cache answered."""

    def __init__(self, store: Store):
        self.store, self.forwards, self.hits = store, 0, 0
        self._memory: dict[str, TeacherOutputs] = {}

    def key(self, teacher_hash: str, data_key: str, with_hidden: bool) -> str:
        return config_hash("teacher", teacher_hash, data_key, with_hidden)

    def get(self, teacher_hash: str, data_key: str, with_hidden: bool, load_teacher, ids, batch_size: int,
            pad_id: int) -> tuple[TeacherOutputs, bool]:
        """(outputs, hit). `load_teacher()` is called only on a miss."""
        key = self.key(teacher_hash, data_key, with_hidden)
        if key in self._memory:
            self.hits += 1
            return self._memory[key], True
        if self.store.has_artifact("teacher", key):
            tensors = load_file(str(self.store.artifact("teacher", key) / "outputs.safetensors"))
            outputs, hit = TeacherOutputs(tensors["logits"], tensors.get("hidden")), True
            self.hits += 1
        else:
            outputs, hit = teacher_outputs(load_teacher(), ids, batch_size, pad_id, with_hidden), False
            self.forwards += 1
            with self.store.writing_artifact("teacher", key) as tmp:
                tensors = {"logits": outputs.logits} | ({"hidden": outputs.hidden} if with_hidden else {})
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "outputs.safetensors"))
                (tmp / "raysys.json").write_text(json.dumps({"teacher": teacher_hash, "data": data_key}))
        if len(outputs.logits) != len(ids):
            raise WeightMismatchError(f"teacher cache {self.store.artifact_uri('teacher', key)}: "
                                      f"{len(outputs.logits)} examples, the data has {len(ids)}")
        self._memory = {key: outputs}  # one entry: the cells of a trial usually share it
        return outputs, hit


_CACHES: dict[str, TeacherCache] = {}


def teacher_cache(store: Store) -> TeacherCache:
    """One cache per store and process, so that a reused Tune actor keeps its in-memory entry across cells."""
    return _CACHES.setdefault(store.root, TeacherCache(store))


# ------------------------------------------------------------------------------------------------------ cells


def start_model(study: StudyConfig, store: Store, cell: dict, num_labels: int):
    """Where a method starts on M_j: fresh (vanilla, distill) or recycled from Δ_i (init, combined)."""
    stages._set_seed(cell["seed"])
    if cell["method"] in ("init", "combined"):
        model, _ = stages.load_tuned(study, store, cell["old_tuned_hash"], on_plm=cell["target_plm_hash"])
        return model.train()
    return stages.adapted_classifier(study, store, cell["target_plm_hash"], num_labels, cell["tuning_type"],
                                     cell["seed"])


def _objective(study: StudyConfig, store: Store, cell: dict, md: MethodData):
    """(objective, teacher column) for the cell's method."""
    if cell["method"] not in DISTILLING:
        return None, None
    knobs = {"temperature": cell["temperature"], "a": cell["kd_weight"], "beta": cell["beta"]}

    def load_teacher():
        return stages.load_tuned(study, store, cell["old_tuned_hash"])[0].to(trial_device())

    if study.methods.teacher_dropout:
        return DistillationObjective(**knobs, live_teacher=load_teacher()), "live"
    with_hidden = max(study.methods.betas) > 0  # one cache entry serves every β of the grid
    outputs, hit = teacher_cache(store).get(cell["old_tuned_hash"], md.data_key, with_hidden, load_teacher,
                                            md.encoded["train"][0], study.pilot.eval_batch_size, md.pad_id)
    return DistillationObjective(**knobs, cached=outputs), "cache-hit" if hit else "cache-miss"


def convergence(curve: list[dict], dev: str, vanilla_best: float | None, fraction: float) -> dict:
    """Area under the dev curve and the steps/seconds to reach `fraction` of the vanilla run's best dev accuracy
    (the vanilla run measures itself)."""
    target = None if vanilla_best is None else fraction * vanilla_best
    reached = steps_to_target(curve, target, f"{dev}_accuracy") if target is not None else None
    return {"auc": area_under_curve(curve, f"{dev}_accuracy"), "target": target,
            "steps": reached[0] if reached else None, "seconds": reached[1] if reached else None}


def _vanilla_best(store: Store, cell: dict, result) -> dict[str, float | None]:
    if cell["method"] == "vanilla":
        return {name: s.best_dev_accuracy for name, s in result.selections.items()}
    row = results.ok_cell(store, "methods_runs", cell["vanilla_hash"])
    if row is None:
        return {"dev": None, "full_dev": None}
    return {"dev": row["best_dev_accuracy"], "full_dev": row["full_dev_best_accuracy"]}


_KEY = ("method", "task", "tuning_type", "seed", "source_plm_index", "target_plm_index", "regime", "shots",
        "temperature", "kd_weight", "beta")


def run_method_cell(study: StudyConfig, store: Store, chain: stages.ChainPlan, cell: dict,
                    checkpointer=None) -> None:
    """A cell of the methods grid, or (a cell with `search_hash`) a trial of an Optuna search with its own lr:
    `methods_search` then holds its row, and its curve is not kept."""
    started = results.now()
    md = method_data(study, store, chain, cell["task"], cell["regime"], cell["shots"], cell["seed"])
    cfg = method_tuning_config(study, cell["tuning_type"], cell["regime"])
    searching = "search_hash" in cell
    if searching:
        cfg = dataclasses.replace(cfg, lr=cell["lr"])
    model = start_model(study, store, cell, len(md.task.labels))
    objective, teacher = _objective(study, store, cell, md)
    stages._set_seed(cell["seed"])
    result = train_classifier(model, md.encoded, cfg, cell["seed"], md.pad_id, objective, device=trial_device(),
                              eval_at_start=True, checkpointer=checkpointer)
    full_dev = "full_dev" if "full_dev" in result.selections else "dev"
    vanilla = _vanilla_best(store, cell, result)
    fraction = study.methods.target_fraction
    conv = {name: convergence(result.curve, name, vanilla[name], fraction) for name in {"dev", full_dev}}
    key = {k: cell[k] for k in _KEY}
    curve = [{**key, **row, "full_dev_accuracy": row.get(f"{full_dev}_accuracy"),
              "full_dev_loss": row.get(f"{full_dev}_loss")} for row in result.curve]
    if not searching:
        results.write_rows(store, "methods_curves", cell["cell_hash"], curve)
    dev, full = result.primary, result.selections[full_dev]
    results.write_rows(store, "methods_search" if searching else "methods_runs", cell["cell_hash"], [{
        **({"search_hash": cell["search_hash"]} if searching else {}),
        **results.provenance(started), **key, "old_tuned_hash": cell["old_tuned_hash"],
        "target_plm_hash": cell["target_plm_hash"], "vanilla_hash": cell["vanilla_hash"], "lr": cfg.lr,
        "max_steps": cfg.max_steps, "num_train": len(md.encoded["train"][0]), "num_dev": len(md.encoded["dev"][0]),
        "start_dev_accuracy": result.curve[0]["dev_accuracy"],
        "best_step": dev.best_step, "best_dev_accuracy": dev.best_dev_accuracy, "test_accuracy": dev.test_accuracy,
        "test_loss": dev.test_loss, "dev_auc": conv["dev"]["auc"], "target_dev_accuracy": conv["dev"]["target"],
        "steps_to_target": conv["dev"]["steps"], "seconds_to_target": conv["dev"]["seconds"],
        "full_dev_best_step": full.best_step, "full_dev_best_accuracy": full.best_dev_accuracy,
        "full_dev_test_accuracy": full.test_accuracy, "full_dev_auc": conv[full_dev]["auc"],
        "full_dev_target_accuracy": conv[full_dev]["target"], "full_dev_steps_to_target": conv[full_dev]["steps"],
        "full_dev_seconds_to_target": conv[full_dev]["seconds"], "teacher": teacher,
        "train_seconds": result.train_seconds, "resumed_from_step": result.resumed_from_step,
        "config": json.dumps({**stages.tuning_identity(cfg, cell["tuning_type"]),
                              "teacher_dropout": study.methods.teacher_dropout, "target_fraction": fraction}),
    }])
    if checkpointer:
        checkpointer.done()


# ------------------------------------------------------------------------------------- training-free recycling


def _mapped_names(state: dict) -> list[str]:
    """The PET module's matrices (LoRA A/B, adapter down/up weights); biases, LayerNorms and head carry over."""
    return sorted(n for n, v in state.items() if v.dim() == 2 and pet.is_module_weight(n))


class WeightMap(nn.Module):
    """w' = w + w·W1·W2 + b per module matrix w (out × in): W1 (in × r), W2 (r × in), b (in). W2 and b start at
    zero, so the untrained map is the identity — direct application of the old weights."""

    def __init__(self, shapes: dict[str, torch.Size], rank: int):
        super().__init__()
        self.names = sorted(shapes)
        self.w1 = nn.ParameterList([nn.Parameter(torch.randn(shapes[n][1], rank) * 0.01) for n in self.names])
        self.w2 = nn.ParameterList([nn.Parameter(torch.zeros(rank, shapes[n][1])) for n in self.names])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(shapes[n][1])) for n in self.names])

    def forward(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise WeightMismatchError(f"the weight map expects module weights {missing[:3]} that are not there")
        return {n: state[n] + state[n] @ w1 @ w2 + b for n, w1, w2, b in zip(self.names, self.w1, self.w2, self.b)}


def train_weight_map(student, old_state: dict, md: MethodData, teacher: TeacherOutputs, steps: int, lr: float,
                     batch_size: int, temperature: float, kd_weight: float, rank: int, seed: int):
    """Fit a WeightMap so that the student (old module mapped onto the new backbone) matches the teacher on the
    map task, with the distillation loss; only the map trains. Returns (map, final loss)."""
    names = _mapped_names(old_state)
    torch.manual_seed(seed)
    weight_map = WeightMap({n: old_state[n].shape for n in names}, rank)
    for p in student.parameters():
        p.requires_grad_(False)
    student.train()
    device = next(student.parameters()).device
    weight_map.to(device)
    old_state = {n: v.to(device) for n, v in old_state.items()}
    optimizer = torch.optim.AdamW(weight_map.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    ids, labels = md.encoded["train"]
    step, loss = 0, torch.tensor(float("nan"))
    while step < steps:
        for input_ids, mask, y, index in data.iterate_batches(ids, labels, batch_size, md.pad_id, generator,
                                                              with_index=True):
            mapped = weight_map({n: old_state[n] for n in names})
            logits = functional_call(student, mapped, args=(), kwargs={"input_ids": input_ids.to(device),
                                                                       "attention_mask": mask.to(device)}).logits
            loss, _ = distillation_loss(logits, y.to(device), teacher.logits[index].to(device), temperature,
                                        kd_weight, 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    return weight_map.eval(), float(loss.detach())


def run_training_free_cell(study: StudyConfig, store: Store, chain: stages.ChainPlan, cell: dict) -> None:
    started = results.now()
    tf = study.methods.training_free
    md = method_data(study, store, chain, cell["map_task"], "full", None, cell["seed"])
    old_hash = cell["old_tuned"][cell["map_task"]]
    device = trial_device()
    teacher, _ = teacher_cache(store).get(old_hash, md.data_key, False,
                                          lambda: stages.load_tuned(study, store, old_hash)[0].to(device),
                                          md.encoded["train"][0], study.pilot.eval_batch_size, md.pad_id)
    student, _ = stages.load_tuned(study, store, old_hash, on_plm=cell["target_plm_hash"])
    student.to(device)
    old_state = pet.trainable_state_dict(student)
    weight_map, final_loss = train_weight_map(student, old_state, md, teacher, tf.steps, tf.lr, tf.batch_size,
                                              tf.temperature, tf.kd_weight, tf.rank, cell["seed"])
    rows = []
    for task_name, tuned in cell["old_tuned"].items():
        target = md if task_name == cell["map_task"] else method_data(study, store, chain, task_name, "full", None,
                                                                      cell["seed"])
        model, _ = stages.load_tuned(study, store, tuned, on_plm=cell["target_plm_hash"])
        model.to(device)
        direct = {s: evaluate(model, *target.encoded[s], study.pilot.eval_batch_size, target.pad_id, device)[0]
                  for s in ("dev", "test")}
        with torch.no_grad():
            mapped = weight_map(pet.trainable_state_dict(model))
        pet.load_trainable_state(model, {**pet.trainable_state_dict(model), **mapped})
        after = {s: evaluate(model, *target.encoded[s], study.pilot.eval_batch_size, target.pad_id, device)[0]
                 for s in ("dev", "test")}
        rows.append({**results.provenance(started), "tuning_type": cell["tuning_type"], "seed": cell["seed"],
                     "source_plm_index": cell["source_plm_index"], "target_plm_index": cell["target_plm_index"],
                     "map_task": cell["map_task"], "task": task_name, "rank": tf.rank, "map_steps": tf.steps,
                     "map_final_loss": final_loss, "mapped_dev_accuracy": after["dev"],
                     "mapped_test_accuracy": after["test"], "direct_dev_accuracy": direct["dev"],
                     "direct_test_accuracy": direct["test"]})
    results.write_rows(store, "training_free", cell["cell_hash"], rows)
