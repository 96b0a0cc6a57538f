"""Analyses of the pilot studies, as pure functions: loss barriers and accuracy drops along an interpolation path,
and the functional similarity of attention heads between two models on the same inputs."""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def _path(alphas: list[float], values: list[float]) -> list[tuple[float, float]]:
    if len(alphas) != len(values) or not alphas:
        raise ValueError(f"a path needs one value per alpha, got {len(alphas)} alphas and {len(values)} values")
    pairs = sorted(zip(alphas, values))
    if pairs[0][0] != 0.0 or pairs[-1][0] != 1.0:
        raise ValueError("a path must include both ends, alpha = 0 and alpha = 1")
    return pairs


def loss_barrier(alphas: list[float], losses: list[float]) -> float:
    """max_α [L(θ(α)) − ((1 − α)·L(θ_A) + α·L(θ_B))]: how far the loss rises above the straight line between the
    ends (0 when the path is linear or convex, since the ends themselves are on the line)."""
    pairs = _path(alphas, losses)
    (_, start), (_, end) = pairs[0], pairs[-1]
    return max(loss - ((1 - a) * start + a * end) for a, loss in pairs)


def accuracy_drop(alphas: list[float], accuracies: list[float]) -> float:
    """max_α [((1 − α)·acc_A + α·acc_B) − acc(α)]: the largest dip of accuracy below the straight line."""
    pairs = _path(alphas, accuracies)
    (_, start), (_, end) = pairs[0], pairs[-1]
    return max((1 - a) * start + a * end - acc for a, acc in pairs)


@torch.no_grad()
def attention_maps(model, batches) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Attention probabilities of every layer on the given (input_ids, attention_mask) batches: a list over layers
    of (examples, heads, positions, positions) tensors, and the (examples, positions) mask. Eager attention is
    switched on because fused kernels (SDPA) do not return the probabilities (and return none, silently)."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    was_training = model.training
    model.eval()
    layers, masks = None, []
    width = max(ids.shape[1] for ids, _ in batches)
    device = next(model.parameters()).device
    for input_ids, mask in batches:
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_attentions=True)
        if not out.attentions:  # every architecture of raysys.core.architectures returns them under eager attention
            raise ValueError(f"architecture '{model.config.model_type}' returned no attention probabilities (attention "
                             f"'{model.config._attn_implementation}'): the head similarity cannot be measured")
        pad = width - input_ids.shape[1]
        maps = [torch.nn.functional.pad(a.float().cpu(), (0, pad, 0, pad)) for a in out.attentions]
        layers = [[m] for m in maps] if layers is None else [acc + [m] for acc, m in zip(layers, maps)]
        masks.append(torch.nn.functional.pad(mask, (0, pad)))
    model.train(was_training)
    return [torch.cat(parts) for parts in layers], torch.cat(masks).bool()


def _js(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen–Shannon divergence (nats) between distributions along the last dimension."""
    m = 0.5 * (p + q)
    kl = lambda x: (x * (torch.log(x + eps) - torch.log(m + eps))).sum(-1)
    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0.0)


def head_divergence(maps_a: torch.Tensor, maps_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For one layer, the (heads_a, heads_b) matrix of mean Jensen–Shannon divergence between the attention rows of
    head h in model A and head g in model B, over the real (non-padding) query positions of the same inputs.
    The diagonal compares corresponding heads; off-diagonal entries are the non-corresponding baseline."""
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}")
    heads = maps_a.shape[1]
    weight = mask.float().unsqueeze(1)  # (examples, 1, queries)
    out = torch.empty(heads, heads)
    for g in range(heads):
        js = _js(maps_a, maps_b[:, g:g + 1])  # (examples, heads_a, queries)
        out[:, g] = (js * weight).sum((0, 2)) / (weight.sum() * 1.0)
    return out


def similarity(divergence: torch.Tensor) -> torch.Tensor:
    """1 − JS / ln 2: 1 for identical attention, 0 for attention on disjoint positions."""
    return 1.0 - divergence / LN2
