"""Summaries computed from the Parquet tables alone (the full Markdown/figure report is a later stage)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from raysys import results
from raysys.config import StudyConfig
from raysys.store import Store


def _ok_rows(store: Store, table: str) -> list[dict]:
    return [r for r in results.read_table(store, table).to_pylist() if r.get("status", "ok") == "ok"]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f}±{100 * std:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def loss_barrier(alphas: list[float], losses: list[float]) -> float:
    """max_α [L(θ(α)) − ((1 − α)·L(θ_0) + α·L(θ_1))] along a path sorted by α (0 for a convex/linear path)."""
    pairs = sorted(zip(alphas, losses))
    (a0, l0), (a1, l1) = pairs[0], pairs[-1]
    return max(loss - ((1 - a) * l0 + a * l1) for a, loss in pairs) if a1 > a0 else 0.0


def summary(study: StudyConfig, store: Store) -> str:
    parts = []
    runs = sorted(_ok_rows(store, "pretrain_runs"), key=lambda r: r["link"])
    parts.append("Pre-training chain\n" + _table(
        ["PLM", "domain", "steps", "final MLM loss", "tokens/s"],
        [[f"M{r['link']}", r["domain"], r["steps"], f"{r['final_loss']:.3f}", f"{r['tokens_per_second']:.0f}"]
         for r in runs]))

    tuned = defaultdict(list)
    for r in _ok_rows(store, "tuning_runs"):
        tuned[(r["task"], r["plm_index"])].append(r["test_accuracy"])
    plms = sorted({p for _, p in tuned})
    parts.append("Tuning: test accuracy % of the best-dev checkpoint (mean±std over seeds)\n" + _table(
        ["task"] + [f"M{p}" for p in plms],
        [[t.name] + [_mean_std(tuned[(t.name, p)]) for p in plms] for t in study.tasks]))

    compat = defaultdict(list)
    for r in _ok_rows(store, "compatibility"):
        compat[(r["task"], r["source_plm_index"], r["target_plm_index"])].append(r["test_accuracy"])
    parts.append("Compatibility: Δ tuned on M_i applied to M_j without training (test accuracy %)\n" + _table(
        ["task", "hop", "tuned on M_i", "Δ_i on M_j", "tuned on M_j"],
        [[t, f"M{i}->M{j}", _mean_std(tuned[(t, i)]), _mean_std(v), _mean_std(tuned[(t, j)])]
         for (t, i, j), v in sorted(compat.items())]))

    paths = defaultdict(list)
    for r in _ok_rows(store, "interpolation"):
        paths[(r["task"], r["plm_index_a"], r["plm_index_b"], r["seed"])].append(r)
    rows = []
    for (task, i, j, seed), path in sorted(paths.items()):
        path.sort(key=lambda r: r["alpha"])
        accs = [r["test_accuracy"] for r in path]
        barrier = loss_barrier([r["alpha"] for r in path], [r["test_loss"] for r in path])
        rows.append([task, f"M{i}->M{j}", seed, len(path), f"{100 * accs[0]:.1f}", f"{100 * min(accs):.1f}",
                     f"{100 * accs[-1]:.1f}", f"{barrier:.3f}"])
    parts.append("Linear interpolation between tuned M_i and tuned M_j (test)\n" + _table(
        ["task", "hop", "seed", "alphas", "acc α=0", "min acc", "acc α=1", "loss barrier"], rows))
    return "\n\n".join(parts)
