"""How a stage's groups of cells run on Ray, knowing no stage by name: one generic trainable per launcher kind,
one checkpointer factory, and the three launchers a stage can ask for —

    grid    one Tune experiment, `grid_search` over the groups, a trial per group (`run_group`)
    chain   one Tune trial fitting a Ray Train `TorchTrainer`: every worker runs `run_group` over all the cells
    search  one Tune experiment running every search cell's seeded Optuna sampler side by side

Ray's own examples are the pattern: small identifiers in `param_space`, big constants through
`tune.with_parameters`, the typed config built once inside each trial, the stage's plain code called from there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

import ray
import ray.train
import ray.train.torch
import torch
from ray import tune

from raysys.config import StudyConfig, build, to_dict
from raysys.core import compute
from raysys.identity import config_hash
from raysys.stages.base import Context, Resources, Stage, View, Workers, write_failure
from raysys.stages.chain import plan_chain
from raysys.stages.registry import origin
from raysys.stages.registry import stage as stage_named
from raysys.storage import results
from raysys.storage.checkpoint import Checkpointer
from raysys.storage.store import Store
from raysys.sweep import monitor, searches
from raysys.sweep.cluster import Demand, require_resource

# ------------------------------------------------------------------------------------------- in the trial


def trial_device() -> torch.device:
    """The GPU Ray gave this process (a whole one or a share), else the CPU. A trial that asked for no GPU trains
    on the CPU even on a GPU node; Ray narrows CUDA_VISIBLE_DEVICES to the trial's GPUs, so device 0 is its own."""
    if ray.is_initialized() and not ray.get_gpu_ids():
        return torch.device("cpu")
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        compute.allow_tf32(device)
        return device
    return torch.device("cpu")


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def checkpointer_factory(api, store: Store, stage_name: str,
                         record: bool = True) -> Callable[[str, float], Checkpointer]:
    """`make(cell_hash, every_seconds)`: a training cell's mid-run checkpoints, in the store only (a new driver
    finds them there; Ray never gets a copy to keep), and its metrics reported to Ray through `api` — `ray.tune`
    in a trial, `ray.train` in a Train worker — with every evaluation (TensorBoard curves, the dashboard's
    metrics when `record`)."""

    def make(cell_hash: str, every_seconds: float) -> Checkpointer:
        def report(m: dict, *_) -> None:
            if record:
                monitor.record_trial(stage_name, cell_hash, m)
            api.report({**_numeric(m), "cell_hash": cell_hash})

        return Checkpointer(store, every_seconds, cell_hash, on_save=report, on_report=report)

    return make


def trial_context(study_dict: dict, storage: str, stage: Stage, api=tune, device=None, workers: Workers | None = None,
                  record: bool = True) -> Context:
    """The typed config, built once per trial (or Train worker); the store, the chain, the device (by default the
    GPU Ray gave this trial, else the CPU); torch's threads set to the CPUs the stage's trials hold."""
    study, store = build(StudyConfig, study_dict), Store(storage)
    torch.set_num_threads(stage.resources(study).threads)
    return Context(study, store, plan_chain(study), device or trial_device(),
                   checkpointer_factory(api, store, stage.name, record), workers or Workers())


def cell_trainable(config: dict, study_dict: dict, storage: str) -> None:
    """A trial of a grid stage: run its group of cells, report how many succeeded."""
    group = config["group"]
    stage = stage_named(group["stage"], group.get("module"))
    cells = [stage.decode(cell) for cell in group["cells"]]
    ok = stage.run_group(trial_context(study_dict, storage, stage), cells)
    tune.report({"cells_ok": ok, "cells_failed": len(cells) - ok})


def search_trainable(config: dict, study_dict: dict, storage: str, stage_name: str) -> None:
    """A trial of an Optuna search: the cell of the knobs its search proposed, its metric reported for Optuna."""
    stage = stage_named(stage_name)
    knobs = {k: v for k, v in config.items() if k != searches.SEARCH_KEY}
    trial = stage.trial(stage.decode(config[searches.SEARCH_KEY]), knobs)
    tune.report({**stage.run_trial(trial_context(study_dict, storage, stage), trial), "cells_ok": 1,
                 "cells_failed": 0})


def chain_worker(config: dict) -> None:
    """A Ray Train worker of a chain stage: every worker runs the stage's group over the same cells."""
    stage = stage_named(config["stage"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    compute.allow_tf32(device)
    workers = Workers(rank, world_size, wrap=ray.train.torch.prepare_model, report=ray.train.report,
                      barrier=torch.distributed.barrier if world_size > 1 else (lambda: None))
    # every rank reports to Ray Train, which expects all of them to; rank 0 alone feeds the dashboard's metrics
    ctx = trial_context(config["study"], config["storage"], stage, ray.train, device, workers, record=rank == 0)
    stage.run_group(ctx, [stage.decode(cell) for cell in config["cells"]])


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?::|$)")


def root_cause(err: BaseException) -> str:
    """What went wrong first, then where: a Train worker's exception reaches the trial wrapped (WorkerGroupError,
    TrainingFailedError) in a message holding the worker's whole traceback. The worker's own error line, then
    the last lines of its traceback."""
    while isinstance(getattr(err, "cause", None) or err.__cause__, BaseException):
        err = getattr(err, "cause", None) or err.__cause__
    lines = [line.rstrip() for line in str(err).splitlines() if line.strip()]
    raised = [line for line in lines[1:] if _RAISED.match(line)]
    if not raised:
        return f"{type(err).__name__}: {chr(10).join(lines)}"
    return "\n".join([raised[-1], f"(from {type(err).__name__}; the worker's traceback ends:)", *lines[-8:]])


def worker_resources(res: Resources) -> dict:
    """What each Train worker asks for besides its GPU (Ray Train adds that for `use_gpu`)."""
    return {"CPU": res.cpus, **({res.worker_resource: 1} if res.worker_resource else {})}


def demand(stage: Stage, study: StudyConfig) -> Demand:
    """What the stage's launcher asks Ray for, as `launch` asks it: each trial's CPUs and GPUs (grid, search), or
    each Train worker's CPUs, whole GPU and custom resource, for all its workers at once (chain)."""
    res = stage.resources(study)
    if stage.launcher == "chain":
        needs = {**worker_resources(res), "GPU": 1.0 if res.gpus > 0 else 0.0}
        unit = f"each of its {res.workers} workers, all at once," if res.workers > 1 else "its one worker"
        return Demand(f"stage {stage.name}", tuple(needs.items()), res.workers, res.settings, unit)
    return Demand(f"stage {stage.name}", (("CPU", res.cpus), ("GPU", res.gpus)), 1, res.settings)


# Ray Train's controller polls its workers every 2 s by default, and a worker's report waits until the controller
# has taken the one before it (its result queue holds one): a link shorter than a few polls waits on the poll
# rather than on compute (micro pre-training: 88 s at 2 s, 41 s at 0.2 s, the same weights). Each poll also
# interrupts the worker, whose threads hold every core on a small machine: 5 polls a second cost long links ~14 %
# of their steps (one-worker 2-thread loop on 2 cores, 3 pairs side by side: 16.9 steps/s at 0.2 s, 19.7 at 1 s,
# 18.6 at 2 s). One poll a second keeps that and waits ≤ 1 s a report (a link reports every 30 s and at its end).
# Ray Train hands the variable from the process that fits the trainer to its controller; a value the user set wins
# (the tests, whose links last a few steps, set 0.2 s).
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0"


def chain_trainable(config: dict, study_dict: dict, storage: str) -> None:
    """The Tune trial of a chain stage: fit one TorchTrainer over the group, then record a failed row for every
    cell it did not finish."""
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    group = config["group"]
    stage = stage_named(group["stage"])
    study, store = build(StudyConfig, study_dict), Store(storage)
    cells = [stage.decode(cell) for cell in group["cells"]]
    started = results.now()
    res = stage.resources(study)
    trainer = ray.train.torch.TorchTrainer(
        chain_worker,
        train_loop_config={"study": study_dict, "storage": storage, "stage": stage.name, "cells": group["cells"]},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0,
                                               resources_per_worker=worker_resources(res)),
        # A deterministic name, so that a restarted trial finds its Train run again.
        run_config=ray.train.RunConfig(name=f"{stage.name}-{config_hash([c.cell_hash for c in cells])}",
                                       **store.ray_storage("train"),
                                       failure_config=ray.train.FailureConfig(max_failures=1)),
    )
    error = None
    try:
        stage.prepare(trial_context(study_dict, storage, stage), cells)
        trainer.fit()
    except Exception as err:  # noqa: BLE001 — recorded per cell below
        error = root_cause(err)
    view = View(store, scan=False)
    failed = [cell for cell in cells if not stage.done(cell, view)]
    for k, cell in enumerate(failed):  # the workers walk the cells in order: the first not done is what failed
        blamed = error if k == 0 else f"not run: the job stopped at {failed[0].cell_hash}, which failed"
        write_failure(store, study, stage, cell, started, blamed or f"{stage.name}: the job ended without it")
    tune.report({"cells_ok": len(cells) - len(failed), "cells_failed": len(failed)})


# --------------------------------------------------------------------------------------------- launchers

# A light stage's cells share trials: as many trials as keep each slot (the trials the cluster holds at once) busy
# with TRIALS_PER_SLOT of them, so that Tune's cost per trial is paid a few times per slot rather than per cell and
# no slot idles long at the stage's end; at most LIGHT_CELLS_PER_TRIAL cells a trial, so that a cell that is not so
# light after all (a large model on a large split) keeps trials short and a lost one costs little.
TRIALS_PER_SLOT, LIGHT_CELLS_PER_TRIAL = 4, 16


def trial_groups(stage: Stage, groups: list[list], study: StudyConfig) -> list[list]:
    """The groups of cells each trial runs: the stage's own (`Stage.groups`), merged for a light stage."""
    if not stage.light or stage.launcher != "grid" or len(groups) <= 1:
        return groups
    size = min(LIGHT_CELLS_PER_TRIAL, math.ceil(len(groups) / (slots(stage.resources(study)) * TRIALS_PER_SLOT)))
    return [[cell for group in groups[i : i + size] for cell in group] for i in range(0, len(groups), size)]


def slots(res: Resources) -> int:
    """How many trials of `res` the cluster holds at once now (1 before Ray starts)."""
    total = ray.cluster_resources() if ray.is_initialized() else {}
    fits = [total.get("CPU", 0.0) / res.cpus] if res.cpus else []
    fits += [total.get("GPU", 0.0) / res.gpus] if res.gpus else []
    return max(1, int(min(fits, default=1)))



def _named(trainable, stage: Stage):
    """The generic trainable under the stage's name: Ray names a trial's actors, and the dashboard groups its tasks
    and actors, by the trainable's `__name__` (`tuning_trainable`, `methods_trainable`, ...)."""

    def named(config: dict, **parameters) -> None:
        trainable(config, **parameters)

    named.__name__ = named.__qualname__ = f"{stage.name}_trainable"
    return named


def _tuner(trainable, study: StudyConfig, store: Store, name: str, resources: dict, param_space: dict,
           tune_config: tune.TuneConfig, callbacks: list, max_failures: int = 1, **parameters) -> tune.Tuner:
    """`max_failures`: how often Tune restarts a trial whose process died (a lost spot node) — a grid trial
    records its cells' own errors and never raises, so only deaths count."""
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, study_dict=to_dict(study), storage=store.root,
                                                 **parameters), resources),
        param_space=param_space, tune_config=tune_config,
        run_config=tune.RunConfig(name=name, **store.ray_storage("tune"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures), callbacks=callbacks))


def trial_errors(stage: Stage, grid) -> dict[str, str]:
    """cell hash -> why its trial ended in error (a grid or chain trial: its group's cells)."""
    errors = {}
    for result in grid:
        group = (result.config or {}).get("group")
        if result.error is not None and group:
            for encoded in group["cells"]:
                errors[stage.decode(encoded).cell_hash] = root_cause(result.error)
    return errors


def _experiment(stage: Stage, trainable, groups: list[list], resources: dict, study: StudyConfig, store: Store,
                callbacks: list) -> None:
    """One Tune experiment over the groups (`grid_search` over them). No cap on trials at once: those the cluster
    cannot hold yet wait, and their resource requests are what makes the autoscaler add nodes."""
    encoded = [{"stage": stage.name, **origin(stage), "cells": [stage.encode(cell) for cell in group]}
               for group in groups]
    name = f"{stage.name}-{config_hash(encoded)}"  # of the cells alone, so that a rerun finds the same experiment
    for group, payload in zip(groups, encoded, strict=True):
        payload[FIELDS] = shared_fields(group)
    # the fields all groups have: every trial then has a value for each column (a tracker's filter needs no nulls)
    keys = [k for k in encoded[0][FIELDS] if all(k in payload[FIELDS] for payload in encoded)] if encoded else []
    # Actor reuse: a fresh process per tiny CPU cell costs more than the cell (~2.6 s a trial on 2 cores).
    tune_config = tune.TuneConfig(reuse_actors=not resources.get("gpu"), trial_name_creator=trial_name,
                                  trial_dirname_creator=trial_name)
    return _tuner(_named(trainable, stage), study, store, name, resources,
                  {"group": tune.grid_search(encoded), **flat_fields(keys)}, tune_config, callbacks).fit()


FIELDS = "fields"  # in a group's payload: its cells' shared fields, which the trial config carries flat


def shared_fields(cells: list) -> dict:
    """The fields every cell of a group has with one value (task, tuning type, method, seed, T, a, β, α, ...),
    plain values only and hashes aside: what TensorBoard, MLflow and the dashboard filter trials by."""
    values = [dataclasses.asdict(cell) for cell in cells]
    first = values[0]
    return {k: v for k, v in first.items() if not k.endswith("hash") and isinstance(v, (str, int, float, bool))
            and all(other.get(k) == v for other in values[1:])}


def flat_fields(keys: list[str]) -> dict:
    """Top-level config entries mirroring each trial's group fields (Tune resolves them once it picked the group):
    trackers log a trial's config flat, so these are the columns they filter by. A trial reads only `group`."""
    return {k: tune.sample_from(lambda spec, k=k: spec.config["group"][FIELDS][k]) for k in keys}


def trial_name(trial) -> str:
    """A trial's name and folder from what it runs: `tuning-d1_rel-lora-20-<id>` (Tune's default is a hash)."""
    group = trial.config.get("group") or {}
    parts = [group.get("stage", "trial"), *(str(v) for v in (group.get(FIELDS) or {}).values())]
    return re.sub(r"[^\w.=+-]", "_", "-".join(parts))[:80] + f"-{trial.trial_id}"


def run_grid(stage: Stage, groups: list[list], study: StudyConfig, store: Store, callbacks: list, log):
    res = stage.resources(study)
    return _experiment(stage, cell_trainable, groups, {"cpu": res.cpus, "gpu": res.gpus}, study, store, callbacks)


def run_chain(stage: Stage, groups: list[list], study: StudyConfig, store: Store, callbacks: list, log):
    res = stage.resources(study)
    if res.worker_resource:
        require_resource(res.worker_resource, f"{stage.name}.worker_resource")
    # The trial only coordinates: its Train workers hold the CPUs and GPUs.
    return _experiment(stage, chain_trainable, groups, {"cpu": 0, "memory": 1024**2}, study, store, callbacks)


def run_search(stage: Stage, groups: list[list], study: StudyConfig, store: Store, callbacks: list, log):
    """Every search in one Tune experiment (raysys.sweep.searches): each its own seeded TPE sampler, told the
    trials it finished before (a search already started runs only the rest of its budget), at most
    `methods.search.parallel` of its trials at once; the trials of all searches share the cluster."""
    from ray.tune.search import ConcurrencyLimiter

    res = stage.resources(study)
    view = View(store)  # read once: each search adds trials of its own only
    specs = []
    for (search,) in groups:
        done = stage.finished(search, view)[:search.trials]
        space = stage.space(study, search)
        specs.append(searches.SearchSpec(stage.encode(search), space, search.trials - len(done),
                                         stage.sampler_seed(study, len(done)),
                                         tuple(({k: r[k] for k in space}, r[stage.metric]) for r in done)))
        log(f"[{stage.name}] {stage.describe(search)}: {len(done)} trials done, {specs[-1].budget} to run")
    parallel = study.methods.search.parallel
    # The limiter never binds (each search keeps to `parallel` itself); Tune reads its bound as how many trials
    # it may ask resources for ahead of time — otherwise one, and the autoscaler would see one trial's demand.
    searcher = ConcurrencyLimiter(searches.ParallelSearches(specs, stage.metric, parallel),
                                  max_concurrent=max(1, parallel * len(specs)))
    tune_config = tune.TuneConfig(search_alg=searcher, num_samples=sum(spec.budget for spec in specs),
                                  reuse_actors=not res.gpus)
    name = f"{stage.name}-{config_hash([(spec.key, spec.budget) for spec in specs])}"
    # a trial that raised has recorded its failed row: Tune must not run it again (the next sweep does, if asked)
    return _tuner(_named(search_trainable, stage), study, store, name, {"cpu": res.cpus, "gpu": res.gpus}, {},
                  tune_config, callbacks, max_failures=0, stage_name=stage.name).fit()


LAUNCHERS = {"grid": run_grid, "chain": run_chain, "search": run_search}


def launch(stage: Stage, groups: list[list], study: StudyConfig, store: Store, callbacks: list,
           log=print) -> tuple[float, dict[str, str]]:
    """Run the groups with the stage's launcher; returns the seconds it took and, per cell hash, the error of each
    trial that ended in error (its process died, or the trial itself raised)."""
    started = time.time()
    grid = LAUNCHERS[stage.launcher](stage, groups, study, store, callbacks, log)
    return time.time() - started, trial_errors(stage, grid)
