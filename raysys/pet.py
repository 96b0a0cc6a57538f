"""Parameter-efficient tuning for RoBERTa classifiers: the paper's bottleneck adapter and LoRA (via `peft`).

Both start as the identity (the adapter's up-projection and LoRA's B are zero), so a freshly adapted model computes
exactly what the PLM with its head computes. Modules are inserted in place, without a wrapper model, so that
state-dict names stay those of the HF model plus the module's own entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raysys.recycle import WeightMismatchError

TUNING_TYPES = ("finetune", "lora", "adapter")


class BottleneckAdapter(nn.Module):
    """x + up(relu(down(x))): Houlsby et al.'s adapter as OpenDelta builds it for the official code (ReLU)."""

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


class AdaptedLinear(nn.Module):
    """A sub-layer's output projection followed by an adapter, before the sub-layer's dropout, residual and
    LayerNorm. It owns the projection's `weight` and `bias` under their original names, so PLM weights load
    into it unchanged."""

    def __init__(self, linear: nn.Linear, bottleneck: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.adapter = BottleneckAdapter(linear.out_features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def _sublayer_outputs(model) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the attention-output and feed-forward-output projections of every layer."""
    out = []
    for layer in model.roberta.encoder.layer:
        out += [(layer.attention.output, "dense"), (layer.output, "dense")]
    return out


def add_adapters(model, bottleneck: int):
    for parent, name in _sublayer_outputs(model):
        setattr(parent, name, AdaptedLinear(getattr(parent, name), bottleneck))
    _train_only(model, lambda n: ".adapter." in n or "LayerNorm" in n or n.startswith("classifier."))
    return model


def add_lora(model, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    try:
        model = inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"tuning.lora.targets: {list(targets)} do not fit the model ({err})") from None
    _train_only(model, lambda n: "lora_" in n or n.startswith("classifier."))
    return model


def _train_only(model, is_trainable) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(bool(is_trainable(name)))


def apply_pet(model, tuning_type: str, *, bottleneck: int = 24, lora_rank: int = 8, lora_alpha: float = 16.0,
              lora_dropout: float = 0.0, lora_targets: tuple[str, ...] = ("query", "value"), seed: int = 0):
    """Make `model` (a RobertaForSequenceClassification) ready for `tuning_type`, in place: fine-tuning trains
    everything; `adapter` and `lora` insert a seeded module and freeze all but it (and LayerNorms for adapters,
    as the paper does) and the classifier."""
    if tuning_type not in TUNING_TYPES:
        raise ValueError(f"tuning type: unknown '{tuning_type}'; known: {list(TUNING_TYPES)}")
    if tuning_type == "finetune":
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tuning_type == "adapter":
            return add_adapters(model, bottleneck)
        return add_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Exactly the trainable parameters, detached copies, named as in `model.state_dict()`."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` strictly: the same names, the same shapes, nothing else touched."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise WeightMismatchError(f"PET weights do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in state.items():
        if value.shape != params[name].shape:
            raise WeightMismatchError(f"PET weight '{name}' has shape {tuple(value.shape)}, the model expects "
                                      f"{tuple(params[name].shape)} (a module tuned on another backbone shape?)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def backbone_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights without PET modules, under plain HF names (peft renames a LoRA-wrapped projection's
    weight to `<name>.base_layer.weight`): comparable with, and loadable as, an un-adapted classifier's."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if "lora_" not in k and ".adapter." not in k}
