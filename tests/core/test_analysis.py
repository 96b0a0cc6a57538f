"""Barriers along interpolation paths and attention-head similarity, on hand-made numbers and a tiny model."""

import math

import pytest
import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from raysys.core import analysis


def test_barrier_of_a_linear_path_is_zero_and_of_a_bump_is_its_height():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert analysis.loss_barrier(alphas, [1.0, 1.25, 1.5, 1.75, 2.0]) == pytest.approx(0.0)
    assert analysis.loss_barrier(alphas, [1.0, 1.0, 1.0, 1.0, 1.0]) == 0.0  # identical endpoints, flat path
    assert analysis.loss_barrier(alphas, [1.0, 1.25, 3.0, 1.75, 2.0]) == pytest.approx(1.5)
    assert analysis.loss_barrier([1.0, 0.0, 0.5], [2.0, 1.0, 1.0]) == pytest.approx(0.0)  # order does not matter


def test_accuracy_drop_below_the_line():
    alphas = [0.0, 0.5, 1.0]
    assert analysis.accuracy_drop(alphas, [0.8, 0.2, 0.6]) == pytest.approx(0.5)
    assert analysis.accuracy_drop(alphas, [0.8, 0.9, 0.6]) == pytest.approx(0.0)


def test_paths_need_both_ends():
    with pytest.raises(ValueError, match="both ends"):
        analysis.loss_barrier([0.0, 0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="one value per alpha"):
        analysis.accuracy_drop([0.0, 1.0], [1.0])


def test_head_divergence_hand_numbers():
    uniform = torch.full((1, 1, 1, 2), 0.5)
    onehot = torch.tensor([[[[1.0, 0.0]]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert float(analysis.head_divergence(uniform, uniform, mask)) == pytest.approx(0.0, abs=1e-9)
    # JS(one-hot, uniform) = ½ [ln(1/0.75)] + ½ [½ ln(0.5/0.75) + ½ ln(0.5/0.25)]
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0))
    assert float(analysis.head_divergence(onehot, uniform, mask)) == pytest.approx(expected, rel=1e-6)
    disjoint = torch.tensor([[[[0.0, 1.0]]]])
    assert float(analysis.similarity(analysis.head_divergence(onehot, disjoint, mask))) == pytest.approx(0.0, abs=1e-6)


def test_padding_queries_are_ignored():
    a = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    b = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    only_first = torch.tensor([[True, False]])
    assert float(analysis.head_divergence(a, b, only_first)) == pytest.approx(0.0, abs=1e-9)
    assert float(analysis.head_divergence(a, b, torch.ones(1, 2, dtype=torch.bool))) == pytest.approx(math.log(2) / 2)


def _model(seed):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, num_labels=3))


def test_a_model_is_most_similar_to_itself():
    g = torch.Generator().manual_seed(0)
    batches = []
    for width in (7, 10):
        ids = torch.randint(5, 60, (3, width), generator=g)
        mask = torch.ones_like(ids)
        mask[0, width - 2:] = 0
        batches.append((ids, mask))
    maps_a, mask = analysis.attention_maps(_model(0), batches)
    maps_b, _ = analysis.attention_maps(_model(1), batches)
    assert len(maps_a) == 2 and maps_a[0].shape == (6, 4, 10, 10) and mask.shape == (6, 10)
    rows = maps_a[0].sum(-1)[:, 0][mask]
    torch.testing.assert_close(rows, torch.ones_like(rows))  # padded batches still give distributions
    for layer in range(2):
        self_sim = analysis.similarity(analysis.head_divergence(maps_a[layer], maps_a[layer], mask))
        other = analysis.similarity(analysis.head_divergence(maps_a[layer], maps_b[layer], mask))
        torch.testing.assert_close(self_sim.diagonal(), torch.ones(4), atol=1e-5, rtol=0)
        assert bool((self_sim.diagonal() >= other.diagonal()).all())
        assert bool((self_sim.diagonal() >= self_sim.max(dim=1).values - 1e-6).all())
