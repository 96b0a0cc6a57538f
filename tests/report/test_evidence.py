"""The lookups the findings pair: late convergence, censored steps to target, plateaus (pure functions)."""

import pytest

from raysys.report.evidence import late_auc, late_steps, plateaued


def _curve(accs, key="dev_accuracy"):
    return [{"step": 10 * k, key: a} for k, a in enumerate(accs)]


def test_the_late_area_starts_at_the_first_evaluation_after_step_0():
    assert late_auc(_curve([0.9, 0.5, 0.5, 0.5])) == pytest.approx(0.5)  # the head start at step 0 does not count
    assert late_auc(_curve([0.2, 0.4, 0.6])) == pytest.approx(0.5)
    assert late_auc(_curve([0.3])) is None


def test_steps_to_target_never_count_step_0_and_a_run_that_never_reaches_counts_as_its_budget():
    assert late_steps(_curve([0.9, 0.5, 0.9]), 0.8, 100) == (20, True)
    assert late_steps(_curve([0.9, 0.5, 0.6]), 0.8, 100) == (100, False)
    assert late_steps(_curve([0.9]), None, 100) is None


def test_a_plateau_is_the_last_three_evaluations_within_two_points_of_the_best():
    key = "full_dev_accuracy"
    assert plateaued(_curve([0.2, 0.70, 0.71, 0.70, 0.72], key)) is True
    assert plateaued(_curve([0.2, 0.5, 0.6, 0.7], key)) is False  # still rising
    assert plateaued(_curve([0.2, 0.8, 0.7, 0.7, 0.7], key)) is False  # fell from an earlier best
    assert plateaued(_curve([0.2, 0.5])) is None  # no full-dev column
