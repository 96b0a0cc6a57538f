"""Tokenizer and RoBERTa models: build from a `ModelConfig`, train a byte-level BPE tokenizer, save and load
(safetensors via `save_pretrained`; nothing is ever unpickled)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

from raysys.config import ModelConfig

# Load reports and progress bars for every checkpoint would bury the sweep's own output.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
# PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels on GPUs) for every model we
# build or load; raysys.pilot switches a model to eager attention when it needs the attention probabilities.
ATTENTION = "sdpa"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (RoBERTa's kind) trained on `texts`, with RoBERTa's special tokens and
    `<s> ... </s>` post-processing."""
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


def first_regular_token_id(tokenizer) -> int:
    """Ids below this are special tokens (RoBERTa puts them first); random MLM replacements start here."""
    return max(tokenizer.all_special_ids) + 1


def roberta_config(model: ModelConfig, tokenizer) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_positions + 2,  # RoBERTa offsets positions by padding_idx + 1
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=ATTENTION,
    )


def new_masked_lm(model: ModelConfig, tokenizer, seed: int) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    return RobertaForMaskedLM(roberta_config(model, tokenizer))


def load_masked_lm(path: str | Path) -> RobertaForMaskedLM:
    return RobertaForMaskedLM.from_pretrained(str(path), use_safetensors=True, attn_implementation=ATTENTION)


def classifier_from_plm(plm_path: str | Path, num_labels: int, seed: int) -> RobertaForSequenceClassification:
    """The PLM's encoder with a fresh classification head (seeded: the head init is part of the run's identity)."""
    torch.manual_seed(seed)
    return RobertaForSequenceClassification.from_pretrained(str(plm_path), num_labels=num_labels,
                                                            use_safetensors=True, attn_implementation=ATTENTION)


def random_classifier(model: ModelConfig, tokenizer, num_labels: int, seed: int) -> RobertaForSequenceClassification:
    """The same architecture, randomly initialised: the no-pre-training baseline."""
    torch.manual_seed(seed)
    config = roberta_config(model, tokenizer)
    config.num_labels = num_labels
    return RobertaForSequenceClassification(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings")


def architecture(path_or_name: str | Path) -> dict:
    """The fields that decide whether two checkpoints' weights can be subtracted, added or interpolated."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path_or_name))
    return {k: getattr(config, k, None) for k in ARCHITECTURE_FIELDS}
