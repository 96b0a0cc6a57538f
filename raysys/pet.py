"""Parameter-efficient tuning for RoBERTa classifiers: the paper's bottleneck adapter and LoRA (via `peft`).

Both start as the identity (the adapter's up-projection and LoRA's B are zero), so a freshly adapted model computes
exactly what the PLM with its head computes. Modules are inserted in place, without a wrapper model, so state-dict
names stay those of the HF model plus the module's own entries:

    adapter  roberta.encoder.layer.0.attention.output.dense.{weight,bias}          (the PLM's, unchanged)
             roberta.encoder.layer.0.attention.output.dense.adapter.{down,up}.{weight,bias}
    lora     roberta.encoder.layer.0.attention.self.query.base_layer.{weight,bias}  (peft renames the PLM's)
             roberta.encoder.layer.0.attention.self.query.lora_{A,B}.default.weight

peft moves a targeted projection's own weights under `base_layer`; `backbone_state_dict` and `load_backbone_state`
translate to and from the plain HF names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raysys.recycle import WeightMismatchError

TUNING_TYPES = ("finetune", "lora", "adapter")
WEIGHTS_FILE, SPEC_FILE = "trainable.safetensors", "pet.json"


class BottleneckAdapter(nn.Module):
    """x + up(gelu(down(x))): Houlsby et al.'s adapter as OpenDelta's AdapterModel builds it for the official code
    (tanh-approximated GELU, OpenDelta's 'gelu_new'; down-projection ~ N(0, 0.01)). OpenDelta also draws the
    up-projection from N(0, 0.01); here it is zero so that the adapted model starts as the PLM exactly."""

    def __init__(self, hidden_size: int, bottleneck: int, **factory):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, hidden_size, **factory)
        nn.init.normal_(self.down.weight, std=0.01)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x), approximate="tanh"))


class AdaptedLinear(nn.Module):
    """A sub-layer's output projection followed by an adapter, before the sub-layer's dropout, residual and
    LayerNorm (where OpenDelta's sequential adapter hooks the projection's output). It owns the projection's
    `weight` and `bias` under their original names, so PLM weights load into it unchanged."""

    def __init__(self, linear: nn.Linear, bottleneck: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.adapter = BottleneckAdapter(linear.out_features, bottleneck, device=linear.weight.device,
                                         dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def add_adapters(model, bottleneck: int):
    for layer in model.roberta.encoder.layer:
        for parent in (layer.attention.output, layer.output):  # after attention, after feed-forward
            parent.dense = AdaptedLinear(parent.dense, bottleneck)
    # the official runs unfreeze the deltas, every LayerNorm and the classifier
    _train_only(model, lambda n: ".adapter." in n or "LayerNorm" in n or n.startswith("classifier."))
    return model


def add_lora(model, rank: int, alpha: float, dropout: float, targets: tuple[str, ...]):
    # inject_adapter_in_model, not get_peft_model: no PeftModel wrapper, so names keep their `roberta.` prefix
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
    as the paper does) and the classifier. The module's init draws from a forked RNG, so adding it does not shift
    what the caller's seed draws next (data order, dropout). The spec is kept on the model for `save_pet`."""
    if tuning_type not in TUNING_TYPES:
        raise ValueError(f"tuning type: unknown '{tuning_type}'; known: {list(TUNING_TYPES)}")
    if hasattr(model, "pet_spec"):
        raise ValueError(f"model already prepared for '{model.pet_spec['tuning_type']}'")
    options = {"finetune": {}, "adapter": {"bottleneck": bottleneck},
               "lora": {"lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                        "lora_targets": list(lora_targets)}}[tuning_type]
    if tuning_type != "finetune":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if tuning_type == "adapter":
                model = add_adapters(model, bottleneck)
            else:
                model = add_lora(model, lora_rank, lora_alpha, lora_dropout, tuple(lora_targets))
    model.pet_spec = {"tuning_type": tuning_type, "seed": seed, **options}
    return model


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Exactly the trainable parameters, detached copies, named as in `model.state_dict()`."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_fits(expected: dict[str, torch.Size], state: dict[str, torch.Tensor], what: str) -> None:
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise WeightMismatchError(f"{what} do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in state.items():
        if value.shape != expected[name]:
            raise WeightMismatchError(f"{what}: '{name}' has shape {tuple(value.shape)}, the model expects "
                                      f"{tuple(expected[name])} (tuned on another backbone shape?)")


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` strictly: the same names, the same shapes, nothing else touched."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _check_fits({n: p.shape for n, p in params.items()}, state, "PET weights")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def is_module_weight(name: str) -> bool:
    """A PET module's own weight (LoRA A/B, adapter down/up), as opposed to the backbone or head."""
    return "lora_" in name or ".adapter." in name


def _plain(name: str) -> str:
    return name.replace(".base_layer.", ".")


def backbone_state_dict(model) -> dict[str, torch.Tensor]:
    """Everything but the PET module (the PLM's weights, and the LayerNorms and head as they now are) under plain
    HF names: comparable with, and loadable as, an un-adapted classifier's state dict."""
    return {_plain(k): v for k, v in model.state_dict().items() if not is_module_weight(k)}


def load_backbone_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load a plain classifier's state dict (e.g. another PLM's weights with a head) under the PET module, which
    is left as it is; strict like `load_trainable_state`."""
    own = model.state_dict()
    names = {_plain(k): k for k in own if not is_module_weight(k)}
    _check_fits({k: own[names[k]].shape for k in names}, state, "backbone weights")
    model.load_state_dict({names[k]: v for k, v in state.items()}, strict=False)


def save_pet(model, directory: str | Path) -> None:
    """The trainable weights (safetensors) and the spec that rebuilds the model around them on a PLM."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(directory / WEIGHTS_FILE))
    spec = {**model.pet_spec, "num_labels": model.config.num_labels}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def load_pet(plm_path: str | Path, directory: str | Path):
    """The model `save_pet` wrote, rebuilt on the PLM at `plm_path` (HF `save_pretrained` format): the same PLM
    gives the saved model back; another PLM of the same shape gets the module plugged into its backbone."""
    from safetensors.torch import load_file
    from transformers import RobertaForSequenceClassification

    spec = json.loads((Path(directory) / SPEC_FILE).read_text())
    num_labels = spec.pop("num_labels")
    model = RobertaForSequenceClassification.from_pretrained(str(plm_path), num_labels=num_labels,
                                                             use_safetensors=True)
    model = apply_pet(model, **spec)
    load_trainable_state(model, load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model.eval()
