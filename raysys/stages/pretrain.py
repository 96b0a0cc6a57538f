"""Stage `pretrain`: (continual) masked-LM pre-training of every PLM of the main and control chains.

One Ray Train job walks the links that are not done, in chain order (a link's parent is done, or comes earlier in
the same job), each on `pretrain.num_workers` DDP workers; rank 0 saves each PLM before any worker starts the next.
"""

from __future__ import annotations

import json

from raysys.config import StudyConfig
from raysys.identity import config_hash, data_spec, world_if_builtin
from raysys.stages.base import Artifact, Context, Resources, Rows, Stage, View
from raysys.stages.chain import ChainPlan, Link, chain_config, replay_sources
from raysys.storage import results


class PretrainStage(Stage):
    name = "pretrain"
    tables = ("pretrain_runs", "pretrain_curves")
    cell_types = (Link,)
    launcher = "chain"

    def plan(self, study: StudyConfig, chain: ChainPlan) -> list[Link]:
        return list(chain.links)

    def outputs(self, link: Link):
        return Rows("pretrain_runs", link.plm_hash), Artifact("plm", link.plm_hash)

    def groups(self, links: list[Link]) -> list[list[Link]]:
        """One job walks them all, in chain order: a worker process trains link after link (Ray Train's start-up
        is paid once), each continual link's dropout streams going on from where its parent's left them."""
        return [links] if links else []

    def resources(self, study: StudyConfig) -> Resources:
        p = study.pretrain
        return Resources(cpus=p.cpus_per_worker, gpus=1.0 if p.use_gpu else 0.0, workers=p.num_workers,
                         worker_resource=p.worker_resource, settings="pretrain.num_workers, "
                         "pretrain.cpus_per_worker, pretrain.use_gpu" + (", pretrain.worker_resource"
                                                                        if p.worker_resource else ""))

    def train_tokens(self, study: StudyConfig, link: Link) -> int:
        return _steps(study, link)[0] * study.pretrain.batch_size * study.pretrain.sequence_length

    def failure_columns(self, study: StudyConfig, link: Link, table: str) -> dict:
        return {"chain": link.chain, "link": link.index, "domain": link.domain,
                "num_workers": study.pretrain.num_workers}

    def prepare(self, ctx: Context, links: list[Link]) -> None:
        """The chain's tokenizer, then each link's packed corpus (tokenized once for every worker and rerun)."""
        ensure_tokenizer(ctx)
        for link in links:
            if not self.done(link, View(ctx.store, scan=False)) and _steps(ctx.study, link)[0] > 0:
                for index in [link.index, *replay_sources(ctx.study, link.index)]:
                    ensure_packed(ctx, index)

    def run_group(self, ctx: Context, links: list[Link]) -> int:
        """Every worker runs this with the same links; returns how many are done."""
        from raysys.storage import artifacts

        workers = ctx.workers
        if workers.rank == 0:
            self.prepare(ctx, links)  # done by the trial before the job; here for a job started on its own
        workers.barrier()
        tokenizer = artifacts.load_tokenizer(ctx.store, ctx.chain.tokenizer_hash)
        done = 0
        for link in links:
            if self.done(link, View(ctx.store, scan=False)):  # a restarted job keeps the links it finished
                done += 1
                continue
            last = train_link(ctx, link, tokenizer)
            workers.barrier()
            workers.report({"chain": link.chain, "link": link.index, "step": last.get("step", 0),
                            "loss": last.get("loss"), "tokens_per_second": last.get("tokens_per_second")})
            done += 1
        return done


def _steps(study: StudyConfig, link: Link) -> tuple[int, float]:
    """(steps, peak lr) of a link: M0 trains `initial_steps` (from scratch, or further from its checkpoint; 0
    keeps the checkpoint as it is), each later link `continual_steps`."""
    p = study.pretrain
    return (p.initial_steps, p.lr) if link.index == 0 else (p.continual_steps, p.continual_lr)


def _training_sequences(ctx: Context, link: Link):
    """The link's packed corpus, mixed with replayed sequences of the earlier ones under `pretrain.replay`."""
    from raysys.core import packing

    def packed(index: int):
        return packing.PackedCorpus(ctx.store.artifact("corpus", packed_key(ctx.study, ctx.chain.tokenizer_hash,
                                                                            index)))
    own, earlier = packed(link.index), [packed(i) for i in replay_sources(ctx.study, link.index)]
    return packing.ReplayMix(own, earlier, ctx.study.pretrain.replay, link.seed * 1009 + link.index) if earlier \
        else own


def link_config(study: StudyConfig, link: Link):
    return chain_config(study, link.seed)


def ensure_tokenizer(ctx: Context) -> None:
    """Train (from scratch, streaming D0) or fetch (a pretrained M0) the one tokenizer of the chain, once."""
    from raysys.core import data, models

    study, store = ctx.study, ctx.store
    if store.has_artifact("tokenizer", ctx.chain.tokenizer_hash):
        return
    with store.writing_artifact("tokenizer", ctx.chain.tokenizer_hash) as tmp:
        if study.model.name_or_path:
            tokenizer = models.load_tokenizer(study.model.name_or_path)
        else:
            texts = data.corpus_documents(study.corpora[0], study.world)
            tokenizer = models.train_tokenizer(texts, study.model.vocab_size)
        tokenizer.save_pretrained(str(tmp))


def packed_key(study: StudyConfig, tokenizer_hash: str, index: int) -> str:
    """A packed corpus is its data, the tokenizer and the sequence length."""
    corpus = study.corpora[index]
    return config_hash("packed", data_spec(corpus), world_if_builtin(study, corpus.source), tokenizer_hash,
                       study.pretrain.sequence_length)


def ensure_packed(ctx: Context, index: int) -> str:
    """Tokenize and pack corpus `index` into the store, once; returns its key."""
    from raysys.core import data, packing
    from raysys.storage import artifacts

    study, store = ctx.study, ctx.store
    key = packed_key(study, ctx.chain.tokenizer_hash, index)
    if not store.has_artifact("corpus", key):
        tokenizer = artifacts.load_tokenizer(store, ctx.chain.tokenizer_hash)
        with store.writing_artifact("corpus", key) as tmp:
            meta = packing.write_packed(data.corpus_documents(study.corpora[index], study.world), tokenizer,
                                        study.pretrain.sequence_length, tmp)
            if not meta["sequences"]:
                raise data.DataError(f"corpus {study.corpora[index].name}: no documents")
    return key


def _initial_model(ctx: Context, link: Link, tokenizer):
    """(model, how it starts: the `init` column of pretrain_runs). A pretrained M0 whose checkpoint has no MLM head
    (a bare encoder) gets a fresh one drawn from the chain's seed, said in the log and in `init`."""
    from raysys.core import models
    from raysys.storage import artifacts

    if link.parent:
        return artifacts.load_plm(ctx.store, link.parent), "continual"
    if not link.checkpoint:
        return models.new_masked_lm(ctx.study.model, tokenizer, link.seed), f"scratch:seed={link.seed}"
    model, fresh = models.masked_lm_from_checkpoint(link.checkpoint, seed=link.seed)
    if not fresh:
        return model, f"pretrained:{link.checkpoint}"
    modules = sorted({key.rsplit(".", 1)[0] for key in fresh})
    if ctx.workers.rank == 0:
        print(f"[pretrain] {link.chain}[0] from {link.checkpoint}: {len(fresh)} weights the checkpoint lacks "
              f"(its MLM head: {', '.join(modules)}) drawn from seed {link.seed}", flush=True)
    return model, f"pretrained:{link.checkpoint}+fresh:{','.join(modules)}:seed={link.seed}"


def train_link(ctx: Context, link: Link, tokenizer) -> dict:
    """Train one PLM on this worker; rank 0 saves it and its rows. Returns the curve's last row."""
    from raysys.core import masked_lm_loop

    study, workers = ctx.study, ctx.workers
    started = results.now()
    if link.parent:
        _continue_streams(ctx, link)
    model, init = _initial_model(ctx, link, tokenizer)
    model.to(ctx.device)
    steps, lr = _steps(study, link)
    # a link kept as it is (0 steps) reads no corpus; the others read their own packed corpus (and, replaying, the
    # earlier ones), packed by `prepare` before any worker starts
    sequences = _training_sequences(ctx, link) if steps else []
    checkpointer = ctx.checkpointer(link.plm_hash, study.pretrain.checkpoint_every_seconds)
    curve = masked_lm_loop.train_masked_lm(model, sequences, tokenizer, link_config(study, link),
                                           masked_lm_loop.LinkPlan(steps, lr), workers.rank, workers.world_size,
                                           ctx.device, wrap=workers.wrap, checkpointer=checkpointer)
    streams = masked_lm_loop.gather_dropout_streams(ctx.device, workers.world_size)  # every rank, together
    if workers.rank == 0:
        resumed = checkpointer.resumed_from if checkpointer else None
        save_link(ctx, link, model.cpu(), tokenizer, curve, started, init, resumed, streams)
        if checkpointer:
            checkpointer.done()
    return curve[-1] if curve else {}


def _continue_streams(ctx: Context, link: Link) -> None:
    """Start a continual link's dropout streams where its parent's training left them (kept with the parent). In
    one uninterrupted job a link follows its parent, so this changes nothing there; a link trained by a later job
    (its parent made by one that was interrupted) draws the same as it would have in that one. A parent saved
    without them (before they were kept), or by another number of workers: fresh streams from the chain's seed,
    the rank and the link."""
    from raysys.core import masked_lm_loop
    from raysys.storage import artifacts

    workers = ctx.workers
    masked_lm_loop.continue_dropout_streams(artifacts.plm_streams(ctx.store, link.parent), workers.rank,
                                            workers.world_size, link.seed, link.index, ctx.device)


def save_link(ctx: Context, link: Link, model, tokenizer, curve: list[dict], started, init: str,
              resumed_from_step: int | None = None, streams: list[dict] | None = None) -> None:
    """The PLM artifact (safetensors + tokenizer, and the random streams its training ended with, per rank), then
    its curve and run rows (`init`: how the link started; `resumed_from_step`: the mid-run checkpoint an
    interrupted link continued from)."""
    from raysys.config import to_dict
    from raysys.core import models
    from raysys.storage import artifacts

    study, store = ctx.study, ctx.store
    artifacts.save_plm(store, link.plm_hash, model, tokenizer,
                       {"chain": link.chain, "link": link.index, "config": to_dict(study)}, streams)
    common = {"chain": link.chain, "link": link.index, "domain": link.domain}
    results.write_rows(store, "pretrain_curves", link.plm_hash, [{**common, **row} for row in curve])
    last = curve[-1] if curve else {}
    results.write_rows(store, "pretrain_runs", link.plm_hash, [{
        **results.provenance(started), **common, "parent_hash": link.parent, "init": init,
        "steps": last.get("step", 0), "lr": _steps(study, link)[1], "num_workers": ctx.workers.world_size,
        "num_parameters": models.count_parameters(model), "final_loss": last.get("loss"),
        "tokens": last.get("tokens", 0), "tokens_per_second": last.get("tokens_per_second"),
        "config": json.dumps(to_dict(link_config(study, link))), "resumed_from_step": resumed_from_step,
    }])


STAGE = PretrainStage()
