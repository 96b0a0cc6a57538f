"""The encoder architectures, one table: what differs between BERT, RoBERTa, XLM-RoBERTa, DeBERTa-v2 and ModernBERT
for pre-training, tuning and recycling. Everything else goes through the Auto classes and each model's
`base_model` (its `base_model_prefix` attribute: `roberta`, `bert`, `deberta`, `model`). The ids that open and close
a sequence come from the tokenizer (BERT's [CLS] and [SEP], RoBERTa's <s> and </s>), whichever architecture uses it.

Each entry was read off the transformers 5.24 modelling code (and is tested in tests/core/test_architectures.py).
DeBERTa-v2 has no SDPA attention in transformers, so it runs eager attention throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from raysys.config import ARCHITECTURES as CONFIG_ARCHITECTURES
from raysys.config import ConfigError, ModelConfig

# PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels on GPUs) wherever the architecture
# has it; raysys.core.analysis switches a model to eager attention when it needs the attention probabilities.
SDPA = "sdpa"


@dataclass(frozen=True)
class Architecture:
    """How one encoder architecture (an HF `model_type`) is built from a `ModelConfig`, computes MLM logits, splits
    into PLM and classifier head, and where its PET modules go.

    `config_fields(model, tokenizer)`: the from-scratch config's fields besides the shared sizes (`base_fields`).
    `mlm_logits(masked_lm, hidden)`: vocabulary logits of the MLM head for (n, hidden) states, so that the loss
    computes them at the masked positions only. `head_prefixes`: the classifier's weights a PLM checkpoint does
    not have (freshly initialised when a classifier is built from it; kept from the tuned model when its update is
    recycled). `layers`: the transformer layers, an attribute path from the base model. `adapter_sites`: the
    attention-output and the feed-forward-output projection of a layer. `lora_names`: this architecture's module
    for each of RoBERTa's names that `tuning.lora.targets` uses (e.g. "query"); other names are taken as its own."""

    config_fields: Callable[[ModelConfig, object], dict]
    mlm_logits: Callable
    head_prefixes: tuple[str, ...]
    layers: str
    adapter_sites: tuple[str, ...]
    lora_names: Mapping[str, str] = field(default_factory=dict)
    attention: str = SDPA


def base_fields(model: ModelConfig, tokenizer) -> dict:
    """The sizes every architecture takes under the same names."""
    return {"vocab_size": len(tokenizer), "hidden_size": model.hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads, "intermediate_size": model.intermediate_size,
            "pad_token_id": tokenizer.pad_token_id}


def _roberta_fields(model: ModelConfig, tokenizer) -> dict:
    return {"max_position_embeddings": model.max_positions + 2,  # RoBERTa offsets positions by padding_idx + 1
            "hidden_dropout_prob": model.dropout, "attention_probs_dropout_prob": model.dropout,
            "type_vocab_size": 1, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def _bert_fields(model: ModelConfig, tokenizer) -> dict:
    return {"max_position_embeddings": model.max_positions, "hidden_dropout_prob": model.dropout,
            "attention_probs_dropout_prob": model.dropout}


def _deberta_fields(model: ModelConfig, tokenizer) -> dict:
    """DeBERTa-v3's choices (its checkpoints are `deberta-v2` models): disentangled relative attention over
    log-bucketed distances, a key projection shared with the positions, no absolute position embedding."""
    return {"max_position_embeddings": model.max_positions, "hidden_dropout_prob": model.dropout,
            "attention_probs_dropout_prob": model.dropout, "type_vocab_size": 0, "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"], "position_buckets": max(8, model.max_positions // 2),
            "norm_rel_ebd": "layer_norm", "share_att_key": True, "position_biased_input": False}


def _modernbert_fields(model: ModelConfig, tokenizer) -> dict:
    # ModernBERT's config defaults name its own vocabulary's special ids (50281...): ours must replace them all
    return {"max_position_embeddings": model.max_positions, "embedding_dropout": model.dropout,
            "attention_dropout": model.dropout, "mlp_dropout": model.dropout, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "cls_token_id": start_token_id(tokenizer),
            "sep_token_id": end_token_id(tokenizer)}


def _deberta_logits(masked_lm, hidden):
    if masked_lm.config.legacy:  # BERT's head; the non-legacy head takes the (tied) word embeddings as an argument
        return masked_lm.cls(hidden)
    return masked_lm.lm_predictions(hidden, masked_lm.deberta.embeddings.word_embeddings)


# Post-LN encoders (BERT's layout): the adapter follows each sub-layer's output projection, before its residual
# and LayerNorm. A classifier from the MLM checkpoint gets a fresh head, and BERT's and DeBERTa's a fresh pooler.
_ROBERTA = Architecture(_roberta_fields, lambda m, h: m.lm_head(h), ("classifier.",), "encoder.layer",
                        ("attention.output.dense", "output.dense"))

ARCHITECTURES: dict[str, Architecture] = {
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "bert": Architecture(_bert_fields, lambda m, h: m.cls(h), ("bert.pooler.", "classifier."), "encoder.layer",
                         ("attention.output.dense", "output.dense")),
    "deberta-v2": Architecture(_deberta_fields, _deberta_logits, ("pooler.", "classifier."), "encoder.layer",
                               ("attention.output.dense", "output.dense"),
                               lora_names={"query": "query_proj", "key": "key_proj", "value": "value_proj"},
                               attention="eager"),
    # Pre-LN; query, key and value are one fused projection (Wqkv): LoRA on "query" or "value" adapts all three.
    # Its classifier's `head.` (dense, act, norm) has the MLM head's names and loads from it: only `classifier.` is new
    "modernbert": Architecture(_modernbert_fields, lambda m, h: m.decoder(m.head(h)), ("classifier.",), "layers",
                               ("attn.Wo", "mlp.Wo"), lora_names={"query": "Wqkv", "key": "Wqkv", "value": "Wqkv"}),
}
if set(ARCHITECTURES) != set(CONFIG_ARCHITECTURES):  # an entry without its config name, or the reverse
    raise RuntimeError(f"architectures {sorted(ARCHITECTURES)} != configured {sorted(CONFIG_ARCHITECTURES)}")


def get(model_type: str, where: str = "model_type") -> Architecture:
    """The table's entry, or an error naming the unsupported type (`where`: what it came from)."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{where}: architecture '{model_type}' is not supported; known: {list(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def of(model) -> Architecture:
    """The entry of an HF model (or config) by its `model_type`."""
    config = getattr(model, "config", model)
    return get(config.model_type, f"{type(model).__name__}.config.model_type")


def checkpoint_type(path: str | Path, where: str | None = None) -> str:
    """A checkpoint's architecture: its config.json's `model_type`, checked against the table (`where`: what named
    the checkpoint, for the error)."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(str(path)).model_type
    get(model_type, where or f"model_type of {path}")
    return model_type


def lora_targets(model, names) -> list[str]:
    """`tuning.lora.targets` in this model's module names, each once, in order."""
    aliases = of(model).lora_names
    return list(dict.fromkeys(aliases.get(name, name) for name in names))


def adapter_sites(model):
    """(parent module, attribute) of every projection an adapter follows: two per layer, in layer order."""
    arch = of(model)
    for layer in _attribute(model.base_model, arch.layers):
        for site in arch.adapter_sites:
            *path, name = site.split(".")
            yield _attribute(layer, ".".join(path)), name


def _attribute(module, path: str):
    for name in path.split(".") if path else ():
        module = getattr(module, name)
    return module


def start_token_id(tokenizer) -> int:
    """The id that opens a sequence: BERT's [CLS], RoBERTa's <s> (its bos; our BPE tokenizer has both, the same)."""
    return tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id


def end_token_id(tokenizer) -> int:
    """The id that closes a document: BERT's [SEP], RoBERTa's </s>."""
    return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
