"""raysys/core/models.py: the tokenizer ids the pre-training loop relies on, for our byte-level BPE tokenizer and for a
WordPiece vocabulary laid out as BERT's ([PAD] 0, [unused..], [UNK] [CLS] [SEP] [MASK] in the middle)."""

import torch
from transformers import BertTokenizerFast

from raysys.core import architectures, data, masked_lm_loop, models

TEXTS = ["the cat sat on the mat", "a dog ran over the hill", "the bird flew near the old tree"] * 20


def _bert_like_tokenizer() -> BertTokenizerFast:
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(6)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})


def test_our_bpe_tokenizer_has_its_specials_first_and_one_id_per_role():
    tokenizer = models.train_tokenizer(TEXTS, vocab_size=120)
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == models.SPECIAL_TOKENS
    # random MLM replacements draw from ids 5.. exactly as before other vocabularies were supported
    assert torch.equal(models.regular_token_ids(tokenizer), torch.arange(5, len(tokenizer)))
    assert (architectures.start_token_id(tokenizer), architectures.end_token_id(tokenizer)) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_a_bert_vocabulary_packs_with_cls_and_sep_and_never_draws_a_special_id():
    tokenizer = _bert_like_tokenizer()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert (cls, sep, tokenizer.pad_token_id, tokenizer.bos_token_id) == (8, 9, 0, None)
    regular = models.regular_token_ids(tokenizer)
    assert not torch.isin(regular, torch.tensor(tokenizer.all_special_ids)).any()
    assert len(regular) == len(tokenizer) - 5 and int(regular[0]) == 1  # [unused] ids are ordinary entries

    sequences = masked_lm_loop.pack_corpus(TEXTS, tokenizer, 16)
    assert all(s[0] == cls and s[-1] == sep for s in sequences)
    ids, _ = data.pad_batch(sequences, tokenizer.pad_token_id)
    special = sum(ids == s for s in tokenizer.all_special_ids).bool()
    corrupted, labels = data.mask_tokens(ids, special, tokenizer.mask_token_id, regular, 0.5,
                                         torch.Generator().manual_seed(0))
    randomized = (labels != -100) & (corrupted != ids) & (corrupted != tokenizer.mask_token_id)
    assert int(randomized.sum()) > 5
    assert torch.isin(corrupted[randomized], regular).all()
