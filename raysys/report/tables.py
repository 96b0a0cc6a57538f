"""The report's tables, computed from the Parquet tables alone: one section per pilot study and method table, and
the small helpers every reader shares (means over seeds, formatting, how methods rows group into settings)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from raysys.config import RECYCLING_METHODS
from raysys.report.evidence import Curves, retention
from raysys.report.scope import StudyRows
from raysys.report.stats import mean


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f}±{100 * std:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table (a cell's `|` escaped)."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


@dataclass(frozen=True)
class Section:
    """One summary table: aligned text on the console, a Markdown table in report.md."""

    title: str
    header: list[str]
    rows: list[list]

    def text(self) -> str:
        return f"{self.title}\n{_table(self.header, self.rows)}"

    def markdown(self) -> str:
        return markdown_table(self.header, self.rows) if self.rows else "_no rows_"


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None else f"{scale * value:.{digits}f}"


def _pretrain_summary(scope: StudyRows) -> Section:
    runs = sorted(scope.ok_rows("pretrain_runs"), key=lambda r: (r["chain"] != "main", r["link"]))
    return Section("Pre-training chains (M = main, C = control: another origin, the same continual data)",
                   ["PLM", "domain", "init", "steps", "final MLM loss", "tokens/s"],
                   [[f"{'M' if r['chain'] == 'main' else 'C'}{r['link']}", r["domain"], r["init"], r["steps"],
                     fmt(r["final_loss"], digits=3), fmt(r["tokens_per_second"], digits=0)] for r in runs])


def _tuning_summary(scope: StudyRows) -> Section:
    tuned = defaultdict(list)
    for r in scope.ok_rows("tuning_runs"):
        tuned[(r["chain"], r["task"], r["tuning_type"], r["plm_index"])].append(r["test_accuracy"])
    columns = sorted({(c, p) for c, _, _, p in tuned}, key=lambda x: (x[0] != "main", x[1]))
    study = scope.study
    tasks = _in_order([t.name for t in study.tasks], [k[1] for k in tuned])  # --all: other studies' tasks too
    types = _in_order(list(study.tuning.types), [k[2] for k in tuned])
    rows = [[task, t] + [_mean_std(tuned[(c, task, t, p)]) for c, p in columns] for task in tasks for t in types]
    return Section("Tuning: test accuracy % of the best-dev checkpoint (mean±std over seeds)",
                   ["task", "type"] + [f"{'M' if c == 'main' else 'C'}{p}" for c, p in columns], rows)


def _in_order(planned: list[str], found) -> list[str]:
    """The study's names in its order, then any other name the rows hold (sorted)."""
    return planned + sorted(set(found) - set(planned))


def _compatibility_summary(scope: StudyRows) -> Section:
    tuned = defaultdict(list)
    for r in scope.ok_rows("tuning_runs"):
        if r["chain"] == "main":
            tuned[(r["task"], r["tuning_type"], r["plm_index"])].append(r["test_accuracy"])
    base = defaultdict(list)
    for r in scope.ok_rows("baselines"):
        base[(r["task"], r["plm_index"], r["kind"])].append(r["test_accuracy"])
    compat = defaultdict(list)
    for r in scope.ok_rows("compatibility"):
        compat[(r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"])].append(r["test_accuracy"])
    rows = [[task, t, f"M{i}->M{j}", _mean_std(v), _mean_std(tuned[(task, t, j)]),
             _mean_std(base[(task, j, "untrained_head")]), _mean_std(base[(task, j, "majority")])]
            for (task, t, i, j), v in sorted(compat.items())]
    return Section("Compatibility: Δ_i tuned on M_i applied to M_j without training (test accuracy %)",
                   ["task", "type", "hop", "Δ_i on M_j", "tuned on M_j", "untrained head", "majority"], rows)


def _retention_summary(scope: StudyRows) -> Section:
    rows = [[r["task"], r["tuning_type"], f"M{r['own']}->M{r['own'] + 1}", fmt(r["own_accuracy"], 100),
             fmt(r["next_accuracy"], 100), fmt(r["floor"], 100), fmt(r["kept"], 100, 0)] for r in retention(scope)]
    return Section("Retention: what an upgrade keeps of a task's domain (test accuracy % tuned on the task's own "
                   "PLM M_k and on M_k+1; kept = share of M_k's gain over the floor max(majority, untrained head))",
                   ["task", "type", "upgrade", "on M_k", "on M_k+1", "floor", "kept %"], rows)


def _path_summary(scope: StudyRows) -> Section:
    groups = defaultdict(list)
    for r in scope.ok_rows("interpolation_paths"):
        if r["split"] == "test":
            groups[(r["tuning_type"], r["plm_index_b"] - r["plm_index_a"], r["pair_kind"])].append(r)
    rows = [[t, f"i->i+{hop}" if hop else "i (2 seeds)", kind, len(v),
             fmt(mean(r["loss_barrier"] for r in v), digits=3), fmt(mean(r["accuracy_drop"] for r in v), 100),
             fmt(mean(r["min_accuracy"] for r in v), 100)]
            for (t, hop, kind), v in sorted(groups.items())]
    return Section("Linear mode connectivity (test; means over tasks, seeds and pairs)",
                   ["type", "hop", "pair", "paths", "loss barrier", "acc drop %", "min acc %"], rows)


def _head_summary(scope: StudyRows) -> Section:
    groups = defaultdict(list)
    for r in scope.ok_rows("head_similarity"):
        groups[(r["tuning_type"], r["layer"], r["pair_kind"])].append(r)
    rows = [[t, layer, kind, fmt(mean(r["similarity_corresponding"] for r in v), digits=3),
             fmt(mean(r["similarity_noncorresponding"] for r in v), digits=3)]
            for (t, layer, kind), v in sorted(groups.items())]
    return Section("Attention-head similarity, 1 − JS/ln2 (means over heads, tasks, seeds, pairs)",
                   ["type", "layer", "pair", "corresponding heads", "non-corresponding heads"], rows)


def _distance_summary(scope: StudyRows) -> Section:
    groups = defaultdict(list)
    for r in scope.ok_rows("distances"):
        groups[(r["tuning_type"], r["what"], r["pair_kind"])].append(r)
    rows = [[t, what, kind, fmt(mean(r["l2"] for r in v), digits=2),
             fmt(mean(r["l2_per_parameter"] for r in v), digits=5), fmt(mean(r["cosine"] for r in v), digits=3)]
            for (t, what, kind), v in sorted(groups.items())]
    return Section("Distances between the two ends of each pair (means)",
                   ["type", "what", "pair", "L2", "L2/param", "cosine"], rows)


def method_setting(r: dict) -> tuple:
    """(task, type, upgrade, regime) of a methods row: what the methods table and convergence figure group by."""
    regime = "full" if r["regime"] == "full" else f"{r['shots']}-shot"
    return r["task"], r["tuning_type"], f"M{r['source_plm_index']}->M{r['target_plm_index']}", regime


def method_knobs(r: dict) -> tuple:
    """(T, a, β, transfer method): what tells a method's variants apart in one setting."""
    return r["temperature"], r["kd_weight"], r["beta"], r.get("transfer")


def methods_table(scope: StudyRows) -> list[dict]:
    """Per setting (task, type, upgrade, regime) and method: test accuracy, steps to target and area under the dev
    curve over seeds; for the distilling methods the (T, a, β) with the best mean dev accuracy (K-shot dev in the
    few-shot regime, as the paper selects) stands for the method, and for transfer_init the transfer method."""
    runs = defaultdict(lambda: defaultdict(list))
    for r in scope.ok_rows("methods_runs"):
        runs[method_setting(r)][(r["method"], method_knobs(r))].append(r)
    table = []
    for setting, by_variant in sorted(runs.items()):
        for method in RECYCLING_METHODS:
            variants = {k: v for k, v in by_variant.items() if k[0] == method}
            if not variants:
                continue
            knobs, rows = max(variants.items(), key=lambda kv: mean(r["best_dev_accuracy"] for r in kv[1]))
            reached = [r["steps_to_target"] for r in rows if r["steps_to_target"] is not None]
            table.append({"task": setting[0], "tuning_type": setting[1], "upgrade": setting[2], "regime": setting[3],
                          "method": method, "knobs": knobs[1], "seeds": len(rows),
                          "by_seed": {r["seed"]: r for r in rows},
                          "test": [r["test_accuracy"] for r in rows],
                          "test_full_dev_selection": [r["full_dev_test_accuracy"] for r in rows],
                          "steps_to_target": reached, "reached": f"{len(reached)}/{len(rows)}",
                          "auc": [r["dev_auc"] for r in rows], "start": [r["start_dev_accuracy"] for r in rows]})
    return table


def methods_by_setting(table: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The methods table as (task, type, upgrade, regime) → method → its entry: what every paired comparison of
    two methods in one setting reads."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in table:
        out[(r["task"], r["tuning_type"], r["upgrade"], r["regime"])][r["method"]] = r
    return out


def _knob_text(knobs: tuple) -> str:
    if knobs[3] is not None:
        return f"from {knobs[3]}"
    return "" if knobs[0] is None else f"T={knobs[0]:g} a={knobs[1]:g} β={knobs[2]:g}"


def _methods_summary(scope: StudyRows) -> Section:
    curves = Curves(scope)
    rows = []
    for r in methods_table(scope):
        flat = [curves.convergence(run)["plateau"] for run in r["by_seed"].values()]
        rows.append([r["task"], r["tuning_type"], r["upgrade"], r["regime"], r["method"], _knob_text(r["knobs"]),
                     _mean_std(r["test"]), _mean_std(r["test_full_dev_selection"]),
                     fmt(mean(r["steps_to_target"]), digits=0) + f" ({r['reached']})", _mean_std(r["auc"]),
                     _mean_std(r["start"]),
                     "—" if None in flat else f"{sum(flat)}/{len(flat)}"])
    return Section("Recycling methods (for distill and combined the best T, a, β on dev; for transfer_init the best "
                   "transfer method on dev): test accuracy % (dev selection / full-dev selection), steps to 95% of "
                   "vanilla's best dev (runs that reached it), area under the dev curve %, dev accuracy % at step 0 "
                   "(mean±std over seeds), "
                   "runs at their plateau (last 3 full-dev evaluations within 2 points of the best)",
                   ["task", "type", "upgrade", "regime", "method", "best knobs", "test", "test (full dev)",
                    "steps to target", "dev AUC", "start", "plateau"], rows)


def _grid_summary(scope: StudyRows) -> Section:
    groups = defaultdict(list)
    for r in scope.ok_rows("methods_runs"):
        if r["temperature"] is not None:
            groups[(r["tuning_type"], method_setting(r)[3], r["method"]) + method_knobs(r)].append(r)
    rows = [[t, regime, m, f"{temp:g}", f"{a:g}", f"{beta:g}", len(v), _mean_std([r["best_dev_accuracy"] for r in v]),
             _mean_std([r["test_accuracy"] for r in v])] for (t, regime, m, temp, a, beta, _), v in sorted(groups.items())]
    return Section("Distillation grid: dev / test accuracy % (means over tasks, upgrades and seeds)",
                   ["type", "regime", "method", "T", "a", "β", "runs", "best dev", "test"], rows)


def _search_summary(scope: StudyRows) -> Section:
    """Per setting and method: the best trial of each seed's Optuna search (by dev), averaged over seeds."""
    best = defaultdict(dict)
    counts = defaultdict(int)
    for r in scope.ok_rows("methods_search"):
        key = method_setting(r) + (r["method"],)
        counts[key] += 1
        if r["seed"] not in best[key] or r["best_dev_accuracy"] > best[key][r["seed"]]["best_dev_accuracy"]:
            best[key][r["seed"]] = r
    rows = []
    for key, by_seed in sorted(best.items()):
        top = max(by_seed.values(), key=lambda r: r["best_dev_accuracy"])
        knobs = f"lr={top['lr']:.3g}" + ("" if top["temperature"] is None else
                                         f" T={top['temperature']:.3g} a={top['kd_weight']:.3g} β={top['beta']:.3g}")
        rows.append(list(key) + [counts[key], _mean_std([r["best_dev_accuracy"] for r in by_seed.values()]),
                                 _mean_std([r["test_accuracy"] for r in by_seed.values()]), knobs])
    return Section("Optuna search (--search optuna): per seed the trial with the best dev accuracy; mean±std over "
                   "seeds of its dev and test accuracy %, and the knobs of the best trial overall",
                   ["task", "type", "upgrade", "regime", "method", "trials", "best dev", "test", "best knobs"],
                   rows)


def _training_free_summary(scope: StudyRows) -> Section:
    groups = defaultdict(list)
    for r in scope.ok_rows("training_free"):
        kind = "same task" if r["map_task"] == r["task"] else "other task"
        groups[(r["tuning_type"], f"M{r['source_plm_index']}->M{r['target_plm_index']}", kind)].append(r)
    rows = [[t, up, kind, len(v), _mean_std([r["direct_test_accuracy"] for r in v]),
             _mean_std([r["mapped_test_accuracy"] for r in v])] for (t, up, kind), v in sorted(groups.items())]
    return Section("Training-free recycling: old PET weights on the new PLM, directly vs through a map trained on "
                   "another (or the same) task — test accuracy %",
                   ["type", "upgrade", "map trained on", "rows", "direct", "mapped"], rows)


def table_sections(scope: StudyRows) -> list[Section]:
    """Every summary table."""
    return [_pretrain_summary(scope), _tuning_summary(scope), _retention_summary(scope), _compatibility_summary(scope),
            _path_summary(scope), _head_summary(scope), _distance_summary(scope), _methods_summary(scope),
            _grid_summary(scope), _search_summary(scope), _training_free_summary(scope), _transfer_summary(scope),
            _transfer_start_summary(scope), _text_distill_summary(scope), _recycle_summary(scope),
            _ledger_summary(scope)]


def _transfer_summary(scope: StudyRows) -> Section:
    from raysys.report import transfer
    from raysys.report.findings import statistics_of

    return transfer.transfer_section(scope, statistics_of(scope))


def _transfer_start_summary(scope: StudyRows) -> Section:
    from raysys.report import transfer
    from raysys.report.findings import statistics_of

    return transfer.start_section(scope, statistics_of(scope))


def _text_distill_summary(scope: StudyRows) -> Section:
    from raysys.report import transfer
    from raysys.report.findings import statistics_of

    return transfer.text_distill_section(scope, statistics_of(scope), methods_table(scope))


def _recycle_summary(scope: StudyRows) -> Section:
    from raysys.report import transfer
    from raysys.report.findings import statistics_of

    return transfer.recycle_section(scope, statistics_of(scope))


def _ledger_summary(scope: StudyRows) -> Section:
    from raysys.report import ledger
    from raysys.report.findings import statistics_of

    return ledger.ledger_section(scope, methods_table(scope), statistics_of(scope))
