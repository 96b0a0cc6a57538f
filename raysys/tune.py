"""Task tuning: the one training loop every tuning method runs through.

Methods differ only in what they hand the loop: the starting model (fresh head on a PLM, or a recycled delta —
built by the caller), which parameters train (everything for fine-tuning; a module for PET), and the objective
(cross-entropy; later distillation). The loop itself is method-agnostic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from raysys import data
from raysys.config import TuningConfig
from raysys.pretrain import linear_schedule


class CrossEntropyObjective:
    """Plain supervised loss. An objective maps (model, batch) -> (loss, {name: float}) so that other losses
    (distillation) can plug in and log their parts."""

    def __call__(self, model, input_ids, attention_mask, labels):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, num_labels)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.item()}


@dataclass
class TuningResult:
    curve: list[dict]
    best_step: int
    best_dev_accuracy: float
    best_dev_loss: float
    test_accuracy: float
    test_loss: float
    train_seconds: float
    best_state: dict = field(repr=False)  # the trainable parameters at the best-dev step


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
    for input_ids, mask, y in data.iterate_batches(ids, labels, batch_size, pad_id):
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        y = y.to(device)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return correct / len(ids), loss_sum / len(ids)


def train_classifier(model, encoded: dict, cfg: TuningConfig, seed: int, pad_id: int, objective=None,
                     device="cpu") -> TuningResult:
    """Tune `model` on encoded["train"], evaluating on dev every `eval_every_steps` steps; restore the best-dev
    state (ties keep the earlier step) and test it. `encoded` maps split -> (token id lists, labels)."""
    objective = objective or CrossEntropyObjective()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_fraction * cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, cfg.max_steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    train_ids, train_labels = encoded["train"]
    dev_ids, dev_labels = encoded["dev"]
    curve, best, window = [], None, []
    start = time.time()
    step = 0
    while step < cfg.max_steps:
        for input_ids, mask, y in data.iterate_batches(train_ids, train_labels, cfg.batch_size, pad_id, generator):
            loss, _ = objective(model, input_ids.to(device), mask.to(device), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            window.append(loss.item())
            step += 1
            if step % cfg.eval_every_steps == 0 or step == cfg.max_steps:
                dev_acc, dev_loss = evaluate(model, dev_ids, dev_labels, cfg.eval_batch_size, pad_id, device)
                train_loss = sum(window) / len(window)
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss became non-finite at step {step}")
                curve.append({"step": step, "train_loss": train_loss, "dev_accuracy": dev_acc, "dev_loss": dev_loss,
                              "seconds": time.time() - start})
                window = []
                if best is None or dev_acc > best[1]:
                    best = (step, dev_acc, dev_loss, _snapshot(model))
            if step >= cfg.max_steps:
                break
    train_seconds = time.time() - start
    model.load_state_dict(best[3], strict=False)
    test_acc, test_loss = evaluate(model, *encoded["test"], cfg.eval_batch_size, pad_id, device)
    return TuningResult(curve, best[0], best[1], best[2], test_acc, test_loss, train_seconds, best[3])
