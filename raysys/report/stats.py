"""Paired statistics for the findings: effects, confidence intervals and a test, as pure functions.

The cells of one seed share their K-shot sample, data order and dropout stream across methods (and a task's
test set across PLMs), so a claim is judged on differences *paired* by seed (and pooled over a claim's
settings, paired by task, type and seed), not on seed means. An effect is *shown* when its mean reaches the
rule's margin and its confidence interval excludes zero; it is *ruled out* when the whole interval lies below the
margin. Between the two the data cannot tell, and the verdict says so rather than flipping a coin.

The interval is Student's t on the paired differences (exact for normal differences, and honest about how little
two or three seeds say) or a percentile bootstrap; the test is the exact sign-flip permutation test (every sign
pattern up to 16 pairs, a seeded Monte Carlo beyond). Nothing here imports more than the standard library.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

INTERVALS = ("t", "bootstrap")
_EXACT_PAIRS = 16  # up to 2^16 sign patterns are enumerated; beyond, a Monte Carlo sample
_MONTE_CARLO = 20_000


# ------------------------------------------------------------------------------------- Student's t, by hand


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p (bisection: monotone, and exact enough for an interval's ends)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


# ---------------------------------------------------------------------------------------------- intervals


def t_interval(diffs: list[float], confidence: float) -> tuple[float, float]:
    """The two-sided `confidence` interval of the mean of `diffs` (n ≥ 2)."""
    n, centre = len(diffs), statistics.fmean(diffs)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return centre - half, centre + half


def bootstrap_interval(diffs: list[float], confidence: float, resamples: int, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `diffs` (seeded: a report regenerates identically)."""
    rng, n = random.Random(seed), len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    return means[math.floor(tail * (resamples - 1))], means[math.ceil((1.0 - tail) * (resamples - 1))]


def _flipped_sums(diffs: list[float]):
    """A function of a bit mask: the sum of the differences whose bit is set. Per group of 8 pairs a table of its
    256 subset sums, so one sign pattern costs n/8 lookups rather than n additions."""
    tables = []
    for start in range(0, len(diffs), 8):
        table = [0.0]
        for d in diffs[start:start + 8]:
            table += [t + d for t in table]
        tables.append(table)
    return lambda mask: sum(table[(mask >> 8 * g) & 255] for g, table in enumerate(tables))


def sign_flip_p(diffs: list[float], seed: int = 0) -> float:
    """Two-sided p-value of the mean difference under the null that each pair's sign is a coin flip: exact
    enumeration up to 16 pairs (so the smallest p n pairs can give is 2/2^n), a seeded Monte Carlo beyond. A sign
    pattern is a bit mask (a set bit flips its pair): the signed sum is the total minus twice the flipped ones."""
    n, total = len(diffs), sum(diffs)
    observed = abs(total) - 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    flipped = _flipped_sums(diffs)
    if n <= _EXACT_PAIRS:
        return sum(abs(total - 2.0 * flipped(mask)) >= observed for mask in range(2 ** n)) / 2 ** n
    rng = random.Random(seed)
    hits = sum(abs(total - 2.0 * flipped(rng.getrandbits(n))) >= observed for _ in range(_MONTE_CARLO))
    return (hits + 1) / (_MONTE_CARLO + 1)


# ------------------------------------------------------------------------------------------------ effects


def mean(values) -> float | None:
    """The mean of the values that are not None; None when none is."""
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None



@dataclass(frozen=True)
class Effect:
    """The mean of n paired differences (positive = in the claim's direction), its interval and p-value."""

    n: int
    mean: float | None
    low: float | None
    high: float | None
    p_value: float | None

    def shown(self, margin: float) -> bool:
        """The effect reaches the margin and its interval excludes zero."""
        return self.low is not None and self.mean >= margin and self.low > 0.0

    def ruled_out(self, margin: float) -> bool:
        """The whole interval lies below the margin: the data say the effect is smaller than the rule asks."""
        return self.high is not None and self.high < margin

    def text(self, scale: float = 100.0, unit: str = " points", digits: int = 1) -> str:
        if self.mean is None:
            return "n=0"
        value = lambda v: f"{scale * v:+.{digits}f}"
        if self.low is None:
            return f"{value(self.mean)}{unit}, n={self.n} (no interval from one pair)"
        return f"{value(self.mean)}{unit} [{value(self.low)}, {value(self.high)}], n={self.n}, p={self.p_value:.2g}"


@dataclass(frozen=True)
class Statistics:
    """How effects are measured: the confidence level and the kind of interval (the report's config)."""

    confidence: float = 0.95
    interval: str = "t"
    resamples: int = 10_000

    def effect(self, diffs) -> Effect:
        diffs = [float(d) for d in diffs if d is not None]
        n = len(diffs)
        if n == 0:
            return Effect(0, None, None, None, None)
        centre = statistics.fmean(diffs)
        if n == 1:
            return Effect(1, centre, None, None, None)
        if self.interval == "t":
            low, high = t_interval(diffs, self.confidence)
        else:
            low, high = bootstrap_interval(diffs, self.confidence, self.resamples)
        return Effect(n, centre, low, high, sign_flip_p(diffs))

    def describe(self) -> str:
        kind = "Student's t" if self.interval == "t" else f"percentile bootstrap ({self.resamples} resamples)"
        return f"{100 * self.confidence:g}% {kind} interval, exact sign-flip p"


def paired(a: dict, b: dict) -> list[float]:
    """a[k] − b[k] over the keys both hold (in key order), skipping missing values."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b), key=repr) if a[k] is not None and b[k] is not None]


def verdict(passes: list[bool], pooled_shown: bool, pooled_ruled_out: bool) -> str:
    """The verdict on a claim from which of its settings pass their test and from the pooled test. 'holds'
    needs every setting to pass; 'mostly holds (k/n)' a majority, with the pooled test passed; otherwise the
    pooled test decides between 'holds pooled' (shown over the settings together, in few alone), 'partly',
    'does not hold' (ruled out: the interval lies below the margin) and 'not shown' (it straddles the margin)."""
    total, passed = len(passes), sum(passes)
    if total == 0:
        return "no data"
    if passed == total:
        return "holds"
    if pooled_shown:
        return f"mostly holds ({passed}/{total})" if 2 * passed > total else f"holds pooled ({passed}/{total} alone)"
    if passed:
        return f"partly ({passed}/{total})"
    return "does not hold" if pooled_ruled_out else "not shown"


def judge(effects: list[Effect], pooled: Effect, margin: float) -> str:
    """The verdict when each setting's test is its effect reaching `margin` (raysys.report.stats.verdict)."""
    return verdict([e.shown(margin) for e in effects], pooled.shown(margin), pooled.ruled_out(margin))
