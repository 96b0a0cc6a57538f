"""What each stage computes, as plain functions of (study, store, cell): no Ray here.

The plan (`plan_*`) turns a `StudyConfig` into cells, each a JSON-able dict with a `cell_hash` that is the hash of
everything that determines its result. `run_*` executes one cell and writes its artifact and rows atomically.
Resources (workers, CPUs, GPUs, batch sizes for evaluation) are deliberately *not* part of any identity.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from raysys import data, models, pet, pilot, pretrain, recycle, results
from raysys.compute import trial_device
from raysys.config import StudyConfig, TaskConfig, TuningConfig, config_hash, to_dict
from raysys.store import Store, atomic_write_bytes
from raysys.tune import evaluate, train_classifier

# How the work is spread and paced, not what it computes: never part of an artifact's identity.
_RESOURCE_FIELDS = {"num_workers", "cpus_per_worker", "use_gpu", "log_every_steps", "cpus_per_trial", "gpus_per_trial",
                    "eval_batch_size", "checkpoint_every_seconds", "micro_batch_size"}
# Fields added after artifacts were made: part of the identity only when set away from their default, so that the
# artifacts made before they existed keep their hashes.
_IDENTITY_ONLY_WHEN_SET = {"precision": "fp32", "length_bucketing": False}


def _identity(config) -> dict:
    return {k: v for k, v in to_dict(config).items()
            if k not in _RESOURCE_FIELDS and _IDENTITY_ONLY_WHEN_SET.get(k, object()) != v}


def _world_if_builtin(study: StudyConfig, source: str):
    return to_dict(study.world) if source == "builtin" else None


# ------------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Link:
    """One PLM of a chain: `chain` is "main" or "control", `index` the corpus it was last trained on."""

    chain: str
    index: int
    hash: str
    parent: str | None
    seed: int
    checkpoint: str | None  # the pretrained checkpoint an index-0 link starts from (None: from scratch)


@dataclass(frozen=True)
class ChainPlan:
    tokenizer_hash: str
    links: tuple[Link, ...]

    def hashes(self, chain: str = "main") -> tuple[str, ...]:
        return tuple(link.hash for link in self.links if link.chain == chain)

    @property
    def plm_hashes(self) -> tuple[str, ...]:
        """M0 .. Mk of the main chain."""
        return self.hashes("main")

    def link(self, plm_hash: str) -> Link:
        return next(link for link in self.links if link.hash == plm_hash)


def _chain(study: StudyConfig, tokenizer_hash: str, name: str, length: int, seed: int,
           checkpoint: str | None) -> list[Link]:
    d0 = study.corpora[0]
    p = _identity(dataclasses.replace(study.pretrain, seed=seed))
    initial = {k: v for k, v in p.items() if k not in ("continual_steps", "continual_lr")}
    continual = {k: v for k, v in p.items() if k not in ("initial_steps", "lr")}
    model = dataclasses.replace(study.model, name_or_path=checkpoint)
    first = config_hash("plm", model, tokenizer_hash, d0, _world_if_builtin(study, d0.source), initial)
    links = [Link(name, 0, first, None, seed, checkpoint)]
    for index, corpus in enumerate(study.corpora[1:length], start=1):
        h = config_hash("plm", links[-1].hash, corpus, _world_if_builtin(study, corpus.source), continual)
        links.append(Link(name, index, h, links[-1].hash, seed, None))
    return links


def plan_chain(study: StudyConfig) -> ChainPlan:
    """The main chain M0 → … → Mk and the control chain M0' → … (another origin, the same continual data)."""
    d0 = study.corpora[0]
    tokenizer_hash = config_hash("tokenizer", study.model.name_or_path or
                                 [study.model.vocab_size, d0, _world_if_builtin(study, d0.source)])
    main = _chain(study, tokenizer_hash, "main", len(study.corpora), study.pretrain.seed, study.model.name_or_path)
    control = _chain(study, tokenizer_hash, "control", study.control_length, study.pilot.control_seed,
                     study.pilot.control_name_or_path) if study.control_length else []
    return ChainPlan(tokenizer_hash, tuple(main + control))


def _task(study: StudyConfig, name: str) -> TaskConfig:
    return next(t for t in study.tasks if t.name == name)


def tuning_identity(tuning: TuningConfig, tuning_type: str) -> dict:
    """What determines a tuned model besides PLM, task and seed: the shared tuning fields, the learning rate and
    step budget of this type, and its PET hyper-parameters only (changing LoRA's rank leaves adapters alone)."""
    shared = {k: v for k, v in _identity(tuning).items()
              if k not in ("types", "lr", "max_steps", "pet_lr", "pet_max_steps", "lora", "adapter")}
    return {**shared, "tuning_type": tuning_type, "lr": tuning.lr_for(tuning_type),
            "max_steps": tuning.max_steps_for(tuning_type), "pet": tuning.pet_spec(tuning_type)}


def tuned_hash(study: StudyConfig, plm_hash: str, task: TaskConfig, tuning_type: str, seed: int) -> str:
    return config_hash("tuned", plm_hash, task, _world_if_builtin(study, task.source),
                       tuning_identity(study.tuning, tuning_type), seed)


def _control_indices(study: StudyConfig) -> list[int]:
    """The control-chain PLMs some control pair needs."""
    return sorted({j for _, j in _hops(study) if j < study.control_length})


def plan_tuning(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    targets = [("main", i) for i in study.plms_to_tune] + [("control", j) for j in _control_indices(study)]
    cells = []
    for name, i in targets:
        plm_hash = chain.hashes(name)[i]
        for task in study.tasks:
            for tuning_type in study.tuning.types:
                for seed in study.seeds:
                    cells.append({"cell_hash": tuned_hash(study, plm_hash, task, tuning_type, seed), "chain": name,
                                  "plm_index": i, "plm_hash": plm_hash, "task": task.name,
                                  "tuning_type": tuning_type, "seed": seed})
    return cells


def _hops(study: StudyConfig) -> list[tuple[int, int]]:
    tuned = set(study.plms_to_tune)
    return [(i, i + h) for h in study.pilot.hops for i in range(len(study.corpora))
            if i in tuned and i + h in tuned]


def _grid(study: StudyConfig):
    for task in study.tasks:
        for tuning_type in study.tuning.types:
            for seed in study.seeds:
                yield task, tuning_type, seed


def plan_compatibility(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """Δ tuned on M_i applied, without training, to every later tuned M_j of the main chain."""
    tuned = sorted(study.plms_to_tune)
    plms = chain.plm_hashes
    cells = []
    for task, tuning_type, seed in _grid(study):
        for i in tuned:
            source = tuned_hash(study, plms[i], task, tuning_type, seed)
            for j in (j for j in tuned if j > i):
                cells.append({"cell_hash": config_hash("compat", source, plms[i], plms[j]), "task": task.name,
                              "tuning_type": tuning_type, "seed": seed, "source_plm_index": i,
                              "target_plm_index": j, "source_tuned_hash": source, "source_plm_hash": plms[i],
                              "target_plm_hash": plms[j]})
    return cells


def plan_baselines(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """The references of the compatibility matrix that need no tuning: majority class and the PLM with an
    untrained head (PET modules start as the identity, so one untrained model serves every tuning type)."""
    return [{"cell_hash": config_hash("baseline", chain.plm_hashes[i], task, _world_if_builtin(study, task.source),
                                      seed, study.tuning.max_length),
             "task": task.name, "seed": seed, "plm_index": i, "plm_hash": chain.plm_hashes[i]}
            for i in sorted(study.plms_to_tune) for task in study.tasks for seed in study.seeds]


def plan_pairs(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """Every (tuned M_i, tuned M_j) pair the interpolation and similarity stages compare: the continual pair of
    each hop and, where the control chain reaches j, the control pair (tuned M_i, tuned M'_j)."""
    pairs = []
    for i, j in _hops(study):
        ends = [("continual", "main")] + ([("control", "control")] if j < study.control_length else [])
        for kind, chain_b in ends:
            plm_a, plm_b = chain.plm_hashes[i], chain.hashes(chain_b)[j]
            for task, tuning_type, seed in _grid(study):
                a = tuned_hash(study, plm_a, task, tuning_type, seed)
                b = tuned_hash(study, plm_b, task, tuning_type, seed)
                pairs.append({"pair_hash": config_hash("pair", a, b), "pair_kind": kind, "task": task.name,
                              "tuning_type": tuning_type, "seed": seed, "plm_index_a": i, "plm_index_b": j,
                              "chain_b": chain_b, "tuned_hash_a": a, "tuned_hash_b": b})
    return pairs


def plan_interpolation(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """One cell per (pair, α): θ(α) between the two tuned models."""
    return [{**_pair_columns(pair), "cell_hash": config_hash("interp", pair["pair_hash"], alpha), "alpha": alpha,
             "pair_hash": pair["pair_hash"]}
            for pair in plan_pairs(study, chain) for alpha in study.pilot.alphas]


def plan_similarity(study: StudyConfig, chain: ChainPlan) -> list[dict]:
    """One cell per pair: per-head attention similarity on a fixed dev sample, and distances."""
    return [{**pair, "cell_hash": config_hash("similarity", pair["pair_hash"], study.pilot.similarity_examples,
                                              study.tuning.max_length)}
            for pair in plan_pairs(study, chain)]


def _pair_columns(pair: dict) -> dict:
    return {k: pair[k] for k in ("pair_kind", "task", "tuning_type", "seed", "plm_index_a", "plm_index_b",
                                 "chain_b", "tuned_hash_a", "tuned_hash_b")}


# ------------------------------------------------------------------------------------------------ checking


def check_same_architecture(named: dict[str, str | Path]) -> None:
    """Refuse, before any trial starts, to recycle weights between checkpoints whose architecture or vocabulary
    differ (name -> checkpoint path or hub name); the error names both and the first differing field."""
    shapes = {name: models.architecture(path) for name, path in named.items()}
    (first, reference), *others = shapes.items()
    for name, shape in others:
        for field in models.ARCHITECTURE_FIELDS:
            if shape[field] != reference[field]:
                raise recycle.WeightMismatchError(
                    f"{first} and {name} differ in {field} ({reference[field]} vs {shape[field]}): deltas, "
                    "interpolation and PET modules need one architecture and one vocabulary")


def _plm_config_folder(store: Store, plm_hash: str) -> Path:
    """A folder holding only the PLM's config.json: enough to compare architectures without fetching weights."""
    if not store.remote:
        return store.artifact("plm", plm_hash)
    folder = store.local / "configs" / plm_hash
    atomic_write_bytes(folder / "config.json", store.artifact_file("plm", plm_hash, "config.json"))
    return folder


def preflight(study: StudyConfig, store: Store, chain: ChainPlan) -> None:
    """Checks that need checkpoints: the control origin must match the main chain, and every PLM already in the
    store must share one architecture (a store reused across studies could mix them)."""
    named = {f"plm {link.chain}[{link.index}]": _plm_config_folder(store, link.hash) for link in chain.links
             if store.has_artifact("plm", link.hash)}
    if study.pilot.control_name_or_path and study.control_length:
        main = study.model.name_or_path
        named = {f"model.name_or_path ({main})": main,
                 f"pilot.control_name_or_path ({study.pilot.control_name_or_path})": study.pilot.control_name_or_path,
                 **named}
    if len(named) > 1:
        check_same_architecture(named)


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
    return models.load_tokenizer(store.artifact("tokenizer", chain.tokenizer_hash))


def link_initial_model(study: StudyConfig, store: Store, link: Link, tokenizer):
    if link.parent:
        return models.load_masked_lm(store.artifact("plm", link.parent))
    if link.checkpoint:
        return models.load_masked_lm(link.checkpoint)
    return models.new_masked_lm(study.model, tokenizer, link.seed)


def link_plan(study: StudyConfig, link: Link) -> pretrain.LinkPlan:
    if link.index == 0:
        return pretrain.LinkPlan(study.pretrain.initial_steps, study.pretrain.lr)
    return pretrain.LinkPlan(study.pretrain.continual_steps, study.pretrain.continual_lr)


def link_pretrain_config(study: StudyConfig, link: Link):
    """The chain's seed drives initialisation, data order and masking of every link of that chain."""
    return dataclasses.replace(study.pretrain, seed=link.seed)


def save_link(study, store, link: Link, model, tokenizer, curve, started_at, num_workers) -> None:
    """Rank 0 only: the PLM artifact (safetensors + tokenizer) and its rows."""
    corpus = study.corpora[link.index]
    with store.writing_artifact("plm", link.hash) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "raysys.json").write_text(json.dumps({"chain": link.chain, "link": link.index,
                                                     "config": to_dict(study)}, indent=1))
    common = {"chain": link.chain, "link": link.index, "domain": corpus.name}
    results.write_rows(store, "pretrain_curves", link.hash, [{**common, **row} for row in curve])
    last = curve[-1] if curve else {}
    init = "continual" if link.parent else (f"pretrained:{link.checkpoint}" if link.checkpoint
                                            else f"scratch:seed={link.seed}")
    results.write_rows(store, "pretrain_runs", link.hash, [{
        **results.provenance(started_at), **common, "parent_hash": link.parent, "init": init,
        "steps": last.get("step", 0), "lr": link_plan(study, link).lr, "num_workers": num_workers,
        "num_parameters": models.count_parameters(model), "final_loss": last.get("loss"),
        "tokens": last.get("tokens", 0), "tokens_per_second": last.get("tokens_per_second"),
        "config": json.dumps(to_dict(link_pretrain_config(study, link))),
    }])


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def adapted_classifier(study: StudyConfig, store: Store, plm_hash: str, num_labels: int, tuning_type: str,
                       seed: int):
    """A PLM with a fresh (seeded) head and, for PET, a fresh module: where every tuning run starts."""
    model = models.classifier_from_plm(store.artifact("plm", plm_hash), num_labels, seed)
    return pet.apply_pet(model, tuning_type, seed=seed, **pet_options(study.tuning))


def pet_options(tuning: TuningConfig) -> dict:
    return {"bottleneck": tuning.adapter.bottleneck, "lora_rank": tuning.lora.rank, "lora_alpha": tuning.lora.alpha,
            "lora_dropout": tuning.lora.dropout, "lora_targets": tuple(tuning.lora.targets)}


def _save_tuned(directory, model, meta: dict) -> None:
    """Fine-tuning stores the whole model; PET stores only its trainable weights (module, LayerNorms for adapters,
    head): the backbone is the PLM artifact named in raysys.json."""
    if meta["tuning_type"] == "finetune":
        model.save_pretrained(str(directory))
    else:
        pet.save_pet(model, directory)
    (directory / "raysys.json").write_text(json.dumps(meta, indent=1))


def tuned_meta(store: Store, tuned: str) -> dict:
    return json.loads(store.artifact_file("tuned", tuned, "raysys.json"))


def load_tuned(study: StudyConfig, store: Store, tuned: str, on_plm: str | None = None):
    """The tuned model `tuned`, or — with `on_plm` — its weights recycled onto another PLM without training:
    θ_new + (θ_old^τ − θ_old) with the old head for fine-tuning, the old module and head plugged into the new
    backbone for PET (the paper's compatibility test and initialization-based start)."""
    path = store.artifact("tuned", tuned)
    meta = json.loads((path / "raysys.json").read_text())
    target = on_plm or meta["plm_hash"]
    model = adapted_classifier(study, store, target, len(meta["labels"]), meta["tuning_type"], meta["seed"])
    if meta["tuning_type"] == "finetune":
        state = _state(path)
        if target != meta["plm_hash"]:
            state = recycle.transplant_delta(state, _plm_state(store, meta["plm_hash"]), _plm_state(store, target))
        model.load_state_dict(state, strict=True)
    else:
        pet.load_trainable_state(model, load_file(str(path / pet.WEIGHTS_FILE)))
    return model.eval(), meta


def run_tuning_cell(study: StudyConfig, store: Store, chain: ChainPlan, cell: dict, checkpointer=None) -> None:
    started = results.now()
    task_cfg = _task(study, cell["task"])
    tuning_type, seed = cell["tuning_type"], cell["seed"]
    tokenizer = models.load_tokenizer(store.artifact("tokenizer", chain.tokenizer_hash))
    task = data.load_task(task_cfg, study.world)
    encoded = data.encode_task(task, tokenizer, study.tuning.max_length)
    _set_seed(seed)
    model = adapted_classifier(study, store, cell["plm_hash"], len(task.labels), tuning_type, seed)
    cfg = dataclasses.replace(study.tuning, types=(tuning_type,), lr=study.tuning.lr_for(tuning_type),
                              max_steps=study.tuning.max_steps_for(tuning_type))
    result = train_classifier(model, encoded, cfg, seed, tokenizer.pad_token_id, device=trial_device(),
                              checkpointer=checkpointer)
    model.cpu()
    best = result.primary
    meta = {"tuning_type": tuning_type, "plm_hash": cell["plm_hash"], "task": task.name, "seed": seed,
            "labels": list(task.labels), "pet": study.tuning.pet_spec(tuning_type)}
    with store.writing_artifact("tuned", cell["cell_hash"]) as tmp:
        model.config.id2label = dict(enumerate(task.labels))
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        _save_tuned(tmp, model, meta)  # the best-dev state, restored by train_classifier
    key = {"chain": cell["chain"], "plm_index": cell["plm_index"], "task": task.name, "tuning_type": tuning_type,
           "seed": seed}
    results.write_rows(store, "tuning_curves", cell["cell_hash"], [{**key, **row} for row in result.curve])
    results.write_rows(store, "tuning_runs", cell["cell_hash"], [{
        **results.provenance(started), **key, "plm_hash": cell["plm_hash"],
        "plm_domain": study.corpora[cell["plm_index"]].name, "task_domain": task_cfg.domain,
        "lr": cfg.lr, "max_steps": cfg.max_steps, "num_train": len(task.splits["train"]),
        "num_labels": len(task.labels), "num_parameters": models.count_parameters(model),
        "num_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "best_step": best.best_step, "best_dev_accuracy": best.best_dev_accuracy,
        "best_dev_loss": best.best_dev_loss, "test_accuracy": best.test_accuracy, "test_loss": best.test_loss,
        "train_seconds": result.train_seconds, "resumed_from_step": result.resumed_from_step,
        "config": json.dumps(tuning_identity(study.tuning, tuning_type)),
    }])
    if checkpointer:
        checkpointer.done()


class _Evaluator:
    """Loads and encodes a task once, then evaluates models (or state dicts loaded into a skeleton) on dev/test."""

    def __init__(self, study: StudyConfig, store: Store, chain: ChainPlan, task_name: str):
        self.tokenizer = models.load_tokenizer(store.artifact("tokenizer", chain.tokenizer_hash))
        self.task = data.load_task(_task(study, task_name), study.world)
        self.encoded = data.encode_task(self.task, self.tokenizer, study.tuning.max_length)
        self.batch_size = study.pilot.eval_batch_size
        self.device = trial_device()

    def metrics(self, model) -> dict:
        model.to(self.device)
        out = {}
        for split in ("dev", "test"):
            acc, loss = evaluate(model, *self.encoded[split], self.batch_size, self.tokenizer.pad_token_id,
                                 self.device)
            out[f"{split}_accuracy"], out[f"{split}_loss"] = acc, loss
        return out

    def state_metrics(self, skeleton, state: dict) -> dict:
        skeleton.to(self.device).load_state_dict(state, strict=True)
        return self.metrics(skeleton)

    def majority_metrics(self) -> dict:
        """Always predict the most frequent training label; the loss is that of predicting the training label
        distribution (add-one smoothed)."""
        train = self.encoded["train"][1].tolist()
        counts = torch.bincount(torch.tensor(train), minlength=len(self.task.labels)).double() + 1.0
        log_prior = torch.log(counts / counts.sum())
        majority = int(counts.argmax())
        out = {}
        for split in ("dev", "test"):
            y = self.encoded[split][1]
            out[f"{split}_accuracy"] = float((y == majority).double().mean())
            out[f"{split}_loss"] = float(-log_prior[y].mean())
        return out


def _state(path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _plm_state(store: Store, plm_hash: str) -> dict:
    return _state(store.artifact("plm", plm_hash))


def run_compatibility_cell(study: StudyConfig, store: Store, chain: ChainPlan, cell: dict) -> None:
    started = results.now()
    evaluator = _Evaluator(study, store, chain, cell["task"])
    model, _ = load_tuned(study, store, cell["source_tuned_hash"], on_plm=cell["target_plm_hash"])
    results.write_rows(store, "compatibility", cell["cell_hash"], [{
        **results.provenance(started), **_columns(cell, "compatibility"), **evaluator.metrics(model)}])


def run_baseline_cell(study: StudyConfig, store: Store, chain: ChainPlan, cell: dict) -> None:
    started = results.now()
    evaluator = _Evaluator(study, store, chain, cell["task"])
    _set_seed(cell["seed"])
    untrained = adapted_classifier(study, store, cell["plm_hash"], len(evaluator.task.labels), "finetune",
                                   cell["seed"])
    common = {**results.provenance(started), **_columns(cell, "baselines")}
    results.write_rows(store, "baselines", cell["cell_hash"], [
        {**common, "kind": "majority", **evaluator.majority_metrics()},
        {**common, "kind": "untrained_head", **evaluator.metrics(untrained)}])


def _clone_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_interpolation_pair(study: StudyConfig, store: Store, chain: ChainPlan, pair: dict,
                           cells: list[dict]) -> int:
    """The missing α of one pair, then the pair's barriers. Each end keeps its own backbone: for PET the backbone
    and the module are interpolated together. A path's rows share one file (keyed by the pair): one write per
    path instead of one per α, and the barrier reads back one file, not the table. Returns how many of `cells`
    succeeded."""
    kept = [r for r in results.read_cell(store, "interpolation", pair["pair_hash"])
            if r["status"] == "ok" and r["cell_hash"] not in cell_hashes(cells)]
    new = []
    if cells:
        started = results.now()
        try:
            new = _interpolation_rows(study, store, chain, pair, cells)
        except Exception as err:  # noqa: BLE001 — recorded; the path runs again next time
            new = [{"cell_hash": c["cell_hash"], **_failed(started, err), **_columns(c, "interpolation")}
                   for c in cells]
        results.write_rows(store, "interpolation", pair["pair_hash"], kept + new)
    write_path_summary(study, store, pair)
    return sum(r["status"] == "ok" for r in new)


def _interpolation_rows(study: StudyConfig, store: Store, chain: ChainPlan, pair: dict,
                        cells: list[dict]) -> list[dict]:
    evaluator = _Evaluator(study, store, chain, pair["task"])
    model_a, _ = load_tuned(study, store, pair["tuned_hash_a"])
    model_b, _ = load_tuned(study, store, pair["tuned_hash_b"])
    state_a, state_b = _clone_state(model_a.to(evaluator.device)), _clone_state(model_b.to(evaluator.device))
    del model_b
    rows = []
    for cell in cells:
        started = results.now()
        metrics = evaluator.state_metrics(model_a, recycle.interpolate(state_a, state_b, cell["alpha"]))
        rows.append({"cell_hash": cell["cell_hash"], **results.provenance(started), **_columns(cell, "interpolation"),
                     **metrics})
    return rows


def cell_hashes(cells: list[dict]) -> set[str]:
    return {c["cell_hash"] for c in cells}


def write_path_summary(study: StudyConfig, store: Store, pair: dict) -> bool:
    """Loss barrier and largest accuracy drop of one pair's path, per split, once all its α have rows."""
    started = results.now()
    rows = [r for r in results.read_cell(store, "interpolation", pair["pair_hash"]) if r["status"] == "ok"]
    by_alpha = {r["alpha"]: r for r in rows}
    if set(by_alpha) != set(study.pilot.alphas):
        return False
    path = [by_alpha[a] for a in sorted(by_alpha)]
    alphas = [r["alpha"] for r in path]
    out = []
    for split in ("dev", "test"):
        losses, accs = [r[f"{split}_loss"] for r in path], [r[f"{split}_accuracy"] for r in path]
        out.append({**results.provenance(started), **_pair_columns(pair), "split": split,
                    "num_alphas": len(path), "loss_a": losses[0], "loss_b": losses[-1], "accuracy_a": accs[0],
                    "accuracy_b": accs[-1], "min_accuracy": min(accs),
                    "loss_barrier": pilot.loss_barrier(alphas, losses),
                    "accuracy_drop": pilot.accuracy_drop(alphas, accs)})
    results.write_rows(store, "interpolation_paths", pair["pair_hash"], out)
    return True


def run_similarity_cell(study: StudyConfig, store: Store, chain: ChainPlan, cell: dict) -> None:
    """Per-head attention similarity of the pair's two tuned models on the first dev examples, and distances."""
    started = results.now()
    evaluator = _Evaluator(study, store, chain, cell["task"])
    model_a, meta_a = load_tuned(study, store, cell["tuned_hash_a"])
    model_b, meta_b = load_tuned(study, store, cell["tuned_hash_b"])
    ids, labels = evaluator.encoded["dev"]
    n = min(study.pilot.similarity_examples, len(ids))
    batches = [(x, m) for x, m, _ in data.iterate_batches(ids[:n], labels[:n], study.pilot.eval_batch_size,
                                                          evaluator.tokenizer.pad_token_id)]
    maps_a, mask = pilot.attention_maps(model_a.to(evaluator.device), batches)
    maps_b, _ = pilot.attention_maps(model_b.to(evaluator.device), batches)
    model_a.cpu(), model_b.cpu()  # the distances below are taken against the PLMs' weights, on the CPU
    common = {**results.provenance(started), **_pair_columns(cell)}
    rows = []
    for layer, (a, b) in enumerate(zip(maps_a, maps_b)):
        js = pilot.head_divergence(a, b, mask)
        heads = js.shape[0]
        for h in range(heads):
            others = torch.cat([js[h, :h], js[h, h + 1:]])
            rows.append({**common, "layer": layer, "head": h, "num_examples": n,
                         "js_corresponding": float(js[h, h]),
                         "js_noncorresponding": float(others.mean()) if heads > 1 else None,
                         "similarity_corresponding": float(pilot.similarity(js[h, h])),
                         "similarity_noncorresponding": float(pilot.similarity(others.mean())) if heads > 1 else None})
    results.write_rows(store, "head_similarity", cell["cell_hash"], rows)
    results.write_rows(store, "distances", cell["cell_hash"], [
        {**common, "what": what, **dist} for what, dist in pair_distances(store, model_a, meta_a, model_b, meta_b)])


def pair_distances(store: Store, model_a, meta_a: dict, model_b, meta_b: dict):
    """(what, {num_parameters, l2, l2_per_parameter, cosine}) for the two PLMs' encoders, the two tuned models
    (classifier excluded, as the paper does), and the two updates: Δ = θ^τ − θ of the encoder for fine-tuning,
    the trained module for PET."""
    plm_a, plm_b = (recycle.select(_plm_state(store, m["plm_hash"]), "roberta.") for m in (meta_a, meta_b))
    tuned_a, tuned_b = (recycle.drop(_clone_state(m), ["classifier."]) for m in (model_a, model_b))
    if meta_a["tuning_type"] == "finetune":
        update_a = recycle.delta(recycle.select(tuned_a, "roberta."), plm_a)
        update_b = recycle.delta(recycle.select(tuned_b, "roberta."), plm_b)
    else:
        update_a, update_b = (recycle.drop(pet.trainable_state_dict(m), ["classifier."]) for m in (model_a, model_b))
    for what, a, b in (("plm", plm_a, plm_b), ("tuned", tuned_a, tuned_b), ("update", update_a, update_b)):
        n = sum(v.numel() for v in a.values() if v.is_floating_point())
        yield what, {"num_parameters": n, **recycle.distance(a, b)}


def _columns(cell: dict, table: str) -> dict:
    names = set(results.SCHEMAS[table].names)
    return {k: v for k, v in cell.items() if k in names and k != "cell_hash"}


def _failed(started, err: Exception) -> dict:
    """The provenance columns of a failed cell, its error and traceback included."""
    return results.provenance(started, "failed", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")


def run_guarded(store: Store, table: str, cell: dict, fn) -> bool:
    """Run one cell; on failure record a `failed` row with the error (the cell runs again next time) and go on."""
    started = results.now()
    try:
        fn()
        return True
    except Exception as err:  # noqa: BLE001 — any failure of a cell is recorded, not fatal to the sweep
        results.write_rows(store, table, cell["cell_hash"], [{**_failed(started, err), **_columns(cell, table)}])
        return False
