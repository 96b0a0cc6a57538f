"""Task tuning: the one classifier training loop every tuning run and recycling method goes through.

Methods differ only in what they hand the loop: the starting model (a fresh head on a PLM, or a recycled delta —
built by the caller), which parameters train (everything for fine-tuning; a module for PET), and the objective
(`raysys.core.objectives`: cross-entropy, or distillation from an outdated model). The loop is method-agnostic.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raysys.config import TuningConfig
from raysys.core import compute, data
from raysys.core.objectives import CrossEntropyObjective

# ------------------------------------------------------------------------------------------------------- loop


@dataclass
class Selection:
    """The checkpoint chosen on one dev set, and its test score."""

    best_step: int
    best_dev_accuracy: float
    best_dev_loss: float
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    state: dict = field(default=None, repr=False)


@dataclass
class TuningResult:
    curve: list[dict]
    selections: dict  # dev-set name -> Selection; "dev" is the primary one
    train_seconds: float
    resumed_from_step: int | None = None  # the checkpoint this run continued from

    @property
    def primary(self) -> Selection:
        """The selection on `dev` (for a few-shot run, the K-shot dev set, as the paper selects)."""
        return self.selections["dev"]


def _snapshot(model) -> dict:
    """A copy of what training can change (the trainable parameters): for PET a few kB instead of the model."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable}


@torch.no_grad()
def evaluate(model, ids: list[list[int]], labels: torch.Tensor, batch_size: int, pad_id: int,
             device="cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on one split."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for input_ids, mask, y in data.iterate_batches(ids, labels, batch_size, pad_id, by_length=True):
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        y = y.to(device)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(ids), loss_sum / len(ids)


def _dev_sets(encoded: dict) -> list[str]:
    """The dev sets checkpoints are selected on: `dev`, and `full_dev` when the run is few-shot."""
    return ["dev"] + (["full_dev"] if "full_dev" in encoded else [])


def train_classifier(model, encoded: dict, cfg: TuningConfig, seed: int, pad_id: int, objective=None,
                     device="cpu", eval_at_start: bool = False, checkpointer=None) -> TuningResult:
    """Tune `model` on encoded["train"], evaluating on every dev set every `eval_every_steps` steps (and before
    the first step with `eval_at_start`, so that a recycled start shows on the curve); per dev set keep the best
    state (ties keep the earlier step) and test it. The model ends in the primary ("dev") selection.
    `encoded` maps split -> (token id lists, labels).

    With a `checkpointer` (raysys.checkpoint.Checkpointer) every evaluation is reported to it, the full training
    state is saved when it is due, and a saved state is resumed from: the resumed run continues the same data
    order and random streams, so it ends where an uninterrupted one would."""
    objective = objective or CrossEntropyObjective()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = compute.adamw(params, cfg.lr, cfg.weight_decay, device)
    warmup = int(cfg.warmup_fraction * cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: compute.linear_schedule(s, cfg.max_steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    train_ids, train_labels = encoded["train"]
    dev_sets = _dev_sets(encoded)
    curve, best, window = [], {}, []
    window_tokens, window_started = 0, time.time()
    step, skip, elapsed_before = 0, 0, 0.0
    resumed = checkpointer.resume() if checkpointer else None
    if resumed:
        model.load_state_dict(resumed["model"], strict=False)
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        generator.set_state(resumed["epoch_generator"])
        compute.restore_random_state(resumed, device)
        curve = resumed["curve"]
        best = {name: Selection(**sel) for name, sel in resumed["best"].items()}
        step, skip, elapsed_before = resumed["step"], resumed["batches_into_epoch"], resumed["seconds"]
    start = time.time() - elapsed_before

    def state() -> dict:
        return {"model": _snapshot(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch_generator": epoch_state, "batches_into_epoch": into_epoch, **compute.random_state(device),
                "curve": curve, "best": {name: vars(sel) for name, sel in best.items()}, "seconds": time.time() - start}

    def evaluate_and_keep_best(step: int, train_loss: float | None) -> None:
        row = {"step": step, "train_loss": train_loss}
        for name in dev_sets:
            acc, loss = evaluate(model, *encoded[name], cfg.eval_batch_size, pad_id, device)
            row[f"{name}_accuracy"], row[f"{name}_loss"] = acc, loss
            if name not in best or acc > best[name].best_dev_accuracy:
                best[name] = Selection(step, acc, loss, state=_snapshot(model))
        row["seconds"] = time.time() - start
        curve.append(row)
        if checkpointer is None:
            return
        metrics = {**row, "tokens_per_second": tokens_per_second}
        if 0 < step < cfg.max_steps and checkpointer.due():
            checkpointer.save(step, state(), metrics)
        else:
            checkpointer.report(metrics)

    tokens_per_second = None  # of the training steps since the previous evaluation (reported, not in the curve)
    if eval_at_start and not resumed:
        evaluate_and_keep_best(0, None)
    while step < cfg.max_steps:
        epoch_state, into_epoch = generator.get_state(), skip  # before the epoch's permutation is drawn
        for input_ids, mask, y, index in data.iterate_batches(train_ids, train_labels, cfg.batch_size, pad_id,
                                                              generator, with_index=True, skip=skip,
                                                              bucketing=cfg.length_bucketing):
            with compute.autocast(device, cfg.precision):
                loss, _ = objective(model, input_ids.to(device), mask.to(device), y.to(device), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            window.append(loss.item())
            window_tokens += int(mask.sum())
            step += 1
            into_epoch += 1
            if step % cfg.eval_every_steps == 0 or step == cfg.max_steps:
                train_loss = sum(window) / len(window)
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss became non-finite at step {step}")
                tokens_per_second = window_tokens / max(time.time() - window_started, 1e-9)
                window = []
                evaluate_and_keep_best(step, train_loss)
                window_tokens, window_started = 0, time.time()
            if step >= cfg.max_steps:
                break
        skip = 0
    train_seconds = time.time() - start
    for name in reversed(dev_sets):  # test every selection; "dev" last, so the model ends in it
        model.load_state_dict(best[name].state, strict=False)
        best[name].test_accuracy, best[name].test_loss = evaluate(model, *encoded["test"], cfg.eval_batch_size,
                                                                  pad_id, device)
    return TuningResult(curve, best, train_seconds, resumed["step"] if resumed else None)


# ---------------------------------------------------------------------------------------- convergence metrics


def steps_to_target(curve: list[dict], target: float, key: str = "dev_accuracy") -> tuple[int, float] | None:
    """(step, seconds) of the first evaluation whose `key` reaches `target`; None if none does."""
    for row in curve:
        if row[key] >= target:
            return row["step"], row["seconds"]
    return None


def area_under_curve(curve: list[dict], key: str = "dev_accuracy") -> float:
    """The mean of `key` over the steps the curve spans (trapezoids between evaluations): 1.0 means perfect from
    the first evaluation on, so a faster start scores higher at equal final accuracy."""
    if len(curve) == 1:
        return float(curve[0][key])
    area = sum((b["step"] - a["step"]) * (a[key] + b[key]) / 2 for a, b in itertools.pairwise(curve))
    return area / (curve[-1]["step"] - curve[0]["step"])
