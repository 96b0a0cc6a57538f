"""Training-free recycling (the paper's appendix): a learned low-rank affine map of old PET weights onto weights for
the upgraded PLM, trained by distillation on one task and applied to other tasks' old weights without training."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from raysys.core import data, pet
from raysys.core.objectives import TeacherOutputs, distillation_loss
from raysys.core.recycle import WeightMismatchError


def mapped_names(state: dict) -> list[str]:
    """The PET module's matrices (LoRA A/B, adapter down/up weights); biases, LayerNorms and head carry over as
    `load_tuned` put them on the new PLM (adapter LayerNorms by `tuning.pet_norms`)."""
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


def train_weight_map(student, old_state: dict, train: tuple, pad_id: int, teacher: TeacherOutputs, steps: int,
                     lr: float, batch_size: int, temperature: float, kd_weight: float, rank: int, seed: int):
    """Fit a WeightMap so that the student (old module mapped onto the new backbone) matches the teacher on the
    map task's training split `train` = (token id lists, labels), with the distillation loss; only the map trains.
    Returns (map, final loss)."""
    names = mapped_names(old_state)
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
    ids, labels = train
    step, loss = 0, torch.tensor(float("nan"))
    while step < steps:
        for input_ids, mask, y, index in data.iterate_batches(ids, labels, batch_size, pad_id, generator,
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
