"""Where a storage stands against its study, per stage: cells planned, done, failed, still to do — the stages' own
done rule, read from the store alone (no Ray, no torch) — the training compute of the plan, and the sweep running
on it. `raysys status` and `--dry-run` print these; the driver counts what is left with them."""

from __future__ import annotations

import collections
import os
import socket
import time

from raysys.config import StudyConfig
from raysys.stages.base import Rows, View
from raysys.stages.chain import plan_chain, planned_cells
from raysys.stages.registry import STAGES
from raysys.storage.store import Store
from raysys.storage.study import current_version, load_saved_study, read_progress

STALE_AFTER_S = 120.0  # a progress file not updated for this long belongs to a sweep that is gone


def plans(study: StudyConfig, seed: int | None = None) -> dict[str, list]:
    """Every stage's planned cells, by stage name, in registry order: on every main chain (the main one and its
    replicates, `pretrain.replicate_seeds`), or on the main chain of `seed` alone."""
    chain = plan_chain(study)
    if seed is None:
        return {stage.name: planned_cells(stage, study, chain) for stage in STAGES}
    return {stage.name: stage.plan(study, chain.replica(seed)) for stage in STAGES}


def stage_status(study: StudyConfig, store: Store, planned: dict[str, list] | None = None) -> dict[str, dict]:
    """Per stage: planned cells, done, failed (their last attempt recorded an error) and to do (not tried yet)."""
    planned, view, out = planned or plans(study), View(store), {}
    for stage in STAGES:
        cells = planned[stage.name]
        done = sum(stage.done(cell, view) for cell in cells)
        failed = [cell for cell in cells if stage.failed(cell, view)]
        out[stage.name] = {"planned": len(cells), "done": done, "failed": len(failed),
                           "todo": len(cells) - done - len(failed), "errors": _errors(stage, failed, view)}
    return out


def _errors(stage, failed: list, view: View) -> collections.Counter:
    """The failed cells' errors, by their first line."""
    hashes = {out.key for cell in failed for out in stage.outputs(cell) if isinstance(out, Rows)}
    tables = {out.table for cell in failed[:1] for out in stage.outputs(cell) if isinstance(out, Rows)}
    return collections.Counter(
        (row.get("error") or "?").splitlines()[0] for table in tables for row in view.all_rows(table)
        if row.get("status") == "failed" and row["cell_hash"] in hashes)


def failures(store: Store) -> list[dict]:
    """The rows of the planned cells whose last attempt failed, stage by stage: what `raysys failures` lists."""
    study, view, found = load_saved_study(store), View(store), []
    planned = plans(study)
    for stage in STAGES:
        failed = [cell for cell in planned[stage.name] if stage.failed(cell, view)]
        keys = {(out.table, out.key) for cell in failed for out in stage.outputs(cell) if isinstance(out, Rows)}
        for table in sorted({t for t, _ in keys}):
            found += [{"stage": stage.name, "table": table, **row} for row in view.all_rows(table)
                      if row.get("status") == "failed" and (table, row["cell_hash"]) in keys]
    return found


def failures_text(rows: list[dict], lines: int | None = 6) -> str:
    """Each failed cell: where, which try, when, and its error (its first `lines` lines; None: all of it)."""
    if not rows:
        return "no failed cells"
    out = []
    for r in rows:
        repeated = f", {r['repeated_failures']} in a row" if (r.get("repeated_failures") or 0) > 1 else ""
        out.append(f"{r['stage']} / {r['table']} {r['cell_hash']}: try {r.get('attempts') or 1}{repeated}, "
                   f"{r['started_at']:%Y-%m-%d %H:%M} on {r.get('host') or '?'}")
        error = (r.get("error") or "?").rstrip().splitlines()
        out += [f"    {line}" for line in error[:lines]] + ([f"    ... ({len(error) - lines} more lines: --full)"]
                                                          if lines is not None and len(error) > lines else [])
    return "\n".join(out + [f"{len(rows)} failed cells; a rerun of the sweep retries them"])


def missing_cells(study: StudyConfig, store: Store) -> dict[str, int]:
    """Per stage, how many planned cells are not done."""
    return {name: s["planned"] - s["done"] for name, s in stage_status(study, store).items()}


def _layer_parameters(study: StudyConfig) -> int:
    """Weights of the transformer layers (what every token passes through; embeddings are lookups)."""
    m = study.model
    return m.num_layers * (4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size)


def training_flops(study: StudyConfig, planned: dict[str, list] | None = None) -> dict[str, float]:
    """An upper bound of the training compute per stage, 6 · layer weights · tokens (sequences counted at their
    maximum length; evaluation and the MLM output layer not counted): enough to tell minutes from GPU-days."""
    planned, per_token = planned or plans(study), 6 * _layer_parameters(study)
    flops = {}
    for stage in STAGES:
        tokens = sum(stage.train_tokens(study, cell) for cell in planned[stage.name])
        if tokens:
            flops[stage.name] = per_token * tokens
    return flops


def evaluation_flops(study: StudyConfig, planned: dict[str, list] | None = None) -> tuple[dict[str, float], set]:
    """The compute of the stages that only evaluate, per stage, 2 · layer weights · tokens of the forward passes
    their cells make (examples counted at tuning.max_length), and the tasks left out: a hub task's size is not
    known without downloading it, nor a file's that is not there."""
    from raysys.core.sources import split_examples

    planned, per_token, sizes = planned or plans(study), 2 * _layer_parameters(study), {}
    world = {"dev": study.world.task_dev, "test": study.world.task_test}
    tasks = {t.name: t for t in study.tasks}
    flops, unknown = {}, set()
    for stage in STAGES:
        tokens = 0
        for cell in planned[stage.name]:
            for split, passes in stage.eval_passes(study, cell).items():
                if (cell.task, split) not in sizes:
                    sizes[cell.task, split] = split_examples(tasks[cell.task], split, world)
                if sizes[cell.task, split] is None:
                    unknown.add(cell.task)
                else:
                    tokens += passes * sizes[cell.task, split] * study.tuning.max_length
        if tokens:
            flops[stage.name] = per_token * tokens
    return flops, unknown


def plan_text(study: StudyConfig, store: Store, tflops: float) -> str:
    """The `--dry-run` plan: per stage the cells planned, done, failed and to do, the training compute and that
    of the stages that only evaluate, and the device-hours of both."""
    planned = plans(study)
    status, flops = stage_status(study, store, planned), training_flops(study, planned)
    evals, unknown = evaluation_flops(study, planned)
    header = f"{'stage':<14} {'planned':>8} {'done':>8} {'failed':>7} {'to run':>7} {'train PFLOP':>12} "
    lines = [header + f"{'eval PFLOP':>11}"]
    for stage in STAGES:
        counts, pflop, eflop = status[stage.name], flops.get(stage.name), evals.get(stage.name)
        note = stage.plan_note(study, planned[stage.name])
        lines.append(f"{stage.name:<14} {counts['planned']:>8} {counts['done']:>8} {counts['failed']:>7} "
                     f"{counts['planned'] - counts['done']:>7} {_pflop(pflop):>12} {_pflop(eflop):>11}"
                     + (f"   {note}" if note else ""))
    total, evaluated = sum(flops.values()), sum(evals.values())
    lines.append(f"training compute ≈ {total / 1e15:.3g} PFLOP (upper bound, evaluation not counted): "
                 f"{_hours(total, tflops)} device-hours at a sustained {tflops:g} TFLOP/s (--assume-tflops)")
    left_out = f"; tasks of unknown size not counted: {', '.join(sorted(unknown))}" if unknown else ""
    lines.append(f"evaluation-only stages ≈ {evaluated / 1e15:.3g} PFLOP (examples at tuning.max_length{left_out}): "
                 f"{_hours(evaluated, tflops)} device-hours at the same rate")
    return "\n".join(lines)


def _pflop(flops: float | None) -> str:
    return "—" if flops is None else f"{flops / 1e15:.3g}"


def _hours(flops: float, tflops: float) -> str:
    return f"{flops / (tflops * 1e12) / 3600:.3g}"


def running_sweep(store: Store) -> dict | None:
    """The state of the sweep running on this storage, or None (none started, finished, or gone)."""
    state = read_progress(store)
    if state is None or state.get("final") or time.time() - state.get("updated", 0) > STALE_AFTER_S:
        return None
    if state.get("host", socket.gethostname()) != socket.gethostname():
        return state  # a driver on another machine (shared storage): only its freshness can be judged
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def duration(seconds: float) -> str:
    """A duration as people read it: 42s, 3m 05s, 2h 07m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


SHOWN_TRIALS = 12  # running trials listed by name; the rest are counted


def running_trials_lines(trials: list[dict]) -> list[str]:
    """A line per running trial: its name and where its last report stood (a link's step and loss, a training
    cell's step, dev accuracy and train loss)."""
    lines = []
    for trial in trials[:SHOWN_TRIALS]:
        now = [f"{trial.get('chain', '')} link {trial['link']}".lstrip() if "link" in trial else None,
               f"step {trial['step']}" if "step" in trial else None,
               f"dev accuracy {100 * trial['dev_accuracy']:.1f}%" if "dev_accuracy" in trial else None,
               f"train loss {trial['train_loss']:.3f}" if "train_loss" in trial else None,
               f"masked-LM loss {trial['loss']:.3f}" if "loss" in trial else None]
        now = [x for x in now if x]
        lines.append(f"{'':<4}{trial['name']}: {', '.join(now) if now else 'starting'}")
    if len(trials) > SHOWN_TRIALS:
        lines.append(f"{'':<4}... and {len(trials) - SHOWN_TRIALS} more running")
    return lines


def status_text(store: Store) -> str:
    return status_summary(store)[0]


def status_summary(store: Store) -> tuple[str, int, bool]:
    """(the `raysys status` text, how many planned cells failed, whether it shows a running sweep) — one reading of
    the progress file, so that a watcher's last text and its decision to stop agree."""
    study = load_saved_study(store)
    status = stage_status(study, store)
    running = running_sweep(store)
    version = current_version(store)
    lines = [f"study '{study.name}'{f', {version.label},' if version else ''} in {store.shown}",
             f"{'stage':<14} {'planned':>8} {'done':>8} {'failed':>7} {'to do':>7}  state"]
    for stage in STAGES:
        counts = status[stage.name]
        if running and running["stage"] == stage.name:
            state = f"running: {running['running']} trial(s), {duration(running['elapsed_s'])} elapsed" + (
                f", ETA {duration(running['eta_s'])}" if running.get("eta_s") is not None else "")
        elif counts["done"] == counts["planned"]:
            state = "complete"
        else:
            state = "failed cells: rerun to retry" if counts["failed"] else "pending"
        lines.append(f"{stage.name:<14} {counts['planned']:>8} {counts['done']:>8} {counts['failed']:>7} "
                     f"{counts['todo']:>7}  {state}")
        if running and running["stage"] == stage.name:
            lines += running_trials_lines(running.get("trials") or [])
        lines += [f"{'':<14} {n} x {error}" for error, n in counts["errors"].most_common(3)]
    if not running:
        lines.append("no sweep is running on this storage")
    failed = sum(counts["failed"] for counts in status.values())
    if failed:
        lines.append(f"{failed} cells failed (their errors above); a rerun retries them")
    return "\n".join(lines), failed, running is not None
