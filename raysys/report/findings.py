"""The findings table: each claim of the paper, the evidence this study's tables hold for it, and a verdict.

Every verdict comes from a stated rule applied per *setting* (a task × tuning type × upgrade, or a tuning type ×
layer): "holds" when every setting passes, "mostly holds (k/n)" for a majority, "partly (k/n)" for some,
"does not hold" for none, "no data" when the stage has not produced rows. The rules are deliberately simple and
printed beside the verdict, so a reader can disagree with the threshold rather than with hidden arithmetic.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from raysys.report.scope import StudyRows
from raysys.report.tables import fmt, mean

LEARNED_MARGIN = 0.10  # an old model "learned the task" when it beats the majority baseline by this much
COMPAT_MARGIN = 0.02  # Δ_i on M_j must beat the untrained head on M_j by this much
LMC_MAX_DROP = 0.05  # a path is "connected" when its accuracy never falls more than this below the line
HEAD_MARGIN = 0.05  # corresponding heads must be this much more similar than non-corresponding ones
AUC_MARGIN = 0.02  # init must raise the area under the dev curve by this much


@dataclass(frozen=True)
class Finding:
    claim: str
    evidence: str
    rule: str
    verdict: str


def verdict(passed: int, total: int) -> str:
    if total == 0:
        return "no data"
    if passed == total:
        return "holds"
    if passed == 0:
        return "does not hold"
    return f"mostly holds ({passed}/{total})" if 2 * passed > total else f"partly ({passed}/{total})"


def _pct(value: float | None) -> str:
    return fmt(value, 100) + ("" if value is None else "%")


def _by(rows, key, value) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[key(r)].append(r[value])
    return {k: mean(v) for k, v in out.items()}


def compatibility(scope: StudyRows) -> Finding:
    """One hop (Δ_i on M_{i+1}), over the settings whose old model learned its task."""
    tuned = _by((r for r in scope.ok_rows("tuning_runs") if r["chain"] == "main"),
                lambda r: (r["task"], r["tuning_type"], r["plm_index"]), "test_accuracy")
    base = _by(scope.ok_rows("baselines"), lambda r: (r["task"], r["plm_index"], r["kind"]),
               "test_accuracy")
    compat = _by(scope.ok_rows("compatibility"),
                 lambda r: (r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"]),
                 "test_accuracy")
    by_hop = defaultdict(list)
    for (task, kind, i, j), acc in compat.items():
        old, majority = tuned.get((task, kind, i)), base.get((task, i, "majority"))
        untrained = base.get((task, j, "untrained_head"))
        if None in (old, majority, untrained) or old < majority + LEARNED_MARGIN:
            continue
        by_hop[j - i].append((acc, untrained, tuned.get((task, kind, j))))
    parts = []
    for hop, cells in sorted(by_hop.items()):
        passed = sum(acc >= untrained + COMPAT_MARGIN for acc, untrained, _ in cells)
        parts.append(f"{hop} hop{'s' if hop > 1 else ''}, {len(cells)} settings: Δ_i on M_i+{hop} "
                     f"{_pct(mean(c[0] for c in cells))} vs untrained head {_pct(mean(c[1] for c in cells))} vs "
                     f"re-tuned {_pct(mean(c[2] for c in cells))} ({passed}/{len(cells)} above the untrained head)")
    one = by_hop.get(1, [])
    return Finding(
        "Outdated adapted weights remain compatible with the upgraded PLM to some extent",
        "; ".join(parts) or "no compatibility cell whose old model learned its task",
        f"per (task, type) upgrade M_i→M_i+1 whose old model beat majority by ≥{100 * LEARNED_MARGIN:g} points: "
        f"Δ_i on M_i+1 beats the untrained head by ≥{100 * COMPAT_MARGIN:g} points",
        verdict(sum(acc >= u + COMPAT_MARGIN for acc, u, _ in one), len(one)))


def mode_connectivity(scope: StudyRows) -> Finding:
    """Per tuning type, one-hop continual paths: the accuracy drop below the straight line, against the control."""
    groups = defaultdict(list)
    for r in scope.ok_rows("interpolation_paths"):
        if r["split"] == "test" and r["plm_index_b"] - r["plm_index_a"] == 1:
            groups[(r["tuning_type"], r["pair_kind"])].append(r)
    types = sorted({t for t, _ in groups})
    parts, passed, caveats = [], 0, []
    for t in types:
        cont, ctrl = groups.get((t, "continual"), []), groups.get((t, "control"), [])
        drop, ctrl_drop = mean(r["accuracy_drop"] for r in cont), mean(r["accuracy_drop"] for r in ctrl)
        passed += drop is not None and drop <= LMC_MAX_DROP
        barrier = {kind: fmt(mean(r["loss_barrier"] for r in rows), digits=3)
                   for kind, rows in (("continual", cont), ("control", ctrl))}
        parts.append(f"{t}: acc drop {_pct(drop)} continual vs {_pct(ctrl_drop)} control, loss barrier "
                     f"{barrier['continual']} vs {barrier['control']}")
        ends = mean(r[k] for r in cont for k in ("accuracy_a", "accuracy_b"))
        ctrl_ends = mean(r[k] for r in ctrl for k in ("accuracy_a", "accuracy_b"))
        if ends is not None and ctrl_ends is not None and ends - ctrl_ends > LEARNED_MARGIN:
            caveats.append(t)
    evidence = "; ".join(parts) or "no interpolation path"
    if caveats:
        evidence += (f". Caveat ({', '.join(caveats)}): the control paths' ends are >{100 * LEARNED_MARGIN:g} points "
                     "less accurate than the continual ones, so a flat control path says little")
    return Finding("Linear mode connectivity between the adapted old and new PLM (one hop)", evidence,
                   f"per tuning type: mean test accuracy drop below the line α·acc_b + (1−α)·acc_a "
                   f"≤ {100 * LMC_MAX_DROP:g} points on continual paths", verdict(passed, len(types)))


def head_similarity(scope: StudyRows) -> Finding:
    groups = defaultdict(list)
    for r in scope.ok_rows("head_similarity"):
        groups[(r["tuning_type"], r["layer"], r["pair_kind"])].append(r)
    settings = sorted({(t, layer) for t, layer, _ in groups})
    parts, passed = [], 0
    for t, layer in settings:
        margin = {kind: mean(r["similarity_corresponding"] - r["similarity_noncorresponding"]
                              for r in groups.get((t, layer, kind), [])) for kind in ("continual", "control")}
        ok = margin["continual"] is not None and margin["continual"] >= HEAD_MARGIN and (
            margin["control"] is None or margin["continual"] > margin["control"])
        passed += ok
        parts.append(f"{t} L{layer}: {fmt(margin['continual'], digits=3)} vs control "
                     f"{fmt(margin['control'], digits=3)}")
    return Finding("Corresponding attention heads of the two adapted models behave alike",
                   "similarity margin, corresponding − non-corresponding heads: " + "; ".join(parts)
                   if parts else "no head-similarity rows",
                   f"per (type, layer): continual margin ≥ {HEAD_MARGIN:g} and above the control pairs' margin",
                   verdict(passed, len(settings)))


def _settings(table: list[dict]) -> dict:
    out = defaultdict(dict)
    for r in table:
        out[(r["task"], r["tuning_type"], r["upgrade"], r["regime"])][r["method"]] = r
    return out


def _label(setting: tuple) -> str:
    task, kind, upgrade, regime = setting
    return f"{kind} {regime} {upgrade} {task}"


def init_convergence(methods_table: list[dict]) -> Finding:
    parts, passed, total = [], 0, 0
    for setting, m in sorted(_settings(methods_table).items()):
        if "init" not in m or "vanilla" not in m:
            continue
        auc, auc_v = mean(m["init"]["auc"]), mean(m["vanilla"]["auc"])
        total += 1
        passed += auc >= auc_v + AUC_MARGIN
        parts.append(f"{_label(setting)}: AUC {_pct(auc)} vs {_pct(auc_v)}, steps to target "
                     f"{_steps(m['init'])} vs {_steps(m['vanilla'])}")
    return Finding("Initialization-based recycling speeds up convergence", "; ".join(parts) or "no init runs",
                   f"per setting: mean area under the dev-accuracy curve of init ≥ vanilla's + {100 * AUC_MARGIN:g} "
                   "points (steps to 95% of vanilla's best dev shown beside it)", verdict(passed, total))


def _steps(row: dict) -> str:
    steps = mean(row["steps_to_target"])
    return ("never" if steps is None else f"{steps:.0f}") + f" ({row['reached']})"


def distillation_kshot(methods_table: list[dict]) -> Finding:
    parts, passed, total = [], 0, 0
    for setting, m in sorted(_settings(methods_table).items()):
        if setting[3] == "full" or "distill" not in m or "vanilla" not in m:
            continue
        test, test_v = mean(m["distill"]["test"]), mean(m["vanilla"]["test"])
        total += 1
        passed += test > test_v
        parts.append(f"{_label(setting)}: {_pct(test)} vs {_pct(test_v)} "
                     f"(seed std {_pct(_std(m['distill']['test']))} / {_pct(_std(m['vanilla']['test']))})")
    return Finding("Distillation-based recycling helps in the K-shot regime", "; ".join(parts) or "no K-shot runs",
                   "per K-shot setting: mean test accuracy of distill (best T, a, β on K-shot dev) > vanilla's",
                   verdict(passed, total))


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def combined_best(methods_table: list[dict]) -> Finding:
    parts, passed, total = [], 0, 0
    for setting, m in sorted(_settings(methods_table).items()):
        if "combined" not in m or len(m) < 2:
            continue
        means = {method: mean(r["test"]) for method, r in m.items()}
        best = max(means, key=means.get)
        total += 1
        passed += means["combined"] >= means[best]
        parts.append(f"{_label(setting)}: combined {_pct(means['combined'])}, best other "
                     f"{max((v, k) for k, v in means.items() if k != 'combined')[1]} "
                     f"{_pct(max(v for k, v in means.items() if k != 'combined'))}")
    return Finding("Combining initialization and distillation is the best method", "; ".join(parts) or
                   "no combined runs", "per setting: combined has the highest mean test accuracy of the methods run",
                   verdict(passed, total))


def findings(scope: StudyRows, methods_table: list[dict]) -> list[Finding]:
    return [compatibility(scope), mode_connectivity(scope), head_similarity(scope),
            init_convergence(methods_table), distillation_kshot(methods_table), combined_best(methods_table)]


def markdown(rows: list[Finding]) -> str:
    cell = lambda text: text.replace("|", "\\|")
    lines = ["| claim of the paper | verdict here | evidence | rule |", "|---|---|---|---|"]
    lines += [f"| {cell(f.claim)} | **{f.verdict}** | {cell(f.evidence)} | {cell(f.rule)} |" for f in rows]
    return "\n".join(lines)


def text(rows: list[Finding]) -> str:
    return "\n".join(f"- {f.claim}: {f.verdict.upper()}\n    evidence: {f.evidence}\n    rule: {f.rule}"
                     for f in rows)
