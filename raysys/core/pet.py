"""Parameter-efficient tuning for the classifiers of every architecture in raysys.core.architectures: the paper's
bottleneck adapter and LoRA (via `peft`).

Both start as the identity (the adapter's up-projection and LoRA's B are zero), so a freshly adapted model computes
exactly what the PLM with its head computes. Modules are inserted in place, without a wrapper model, so state-dict
names stay those of the HF model plus the module's own entries (RoBERTa's, for example):

    adapter  roberta.encoder.layer.0.attention.output.dense.{weight,bias}          (the PLM's, unchanged)
             roberta.encoder.layer.0.attention.output.dense.adapter.{down,up}.{weight,bias}
    lora     roberta.encoder.layer.0.attention.self.query.base_layer.{weight,bias}  (peft renames the PLM's)
             roberta.encoder.layer.0.attention.self.query.lora_{A,B}.default.weight

peft moves a targeted projection's own weights under `base_layer`; LoRA computes base_layer(x) + s·B(A(x)) with
s = alpha / rank, so its effective weight is W + s·B·A (`merge_lora`). Each type is one entry of `TUNING_TYPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raysys.config import FULL_FINETUNING, TuningConfig
from raysys.config import TUNING_TYPES as CONFIG_TUNING_TYPES
from raysys.core import architectures
from raysys.core.recycle import WeightMismatchError

WEIGHTS_FILE = "trainable.safetensors"


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


def inject_adapters(model, spec: dict):
    """The paper's adapter after the attention and after the feed-forward sub-layer of every layer (where the
    architecture's table puts them)."""
    for parent, name in list(architectures.adapter_sites(model)):
        setattr(parent, name, AdaptedLinear(getattr(parent, name), spec["bottleneck"]))
    return model


def inject_lora(model, spec: dict):
    # inject_adapter_in_model, not get_peft_model: no PeftModel wrapper, so names keep their base-model prefix
    from peft import LoraConfig, inject_adapter_in_model

    targets = architectures.lora_targets(model, spec["targets"])
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=targets, bias="none")
    try:
        return inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"tuning.lora.targets: {targets} do not fit the model ({err})") from None


@dataclass(frozen=True)
class TuningType:
    """How a tuning type changes a classifier: `inject(model, spec)` inserts its module in place (`spec` is the
    type's `TuningConfig` section as a dict; None for full fine-tuning, which trains everything), `is_module(name)`
    says which entries are the module's own weights (not the backbone's or the head's). A PET type trains its
    module and the classifier head (the architecture's head prefixes), and every LayerNorm with `trains_norms`."""

    inject: Callable | None
    is_module: Callable[[str], bool]
    trains_norms: bool = False


# The registry: a PET type is a `PetConfig` section of `TuningConfig` (its options and identity) plus one entry here.
TUNING_TYPES: dict[str, TuningType] = {
    FULL_FINETUNING: TuningType(None, is_module=lambda name: False),
    "lora": TuningType(inject_lora, is_module=lambda name: "lora_" in name),
    # the official runs unfreeze the adapters, every LayerNorm and the classifier
    "adapter": TuningType(inject_adapters, is_module=lambda name: ".adapter." in name, trains_norms=True),
}
if set(TUNING_TYPES) != set(CONFIG_TUNING_TYPES):  # a registry entry without its config section, or the reverse
    raise RuntimeError(f"tuning types registered {sorted(TUNING_TYPES)} != configured {sorted(CONFIG_TUNING_TYPES)}")
# identities read which types train norms from the config (no torch there): the two must agree
_NORMS_CONFIGURED = {t for t in TUNING_TYPES if TuningConfig().trains_norms(t)}
if {t for t, k in TUNING_TYPES.items() if k.trains_norms} != _NORMS_CONFIGURED:
    raise RuntimeError("tuning types: `trains_norms` of the registry and of the config sections differ")


def layer_norm_parameters(model) -> set[str]:
    """Names of the LayerNorm weights (by module type: ModernBERT calls its norms `attn_norm`, `mlp_norm`, ...)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, nn.LayerNorm)
            for name, _ in module.named_parameters(recurse=False)}


def trained_norms(model) -> set[str]:
    """The backbone's LayerNorm weights the model trains (adapters: all of them; none for LoRA), head excluded: what
    `tuning.pet_norms` decides when the trainable weights move onto another PLM (a head's LayerNorm is fresh, not
    the PLM's, and moves with the head)."""
    head = architectures.of(model).head_prefixes
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n for n in layer_norm_parameters(model) & trainable if not n.startswith(head)}


def _freeze_all_but_trained(model, kind: TuningType) -> None:
    head = architectures.of(model).head_prefixes
    norms = layer_norm_parameters(model) if kind.trains_norms else set()
    for name, param in model.named_parameters():
        param.requires_grad_(kind.is_module(name) or name.startswith(head) or name in norms)


def apply_pet(model, tuning_type: str, spec: dict | None = None, seed: int = 0):
    """Make `model` (a sequence classifier of raysys.core.architectures) ready for `tuning_type`, in place:
    fine-tuning trains everything; a PET type inserts its seeded module (`spec`: its config section as a dict,
    default the config's defaults) and freezes all but what the type trains. The module's init draws from a forked RNG, so adding it
    does not shift what the caller's seed draws next (data order, dropout). The spec is kept on the model."""
    if tuning_type not in TUNING_TYPES:
        raise ValueError(f"tuning type: unknown '{tuning_type}'; known: {list(TUNING_TYPES)}")
    if hasattr(model, "pet_spec"):
        raise ValueError(f"model already prepared for '{model.pet_spec['tuning_type']}'")
    kind = TUNING_TYPES[tuning_type]
    if spec is None:
        spec = TuningConfig().pet_spec(tuning_type)
    if kind.inject is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = kind.inject(model, spec)
        _freeze_all_but_trained(model, kind)
    model.pet_spec = {"tuning_type": tuning_type, "seed": seed, "spec": spec}
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
    return any(kind.is_module(name) for kind in TUNING_TYPES.values())


def lora_scaling(spec: dict) -> float:
    """s in W + s·B·A: peft's `lora_alpha / r` (raysys does not turn on rsLoRA's alpha / sqrt(r))."""
    return spec["alpha"] / spec["rank"]


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """`state` (a LoRA model's state dict) with every adapted projection's update folded into its weight:
    `base_layer.weight` ← W + s·(B @ A), as peft's own merge computes it, and `lora_B` ← 0, so the model computes
    the same function from one weight (A is kept; with B = 0 it adds nothing). Entries of no LoRA layer are kept."""
    out = dict(state)
    for name in (n for n in state if ".lora_A." in n):
        prefix, adapter = name.split(".lora_A.")
        base, b_name = f"{prefix}.base_layer.weight", f"{prefix}.lora_B.{adapter}"
        if base not in state or b_name not in state:
            raise WeightMismatchError(f"LoRA layer '{prefix}': {name} without {base} and {b_name}")
        a, b = state[name], state[b_name]
        if state[base].shape != (b.shape[0], a.shape[1]) or b.shape[1] != a.shape[0]:
            raise WeightMismatchError(f"LoRA layer '{prefix}': W {tuple(state[base].shape)}, B {tuple(b.shape)} and "
                                      f"A {tuple(a.shape)} do not make W + B·A")
        out[base] = state[base] + (b @ a) * scaling
        out[b_name] = torch.zeros_like(b)
    return out


def save_trainable(model, directory: str | Path) -> None:
    """The trainable weights as safetensors: with the PLM they were tuned on, `apply_pet` and
    `load_trainable_state` rebuild the model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(directory / WEIGHTS_FILE))
