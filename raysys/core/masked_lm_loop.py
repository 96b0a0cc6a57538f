"""Masked-LM (continual) pre-training: the loop that trains one PLM of a chain M0 -> M1 -> ... -> Mk.

The loop knows nothing of Ray: distribution comes in as (rank, world size, device, `wrap` — DDP's prepare_model —
and a checkpointer), so the same code runs in one process, under torch.distributed, and in Ray Train workers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raysys.config import PretrainConfig
from raysys.core import architectures, compute, data, models

REPORT_EVERY_SECONDS = 30.0  # metrics to Ray Train and the dashboard: often enough to watch, rarely enough to be quiet


class MaskedLMObjective(torch.nn.Module):
    """MLM loss with vocabulary logits computed only at the masked positions: at small model sizes the output
    projection over every position is most of the cost (2.4-3.2x faster steps measured on 1.5M-7.5M parameter
    models, 128-token batches). The head is the architecture's (raysys.core.architectures). A module, so that DDP's
    forward hooks see the whole computation."""

    def __init__(self, masked_lm):
        super().__init__()
        self.masked_lm = masked_lm
        self.mlm_logits = architectures.of(masked_lm).mlm_logits

    def forward(self, input_ids, attention_mask, labels, reduction: str = "mean"):
        hidden = self.masked_lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = labels != -100  # (batch, seq)
        logits = self.mlm_logits(self.masked_lm, hidden[selected])  # (num_masked, vocab)
        return F.cross_entropy(logits.float(), labels[selected], reduction=reduction)


@dataclass(frozen=True)
class LinkPlan:
    """One link of the chain: train `steps` steps at peak `lr` on `sequences` (token-id lists, already packed)."""

    steps: int
    lr: float


@functools.lru_cache(maxsize=2)
def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of an epoch, computed once per epoch (not per step: at millions of sequences a
    permutation costs more than a step's sampling)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def sample_batch(sequences, step: int, batch_per_worker: int, rank: int, world_size: int,
                 seed: int) -> list[list[int]]:
    """Deterministic sharded sampling: every worker walks the same seeded epoch permutation, each taking its own
    slice, so workers never see the same sequence in a step and reruns see the same data. `sequences` is any
    indexable collection of token-id lists (a list, or a memory-mapped `packing.PackedCorpus`, from which a
    worker reads only the sequences it takes)."""
    per_step = batch_per_worker * world_size
    epoch_len = max(1, len(sequences) // per_step)
    epoch, offset = divmod(step, epoch_len)
    perm = epoch_order(len(sequences), seed, epoch)
    start = offset * per_step + rank * batch_per_worker
    return [sequences[int(perm[(start + i) % len(perm)])] for i in range(batch_per_worker)]


def _micro_batches(cfg: PretrainConfig, batch_per_worker: int) -> int:
    micro = cfg.micro_batch_size or batch_per_worker
    if batch_per_worker % micro:
        raise ValueError(f"pretrain.micro_batch_size={micro} does not divide the per-worker batch {batch_per_worker}")
    return batch_per_worker // micro


def _global_count(count: int, world_size: int, device) -> float:
    """The masked tokens of the whole step across workers: every one of them weighs the same in the loss."""
    if world_size == 1:
        return float(count)
    total = torch.tensor([float(count)], device=device)
    torch.distributed.all_reduce(total)
    return float(total.item())


def accumulate_gradients(objective, corrupted, attention_mask, labels, micro_batches: int, world_size: int,
                         precision: str, device) -> float:
    """Forward and backward one worker's batch in `micro_batches` slices, gradients accumulating; DDP synchronises
    only on the last slice. The loss is the mean over the masked tokens of the whole step (all slices, all
    workers), as if the global batch had run at once; DDP averages gradients over workers, hence `world_size`.
    Returns this worker's share of that mean (the shares sum to it over workers)."""
    total = max(1.0, _global_count(int((labels != -100).sum()), world_size, device))
    no_sync = getattr(objective, "no_sync", None)
    share = 0.0
    slices = zip(corrupted.chunk(micro_batches), attention_mask.chunk(micro_batches), labels.chunk(micro_batches))
    for k, (ids, mask, y) in enumerate(slices):
        with contextlib.nullcontext() if k == micro_batches - 1 or no_sync is None else no_sync():
            with compute.autocast(device, precision):
                loss_sum = objective(ids.to(device), mask.to(device), y.to(device), reduction="sum")
            (loss_sum * (world_size / total)).backward()
        share += loss_sum.item() / total
    return share


def train_masked_lm(
    model,
    sequences: list[list[int]],
    tokenizer,
    cfg: PretrainConfig,
    plan: LinkPlan,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    wrap=lambda m: m,
    checkpointer=None,
) -> list[dict]:
    """Train `model` (a masked LM of raysys.core.architectures) in place; returns the loss curve: one row per
    `log_every_steps` (mean loss over the interval's masked tokens, across workers when distributed).

    Each step takes `batch_size` sequences across workers, each worker running its share in micro-batches of
    `micro_batch_size` (gradient accumulation), under bf16 autocast with `precision = "bf16"`.

    With a `checkpointer` (raysys.checkpoint.Checkpointer, one per worker over the same shared folder) a logging
    step is reported to it every REPORT_EVERY_SECONDS and at the end, and the full state is saved by rank 0 at a
    logging step when it is due (rank 0 decides both, every worker learns it through the loss all-reduce) and
    resumed from exactly: weights, optimizer, schedule, step, curve and every rank's random streams (gathered to
    rank 0 for the save), so that on CPU a resumed link ends bit for bit where an uninterrupted one does. Resumed
    on another number of workers, each rank draws fresh streams from (seed, rank, step): the data split differs
    then anyway."""
    if cfg.batch_size % world_size:
        raise ValueError(f"pretrain.batch_size={cfg.batch_size} is not divisible by {world_size} workers")
    batch_per_worker = cfg.batch_size // world_size
    micro_batches = _micro_batches(cfg, batch_per_worker)
    resumed = checkpointer.resume() if checkpointer else None
    if resumed:
        model.load_state_dict(resumed["model"])
    objective = wrap(MaskedLMObjective(model))
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = compute.adamw(params, plan.lr, cfg.weight_decay, device)
    warmup = int(cfg.warmup_fraction * plan.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: compute.linear_schedule(s, plan.steps, warmup))
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    regular = models.regular_token_ids(tokenizer)
    special = set(tokenizer.all_special_ids)
    curve, window_loss, window_tokens, tokens_seen, first_step, elapsed_before = [], 0.0, 0, 0, 0, 0.0
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        curve, tokens_seen, first_step = resumed["curve"], resumed["tokens"], resumed["step"]
        elapsed_before = resumed["seconds"]
        _restore_streams(resumed, generator, rank, world_size, cfg.seed, first_step, device)
    start = time.time() - elapsed_before
    last_report = 0.0

    def state(step: int, streams: list[dict]) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ranks": streams, "curve": curve, "tokens": tokens_seen, "seconds": time.time() - start}

    objective.train()
    for step in range(first_step, plan.steps):
        batch = sample_batch(sequences, step, batch_per_worker, rank, world_size, cfg.seed)
        input_ids, attention_mask = data.pad_batch(batch, tokenizer.pad_token_id)
        special_mask = sum((input_ids == s) for s in special).bool()
        corrupted, labels = data.mask_tokens(input_ids, special_mask, tokenizer.mask_token_id, regular,
                                             cfg.mask_prob, generator)
        optimizer.zero_grad(set_to_none=True)
        window_loss += accumulate_gradients(objective, corrupted, attention_mask, labels, micro_batches, world_size,
                                            cfg.precision, device)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        window_tokens += int(attention_mask.sum())
        if (step + 1) % cfg.log_every_steps == 0 or step + 1 == plan.steps:
            steps_in_window = (step % cfg.log_every_steps) + 1
            last = step + 1 == plan.steps
            due = checkpointer is not None and rank == 0 and not last and checkpointer.due()
            report = rank == 0 and (last or time.time() - last_report >= REPORT_EVERY_SECONDS)
            stats = torch.tensor([window_loss / steps_in_window, float(window_tokens), float(due), float(report)])
            if world_size > 1:  # loss shares sum to the step's mean; on the device, as NCCL needs
                stats = stats.to(device)
                torch.distributed.all_reduce(stats)
            tokens_seen += int(stats[1])
            elapsed = time.time() - start
            curve.append({"step": step + 1, "loss": float(stats[0]), "lr": scheduler.get_last_lr()[0],
                          "tokens": tokens_seen, "seconds": elapsed, "tokens_per_second": tokens_seen / elapsed})
            window_loss, window_tokens = 0.0, 0
            if checkpointer is None or not (stats[2] > 0 or stats[3] > 0):
                continue
            # all ranks report together (Ray Train expects every worker to); rank 0 writes the checkpoint when due
            last_report = time.time()
            if stats[2] > 0:
                streams = _gather_streams(generator, device, world_size)
                if rank == 0:
                    checkpointer.save(step + 1, state(step + 1, streams), curve[-1])
                    continue
            checkpointer.report(curve[-1])
    if not all(math.isfinite(row["loss"]) for row in curve):
        raise FloatingPointError("masked-LM loss became non-finite")
    return curve


def _streams(generator: torch.Generator, device) -> dict:
    """One rank's random streams: its masking generator and the global ones dropout draws from."""
    return {"mask_generator": generator.get_state(), **compute.random_state(device)}


def _gather_streams(generator: torch.Generator, device, world_size: int) -> list[dict]:
    """Every rank's streams, in rank order (a collective: all ranks call it together)."""
    return _all_ranks(_streams(generator, device), world_size)


def gather_dropout_streams(device, world_size: int) -> list[dict]:
    """Every rank's global streams (what dropout draws from), in rank order, where a link's training left them:
    kept with the PLM, they are where its child link's training starts (a collective, as `_gather_streams`)."""
    return _all_ranks(compute.random_state(device), world_size)


def _all_ranks(mine: dict, world_size: int) -> list[dict]:
    if world_size == 1:
        return [mine]
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def _restore_streams(resumed: dict, generator: torch.Generator, rank: int, world_size: int, seed: int,
                     step: int, device) -> None:
    saved = resumed.get("ranks") or []
    if len(saved) == world_size:
        generator.set_state(saved[rank]["mask_generator"])
        compute.restore_random_state(saved[rank], device)
    else:  # another number of workers: fresh streams, the same for every resume at this step
        generator.manual_seed(_fresh_seed(seed, rank, step))
        torch.manual_seed(_fresh_seed(seed, rank, step))


def _fresh_seed(seed: int, rank: int, position: int) -> int:
    """The seed of fresh streams for one rank of a chain at `position` (a step, or a link) when no saved ones fit:
    within torch's 64-bit seed range for every seed below SEED_LIMIT."""
    return (seed * 7919 + rank) * 1000003 + position


def continue_dropout_streams(saved: list[dict] | None, rank: int, world_size: int, seed: int, position: int,
                             device) -> None:
    """Restore this rank's global streams from `saved` (`gather_dropout_streams` of the run before); fresh ones
    from (seed, rank, position) when there are none or they come from another number of workers."""
    if saved is not None and len(saved) == world_size:
        compute.restore_random_state(saved[rank], device)
    else:
        torch.manual_seed(_fresh_seed(seed, rank, position))


@torch.no_grad()
def masked_lm_loss(model, sequences: list[list[int]], tokenizer, mask_prob: float, seed: int = 0,
                   batch_size: int = 64) -> float:
    """Held-out MLM loss with a fixed masking (seeded), for comparing models on the same corpus."""
    objective = MaskedLMObjective(model).eval()
    generator = torch.Generator().manual_seed(seed)
    regular = models.regular_token_ids(tokenizer)
    special = set(tokenizer.all_special_ids)
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        input_ids, attention_mask = data.pad_batch(sequences[i : i + batch_size], tokenizer.pad_token_id)
        special_mask = sum((input_ids == s) for s in special).bool()
        corrupted, labels = data.mask_tokens(input_ids, special_mask, tokenizer.mask_token_id, regular, mask_prob,
                                             generator)
        n = int((labels != -100).sum())
        if n:
            total += objective(corrupted, attention_mask, labels).item() * n
            count += n
    return total / max(1, count)


def pack_corpus(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return data.pack_sequences(token_lists, max_length, architectures.start_token_id(tokenizer),
                               architectures.end_token_id(tokenizer))
