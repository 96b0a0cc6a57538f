"""raysys/core/packing.py: a corpus packed on disk holds exactly the sequences of the in-memory path, whatever the
batch and flush sizes, and reads back through memory maps; training sees the same batches from either."""

import numpy as np
import pytest

from raysys.config import WorldConfig
from raysys.core import masked_lm_loop, models, packing, world


@pytest.fixture(scope="module")
def corpus():
    w = world.build_world(WorldConfig(general_sentences=2000, domain_sentences=2000))
    tokenizer = models.train_tokenizer(world.general_corpus(w), 512)
    return world.domain_corpus(w, "d1"), tokenizer


def test_a_packed_corpus_holds_the_in_memory_sequences(corpus, tmp_path, monkeypatch):
    texts, tokenizer = corpus
    expected = masked_lm_loop.pack_corpus(texts, tokenizer, 16)
    monkeypatch.setattr(packing, "BATCH_DOCUMENTS", 7)  # documents split across tokenizer calls
    meta = packing.write_packed(iter(texts), tokenizer, 16, tmp_path / "p", flush_tokens=100)
    packed = packing.PackedCorpus(tmp_path / "p")
    assert len(packed) == len(expected) == meta["sequences"]
    assert [packed[i] for i in range(len(packed))] == expected
    assert packed[-1] == expected[-1]
    assert meta["documents"] == len(texts) and meta["tokens"] == sum(map(len, expected))
    assert meta["dtype"] == "uint16" and (tmp_path / "p" / packing.TOKENS_FILE).stat().st_size == 2 * meta["tokens"]
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_sampling_from_a_packed_corpus_gives_the_same_batches(corpus, tmp_path):
    texts, tokenizer = corpus
    in_memory = masked_lm_loop.pack_corpus(texts, tokenizer, 16)
    packing.write_packed(texts, tokenizer, 16, tmp_path / "p")
    packed = packing.PackedCorpus(tmp_path / "p")
    for step in (0, 1, len(in_memory) // 8 + 3):  # the last one in the next epoch
        for rank in (0, 1):
            assert masked_lm_loop.sample_batch(packed, step, 4, rank, 2, 7) == masked_lm_loop.sample_batch(
                in_memory, step, 4, rank, 2, 7)


def test_large_vocabularies_take_four_bytes_and_empty_corpora_are_empty(corpus, tmp_path):
    assert packing.token_dtype(65536) == np.uint16 and packing.token_dtype(65537) == np.uint32
    _, tokenizer = corpus
    meta = packing.write_packed([], tokenizer, 16, tmp_path / "empty")
    assert meta["sequences"] == 0 and len(packing.PackedCorpus(tmp_path / "empty")) == 0


def test_a_replay_mix_holds_its_own_corpus_and_the_replayed_share_of_the_earlier_ones():
    new = [[1, i] for i in range(300)]
    earlier = [[[0, i] for i in range(50)], [[2, i] for i in range(1000)]]
    mix = packing.ReplayMix(new, earlier, 0.25, seed=3)
    assert len(mix) == 400  # 100 replayed: a quarter of the whole
    assert [mix[i] for i in range(300)] == new
    replayed = [mix[i] for i in range(300, 400)]
    assert sum(s[0] == 0 for s in replayed) == 50 and sum(s[0] == 2 for s in replayed) == 50  # spread evenly
    assert all(s in earlier[0] or s in earlier[1] for s in replayed)
    assert [mix[i] for i in range(300, 400)] == [packing.ReplayMix(new, earlier, 0.25, seed=3)[i]
                                                  for i in range(300, 400)]  # seeded
    assert len(packing.ReplayMix(new, [], 0.25, seed=3)) == 300  # nothing earlier to replay
    with pytest.raises(ValueError, match="pretrain.replay"):
        packing.ReplayMix(new, earlier, 1.0, seed=3)
