"""Training-free transfer of a tuned Δ onto an upgraded PLM: the methods published since the paper, as pure
functions over name-keyed tensors (no I/O, no device moves). Each returns the *delta* to add to the new PLM's
weights; `raysys.core.recycle` adds it.

- `scaled` — task arithmetic with one task: λ·Δ (λ = 1 is plain copying, PortLLM's patch porting).
- `dare` — DARE (Yu et al., ICML 2024): drop each entry with probability p, rescale the rest by 1/(1 − p).
- `ties` — TIES-merging (Yadav et al., NeurIPS 2023) through peft's `merge_utils.ties`: trim each tensor to its
  top-k% magnitudes, elect a sign per entry, average the entries that agree with it, scale by λ.
- `svd_project` — project ΔW of a linear layer onto the new weight's top-k singular subspaces, P_U·ΔW·P_V
  (LoRA-X; Cross-LoRA between two checkpoints of one architecture reduces to it).
- `subspace_transfer` — ProLoRA's idea (Farhadzadeh et al., ICML 2025): ΔW's part in the old weight's top-k
  subspaces projected onto the new weight's, and (optionally) its null-space part onto the new null space.
- `multi_version` — TIES over the Δ of one task tuned on every earlier PLM of the chain (Δ_0 … Δ_i), a raysys
  choice: no paper merges the versions of one chain.

`METHODS` registers them under the names of `raysys.config.TRANSFER_METHODS`, each method's settings coming from
`TransferConfig.grid`. Definitions (and where the papers leave them open) are in docs/transfer.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from raysys.config import TRANSFER_METHODS

StateDict = Mapping[str, torch.Tensor]


def scaled(delta: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """λ·Δ, entry by entry: λ = 0 leaves the new PLM as it is, λ = 1 copies Δ unchanged."""
    return {k: v * lam if v.is_floating_point() else v.clone() for k, v in delta.items()}


def dare(delta: StateDict, drop: float, seed: int) -> dict[str, torch.Tensor]:
    """DARE: each entry of Δ is dropped with probability `drop` (i.i.d., one seeded generator walking the tensors
    in name order) and the kept ones rescaled by 1/(1 − drop), so E[DARE(Δ)] = Δ. drop = 0 is the identity; drop = 1
    leaves nothing (no 0/0). Own code rather than peft's `random_pruning`, which cannot take a generator."""
    if not 0.0 <= drop <= 1.0:
        raise ValueError(f"DARE drop rate must be in [0, 1], got {drop}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(delta):
        value = delta[name]
        if not value.is_floating_point() or drop == 0.0:
            out[name] = value.clone()
        elif drop == 1.0:
            out[name] = torch.zeros_like(value)
        else:
            dropped = torch.bernoulli(torch.full(value.shape, drop, dtype=torch.float32), generator=generator)
            out[name] = value * (1 - dropped).to(value.dtype) / (1 - drop)
    return {k: out[k] for k in delta}


def ties(deltas: list[StateDict], density: float, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """TIES-merge of several Δ (each a state dict; a name some lack is merged over those that have it): per tensor,
    keep the floor(density · numel) largest |entries| of each, elect the sign of their sum (a zero sum: +),
    average the kept entries that agree with it (none: 0), scale by λ — peft's `merge_utils.ties`, whose trim is
    per tensor (the official code trims each task vector as a whole). One Δ at density 1 gives λ·Δ."""
    from peft.utils.merge_utils import ties as peft_ties

    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    if not deltas:
        raise ValueError("TIES needs at least one Δ")
    out = {}
    for name in dict.fromkeys(k for d in deltas for k in d):  # first-seen order
        tensors = [d[name] for d in deltas if name in d]
        if not tensors[0].is_floating_point():
            out[name] = tensors[0].clone()
            continue
        with warnings.catch_warnings():  # peft warns that density 1 prunes nothing, on every tensor
            warnings.simplefilter("ignore", UserWarning)
            out[name] = peft_ties(tensors, torch.full((len(tensors),), float(lam)), density, "total")
    return out


def multi_version(deltas: list[StateDict], density: float, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """Δ_0 … Δ_i of one task (each against its own PLM) TIES-merged into one Δ for M_{i+1}."""
    return ties(deltas, density, lam)


def _top_subspace(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The projectors U_k·U_kᵀ (out side) and V_k·V_kᵀ (in side) of `weight`'s top-`rank` singular vectors (float64)."""
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    k = min(rank, u.shape[1])
    return u[:, :k] @ u[:, :k].T, vh[:k].T @ vh[:k]


def svd_project(delta_w: torch.Tensor, new_weight: torch.Tensor, rank: int | None) -> torch.Tensor:
    """P_U·ΔW·P_V with P_U, P_V the projectors onto the new weight's top-`rank` left and right singular vectors:
    what of ΔW acts in the directions the new layer uses most. rank None is the identity (a thin SVD's projectors
    are not, on the long side of a rectangular weight)."""
    if delta_w.shape != new_weight.shape or delta_w.dim() != 2:
        raise ValueError(f"svd_project: ΔW {tuple(delta_w.shape)} and W {tuple(new_weight.shape)} must be one 2-D shape")
    if rank is None:
        return delta_w.clone()
    left, right = _top_subspace(new_weight, rank)
    return (left @ delta_w.double() @ right).to(delta_w.dtype)


def subspace_transfer(delta_w: torch.Tensor, old_weight: torch.Tensor, new_weight: torch.Tensor, rank: int,
                      null_space: bool = True) -> torch.Tensor:
    """ProLoRA-style transfer of a linear layer's ΔW: L·ΔW·R with L = P'_U·P_U + [P'_U⊥·P_U⊥] and R = P_V·P'_V +
    [P_V⊥·P'_V⊥], where P are the old weight's top-`rank` projectors, P' the new weight's and P⊥ = I − P: the part
    of ΔW in the old layer's principal subspaces, projected onto the new layer's, and (`null_space`) its part in
    the old null space projected onto the new one. Projections, not rotations: a direction the new layer no longer
    uses drops out. This keeps the cross blocks the paper's two-term formula drops, so that an unchanged weight
    (new = old) gives ΔW back for any rank; without `null_space` only the principal part is carried."""
    if not delta_w.shape == old_weight.shape == new_weight.shape or delta_w.dim() != 2:
        raise ValueError(f"subspace_transfer: ΔW {tuple(delta_w.shape)}, old W {tuple(old_weight.shape)} and new W "
                         f"{tuple(new_weight.shape)} must be one 2-D shape")
    old_u, old_v = _top_subspace(old_weight, rank)
    new_u, new_v = _top_subspace(new_weight, rank)
    left, right = new_u @ old_u, old_v @ new_v
    if null_space:
        eye_u = torch.eye(old_u.shape[0], dtype=torch.float64)
        eye_v = torch.eye(old_v.shape[0], dtype=torch.float64)
        left = left + (eye_u - new_u) @ (eye_u - old_u)
        right = right + (eye_v - old_v) @ (eye_v - new_v)
    return (left @ delta_w.double() @ right).to(delta_w.dtype)


def subspace_alignment(old_weight: torch.Tensor, new_weight: torch.Tensor, rank: int) -> float:
    """‖U_kᵀ·U'_k‖²_F / k in [0, 1]: how much of the old layer's top-k output subspace the new layer keeps (1: the
    same subspace) — ProLoRA's test of which layers are aligned enough to transfer into."""
    u = torch.linalg.svd(old_weight.double(), full_matrices=False)[0]
    u_new = torch.linalg.svd(new_weight.double(), full_matrices=False)[0]
    k = min(rank, u.shape[1])
    return float((u[:, :k].T @ u_new[:, :k]).pow(2).sum() / k)


def is_projectable(name: str, value: torch.Tensor) -> bool:
    """A linear layer's weight (2-D, not an embedding table): what the SVD methods apply to; every other entry of
    Δ (biases, LayerNorms, embeddings, the head) passes through them unchanged."""
    return value.dim() == 2 and value.is_floating_point() and "embeddings" not in name and name.endswith(".weight")


def per_linear_layer(delta: StateDict, project: Callable[[str, torch.Tensor], torch.Tensor],
                     heads: Iterable[str] = ("classifier.",)) -> dict[str, torch.Tensor]:
    """`project(name, ΔW)` on every linear weight of Δ's backbone; the rest, the head included, as it is."""
    heads = tuple(heads)
    return {k: project(k, v) if is_projectable(k, v) and not k.startswith(heads) else v.clone()
            for k, v in delta.items()}


def relative_change(before: StateDict, after: StateDict) -> float:
    """‖after − before‖ / ‖before‖ over the floating entries: how much a method moved Δ (0: not at all)."""
    num = sum(float((after[k].double() - v.double()).pow(2).sum()) for k, v in before.items() if v.is_floating_point())
    den = sum(float(v.double().pow(2).sum()) for v in before.values() if v.is_floating_point())
    return math.sqrt(num / den) if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class TransferInputs:
    """What a method may use, all on one set of names (a LoRA model's merged, `merge_lora`): `delta` = Δ_i, the tuned
    model's update against its own start (the entries tuning changed, the head and whatever else is carried aside);
    `old_start` / `new_start` the start weights on M_i / M_j (the PLM, the seeded module, for the SVD methods'
    backbone weights); `history` Δ_0 … Δ_{i-1} of the same task, type and seed (multi-version); `seed` for DARE."""

    delta: StateDict
    old_start: StateDict
    new_start: StateDict
    history: tuple[StateDict, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class TransferMethod:
    """One registered method: `fn(inputs, **setting)` gives the delta to add to M_j's start (what it needs beyond
    one Δ: config.TRANSFER_NEEDS)."""

    fn: Callable[..., dict[str, torch.Tensor]]


def _svd(inputs: TransferInputs, rank: int) -> dict[str, torch.Tensor]:
    return per_linear_layer(inputs.delta, lambda name, d: svd_project(d, inputs.new_start[name], rank), heads=())


def _subspace(inputs: TransferInputs, rank: int, null_space: bool) -> dict[str, torch.Tensor]:
    return per_linear_layer(inputs.delta, lambda name, d: subspace_transfer(
        d, inputs.old_start[name], inputs.new_start[name], rank, null_space), heads=())


METHODS: dict[str, TransferMethod] = {
    "copy": TransferMethod(lambda x: scaled(x.delta, 1.0)),
    "scaled": TransferMethod(lambda x, scale: scaled(x.delta, scale)),
    "dare": TransferMethod(lambda x, drop: dare(x.delta, drop, x.seed)),
    "ties": TransferMethod(lambda x, density: ties([x.delta], density)),
    "svd": TransferMethod(_svd),
    "subspace": TransferMethod(_subspace),
    "multi_version": TransferMethod(lambda x, density: multi_version([*x.history, x.delta], density)),
}


if set(METHODS) != set(TRANSFER_METHODS):  # a registered method without its config axes, or the reverse
    raise RuntimeError(f"transfer methods registered {sorted(METHODS)} != configured {sorted(TRANSFER_METHODS)}")
