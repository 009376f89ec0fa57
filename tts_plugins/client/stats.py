"""Paired statistics for comparing methods run on the same problems.

Every method in a ``tts bench`` run answers the same problems, so a difference
between two methods is measured problem by problem: the paired bootstrap
resamples problems (keeping each problem's pair of outcomes together), and
McNemar's exact test counts only the discordant problems (right under one
method, wrong under the other). Both are far tighter than comparing two
separate intervals when the methods agree on most problems.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


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


__all__ = ["bootstrap_mean", "discordant", "mcnemar", "paired_bootstrap", "pass_at_k", "point_biserial"]
