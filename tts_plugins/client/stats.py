"""Paired statistics for comparing methods run on the same problems.

Every method in a ``tts bench`` run answers the same problems, so a difference
between two methods is measured problem by problem: the paired bootstrap
resamples problems (keeping each problem's pair of outcomes together), and
McNemar's exact test counts only the discordant problems (right under one
method, wrong under the other). Both are far tighter than comparing two
separate intervals when the methods agree on most problems.

Small-sample intervals that stay honest at the edges: Wilson's score interval for one proportion (10/10 right is
not certainty), Newcombe's paired-difference interval built from it (non-degenerate when no problem is discordant),
a paired bootstrap for a ratio of means, and Holm's step-down adjustment for a family of p-values.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from statistics import NormalDist


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_mean(x: Sequence[float], resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x``."""
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(x[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return _percentile(means, (1 - level) / 2), _percentile(means, 1 - (1 - level) / 2)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)``: the paired difference and its percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are the two methods' outcomes (1/0 for right/wrong, or any score) on problem ``i``;
    a resample draws problems with replacement and keeps each problem's pair together."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    lo, hi = bootstrap_mean(d, resamples, seed, level)
    return _mean(d), lo, hi


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """``(a right and b wrong, a wrong and b right)`` problem counts."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    return sum(bool(x) and not bool(y) for x, y in zip(a, b)), sum(bool(y) and not bool(x) for x, y in zip(a, b))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: under the null, each of the ``n`` discordant problems is equally likely to
    favour either method, so the smaller count is Binomial(n, 1/2); p = min(1, 2 P(X <= smaller)); 1 when n = 0."""
    x, y = discordant(a, b)
    n = x + y
    if n == 0:
        return 1.0
    k = min(x, y)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are right: ``1 - C(n-c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def point_biserial(lengths: Sequence[float], correct: Sequence[bool]) -> float | None:
    """Pearson correlation of a length with a 0/1 outcome; None when either is constant."""
    n = len(lengths)
    if n < 2 or len(set(lengths)) < 2 or len(set(map(bool, correct))) < 2:
        return None
    ml, mc = _mean(lengths), _mean([float(c) for c in correct])
    cov = sum((x - ml) * (float(c) - mc) for x, c in zip(lengths, correct)) / n
    sl = math.sqrt(sum((x - ml) ** 2 for x in lengths) / n)
    sc = math.sqrt(mc * (1 - mc))
    return cov / (sl * sc)


def normal_quantile(p: float) -> float:
    """The standard normal quantile (inverse CDF) at ``p``, e.g. 1.959964 at 0.975."""
    return NormalDist().inv_cdf(p)


def _two_sided_z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return normal_quantile(1 - (1 - level) / 2)


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for the proportion ``k / n``; ``(nan, nan)`` when ``n = 0``.

    Unlike the Wald interval it never collapses at 0/n or n/n (10/10 gives about (0.722, 1)) and stays inside
    [0, 1]: it is the set of ``p`` that a score test with ``z = normal_quantile(1 - (1 - level) / 2)`` does not reject,
    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n, got k={k}, n={n}")
    z = _two_sided_z(level)
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def newcombe_paired(a: Sequence[bool], b: Sequence[bool], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)``: Newcombe's (1998, Stat Med 17:2873-2890) method 10 for paired proportions.

    Each margin gets a Wilson interval, ``(l1, u1)`` around ``p1 = mean(a)`` and ``(l2, u2)`` around ``p2 = mean(b)``,
    and they are combined with the correlation between the pair: ``low = d - sqrt((p1-l1)² - 2 phi (p1-l1)(u2-p2)
    + (u2-p2)²)``, ``high = d + sqrt((u1-p1)² - 2 phi (u1-p1)(p2-l2) + (p2-l2)²)``. With ``e, f, g, h`` the counts
    of (both right, only a right, only b right, both wrong), ``phi = C / sqrt((e+f)(g+h)(e+g)(f+h))`` where Newcombe
    takes ``C = eh - fg - n/2`` when ``eh - fg > n/2``, ``0`` when ``0 <= eh - fg <= n/2`` and ``eh - fg`` when it is
    negative; ``phi = 0`` when a margin is 0 or n (the denominator is 0). The ``n/2`` correction keeps the interval
    non-degenerate when no pair is discordant, where the Wald interval and an uncorrected phi of 1 give (0, 0)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    e = f = g = h = 0
    for x, y in zip(a, b):
        x, y = bool(x), bool(y)
        e += x and y
        f += x and not y
        g += y and not x
        h += not x and not y
    p1, p2 = (e + f) / n, (e + g) / n
    d = (f - g) / n
    l1, u1 = wilson(e + f, n, level)
    l2, u2 = wilson(e + g, n, level)
    denominator = (e + f) * (g + h) * (e + g) * (f + h)
    phi = 0.0
    if denominator > 0:
        cross = e * h - f * g
        c = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
        phi = c / math.sqrt(denominator)
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    low = d - math.sqrt(max(0.0, dl1 * dl1 - 2 * phi * dl1 * du2 + du2 * du2))
    high = d + math.sqrt(max(0.0, du1 * du1 - 2 * phi * du1 * dl2 + dl2 * dl2))
    return d, max(-1.0, low), min(1.0, high)


def ratio_of_means(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """``(sum(a) / sum(b), low, high)``: a ratio of paired means (e.g. tokens under method a over method b on the
    same problems) with a paired percentile bootstrap interval.

    Each resample draws problem indices with replacement, keeps each problem's pair together and recomputes the
    ratio of the resampled sums, so the denominator's own sampling noise is in the interval (dividing by the fixed
    observed mean of ``b`` would leave it out). Resamples whose denominator is 0 are skipped; the point estimate is
    nan when ``sum(b)`` is 0, and everything is nan for empty input. Deterministic for a given seed."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    _two_sided_z(level)
    n = len(a)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    x, y = [float(v) for v in a], [float(v) for v in b]
    sb = sum(y)
    point = sum(x) / sb if sb != 0 else float("nan")
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        den = sum(y[i] for i in idx)
        if den != 0:
            ratios.append(sum(x[i] for i in idx) / den)
    ratios.sort()
    return point, _percentile(ratios, (1 - level) / 2), _percentile(ratios, 1 - (1 - level) / 2)


def holm(pvalues: Sequence[float | None]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order, for comparing several methods against one baseline.

    Step-down: the i-th smallest of the ``m`` p-values (i = 0, 1, ...) is multiplied by ``m - i``, a running maximum
    keeps the adjusted values monotone, and they are capped at 1. It controls the family-wise error rate with no
    independence assumption and is uniformly more powerful than plain Bonferroni. None/NaN entries come back as nan and
    do not count in ``m``."""
    out = [float("nan")] * len(pvalues)
    valid = [(float(p), i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    for p, _ in valid:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values must be in [0, 1], got {p}")
    m = len(valid)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


__all__ = ["bootstrap_mean", "discordant", "holm", "mcnemar", "newcombe_paired", "normal_quantile", "paired_bootstrap", "pass_at_k",
           "point_biserial", "ratio_of_means", "wilson"]
