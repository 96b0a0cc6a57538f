"""Weight arithmetic for recycling: pure functions over name-keyed state dicts (no I/O, no device moves).

Keys are aligned by name; a missing or extra key, a shape or a dtype mismatch raises `WeightMismatchError`.
Non-floating entries (integer buffers such as position ids) must be equal in both inputs and pass through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from raysys.config import PET_NORM_POLICIES

StateDict = Mapping[str, torch.Tensor]


class WeightMismatchError(ValueError):
    """Two state dicts cannot be combined: different keys, shapes or dtypes (different architectures)."""


def select(state: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` (e.g. 'roberta.' = the encoder of an HF RoBERTa model: its `base_model_prefix`),
    prefix kept."""
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def drop(state: StateDict, exclude: Iterable[str]) -> dict[str, torch.Tensor]:
    """`state` without the entries whose names start with any prefix in `exclude`."""
    exclude = tuple(exclude)
    return {k: v for k, v in state.items() if not k.startswith(exclude)} if exclude else dict(state)


def check_aligned(a: StateDict, b: StateDict, what: str = "state dicts") -> None:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise WeightMismatchError(f"{what}: keys differ — only in first: {missing[:5]}, only in second: {extra[:5]}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise WeightMismatchError(f"{what}: '{k}' has shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}")
        if a[k].dtype != b[k].dtype:
            raise WeightMismatchError(f"{what}: '{k}' has dtype {a[k].dtype} vs {b[k].dtype}")


def _combine(a: StateDict, b: StateDict, fn, what: str) -> dict[str, torch.Tensor]:
    check_aligned(a, b, what)
    out = {}
    for k in a:
        if a[k].is_floating_point():
            out[k] = fn(a[k], b[k])
        elif torch.equal(a[k], b[k]):
            out[k] = a[k].clone()
        else:
            raise WeightMismatchError(f"{what}: non-floating entry '{k}' differs")
    return out


def delta(tuned: StateDict, base: StateDict) -> dict[str, torch.Tensor]:
    """Δ = θ^τ − θ: what tuning changed."""
    return _combine(tuned, base, lambda t, b: t - b, "delta(tuned, base)")


def apply_delta(target: StateDict, update: StateDict) -> dict[str, torch.Tensor]:
    """θ' = θ_target + Δ (the compatibility test and the initialization-based method)."""
    return _combine(target, update, lambda t, d: t + d, "apply_delta(target, delta)")


def interpolate(a: StateDict, b: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = (1 − α)·θ_a + α·θ_b; α = 0 and α = 1 give back the ends exactly."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return _combine(a, b, lambda x, _: x.clone(), "interpolate(a, b)")
    if alpha == 1.0:
        return _combine(a, b, lambda _, y: y.clone(), "interpolate(a, b)")
    return _combine(a, b, lambda x, y: torch.lerp(x, y, alpha), "interpolate(a, b)")


def distance(a: StateDict, b: StateDict, exclude: Iterable[str] = ()) -> dict[str, float]:
    """L2 distance, L2 per parameter (sqrt(L2² / n)) and cosine similarity of the flattened floating entries."""
    a, b = drop(a, exclude), drop(b, exclude)
    check_aligned(a, b, "distance(a, b)")
    sq, dot, na, nb, n = 0.0, 0.0, 0.0, 0.0, 0
    for k in a:
        if not a[k].is_floating_point():
            continue
        x, y = a[k].double().flatten(), b[k].double().flatten()
        sq += float(((x - y) ** 2).sum())
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
        n += x.numel()
    cosine = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")
    return {"l2": math.sqrt(sq), "l2_per_parameter": math.sqrt(sq / max(1, n)), "cosine": cosine}


def restrict(state: StateDict, names: Iterable[str], what: str = "state") -> dict[str, torch.Tensor]:
    """The entries of `state` named in `names`, in `state`'s order; a name it lacks raises."""
    names = set(names)
    missing = sorted(names - set(state))
    if missing:
        raise WeightMismatchError(f"{what} lacks {len(missing)} entries, e.g. {missing[:5]}")
    return {k: v for k, v in state.items() if k in names}


def transplant_delta(tuned_old: StateDict, plm_old: StateDict, plm_new: StateDict,
                     head_prefixes: Iterable[str] = ("classifier.",)) -> dict[str, torch.Tensor]:
    """The paper's compatibility/initialization weights for fine-tuning: θ_{i+1} + (θ_i^τ − θ_i) on every weight the
    classifier shares with its PLM, the classifier head (`head_prefixes`: what the PLM lacks) taken from the tuned
    M_i model."""
    head_prefixes = tuple(head_prefixes)
    body = drop(tuned_old, head_prefixes)
    old_delta = delta(body, restrict(plm_old, body, "the old PLM"))
    backbone = apply_delta(restrict(plm_new, body, "the new PLM"), old_delta)
    head = {k: v for k, v in tuned_old.items() if k.startswith(head_prefixes)}
    if not head:
        raise WeightMismatchError(f"tuned model has no {list(head_prefixes)} entries")
    return {**backbone, **head}


def transplant_norms(pet_state: StateDict, norms: Iterable[str], plm_old: StateDict, plm_new: StateDict,
                     policy: str) -> dict[str, torch.Tensor]:
    """A PET model's trainable weights tuned on the old PLM, for the new one: the entries named in `norms` (the
    backbone LayerNorms it trained) become LN_new + (LN_old^τ − LN_old) under policy "delta" — the new PLM's own
    LayerNorm plus what tuning changed, as `transplant_delta` moves fine-tuning's weights — and stay LN_old^τ under
    "absolute"; the module and head are kept as they are either way (`tuning.pet_norms`)."""
    if policy not in PET_NORM_POLICIES:
        raise ValueError(f"tuning.pet_norms: unknown policy '{policy}'; known: {list(PET_NORM_POLICIES)}")
    if policy == "absolute":
        return dict(pet_state)
    tuned = restrict(pet_state, norms, "the PET weights")
    moved = apply_delta(restrict(plm_new, tuned, "the new PLM"), delta(tuned, restrict(plm_old, tuned, "the old PLM")))
    return {**pet_state, **moved}
