"""Typed, frozen, validated configuration; presets are TOML data; overrides are dotted `key=value` pairs.

A `StudyConfig` describes one whole study (the sweep spec). Every artifact and result row is keyed by a hash of
the part of the config that produced it (`raysys.identity`), so configs are frozen and validated when built.

Two registries live here because they are part of the schema: the tuning types (full fine-tuning, and one PET
type per `PetConfig` section of `TuningConfig`) and the recycling methods (`RECYCLING_METHODS`, each a start point
and an objective). Their implementations register in `raysys.core.pet` and `raysys.stages.methods`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

try:
    import tomllib  # novm: Python 3.11's TOML reader; 3.10 (Ubuntu 22.04's python3) has it as tomli
except ModuleNotFoundError:
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


PRECISIONS = ("fp32", "bf16")
# The encoder architectures (HF `model_type`s) raysys can build, tune and recycle; raysys.core.architectures says
# how each one differs and checks it covers exactly these.
ARCHITECTURES = ("roberta", "bert", "xlm-roberta", "deberta-v2", "modernbert")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


def _check_precision(precision: str, field_name: str) -> None:
    _check(precision in PRECISIONS, field_name, f"'{precision}' is not one of {list(PRECISIONS)}")


# Seeds are drawn from [0, SEED_LIMIT): the streams derived from them — (seed·7919 + rank)·1000003 + step in
# pre-training, seed·100003 + trials in an Optuna search — must stay within torch's 64-bit and NumPy's 32-bit seed
# ranges, and a seed is an int64 column of the result tables.
SEED_LIMIT = 2**31


def _check_seed(seed: int, field_name: str) -> None:
    _check(0 <= seed < SEED_LIMIT, field_name, f"a seed must be in 0..2**31 - 1, got {seed}")


def _check_distinct(values, field_name: str) -> None:
    """A repeated value of a grid list makes the same cells twice (one hash, two trials writing one file)."""
    _check(len(set(values)) == len(values), field_name, f"values must be distinct, got {list(values)}")


def _check_name(name: str, field_name: str) -> None:
    """A corpus, task or split name is one component of a path (`<path>/<task>/<split>.jsonl`, cache folders)."""
    _check(bool(name.strip()), field_name, "must not be empty")
    _check(name == name.strip() and not name.startswith(".") and "/" not in name and "\\" not in name
           and name.isprintable(), field_name,
           f"{name!r} is not a plain name (no '/' or '\\', no leading '.' or spaces, no control characters)")


def _check_gpus(gpus: float, field_name: str) -> None:
    """Ray packs fractional GPUs onto one device, so a trial takes a fraction below 1 or whole GPUs."""
    _check(gpus >= 0, field_name, "must be >= 0")
    _check(gpus <= 1 or gpus == int(gpus), field_name, f"a fraction in (0, 1] or a whole number of GPUs, got {gpus}")


@dataclass(frozen=True)
class ModelConfig:
    """The PLM architecture. `name_or_path` set = start M0 from that pretrained checkpoint and its tokenizer; its
    config.json's `model_type` is then the architecture (`architecture`, when set away from "roberta", must agree)
    and the sizes below are unused. `architecture` (an HF `model_type` of ARCHITECTURES) is the from-scratch model."""

    name_or_path: str | None = None
    architecture: str = "roberta"
    # a local checkpoint folder's fingerprint, set by the up-front data check: it stands in for the path in every
    # identity (sources.checkpoint_fingerprint)
    checkpoint_fingerprint: str = ""
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be positive")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", "must be divisible by model.num_heads")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.architecture in ARCHITECTURES, "model.architecture",
               f"unknown '{self.architecture}'; known: {list(ARCHITECTURES)}")


@dataclass(frozen=True)
class WorldConfig:
    """The built-in synthetic multi-domain world (see raysys/core/world.py). Sizes decide whether pre-training can
    learn the world within the budget: enough mentions per entity, and task train sets too small to teach it."""

    seed: int = 0
    num_domains: int = 3
    num_classes: int = 4
    entities_per_class: int = 8
    num_labels: int = 4
    general_sentences: int = 20000
    domain_sentences: int = 20000
    fact_noise: float = 0.1
    task_train: int = 128
    task_dev: int = 256
    task_test: int = 512

    def __post_init__(self):
        _check_seed(self.seed, "world.seed")
        _check(1 <= self.num_domains <= 9, "world.num_domains", "must be in 1..9")
        _check(self.num_classes >= 2, "world.num_classes", "must be >= 2")
        _check(self.entities_per_class >= 2, "world.entities_per_class", "must be >= 2")
        _check(2 <= self.num_labels <= self.num_classes**2, "world.num_labels", "must be in 2..num_classes**2")
        for name in ("general_sentences", "domain_sentences", "task_train", "task_dev", "task_test"):
            _check(getattr(self, name) > 0, f"world.{name}", "must be positive")
        _check(0.0 <= self.fact_noise < 1.0, "world.fact_noise", "must be in [0, 1)")
        entities = self.num_classes * self.entities_per_class
        pairs = entities * (entities - 1)
        _check(
            self.task_train + self.task_dev + self.task_test <= pairs,
            "world.task_train",
            f"train+dev+test must fit in the {pairs} ordered entity pairs (disjoint splits)",
        )


CorpusSource = Literal["builtin", "text", "jsonl", "parquet", "hf"]
FILE_SOURCES = ("text", "jsonl", "parquet")  # sources whose `path` names files (a local path or a URI)


@dataclass(frozen=True)
class CorpusConfig:
    """One domain's pre-training corpus. `builtin` = the synthetic world's domain `name`; `text`/`jsonl`/`parquet` =
    files (`path` is a glob: a local path, relative to the study file, or a `s3://`/`gs://`/`file://` URI);
    `hf` = a `datasets` dataset: name in `path`, its configuration `config_name`, `split`, `revision`, read with
    `streaming` (nothing downloaded in full). `fingerprint` is filled in when the study is loaded
    (raysys.core.sources): the data's identity in every hash, in place of its path."""

    name: str
    source: CorpusSource = "builtin"
    path: str | None = None
    text_field: str = "text"
    split: str = "train"
    max_documents: int | None = None
    config_name: str | None = None
    revision: str | None = None
    streaming: bool = False
    fingerprint: str | None = None

    def __post_init__(self):
        _check_name(self.name, "corpus.name")
        _check(bool(self.text_field), f"corpus {self.name}.text_field", "must not be empty")
        _check(self.source == "builtin" or bool(self.path), f"corpus {self.name}.path", "required for non-builtin")
        _check(self.max_documents is None or self.max_documents > 0, f"corpus {self.name}.max_documents", "must be > 0")
        _check(self.source == "hf" or (self.config_name is None and self.revision is None and not self.streaming),
               f"corpus {self.name}.config_name", "config_name, revision and streaming are options of `hf` sources")


TaskSource = Literal["builtin", "jsonl", "parquet", "hf"]


@dataclass(frozen=True)
class TaskConfig:
    """A classification task. `jsonl` / `parquet` = `<path>/<name>/{train,dev,test}.jsonl|.parquet` (the official
    layout; `splits` renames the files; `path` relative to the study file); `hf` = a `datasets` name in `path`
    (configuration `config_name`, `revision`) with `splits` naming its splits. `fingerprint`: as for corpora."""

    name: str
    domain: str
    source: TaskSource = "builtin"
    path: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    splits: tuple[str, str, str] = ("train", "dev", "test")
    config_name: str | None = None
    revision: str | None = None
    fingerprint: str | None = None

    def __post_init__(self):
        _check_name(self.name, "task.name")
        _check(bool(self.domain), f"task {self.name}.domain", "must not be empty")
        _check(self.source == "builtin" or bool(self.path), f"task {self.name}.path", "required for non-builtin")
        _check(len(self.splits) == 3, f"task {self.name}.splits", "must name train, dev and test splits")
        for split in self.splits if self.source in ("jsonl", "parquet") else ():  # file names; a hub names its own
            _check_name(split, f"task {self.name}.splits")
        _check(len(set(self.splits)) == 3, f"task {self.name}.splits", f"three different splits, got {list(self.splits)}")
        _check(bool(self.text_field) and bool(self.label_field) and self.text_field != self.label_field,
               f"task {self.name}.text_field", "text_field and label_field: two different, non-empty field names")
        _check(self.source == "hf" or (self.config_name is None and self.revision is None),
               f"task {self.name}.config_name", "config_name and revision are options of `hf` sources")


@dataclass(frozen=True)
class PretrainConfig:
    """Masked-LM pre-training of M0 (from scratch) and continual pre-training of each later link."""

    initial_steps: int = 500
    continual_steps: int = 2000
    batch_size: int = 128
    sequence_length: int = 16
    lr: float = 1e-3
    continual_lr: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    mask_prob: float = 0.15
    # the share of a continual link's sequences replayed from the earlier links' domains D1…D_i−1 (0: none): with it
    # M_i+1 keeps what M_i knew, the regime of the paper's PLMs; without it a small model forgets earlier domains
    replay: float = 0.0
    num_workers: int = 2
    cpus_per_worker: float = 1.0  # each worker runs this many torch threads
    use_gpu: bool = False
    log_every_steps: int = 10
    seed: int = 0  # the main chain's: initialisation, data order and masking of every link
    # further main chains, one per seed, each pre-trained again and everything on it tuned and measured again:
    # the report judges each chain alone and shows how the findings vary with the PLM seed (() : the main chain only)
    replicate_seeds: tuple[int, ...] = ()
    checkpoint_every_seconds: float = 900.0  # mid-link checkpoints: at most this much training lost to a crash
    precision: str = "fp32"  # "bf16": autocast matmuls to bfloat16 (weights, optimizer and loss stay fp32)
    micro_batch_size: int | None = None  # sequences per worker per forward pass (None: the whole worker batch)
    # a custom Ray resource each DDP worker also asks one unit of: the node type meant for pre-training offers
    # it (cluster.yaml's gpu_8x: `pretrain_gpu: 8`), so the job lands on NVLinked GPUs, never on 1-GPU nodes
    worker_resource: str = ""

    def __post_init__(self):
        _check_precision(self.precision, "pretrain.precision")
        _check(self.worker_resource == "" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.worker_resource) is not None
               and self.worker_resource not in ("CPU", "GPU", "memory", "object_store_memory"),
               "pretrain.worker_resource", "a custom resource name (letters, digits, _), not CPU/GPU/memory")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "pretrain.micro_batch_size", "must be >= 1")
        _check(self.initial_steps >= 0, "pretrain.initial_steps", "must be >= 0")
        _check(self.continual_steps > 0, "pretrain.continual_steps", "must be > 0")
        _check(self.batch_size > 0, "pretrain.batch_size", "must be > 0")
        _check(self.sequence_length >= 8, "pretrain.sequence_length", "must be >= 8")
        _check(self.lr > 0 and self.continual_lr > 0, "pretrain.lr", "learning rates must be > 0")
        _check(self.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0 (a negative decay grows the weights)")
        _check_seed(self.seed, "pretrain.seed")
        for seed in self.replicate_seeds:
            _check_seed(seed, "pretrain.replicate_seeds")
        _check_distinct(self.replicate_seeds, "pretrain.replicate_seeds")
        _check(self.seed not in self.replicate_seeds, "pretrain.replicate_seeds",
               f"holds pretrain.seed ({self.seed}): the main chain would be planned twice")
        _check(0.0 <= self.warmup_fraction < 1.0, "pretrain.warmup_fraction", "must be in [0, 1)")
        _check(0.0 < self.mask_prob < 1.0, "pretrain.mask_prob", "must be in (0, 1)")
        _check(0.0 <= self.replay < 1.0, "pretrain.replay", "must be in [0, 1): the share of replayed sequences")
        _check(self.num_workers >= 1, "pretrain.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, "pretrain.cpus_per_worker", "must be > 0")
        _check(self.log_every_steps >= 1, "pretrain.log_every_steps", "must be >= 1")
        per_worker, rest = divmod(self.batch_size, self.num_workers)
        _check(rest == 0, "pretrain.batch_size", f"{self.batch_size} is not divisible by pretrain.num_workers = "
               f"{self.num_workers}")
        _check(self.micro_batch_size is None or per_worker % self.micro_batch_size == 0, "pretrain.micro_batch_size",
               f"must divide the per-worker batch (batch_size / num_workers = {per_worker})")
        _check(self.checkpoint_every_seconds >= 0, "pretrain.checkpoint_every_seconds", "must be >= 0")


FULL_FINETUNING = "finetune"
# How a PET type's trained LayerNorms move onto another PLM (TuningConfig.pet_norms).
PET_NORM_POLICIES = ("delta", "absolute")
# How a LoRA pair's interpolation path is built (PilotConfig.lora_path).
LORA_PATHS = ("merged", "factors")


@dataclass(frozen=True)
class PetConfig:
    """The hyper-parameters of one parameter-efficient tuning type. A PET type is a `TuningConfig` field of a
    `PetConfig` type, named after the type: that section is what the type's identity adds to a tuned model's hash
    (and what its injection in `raysys.core.pet` receives); other types' sections never enter it. `trains_norms`
    (a class constant, not a setting): whether the type also trains every LayerNorm of the backbone — then moving
    its weights onto another PLM must say how those move (`TuningConfig.pet_norms`); `raysys.core.pet` checks that
    its registry agrees."""

    trains_norms: ClassVar[bool] = False


@dataclass(frozen=True)
class LoraConfig(PetConfig):
    """LoRA (via `peft`): rank, scaling numerator (scale = alpha / rank), dropout on the LoRA input, and the
    names of the linear modules it adapts."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        _check(self.rank >= 1, "tuning.lora.rank", "must be >= 1")
        _check(self.alpha > 0, "tuning.lora.alpha", "must be > 0")
        _check(0.0 <= self.dropout < 1.0, "tuning.lora.dropout", "must be in [0, 1)")
        _check(len(self.targets) >= 1, "tuning.lora.targets", "name at least one module")


@dataclass(frozen=True)
class AdapterConfig(PetConfig):
    """The paper's bottleneck adapter after the attention and the feed-forward sub-layer of every layer; the
    official runs also train every LayerNorm."""

    trains_norms: ClassVar[bool] = True
    bottleneck: int = 24

    def __post_init__(self):
        _check(self.bottleneck >= 1, "tuning.adapter.bottleneck", "must be >= 1")


@dataclass(frozen=True)
class TuningConfig:
    """Task tuning of a PLM, for each tuning type in `types`. Evaluation on dev every `eval_every_steps`; the
    best-dev checkpoint is kept and tested. PET types may use their own learning rate and step budget
    (`pet_lr`, `pet_max_steps`; unset = the fine-tuning values), as the paper trains adapters longer.

    `pet_norms`: how the LayerNorms a PET type trains (adapters: every one, the embeddings' included) move when
    its weights are recycled onto another PLM M_j without training — compatibility, the `init` and `combined`
    starts, training-free recycling. "delta" (default): LN_j + (LN_i^τ − LN_i), the new PLM's own LayerNorm plus
    what tuning changed, as fine-tuning's Δ moves every weight; "absolute": the old tuned LN_i^τ as is (the
    paper-faithful variant, and raysys before this field: it restores part of the old backbone, so adapter
    "recycling" is then partly undoing the upgrade). It decides nothing about tuning itself: tuned models keep one
    identity under both (raysys.identity.recycling_identity)."""

    types: tuple[str, ...] = ("finetune",)
    max_steps: int = 300
    batch_size: int = 16
    max_length: int = 64
    lr: float = 1e-3
    pet_lr: float | None = None
    pet_max_steps: int | None = None
    warmup_fraction: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every_steps: int = 25
    eval_batch_size: int = 256
    lora: LoraConfig = LoraConfig()
    adapter: AdapterConfig = AdapterConfig()
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    checkpoint_every_seconds: float = 600.0  # mid-run checkpoints of tuning and method cells (0: every evaluation)
    precision: str = "fp32"  # "bf16": autocast on the trial's device
    length_bucketing: bool = False  # training batches of similar lengths (less padding; a different data order)
    pet_norms: Literal["delta", "absolute"] = "delta"

    def __post_init__(self):
        _check_precision(self.precision, "tuning.precision")
        _check(self.pet_norms in PET_NORM_POLICIES, "tuning.pet_norms",
               f"'{self.pet_norms}' is not one of {list(PET_NORM_POLICIES)}")
        _check(len(self.types) >= 1, "tuning.types", f"name at least one of {list(TUNING_TYPES)}")
        for t in self.types:
            _check(t in TUNING_TYPES, "tuning.types", f"unknown tuning type '{t}'; known: {list(TUNING_TYPES)}")
        _check(len(set(self.types)) == len(self.types), "tuning.types", "must be distinct")
        _check(self.max_steps > 0, "tuning.max_steps", "must be > 0")
        _check(self.pet_max_steps is None or self.pet_max_steps > 0, "tuning.pet_max_steps", "must be > 0")
        _check(self.batch_size > 0 and self.eval_batch_size > 0, "tuning.batch_size", "must be > 0")
        _check(self.lr > 0, "tuning.lr", "must be > 0")
        _check(self.pet_lr is None or self.pet_lr > 0, "tuning.pet_lr", "must be > 0")
        _check(self.max_length >= 8, "tuning.max_length", "must be >= 8")
        _check(self.weight_decay >= 0, "tuning.weight_decay", "must be >= 0 (a negative decay grows the weights)")
        # clip_grad_norm_ scales the gradient to at most this norm: 0 zeroes it, a negative one flips it (ascent)
        _check(self.max_grad_norm > 0, "tuning.max_grad_norm", "must be > 0")
        _check(0.0 <= self.warmup_fraction < 1.0, "tuning.warmup_fraction", "must be in [0, 1)")
        _check(0 < self.eval_every_steps <= min(self.max_steps, self.pet_max_steps or self.max_steps),
               "tuning.eval_every_steps", "must be in 1..max_steps (and 1..pet_max_steps)")
        _check(self.cpus_per_trial > 0, "tuning.cpus_per_trial", "must be > 0")
        _check_gpus(self.gpus_per_trial, "tuning.gpus_per_trial")
        _check(self.checkpoint_every_seconds >= 0, "tuning.checkpoint_every_seconds", "must be >= 0")

    def lr_for(self, tuning_type: str) -> float:
        return self.lr if tuning_type == "finetune" or self.pet_lr is None else self.pet_lr

    def max_steps_for(self, tuning_type: str) -> int:
        return self.max_steps if tuning_type == "finetune" or self.pet_max_steps is None else self.pet_max_steps

    def pet_spec(self, tuning_type: str) -> dict | None:
        """The hyper-parameters of the PET module of `tuning_type` (None for full fine-tuning)."""
        if tuning_type not in TUNING_TYPES:
            raise ConfigError(f"tuning type: unknown '{tuning_type}'; known: {list(TUNING_TYPES)}")
        return to_dict(getattr(self, tuning_type)) if tuning_type in PET_TYPES else None

    def trains_norms(self, tuning_type: str) -> bool:
        """Does `tuning_type` train the backbone's LayerNorms (so that `pet_norms` decides how they are recycled)?"""
        return tuning_type in PET_TYPES and type(getattr(self, tuning_type)).trains_norms


def pet_sections(cls: type) -> tuple[str, ...]:
    """The fields of a tuning config class that are PET sections (named after their type), in field order."""
    return tuple(name for name, tp in typing.get_type_hints(cls).items()
                 if isinstance(tp, type) and issubclass(tp, PetConfig))


PET_TYPES = pet_sections(TuningConfig)  # ("lora", "adapter")
TUNING_TYPES = (FULL_FINETUNING,) + PET_TYPES


def _default_alphas(points: int = 26) -> tuple[float, ...]:
    return tuple(round(i / (points - 1), 6) for i in range(points))


@dataclass(frozen=True)
class PilotConfig:
    """The pilot studies: compatibility of Δ_i with every later M_j; interpolation, head similarity and distances
    between the tuned M_i and the tuned M_{i+h} for each h in `hops`; and a control chain — a second M0 from
    `control_seed` (or the independent checkpoint `control_name_or_path`), continually pre-trained the same way
    for `control_length` links (None = as long as the main chain, 0 = no control) — whose tuned models share no
    pre-training history with the main chain's; with `reference_pairs`, two seeds tuned on each hop's M_i (the
    same-PLM floor of mode connectivity: how connected two tuned models are with no upgrade between them).

    `lora_path`: what a LoRA pair's path interpolates. "merged" (default): each end's effective weight
    W + s·B·A (s = lora alpha / rank, as peft scales it), so the update along the path is linear in α as for the
    other types; "factors": A and B factor by factor (raysys before this field), which makes B(α)·A(α) quadratic
    in α — part of a midpoint dip is then the parametrisation, not the loss surface."""

    alphas: tuple[float, ...] = field(default_factory=_default_alphas)
    hops: tuple[int, ...] = (1, 2)
    control_seed: int = 1
    control_name_or_path: str | None = None
    control_checkpoint_fingerprint: str = ""  # as model.checkpoint_fingerprint, for control_name_or_path
    control_length: int | None = None
    reference_pairs: bool = True  # same-PLM pairs (two seeds on one M_i) beside the continual and control pairs
    similarity_examples: int = 64
    eval_batch_size: int = 256
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # evaluation-only cells: a fraction lets several share one GPU
    lora_path: Literal["merged", "factors"] = "merged"

    def __post_init__(self):
        _check_gpus(self.gpus_per_trial, "pilot.gpus_per_trial")
        _check(self.lora_path in LORA_PATHS, "pilot.lora_path", f"'{self.lora_path}' is not one of {list(LORA_PATHS)}")
        _check(len(self.alphas) >= 2, "pilot.alphas", "needs at least two values")
        _check(all(0.0 <= a <= 1.0 for a in self.alphas), "pilot.alphas", "every alpha must be in [0, 1]")
        _check(len(set(self.alphas)) == len(self.alphas), "pilot.alphas", "values must be distinct")
        _check(0.0 in self.alphas and 1.0 in self.alphas, "pilot.alphas",
               "must include both ends, 0 and 1 (the barrier is measured against them)")
        _check(len(self.hops) >= 1 and all(h >= 1 for h in self.hops), "pilot.hops", "hops must be >= 1")
        _check_distinct(self.hops, "pilot.hops")
        _check_seed(self.control_seed, "pilot.control_seed")
        _check(self.control_length is None or self.control_length >= 0, "pilot.control_length", "must be >= 0")
        _check(self.similarity_examples >= 1, "pilot.similarity_examples", "must be >= 1")
        _check(self.eval_batch_size >= 1, "pilot.eval_batch_size", "must be >= 1")
        _check(self.cpus_per_trial > 0, "pilot.cpus_per_trial", "must be > 0")


@dataclass(frozen=True)
class RecyclingMethod:
    """What a method of the methods stage is made of. `start`: where tuning M_j begins — "fresh" (a new seeded
    head, and PET module, on M_j), "old_weights" (Δ_i recycled onto M_j: θ_j + (θ_i^τ − θ_i) with the old head;
    PET: the old module and head on M_j, LayerNorms by `tuning.pet_norms`) or "transferred" (the weights a
    training-free transfer method of the transfer stage made for M_j, its setting chosen there on dev; one run per
    method of `methods.transfer_starts`) or "distilled_on_text" (a fresh start taught by the old model on
    unlabeled text of M_j's domain, `methods.text_distill`; K-shot only). `objective`: "cross_entropy", or "distillation" — (1 − a)·CE + a·T²·KL +
    β·½·MSE against the old model on the old PLM, over the T × a × β grid (or an Optuna search)."""

    start: Literal["fresh", "old_weights", "transferred", "distilled_on_text"]
    objective: Literal["cross_entropy", "distillation"]

    @property
    def distils(self) -> bool:
        return self.objective == "distillation"

    @property
    def recycles(self) -> bool:
        """Does the method need the outdated tuned model (as its start or its teacher)?"""
        return self.start != "fresh" or self.distils


# The registry of recycling methods: adding one is one entry (report, figures and search read this table). The
# first is the reference every other method is measured against (convergence targets, the findings); the paper's
# are the first four; `transfer_init` (issue 21's generalisation of `init`, docs/transfer.md) and `text_distill`
# (distillation on unlabeled text, then the K-shot fine-tune) are beyond it.
RECYCLING_METHODS = {
    "vanilla": RecyclingMethod("fresh", "cross_entropy"),
    "init": RecyclingMethod("old_weights", "cross_entropy"),
    "distill": RecyclingMethod("fresh", "distillation"),
    "combined": RecyclingMethod("old_weights", "distillation"),
    "transfer_init": RecyclingMethod("transferred", "cross_entropy"),
    "text_distill": RecyclingMethod("distilled_on_text", "cross_entropy"),
}
PAPER_METHODS = ("vanilla", "init", "distill", "combined")  # what the paper's claims compare
METHODS = tuple(RECYCLING_METHODS)
REFERENCE_METHOD = METHODS[0]
REGIMES = ("full", "kshot")


@dataclass(frozen=True)
class KShotConfig:
    """Training settings of the few-shot regime; unset fields inherit the tuning config's (the official scripts
    train few-shot students with lr 1e-5, batch 2, 2,000 warm-up steps, evaluating every 1,000 steps)."""

    batch_size: int | None = None
    lr: float | None = None
    pet_lr: float | None = None
    max_steps: int | None = None
    warmup_fraction: float | None = None
    eval_every_steps: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "eval_every_steps"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"methods.kshot.{name}", "must be >= 1")
        for name in ("lr", "pet_lr"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"methods.kshot.{name}", "must be > 0")
        _check(self.warmup_fraction is None or 0.0 <= self.warmup_fraction < 1.0, "methods.kshot.warmup_fraction",
               "must be in [0, 1)")


@dataclass(frozen=True)
class TrainingFreeConfig:
    """The paper's appendix: a learned low-rank affine map of old PET weights, w' = w + w·W1·W2 + b (W2 and b
    start at zero, so the untrained map is direct application), one map per module weight; trained with the
    distillation loss on one task's old weights, applied to the other tasks' old weights without training.
    `tasks`: the tasks whose old weights are mapped (None = every task; they must share one label count)."""

    enabled: bool = True
    tasks: tuple[str, ...] | None = None
    rank: int = 8
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    temperature: float = 10.0
    kd_weight: float = 0.9

    def __post_init__(self):
        _check(self.tasks is None or len(self.tasks) >= 1, "methods.training_free.tasks",
               "name at least one task (or leave it out: every task)")
        _check_distinct(self.tasks or (), "methods.training_free.tasks")
        _check(self.rank >= 1, "methods.training_free.rank", "must be >= 1")
        _check(self.steps >= 1, "methods.training_free.steps", "must be >= 1")
        _check(self.lr > 0, "methods.training_free.lr", "must be > 0")
        _check(self.batch_size >= 1, "methods.training_free.batch_size", "must be >= 1")
        _check(self.temperature > 0, "methods.training_free.temperature", "must be > 0")
        _check(0.0 <= self.kd_weight <= 1.0, "methods.training_free.kd_weight", "must be in [0, 1]")


@dataclass(frozen=True)
class TextDistillConfig:
    """Distillation without task labels (Trans-LoRA's idea; issue 21): the methods' `text_distill` starts a fresh
    model on M_j, teaches it the old adapted model's outputs (T²·KL, and β·½·MSE of first-token states) on
    `sentences` unlabeled documents of M_j's own domain corpus — the first ones, no task data — for `steps` steps,
    keeping the state best on the K-shot dev set; then the K-shot fine-tune starts from it. K-shot regime only.
    Unset `batch_size` and `lr` inherit the K-shot tuning's."""

    sentences: int = 4096
    steps: int = 500
    batch_size: int | None = None
    lr: float | None = None
    temperature: float = 5.0
    beta: float = 0.0
    eval_every_steps: int = 100

    def __post_init__(self):
        _check(self.sentences >= 1, "methods.text_distill.sentences", "must be >= 1")
        _check(self.steps >= 1, "methods.text_distill.steps", "must be >= 1")
        _check(self.batch_size is None or self.batch_size >= 1, "methods.text_distill.batch_size", "must be >= 1")
        _check(self.lr is None or self.lr > 0, "methods.text_distill.lr", "must be > 0")
        _check(self.temperature > 0, "methods.text_distill.temperature", "must be > 0")
        _check(self.beta >= 0, "methods.text_distill.beta", "must be >= 0")
        _check(1 <= self.eval_every_steps <= self.steps, "methods.text_distill.eval_every_steps",
               "must be in 1..steps")


# The training-free transfer methods (docs/transfer.md; raysys.core.transfer registers the same names). `copy` is
# plain copying (λ = 1): the reference every other method is compared with.
TRANSFER_METHODS = ("copy", "scaled", "dare", "ties", "svd", "subspace", "multi_version")
# each method's grid axes: the setting's name (the function's argument) -> the TransferConfig field of its values
TRANSFER_AXES: dict[str, dict[str, str]] = {
    "copy": {}, "scaled": {"scale": "scales"}, "dare": {"drop": "dare_drops"}, "ties": {"density": "ties_densities"},
    "svd": {"rank": "svd_ranks"}, "subspace": {"rank": "subspace_ranks", "null_space": "null_space"},
    "multi_version": {"density": "merge_densities"},
}
# What a method needs beyond one Δ (planning reads it without torch): "backbone" — it projects ΔW onto a backbone
# weight's subspaces, so a type whose module has no backbone weight under it (the bottleneck adapter) cannot use it;
# "history" — it merges Δ_0 … Δ_i, so M_0's weights (no past) cannot.
TRANSFER_NEEDS = {"svd": "backbone", "subspace": "backbone", "multi_version": "history"}


def transfer_not_applicable(method: str, tuning_type: str, versions: int) -> str | None:
    """Why `method` cannot run on a Δ of `tuning_type` (None: it can): fine-tuning's and LoRA's updates sit on
    backbone linear weights, the adapter's in a separate module; `versions` how many Δ of the task the chain has up
    to M_i."""
    need = TRANSFER_NEEDS.get(method)
    if need == "backbone" and tuning_type not in (FULL_FINETUNING, "lora"):
        return "the adapter's module has no backbone weight whose subspaces it could be projected onto"
    if need == "history" and versions < 2:
        return "needs Δ of at least two PLM versions (M_0 has no earlier one)"
    return None


@dataclass(frozen=True)
class TransferConfig:
    """Training-free transfer of Δ_i onto M_j by the methods published since the paper (issue 21; definitions in
    docs/transfer.md), on the compatibility matrix's pairs (i, j) with j − i in `hops` (None: every pair). Each
    method's setting is chosen on the full dev set per (task, type, seed, pair); `copy` is the reference."""

    enabled: bool = True
    names: tuple[str, ...] = TRANSFER_METHODS
    hops: tuple[int, ...] | None = None
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # λ of `scaled`
    dare_drops: tuple[float, ...] = (0.3, 0.5, 0.9)  # DARE's drop rate p
    ties_densities: tuple[float, ...] = (0.1, 0.2, 0.5)  # TIES's top-k fraction, one Δ
    svd_ranks: tuple[int, ...] = (8, 32, 128)
    subspace_ranks: tuple[int, ...] = (8, 32, 128)
    null_space: tuple[bool, ...] = (True, False)
    merge_densities: tuple[float, ...] = (0.2, 0.5)  # TIES's density over Δ_0 … Δ_i (multi_version)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def __post_init__(self):
        _check(len(self.names) >= 1, "transfer.names", "name at least one method")
        _check_distinct(self.names, "transfer.names")
        for name in self.names:
            _check(name in TRANSFER_METHODS, "transfer.names", f"unknown method '{name}'; known: {list(TRANSFER_METHODS)}")
        _check(self.hops is None or (len(self.hops) >= 1 and all(h >= 1 for h in self.hops)), "transfer.hops",
               "hops must be >= 1 (or leave it out: every pair)")
        for field_name in ("hops", "scales", "dare_drops", "ties_densities", "svd_ranks", "subspace_ranks",
                           "null_space", "merge_densities"):
            values = getattr(self, field_name) or ()
            _check_distinct(values, f"transfer.{field_name}")
        for method in self.names:
            for axis in TRANSFER_AXES[method].values():
                _check(len(getattr(self, axis)) >= 1, f"transfer.{axis}", f"method '{method}' needs at least one value")
        _check(all(s >= 0 for s in self.scales), "transfer.scales", "every λ must be >= 0")
        _check(all(0.0 <= p < 1.0 for p in self.dare_drops), "transfer.dare_drops", "every drop rate must be in [0, 1)")
        for field_name in ("ties_densities", "merge_densities"):
            _check(all(0.0 < k <= 1.0 for k in getattr(self, field_name)), f"transfer.{field_name}",
                   "every density must be in (0, 1]")
        for field_name in ("svd_ranks", "subspace_ranks"):
            _check(all(r >= 1 for r in getattr(self, field_name)), f"transfer.{field_name}", "every rank must be >= 1")
        _check(self.cpus_per_trial > 0, "transfer.cpus_per_trial", "must be > 0")
        _check_gpus(self.gpus_per_trial, "transfer.gpus_per_trial")

    def grid(self, method: str) -> list[dict]:
        """The settings of `method` (its axes' product, in config order): the keyword arguments of its function."""
        settings = [{}]
        for arg, axis in TRANSFER_AXES[method].items():
            settings = [{**s, arg: v} for s in settings for v in getattr(self, axis)]
        return settings


@dataclass(frozen=True)
class RecycleConfig:
    """Recycling every stored Δ when a new PLM arrives (issue 21): per (task, tuning type, upgrade i → j of the
    transfer pairs), a cheap probe — each setting of each method of `methods` scored on `probe_examples` dev
    examples (the same seeded subset for every cell of a task) for every seed's Δ_i — picks one (method, setting)
    by the rule: the highest mean probe accuracy over the seeds, then the lowest mean probe loss, then the order of
    `methods` and of each grid. The chosen weights are made for M_j for every seed, scored on the full dev and
    test sets and stored (`artifacts/recycled/`); the transfer stage's full grid is the ground truth the report
    judges the probe against."""

    enabled: bool = True
    methods: tuple[str, ...] = ("copy", "scaled", "ties")
    probe_examples: int = 64
    probe_seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def __post_init__(self):
        _check(len(self.methods) >= 1, "recycle.methods", "name at least one transfer method")
        _check_distinct(self.methods, "recycle.methods")
        for name in self.methods:
            _check(name in TRANSFER_METHODS, "recycle.methods", f"unknown method '{name}'; known: {list(TRANSFER_METHODS)}")
            _check(name != "multi_version", "recycle.methods", "multi_version merges a task's earlier versions: "
                   "not a probe of one Δ (the transfer stage runs it)")
        _check(self.probe_examples >= 1, "recycle.probe_examples", "must be >= 1")
        _check_seed(self.probe_seed, "recycle.probe_seed")
        _check(self.cpus_per_trial > 0, "recycle.cpus_per_trial", "must be > 0")
        _check_gpus(self.gpus_per_trial, "recycle.gpus_per_trial")


SEARCH_ALGORITHMS = ("grid", "optuna")


@dataclass(frozen=True)
class SearchConfig:
    """How the continuous knobs of the methods are chosen. `grid`: the T × a × β grid above, the tuning lr.
    `optuna` (`--search optuna`): inside each grid cell (upgrade, task, tuning type, regime, seed, method) a seeded
    Optuna TPE search over lr (log-uniform, every method) and T, a, β (uniform, the distilling methods) with a
    budget of `trials` runs, maximising dev accuracy (K-shot dev in the few-shot regime); the fixed-lr vanilla
    and init cells still run as the reference every convergence measure is taken against."""

    algorithm: str = "grid"
    trials: int = 8
    lr: tuple[float, float] = (1e-5, 1e-2)
    temperature: tuple[float, float] = (1.0, 20.0)
    kd_weight: tuple[float, float] = (0.0, 1.0)
    beta: tuple[float, float] = (0.0, 100.0)
    seed: int = 0
    # trials of one search in flight at once (all searches run together): TPE proposes from the results it has,
    # so a search wider than this learns less from its own trials
    parallel: int = 4

    def __post_init__(self):
        _check(self.algorithm in SEARCH_ALGORITHMS, "methods.search.algorithm",
               f"unknown '{self.algorithm}'; known: {list(SEARCH_ALGORITHMS)}")
        _check(self.trials >= 1, "methods.search.trials", "must be >= 1")
        _check(self.parallel >= 1, "methods.search.parallel", "must be >= 1")
        _check_seed(self.seed, "methods.search.seed")
        for name, low in (("lr", 0.0), ("temperature", 0.0), ("kd_weight", 0.0), ("beta", 0.0)):
            lo, hi = getattr(self, name)
            _check(lo >= low and lo < hi, f"methods.search.{name}", f"must be a range [low, high) with low >= {low}"
                   f" and low < high, got {[lo, hi]}")
            _check(name != "lr" or lo > 0, "methods.search.lr", "the learning-rate range must start above 0")
        _check(self.kd_weight[1] <= 1.0, "methods.search.kd_weight", "a must stay within [0, 1]")


@dataclass(frozen=True)
class MethodsConfig:
    """Recycling the outdated Δ_i when tuning M_{i+h} with the methods `names` of RECYCLING_METHODS: `vanilla`
    (fresh start, cross-entropy), `init` (start from the old delta / module and head), `distill` (fresh start;
    teacher = the old tuned model on the old PLM; loss (1 − a)·CE + a·T²·KL + β·½·MSE), `combined` (init
    start, distillation loss), and beyond the paper `transfer_init` (start from the weights a transfer method of
    `transfer_starts` made, its setting chosen on dev by the transfer stage; docs/transfer.md) and `text_distill`
    (K-shot only: distillation on unlabeled text of M_j's domain, then the K-shot fine-tune). The grid: temperatures (T), kd_weights (a) and betas (β) multiply only the
    distilling methods; upgrades are (i, i + h) for i in `sources` (None = every tuned PLM with a successor) and
    h in `hops`; regimes `full` and `kshot` (K per class for each K in `shots`). Convergence is measured against
    the vanilla run: the first evaluation reaching `target_fraction` of its best dev accuracy."""

    names: tuple[str, ...] = METHODS  # which of RECYCLING_METHODS run
    tasks: tuple[str, ...] | None = None  # None = every task
    types: tuple[str, ...] | None = None  # None = every tuning type
    sources: tuple[int, ...] | None = None
    hops: tuple[int, ...] = (1,)
    regimes: tuple[str, ...] = REGIMES
    shots: tuple[int, ...] = (32,)
    temperatures: tuple[float, ...] = (5.0, 10.0, 20.0)
    kd_weights: tuple[float, ...] = (0.7, 0.9)
    betas: tuple[float, ...] = (0.0, 5.0, 10.0, 50.0, 100.0)
    teacher_dropout: bool = False
    target_fraction: float = 0.95
    # `transfer_init` starts: one run per transfer method here (copy is `init` itself)
    transfer_starts: tuple[str, ...] = ("scaled", "dare", "ties", "svd", "subspace", "multi_version")
    kshot: KShotConfig = KShotConfig()
    training_free: TrainingFreeConfig = TrainingFreeConfig()
    text_distill: TextDistillConfig = TextDistillConfig()
    search: SearchConfig = SearchConfig()
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0

    def __post_init__(self):
        _check(len(self.names) >= 1 and len(set(self.names)) == len(self.names), "methods.names",
               "name each method once, at least one")
        for name in self.names:
            _check(name in RECYCLING_METHODS, "methods.names",
                   f"unknown method '{name}'; known: {list(RECYCLING_METHODS)}")
        for t in self.types or ():
            _check(t in TUNING_TYPES, "methods.types", f"unknown tuning type '{t}'; known: {list(TUNING_TYPES)}")
        _check(self.types is None or len(self.types) >= 1, "methods.types", "name at least one tuning type")
        _check(len(self.hops) >= 1 and all(h >= 1 for h in self.hops), "methods.hops", "hops must be >= 1")
        _check(self.tasks is None or len(self.tasks) >= 1, "methods.tasks", "name at least one task (or leave it out: "
               "every task)")
        _check(self.sources is None or len(self.sources) >= 1, "methods.sources",
               "name at least one PLM index (or leave it out: every tuned PLM)")
        for name in ("hops", "tasks", "types", "sources", "regimes", "shots", "temperatures", "kd_weights", "betas",
                     "transfer_starts"):
            _check_distinct(getattr(self, name) or (), f"methods.{name}")
        for name in self.transfer_starts:
            _check(name in TRANSFER_METHODS and name != TRANSFER_METHODS[0], "methods.transfer_starts",
                   f"unknown transfer method '{name}'; known: {list(TRANSFER_METHODS[1:])} ('{TRANSFER_METHODS[0]}' "
                   "is `init` itself)")
        _check(len(self.regimes) >= 1, "methods.regimes", f"name at least one of {list(REGIMES)}")
        for r in self.regimes:
            _check(r in REGIMES, "methods.regimes", f"unknown regime '{r}'; known: {list(REGIMES)}")
        _check(len(self.shots) >= 1 and all(k >= 1 for k in self.shots), "methods.shots",
               "K (examples per class) must be >= 1")
        _check(len(self.temperatures) >= 1 and all(t > 0 for t in self.temperatures), "methods.temperatures",
               "every temperature T must be > 0")
        _check(len(self.kd_weights) >= 1 and all(0.0 <= a <= 1.0 for a in self.kd_weights), "methods.kd_weights",
               "every distillation weight a must be in [0, 1]")
        _check(len(self.betas) >= 1 and all(b >= 0 for b in self.betas), "methods.betas",
               "every hidden-state weight beta must be >= 0")
        _check(0.0 < self.target_fraction <= 1.0, "methods.target_fraction", "must be in (0, 1]")
        _check(self.search.algorithm == "grid" or REFERENCE_METHOD in self.names, "methods.search.algorithm",
               f"an Optuna search measures convergence against the {REFERENCE_METHOD} run: keep "
               f"'{REFERENCE_METHOD}' in methods.names")
        _check(self.cpus_per_trial > 0, "methods.cpus_per_trial", "must be > 0")
        _check_gpus(self.gpus_per_trial, "methods.gpus_per_trial")


@dataclass(frozen=True)
class ReportConfig:
    """How the findings judge the paper's claims (read by the report only: changing it re-judges the same rows,
    never reruns a cell). A claim is shown in a setting when its paired effect reaches the margin and the
    `confidence` interval (`interval`: Student's t, or a percentile bootstrap of `bootstrap_resamples`) excludes
    zero; every margin is in accuracy (0.02 = 2 points) and printed with its rule."""

    confidence: float = 0.95
    interval: Literal["t", "bootstrap"] = "t"
    bootstrap_resamples: int = 10_000
    learned_margin: float = 0.10  # an end "learned the task": beats max(majority, untrained head) by this much
    compat_margin: float = 0.02  # Δ_i on M_j over max(majority, untrained head on M_j)
    lmc_max_drop: float = 0.05  # a connected path falls at most this far below its straight line
    head_margin: float = 0.05  # corresponding over non-corresponding heads' similarity (not an accuracy)
    auc_margin: float = 0.02  # init over vanilla: area under the dev curve from the first evaluation on
    distill_margin: float = 0.01  # distill over vanilla, K-shot test accuracy
    combined_margin: float = 0.0  # combined over the best other method, test accuracy
    transfer_margin: float = 0.01  # a transfer method over plain copying, test accuracy (issue 21's claim)

    def __post_init__(self):
        _check(0.5 <= self.confidence < 1.0, "report.confidence", "must be in [0.5, 1), e.g. 0.95")
        _check(self.interval in ("t", "bootstrap"), "report.interval", "'t' or 'bootstrap'")
        _check(self.bootstrap_resamples >= 100, "report.bootstrap_resamples", "must be >= 100")
        for name in ("learned_margin", "compat_margin", "lmc_max_drop", "head_margin", "auc_margin",
                     "distill_margin", "combined_margin", "transfer_margin"):
            _check(0.0 <= getattr(self, name) < 1.0, f"report.{name}", "must be in [0, 1)")


@dataclass(frozen=True)
class StudyConfig:
    """The sweep spec: the PLM chain (corpora[0] is D0 for M0, corpora[i] the data that makes M_i), the tasks,
    which PLM versions to tune each task on, seeds, and the stage configs."""

    name: str
    model: ModelConfig
    corpora: tuple[CorpusConfig, ...]
    tasks: tuple[TaskConfig, ...]
    world: WorldConfig = WorldConfig()  # only read by built-in sources
    pretrain: PretrainConfig = PretrainConfig()
    tuning: TuningConfig = TuningConfig()
    pilot: PilotConfig = PilotConfig()
    methods: MethodsConfig = MethodsConfig()
    transfer: TransferConfig = TransferConfig()
    recycle: RecycleConfig = RecycleConfig()
    report: ReportConfig = ReportConfig()
    seeds: tuple[int, ...] = (20, 30)
    tune_plms: tuple[int, ...] | None = None

    def __post_init__(self):
        _check(len(self.corpora) >= 2, "corpora", "a chain needs D0 and at least one further domain")
        names = [c.name for c in self.corpora]
        _check(len(set(names)) == len(names), "corpora", f"domain names must be unique, got {names}")
        task_names = [t.name for t in self.tasks]
        _check(len(self.tasks) >= 1, "tasks", "at least one task is needed")
        _check(len(set(task_names)) == len(task_names), "tasks", f"task names must be unique, got {task_names}")
        for task in self.tasks:
            _check(task.domain in names, f"task {task.name}.domain", f"'{task.domain}' is not one of {names}")
        _check(bool(self.name.strip()), "name", "the study needs a name")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", "must be distinct, >= 1")
        for seed in self.seeds:
            _check_seed(seed, "seeds")
        _check(len(self.plms_to_tune) >= 1, "tune_plms", "name at least one PLM index (or leave it out: every PLM)")
        _check_distinct(self.plms_to_tune, "tune_plms")
        for i in self.plms_to_tune:
            _check(0 <= i < len(self.corpora), "tune_plms", f"PLM index {i} outside 0..{len(self.corpora) - 1}")
        self._check_lengths()
        builtin = [c.name for c in self.corpora if c.source == "builtin"]
        expected = [f"d{i}" for i in range(self.world.num_domains + 1)]
        for name in builtin:
            _check(name in expected, f"corpus {name}", f"builtin domains are {expected}")
        for task in self.tasks:
            if task.source == "builtin":
                _check(task.domain in builtin and task.domain != "d0", f"task {task.name}.domain",
                       "a builtin task belongs to a builtin domain d1..dN")
        self._check_methods()
        self._check_reach()
        control = self.control_length
        _check(control <= len(self.corpora), "pilot.control_length",
               f"the control chain cannot be longer than the main chain ({len(self.corpora)} links)")
        if control and self.model.name_or_path and not self.pilot.control_name_or_path:
            raise ConfigError("pilot.control_name_or_path: the main chain starts from a pretrained checkpoint, so the "
                              "control chain needs an independently pre-trained one of the same architecture "
                              "(or set pilot.control_length = 0)")

    def _check_lengths(self) -> None:
        """A model built here holds `max_positions` positions: every sequence it is fed must fit (a checkpoint's
        own config says its length; these fields are then unused)."""
        if self.model.name_or_path:
            return
        for name, length in (("pretrain.sequence_length", self.pretrain.sequence_length),
                             ("tuning.max_length", self.tuning.max_length)):
            _check(length <= self.model.max_positions, "model.max_positions",
                   f"{self.model.max_positions} is shorter than {name} = {length}")

    def _check_reach(self) -> None:
        """Hops that reach past the chain, or a tuned set no hop joins, would leave the pilot or methods stages
        without a cell and say nothing. (A hop past the chain beside one within it is the defaults' (1, 2) on a
        chain of two: allowed.)"""
        n = len(self.corpora)
        _check(bool(self.pilot_pairs), "pilot.hops", f"no hop in {list(self.pilot.hops)} joins two tuned PLMs "
               f"(tune_plms = {list(self.plms_to_tune)}, a chain of {n}): the interpolation and similarity stages "
               "would be empty")
        _check(bool(self.upgrades), "methods.hops", f"no tuned PLM has a successor M_i+h for h in "
               f"{list(self.methods.hops)} (tune_plms = {list(self.plms_to_tune)}, a chain of {n}): the methods "
               "stage would be empty")
        if self.control_length and not self.pilot.control_name_or_path and not self.model.name_or_path:
            _check(self.pilot.control_seed != self.pretrain.seed, "pilot.control_seed",
                   f"equals pretrain.seed ({self.pretrain.seed}): the control chain would be the main chain")
            _check(self.pilot.control_seed not in self.pretrain.replicate_seeds, "pilot.control_seed",
                   f"is in pretrain.replicate_seeds ({list(self.pretrain.replicate_seeds)}): the control chain "
                   "would be a replicate of the main chain")
        _check(self.control_length != 1, "pilot.control_length", "1 makes a control chain of C0 alone, which no pair "
               "uses (a control pair compares tuned M_i with C_j, j >= 1): 0 (none) or >= 2")
        _check(not self.pilot.control_name_or_path or self.pilot.control_name_or_path != self.model.name_or_path,
               "pilot.control_name_or_path", "is model.name_or_path: the control chain would share its history")

    def _check_methods(self) -> None:
        for name in self.methods.tasks or ():
            _check(name in [t.name for t in self.tasks], "methods.tasks", f"unknown task '{name}'")
        for name in self.methods.training_free.tasks or ():
            _check(name in [t.name for t in self.tasks], "methods.training_free.tasks", f"unknown task '{name}'")
        for t in self.methods.types or ():
            _check(t in self.tuning.types, "methods.types", f"'{t}' is not tuned (tuning.types = "
                   f"{list(self.tuning.types)}), so it has no outdated weights to recycle")
        for i in self.methods.sources or ():
            _check(i in self.plms_to_tune, "methods.sources", f"M{i} is not tuned (tune_plms), so it has no "
                   "outdated weights to recycle")
            _check(any(i + h < len(self.corpora) for h in self.methods.hops), "methods.sources",
                   f"M{i} has no successor M{i}+h for h in {list(self.methods.hops)} in a chain of "
                   f"{len(self.corpora)}")
        if "transfer_init" in self.methods.names and self.transfer.enabled:
            for name in self.methods.transfer_starts:
                _check(name in self.transfer.names, "methods.transfer_starts", f"'{name}' is not in transfer.names "
                       f"({list(self.transfer.names)}): the transfer stage would not choose its setting")

    @property
    def upgrades(self) -> tuple[tuple[int, int], ...]:
        """(i, j): the outdated weights tuned on M_i, recycled for M_j."""
        sources = self.methods.sources
        if sources is None:
            sources = self.plms_to_tune
        return tuple((i, i + h) for h in self.methods.hops for i in sources if i + h < len(self.corpora))

    @property
    def pilot_pairs(self) -> tuple[tuple[int, int], ...]:
        """(i, i + h) for every hop h of the pilot studies between two tuned PLMs of the main chain."""
        tuned = set(self.plms_to_tune)
        return tuple((i, i + h) for h in self.pilot.hops for i in range(len(self.corpora))
                     if i in tuned and i + h in tuned)

    @property
    def transfer_pairs(self) -> tuple[tuple[int, int], ...]:
        """(i, j) of the compatibility matrix the transfer methods run on: tuned M_i and M_j, j − i in
        `transfer.hops` (None: every such pair)."""
        tuned, hops = sorted(self.plms_to_tune), self.transfer.hops
        return tuple((i, j) for i in tuned for j in tuned if j > i and (hops is None or j - i in hops))

    @property
    def training_free_tasks(self) -> tuple[TaskConfig, ...]:
        names = self.methods.training_free.tasks
        return self.tasks if names is None else tuple(t for t in self.tasks if t.name in names)

    @property
    def method_tasks(self) -> tuple[TaskConfig, ...]:
        names = self.methods.tasks
        return self.tasks if names is None else tuple(t for t in self.tasks if t.name in names)

    @property
    def method_types(self) -> tuple[str, ...]:
        return self.methods.types or self.tuning.types

    @property
    def control_length(self) -> int:
        """How many links the control chain has (0 = none)."""
        return len(self.corpora) if self.pilot.control_length is None else self.pilot.control_length

    @property
    def plms_to_tune(self) -> tuple[int, ...]:
        return tuple(range(len(self.corpora))) if self.tune_plms is None else self.tune_plms


def section_name(section: Any) -> str:
    """The StudyConfig field that holds a section of this type (`tuning` for a TuningConfig), for messages."""
    return _SECTION_NAMES[type(section)]


_SECTION_NAMES = {tp: name for name, tp in typing.get_type_hints(StudyConfig).items()
                  if isinstance(tp, type) and dataclasses.is_dataclass(tp)}


# ---------------------------------------------------------------------------------------------------- building


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a plain (JSON/TOML) value to type `tp`, naming `where` on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond a double's range
            number = math.inf
        if not math.isfinite(number):  # a nan slips through `x < 0` checks; an inf rate or weight trains to nan
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def build(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types are errors naming the field."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(config: Any) -> Any:
    """Plain, JSON-able view of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> dict:
    """A packaged preset by name, or any TOML file of the same shape by path (your own chain of corpora and
    tasks: copy `raysys/presets/paper.toml` and edit)."""
    path = Path(name) if name.endswith(".toml") else PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"--preset: unknown preset '{name}'; available: {available_presets()}, or a .toml file")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--preset {path}: invalid TOML ({err})") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8; tomllib's message names neither the file nor the line
        line = err.object[:err.start].count(b"\n") + 1  # tomllib decodes the whole file at once
        raise ConfigError(f"--preset {path}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save "
                          "the file as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"--preset {path}: cannot read it ({err.strerror or err})") from None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override to a plain config dict (value parsed as JSON, else taken as a string).
    List elements are addressed by index (`corpora.1.path=...`)."""
    if "=" not in assignment:
        raise ConfigError(f"--set: expected key=value, got '{assignment}'")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _descend(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise ConfigError(f"--set {'.'.join(parts[:-1])}: cannot descend into a value")
    if isinstance(node, list):
        index = _list_index(node, last, key)
        node[index] = _parse_value(raw)
    else:
        node[last] = _parse_value(raw)
    return data


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {where}: '{part}' is not an index into a list of {len(node)}")
    return int(part)


def _descend(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {where}: cannot descend into a value")
    return node.setdefault(part, {})


def is_uri(path: str) -> bool:
    return "://" in path


def _resolved(path: str, base: Path) -> str:
    """`path` against `base` unless it is absolute or a URI; glob characters are kept."""
    if is_uri(path) or Path(path).expanduser().is_absolute():
        return str(Path(path).expanduser()) if not is_uri(path) else path
    return os.path.normpath(os.path.join(base, path))


def _checkpoint_resolved(name_or_path: str | None, base: Path) -> str | None:
    """A checkpoint given as a relative path (it exists under `base`, or starts with `.`) becomes absolute; a hub
    name such as `roberta-base` stays as it is."""
    if not name_or_path or is_uri(name_or_path) or Path(name_or_path).expanduser().is_absolute():
        return name_or_path
    if name_or_path.startswith(".") or (base / name_or_path).exists():
        return _resolved(name_or_path, base)
    return name_or_path


def resolve_paths(data: dict, base: Path) -> dict:
    """Every relative data path and local checkpoint of a plain study dict, made absolute against `base`, in
    place: trials and Train workers run in working directories of their own, so only absolute paths mean the same
    file everywhere. Already absolute paths and URIs are left alone."""
    for key, sources in (("corpora", FILE_SOURCES), ("tasks", ("jsonl", "parquet"))):
        for spec in data.get(key) or ():
            if isinstance(spec, dict) and spec.get("source") in sources and isinstance(spec.get("path"), str):
                spec["path"] = _resolved(spec["path"], base)
    for section, key in (("model", "name_or_path"), ("pilot", "control_name_or_path")):
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = _checkpoint_resolved(table[key], base)
    return data


def preset_base(preset: str) -> Path:
    """What a preset's relative paths are relative to: a study file's own folder; for a packaged preset (its data
    paths are a template for yours), the working directory."""
    return Path(preset).expanduser().resolve().parent if preset.endswith(".toml") else Path.cwd()


def load_study(preset: str, overrides: typing.Sequence[str] = ()) -> StudyConfig:
    """Code defaults <- preset <- command-line overrides, validated. Relative paths resolve here, before any Ray
    work: a study file's against its folder, those given with `--set` against the working directory."""
    data = resolve_paths(load_preset(preset), preset_base(preset))
    for assignment in overrides:
        data = apply_override(data, assignment)
    return build(StudyConfig, resolve_paths(data, Path.cwd()))
