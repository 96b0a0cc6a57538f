"""bench/compare.py: its ratios read the right way round, and sweep efficiency comes from a study's own rows."""

import importlib.util
import sys
from pathlib import Path

import pytest

from raysys.stages import registry
from raysys.stages.chain import plan_chain, planned_cells

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there; trials import `noop_stage` by this name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return _load("compare")


def test_a_ratio_is_the_median_pair_and_its_goal_reads_the_stated_way(compare):
    faster = compare.Ratio("speed-up", "ours", "theirs", [1.0, 1.0, 2.0], [3.0, 2.5, 8.0], goal=3.0)
    assert faster.ratios == [3.0, 2.5, 4.0] and faster.ratio == 3.0 and faster.met is True
    overhead = compare.Ratio("cost", "vanilla", "distill", [1.0, 1.0], [1.3, 1.1], goal=1.15, higher_is_better=False)
    assert overhead.ratio == pytest.approx(1.2) and overhead.met is False
    per_cell = compare.Ratio("ray", "raysys", "plain", [0.25, 0.15, 0.18], [1.0, 1.0, 1.0], None, a_goal_seconds=0.2)
    assert per_cell.met is True and "raysys ≤ 0.2 s" in per_cell.row()
    calls = []
    a, b = compare.side_by_side(lambda: calls.append("a") or 1.0, lambda: calls.append("b") or 2.0, pairs=2)
    assert calls == ["a", "b"] * 3 and a == [1.0, 1.0] and b == [2.0, 2.0]  # a warm-up pair, then A B A B


def test_a_stage_of_another_module_is_found_by_its_trials_and_the_studys_own_need_no_module():
    noop = _load("noop_stage")
    assert registry.stage("noop", "noop_stage").name == "noop"
    assert all(registry.origin(stage) == {} for stage in registry.STAGES)  # trial configs as before
    assert registry.origin(noop.STAGE) == {"module": "noop_stage"}
    with pytest.raises(KeyError, match="unknown stage 'nope'.*none in noop_stage"):
        registry.stage("nope", "noop_stage")


def test_sweep_efficiency_spans_each_stages_planned_cells_from_their_rows(compare, micro_run):
    study, store, _ = micro_run
    spans = compare.stage_spans(store.root)
    chain = plan_chain(study)
    for name, span in spans.items():
        stage = registry.stage(name)
        assert span["cells"] == len(planned_cells(stage, study, chain)), name
        assert span["end"] > span["start"] and span["compute"] > 0
    assert {"pretrain", "tuning", "compatibility", "interpolation", "methods"} <= set(spans)
    eff = compare.efficiency(spans, cpus=2.0)
    # a stage's cells cannot have computed for longer than its span on every CPU (1 % for clock granularity)
    assert all(0 < value <= 1.01 for value in eff.values()), eff
    one = {"s": {"cells": 2, "start": 0.0, "end": 10.0, "compute": 15.0}}
    assert compare.efficiency(one, cpus=2.0) == {"s": 0.75}
