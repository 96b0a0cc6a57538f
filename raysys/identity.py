"""Identity: what makes two pieces of work the same piece of work.

Every artifact and result row is addressed by `config_hash` of the inputs that determine it — configs, upstream
hashes, strings. The rules here decide which config fields take part: resources never do (how work is spread is
not what it computes), fields added after artifacts existed only when set away from their old behaviour, and a
tuning type's hyper-parameters only for that type. The pinned hashes in tests/test_identity.py hold them still.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from raysys.config import CorpusConfig, MethodsConfig, StudyConfig, TaskConfig, TuningConfig, pet_sections, to_dict

# How the work is spread and paced, not what it computes: never part of an artifact's identity.
RESOURCE_FIELDS = {"num_workers", "cpus_per_worker", "use_gpu", "log_every_steps", "cpus_per_trial", "gpus_per_trial",
                   "eval_batch_size", "checkpoint_every_seconds", "micro_batch_size", "worker_resource"}
# Fingerprints that stand in for a path field (the path's identity is its fingerprint; see checkpoint_identity).
FINGERPRINT_FIELDS = {"checkpoint_fingerprint", "control_checkpoint_fingerprint"}
# Fields added after artifacts were made: part of the identity only when set away from their default, so that the
# artifacts made before they existed keep their hashes (RoBERTa was the only architecture then).
IDENTITY_ONLY_WHEN_SET = {"precision": "fp32", "length_bucketing": False, "architecture": "roberta", "replay": 0.0}
# What the tuning type decides itself (its learning rate and step budget; its PET section): replaced per type below.
_PER_TYPE_FIELDS = {"types", "lr", "max_steps", "pet_lr", "pet_max_steps"}
# How tuned weights are moved onto another PLM, not how they are tuned: never part of a tuned model's identity;
# `recycling_identity` adds it to the cells it decides.
_RECYCLING_FIELDS = {"pet_norms"}


def config_hash(*parts: Any) -> str:
    """Stable identity of the work described by `parts` (configs, strings, upstream hashes)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def identity(config) -> dict:
    """The fields of a (flat) config section that decide what it computes."""
    return {k: v for k, v in to_dict(config).items()
            if k not in RESOURCE_FIELDS and k not in FINGERPRINT_FIELDS and IDENTITY_ONLY_WHEN_SET.get(k, object()) != v}


def checkpoint_identity(name_or_path: str | None, fingerprint: str) -> str | None:
    """A pretrained origin as identities name it: a local folder by its fingerprint (move it, and what was made
    from it stays; edit it, and it is made again), a hub name (or a folder not checked yet) as given."""
    return fingerprint or name_or_path


# Options of a source that say how it is read, not what it holds.
_READING_FIELDS = {"streaming"}
# Source fields added after artifacts were made: part of a source's identity only when set.
_SOURCE_FIELDS_ONLY_WHEN_SET = {"config_name": None, "revision": None}


class UnfingerprintedData(ValueError):
    """A file or hub source reached a hash without its fingerprint: its identity would be its path."""


def data_spec(spec: CorpusConfig | TaskConfig) -> dict:
    """A corpus's or task's part in a hash. Built-in data: its config (the world's config goes beside it). Files and
    hub datasets: their fingerprint in place of their path, so moving the data keeps every artifact and editing it
    makes new ones (raysys.stages.data_check fills fingerprints in before a study is planned)."""
    out = {k: v for k, v in to_dict(spec).items()
           if k not in _READING_FIELDS and k != "fingerprint" and _SOURCE_FIELDS_ONLY_WHEN_SET.get(k, object()) != v}
    if spec.source == "builtin":
        return out
    if spec.fingerprint is None:
        raise UnfingerprintedData(f"{type(spec).__name__} {spec.name}: the data has no fingerprint (load the study "
                                  "through raysys.stages.data_check.check_data)")
    del out["path"]
    return {**out, "data": spec.fingerprint}


def world_if_builtin(study: StudyConfig, source: str) -> dict | None:
    """The built-in world's config for data generated from it; None for data from files or hubs."""
    return to_dict(study.world) if source == "builtin" else None


def tuning_identity(tuning: TuningConfig, tuning_type: str) -> dict:
    """What determines a tuned model besides PLM, task and seed: the shared tuning fields, the learning rate and
    step budget of this type, and its own PET section only (changing LoRA's rank leaves adapters alone)."""
    own = _PER_TYPE_FIELDS | _RECYCLING_FIELDS | set(pet_sections(type(tuning)))  # every PET section
    shared = {k: v for k, v in identity(tuning).items() if k not in own}
    return {**shared, "tuning_type": tuning_type, "lr": tuning.lr_for(tuning_type),
            "max_steps": tuning.max_steps_for(tuning_type), "pet": tuning.pet_spec(tuning_type)}


def recycling_identity(tuning: TuningConfig, tuning_type: str) -> tuple:
    """What a cell that loads a tuned model of `tuning_type` onto another PLM adds to its hash: how the trained
    LayerNorms move (`tuning.pet_norms`), for the types that train them. Nothing under "absolute" — the only
    behaviour before the field existed — so the cells made then keep their hashes as that variant; nothing for
    fine-tuning (its Δ moves every weight) or LoRA (it trains no LayerNorm)."""
    if tuning.pet_norms == "absolute" or not tuning.trains_norms(tuning_type):
        return ()
    return ({"pet_norms": tuning.pet_norms},)


@functools.lru_cache(maxsize=1 << 16)  # planning a study asks for the same few thousand, in every stage
def tuned_hash(study: StudyConfig, plm_hash: str, task: TaskConfig, tuning_type: str, seed: int) -> str:
    """The tuned model of (PLM, task, tuning type, seed) under the study's tuning settings (its arguments are
    frozen configs and strings: a cached hash cannot go stale)."""
    return config_hash("tuned", plm_hash, data_spec(task), world_if_builtin(study, task.source),
                       tuning_identity(study.tuning, tuning_type), seed)


def reference_identity(study: StudyConfig) -> tuple:
    """What the reference (vanilla) methods run records beyond its tuning: its steps to `methods.target_fraction`
    of its own best dev. Left out at the default, so that the runs made before it counted keep their hashes."""
    fraction = study.methods.target_fraction
    return () if fraction == MethodsConfig.target_fraction else (fraction,)


# How a search is paced (trials run at once): beside the resource fields, not part of what a study computes.
_PACING_FIELDS = {"parallel"}


# How the findings judge the rows: read by the report only, so a study judged otherwise is the same study.
_JUDGING_SECTIONS = {"report"}


def study_fields(study: StudyConfig) -> dict:
    """The config of a study as its identity sees it: every field but resources, pacing and the report's
    judging rules, at any depth."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RESOURCE_FIELDS | _PACING_FIELDS}
        return [strip(v) for v in value] if isinstance(value, list) else value
    fields = strip(to_dict(study))
    return {k: v for k, v in fields.items() if k not in _JUDGING_SECTIONS}


def study_identity(study: StudyConfig) -> str:
    """What a storage tells its studies apart by (raysys.storage.study keeps one version per identity): two
    studies that differ only in how their work is spread are one study."""
    return config_hash(study_fields(study))
