"""Weight arithmetic on tiny tensors: exact ends, exact deltas, and mismatches refused."""

import math

import pytest
import torch

from raysys.core import recycle
from raysys.core.recycle import WeightMismatchError


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "roberta.w": torch.randn(3, 4, generator=g),
        "roberta.b": torch.randn(4, generator=g),
        "roberta.position_ids": torch.arange(5),
        "classifier.w": torch.randn(2, 4, generator=g),
    }


def test_delta_then_apply_gives_back_the_tuned_weights():
    base, tuned = _state(0), _state(1)
    d = recycle.delta(tuned, base)
    assert torch.equal(d["roberta.w"], tuned["roberta.w"] - base["roberta.w"])
    back = recycle.apply_delta(base, d)
    for k in base:
        torch.testing.assert_close(back[k], tuned[k] if k != "roberta.position_ids" else base[k], rtol=0, atol=1e-6)


def test_apply_zero_delta_is_identity():
    base = _state(0)
    zero = {k: torch.zeros_like(v) if v.is_floating_point() else v.clone() for k, v in base.items()}
    out = recycle.apply_delta(base, zero)
    assert all(torch.equal(out[k], base[k]) for k in base)


@pytest.mark.parametrize("alpha, end", [(0.0, "a"), (1.0, "b")])
def test_interpolate_ends_are_exact(alpha, end):
    a, b = _state(0), _state(1)
    out = recycle.interpolate(a, b, alpha)
    expected = a if end == "a" else b
    assert all(torch.equal(out[k], expected[k]) for k in a)
    assert out["roberta.w"] is not expected["roberta.w"]  # a copy, never an alias the caller could mutate


def test_interpolate_midpoint_and_line():
    a, b = _state(0), _state(1)
    mid = recycle.interpolate(a, b, 0.5)
    torch.testing.assert_close(mid["roberta.w"], (a["roberta.w"] + b["roberta.w"]) / 2)
    quarter = recycle.interpolate(a, b, 0.25)
    torch.testing.assert_close(quarter["classifier.w"], 0.75 * a["classifier.w"] + 0.25 * b["classifier.w"])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_interpolate_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        recycle.interpolate(_state(0), _state(1), alpha)


def test_mismatched_keys_shapes_dtypes_and_integer_buffers_are_refused():
    a = _state(0)
    with pytest.raises(WeightMismatchError, match="only in first"):
        recycle.delta(a, {k: v for k, v in _state(1).items() if k != "roberta.b"})
    wider = dict(_state(1), **{"roberta.w": torch.zeros(3, 5)})
    with pytest.raises(WeightMismatchError, match=r"roberta\.w.*\(3, 4\) vs \(3, 5\)"):
        recycle.interpolate(a, wider, 0.5)
    halved = dict(_state(1), **{"roberta.b": torch.zeros(4, dtype=torch.float16)})
    with pytest.raises(WeightMismatchError, match="dtype"):
        recycle.apply_delta(a, halved)
    shifted = dict(_state(1), **{"roberta.position_ids": torch.arange(1, 6)})
    with pytest.raises(WeightMismatchError, match="position_ids"):
        recycle.interpolate(a, shifted, 0.5)


def test_distance_numbers():
    a = {"w": torch.tensor([1.0, 0.0]), "c": torch.tensor([5.0])}
    b = {"w": torch.tensor([0.0, 1.0]), "c": torch.tensor([9.0])}
    d = recycle.distance(a, b, exclude=["c"])
    assert d["l2"] == pytest.approx(math.sqrt(2))
    assert d["l2_per_parameter"] == pytest.approx(1.0)
    assert d["cosine"] == pytest.approx(0.0)
    same = recycle.distance(a, a)
    assert same["l2"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    with_head = recycle.distance(a, b)
    assert with_head["l2"] == pytest.approx(math.sqrt(2 + 16))


def test_transplant_delta_moves_the_backbone_delta_and_keeps_the_old_head():
    plm_old, plm_new = _state(0), _state(2)
    tuned_old = dict(_state(1), **{"roberta.position_ids": torch.arange(5)})
    plm_old = {k: v for k, v in plm_old.items() if not k.startswith("classifier.")}
    plm_new = {k: v for k, v in plm_new.items() if not k.startswith("classifier.")}
    out = recycle.transplant_delta(tuned_old, plm_old, plm_new)
    expected = plm_new["roberta.w"] + (tuned_old["roberta.w"] - plm_old["roberta.w"])
    torch.testing.assert_close(out["roberta.w"], expected, rtol=0, atol=1e-6)
    assert torch.equal(out["classifier.w"], tuned_old["classifier.w"])
    # the target PLM itself as the source: the transplant gives back the tuned model
    same = recycle.transplant_delta(tuned_old, plm_old, plm_old)
    torch.testing.assert_close(same["roberta.w"], tuned_old["roberta.w"], rtol=0, atol=1e-6)


def test_transplant_norms_moves_a_trained_layer_norm_by_what_tuning_changed():
    """LN_j + (LN_i^τ − LN_i) under "delta", LN_i^τ under "absolute"; module and head untouched either way."""
    ln = "roberta.encoder.LayerNorm.weight"
    pet_state = {ln: torch.tensor([1.5, 0.5]), "roberta.encoder.adapter.up.weight": torch.tensor([[0.25, -1.0]]),
                 "classifier.w": torch.tensor([3.0, 4.0])}
    plm_old = {ln: torch.tensor([1.0, 1.0]), "roberta.encoder.dense.weight": torch.ones(2, 2)}
    plm_new = {ln: torch.tensor([2.0, 0.75]), "roberta.encoder.dense.weight": torch.zeros(2, 2)}
    delta = recycle.transplant_norms(pet_state, {ln}, plm_old, plm_new, "delta")
    assert torch.equal(delta[ln], torch.tensor([2.5, 0.25]))  # [2 + 0.5, 0.75 − 0.5]
    absolute = recycle.transplant_norms(pet_state, {ln}, plm_old, plm_new, "absolute")
    assert torch.equal(absolute[ln], torch.tensor([1.5, 0.5]))
    for out in (delta, absolute):
        assert list(out) == list(pet_state)
        assert all(torch.equal(out[k], pet_state[k]) for k in pet_state if k != ln)
    # recycled onto its own PLM, "delta" gives the tuned LayerNorm back
    assert torch.equal(recycle.transplant_norms(pet_state, {ln}, plm_old, plm_old, "delta")[ln], pet_state[ln])
    assert recycle.transplant_norms(pet_state, set(), plm_old, plm_new, "delta") == pet_state


def test_transplant_norms_refuses_an_unknown_policy_and_a_norm_the_plm_lacks():
    ln = "roberta.LayerNorm.weight"
    state = {ln: torch.ones(2)}
    with pytest.raises(ValueError, match="tuning.pet_norms: unknown policy 'raw'"):
        recycle.transplant_norms(state, {ln}, state, state, "raw")
    with pytest.raises(WeightMismatchError, match="the new PLM lacks 1 entries"):
        recycle.transplant_norms(state, {ln}, state, {"other": torch.ones(2)}, "delta")
    with pytest.raises(WeightMismatchError, match="the PET weights lacks"):
        recycle.transplant_norms(state, {"roberta.missing.weight"}, state, state, "delta")
