"""The findings table: verdicts follow the stated rules on hand-made tables (written as real Parquet rows), with
paired statistics: an effect within the seeds' noise is not shown, a clear one is."""

import dataclasses

from raysys.config import ReportConfig, load_study
from raysys.report import findings, tables
from raysys.report.scope import StudyRows
from raysys.storage import results
from raysys.storage.store import Store

SEEDS = (20, 30, 40)


def _every_row(store, **report):
    """The rules on every row written here (their made-up cell hashes are no study's plan)."""
    study = load_study("tiny")
    study = dataclasses.replace(study, report=dataclasses.replace(ReportConfig(), **report))
    return StudyRows(study, store, everything=True)


def _write(store, table, rows, prefix=None):
    for i, row in enumerate(rows):
        results.write_rows(store, table, row.get("cell_hash", f"{prefix or table}-{i}"), [{"status": "ok", **row}])


def _write_curves(store, points):
    by_cell = {}
    for p in points:
        by_cell.setdefault(p["cell_hash"], []).append(p)
    for cell, rows in by_cell.items():
        results.write_rows(store, "methods_curves", cell, rows)


def _tuned(task, kind, plm, accs):
    return [{"chain": "main", "task": task, "tuning_type": kind, "plm_index": plm, "seed": s, "test_accuracy": a}
            for s, a in zip(SEEDS, accs)]


def _baseline(task, plm, kind, acc):
    return [{"task": task, "plm_index": plm, "seed": s, "kind": kind, "test_accuracy": acc} for s in SEEDS]


def _compat(task, kind, accs, i=0, j=1):
    return [{"task": task, "tuning_type": kind, "source_plm_index": i, "target_plm_index": j, "seed": s,
             "test_accuracy": a} for s, a in zip(SEEDS, accs)]


def test_compatibility_is_judged_against_the_majority_class_when_it_beats_the_untrained_head(tmp_path):
    """The ChemProt case: a Δ scoring the majority class far above an untrained head is not compatible."""
    store = Store(tmp_path)
    _write(store, "tuning_runs", _tuned("t", "finetune", 0, [0.80, 0.82, 0.81]) +
           _tuned("t", "finetune", 1, [0.85, 0.86, 0.84]) + _tuned("t", "lora", 0, [0.37, 0.36, 0.38]))
    _write(store, "baselines", _baseline("t", 0, "majority", 0.362) + _baseline("t", 1, "majority", 0.362) +
           _baseline("t", 0, "untrained_head", 0.063) + _baseline("t", 1, "untrained_head", 0.063))
    _write(store, "compatibility", _compat("t", "finetune", [0.361, 0.362, 0.360]) +
           _compat("t", "lora", [0.20, 0.20, 0.20]), prefix="c")
    f = findings.compatibility(_every_row(store))
    assert f.verdict == "does not hold"  # at the floor, to a tenth of a point: ruled out at a 2-point margin
    assert "1 of 2 settings whose old model learned its task" in f.evidence  # LoRA's old model did not learn
    assert "floor 36.2%" in f.evidence and "n=3" in f.effect


def test_compatibility_holds_on_a_clear_effect_and_says_how_much_of_re_tuning_it_recovers(tmp_path):
    store = Store(tmp_path)
    _write(store, "tuning_runs", _tuned("t", "finetune", 0, [0.80, 0.82, 0.81]) +
           _tuned("t", "finetune", 1, [0.85, 0.85, 0.85]))
    _write(store, "baselines", _baseline("t", 0, "majority", 0.25) + _baseline("t", 1, "untrained_head", 0.25))
    _write(store, "compatibility", _compat("t", "finetune", [0.60, 0.61, 0.59]), prefix="c")
    f = findings.compatibility(_every_row(store))
    assert f.verdict == "holds"
    assert "recovers 58% of re-tuning's gain" in f.evidence  # (60 − 25) / (85 − 25)
    assert f.effect.startswith("+35.0 points [") and "n=3" in f.effect
    assert "2 points" in f.rule and "95% Student's t interval" in f.rule


def test_compatibility_within_the_seeds_noise_is_not_shown(tmp_path):
    store = Store(tmp_path)
    _write(store, "tuning_runs", _tuned("t", "finetune", 0, [0.80, 0.82, 0.81]))
    _write(store, "baselines", _baseline("t", 0, "majority", 0.25) + _baseline("t", 1, "majority", 0.25))
    _write(store, "compatibility", _compat("t", "finetune", [0.20, 0.35, 0.30]), prefix="c")
    assert findings.compatibility(_every_row(store)).verdict == "not shown"


def _path(kind, t, seed, drop, ends=(0.8, 0.8), task="t", b=1, chain_b="main"):
    return {"split": "test", "pair_kind": kind, "tuning_type": t, "task": task, "seed": seed, "plm_index_a": 0,
            "plm_index_b": b, "chain_b": chain_b, "accuracy_drop": drop, "loss_barrier": drop,
            "accuracy_a": ends[0], "accuracy_b": ends[1]}


def _paths(store, control_drop):
    _write(store, "baselines", _baseline("t", 0, "majority", 0.25) + _baseline("t", 1, "untrained_head", 0.25))
    drops = {20: 0.010, 30: 0.012, 40: 0.008}
    _write(store, "interpolation_paths", [
        *(_path("continual", "finetune", s, d) for s, d in drops.items()),
        *(_path("control", "finetune", s, control_drop, chain_b="control") for s in SEEDS),
        *(_path("same_plm", "finetune", s, 0.005, b=0) for s in SEEDS),
        *(_path("continual", "lora", s, 0.0, ends=(0.26, 0.8)) for s in SEEDS),  # an end at chance: left out
        {**_path("continual", "finetune", 20, 0.5), "split": "dev"}])  # dev rows are not the evidence


def test_mode_connectivity_uses_only_paths_whose_ends_learned_and_compares_with_control_and_same_plm(tmp_path):
    _paths(store := Store(tmp_path / "a"), control_drop=0.30)
    f = findings.mode_connectivity(_every_row(store))
    assert f.verdict == "holds"
    assert "finetune: 3 continual paths, drop mean 1.0, median 1.0, worst 1.2" in f.evidence
    assert "lora" not in f.evidence.split(".")[0] and "3 continual paths left out" in f.evidence
    assert "control − continual +29.0 points" in f.evidence and "continual − same-PLM +0.5 points" in f.evidence
    # Continual paths no better connected than the control's do not pass.
    _paths(store := Store(tmp_path / "b"), control_drop=0.01)
    assert findings.mode_connectivity(_every_row(store)).verdict == "not shown"


def test_mode_connectivity_of_an_old_store_without_reference_pairs_says_so(tmp_path):
    store = Store(tmp_path)
    _write(store, "baselines", _baseline("t", 0, "majority", 0.25))
    _write(store, "interpolation_paths", [_path("continual", "adapter", s, d)
                                          for s, d in zip(SEEDS, (0.20, 0.25, 0.22))])
    f = findings.mode_connectivity(_every_row(store))
    assert f.verdict == "does not hold"  # drops of 20-25 points: the interval lies above the 5-point limit
    assert "no control paths" in f.evidence and "no same-PLM reference paths" in f.evidence


def test_head_similarity_averages_heads_per_pair_and_needs_the_margin_above_control(tmp_path):
    store = Store(tmp_path)
    row = lambda kind, layer, seed, head, c: {"pair_kind": kind, "tuning_type": "finetune", "layer": layer,
                                              "task": "t", "seed": seed, "plm_index_a": 0, "head": head,
                                              "similarity_corresponding": c, "similarity_noncorresponding": 0.5}
    rows = [row("continual", 0, s, h, 0.9 + 0.01 * h + 0.001 * s) for s in SEEDS for h in range(4)]
    rows += [row("control", 0, s, h, 0.5) for s in SEEDS for h in range(4)]
    noisy = {20: 0.52, 30: 0.59, 40: 0.54}  # a 5-point margin on average, within the seeds' noise
    rows += [row("continual", 1, s, h, noisy[s]) for s in SEEDS for h in range(4)]
    _write(store, "head_similarity", rows)
    f = findings.head_similarity(_every_row(store))
    assert f.verdict == "holds pooled (1/2 alone)"
    assert "finetune L0: +0.445 [" in f.evidence and "over control +0.445" in f.evidence
    assert "finetune L1: +0.050 [" in f.evidence and "n=3" in f.evidence


def _run(method, regime, seed, test, cell, target=0.5, dev=0.5, knobs=(None, None, None)):
    return {"cell_hash": cell, "method": method, "task": "t", "tuning_type": "finetune", "seed": seed,
            "source_plm_index": 0, "target_plm_index": 1, "regime": regime, "shots": None if regime == "full" else 8,
            "temperature": knobs[0], "kd_weight": knobs[1], "beta": knobs[2], "test_accuracy": test,
            "full_dev_test_accuracy": test, "best_dev_accuracy": dev, "target_dev_accuracy": target,
            "max_steps": 30, "dev_auc": None, "start_dev_accuracy": None, "steps_to_target": None}


def _curve(cell, accs, method="vanilla", regime="full", seed=20):
    return [{"cell_hash": cell, "method": method, "regime": regime, "seed": seed, "step": 10 * k,
             "dev_accuracy": a} for k, a in enumerate(accs)]


def test_init_is_judged_from_the_first_evaluation_after_step_0(tmp_path):
    """A head start at step 0 alone (compatibility) does not make init converge faster."""
    store = Store(tmp_path)
    runs, curves = [], []
    for s in SEEDS:
        runs += [_run("vanilla", "full", s, 0.5, f"v{s}"), _run("init", "full", s, 0.5, f"i{s}")]
        curves += _curve(f"v{s}", [0.25, 0.50, 0.50, 0.50], seed=s) + _curve(f"i{s}", [0.80, 0.50, 0.50, 0.50],
                                                                               "init", seed=s)
    _write(store, "methods_runs", runs)
    _write_curves(store, curves)
    scope = _every_row(store)
    f = findings.init_convergence(scope, tables.methods_table(scope))
    assert f.verdict in ("does not hold", "not shown")
    assert "late AUC init − vanilla +0.0 points" in f.evidence
    assert "(reached 3/3 vs 3/3)" in f.evidence


def test_init_that_is_faster_after_step_0_holds_and_runs_that_never_reach_count_as_the_budget(tmp_path):
    store = Store(tmp_path)
    runs, curves = [], []
    for k, s in enumerate(SEEDS):
        runs += [_run("vanilla", "full", s, 0.5, f"v{s}", target=0.6), _run("init", "full", s, 0.5, f"i{s}",
                                                                              target=0.6)]
        curves += _curve(f"v{s}", [0.25, 0.30, 0.40 + 0.01 * k, 0.55], seed=s)  # never reaches 0.6: 30 steps
        curves += _curve(f"i{s}", [0.25, 0.60 + 0.01 * k, 0.62, 0.62], "init", seed=s)  # 10 steps
    _write(store, "methods_runs", runs)
    _write_curves(store, curves)
    scope = _every_row(store)
    f = findings.init_convergence(scope, tables.methods_table(scope))
    assert f.verdict == "holds"
    assert "steps to target vanilla − init +20.0 steps" in f.evidence and "(reached 3/3 vs 0/3)" in f.evidence


def test_distillation_and_combined_are_paired_by_seed(tmp_path):
    store = Store(tmp_path)
    knobs = (5.0, 0.7, 10.0)
    runs = []
    for k, s in enumerate(SEEDS):
        base = 0.40 + 0.05 * k  # seeds differ a lot; the paired differences do not
        runs += [_run("vanilla", "kshot", s, base, f"v{s}"),
                 _run("distill", "kshot", s, base + 0.05 + 0.002 * k, f"d{s}", knobs=knobs),
                 _run("combined", "kshot", s, base + 0.051 - 0.002 * k, f"c{s}", knobs=knobs)]
    _write(store, "methods_runs", runs)
    scope = _every_row(store)
    table = tables.methods_table(scope)
    distill = findings.distillation_kshot(scope, table)
    assert distill.verdict == "holds" and "distill − vanilla +5.2 points" in distill.evidence
    combined = findings.combined_best(scope, table)
    assert "best other distill" in combined.evidence and combined.verdict == "not shown"
    # The seeds spread over 10 points, twice the effect: only the pairing shows it.
    spread = [r["test_accuracy"] for r in runs if r["method"] == "distill"]
    assert max(spread) - min(spread) > 0.05


def test_margins_come_from_the_report_config(tmp_path):
    store = Store(tmp_path)
    _write(store, "tuning_runs", _tuned("t", "finetune", 0, [0.80, 0.82, 0.81]))
    _write(store, "baselines", _baseline("t", 0, "majority", 0.25) + _baseline("t", 1, "majority", 0.25))
    _write(store, "compatibility", _compat("t", "finetune", [0.28, 0.285, 0.29]), prefix="c")
    assert findings.compatibility(_every_row(store)).verdict == "holds"  # +3.5 points over a 2-point margin
    strict = findings.compatibility(_every_row(store, compat_margin=0.10))
    assert strict.verdict == "does not hold" and "10 points" in strict.rule


def test_report_carries_the_findings_table(tmp_path):
    scope = StudyRows(load_study("tiny"), Store(tmp_path / "store"))
    table = findings.markdown(findings.findings(scope, tables.methods_table(scope)))
    assert table.count("\n") == 8  # header, rule, seven claims
    assert table.count("**no data**") == 7
    assert "pooled effect [interval], n" in table
