"""The models in the store: the chain's tokenizer, PLMs, tuned models (and tuned weights recycled onto another PLM),
and the teacher outputs distillation caches. Safetensors and JSON only: nothing here is ever unpickled.

    artifacts/tokenizer/<hash>/   HF tokenizer files
    artifacts/plm/<hash>/         the masked LM (`save_pretrained`) + tokenizer + raysys.json
    artifacts/tuned/<hash>/       fine-tuning: the whole classifier + tokenizer; PET: its trainable weights only; raysys.json
                                  (tuning type, PLM, task, seed, labels, PET spec) rebuilds it on its PLM
    artifacts/teacher/<hash>/     outputs.safetensors: a teacher's logits (and hidden states) on a training split
    artifacts/corpus/<hash>/      a pre-training corpus tokenized and packed (raysys.core.packing; memory-mapped)
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from safetensors.torch import load_file, save_file

from raysys.config import FULL_FINETUNING
from raysys.core import architectures, models, pet, recycle
from raysys.core.objectives import TeacherOutputs, teacher_outputs
from raysys.core.recycle import WeightMismatchError
from raysys.identity import config_hash
from raysys.storage.store import Store

META = "raysys.json"

# ----------------------------------------------------------------------------------------- tokenizer, PLMs


def load_tokenizer(store: Store, tokenizer_hash: str):
    return _tokenizer(str(store.artifact("tokenizer", tokenizer_hash)))


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    """One tokenizer object per process and folder: a reused trial process loads it once for all its cells."""
    return models.load_tokenizer(path)


STREAMS = "streams.pt"  # per rank, the random streams a PLM's training ended with (raysys.stages.pretrain)


def save_plm(store: Store, plm_hash: str, model, tokenizer, meta: dict, streams: list[dict] | None = None) -> None:
    with store.writing_artifact("plm", plm_hash) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if streams is not None:
            torch.save(streams, tmp / STREAMS)


def plm_streams(store: Store, plm_hash: str) -> list[dict] | None:
    """The random streams the PLM's training ended with, one per rank; None for a PLM saved without them."""
    path = store.artifact("plm", plm_hash) / STREAMS
    return torch.load(path, weights_only=True) if path.is_file() else None


def load_plm(store: Store, plm_hash: str):
    return models.load_masked_lm(store.artifact("plm", plm_hash))


def plm_state(store: Store, plm_hash: str) -> dict:
    return load_file(str(store.artifact("plm", plm_hash) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------- tuned models


def adapted_classifier(store: Store, plm_hash: str, num_labels: int, tuning_type: str, spec: dict | None,
                       seed: int):
    """A PLM with a fresh (seeded) head and, for PET, a fresh module of `spec`: where every tuning run starts."""
    model = models.classifier_from_plm(store.artifact("plm", plm_hash), num_labels, seed)
    return pet.apply_pet(model, tuning_type, spec=spec, seed=seed)


def save_tuned(store: Store, tuned_hash: str, model, labels: tuple[str, ...], meta: dict) -> None:
    """Fine-tuning stores the whole model with its PLM's tokenizer (the folder is what `transformers.pipeline` loads);
    PET stores only its trainable weights (module, LayerNorms for adapters, head): the backbone is the PLM artifact
    named in raysys.json (`raysys export` writes PET models in loadable formats)."""
    with store.writing_artifact("tuned", tuned_hash) as tmp:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
        if meta["tuning_type"] == FULL_FINETUNING:
            model.save_pretrained(str(tmp))
            _tokenizer(str(store.artifact("plm", meta["plm_hash"]))).save_pretrained(str(tmp))
        else:
            pet.save_trainable(model, tmp)
        (tmp / META).write_text(json.dumps(meta, indent=1))


def tuned_meta(store: Store, tuned_hash: str) -> dict:
    """A tuned model's raysys.json, without fetching its weights."""
    return json.loads(store.artifact_file("tuned", tuned_hash, META))


def load_tuned(store: Store, tuned_hash: str, on_plm: str | None = None, pet_norms: str | None = None):
    """(model in eval mode, meta): the tuned model, or — with `on_plm` — its weights recycled onto another PLM
    without training: θ_new + (θ_old^τ − θ_old) with the old head for fine-tuning, the old module and head plugged
    into the new backbone for PET (the paper's compatibility test and initialization-based start), the LayerNorms a
    PET type trained moved by `pet_norms` (`tuning.pet_norms`, which recycling must name: `recycle.transplant_norms`).
    The one place tuned weights move onto another PLM, so every recycling cell follows one policy."""
    if on_plm is not None and pet_norms is None:
        raise ValueError("load_tuned(on_plm=...): name how trained LayerNorms move (pet_norms = tuning.pet_norms)")
    path = store.artifact("tuned", tuned_hash)
    meta = json.loads((path / META).read_text())
    target = on_plm or meta["plm_hash"]
    model = _start_on(store, meta, target)
    if meta["tuning_type"] == FULL_FINETUNING:
        state = load_file(str(path / "model.safetensors"))
        if target != meta["plm_hash"]:
            state = recycle.transplant_delta(state, plm_state(store, meta["plm_hash"]), plm_state(store, target),
                                             architectures.of(model).head_prefixes)
        model.load_state_dict(state, strict=True)
    else:
        state = load_file(str(path / pet.WEIGHTS_FILE))
        norms = pet.trained_norms(model)
        # "absolute" keeps the norms as tuned: no PLM weights need reading for it
        if target != meta["plm_hash"] and norms and pet_norms != "absolute":
            state = recycle.transplant_norms(state, norms, plm_state(store, meta["plm_hash"]),
                                             plm_state(store, target), pet_norms)
        pet.load_trainable_state(model, state)
    return model.eval(), meta


def tuning_start(store: Store, meta: dict, on_plm: str | None = None):
    """The model a tuned model's run started from (`meta`: its raysys.json): its PLM with the seeded head and,
    for PET, the seeded module — what the run learned is its weights minus these; `on_plm`: the same start on
    another PLM (where a transfer method adds what it made of that update)."""
    return _start_on(store, meta, on_plm or meta["plm_hash"])


def _start_on(store: Store, meta: dict, plm_hash: str):
    """A tuned model's starting point (fresh seeded head and module, as its raysys.json records) on `plm_hash`."""
    return adapted_classifier(store, plm_hash, len(meta["labels"]), meta["tuning_type"], meta.get("pet"), meta["seed"])


def save_recycled(store: Store, key: str, changed: dict, meta: dict) -> None:
    """Recycled weights for a new PLM (the recycle stage): the entries that differ from the tuned model's start on
    that PLM (`meta["plm_hash"]`; its seeded head and module), so that a PET model stores its module and head and a
    LoRA model its adapted projections, not the backbone again."""
    with store.writing_artifact("recycled", key) as tmp:
        save_file({k: v.contiguous() for k, v in changed.items()}, str(tmp / "weights.safetensors"))
        (tmp / META).write_text(json.dumps(meta, indent=1))


def load_recycled(store: Store, key: str):
    """(model on its new PLM, in eval mode; its raysys.json): the start rebuilt, the stored entries loaded over it."""
    meta = json.loads(store.artifact_file("recycled", key, META))
    model = _start_on(store, meta, meta["plm_hash"])
    state = model.state_dict()
    changed = load_file(str(store.artifact("recycled", key) / "weights.safetensors"))
    unknown = sorted(set(changed) - set(state))
    if unknown:
        raise WeightMismatchError(f"{store.artifact_uri('recycled', key)}: entries {unknown[:3]} are not in its model")
    model.load_state_dict({**state, **changed}, strict=True)
    return model.eval(), meta


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
                (tmp / META).write_text(json.dumps({"teacher": teacher_hash, "data": data_key}))
        if len(outputs.logits) != len(ids):
            raise WeightMismatchError(f"teacher cache {self.store.artifact_uri('teacher', key)}: "
                                      f"{len(outputs.logits)} examples, the data has {len(ids)}")
        self._memory = {key: outputs}  # one entry: the cells of a trial usually share it
        return outputs, hit


_CACHES: dict[str, TeacherCache] = {}


def teacher_cache(store: Store) -> TeacherCache:
    """One cache per store and process, so that a reused Tune actor keeps its in-memory entry across cells."""
    return _CACHES.setdefault(store.root, TeacherCache(store))
