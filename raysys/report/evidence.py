"""What the findings pair and compare, looked up from the study's rows: per-seed accuracies, the chance baseline
a learned model must beat, and the convergence of a run measured from its first evaluation after step 0."""

from __future__ import annotations

import itertools
from collections import defaultdict

from raysys.report.scope import StudyRows
from raysys.report.stats import mean


def tuned_accuracy(scope: StudyRows) -> dict[tuple, float]:
    """(task, type, PLM index, seed) → test accuracy of the main chain's tuned model."""
    return {(r["task"], r["tuning_type"], r["plm_index"], r["seed"]): r["test_accuracy"]
            for r in scope.ok_rows("tuning_runs") if r["chain"] == "main"}


class Baselines:
    """The chance level a model must beat to have learned its task: max(majority class, untrained head), per
    (task, PLM index, seed). On an imbalanced task the untrained head can score far below the majority class
    (and a balanced task's majority far below a lucky head), so neither alone is the floor."""

    def __init__(self, scope: StudyRows):
        per_seed, per_plm, majority = defaultdict(list), defaultdict(list), defaultdict(list)
        for r in scope.ok_rows("baselines"):
            per_seed[(r["task"], r["plm_index"], r["seed"])].append(r["test_accuracy"])
            per_plm[(r["task"], r["plm_index"])].append(r["test_accuracy"])
            if r["kind"] == "majority":
                majority[r["task"]].append(r["test_accuracy"])
        self._seed = {k: max(v) for k, v in per_seed.items()}
        self._plm = {k: max(v) for k, v in per_plm.items()}
        self._majority = {k: max(v) for k, v in majority.items()}

    def of(self, task: str, plm_index: int | None, seed: int | None) -> float | None:
        """The floor for (task, PLM, seed); the PLM's over any seed; for a PLM without rows (a control chain's)
        the task's majority class, which no PLM changes."""
        for value in (self._seed.get((task, plm_index, seed)), self._plm.get((task, plm_index)),
                      self._majority.get(task)):
            if value is not None:
                return value
        return None


def late_auc(curve: list[dict]) -> float | None:
    """The mean dev accuracy over the steps from the first evaluation after step 0 to the last (trapezoids): the
    area a head start at step 0 alone cannot buy."""
    late = [p for p in curve if p["step"] > 0]
    if not late:
        return None
    if len(late) == 1:
        return late[0]["dev_accuracy"]
    area = sum((b["step"] - a["step"]) * (a["dev_accuracy"] + b["dev_accuracy"]) / 2
               for a, b in itertools.pairwise(late))
    return area / (late[-1]["step"] - late[0]["step"])


def late_steps(curve: list[dict], target: float | None, budget: int) -> tuple[int, bool] | None:
    """(steps, reached) to the first evaluation after step 0 reaching `target`; a run that never reaches it
    counts as its whole budget (censored, reached False) rather than dropping out of the mean."""
    if target is None:
        return None
    for p in curve:
        if p["step"] > 0 and p["dev_accuracy"] >= target:
            return p["step"], True
    return budget, False


PLATEAU_EVALUATIONS, PLATEAU_TOLERANCE = 3, 0.02


def plateaued(curve: list[dict], key: str = "full_dev_accuracy") -> bool | None:
    """Did the run reach its plateau: its last three evaluations within 2 points of its best? (On the full dev
    set: a K-shot dev set of 32 examples moves 3 points per example.) None for a curve without the key."""
    values = [p.get(key) for p in curve]
    if not values or None in values:
        return None
    best = max(values)
    return all(best - v <= PLATEAU_TOLERANCE + 1e-9 for v in values[-PLATEAU_EVALUATIONS:])


class Curves:
    """The dev curve of every methods run, by its cell hash, in step order."""

    def __init__(self, scope: StudyRows):
        self._by_cell = defaultdict(list)
        for p in scope.ok_rows("methods_curves"):
            self._by_cell[p["cell_hash"]].append(p)
        for points in self._by_cell.values():
            points.sort(key=lambda p: p["step"])

    def convergence(self, run: dict) -> dict:
        """A methods run's late AUC and censored steps to its target, from its curve."""
        curve = self._by_cell.get(run["cell_hash"], [])
        steps = late_steps(curve, run["target_dev_accuracy"], run["max_steps"])
        return {"auc": late_auc(curve), "steps": None if steps is None else steps[0],
                "reached": None if steps is None else steps[1], "plateau": plateaued(curve)}


def seed_values(runs: dict[int, dict], value) -> dict[int, float]:
    """seed → value(run), for the runs of one method in one setting."""
    return {seed: value(run) for seed, run in runs.items()}


def describe_spread(values: list[float], scale: float = 100.0) -> str:
    """'mean m, median d, worst w' of per-path values where lower is better (drops)."""
    if not values:
        return "no paths"
    ordered = sorted(values)
    median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    return f"mean {scale * mean(values):.1f}, median {scale * median:.1f}, worst {scale * ordered[-1]:.1f}"


def retention(scope: StudyRows) -> list[dict]:
    """How much an upgrade forgets: per task and type, the test accuracy tuned on the task's own PLM M_k (the
    link that learned its domain) and on M_k+1, and the share of M_k's gain over the floor that M_k+1 keeps."""
    study, tuned, floor = scope.study, tuned_accuracy(scope), Baselines(scope)
    own = {c.name: k for k, c in enumerate(study.corpora)}
    out = []
    for task in study.tasks:
        k = own.get(task.domain)
        if k is None or k + 1 >= len(study.corpora):
            continue
        for kind in study.tuning.types:
            acc = {j: mean(v for (t, ty, p, _), v in tuned.items() if (t, ty, p) == (task.name, kind, j))
                   for j in (k, k + 1)}
            base = mean(floor.of(task.name, k + 1, s) for s in study.seeds)
            if None in (acc[k], acc[k + 1], base):
                continue
            gain = acc[k] - base
            out.append({"task": task.name, "tuning_type": kind, "own": k, "own_accuracy": acc[k],
                        "next_accuracy": acc[k + 1], "floor": base,
                        "kept": (acc[k + 1] - base) / gain if gain > 0 else None})
    return out
