"""What each stage computes, as plain functions of (study, store, cell): no Ray here.

The plan (`plan_*`) turns a `StudyConfig` into cells, each a JSON-able dict with a `cell_hash` that is the hash of
everything that determines its result. `run_*` executes one cell and writes its artifact and rows atomically.
Resources (workers, CPUs, GPUs, batch sizes for evaluation) are deliberately *not* part of any identity.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass

import torch

from raysys import data, models, pretrain, recycle, results
from raysys.config import StudyConfig, TaskConfig, config_hash, to_dict
from raysys.store import Store
from raysys.tune import evaluate, train_classifier

_RESOURCE_FIELDS = {"num_workers", "use_gpu", "log_every_steps", "cpus_per_trial", "gpus_per_trial",
                    "eval_batch_size"}


def _identity(config) -> dict:
    return {k: v for k, v in to_dict(config).items() if k not in _RESOURCE_FIELDS}


def _world_if_builtin(study: StudyConfig, source: str):
    return to_dict(study.world) if source == "builtin" else None


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class ChainPlan:
    tokenizer_hash: str
    plm_hashes: tuple[str, ...]  # M0 .. Mk

    @property
    def chain_hash(self) -> str:
        return self.plm_hashes[-1]


def plan_chain(study: StudyConfig) -> ChainPlan:
    d0 = study.corpora[0]
    tokenizer_hash = config_hash("tokenizer", study.model.name_or_path or
                                 [study.model.vocab_size, d0, _world_if_builtin(study, d0.source)])
    p = _identity(study.pretrain)
    initial = {k: v for k, v in p.items() if k not in ("continual_steps", "continual_lr")}
    continual = {k: v for k, v in p.items() if k not in ("initial_steps", "lr")}
    hashes = [config_hash("plm", study.model, tokenizer_hash, d0, _world_if_builtin(study, d0.source), initial)]
    for corpus in study.corpora[1:]:
        hashes.append(config_hash("plm", hashes[-1], corpus, _world_if_builtin(study, corpus.source), continual))
    return ChainPlan(tokenizer_hash, tuple(hashes))


def _task(study: StudyConfig, name: str) -> TaskConfig:
    return next(t for t in study.tasks if t.name == name)


def tuned_hash(study: StudyConfig, plm_hash: str, task: TaskConfig, seed: int) -> str:
    return config_hash("tuned", plm_hash, task, _world_if_builtin(study, task.source), _identity(study.tuning), seed)


def plan_tuning(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    return [
        {"cell_hash": tuned_hash(study, chain.plm_hashes[i], task, seed), "plm_index": i,
         "plm_hash": chain.plm_hashes[i], "task": task.name, "seed": seed}
        for i in study.plms_to_tune for task in study.tasks for seed in study.seeds
    ]


def _hops(study: StudyConfig) -> list[tuple[int, int]]:
    tuned = set(study.plms_to_tune)
    return [(i, i + 1) for i in range(len(study.corpora) - 1) if i in tuned and i + 1 in tuned]


def plan_compatibility(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """Δ tuned on M_i applied to M_{i+1}, for every consecutive tuned pair, task and seed."""
    cells = []
    for i, j in _hops(study):
        for task in study.tasks:
            for seed in study.seeds:
                source = tuned_hash(study, chain.plm_hashes[i], task, seed)
                cells.append({"cell_hash": config_hash("compat", source, chain.plm_hashes[i], chain.plm_hashes[j]),
                              "task": task.name, "seed": seed, "source_plm_index": i, "target_plm_index": j,
                              "source_tuned_hash": source, "source_plm_hash": chain.plm_hashes[i],
                              "target_plm_hash": chain.plm_hashes[j]})
    return cells


def plan_interpolation(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """One cell per (hop, task, seed, α): θ(α) between the tuned M_i and the tuned M_{i+1}."""
    cells = []
    for i, j in _hops(study):
        for task in study.tasks:
            for seed in study.seeds:
                a = tuned_hash(study, chain.plm_hashes[i], task, seed)
                b = tuned_hash(study, chain.plm_hashes[j], task, seed)
                for alpha in study.pilot.alphas:
                    cells.append({"cell_hash": config_hash("interp", a, b, alpha), "task": task.name, "seed": seed,
                                  "plm_index_a": i, "plm_index_b": j, "tuned_hash_a": a, "tuned_hash_b": b,
                                  "alpha": alpha})
    return cells


# ------------------------------------------------------------------------------------------------- running


def ensure_tokenizer(study: StudyConfig, store: Store, chain: ChainPlan):
    """Train (tiny) or fetch (pretrained) the one tokenizer of the chain, once."""
    if not store.has_artifact("tokenizer", chain.tokenizer_hash):
        with store.writing_artifact("tokenizer", chain.tokenizer_hash) as tmp:
            if study.model.name_or_path:
                tokenizer = models.load_tokenizer(study.model.name_or_path)
            else:
                texts = data.load_corpus(study.corpora[0], study.world)
                tokenizer = models.train_tokenizer(texts, study.model.vocab_size)
            tokenizer.save_pretrained(str(tmp))
    return models.load_tokenizer(store.artifact_path("tokenizer", chain.tokenizer_hash))


def link_initial_model(study: StudyConfig, store: Store, chain: ChainPlan, link: int, tokenizer):
    if link > 0:
        return models.load_masked_lm(store.artifact_path("plm", chain.plm_hashes[link - 1]))
    if study.model.name_or_path:
        return models.load_masked_lm(study.model.name_or_path)
    return models.new_masked_lm(study.model, tokenizer, study.pretrain.seed)


def link_plan(study: StudyConfig, link: int) -> pretrain.LinkPlan:
    if link == 0:
        return pretrain.LinkPlan(study.pretrain.initial_steps, study.pretrain.lr)
    return pretrain.LinkPlan(study.pretrain.continual_steps, study.pretrain.continual_lr)


def save_link(study, store, chain, link, model, tokenizer, curve, started_at, num_workers) -> None:
    """Rank 0 only: the PLM artifact (safetensors + tokenizer) and its rows."""
    plm_hash = chain.plm_hashes[link]
    corpus = study.corpora[link]
    with store.writing_artifact("plm", plm_hash) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "raysys.json").write_text(json.dumps({"link": link, "config": to_dict(study)}, indent=1))
    common = {"link": link, "domain": corpus.name}
    results.write_rows(store, "pretrain_curves", plm_hash, [{**common, **row} for row in curve])
    last = curve[-1] if curve else {}
    init = "continual" if link else (f"pretrained:{study.model.name_or_path}" if study.model.name_or_path else "scratch")
    results.write_rows(store, "pretrain_runs", plm_hash, [{
        **results.provenance(started_at), **common, "parent_hash": chain.plm_hashes[link - 1] if link else None,
        "init": init, "steps": last.get("step", 0), "lr": link_plan(study, link).lr, "num_workers": num_workers,
        "num_parameters": models.count_parameters(model), "final_loss": last.get("loss"),
        "tokens": last.get("tokens", 0), "tokens_per_second": last.get("tokens_per_second"),
        "config": json.dumps(to_dict(study.pretrain)),
    }])


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def run_tuning_cell(study: StudyConfig, store: Store, chain: ChainPlan, cell: dict) -> None:
    started = results.now()
    task_cfg = _task(study, cell["task"])
    tokenizer = models.load_tokenizer(store.artifact_path("tokenizer", chain.tokenizer_hash))
    task = data.load_task(task_cfg, study.world)
    encoded = data.encode_task(task, tokenizer, study.tuning.max_length)
    _set_seed(cell["seed"])
    model = models.classifier_from_plm(store.artifact_path("plm", cell["plm_hash"]), len(task.labels), cell["seed"])
    result = train_classifier(model, encoded, study.tuning, cell["seed"], tokenizer.pad_token_id)
    with store.writing_artifact("tuned", cell["cell_hash"]) as tmp:
        model.config.id2label = dict(enumerate(task.labels))
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        model.save_pretrained(str(tmp))  # the best-dev state, restored by train_classifier
    key = {"plm_index": cell["plm_index"], "task": task.name, "tuning_type": study.tuning.tuning_type,
           "seed": cell["seed"]}
    results.write_rows(store, "tuning_curves", cell["cell_hash"], [{**key, **row} for row in result.curve])
    results.write_rows(store, "tuning_runs", cell["cell_hash"], [{
        **results.provenance(started), **key, "plm_hash": cell["plm_hash"],
        "plm_domain": study.corpora[cell["plm_index"]].name, "task_domain": task_cfg.domain,
        "lr": study.tuning.lr, "max_steps": study.tuning.max_steps, "num_train": len(task.splits["train"]),
        "num_labels": len(task.labels), "best_step": result.best_step, "best_dev_accuracy": result.best_dev_accuracy,
        "best_dev_loss": result.best_dev_loss, "test_accuracy": result.test_accuracy, "test_loss": result.test_loss,
        "train_seconds": result.train_seconds, "config": json.dumps(to_dict(study.tuning)),
    }])


def _split_metrics(model, encoded, batch_size, pad_id) -> dict:
    out = {}
    for split in ("dev", "test"):
        acc, loss = evaluate(model, *encoded[split], batch_size, pad_id)
        out[f"{split}_accuracy"], out[f"{split}_loss"] = acc, loss
    return out


class _Evaluator:
    """Loads a task and a model skeleton once, then evaluates any state dict of that architecture."""

    def __init__(self, study: StudyConfig, store: Store, chain: ChainPlan, task_name: str, skeleton_path):
        self.tokenizer = models.load_tokenizer(store.artifact_path("tokenizer", chain.tokenizer_hash))
        task = data.load_task(_task(study, task_name), study.world)
        self.encoded = data.encode_task(task, self.tokenizer, study.tuning.max_length)
        self.model = models.load_classifier(skeleton_path)
        self.batch_size = study.pilot.eval_batch_size

    def __call__(self, state: dict) -> dict:
        self.model.load_state_dict(state, strict=True)
        return _split_metrics(self.model, self.encoded, self.batch_size, self.tokenizer.pad_token_id)


def _state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def run_compatibility_cell(study: StudyConfig, store: Store, chain: ChainPlan, cell: dict) -> None:
    started = results.now()
    tuned_path = store.artifact_path("tuned", cell["source_tuned_hash"])
    evaluator = _Evaluator(study, store, chain, cell["task"], tuned_path)
    state = recycle.transplant_delta(_state(tuned_path), _state(store.artifact_path("plm", cell["source_plm_hash"])),
                                     _state(store.artifact_path("plm", cell["target_plm_hash"])))
    metrics = evaluator(state)
    results.write_rows(store, "compatibility", cell["cell_hash"], [{
        **results.provenance(started), **_columns(cell, "compatibility"), "tuning_type": study.tuning.tuning_type,
        **metrics}])


def run_interpolation_cells(study: StudyConfig, store: Store, chain: ChainPlan, cells: list[dict]) -> None:
    """All α of one (hop, task, seed): the two ends are loaded once."""
    first = cells[0]
    path_a = store.artifact_path("tuned", first["tuned_hash_a"])
    evaluator = _Evaluator(study, store, chain, first["task"], path_a)
    state_a, state_b = _state(path_a), _state(store.artifact_path("tuned", first["tuned_hash_b"]))
    for cell in cells:
        run_guarded(store, "interpolation", cell, lambda c=cell: results.write_rows(
            store, "interpolation", c["cell_hash"], [{
                **results.provenance(results.now()), **_columns(c, "interpolation"),
                "tuning_type": study.tuning.tuning_type,
                **evaluator(recycle.interpolate(state_a, state_b, c["alpha"]))}]))


def _columns(cell: dict, table: str) -> dict:
    names = set(results.SCHEMAS[table].names)
    return {k: v for k, v in cell.items() if k in names and k != "cell_hash"}


def run_guarded(store: Store, table: str, cell: dict, fn) -> bool:
    """Run one cell; on failure record a `failed` row with the error (the cell runs again next time) and go on."""
    started = results.now()
    try:
        fn()
        return True
    except Exception as err:  # noqa: BLE001 — any failure of a cell is recorded, not fatal to the sweep
        message = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
        results.write_rows(store, table, cell["cell_hash"],
                           [{**results.provenance(started, "failed", message), **_columns(cell, table)}])
        return False
