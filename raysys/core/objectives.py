"""Training objectives of the classifier loop: small callables mapping (model, batch, example indices) to (loss,
{part: float}), and the losses they combine, each testable against a hand computation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysys.core import data


class CrossEntropyObjective:
    """Plain supervised loss. An objective maps (model, batch, example indices) -> (loss, {name: float}) so that
    other losses (distillation) plug in and log their parts."""

    def __call__(self, model, input_ids, attention_mask, labels, index=None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (batch, num_labels)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.item()}


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float, a: float, beta: float, student_hidden: torch.Tensor | None = None,
                      teacher_hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(1 − a)·CE + a·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + β·½·MSE(h_s, h_t).

    The KL is summed over classes and averaged over the batch (the official code's per-element mean shrinks it by
    the number of classes). h are first-token hidden states stacked as (batch, layers, hidden) — the embedding
    output and every layer but the last — and the MSE is the mean over all their elements. a = 0 and β = 0 give
    exactly the cross-entropy."""
    ce = F.cross_entropy(student_logits, labels)
    loss, parts = (1.0 - a) * ce if a else ce, {"ce": ce.item()}
    if a:
        log_student = F.log_softmax(student_logits / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        loss = loss + a * temperature**2 * kl
        parts["kl"] = kl.item()
    if beta:
        mse = F.mse_loss(student_hidden, teacher_hidden)
        loss = loss + beta * 0.5 * mse
        parts["mse"] = mse.item()
    return loss, parts


def first_token_states(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(batch, layers, hidden): the first position (<s>, [CLS]: every sequence starts with it) of the embedding
    output and of every layer but the last."""
    return torch.stack([h[:, 0, :] for h in hidden_states[:-1]], dim=1)


@dataclass
class TeacherOutputs:
    """What the teacher said about every training example, indexed like the training split."""

    logits: torch.Tensor  # (examples, classes)
    hidden: torch.Tensor | None  # (examples, layers, hidden), or None when no hidden-state loss needs it


@torch.no_grad()
def teacher_outputs(teacher, ids: list[list[int]], batch_size: int, pad_id: int, with_hidden: bool) -> TeacherOutputs:
    """One pass of the frozen teacher (eval mode, on whatever device it is) over a split, in order; the outputs
    come back on the CPU."""
    teacher.eval()
    device = next(teacher.parameters()).device
    logits, hidden = [], []
    for input_ids, mask, _ in data.iterate_batches(ids, torch.zeros(len(ids), dtype=torch.long), batch_size, pad_id):
        out = teacher(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=with_hidden)
        logits.append(out.logits.float().cpu())
        if with_hidden:
            hidden.append(first_token_states(out.hidden_states).float().cpu())
    return TeacherOutputs(torch.cat(logits), torch.cat(hidden) if with_hidden else None)


class DistillationObjective:
    """Distillation from an outdated adapted model. With `cached` teacher outputs (the default) the teacher never
    runs during training; with `live_teacher` it runs on every batch in train mode (dropout on the teacher)."""

    def __init__(self, temperature: float, a: float, beta: float, cached: TeacherOutputs | None = None,
                 live_teacher=None):
        if (cached is None) == (live_teacher is None):
            raise ValueError("distillation needs exactly one of cached teacher outputs or a live teacher")
        if beta and cached is not None and cached.hidden is None:
            raise ValueError("beta > 0 needs the teacher's hidden states in the cache")
        self.temperature, self.a, self.beta = temperature, a, beta
        self.cached, self.live_teacher = cached, live_teacher

    def _teacher(self, input_ids, attention_mask, index):
        if self.cached is not None:
            hidden = self.cached.hidden[index].to(input_ids.device) if self.beta else None
            return self.cached.logits[index].to(input_ids.device), hidden
        self.live_teacher.train()
        with torch.no_grad():
            out = self.live_teacher(input_ids=input_ids, attention_mask=attention_mask,
                                    output_hidden_states=bool(self.beta))
        return out.logits.float(), first_token_states(out.hidden_states) if self.beta else None

    def __call__(self, model, input_ids, attention_mask, labels, index=None):
        teacher_logits, teacher_hidden = self._teacher(input_ids, attention_mask, index)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(self.beta))
        student_hidden = first_token_states(out.hidden_states) if self.beta else None
        return distillation_loss(out.logits.float(), labels, teacher_logits, self.temperature, self.a, self.beta,
                                 student_hidden, teacher_hidden)
