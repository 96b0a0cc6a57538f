"""The `recycle` stage's run code (torch): the probe on a seeded dev subset, the rule that picks one (method,
setting) per cell, and the chosen weights made for M_j, scored and stored for every seed. See
raysys.stages.recycle for what a cell is."""

from __future__ import annotations

import json
import random
import statistics

import torch

from raysys.core.classifier_loop import evaluate
from raysys.stages.base import Context, cell_columns
from raysys.stages.recipe import encoded_task
from raysys.stages.recycle import RecycleCell, recycled_hash
from raysys.stages.transfer import TransferCell
from raysys.stages.transfer_run import PairWeights
from raysys.storage import artifacts, results


def probe_subset(examples: int, size: int, seed: int) -> list[int]:
    """The dev examples every cell of a task probes on: `size` of them drawn with `seed` (all when there are fewer),
    in dev order."""
    if size >= examples:
        return list(range(examples))
    return sorted(random.Random(seed).sample(range(examples), size))


def choose(scores: list[tuple[float, float]]) -> int:
    """The rule: the candidate with the highest mean probe accuracy, then the lowest mean probe loss, then the
    first in order (`recycle.methods`, then each method's grid)."""
    return max(range(len(scores)), key=lambda n: (scores[n][0], -scores[n][1], -n))


def _pair(cell: RecycleCell, seed: int, method: str) -> TransferCell:
    """One seed's Δ_i on M_j as the transfer code sees a pair (no history: a probe is of one Δ)."""
    source = cell.source_tuned_hashes[cell.seeds.index(seed)]
    return TransferCell("", cell.task, cell.tuning_type, seed, cell.source_plm_index, cell.target_plm_index, source,
                        cell.source_plm_hash, cell.target_plm_hash, method, ())


def run_recycle_cell(ctx: Context, cell: RecycleCell) -> None:
    study, started = ctx.study, results.now()
    data = encoded_task(ctx, cell.task)
    ids, labels = data.encoded["dev"]
    picked = probe_subset(len(ids), study.recycle.probe_examples, study.recycle.probe_seed)
    probe = ([ids[i] for i in picked], labels[picked])
    batch = study.pilot.eval_batch_size
    candidates = [(m, s) for m in study.recycle.methods for s in study.transfer.grid(m)]
    probed: dict[int, list[tuple[float, float] | None]] = {}
    for seed in cell.seeds:  # one seed's weights in memory at a time
        weights = PairWeights(ctx, _pair(cell, seed, candidates[0][0]))
        probed[seed] = []
        for method, setting in candidates:
            pair = _pair(cell, seed, method)
            if weights.not_applicable(pair):
                probed[seed].append(None)
                continue
            model = weights.transferred(pair, setting).to(ctx.device)
            probed[seed].append(evaluate(model, *probe, batch, data.pad_id, ctx.device))
    usable = [n for n in range(len(candidates)) if all(probed[s][n] is not None for s in cell.seeds)]
    if not usable:
        raise ValueError(f"recycle: none of {list(study.recycle.methods)} applies to {cell.tuning_type}")
    means = [tuple(statistics.mean(probed[s][n][k] for s in cell.seeds) for k in (0, 1)) for n in usable]
    best = usable[choose(means)]
    chosen = {seed: _make(ctx, cell, seed, *candidates[best], data) for seed in cell.seeds}
    rows = []
    for n, (method, setting) in enumerate(candidates):
        for seed in cell.seeds:
            if probed[seed][n] is None:
                continue
            rows.append({**results.provenance(started), **cell_columns(cell, "recycle"), "seed": seed,
                         "source_tuned_hash": cell.source_tuned_hashes[cell.seeds.index(seed)], "method": method,
                         "setting": json.dumps(setting), "probe_examples": len(picked),
                         "probe_accuracy": probed[seed][n][0], "probe_loss": probed[seed][n][1],
                         "chosen": n == best, **(chosen[seed] if n == best else {})})
    results.write_rows(ctx.store, "recycle", cell.cell_hash, rows)


def _make(ctx: Context, cell: RecycleCell, seed: int, method: str, setting: dict, data) -> dict:
    """The chosen weights of one seed: scored on the full dev and test sets and stored; its row's columns."""
    pair = _pair(cell, seed, method)
    weights = PairWeights(ctx, pair)
    model = weights.transferred(pair, setting).to(ctx.device)
    out = {}
    for split in ("dev", "test"):
        out[f"{split}_accuracy"], out[f"{split}_loss"] = evaluate(model, *data.encoded[split],
                                                                  ctx.study.pilot.eval_batch_size, data.pad_id,
                                                                  ctx.device)
    start = weights.start_state()
    changed = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
               if k in start and not torch.equal(v.cpu(), start[k].cpu())}
    meta = {**weights.meta, "plm_hash": cell.target_plm_hash, "recycled_from": pair.source_tuned_hash,
            "method": method, "setting": setting, "recycle_cell": cell.cell_hash}
    key = recycled_hash(cell, seed)
    artifacts.save_recycled(ctx.store, key, changed, meta)
    return {**out, "recycled_hash": key}
