"""What the stages' run code shares: a task loaded and encoded for a trial (full data or K-shot), and the evaluator
of the pilot studies. Imported by run code only (torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysys.config import StudyConfig, TaskConfig
from raysys.core import data
from raysys.core.classifier_loop import evaluate
from raysys.identity import config_hash, data_spec, world_if_builtin
from raysys.stages.base import Context
from raysys.storage import artifacts


def task_config(study: StudyConfig, name: str) -> TaskConfig:
    return next(t for t in study.tasks if t.name == name)


@dataclass
class EncodedTask:
    task: data.TaskData
    encoded: dict  # split -> (token id lists, labels); `full_dev` too in the K-shot regime
    pad_id: int
    data_key: str  # identifies the training examples, in order (the teacher cache's key)


def encoded_task(ctx: Context, task_name: str, regime: str = "full", shots: int | None = None,
                 seed: int = 0) -> EncodedTask:
    """The task with the chain's tokenizer, truncated to `tuning.max_length`; in the K-shot regime K examples per
    class for train and dev (drawn with `seed`), the full dev set kept as `full_dev`."""
    study = ctx.study
    tokenizer = artifacts.load_tokenizer(ctx.store, ctx.chain.tokenizer_hash)
    spec = task_config(study, task_name)
    task = data.load_task(spec, study.world)
    if regime == "kshot":
        task = data.k_shot(task, shots, seed)
    key = data_key(study, spec, regime, shots, seed, ctx.chain.tokenizer_hash)
    return EncodedTask(task, data.encode_task(task, tokenizer, study.tuning.max_length), tokenizer.pad_token_id, key)


@dataclass
class EncodedText:
    """Unlabeled documents with the chain's tokenizer; `data_key` as an EncodedTask's (the teacher cache's key)."""

    ids: list[list[int]]
    data_key: str


def unlabeled_text(ctx: Context, plm_index: int, documents: int) -> EncodedText:
    """The first `documents` non-blank documents of the corpus that made M_{plm_index} (its domain), truncated to
    `tuning.max_length`: text with no task and no labels, what label-free distillation teaches on."""
    import itertools

    study = ctx.study
    spec = study.corpora[plm_index]
    texts = list(itertools.islice((d for d in data.corpus_documents(spec, study.world) if d.strip()), documents))
    if not texts:
        raise data.DataError(f"corpus {spec.name}: no documents to distil on (methods.text_distill)")
    tokenizer = artifacts.load_tokenizer(ctx.store, ctx.chain.tokenizer_hash)
    ids = tokenizer(texts, truncation=True, max_length=study.tuning.max_length)["input_ids"]
    key = config_hash("text", data_spec(spec), world_if_builtin(study, spec.source), documents,
                      study.tuning.max_length, ctx.chain.tokenizer_hash)
    return EncodedText(ids, key)


def data_key(study: StudyConfig, spec, regime: str, shots: int | None, seed: int, tokenizer_hash: str) -> str:
    """The identity of an encoded task split (what teacher outputs are cached under): its data's fingerprint, the
    regime's sample, the truncation and the tokenizer."""
    return config_hash("data", data_spec(spec), world_if_builtin(study, spec.source), regime, shots, seed,
                       study.tuning.max_length, tokenizer_hash)


def clone_state(model) -> dict:
    """A detached copy of a model's whole state dict (on the model's device)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Evaluator:
    """Evaluates models (or state dicts loaded into a skeleton) on one task's dev and test splits."""

    def __init__(self, ctx: Context, task_name: str):
        self.data = encoded_task(ctx, task_name)
        self.batch_size = ctx.study.pilot.eval_batch_size
        self.device = ctx.device

    def metrics(self, model) -> dict:
        model.to(self.device)
        out = {}
        for split in ("dev", "test"):
            acc, loss = evaluate(model, *self.data.encoded[split], self.batch_size, self.data.pad_id, self.device)
            out[f"{split}_accuracy"], out[f"{split}_loss"] = acc, loss
        return out

    def state_metrics(self, skeleton, state: dict) -> dict:
        skeleton.to(self.device).load_state_dict(state, strict=True)
        return self.metrics(skeleton)

    def majority_metrics(self) -> dict:
        """Always predict the most frequent training label; the loss is that of predicting the training label
        distribution (add-one smoothed)."""
        train = self.data.encoded["train"][1].tolist()
        counts = torch.bincount(torch.tensor(train), minlength=len(self.data.task.labels)).double() + 1.0
        log_prior = torch.log(counts / counts.sum())
        majority = int(counts.argmax())
        out = {}
        for split in ("dev", "test"):
            y = self.data.encoded[split][1]
            out[f"{split}_accuracy"] = float((y == majority).double().mean())
            out[f"{split}_loss"] = float(-log_prior[y].mean())
        return out
