"""Paired statistics: the t distribution against printed tables, the sign-flip test's exact values, and verdicts
on constructed differences (pure noise never holds; a clear effect does)."""

import random

import pytest

from raysys.report.stats import (
    Effect,
    Statistics,
    bootstrap_interval,
    judge,
    paired,
    sign_flip_p,
    t_cdf,
    t_quantile,
    verdict,
)


@pytest.mark.parametrize("df,q975,q995", [(1, 12.706, 63.657), (2, 4.303, 9.925), (5, 2.571, 4.032),
                                          (10, 2.228, 3.169), (30, 2.042, 2.750)])
def test_t_quantiles_match_the_printed_table(df, q975, q995):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-3)
    assert t_quantile(0.995, df) == pytest.approx(q995, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-3)


def test_t_cdf_is_symmetric_and_known_at_a_point():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(-2.0, 4) == pytest.approx(0.0581, abs=1e-4)
    assert t_cdf(2.0, 4) + t_cdf(-2.0, 4) == pytest.approx(1.0)


def test_the_sign_flip_test_is_exact_for_few_pairs():
    assert sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # only all-plus and all-minus reach the observed
    assert sign_flip_p([0.1, -0.1, 0.1, -0.1]) == 1.0
    assert sign_flip_p([0.05] * 10) == pytest.approx(2 / 1024)
    assert sign_flip_p([0.05] * 20) < 1e-3  # Monte Carlo beyond 16 pairs


def test_an_effect_with_two_seeds_has_the_wide_interval_of_one_degree_of_freedom():
    effect = Statistics().effect([0.10, 0.12])
    assert effect.mean == pytest.approx(0.11)
    half = 12.706 * 0.01414 / 2 ** 0.5
    assert effect.low == pytest.approx(0.11 - half, abs=1e-3) and effect.high == pytest.approx(0.11 + half, abs=1e-3)
    assert not effect.shown(0.02)  # two agreeing seeds cannot show an effect at 95%
    assert "n=2" in effect.text() and "[" in effect.text()


def test_missing_values_are_skipped_and_one_pair_gives_no_interval():
    effect = Statistics().effect([0.3, None])
    assert effect.n == 1 and effect.low is None and not effect.shown(0.0)
    assert "no interval" in effect.text()
    assert Statistics().effect([]).text() == "n=0"


def test_the_bootstrap_interval_is_seeded_and_brackets_the_mean():
    diffs = [0.05, 0.07, 0.02, 0.09, 0.04, 0.06]
    a, b = bootstrap_interval(diffs, 0.95, 2000), bootstrap_interval(diffs, 0.95, 2000)
    assert a == b and a[0] < sum(diffs) / len(diffs) < a[1]
    assert Statistics(interval="bootstrap", resamples=2000).effect(diffs).shown(0.02)


def test_paired_matches_keys_and_drops_the_unmatched():
    assert paired({20: 0.5, 30: 0.6, 40: 0.7}, {30: 0.4, 20: 0.5, 50: 0.1}) == pytest.approx([0.0, 0.2])


def _noise_settings(rng, settings=4, seeds=3, sd=0.05):
    return [[rng.gauss(0.0, sd) for _ in range(seeds)] for _ in range(settings)]


def test_pure_noise_never_holds_and_passes_pooled_at_most_at_the_tests_level():
    rng, stats = random.Random(7), Statistics()
    verdicts = []
    for _ in range(300):
        settings = _noise_settings(rng)
        verdicts.append(judge([stats.effect(s) for s in settings], stats.effect([d for s in settings for d in s]),
                              0.02))
    assert "holds" not in verdicts and not any(v.startswith("mostly") for v in verdicts)
    false_pooled = sum(v.startswith("holds pooled") for v in verdicts) / len(verdicts)
    assert false_pooled < 0.05  # 2.5% expected (one-sided at 95%): 7.5 of 300, sd 2.7
    clear = [[0.10 + rng.gauss(0.0, 0.01) for _ in range(3)] for _ in range(4)]
    assert judge([stats.effect(s) for s in clear], stats.effect([d for s in clear for d in s]), 0.02) == "holds"


def test_verdict_falls_back_on_the_pooled_effect():
    shown = Effect(12, 0.05, 0.03, 0.07, 0.001)
    straddling = Effect(12, 0.01, -0.02, 0.04, 0.4)
    below = Effect(12, -0.05, -0.08, -0.01, 0.01)
    pooled = lambda e: (e.shown(0.02), e.ruled_out(0.02))
    assert verdict([], *pooled(shown)) == "no data"
    assert verdict([True, True], *pooled(straddling)) == "holds"
    assert verdict([True, True, False], *pooled(shown)) == "mostly holds (2/3)"
    assert verdict([True, False, False], *pooled(shown)) == "holds pooled (1/3 alone)"
    assert verdict([True, False, False], *pooled(straddling)) == "partly (1/3)"
    assert verdict([False, False], *pooled(straddling)) == "not shown"
    assert verdict([False, False], *pooled(below)) == "does not hold"
