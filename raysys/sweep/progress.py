"""Console progress of a running stage, mirrored to `<storage>/progress.json` (for `raysys status`) and to the
dashboard's metrics."""

from __future__ import annotations

import os
import socket
import time

from ray import tune

from raysys.report.status import duration
from raysys.storage.store import Store
from raysys.storage.study import write_progress
from raysys.sweep import monitor


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
            running = [t for t in trials if t.status == "RUNNING"]
            self.report(len(running), [running_trial(t) for t in running])

    def on_experiment_end(self, trials, **info):
        self.report(0, final=True)

    def report(self, running: int, trials: list[dict] = (), final: bool = False) -> dict:
        """Count what is done, log a line, and write the state `raysys status` reads (`trials`: the running ones,
        as `running_trial` gives them)."""
        self.last = now = time.time()
        done = self.count_done()
        if self.done_at_start is None:
            self.done_at_start = done
        elapsed, new = now - self.started, done - self.done_at_start
        left = self.total - done
        eta = elapsed / new * left if new > 0 and left > 0 else None
        state = {"stage": self.stage, "done": done, "total": self.total, "failed": self.failed, "running": running,
                 "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1),
                 "pid": os.getpid(), "host": socket.gethostname(), "updated": now, "final": final,
                 "trials": list(trials)}
        if self.store:
            write_progress(self.store, state)
            monitor.record_stage(self.stage, self.total, done, self.failed, running)
        if not final:
            self.log(f"[{self.stage}] {done}/{self.total} done, {self.failed} failed, {running} running, "
                     f"{duration(elapsed)} elapsed" + ("" if eta is None else f", ETA {duration(eta)}"))
        return state


# what a running trial's last report shows in `raysys status`: a pre-training trial's chain, link, step and loss; a
# training cell's step, dev accuracy and train loss
CURRENT = ("chain", "link", "step", "dev_accuracy", "train_loss", "loss")


def running_trial(trial) -> dict:
    """A running trial as `raysys status` lists it: its name and what its last report said of `CURRENT` (a trial
    that has not reported yet: its name alone)."""
    last = trial.last_result or {}
    return {"name": str(trial), **{k: last[k] for k in CURRENT if isinstance(last.get(k), (int, float, str))}}
