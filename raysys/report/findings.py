"""The findings table: each claim of the paper, the evidence this study's tables hold for it, and a verdict.

Every claim is judged on paired differences (raysys.report.stats): per *setting* (a task × tuning type × upgrade,
or a tuning type × layer) over seeds, and pooled over the settings (paired by task, type and seed). A setting
passes when its effect reaches the rule's margin and the confidence interval excludes zero; the verdict counts
the settings that pass and falls back on the pooled effect (raysys.report.stats.verdict). The margins and the
confidence level are the study's `report` section, printed with each rule, so a reader can disagree with a
threshold rather than with hidden arithmetic; n, the effect and its interval are printed with each verdict.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from raysys.config import PAPER_METHODS
from raysys.report.evidence import Baselines, Curves, describe_spread, tuned_accuracy
from raysys.report.scope import StudyRows
from raysys.report.stats import Effect, Statistics, judge, mean, paired, verdict
from raysys.report.tables import fmt, methods_by_setting


@dataclass(frozen=True)
class Finding:
    claim: str
    evidence: str
    rule: str
    verdict: str
    effect: str = "—"  # the pooled effect the verdict rests on: mean [interval], n, p
    pooled: Effect | None = None  # that effect, as numbers
    scale: float = 100.0  # what the effect's text multiplies it by (100: accuracy in points)


def statistics_of(scope: StudyRows) -> Statistics:
    cfg = scope.study.report
    return Statistics(cfg.confidence, cfg.interval, cfg.bootstrap_resamples)


def _pct(value: float | None) -> str:
    return fmt(value, 100) + ("" if value is None else "%")


def _points(value: float) -> str:
    return f"{100 * value:g} points"


def _unless_unusable(result: str, had_rows: bool) -> str:
    """'no data' only when the stage wrote nothing: rows that exist but none of which qualify (no old model
    learned its task) leave the claim not shown."""
    return "not shown" if result == "no data" and had_rows else result


# ------------------------------------------------------------------------------------------- compatibility


def compatibility(scope: StudyRows) -> Finding:
    """Δ_i on M_j against the floor max(majority, untrained head on M_j), per (task, type, upgrade) whose old
    model learned its task, paired by seed; with the fraction of re-tuning's gain over the floor it recovers."""
    cfg, stats = scope.study.report, statistics_of(scope)
    tuned, floor = tuned_accuracy(scope), Baselines(scope)
    settings = defaultdict(dict)  # (hop, task, type, i, j) → seed → (Δ_i on M_j, floor on M_j, re-tuned, learned)
    for r in scope.ok_rows("compatibility"):
        task, kind, i, j, seed = r["task"], r["tuning_type"], r["source_plm_index"], r["target_plm_index"], r["seed"]
        old, base_i, base_j = tuned.get((task, kind, i, seed)), floor.of(task, i, seed), floor.of(task, j, seed)
        if None in (old, base_i, base_j):
            continue
        settings[(j - i, task, kind, i, j)][seed] = (r["test_accuracy"], base_j, tuned.get((task, kind, j, seed)),
                                                   old - base_i)
    learned = {k: v for k, v in settings.items() if mean(c[3] for c in v.values()) >= cfg.learned_margin}
    parts, one_hop = [], ([], Effect(0, None, None, None, None))
    for hop in sorted({k[0] for k in settings}):
        keys = [k for k in learned if k[0] == hop]
        cells = [c for k in keys for c in learned[k].values()]
        effects = [stats.effect(c[0] - c[1] for c in learned[k].values()) for k in keys]
        pooled = stats.effect(c[0] - c[1] for c in cells)
        gain = [c for c in cells if c[2] is not None]
        recovered = (sum(c[0] - c[1] for c in gain) / sum(c[2] - c[1] for c in gain)
                     if gain and sum(c[2] - c[1] for c in gain) > 0 else None)
        total = sum(k[0] == hop for k in settings)
        if not keys:
            parts.append(f"{hop} hop{'s' if hop > 1 else ''}: none of {total} settings' old models learned the task")
            continue
        parts.append(
            f"{hop} hop{'s' if hop > 1 else ''}, {len(keys)} of {total} settings whose old model learned its task: "
            f"Δ_i on M_i+{hop} {_pct(mean(c[0] for c in cells))} vs floor {_pct(mean(c[1] for c in cells))} vs "
            f"re-tuned {_pct(mean(c[2] for c in gain))}; over the floor {pooled.text()}; "
            f"{sum(e.shown(cfg.compat_margin) for e in effects)}/{len(effects)} settings shown alone; recovers "
            f"{fmt(recovered, 100, 0)}% of re-tuning's gain over the floor")
        if hop == 1:
            one_hop = (effects, pooled)
    return Finding(
        "Outdated adapted weights remain compatible with the upgraded PLM to some extent",
        "; ".join(parts) or "no compatibility cell",
        f"per (task, type) upgrade M_i→M_i+1 whose old model beat its floor by ≥ {_points(cfg.learned_margin)} "
        f"(floor = max(majority class, untrained head)): Δ_i on M_i+1 beats the floor on M_i+1 by ≥ "
        f"{_points(cfg.compat_margin)}, paired by seed; {stats.describe()}",
        _unless_unusable(judge(*one_hop, cfg.compat_margin), any(k[0] == 1 for k in settings)), one_hop[1].text(),
        one_hop[1])


# ------------------------------------------------------------------------------------------ mode connectivity


def _path_keys(r: dict) -> list[tuple]:
    """The (task, seed) a path is paired under: a same-PLM path under both its seeds (it is each one's floor)."""
    seeds = {r["seed"], r.get("seed_b") if r.get("seed_b") is not None else r["seed"]}
    return [(r["task"], seed) for seed in sorted(seeds)]


def _usable(r: dict, floor: Baselines, margin: float) -> bool:
    """Both ends learned the task: a path between two models at chance is flat and says nothing."""
    end_b = r["plm_index_b"] if r["chain_b"] in (None, "main") else None
    base_a, base_b = floor.of(r["task"], r["plm_index_a"], r["seed"]), floor.of(r["task"], end_b, r["seed"])
    return None not in (base_a, base_b) and r["accuracy_a"] >= base_a + margin and r["accuracy_b"] >= base_b + margin


def mode_connectivity(scope: StudyRows) -> Finding:
    """Per tuning type, one-hop continual paths whose ends learned the task: their drop below the straight line,
    against the control pairs (an independent origin) and the same-PLM reference (two seeds on one M_i)."""
    cfg, stats, floor = scope.study.report, statistics_of(scope), Baselines(scope)
    groups, dropped = defaultdict(dict), 0
    for r in scope.ok_rows("interpolation_paths"):
        hop = r["plm_index_b"] - r["plm_index_a"]
        if r["split"] != "test" or (hop != 1 and r["pair_kind"] != "same_plm"):
            continue
        if not _usable(r, floor, cfg.learned_margin):
            dropped += r["pair_kind"] == "continual"
            continue
        for key in _path_keys(r):
            groups[(r["tuning_type"], r["pair_kind"])].setdefault(key, []).append(r["accuracy_drop"])
    drops = {k: {path: mean(v) for path, v in paths.items()} for k, paths in groups.items()}
    types = sorted({t for t, kind in drops if kind == "continual"})
    parts, passes, pooled = [], [], {"connected": [], "vs_control": [], "over_floor": []}
    for t in types:
        cont, ctrl, same = (drops.get((t, kind), {}) for kind in ("continual", "control", "same_plm"))
        diffs = {"connected": [cfg.lmc_max_drop - d for d in cont.values()],
                 "vs_control": paired(ctrl, cont),  # > 0: better connected than from an independent origin
                 "over_floor": paired(cont, same)}  # the continual drop above the same-PLM reference's
        for name, values in diffs.items():
            pooled[name] += values
        connected, vs_control, over_floor = (stats.effect(v) for v in diffs.values())
        passes.append(_connected(connected, vs_control if ctrl else None, over_floor if same else None,
                                 cfg.lmc_max_drop))
        parts.append(f"{t}: {len(cont)} continual paths, drop {describe_spread(list(cont.values()))}; control − "
                     f"continual {vs_control.text() if ctrl else 'no control paths'}; continual − same-PLM "
                     f"{over_floor.text() if same else 'no same-PLM reference paths'}")
    effects = {name: stats.effect(values) for name, values in pooled.items()}
    pooled_ok = _connected(effects["connected"], effects["vs_control"] if pooled["vs_control"] else None,
                           effects["over_floor"] if pooled["over_floor"] else None, cfg.lmc_max_drop)
    evidence = "; ".join(parts) or "no interpolation path whose ends learned the task"
    if dropped:
        evidence += f". {dropped} continual paths left out: an end did not beat its floor by the learned margin"
    return Finding(
        "Linear mode connectivity between the adapted old and new PLM (one hop)", evidence,
        f"per tuning type, over one-hop paths whose ends beat their floor by ≥ {_points(cfg.learned_margin)}: the "
        f"test accuracy drop below the line α·acc_b + (1−α)·acc_a is below {_points(cfg.lmc_max_drop)} (effect: "
        f"{_points(cfg.lmc_max_drop)} − drop), below the control pairs' drop (paired by task and seed), and within "
        f"{_points(cfg.lmc_max_drop)} of the same-PLM reference's; {stats.describe()}",
        _unless_unusable(verdict(passes, pooled_ok, effects["connected"].ruled_out(0.0)), bool(dropped)),
        effects["connected"].text(), effects["connected"])


def _connected(connected: Effect, vs_control: Effect | None, over_floor: Effect | None, max_drop: float) -> bool:
    """Connected: the drop is below the limit, below the control pairs' (when there are any) and within the
    limit of the same-PLM reference's (when there is one)."""
    return connected.shown(0.0) and (vs_control is None or vs_control.shown(0.0)) and (
        over_floor is None or (over_floor.high is not None and over_floor.high < max_drop))


# ------------------------------------------------------------------------------------------ head similarity


def head_similarity(scope: StudyRows) -> Finding:
    """Per (type, layer): corresponding minus non-corresponding heads' similarity, averaged over heads per
    (task, seed) pair (heads of one model are not independent samples), against the control pairs'."""
    cfg, stats = scope.study.report, statistics_of(scope)
    groups = defaultdict(lambda: defaultdict(list))
    for r in scope.ok_rows("head_similarity"):
        groups[(r["tuning_type"], r["layer"], r["pair_kind"])][(r["task"], r["seed"], r["plm_index_a"])].append(
            r["similarity_corresponding"] - r["similarity_noncorresponding"])
    margins = {k: {pair: mean(v) for pair, v in pairs.items()} for k, pairs in groups.items()}
    settings = sorted({(t, layer) for t, layer, kind in margins if kind == "continual"})
    parts, passes, pooled = [], [], []
    for t, layer in settings:
        cont, ctrl = margins.get((t, layer, "continual"), {}), margins.get((t, layer, "control"), {})
        effect, vs_control = stats.effect(cont.values()), stats.effect(paired(cont, ctrl))
        passes.append(effect.shown(cfg.head_margin) and (not ctrl or vs_control.shown(0.0)))
        pooled += list(cont.values())
        parts.append(f"{t} L{layer}: {effect.text(1.0, '', 3)}; over control "
                     f"{vs_control.text(1.0, '', 3) if ctrl else 'no control pairs'}")
    pooled_effect = stats.effect(pooled)
    return Finding("Corresponding attention heads of the two adapted models behave alike",
                   "similarity margin, corresponding − non-corresponding heads: " + "; ".join(parts)
                   if parts else "no head-similarity rows",
                   f"per (type, layer): the continual pairs' margin ≥ {cfg.head_margin:g} and above the control "
                   f"pairs' (paired by task and seed); {stats.describe()}",
                   verdict(passes, pooled_effect.shown(cfg.head_margin), pooled_effect.ruled_out(cfg.head_margin)),
                   pooled_effect.text(1.0, "", 3), pooled_effect, 1.0)


# ------------------------------------------------------------------------------------------ recycling methods


def _label(setting: tuple) -> str:
    task, kind, upgrade, regime = setting
    return f"{kind} {regime} {upgrade} {task}"


def _per_seed(entry: dict, value) -> dict:
    return {seed: value(run) for seed, run in entry["by_seed"].items()}


def _test(entry: dict) -> dict:
    return _per_seed(entry, lambda run: run["test_accuracy"])


def init_convergence(scope: StudyRows, methods_table: list[dict]) -> Finding:
    """Init against vanilla on the area under the dev curve from the first evaluation after step 0 (the step-0
    head start alone, compatibility, cannot pass), paired by seed; steps to the target beside it, a run that
    never reached it counted as its whole budget."""
    cfg, stats, curves = scope.study.report, statistics_of(scope), Curves(scope)
    parts, effects, pooled = [], [], []
    for setting, m in sorted(methods_by_setting(methods_table).items()):
        if "init" not in m or "vanilla" not in m:
            continue
        conv = {name: _per_seed(m[name], curves.convergence) for name in ("init", "vanilla")}
        auc = paired(*({s: c["auc"] for s, c in conv[name].items()} for name in ("init", "vanilla")))
        steps = paired(*({s: c["steps"] for s, c in conv[name].items()} for name in ("vanilla", "init")))
        effects.append(stats.effect(auc))
        pooled += auc
        reached = {name: sum(bool(c["reached"]) for c in conv[name].values()) for name in conv}
        parts.append(f"{_label(setting)}: late AUC init − vanilla {effects[-1].text()}; steps to target vanilla − "
                     f"init {stats.effect(steps).text(1.0, ' steps')} (reached {reached['init']}/"
                     f"{len(conv['init'])} vs {reached['vanilla']}/{len(conv['vanilla'])})")
    pooled_effect = stats.effect(pooled)
    return Finding(
        "Initialization-based recycling speeds up convergence", "; ".join(parts) or "no init runs",
        f"per setting: the area under the dev-accuracy curve from the first evaluation after step 0 of init "
        f"exceeds vanilla's by ≥ {_points(cfg.auc_margin)}, paired by seed; steps to "
        f"{100 * scope.study.methods.target_fraction:g}% of vanilla's best dev beside it (never reached = the "
        f"budget); {stats.describe()}",
        judge(effects, pooled_effect, cfg.auc_margin), pooled_effect.text(), pooled_effect)


def _test_claim(scope: StudyRows, methods_table: list[dict], pick, claim: str, rule: str, margin: float,
                none: str) -> Finding:
    """A claim on test-accuracy differences paired by seed, per setting: `pick(setting, methods)` names the two
    methods compared and what to print of their means, or None to skip the setting."""
    stats = statistics_of(scope)
    parts, effects, pooled = [], [], []
    for setting, m in sorted(methods_by_setting(methods_table).items()):
        chosen = pick(setting, m)
        if chosen is None:
            continue
        a, b, means = chosen
        diffs = paired(_test(m[a]), _test(m[b]))
        effects.append(stats.effect(diffs))
        pooled += diffs
        parts.append(f"{_label(setting)}: {means}, {a} − {b} {effects[-1].text()}")
    pooled_effect = stats.effect(pooled)
    return Finding(claim, "; ".join(parts) or none, f"{rule}, paired by seed; {stats.describe()}",
                   judge(effects, pooled_effect, margin), pooled_effect.text(), pooled_effect)


def distillation_kshot(scope: StudyRows, methods_table: list[dict]) -> Finding:
    def pick(setting, m):
        if setting[3] == "full" or "distill" not in m or "vanilla" not in m:
            return None
        return "distill", "vanilla", f"{_pct(mean(m['distill']['test']))} vs {_pct(mean(m['vanilla']['test']))}"

    margin = scope.study.report.distill_margin
    return _test_claim(scope, methods_table, pick, "Distillation-based recycling helps in the K-shot regime",
                       f"per K-shot setting: test accuracy of distill (best T, a, β on K-shot dev) exceeds vanilla's "
                       f"by ≥ {_points(margin)}", margin, "no K-shot runs")


def combined_best(scope: StudyRows, methods_table: list[dict]) -> Finding:
    def pick(setting, m):
        others = {name: mean(e["test"]) for name, e in m.items() if name != "combined" and name in PAPER_METHODS}
        if "combined" not in m or not others:  # the paper's claim is among its methods (transfer_init aside)
            return None
        rival = max(others, key=others.get)  # the strongest other method by its mean: the hardest comparison
        return "combined", rival, (f"combined {_pct(mean(m['combined']['test']))}, best other {rival} "
                                   f"{_pct(others[rival])}")

    margin = scope.study.report.combined_margin
    return _test_claim(scope, methods_table, pick, "Combining initialization and distillation is the best method",
                       f"per setting: combined's test accuracy exceeds the best other method's (by mean) by ≥ "
                       f"{_points(margin)} with the interval above zero", margin, "no combined runs")


def copying_is_enough(scope: StudyRows) -> Finding:
    """Not the paper's claim: the 2026 evaluation's, that plain copying matches the transfer schemes since."""
    from raysys.report import transfer

    stats, margin = statistics_of(scope), scope.study.report.transfer_margin
    effects = transfer.method_effects(scope, stats)
    pooled = stats.effect([])
    if effects:  # the method closest to beating copying: the hardest case for the claim
        best = max(effects, key=lambda m: effects[m].mean if effects[m].mean is not None else float("-inf"))
        pooled = effects[best]
    evidence = "; ".join(f"{m} − copy {e.text()}" for m, e in effects.items()) or "no transfer rows"
    rule = (f"per method (its setting chosen on dev per pair): test accuracy minus plain copying's (λ = 1), paired by "
            f"task, type, seed and pair; holds when every method's interval lies below {_points(margin)}, fails when "
            f"a method is better by ≥ {_points(margin)} with its interval above zero; the effect shown is the "
            f"method with the largest mean gain; {stats.describe()}")
    return Finding(transfer.CLAIM, evidence, rule, transfer.copying_verdict(effects, margin),
                   pooled.text(), pooled if effects else None)


def findings(scope: StudyRows, methods_table: list[dict]) -> list[Finding]:
    return [compatibility(scope), mode_connectivity(scope), head_similarity(scope),
            init_convergence(scope, methods_table), distillation_kshot(scope, methods_table),
            combined_best(scope, methods_table), copying_is_enough(scope)]


def markdown(rows: list[Finding]) -> str:
    cell = lambda text: text.replace("|", "\\|")
    lines = ["| claim of the paper | verdict here | pooled effect [interval], n | evidence | rule |",
             "|---|---|---|---|---|"]
    lines += [f"| {cell(f.claim)} | **{f.verdict}** | {cell(f.effect)} | {cell(f.evidence)} | {cell(f.rule)} |"
              for f in rows]
    return "\n".join(lines)


def text(rows: list[Finding]) -> str:
    return "\n".join(f"- {f.claim}: {f.verdict.upper()}\n    pooled effect: {f.effect}\n    evidence: {f.evidence}"
                     f"\n    rule: {f.rule}" for f in rows)
