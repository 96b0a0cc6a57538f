"""Tokenizer and models: build from a `ModelConfig` (any architecture of raysys.core.architectures, through the Auto
classes), train a byte-level BPE tokenizer, save and load (safetensors via `save_pretrained`; nothing is ever
unpickled)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from raysys.config import ModelConfig
from raysys.core import architectures

# Load reports and progress bars for every checkpoint would bury the sweep's own output.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (RoBERTa's kind) trained on `texts`, with RoBERTa's special tokens and
    `<s> ... </s>` post-processing: the from-scratch tokenizer of every architecture (a model needs only its vocabulary
    size and special ids)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    # add_prefix_space: a word is one token sequence wherever it stands (sentence-initial entities included)
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path))


def regular_token_ids(tokenizer) -> torch.Tensor:
    """The ids that are no special token, ascending: what a random MLM replacement draws from. Our BPE tokenizer
    puts its five specials first (ids 5..), BERT's WordPiece vocabulary has them at 0 and 100-103."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def masked_lm_config(model: ModelConfig, tokenizer):
    """The from-scratch config of `model.architecture` over the tokenizer's vocabulary."""
    arch = architectures.get(model.architecture, "model.architecture")
    fields = {**architectures.base_fields(model, tokenizer), **arch.config_fields(model, tokenizer)}
    return AutoConfig.for_model(model.architecture, **fields, attn_implementation=arch.attention)


def new_masked_lm(model: ModelConfig, tokenizer, seed: int):
    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(masked_lm_config(model, tokenizer))


def _attention(path: str | Path) -> str:
    return architectures.get(architectures.checkpoint_type(path)).attention


def masked_lm_from_checkpoint(path: str | Path, seed: int | None = None):
    """(model, fresh keys): the checkpoint as a masked LM. A checkpoint without an MLM head (a bare encoder such as
    a sentence-transformers BertModel) gets a fresh head drawn from `seed`, so that every run starting from it starts
    from the same model; the fresh keys say what was drawn (none for a full MLM checkpoint)."""
    if seed is not None:
        torch.manual_seed(seed)
    model, info = AutoModelForMaskedLM.from_pretrained(str(path), use_safetensors=True,
                                                       attn_implementation=_attention(path), output_loading_info=True)
    return model, sorted(info["missing_keys"])


def load_masked_lm(path: str | Path):
    """A PLM of the store (a full MLM checkpoint)."""
    return masked_lm_from_checkpoint(path)[0]


def classifier_from_plm(plm_path: str | Path, num_labels: int, seed: int):
    """The PLM's encoder with a fresh classification head (seeded: the head init is part of the run's identity)."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(plm_path), num_labels=num_labels,
                                                              use_safetensors=True,
                                                              attn_implementation=_attention(plm_path))


def random_classifier(model: ModelConfig, tokenizer, num_labels: int, seed: int):
    """The same architecture, randomly initialised: the no-pre-training baseline."""
    torch.manual_seed(seed)
    config = masked_lm_config(model, tokenizer)
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "max_position_embeddings")


def architecture(path_or_name: str | Path) -> dict:
    """The fields that decide whether two checkpoints' weights can be subtracted, added or interpolated."""
    config = AutoConfig.from_pretrained(str(path_or_name))
    return {k: getattr(config, k, None) for k in ARCHITECTURE_FIELDS}
