"""The transfer stage on the micro study: plain copying is the compatibility test, a method that cannot apply says
why, each grid is chosen on dev, and the settings move Δ by what their definitions say."""

import json
import math

import pytest

from raysys.storage import results

PAIR = ("task", "tuning_type", "seed", "source_plm_index", "target_plm_index")


@pytest.fixture(scope="module")
def transfer_rows(micro_run):
    _, store, _ = micro_run
    rows = results.read_table(store, "transfer").to_pylist()
    assert rows and all(r["status"] == "ok" for r in rows)
    return rows


def _by_cell(rows):
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], *(r[k] for k in PAIR)), []).append(r)
    return cells


def test_every_pair_has_every_method(micro_run, transfer_rows):
    study, _, _ = micro_run
    cells = _by_cell(transfer_rows)
    pairs = {key[1:] for key in cells}
    assert len(pairs) == len(study.tasks) * len(study.tuning.types) * len(study.seeds) * len(study.transfer_pairs)
    assert {key[0] for key in cells} == set(study.transfer.names)
    assert len(cells) == len(pairs) * len(study.transfer.names)


def test_copy_is_the_compatibility_test(micro_run, transfer_rows):
    _, store, _ = micro_run
    compat = {tuple(r[k] for k in PAIR): r for r in results.read_table(store, "compatibility").to_pylist()}
    copies = [r for r in transfer_rows if r["method"] == "copy"]
    assert len(copies) == len({tuple(r[k] for k in PAIR) for r in copies}) > 0
    for r in copies:
        c = compat[tuple(r[k] for k in PAIR)]
        # the same weights: exactly for fine-tuning and adapters, up to a LoRA merge's rounding
        assert r["test_loss"] == pytest.approx(c["test_loss"], abs=1e-4), r["tuning_type"]
        assert r["dev_loss"] == pytest.approx(c["dev_loss"], abs=1e-4)
        assert abs(r["test_accuracy"] - c["test_accuracy"]) <= 1 / 64 + 1e-9
        assert r["relative_change"] == 0.0 and r["selected"]


def test_a_method_that_cannot_apply_says_why(transfer_rows):
    cells = _by_cell(transfer_rows)
    for (method, task, tuning_type, seed, i, j), rows in cells.items():
        svd_on_adapter = method in ("svd", "subspace") and tuning_type == "adapter"
        without_history = method == "multi_version" and i == 0
        if svd_on_adapter or without_history:
            assert len(rows) == 1 and rows[0]["applicable"] is False, (method, tuning_type, i)
            assert ("adapter" in rows[0]["reason"]) if svd_on_adapter else ("M_0" in rows[0]["reason"])
            assert rows[0]["test_accuracy"] is None
        else:
            assert all(r["applicable"] for r in rows) and all(r["reason"] is None for r in rows)
    merged = [r for r in transfer_rows if r["method"] == "multi_version" and r["applicable"]]
    assert merged and all(r["num_versions"] == r["source_plm_index"] + 1 for r in merged)  # every M_k, k <= i


def test_each_grid_is_chosen_on_dev_and_scored_on_test_once(micro_run, transfer_rows):
    study, _, _ = micro_run
    for (method, *_), rows in _by_cell(transfer_rows).items():
        if not rows[0]["applicable"]:
            continue
        assert [json.loads(r["setting"]) for r in rows] == study.transfer.grid(method)
        chosen = [r for r in rows if r["selected"]]
        assert len(chosen) == 1 and chosen[0]["dev_accuracy"] == max(r["dev_accuracy"] for r in rows)
        assert all((r["test_accuracy"] is None) == (not r["selected"]) for r in rows)


def test_settings_move_delta_as_defined(transfer_rows):
    cells = _by_cell(transfer_rows)
    checked = 0
    for (method, *pair), rows in cells.items():
        if method != "scaled":
            continue
        copy = cells[("copy", *pair)][0]
        for r in rows:
            scale = json.loads(r["setting"])["scale"]
            assert r["relative_change"] == pytest.approx(abs(scale - 1.0), abs=1e-6)  # ‖λΔ − Δ‖ / ‖Δ‖
            if scale == 1.0:  # the same weights as plain copying, the same dev score
                assert (r["dev_accuracy"], r["dev_loss"]) == (copy["dev_accuracy"], copy["dev_loss"])
                checked += 1
    assert checked > 0
    for method in ("dare", "ties", "svd", "subspace"):
        changes = [r["relative_change"] for (m, *_), rows in cells.items() if m == method for r in rows
                   if r["applicable"]]
        assert changes and all(0.0 < c and math.isfinite(c) for c in changes), method
