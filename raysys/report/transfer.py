"""The report's reading of the `transfer` table: each method's dev-chosen setting against plain copying on the same
pair, paired by task, type, seed and pair; and the claim of the 2026 evaluation that plain copying is as good as
the elaborate transfer schemes, judged on this study's rows."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

from raysys.config import TRANSFER_METHODS
from raysys.report.scope import StudyRows
from raysys.report.stats import Effect, Statistics, mean, paired
from raysys.report.tables import Section, fmt, methods_by_setting

REFERENCE = TRANSFER_METHODS[0]  # "copy": λ = 1, the compatibility test
CLAIM = "Plain copying is as good as the elaborate transfer schemes (PortLLM-style copying vs DARE, TIES, SVD, ...)"


def chosen_rows(scope: StudyRows) -> dict[str, dict[tuple, dict]]:
    """method → (task, type, seed, i, j) → its row on the setting chosen on dev (applicable methods only)."""
    out: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for r in scope.ok_rows("transfer"):
        if r["applicable"] and r["selected"]:
            key = (r["task"], r["tuning_type"], r["seed"], r["source_plm_index"], r["target_plm_index"])
            out[r["method"]][key] = r
    return out


def not_applicable(scope: StudyRows) -> dict[tuple[str, str], str]:
    """(method, type) → why the method did not run there (one reason per pair, as its rows give it)."""
    return {(r["method"], r["tuning_type"]): r["reason"] for r in scope.ok_rows("transfer") if not r["applicable"]}


def _test(rows: dict[tuple, dict]) -> dict[tuple, float]:
    return {k: r["test_accuracy"] for k, r in rows.items()}


def method_effects(scope: StudyRows, stats: Statistics) -> dict[str, Effect]:
    """Per method other than copying: its test accuracy minus copying's, paired over every pair both ran on."""
    chosen = chosen_rows(scope)
    copy = _test(chosen.get(REFERENCE, {}))
    return {m: stats.effect(paired(_test(chosen[m]), copy)) for m in TRANSFER_METHODS if m != REFERENCE and m in chosen}


def transfer_section(scope: StudyRows, stats: Statistics) -> Section:
    chosen, skipped = chosen_rows(scope), not_applicable(scope)
    copy = _test(chosen.get(REFERENCE, {}))
    by_hop: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # (method, type) → hop → keys
    for method, rows in chosen.items():
        for key in rows:
            by_hop[(method, key[1])][key[4] - key[3]].append(key)
    out = []
    for method in TRANSFER_METHODS:
        for tuning_type in scope.study.tuning.types:
            hops = by_hop.get((method, tuning_type), {})
            if not hops and (method, tuning_type) in skipped:
                out.append([method, tuning_type, "—", 0, "n/a", "—", skipped[(method, tuning_type)], "—"])
            for hop, keys in sorted(hops.items()):
                rows = {k: chosen[method][k] for k in keys}
                diff = "—" if method == REFERENCE else stats.effect(paired(_test(rows), copy)).text()
                setting = Counter(rows[k]["setting"] for k in keys).most_common(1)[0][0]
                out.append([method, tuning_type, hop, len(keys), fmt(mean(_test(rows).values()), 100),
                            fmt(mean(copy[k] for k in keys if k in copy), 100), diff, _setting(setting)])
    return Section("Training-free transfer of Δ_i onto M_j (setting chosen on dev per pair): test accuracy %, and "
                   f"the method minus plain copying on the same pairs ({stats.describe()})",
                   ["method", "type", "hops", "pairs", "test", "copy", "method − copy", "most chosen setting"], out)


def _method_runs(scope: StudyRows) -> dict[tuple, dict[tuple, dict]]:
    """(start, type) → (task, upgrade, regime, shots, seed) → the methods run: `init` (the paper's copy start) and
    each transferred start of `transfer_init`."""
    out: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for r in scope.ok_rows("methods_runs"):
        if r["method"] in ("init", "transfer_init"):
            start = r["transfer"] if r["method"] == "transfer_init" else REFERENCE
            key = (r["task"], r["source_plm_index"], r["target_plm_index"], r["regime"], r["shots"], r["seed"])
            out[(start, r["tuning_type"])][key] = r
    return out


def start_section(scope: StudyRows, stats: Statistics) -> Section:
    """Each transfer method as the start of tuning (the methods' transfer_init) against the paper's init, which
    starts from the copy: test accuracy and late area under the dev curve, paired by setting and seed."""
    from raysys.report.evidence import Curves

    runs, curves, out = _method_runs(scope), Curves(scope), []
    for (start, tuning_type), rows in sorted(runs.items(), key=lambda kv: (TRANSFER_METHODS.index(kv[0][0]),
                                                                          kv[0][1])):
        if start == REFERENCE:
            continue
        init = runs.get((REFERENCE, tuning_type), {})
        auc = {k: curves.convergence(r)["auc"] for k, r in rows.items()}
        init_auc = {k: curves.convergence(r)["auc"] for k, r in init.items() if k in rows}
        test = {k: r["test_accuracy"] for k, r in rows.items()}
        out.append([start, tuning_type, len(rows), fmt(mean(r["start_dev_accuracy"] for r in rows.values()), 100),
                    fmt(mean(test.values()), 100),
                    stats.effect(paired(test, {k: r["test_accuracy"] for k, r in init.items()})).text(),
                    stats.effect(paired(auc, init_auc)).text()])
    return Section("Transfer methods as the start of tuning (transfer_init; its transfer setting chosen on dev) "
                   "against init (the copy start): dev accuracy % at step 0, test accuracy %, and the start minus "
                   f"init on test and on the late area under the dev curve, paired by setting and seed "
                   f"({stats.describe()})",
                   ["start", "type", "runs", "start dev", "test", "test − init", "late AUC − init"], out)



def _setting(text: str) -> str:
    values = json.loads(text)
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "—"


def copying_verdict(effects: dict[str, Effect], margin: float) -> str:
    """'holds' when every method's gain over copying is ruled out at `margin` (its interval lies below it); 'does
    not hold' when some method is shown better by the margin; 'partly (k/n)' when only some gains are ruled out;
    'not shown' when none is either way."""
    if not effects:
        return "no data"
    better = sorted(m for m, e in effects.items() if e.shown(margin))
    if better:
        return f"does not hold ({', '.join(better)} better)"
    ruled_out = sum(e.ruled_out(margin) for e in effects.values())
    if ruled_out == len(effects):
        return "holds"
    return f"partly ({ruled_out}/{len(effects)})" if ruled_out else "not shown"


def text_distill_section(scope: StudyRows, stats: Statistics, methods_table: list[dict]) -> Section:
    """Distillation on unlabeled text of the new domain, then the K-shot fine-tune (text_distill), against the
    paper's K-shot distillation (its best T, a, β on K-shot dev) and against vanilla: test accuracy paired by seed
    per setting, pooled per tuning type."""
    pooled: dict[tuple[str, str], list] = defaultdict(list)
    for (_, tuning_type, _, _), methods in sorted(methods_by_setting(methods_table).items()):
        if "text_distill" not in methods:
            continue
        ours = {seed: r["test_accuracy"] for seed, r in methods["text_distill"]["by_seed"].items()}
        for rival in ("distill", "vanilla"):
            if rival in methods:
                theirs = {seed: r["test_accuracy"] for seed, r in methods[rival]["by_seed"].items()}
                pooled[(tuning_type, rival)] += paired(ours, theirs)
    rows = [[tuning_type, rival, stats.effect(diffs).text()] for (tuning_type, rival), diffs in sorted(pooled.items())]
    return Section("Distillation without task labels (text_distill: the old model teaches on unlabeled text of the "
                   "new domain, then the K-shot fine-tune): its test accuracy minus the paper's K-shot distillation "
                   f"and minus vanilla, paired by setting and seed ({stats.describe()})",
                   ["type", "against", "text_distill − it"], rows)


def recycle_section(scope: StudyRows, stats: Statistics) -> Section:
    """The recycle stage's choices against the transfer stage's full grid (the ground truth): per (task, type,
    upgrade), the (method, setting) the probe chose, its test accuracy, each probed method's test accuracy at its
    dev-chosen setting of the full grid, the full grid's own choice (the method best on the full dev set, per
    seed), and what the probe's choice cost against it, paired by seed — pooled over every cell in the last row."""
    chosen = chosen_rows(scope)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in scope.ok_rows("recycle"):
        if r["chosen"]:
            cells[(r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"])].append(r)
    probed = scope.study.recycle.methods
    out, pooled, agree = [], [], 0
    for (task, tuning_type, i, j), rows in sorted(cells.items()):
        keys = {r["seed"]: (task, tuning_type, r["seed"], i, j) for r in rows}
        ours = {r["seed"]: r["test_accuracy"] for r in rows}
        grid = {seed: _grid_choice(chosen, key) for seed, key in keys.items()}
        grid = {seed: g for seed, g in grid.items() if g is not None}
        regret = paired({s: g[1] for s, g in grid.items()}, ours)
        pooled += regret
        grid_methods = Counter(g[0] for g in grid.values())
        agree += bool(grid_methods) and grid_methods.most_common(1)[0][0] == rows[0]["method"]
        alternatives = [fmt(mean(chosen[m][k]["test_accuracy"] for k in keys.values() if k in chosen.get(m, {})),
                            100) for m in probed]
        out.append([task, tuning_type, f"M{i}->M{j}", f"{rows[0]['method']} ({_setting(rows[0]['setting'])})",
                     fmt(mean(r["probe_accuracy"] for r in rows), 100), fmt(mean(ours.values()), 100),
                     *alternatives, ", ".join(f"{m} ×{n}" for m, n in grid_methods.most_common()) or "—",
                     stats.effect(regret).text()])
    if out:
        out.append(["all", "", "", f"probe picked the grid's method in {agree}/{len(out)}", "", "",
                    *[""] * len(probed), "", stats.effect(pooled).text()])
    return Section("Recycling every stored Δ for a new PLM (recycle stage): the probe's choice "
                   f"({scope.study.recycle.probe_examples} dev examples) against the transfer stage's full grid — "
                   "test accuracy %; each probed method at its dev-chosen setting of the grid; the grid's own choice "
                   f"(best full-dev method per seed); grid choice minus the probe's, paired by seed ({stats.describe()})",
                   ["task", "type", "upgrade", "chosen", "probe", "test", *[f"{m} (grid)" for m in probed],
                    "grid's choice", "grid − chosen"], out)


def _grid_choice(chosen: dict[str, dict[tuple, dict]], key: tuple) -> tuple[str, float] | None:
    """(method, test accuracy) of the transfer method whose dev-chosen setting scored best on the full dev set for
    one pair and seed (dev loss, then the methods' order, break ties); None when the pair has no transfer rows."""
    rows = [(m, chosen[m][key]) for m in TRANSFER_METHODS if key in chosen.get(m, {})]
    if not rows:
        return None
    method, row = max(rows, key=lambda mr: (mr[1]["dev_accuracy"], -mr[1]["dev_loss"],
                                            -TRANSFER_METHODS.index(mr[0])))
    return method, row["test_accuracy"]
