"""The sweep: plan a study's cells, skip the finished ones, and run each stage as one Ray Tune experiment.

Ray stays at this edge: trainables rebuild the typed config and call the plain functions of `raysys.stages`.
Resume rests on the content-addressed store, not on Tune's experiment state (shared/notes/ray.md: Tune's restore
recomputes finished trials): each run's grid is built from the cells whose rows are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from ray import tune

from raysys import compute, data, methods, monitor, pretrain, report, results, stages
from raysys.checkpoint import Checkpointer
from raysys.config import ConfigError, StudyConfig, available_presets, build, config_hash, load_study, to_dict
from raysys.recycle import WeightMismatchError
from raysys.store import Store

STUDY_FILE = "study.json"
AUTO = "auto"  # --preset auto
STAGES = ("pretrain", "tuning", "compatibility", "interpolation", "similarity", "methods", "training_free")


# ------------------------------------------------------------------------------------------ Ray Train: the chain


def chain_train_worker(config: dict) -> None:
    """Ray Train worker: walk the missing links (main chain, then control chain) in order; rank 0 saves each PLM
    before any worker starts the next link."""
    study, store = build(StudyConfig, config["study"]), Store(config["storage"])
    chain = stages.plan_chain(study)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    compute.allow_tf32(device)
    tokenizer = stages.ensure_tokenizer(study, store, chain)
    for plm_hash in config["links"]:
        link = chain.link(plm_hash)
        started = results.now()
        model = stages.link_initial_model(study, store, link, tokenizer).to(device)
        texts = data.load_corpus(study.corpora[link.index], study.world)
        sequences = pretrain.pack_corpus(texts, tokenizer, study.pretrain.sequence_length)
        checkpointer = _link_checkpointer(study, store, link, rank)
        curve = pretrain.train_masked_lm(model, sequences, tokenizer, stages.link_pretrain_config(study, link),
                                         stages.link_plan(study, link), rank, world_size, device,
                                         wrap=ray.train.torch.prepare_model, checkpointer=checkpointer)
        if rank == 0:
            stages.save_link(study, store, link, model.cpu(), tokenizer, curve, started, world_size)
            checkpointer.done()
        if world_size > 1:
            torch.distributed.barrier()
        last = curve[-1] if curve else {}
        ray.train.report({"chain": link.chain, "link": link.index, "step": last.get("step", 0),
                          "loss": last.get("loss"), "tokens_per_second": last.get("tokens_per_second")})


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _link_checkpointer(study: StudyConfig, store: Store, link, rank: int) -> Checkpointer:
    """Mid-link checkpoints in the store (which survives a new driver) and reported to Ray Train (which hands the
    newest back through `get_checkpoint` when it restarts the workers); rank 0 feeds the dashboard's metrics."""
    def metrics(m: dict) -> dict:
        if rank == 0:
            monitor.record_trial("pretrain", link.hash, m)
        return {**_numeric(m), "chain": link.chain, "link": link.index}

    return Checkpointer(
        store, study.pretrain.checkpoint_every_seconds, link.hash,
        on_save=lambda m, path: ray.train.report(metrics(m), checkpoint=ray.train.Checkpoint.from_directory(path)),
        on_report=lambda m: ray.train.report(metrics(m)),
        fallback=lambda: _local_copy(ray.train.get_checkpoint()))


def _local_copy(checkpoint) -> Path | None:
    """A Ray checkpoint as a local folder (downloaded if its storage is remote)."""
    return Path(checkpoint.to_directory()) if checkpoint else None


def _pretrain_trainable(config: dict, study_dict: dict, storage: str) -> None:
    study, store = build(StudyConfig, study_dict), Store(storage)
    chain = stages.plan_chain(study)
    links = config["group"]["links"]
    started = results.now()
    stages.ensure_tokenizer(study, store, chain)
    workers = study.pretrain.num_workers
    trainer = ray.train.torch.TorchTrainer(
        chain_train_worker,
        train_loop_config={"study": study_dict, "storage": storage, "links": links,
                           "threads": max(1, int(study.pretrain.cpus_per_worker))},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=study.pretrain.use_gpu,
                                               resources_per_worker={"CPU": study.pretrain.cpus_per_worker}),
        # A deterministic name, so that a restarted trial finds its Train run again.
        run_config=ray.train.RunConfig(name=f"pretrain-{config_hash(links)}",
                                       **store.ray_storage("train"),
                                       failure_config=ray.train.FailureConfig(max_failures=1),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    error = None
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 — recorded per link below
        error = f"{type(err).__name__}: {err}"
    failed = [chain.link(h) for h in links if not store.has_artifact("plm", h)]
    for link in failed:
        results.write_rows(store, "pretrain_runs", link.hash, [{
            **results.provenance(started, "failed", error or "link not produced"), "chain": link.chain,
            "link": link.index, "domain": study.corpora[link.index].name, "num_workers": workers}])
    tune.report({"cells_ok": len(links) - len(failed), "cells_failed": len(failed)})


# ---------------------------------------------------------------------------------------- Tune: per-cell stages


def cell_checkpointer(study: StudyConfig, store: Store, cell_hash: str, stage: str) -> Checkpointer:
    """Mid-run checkpoints of a training cell in the store (a new driver finds them) and reported to Tune with
    every evaluation (TensorBoard curves; `tune.get_checkpoint()` when Tune retries the trial) and to the
    dashboard's metrics."""

    def metrics(m: dict) -> dict:
        monitor.record_trial(stage, cell_hash, m)
        return {**_numeric(m), "cell_hash": cell_hash}

    return Checkpointer(
        store, study.tuning.checkpoint_every_seconds, cell_hash,
        on_save=lambda m, path: tune.report(metrics(m), checkpoint=tune.Checkpoint.from_directory(path)),
        on_report=lambda m: tune.report(metrics(m)), fallback=lambda: _local_copy(tune.get_checkpoint()))


def _run_group(config: dict, study_dict: dict, storage: str, table: str, runner, trains: bool = False) -> None:
    """Run a trial's cells, skipping those already done (a trial Tune retries after its process died keeps the
    cells it finished); a training cell (`trains`) gets a checkpointer."""
    study, store = build(StudyConfig, study_dict), Store(storage)
    chain = stages.plan_chain(study)
    torch.set_num_threads(max(1, int(study.tuning.cpus_per_trial)))
    cells = config["group"]["cells"]
    stage = table.removesuffix("_runs")

    def run(cell):
        if results.ok_cell(store, table, cell["cell_hash"]):
            return
        extra = {"checkpointer": cell_checkpointer(study, store, cell["cell_hash"], stage)} if trains else {}
        runner(study, store, chain, cell, **extra)

    ok = sum(stages.run_guarded(store, table, cell, lambda c=cell: run(c)) for cell in cells)
    tune.report({"cells_ok": ok, "cells_failed": len(cells) - ok})


def _tuning_trainable(config, study_dict, storage):
    _run_group(config, study_dict, storage, "tuning_runs", stages.run_tuning_cell, trains=True)


def _compatibility_trainable(config, study_dict, storage):
    runner = {"compatibility": stages.run_compatibility_cell, "baselines": stages.run_baseline_cell}
    _run_group(config, study_dict, storage, config["group"]["table"], runner[config["group"]["table"]])


def _similarity_trainable(config, study_dict, storage):
    _run_group(config, study_dict, storage, "head_similarity", stages.run_similarity_cell)


def _methods_trainable(config, study_dict, storage):
    _run_group(config, study_dict, storage, "methods_runs", methods.run_method_cell, trains=True)


def _training_free_trainable(config, study_dict, storage):
    _run_group(config, study_dict, storage, "training_free", methods.run_training_free_cell)


def _search_trainable(config, study_dict, storage, search):
    """One trial of an Optuna search: the method cell of the proposed knobs (already in the store when a resumed
    search proposes it again), reported as `best_dev_accuracy` for Optuna."""
    study, store = build(StudyConfig, study_dict), Store(storage)
    torch.set_num_threads(max(1, int(study.methods.cpus_per_trial)))
    cell = methods.search_trial_cell(search, config)
    if not results.ok_cell(store, "methods_search", cell["cell_hash"]):
        run = lambda: methods.run_method_cell(study, store, stages.plan_chain(study), cell)
        if not stages.run_guarded(store, "methods_search", cell, run):
            raise RuntimeError(results.read_cell(store, "methods_search", cell["cell_hash"])[0]["error"])
    row = results.ok_cell(store, "methods_search", cell["cell_hash"])
    tune.report({"best_dev_accuracy": row["best_dev_accuracy"], "test_accuracy": row["test_accuracy"],
                 "cells_ok": 1, "cells_failed": 0})


def _interpolation_trainable(config, study_dict, storage):
    study, store = build(StudyConfig, study_dict), Store(storage)
    torch.set_num_threads(max(1, int(study.pilot.cpus_per_trial)))
    pair, cells = config["group"]["pair"], config["group"]["cells"]
    ok = stages.run_interpolation_pair(study, store, stages.plan_chain(study), pair, cells)
    tune.report({"cells_ok": ok, "cells_failed": len(cells) - ok})


PROGRESS_FILE = "progress.json"


class Progress(tune.Callback):
    """Console progress of one stage (cells done / total, failed, running trials, elapsed, ETA), at most every
    `every` seconds, mirrored to `<storage>/progress.json` for `raysys status`. Done is counted from the store,
    so it is right whatever the unit of a trial (a link, a cell, a path)."""

    def __init__(self, stage: str, count_done, total: int, store: Store, log=print, every: float = 15.0):
        self.stage, self.count_done, self.total, self.log, self.every = stage, count_done, total, log, every
        self.store = store
        self.started = self.last = time.time()
        self.done_at_start = None
        self.failed = 0

    def __getstate__(self):
        # Tune pickles its callbacks into the experiment state; the console and the store reader stay behind
        # (this sweep resumes from the store, never from that state).
        return {**self.__dict__, "log": None, "count_done": None, "store": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.log = self.log or (lambda *_: None)
        self.count_done = self.count_done or (lambda: 0)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += len(trial.config.get("group", {}).get("cells", [])) or 1

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.failed += int((trial.last_result or {}).get("cells_failed", 0))

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last >= self.every:
            self.report(sum(t.status == "RUNNING" for t in trials))

    def on_experiment_end(self, trials, **info):
        self.report(0, final=True)

    def report(self, running: int, final: bool = False) -> dict:
        self.last = now = time.time()
        done = self.count_done()
        if self.done_at_start is None:
            self.done_at_start = done
        elapsed, new = now - self.started, done - self.done_at_start
        left = self.total - done
        eta = elapsed / new * left if new > 0 and left > 0 else None
        state = {"stage": self.stage, "done": done, "total": self.total, "failed": self.failed, "running": running,
                 "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
                 "pid": os.getpid(), "host": socket.gethostname(), "updated": now, "final": final}
        if self.store:
            self.store.write_bytes(PROGRESS_FILE, json.dumps(state).encode())
            monitor.record_stage(self.stage, self.total, done, self.failed, running)
        if not final:
            self.log(f"[{self.stage}] {done}/{self.total} done, {self.failed} failed, {running} running, "
                     f"{elapsed:.0f}s elapsed" + ("" if eta is None else f", ETA {eta:.0f}s"))
        return state


def run_experiment(name: str, trainable, groups: list[dict], resources: dict, study: StudyConfig, store: Store,
                   max_concurrent: int, progress: Progress | None = None, callbacks: tuple = ()) -> float:
    """One stage = one Tune experiment over the missing groups of cells (`grid_search` over them)."""
    started = time.time()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, study_dict=to_dict(study), storage=store.root),
                            resources),
        param_space={"group": tune.grid_search(groups)},
        # Actor reuse: a fresh process per tiny CPU cell costs more than the cell (shared/notes/speed.md).
        tune_config=tune.TuneConfig(max_concurrent_trials=max(1, max_concurrent),
                                    reuse_actors=not resources.get("gpu")),
        run_config=tune.RunConfig(name=f"{name}-{config_hash(groups)}", **store.ray_storage("tune"),
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=([progress] if progress else []) + list(callbacks)),
    )
    tuner.fit()
    return time.time() - started


def mlflow_uri(store: Store, uri: str | None = None) -> str:
    """Where `--tracker mlflow` logs: the given URI, else $MLFLOW_TRACKING_URI, else an SQLite file in the storage
    (MLflow 3's `./mlruns` file store refuses new writes unless MLFLOW_ALLOW_FILE_STORE is set)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.local / 'mlflow.db'}"


def tracking_callbacks(tracker: str | None, study: StudyConfig, store: Store, stage: str,
                       uri: str | None = None) -> tuple:
    """Experiment trackers beside Tune's own loggers (TensorBoard event files are always written per trial)."""
    if tracker is None:
        return ()
    if tracker != "mlflow":
        raise ValueError(f"--tracker: unknown '{tracker}'; known: mlflow")
    try:
        import mlflow  # noqa: F401 — fail here, with the fix, not inside Tune
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except ImportError as err:
        raise ValueError("--tracker mlflow needs MLflow: pip install 'raysys[mlflow]'") from err
    return (MLflowLoggerCallback(tracking_uri=mlflow_uri(store, uri), experiment_name=f"raysys-{study.name}",
                                 tags={"stage": stage, "storage": store.root}),)


def _search_space(study: StudyConfig, method: str) -> dict:
    return {k: tune.loguniform(lo, hi) if k == "lr" else tune.uniform(lo, hi)
            for k, (lo, hi) in methods.search_space_bounds(study, method).items()}


def _search_rows(store: Store) -> dict[str, list[dict]]:
    """The finished trials of every Optuna search, by search."""
    rows: dict[str, list[dict]] = {}
    for r in results.ok_rows(store, "methods_search"):
        rows.setdefault(r["search_hash"], []).append(r)
    return rows


def run_searches(study: StudyConfig, store: Store, chain, log=print, callbacks: tuple = ()) -> dict:
    """`--search optuna`: one Tune experiment per search (OptunaSearch cannot take a `grid_search` space, so the
    grid stays outside), seeded TPE, `trials` runs in all. A resumed search is told its finished trials
    (`points_to_evaluate` with `evaluated_rewards`) and runs only the rest."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searches = methods.plan_searches(study, chain)
    rows = _search_rows(store)
    budget = study.methods.search.trials
    counts = {"searches": len(searches), "trials_before": 0, "ran": 0, "blocked": 0}
    for search in searches:
        done = sorted(rows.get(search["search_hash"], []), key=lambda r: r["started_at"])[:budget]
        counts["trials_before"] += len(done)
        if len(done) >= budget:
            continue
        if not (store.has_artifact("plm", search["target_plm_hash"]) and store.has_artifact(
                "tuned", search["old_tuned_hash"]) and results.ok_cell(store, "methods_runs", search["vanilla_hash"])):
            counts["blocked"] += 1
            continue
        space = _search_space(study, search["method"])
        # Seeded by the trials done too: a continued search must not redraw its first random proposals.
        optuna = OptunaSearch(metric="best_dev_accuracy", mode="max",
                              seed=study.methods.search.seed * 100003 + len(done),
                              points_to_evaluate=[{k: r[k] for k in space} for r in done] or None,
                              evaluated_rewards=[r["best_dev_accuracy"] for r in done] or None)
        concurrency = _concurrency(study.methods.cpus_per_trial)
        left = budget - len(done)
        log(f"[search] {search['method']} {search['tuning_type']} {search['task']} {search['regime']} "
            f"seed {search['seed']}: {len(done)} trials done, {left} to run")
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_search_trainable, study_dict=to_dict(study),
                                                     storage=store.root, search=search),
                                {"cpu": study.methods.cpus_per_trial, "gpu": study.methods.gpus_per_trial}),
            param_space=space,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(optuna, max_concurrent=concurrency),
                                        num_samples=left, reuse_actors=not study.methods.gpus_per_trial),
            run_config=tune.RunConfig(name=f"search-{search['search_hash']}-{len(done)}",
                                      **store.ray_storage("tune"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1), callbacks=list(callbacks)))
        tuner.fit()
        counts["ran"] += left
    return counts


# ---------------------------------------------------------------------------------------------- the driver


def _missing(cells: list[dict], done: set[str]) -> list[dict]:
    return [c for c in cells if c["cell_hash"] not in done]


def _group(cells: list[dict], key) -> list[dict]:
    groups: dict = {}
    for cell in cells:
        groups.setdefault(key(cell), []).append(cell)
    return [{"cells": v} for v in groups.values()]


def _concurrency(per_trial_cpus: float) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial_cpus))


def save_study(study: StudyConfig, store: Store) -> None:
    """The config of the study a storage holds, so that `raysys status|report` need only the storage."""
    store.write_bytes(STUDY_FILE, json.dumps(to_dict(study), indent=1).encode())


def load_saved_study(store: Store) -> StudyConfig:
    payload = store.read_bytes(STUDY_FILE)
    if payload is None:
        raise FileNotFoundError(f"{store.uri(STUDY_FILE)}: no study here (not a raysys storage, or no sweep has "
                                "started in it)")
    try:
        return build(StudyConfig, json.loads(payload))
    except (json.JSONDecodeError, ConfigError) as err:
        raise ConfigError(f"{store.uri(STUDY_FILE)}: {err}") from err


def run_study(study: StudyConfig, store: Store, only: tuple[str, ...] = STAGES, log=print,
              tracker: str | None = None, tracking_uri: str | None = None) -> dict:
    """Run every stage of the study whose inputs exist; return per stage the counts of cells (total, finished
    before, ran, blocked) and the seconds it took. `tracker="mlflow"` also logs every trial to MLflow."""
    chain = stages.plan_chain(study)
    save_study(study, store)
    ran: dict[str, dict] = {}
    planned = _planned(study)

    def _done(name: str) -> int:
        return len(planned[name] & stage_outcomes(store, name)[0])

    def stage(name, total, finished, groups, trainable, resources, max_concurrent, then=None):
        """Run one stage; `then`, if given, is called after the first experiment and returns the groups of a
        second one whose inputs the first produced (the methods stage: vanilla runs, then what compares to
        them)."""
        if name not in only:
            return
        seconds, n_total = 0.0, 0
        for phase in range(2 if then is not None else 1):
            if phase:
                groups = then()
            n = sum(len(g.get("cells", g.get("links", []))) or 1 for g in groups)
            log(f"[{name}] {total} cells: {finished + n_total} finished, {n} to run in {len(groups)} trials")
            if groups:
                progress = Progress(name, lambda: _done(name), len(planned[name]), store, log)
                seconds += run_experiment(name, trainable, groups, resources, study, store, max_concurrent,
                                          progress, tracking_callbacks(tracker, study, store, name, tracking_uri))
            n_total += n
        blocked = max(0, total - finished - n_total)
        if blocked:
            log(f"[{name}] {blocked} cells blocked: their inputs are missing")
        ran[name] = {"cells": total, "finished_before": finished, "ran": n_total, "blocked": blocked,
                     "seconds": seconds}
        if n_total:
            log(f"[{name}] done in {seconds:.1f}s")

    stages.preflight(study, store, chain)
    links = [link.hash for link in chain.links if not store.has_artifact("plm", link.hash)]
    stage("pretrain", len(chain.links), len(chain.links) - len(links), [{"links": links}] if links else [],
          _pretrain_trainable,
          {"cpu": 0, "memory": 1024**2}, 1)  # the trial only coordinates; its Train workers hold the CPUs

    stages.preflight(study, store, chain)  # again, now over the PLMs this run produced

    def has_plm(h):
        return store.has_artifact("plm", h)

    def tuned(h):
        return store.has_artifact("tuned", h)

    cells = stages.plan_tuning(study, chain)
    done = {c["cell_hash"] for c in cells if tuned(c["cell_hash"])} & results.finished_cells(store, "tuning_runs")
    todo = [c for c in _missing(cells, done) if has_plm(c["plm_hash"])]
    resources = {"cpu": study.tuning.cpus_per_trial, "gpu": study.tuning.gpus_per_trial}
    stage("tuning", len(cells), len(done), [{"cells": [c]} for c in todo], _tuning_trainable, resources,
          _concurrency(study.tuning.cpus_per_trial))

    pilot_resources = {"cpu": study.pilot.cpus_per_trial, "gpu": study.pilot.gpus_per_trial}
    pilot_concurrency = _concurrency(study.pilot.cpus_per_trial)
    compat = stages.plan_compatibility(study, chain)
    baselines = stages.plan_baselines(study, chain)
    done = stage_outcomes(store, "compatibility")[0] & stages.cell_hashes(compat + baselines)
    todo = [{"table": "compatibility", "cells": [c]} for c in _missing(compat, done)
            if tuned(c["source_tuned_hash"]) and has_plm(c["target_plm_hash"])]
    todo += [{"table": "baselines", "cells": [c]} for c in _missing(baselines, done) if has_plm(c["plm_hash"])]
    stage("compatibility", len(compat) + len(baselines), len(done), todo, _compatibility_trainable,
          pilot_resources, pilot_concurrency)

    pairs = [p for p in stages.plan_pairs(study, chain)]
    cells = stages.plan_interpolation(study, chain)
    done = results.finished_cells(store, "interpolation") & stages.cell_hashes(cells)
    summarised = results.finished_cells(store, "interpolation_paths")
    groups = []
    for pair in pairs:
        if not (tuned(pair["tuned_hash_a"]) and tuned(pair["tuned_hash_b"])):
            continue
        missing = [c for c in cells if c["pair_hash"] == pair["pair_hash"] and c["cell_hash"] not in done]
        if missing or pair["pair_hash"] not in summarised:
            groups.append({"pair": pair, "cells": missing})
    stage("interpolation", len(cells), len(done), groups, _interpolation_trainable, pilot_resources,
          pilot_concurrency)

    cells = stages.plan_similarity(study, chain)
    done = stage_outcomes(store, "similarity")[0] & stages.cell_hashes(cells)
    todo = [{"cells": [c]} for c in _missing(cells, done) if tuned(c["tuned_hash_a"]) and tuned(c["tuned_hash_b"])]
    stage("similarity", len(cells), len(done), todo, _similarity_trainable, pilot_resources, pilot_concurrency)

    method_cells, free_cells = methods.plan_methods(study, chain), methods.plan_training_free(study, chain)
    if {"methods", "training_free"} & set(only):
        methods.check_inputs(study, store, chain, method_cells, free_cells, tuning_planned="tuning" in only)
    resources = {"cpu": study.methods.cpus_per_trial, "gpu": study.methods.gpus_per_trial}
    concurrency = _concurrency(study.methods.cpus_per_trial)

    def methods_todo(vanilla: bool) -> list[dict]:
        done = results.finished_cells(store, "methods_runs")
        vanilla_done = done if not vanilla else set()
        return [{"cells": [c]} for c in _missing(method_cells, done) if has_plm(c["target_plm_hash"]) and (
            c["method"] == "vanilla" if vanilla else
            (c["vanilla_hash"] in vanilla_done or "vanilla" not in study.methods.methods) and
            tuned(c["old_tuned_hash"]))]

    done = results.finished_cells(store, "methods_runs") & stages.cell_hashes(method_cells)
    stage("methods", len(method_cells), len(done), methods_todo(vanilla=True), _methods_trainable, resources,
          concurrency, then=lambda: methods_todo(vanilla=False))
    if "methods" in only and study.methods.search.algorithm == "optuna":
        started = time.time()
        callbacks = tracking_callbacks(tracker, study, store, "search", tracking_uri)
        ran["search"] = {**run_searches(study, store, chain, log, callbacks), "seconds": time.time() - started}
    done = results.finished_cells(store, "training_free") & stages.cell_hashes(free_cells)
    todo = [{"cells": [c]} for c in _missing(free_cells, done)
            if has_plm(c["target_plm_hash"]) and all(tuned(h) for h in c["old_tuned"].values())]
    stage("training_free", len(free_cells), len(done), todo, _training_free_trainable, resources, concurrency)
    return ran


STAGE_TABLES = {"pretrain": ("pretrain_runs",), "tuning": ("tuning_runs",),
                "compatibility": ("compatibility", "baselines"),
                "interpolation": ("interpolation", "interpolation_paths"),
                "similarity": ("head_similarity", "distances"), "methods": ("methods_runs",),
                "training_free": ("training_free",)}


def stage_outcomes(store: Store, name: str) -> tuple[set[str], set[str]]:
    """(done, failed) cell hashes of a stage: done = an `ok` row (a similarity cell writes both of its tables, so
    it needs both), failed = only `failed` rows (retried by the next run)."""
    statuses = [results.cell_statuses(store, t) for t in STAGE_TABLES[name]]
    combine = set.intersection if name == "similarity" else set.union
    ok = combine(*(st.get("ok", set()) for st in statuses))
    failed = set().union(*(st.get("failed", set()) for st in statuses)) - ok
    return ok, failed


def _planned(study: StudyConfig) -> dict[str, set[str]]:
    """Per stage: the hashes of its planned cells."""
    chain = stages.plan_chain(study)
    pairs = stages.plan_pairs(study, chain)
    hashes = stages.cell_hashes
    return {
        "pretrain": {link.hash for link in chain.links},
        "tuning": hashes(stages.plan_tuning(study, chain)),
        "compatibility": hashes(stages.plan_compatibility(study, chain) + stages.plan_baselines(study, chain)),
        "interpolation": hashes(stages.plan_interpolation(study, chain)) | {p["pair_hash"] for p in pairs},
        "similarity": hashes(stages.plan_similarity(study, chain)),
        "methods": hashes(methods.plan_methods(study, chain)),
        "training_free": hashes(methods.plan_training_free(study, chain)),
    }


def stage_status(study: StudyConfig, store: Store) -> dict[str, dict[str, int]]:
    """Per stage: planned cells, done, failed and todo (no row yet)."""
    out = {}
    for name, wanted in _planned(study).items():
        ok, failed = stage_outcomes(store, name)
        out[name] = {"planned": len(wanted), "done": len(wanted & ok), "failed": len(wanted & failed),
                     "todo": len(wanted - ok - failed)}
    return out


def missing_cells(study: StudyConfig, store: Store) -> dict[str, int]:
    """Per stage, how many planned cells have no `ok` row yet."""
    return {name: s["planned"] - s["done"] for name, s in stage_status(study, store).items()}


def _layer_parameters(study: StudyConfig) -> int:
    """Weights of the transformer layers (what every token passes through; embeddings are lookups)."""
    m = study.model
    return m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size)


def training_flops(study: StudyConfig) -> dict[str, float]:
    """An upper bound of the training compute per stage, 6 · layer weights · tokens (tuning sequences counted at
    `max_length`; evaluation and the MLM output layer not counted): enough to tell minutes from GPU-days."""
    per_token = 6 * _layer_parameters(study)
    chain = stages.plan_chain(study)
    p, t = study.pretrain, study.tuning
    tokens = {"pretrain": sum((p.initial_steps if link.index == 0 and not link.checkpoint else
                               p.continual_steps if link.index else 0) * p.batch_size * p.sequence_length
                              for link in chain.links)}
    tokens["tuning"] = sum(t.max_steps_for(c["tuning_type"]) * t.batch_size * t.max_length
                           for c in stages.plan_tuning(study, chain))
    method_tokens = 0
    for c in methods.plan_methods(study, chain):
        cfg = methods.method_tuning_config(study, c["tuning_type"], c["regime"])
        method_tokens += cfg.max_steps * cfg.batch_size * cfg.max_length
    tokens["methods"] = method_tokens
    searches = methods.plan_searches(study, chain)
    if searches:
        tokens["search"] = sum(methods.method_tuning_config(study, c["tuning_type"], c["regime"]).max_steps
                               for c in searches) * study.methods.search.trials * t.batch_size * t.max_length
    tf = study.methods.training_free
    tokens["training_free"] = len(methods.plan_training_free(study, chain)) * tf.steps * tf.batch_size * t.max_length
    return {stage: per_token * n for stage, n in tokens.items()}


def plan_text(study: StudyConfig, store: Store, tflops: float) -> str:
    """The `--dry-run` plan: per stage the cells planned, done, failed and to do, and the training compute."""
    status, flops = stage_status(study, store), training_flops(study)
    lines = [f"{'stage':<14} {'planned':>8} {'done':>8} {'failed':>7} {'to run':>7} {'train PFLOP':>12}"]
    for name in STAGES:
        st = status[name]
        pf = flops.get(name)
        lines.append(f"{name:<14} {st['planned']:>8} {st['done']:>8} {st['failed']:>7} "
                     f"{st['planned'] - st['done']:>7} {'—' if pf is None else f'{pf / 1e15:.3g}':>12}")
    searches = methods.plan_searches(study, stages.plan_chain(study))
    if searches:
        trials = study.methods.search.trials
        done = sum(min(trials, len(v)) for v in _search_rows(store).values())
        lines.append(f"{'search':<14} {len(searches) * trials:>8} {done:>8} {'':>7} {len(searches) * trials - done:>7} "
                     f"{flops['search'] / 1e15:>12.3g}   ({len(searches)} Optuna searches x {trials} trials)")
    total = sum(flops.values())
    hours = total / (tflops * 1e12) / 3600
    lines.append(f"training compute ≈ {total / 1e15:.3g} PFLOP (upper bound, evaluation not counted): "
                 f"{hours:.3g} device-hours at a sustained {tflops:g} TFLOP/s (--assume-tflops)")
    return "\n".join(lines)


def fresh_start(store: Store) -> str | None:
    """`--fresh`: move the storage aside (never delete: a mistyped flag must not cost a week of GPU time). An
    object store has no rename: its objects are copied, then removed (and the local cache of them too)."""
    if not store.exists():
        return None
    suffix = f".old-{time.strftime('%Y%m%d-%H%M%S')}"
    if not store.remote:
        Path(store.base).rename(store.base + suffix)
        return store.base + suffix
    if "/" not in store.base:
        raise ValueError(f"--fresh: '{store.root}' is a bucket root; give the storage a prefix (bucket/name) to move")
    pafs.copy_files(store.base, store.base + suffix, source_filesystem=store.fs, destination_filesystem=store.fs)
    store.fs.delete_dir(store.base)
    shutil.rmtree(store.local, ignore_errors=True)
    return store.uri(suffix=suffix)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the recyclable-tuning study on Ray.")
    parser.add_argument("--preset", default=AUTO,
                        help=f"one of {available_presets()}, or auto (default): paper when the cluster has GPUs, "
                             "else tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set tuning.lr=5e-4 --set seeds=[1,2]")
    parser.add_argument("--storage", default=None,
                        help="storage root: a path, or a URI pyarrow.fs opens (s3://bucket/run, gs://...); "
                             "default runs/<preset>")
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to attach to (host:port, ray://host:port, auto, or local for a new local "
                             "Ray); default: the cluster `ray start` runs on this machine if any, else a local Ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (stages, cell counts, training compute) and exit; starts no Ray work")
    parser.add_argument("--assume-tflops", type=float, default=None,
                        help="sustained TFLOP/s per device for the --dry-run estimate (default: 100 with GPUs, "
                             "0.05 on CPU)")
    parser.add_argument("--search", choices=("grid", "optuna"), default=None,
                        help="how the methods' continuous knobs (lr, T, a, beta) are chosen: the preset's grid, or "
                             "an Optuna search inside each grid cell (= --set methods.search.algorithm=...)")
    parser.add_argument("--search-trials", type=int, default=None, metavar="N",
                        help="Optuna trials per grid cell (= --set methods.search.trials=N)")
    parser.add_argument("--tracker", choices=("mlflow",), default=None,
                        help="also log every trial to MLflow (TensorBoard event files are always written under "
                             "<storage>/ray: tensorboard --logdir <storage>/ray/tune)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db; "
                             "for a URI storage, a file in its local cache)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move the storage aside to <storage>.old-<time>, then run")
    return parser.parse_args(argv)


def _search_overrides(args: argparse.Namespace) -> list[str]:
    out = [] if args.search is None else [f"methods.search.algorithm={args.search}"]
    return out + ([] if args.search_trials is None else [f"methods.search.trials={args.search_trials}"])


class ClusterError(Exception):
    """The Ray cluster asked for cannot be reached or joined."""


def _reachable(address: str, timeout: float = 5.0) -> bool:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def discover_cluster(address: str | None) -> tuple[str | None, str]:
    """(address to attach to or None for a new local Ray, how it was chosen). An explicit `--address` (or
    $RAY_ADDRESS) must answer — `ray.init` would otherwise retry for minutes; `auto` must find one; without either,
    the cluster `ray start` last started on this machine (a `ray up` head) is used when it answers."""
    given = address or os.environ.get("RAY_ADDRESS") or None
    flag = "--address" if address else "$RAY_ADDRESS"
    if given == "local":
        return None, "a new local Ray (--address local)"
    from ray._common.utils import get_ray_address_file  # where `ray start` records its address (`ray stop` clears)

    current = Path(get_ray_address_file(None))
    found = current.read_text().strip() if current.is_file() else ""
    if given == "auto":
        if not found or not _reachable(found):
            raise ClusterError(f"{flag} auto: no running Ray cluster on this machine (start one with `ray start "
                               "--head`, or leave --address out to start a local Ray)")
        return found, f"the running cluster at {found} ({flag} auto)"
    if given:
        if not _reachable(given):
            raise ClusterError(f"{flag} {given}: no Ray cluster answers there (is it up? on a laptop, reach a "
                               "remote cluster with `ray dashboard cluster.yaml` and `ray job submit`)")
        return given, f"the cluster at {given} ({flag})"
    if found and _reachable(found):
        return found, f"the running cluster at {found} (started by `ray start` on this machine)"
    return None, "a new local Ray (no running cluster found)"


def init_ray(address: str | None, num_cpus: int | None, offline: bool) -> str:
    """Attach to a cluster or start a local Ray; returns what it did. `offline` (the tiny preset on a new local
    Ray) keeps every process away from the model hub."""
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if ray.is_initialized():
        os.environ.update(env)
        return "the Ray this process already runs"
    target, how = discover_cluster(address)
    if offline and target is None:
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    os.environ.update(env)
    if target is None:
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, configure_logging=False)
        return how
    try:
        ray.init(address=target, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError) as err:
        raise ClusterError(f"could not join {how}: {str(err).splitlines()[0]} (token auth: this machine needs the "
                           "cluster's token in ~/.ray/auth_token and RAY_AUTH_MODE=token)") from err
    return how


def choose_preset(gpus: float, where: str = "the cluster") -> tuple[str, str]:
    """`--preset auto`: the paper's scale where there are GPUs to run it, the tiny study otherwise."""
    if gpus >= 1:
        return "paper", f"{gpus:g} GPU(s) in {where}"
    return "tiny", f"no GPU in {where}"


def _local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _load(args: argparse.Namespace, preset: str) -> tuple[StudyConfig, Store]:
    study = load_study(preset, args.overrides + _search_overrides(args))
    store = Store(args.storage or Path("runs") / preset)
    tracking_callbacks(args.tracker, study, store, "check", args.tracking_uri)  # fail before any work
    return study, store


def _resources_text() -> str:
    res = ray.cluster_resources()
    alive = sum(node["Alive"] for node in ray.nodes())
    return f"{alive} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # `auto` is settled by the cluster's GPUs once Ray is up; until then (and for --dry-run / --print-config, which
    # start no Ray) by this machine's.
    preset, why = (args.preset, "") if args.preset != AUTO else choose_preset(_local_gpus(), "this machine")
    try:
        study, store = _load(args, preset)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.preset == AUTO:
        print(f"raysys: --preset auto -> {preset} ({why})",
              file=sys.stderr if args.print_config else sys.stdout)  # --print-config prints JSON only
    if args.print_config:
        print(json.dumps(to_dict(study), indent=1))
        return 0
    if args.dry_run:
        tflops = args.assume_tflops or (100.0 if study.pretrain.use_gpu else 0.05)
        print(f"raysys: plan of study '{study.name}' (preset {preset}) in {store.root}")
        print(plan_text(study, store, tflops))
        return 0
    try:
        joined = init_ray(args.address, args.num_cpus, offline=study.model.name_or_path is None)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"raysys: running on {joined}: {_resources_text()}")
    if args.preset == AUTO:
        chosen, why = choose_preset(ray.cluster_resources().get("GPU", 0))
        if chosen != preset:
            try:
                (study, store), preset = _load(args, chosen), chosen
            except (ConfigError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        print(f"raysys: --preset auto -> {preset} ({why})")
    try:
        if args.fresh:
            aside = fresh_start(store)
            if aside:
                print(f"raysys: --fresh: moved the old storage to {aside}")
        store.ensure_writable()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"raysys: study '{study.name}' (preset {preset}) -> {store.root}")
    started = time.time()
    try:
        run_study(study, store, tuple(args.only), tracker=args.tracker, tracking_uri=args.tracking_uri)
    except (WeightMismatchError, methods.MissingInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary(study, store))
    print(f"\nreport: {report.publish_report(study, store)}")
    print(f"\nresults: {store.uri('results')} (Parquet; schemas in docs/results.md)")
    print(f"total wall time: {time.time() - started:.1f}s")
    incomplete = {k: v for k, v in missing_cells(study, store).items() if v and k in args.only}
    if incomplete:
        print(f"incomplete: {incomplete} — rerun the same command to retry failed or blocked cells", file=sys.stderr)
        return 1
    return 0
