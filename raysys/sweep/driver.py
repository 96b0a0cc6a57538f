"""The driver: `python sweeps/full_paper.py` plans the study, then runs each stage of the registry on its cells
that are not done and whose inputs exist, until none becomes ready; it prints the summary and writes the report.

It knows no stage by name. Resume rests on the content-addressed store, not on Tune's experiment state (Tune's
restore recomputes trials that had finished): every launch is built from the cells the store does not hold yet.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs

from raysys.config import ConfigError, StudyConfig, available_presets, load_study, to_dict
from raysys.core.recycle import WeightMismatchError
from raysys.report.scope import StudyRows
from raysys.report.status import missing_cells, plan_text
from raysys.report.summary import publish_report, summary
from raysys.stages.base import MissingInputError, Rows, Stage, View, hashes, write_failure
from raysys.stages.chain import plan_chain, planned_cells
from raysys.stages.data_check import DataCheckError, check_data
from raysys.stages.registry import NAMES, STAGES
from raysys.storage import results
from raysys.storage.lease import LEASE, Lease, LeaseHeld
from raysys.storage.store import Store
from raysys.storage.study import STUDY_FILE, save_study
from raysys.sweep.cluster import (
    AUTO,
    AutoChoice,
    ClusterError,
    ClusterFacts,
    Target,
    choose_preset,
    choose_target,
    cluster_facts,
    init_ray,
    require_fit,
    resources_text,
)
from raysys.sweep.launchers import demand, launch, trial_groups
from raysys.sweep.progress import Progress
from raysys.sweep.storage_check import StorageNotShared, check_shared
from raysys.sweep.trackers import TRACKERS, tracker_line, tracking_callbacks


def run_study(study: StudyConfig, store: Store, only: tuple[str, ...] = NAMES, log=print,
              tracker: str | None = None, tracking_uri: str | None = None, data_checked: bool = False,
              lease: Lease | None = None, give_up_after: int | None = None, before_launch=lambda: None) -> dict:
    """Run every stage in `only` on its cells whose inputs exist; return per stage the counts of cells (total,
    finished before, ran, blocked) and the seconds it took. `tracker` ("mlflow", "wandb") also logs every trial there.
    `before_launch()` is called before any stage launches trials (the driver starts Ray there when it did not
    need to before).
    The data is checked (and fingerprinted) first, unless the caller just did (`data_checked`): DataCheckError
    names every problem before any trial starts."""
    if not data_checked:
        study = check_data(study, tuple(only))
    chain = plan_chain(study)
    changed = save_study(study, store)
    if changed:
        log(changed)
    ran: dict[str, dict] = {}
    for _ in range(MAX_PASSES):
        set_aside = store.quarantined()
        for stage in STAGES:
            if stage.name in only:
                if lease is not None and lease.lost:
                    raise LeaseHeld(f"{store.shown}: this driver lost its lease (it was not renewed for "
                                    f"{lease.ttl:.0f}s) and another driver holds it; stopping before {stage.name}")
                cells = planned_cells(stage, study, chain)
                stage.check(study, store, chain, cells, tuple(only))
                trackers = functools.partial(tracking_callbacks, tracker, study, store, stage.name, tracking_uri)
                ran[stage.name] = _added(ran.get(stage.name),
                                         run_stage(stage, cells, study, store, log, trackers, give_up_after,
                                                   before_launch))
        spoiled = store.quarantined() - set_aside
        if not spoiled:
            break
        log(f"raysys: {spoiled} spoiled artifacts were set aside during this pass (see {store.uri('quarantine')}): "
            "another pass remakes them and what needed them")
    return ran


PROGRESS_EVERY_S = 15.0  # how often a running stage logs its progress and rewrites <storage>/progress.json

MAX_PASSES = 3  # a pass remakes what the one before found spoiled; a store that spoils every time needs a person


def _added(before: dict | None, now: dict) -> dict:
    """The counts of a stage over the passes of one run: totals as planned, the rest summed."""
    if before is None:
        return now
    return {**now, "finished_before": before["finished_before"], "ran": before["ran"] + now["ran"],
            "seconds": before["seconds"] + now["seconds"]}


def demands(study: StudyConfig, only: tuple[str, ...]) -> list:
    """What each stage of `only` that has cells asks of the cluster (a stage without cells launches nothing)."""
    chain = plan_chain(study)
    return [demand(stage, study) for stage in STAGES if stage.name in only and planned_cells(stage, study, chain)]


def check_stages(study: StudyConfig, store: Store, only: tuple[str, ...]) -> None:
    """Every stage's own check (checkpoints, outdated weights, label sets), all before anything is written, so a
    refused run leaves the storage as it was; run_study checks each again before it launches it."""
    chain = plan_chain(study)
    for stage in STAGES:
        if stage.name in only:
            stage.check(study, store, chain, planned_cells(stage, study, chain), only)


def count_done(stage: Stage, cells: list, store: Store) -> int:
    view = View(store)
    return sum(stage.done(cell, view) for cell in cells)


def run_stage(stage: Stage, cells: list, study: StudyConfig, store: Store, log=print, trackers=tuple,
              give_up_after: int | None = None, before_launch=lambda: None) -> dict:
    """Launch the stage's cells that are not done and are ready; again while that made more of them ready (the
    methods stage: the reference runs, then what is measured against them). A cell tried in this run is not
    launched again: if it failed, its row says so and the next run retries it — unless it failed the same way
    `give_up_after` tries in a row (then it waits for `--retry-failed`). Cells whose trial died without recording
    them (killed for memory, a signal, a lost node) are launched once more (see `lost_cells`), then get their
    failed rows from here. `trackers()` gives each launch its tracking callbacks."""
    view = View(store)
    finished = sum(stage.done(cell, view) for cell in cells)
    given_up = {c.cell_hash for c in cells if give_up_after and stage.given_up(c, view, give_up_after)}
    if given_up:
        log(f"[{stage.name}] {len(given_up)} cells not retried: they failed the same way {give_up_after} times in a "
            "row (raysys status STORAGE shows why; --retry-failed runs them again)")
    tried: set[str] = set()
    relaunched: set[str] = set()
    seconds = 0.0
    while True:
        todo = [c for c in cells if c.cell_hash not in tried | given_up and not stage.done(c, view)
                and stage.ready(c, view)]
        groups = trial_groups(stage, stage.groups(todo), study)
        if todo or not tried:
            log(f"[{stage.name}] {len(cells)} cells: {finished + len(tried)} finished, {len(todo)} to run in "
                f"{len(groups)} trials")
        if not todo:
            break
        before_launch()
        progress = Progress(stage.name, lambda: count_done(stage, cells, store), len(cells), store, log,
                            PROGRESS_EVERY_S)
        launched_at = results.now()
        took, errors = launch(stage, groups, study, store, [progress, *trackers()], log)
        seconds += took
        tried |= hashes(todo)
        view = View(store)  # what the launch left
        lost = lost_cells(stage, todo, view, launched_at)
        again = {c.cell_hash for c in lost} - relaunched
        if again:
            log(f"[{stage.name}] {len(again)} cells lost their trial's process without a row: launching them once "
                "more")
            tried -= again
            relaunched |= again
        orphans = [c for c in lost if c.cell_hash not in again]
        if orphans:
            record_orphans(stage, orphans, study, store, launched_at, errors)
            log(f"[{stage.name}] {len(orphans)} cells lost their trial's process without a row: recorded as failed")
            view = View(store)
    blocked = len(cells) - finished - len(tried) - len(given_up)
    if blocked:
        log(f"[{stage.name}] {blocked} cells blocked: their inputs are missing")
    if tried:
        log(f"[{stage.name}] done in {seconds:.1f}s")
    return {"cells": len(cells), "finished_before": finished, "ran": len(tried), "blocked": blocked,
            "given_up": len(given_up), "seconds": seconds}


DIED = ("the trial ended without recording this cell: its process died (killed for memory or by a signal, or its "
        "node was lost)")


def lost_cells(stage: Stage, todo: list, view: View, launched_at) -> list:
    """The cells launched that are neither done nor have a row from this launch: their trial died.

    Tune retries a dead trial (`FailureConfig`), but may give up on it with retries left: a retry that lands on a
    reused actor that died too (a lost node takes the idle actors Tune keeps for reuse with it) reports two
    failures at once, and the second ends the trial. So the driver launches such cells once more itself."""
    since = launched_at - dt.timedelta(seconds=1)  # rows keep milliseconds
    lost = []
    for cell in todo:
        out = next((o for o in stage.outputs(cell) if isinstance(o, Rows)), None)
        if out is None or stage.done(cell, view):
            continue
        if not any(r["cell_hash"] == out.key and r["started_at"] >= since for r in view.all_rows(out.table)):
            lost.append(cell)
    return lost


def record_orphans(stage: Stage, cells: list, study: StudyConfig, store: Store, launched_at,
                   errors: dict[str, str]) -> None:
    """A failed row for each cell its trial's death left without one."""
    for cell in cells:
        # one first line whatever Tune saw, so that the same death counts as the same failure from try to try
        error = f"{DIED}\n{errors[cell.cell_hash]}" if cell.cell_hash in errors else DIED
        write_failure(store, study, stage, cell, launched_at, error)


def refuse_fresh(store: Store) -> None:
    """`--fresh` moves a raysys storage aside, nothing else: a directory holding files but no study.json is someone's
    data (a mistyped path), so it is refused untouched."""
    if store.exists() and not store.is_file(STUDY_FILE) and _has_entries(store):
        raise ValueError(f"--fresh: '{store.shown}' holds no {STUDY_FILE}, so it is no raysys storage; --fresh moves "
                         "only raysys storages (nothing was moved)")


def _has_entries(store: Store) -> bool:
    infos = store.fs.get_file_info(pafs.FileSelector(store.base, allow_not_found=True))
    return any(info.base_name not in (LEASE, ".raysys-probe") for info in infos)


def fresh_start(store: Store, lease: Lease) -> str | None:
    """`--fresh`: move the storage aside (never delete: a mistyped flag must not cost a week of GPU time), while
    holding its lease, which stays behind. An object store has no rename: its objects are copied, then removed (and
    the local cache of them too)."""
    if not store.exists():
        return None
    suffix = f".old-{time.strftime('%Y%m%d-%H%M%S')}"
    if store.remote and "/" not in store.base:
        raise ValueError(f"--fresh: '{store.shown}' is a bucket root; give the storage a prefix (bucket/name) to move")
    lease.stop_renewing()
    if not store.remote:
        Path(store.base).rename(store.base + suffix)
        (Path(store.base + suffix) / LEASE).unlink(missing_ok=True)
        return store.base + suffix
    pafs.copy_files(store.base, store.base + suffix, source_filesystem=store.fs, destination_filesystem=store.fs)
    store.fs.delete_dir(store.base)
    try:
        store.fs.delete_file(f"{store.base}{suffix}/{LEASE}")
    except FileNotFoundError:
        pass
    shutil.rmtree(store.local, ignore_errors=True)
    return store.uri(suffix=suffix)


def take_storage(store: Store, fresh: bool, log=print) -> Lease:
    """Hold the storage for this run: its lease (LeaseHeld if another driver has it), `--fresh` moving it aside,
    then the temporaries a killed run left removed (no other writer can be running now)."""
    if fresh:
        refuse_fresh(store)
    lease = Lease(store).acquire()
    try:
        if fresh:
            aside = fresh_start(store, lease)
            if aside:
                log(f"raysys: --fresh: moved the old storage to {aside}")
                lease = Lease(store).acquire()
        store.ensure_writable()
        removed = store.clean_temporaries()
        if removed:
            log(f"raysys: removed {removed} temporary files and folders an interrupted run left")
    except BaseException:
        lease.release()
        raise
    return lease


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Run the recyclable-tuning study on Ray.")
    parser.add_argument("--preset", default=AUTO,
                        help=f"one of {available_presets()}, or auto (default): paper where the cluster (with what "
                             "its autoscaler may add) holds the paper's pre-training GPUs and its data is there, "
                             "else tiny; it says why")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set tuning.lr=5e-4 --set seeds=[1,2]")
    parser.add_argument("--storage", default=None,
                        help="storage root: a path, or a URI pyarrow.fs opens (s3://bucket/run, gs://...); "
                             "default runs/<preset>")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), help="run only these stages")
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
    parser.add_argument("--tracker", choices=TRACKERS, default=None,
                        help="also log every trial to MLflow, or to Weights & Biases (online with an API key, else "
                             "offline into <storage>/wandb; $WANDB_MODE decides when set). TensorBoard event files "
                             "are always written: tensorboard --logdir <storage>/ray/tune")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db; "
                             "for a URI storage, a file in its local cache)")
    parser.add_argument("--max-failures", type=int, default=3, metavar="N",
                        help="a cell that failed the same way N times in a row is not retried (default 3)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="retry every failed cell, also those that reached --max-failures")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move the storage aside to <storage>.old-<time>, then run")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse, naming the flag, values argparse's types let through: an empty storage would fall back to a
    default folder, a local Ray of no CPUs fails in Ray's own words."""
    if args.storage is not None:
        if not args.storage.strip():
            raise ValueError("--storage: empty; give a folder or a URI (or leave the flag out: runs/<preset>)")
        if "://" not in args.storage and Path(args.storage).expanduser().exists() \
                and not Path(args.storage).expanduser().is_dir():
            raise ValueError(f"--storage {args.storage}: is a file, not a folder")
    if args.address is not None and not args.address.strip():
        raise ValueError("--address: empty; give host:port, ray://host:port, auto or local (or leave it out)")
    for flag, value, low in (("--num-cpus", args.num_cpus, 1), ("--search-trials", args.search_trials, 1),
                             ("--max-failures", args.max_failures, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag}: must be >= {low}, got {value}")
    if args.assume_tflops is not None and not 0 < args.assume_tflops < math.inf:
        raise ValueError(f"--assume-tflops: must be a number > 0, got {args.assume_tflops}")


def _search_overrides(args: argparse.Namespace) -> list[str]:
    out = [] if args.search is None else [f"methods.search.algorithm={args.search}"]
    return out + ([] if args.search_trials is None else [f"methods.search.trials={args.search_trials}"])


def _load(args: argparse.Namespace, preset: str) -> tuple[StudyConfig, Store]:
    study = load_study(preset, args.overrides + _search_overrides(args))
    store = Store(args.storage or Path("runs") / preset)
    tracking_callbacks(args.tracker, study, store, "check", args.tracking_uri)  # fail before any work
    return study, store


def _data_problems(study: StudyConfig, only: tuple[str, ...]) -> list[str]:
    try:
        check_data(study, only)
    except DataCheckError as err:
        return err.problems
    return []


def settle_auto(args: argparse.Namespace, target: Target | None, facts: ClusterFacts | None = None) -> AutoChoice:
    """`--preset auto`, decided once for the whole run by the facts of the Ray it will run on (`facts`, when given,
    stand in for them): the paper preset as this command would load it, overrides included, or tiny and why."""
    try:
        paper = load_study("paper", args.overrides + _search_overrides(args))
    except ConfigError as err:
        return AutoChoice("tiny", f"the overrides do not fit the paper preset: {err}")
    facts = facts or cluster_facts(target, args.num_cpus)
    per_worker = paper.pretrain.cpus_per_worker
    needed = paper.pretrain.num_workers if paper.pretrain.use_gpu else 0
    return choose_preset(facts.ddp_workers(per_worker), facts.addable_ddp_workers(per_worker), needed,
                         lambda: _data_problems(paper, tuple(args.only)), where=facts.where,
                         no_autoscaler=facts.no_autoscaler)


def main(argv: list[str] | None = None, facts: ClusterFacts | None = None, prog: str | None = None) -> int:
    """The driver. `facts` stand in for the cluster's when `--preset auto` is settled (a GPU cluster in a test);
    `prog` names the command in its usage (`raysys run`; default the script's name)."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    runs = not (args.print_config or args.dry_run)
    try:
        check_args(args)
        # the Ray is found before anything else when the run uses it or `auto` asks what it holds
        target = choose_target(args.address) if runs or (args.preset == AUTO and facts is None) else None
        choice = settle_auto(args, target, facts) if args.preset == AUTO else AutoChoice(args.preset, "")
        study, store = _load(args, choice.preset)
    except (ConfigError, ValueError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    preset = choice.preset
    if args.preset == AUTO:
        print(f"raysys: --preset auto -> {preset} ({choice.why})",
              file=sys.stderr if args.print_config else sys.stdout)  # --print-config prints JSON only
    if args.print_config:
        print(json.dumps(to_dict(study), indent=1))
        return 0
    try:
        study = check_data(study, tuple(args.only))
    except DataCheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        tflops = args.assume_tflops or (100.0 if study.pretrain.use_gpu else 0.05)
        print(f"raysys: plan of study '{study.name}' (preset {preset}) in {store.shown}")
        print(plan_text(study, store, tflops))
        return 0
    try:
        if not args.fresh:  # --fresh moves aside the storage these checks read; run_study checks the new one
            check_stages(study, store, tuple(args.only))
    except (WeightMismatchError, MissingInputError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start = functools.partial(_start_ray, target, args, study, store)
    # A rerun with nothing new to do on a Ray of its own: starting one is most of such a run's time, so it is not
    # started (the demands are checked against this machine all the same); should a pass find a spoiled artifact
    # to remake, Ray starts then, before the first launch. A cluster or a running Ray is joined as always.
    pending = (args.fresh or target.address is not None or target.running
               or any(count for name, count in missing_cells(study, store).items() if name in args.only))
    try:
        if pending:
            start()
        else:
            require_fit(demands(study, tuple(args.only)), cluster_facts(target, args.num_cpus))
            print("raysys: every planned cell is done: nothing to run, so Ray is not started")
        lease = take_storage(store, args.fresh)
    except (ClusterError, ValueError, StorageNotShared, LeaseHeld) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(args, study, store, preset, lease, before_launch=(lambda: None) if pending else _once(start))
    finally:
        lease.release()


def _start_ray(target: Target, args: argparse.Namespace, study: StudyConfig, store: Store) -> None:
    """Join or start Ray, then refuse (ClusterError, StorageNotShared) a cluster that cannot hold a stage's trials
    (Ray would wait without a word) or a storage some node cannot see — both before anything is written."""
    joined = init_ray(target, args.num_cpus, offline=study.model.name_or_path is None)
    print(f"raysys: running on {joined}: {resources_text()}")
    require_fit(demands(study, tuple(args.only)))
    check_shared(store)


def _once(fn):
    """`fn` on the first call only (a call that raised counts as not made)."""
    called = False

    def call() -> None:
        nonlocal called
        if not called:
            fn()
            called = True

    return call


def _run(args: argparse.Namespace, study: StudyConfig, store: Store, preset: str, lease: Lease,
         before_launch=lambda: None) -> int:
    print(f"raysys: study '{study.name}' (preset {preset}) -> {store.shown}")
    if args.tracker:
        print(f"raysys: {tracker_line(args.tracker, store, args.tracking_uri)}")
    started = time.time()
    try:
        run_study(study, store, tuple(args.only), tracker=args.tracker, tracking_uri=args.tracking_uri,
                  data_checked=True, lease=lease,  # data checked above, before Ray started
                  give_up_after=None if args.retry_failed else args.max_failures, before_launch=before_launch)
    except (WeightMismatchError, MissingInputError, DataCheckError, ClusterError, LeaseHeld, StorageNotShared) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scope = StudyRows(study, store)  # this study's cells, not every row the storage holds
    print(summary(scope))
    print(f"\nreport: {publish_report(scope)}")
    print(f"\nresults: {store.uri('results')} (Parquet; schemas in docs/results.md)")
    print(f"total wall time: {time.time() - started:.1f}s")
    incomplete = {k: v for k, v in missing_cells(study, store).items() if v and k in args.only}
    if incomplete:
        print(f"incomplete: {incomplete} — rerun the same command to retry failed or blocked cells", file=sys.stderr)
        return 1
    return 0
