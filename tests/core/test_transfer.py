"""raysys/core/transfer.py: each training-free transfer method against a hand computation on tiny tensors."""

import pytest
import torch

from raysys.core import transfer


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_scaled_delta_is_lambda_times_delta():
    delta = {"w": t(0.5, -1.0), "ids": torch.tensor([1, 2])}
    assert torch.equal(transfer.scaled(delta, 0.5)["w"], t(0.25, -0.5))
    assert torch.equal(transfer.scaled(delta, 0.0)["w"], t(0.0, -0.0))
    assert torch.equal(transfer.scaled(delta, 1.0)["w"], delta["w"])
    assert torch.equal(transfer.scaled(delta, 3.0)["ids"], delta["ids"])  # integer buffers pass through


def test_dare_with_no_drop_is_the_identity_and_with_full_drop_is_zero():
    delta = {"a": t(1, 2, 3, 4), "b": t(-1, 0.5)}
    kept = transfer.dare(delta, 0.0, seed=0)
    assert all(torch.equal(kept[k], delta[k]) for k in delta)
    assert all(not v.any() for v in transfer.dare(delta, 1.0, seed=0).values())
    with pytest.raises(ValueError, match="drop rate"):
        transfer.dare(delta, 1.5, seed=0)


def test_dare_keeps_an_entry_rescaled_or_drops_it_reproducibly():
    delta = {"a": torch.arange(1.0, 401.0)}
    out = transfer.dare(delta, 0.75, seed=3)["a"]
    kept = out != 0
    assert torch.allclose(out[kept], 4 * delta["a"][kept])  # rescaled by 1/(1 − 0.75)
    assert 60 < int(kept.sum()) < 140  # about a quarter kept (binomial(400, 0.25): mean 100, sd 8.7)
    assert torch.equal(out, transfer.dare(delta, 0.75, seed=3)["a"])
    assert not torch.equal(out, transfer.dare(delta, 0.75, seed=4)["a"])
    # the mask is the seeded generator's draw over the tensors in name order
    generator = torch.Generator().manual_seed(3)
    dropped = torch.bernoulli(torch.full((400,), 0.75), generator=generator)
    assert torch.equal(kept, dropped == 0)


def test_ties_of_one_delta_at_full_density_is_the_scaled_delta():
    delta = {"w": t(0.5, -2.0, 0.1, 3.0)}
    assert torch.allclose(transfer.ties([delta], 1.0, lam=0.7)["w"], t(0.35, -1.4, 0.07, 2.1))


def test_ties_trims_elects_a_sign_and_averages_the_agreeing_entries():
    a, b = {"w": t(0.1, -0.4, 0.3, 2.0)}, {"w": t(-0.2, 0.5, -0.6, 1.0)}
    # density 0.5 keeps the two largest |entries| of each: a → [0, −.4, 0, 2], b → [0, 0, −.6, 1]; the sums elect
    # [+, −, −, +]; position 0 has no kept entry, position 3 averages 2 and 1
    assert torch.allclose(transfer.ties([a, b], 0.5)["w"], t(0.0, -0.4, -0.6, 1.5))
    assert torch.allclose(transfer.ties([a, b], 0.5, lam=2.0)["w"], t(0.0, -0.8, -1.2, 3.0))
    # no trim: a sum of exactly zero elects +, and only the positive entries are averaged
    x, y, z = ({"w": t(1, -1, 0, 2, 0.5, -3)}, {"w": t(-2, -1, 0, 1, 0, 1)}, {"w": t(0.5, 2, 3, -1, 0, 1)})
    assert torch.allclose(transfer.ties([x, y, z], 1.0)["w"], t(-2, 2, 3, 1.5, 0.5, -3))


def test_ties_merges_a_name_over_the_deltas_that_have_it():
    merged = transfer.multi_version([{"w": t(1.0), "old_only": t(4.0)}, {"w": t(3.0)}], 1.0)
    assert torch.allclose(merged["w"], t(2.0)) and torch.allclose(merged["old_only"], t(4.0))
    with pytest.raises(ValueError, match="density"):
        transfer.ties([{"w": t(1.0)}], 0.0)


def test_svd_projection_with_full_rank_is_the_identity_and_projects_onto_the_new_subspace():
    delta_w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    new = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # top singular vector (1, 1)/√2: P = ½[[1, 1], [1, 1]]
    assert torch.equal(transfer.svd_project(delta_w, new, None), delta_w)
    assert torch.allclose(transfer.svd_project(delta_w, new, 1), torch.full((2, 2), 2.5))
    assert torch.allclose(transfer.svd_project(delta_w, new, 2), delta_w, atol=1e-6)  # square, full rank
    rectangular = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(transfer.svd_project(rectangular, torch.randn(3, 5), None), rectangular)
    with pytest.raises(ValueError, match="one 2-D shape"):
        transfer.svd_project(delta_w, torch.ones(3, 2), 1)


def test_subspace_transfer_moves_the_principal_and_null_parts_into_the_new_subspaces():
    delta_w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    old = torch.diag(t(3.0, 1.0))  # principal direction e1; null side e2
    # an unchanged layer gives ΔW back, the cross blocks included (the paper's two-term formula would drop them)
    assert torch.allclose(transfer.subspace_transfer(delta_w, old, old, 1), delta_w)
    # principal part only: the e1-e1 block of ΔW
    assert torch.allclose(transfer.subspace_transfer(delta_w, old, old, 1, null_space=False),
                          torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # the new layer swapped its directions: the old principal subspace is the new null space and the other way
    # round, so nothing of either part survives the projection
    swapped = torch.diag(t(1.0, 3.0))
    for null_space in (True, False):
        assert torch.allclose(transfer.subspace_transfer(delta_w, old, swapped, 1, null_space), torch.zeros(2, 2))
    # a new principal direction at 45°: ΔW's principal block (1 on e1-e1) projected onto it is ½·½[[1, 1], [1, 1]]
    tilted = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    assert torch.allclose(transfer.subspace_transfer(delta_w, old, tilted, 1, null_space=False),
                          torch.full((2, 2), 0.25))


def test_subspace_alignment_is_one_for_the_same_subspace_and_zero_for_an_orthogonal_one():
    old = torch.diag(t(3.0, 1.0))
    assert transfer.subspace_alignment(old, 2 * old, 1) == pytest.approx(1.0)
    assert transfer.subspace_alignment(old, torch.diag(t(1.0, 3.0)), 1) == pytest.approx(0.0)


def test_only_the_backbones_linear_weights_are_projected():
    delta = {"encoder.layer.0.attention.self.query.weight": torch.ones(2, 2),
             "encoder.layer.0.attention.self.query.bias": torch.ones(2),
             "embeddings.word_embeddings.weight": torch.ones(4, 2),
             "classifier.dense.weight": torch.ones(2, 2)}
    out = transfer.per_linear_layer(delta, lambda name, w: 3 * w)
    assert torch.equal(out["encoder.layer.0.attention.self.query.weight"], 3 * torch.ones(2, 2))
    for name in ("encoder.layer.0.attention.self.query.bias", "embeddings.word_embeddings.weight",
                 "classifier.dense.weight"):
        assert torch.equal(out[name], delta[name]), name


def test_relative_change_measures_how_far_a_method_moved_the_delta():
    before = {"w": t(3.0, 4.0)}
    assert transfer.relative_change(before, before) == 0.0
    assert transfer.relative_change(before, {"w": t(0.0, 0.0)}) == pytest.approx(1.0)
