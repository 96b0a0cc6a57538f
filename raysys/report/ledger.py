"""The cost ledger (issue 21): what recycling saves, in device time. Per setting (task, type, upgrade, regime) and
method — the distilling methods at their dev-chosen (T, a, β), as the methods table picks them — the device seconds
a run took to first reach vanilla's target dev accuracy (`methods.target_fraction` of vanilla's best), against
vanilla's own time to it, paired by seed. A run that never reached the target is charged its whole training time
(the budget it spent without getting there), and counted apart; a run resumed from a checkpoint is timed from its
resumption, so its seconds are left out. The device each run used is its row's `device`."""

from __future__ import annotations

from collections import Counter

from raysys.config import REFERENCE_METHOD
from raysys.report.scope import StudyRows
from raysys.report.stats import Statistics, mean, paired
from raysys.report.tables import Section, fmt, methods_by_setting


def time_to_target(run: dict) -> tuple[float, bool] | None:
    """(device seconds to vanilla's target, reached); the whole training time when it never got there; None for a
    run without timings (resumed, or written before they were recorded). A start that trained (text_distill's
    text phase) is charged its seconds too."""
    if run.get("resumed_from_step") is not None or run.get("train_seconds") is None:
        return None
    before = run.get("start_train_seconds") or 0.0
    if run.get("seconds_to_target") is not None:
        return before + run["seconds_to_target"], True
    return before + run["train_seconds"], False


def _seconds(entry: dict) -> dict[int, float]:
    timed = {seed: time_to_target(run) for seed, run in entry["by_seed"].items()}
    return {seed: t[0] for seed, t in timed.items() if t is not None}


def ledger_rows(scope: StudyRows, methods_table: list[dict], stats: Statistics) -> list[list]:
    rows = []
    for (task, tuning_type, upgrade, regime), methods in sorted(methods_by_setting(methods_table).items()):
        vanilla = methods.get(REFERENCE_METHOD)
        if vanilla is None:
            continue
        base = _seconds(vanilla)
        for name, entry in methods.items():
            own = _seconds(entry)
            timed = [time_to_target(run) for run in entry["by_seed"].values()]
            reached = sum(1 for t in timed if t is not None and t[1])
            saved = "—" if name == REFERENCE_METHOD else stats.effect(paired(base, own)).text(1.0, " s", 1)
            devices = Counter(run.get("device") or "unrecorded" for run in entry["by_seed"].values())
            rows.append([task, tuning_type, upgrade, regime, name, f"{reached}/{len(timed)}",
                         fmt(mean(own.values()), digits=1), fmt(mean(base.values()), digits=1), saved,
                         fmt(sum((run["train_seconds"] or 0.0) + (run.get("start_train_seconds") or 0.0)
                                 for run in entry["by_seed"].values()), digits=0),
                         ", ".join(sorted(devices))])
    return rows



def ledger_section(scope: StudyRows, methods_table: list[dict], stats: Statistics) -> Section:
    fraction = scope.study.methods.target_fraction
    return Section(f"Cost ledger: device seconds to reach vanilla's target ({100 * fraction:g}% of its best dev "
                   f"accuracy; a run that never reached it is charged its whole training), and the time a method "
                   f"saves against vanilla, paired by seed ({stats.describe()})",
                   ["task", "type", "upgrade", "regime", "method", "reached", "seconds to target", "vanilla's",
                    "saved vs vanilla", "training seconds (all seeds)", "device"],
                   ledger_rows(scope, methods_table, stats))
