"""Small-sample statistics in ``tts_plugins.client.stats``: Wilson, Newcombe's paired interval, the ratio-of-means
bootstrap and Holm's adjustment, each against a hand computation done another way and against published values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.client import stats

Z975 = 1.959963984540054  # qnorm(0.975), the published 95% two-sided normal quantile


def _wilson_by_quadratic(k: int, n: int, z: float = Z975) -> tuple[float, float]:
    """The Wilson bounds as the two roots in p of the score equation (k/n - p)^2 = z^2 p (1 - p) / n, i.e.
    (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0, solved with the quadratic formula."""
    ph = k / n
    qa = 1 + z * z / n
    qb = -(2 * ph + z * z / n)
    qc = ph * ph
    root = math.sqrt(qb * qb - 4 * qa * qc)
    return (-qb - root) / (2 * qa), (-qb + root) / (2 * qa)


def _table(e: int, f: int, g: int, h: int) -> tuple[list[int], list[int]]:
    """Paired outcomes with e both right, f only a right, g only b right, h both wrong."""
    return [1] * e + [1] * f + [0] * g + [0] * h, [1] * e + [0] * f + [1] * g + [0] * h


def test_normal_quantile_is_the_published_constant():
    assert stats.normal_quantile(0.975) == pytest.approx(Z975, abs=1e-12)
    assert stats.normal_quantile(0.5) == 0.0


def test_wilson_matches_the_quadratic_roots_and_published_values():
    # by hand, k/n = 0/10, 10/10, 5/10 with z = 1.959964: 10/10 is not certainty.
    for k, n in [(0, 10), (10, 10), (5, 10), (3, 7), (81, 263)]:
        lo, hi = stats.wilson(k, n)
        hlo, hhi = _wilson_by_quadratic(k, n)
        assert lo == pytest.approx(hlo, abs=1e-12) and hi == pytest.approx(hhi, abs=1e-12)
    assert stats.wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=5e-5))
    assert stats.wilson(10, 10) == (pytest.approx(0.7225, abs=5e-5), 1.0)  # = 10 / (10 + z^2) = 0.72247
    assert stats.wilson(5, 10) == (pytest.approx(0.2366, abs=5e-5), pytest.approx(0.7634, abs=5e-5))
    # R binom::binom.confint(method = "wilson"), as stored in statsmodels' stats/tests/results/results_proportion.py
    for (k, n), (rlo, rhi) in {(18, 20): (0.6989663547715128, 0.972133518786232), (4, 20): (0.0806576625797981, 0.4160174322518935),
                               (4, 200): (0.00780442641634947, 0.05028708690582643), (190, 200): (0.910421851861224, 0.972617354399236),
                               (1, 30): (5.908590e-03, 0.16670391), (29, 30): (0.8332961, 0.9940914),
                               (0, 30): (0.0, 0.11351339), (30, 30): (0.8864866, 1.0)}.items():
        lo, hi = stats.wilson(k, n)
        assert lo == pytest.approx(rlo, abs=1e-7) and hi == pytest.approx(rhi, abs=1e-7), (k, n)
    # Newcombe (1998, Stat Med 17:857-872), method 3 examples: 81/263 and 15/148
    assert stats.wilson(81, 263) == (pytest.approx(0.2553, abs=5e-5), pytest.approx(0.3662, abs=5e-5))
    assert stats.wilson(15, 148) == (pytest.approx(0.0624, abs=5e-5), pytest.approx(0.1605, abs=5e-5))
    lo99, hi99 = stats.wilson(5, 10, level=0.99)
    assert lo99 < 0.2366 and hi99 > 0.7634
    assert all(math.isnan(v) for v in stats.wilson(0, 0))
    with pytest.raises(ValueError):
        stats.wilson(11, 10)
    with pytest.raises(ValueError):
        stats.wilson(1, 10, level=1.0)


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
@settings(max_examples=80, deadline=None)
def test_wilson_contains_the_proportion_and_stays_in_the_unit_interval(kn):
    k, n = kn
    lo, hi = stats.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0 and lo < hi
    mlo, mhi = stats.wilson(n - k, n)  # symmetric under swapping successes and failures
    assert mlo == pytest.approx(1 - hi, abs=1e-12) and mhi == pytest.approx(1 - lo, abs=1e-12)


def test_newcombe_paired_matches_a_hand_computation():
    # Newcombe 1998 (Stat Med 17:2873-2890) example (b): e=18 both, f=12 only a, g=2 only b, h=18 neither; n = 50.
    a, b = _table(18, 12, 2, 18)
    n = 50
    p1, p2 = 30 / n, 20 / n  # margins (e+f)/n and (e+g)/n
    l1, u1 = _wilson_by_quadratic(30, n)
    l2, u2 = _wilson_by_quadratic(20, n)
    # eh - fg = 324 - 24 = 300 > n/2, so Newcombe's numerator is 300 - 25 = 275; denominator sqrt(30*20*20*30) = 600
    phi = 275 / 600
    d = (12 - 2) / n
    low = d - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = d + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    rd, rlo, rhi = stats.newcombe_paired(a, b)
    assert rd == pytest.approx(d) and rlo == pytest.approx(low, abs=1e-12) and rhi == pytest.approx(high, abs=1e-12)


@pytest.mark.parametrize("cells, published", [
    # Newcombe (1998), Stat Med 17:2873-2890, method 10 on the paper's examples (a)-(d), as (e, f, g, h) -> 95% limits;
    # the same four are the reference values in the R package propint's tests (tests/testthat/test_Two_Dependent_Props_CI.R).
    ((36, 12, 2, 0), (0.0569, 0.3404)),
    ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((53, 0, 0, 1), (-0.0729, 0.0729)),
    ((0, 30, 0, 0), (0.8395, 1.0)),
])
def test_newcombe_paired_reproduces_the_published_examples(cells, published):
    e, f, g, h = cells
    d, lo, hi = stats.newcombe_paired(*_table(e, f, g, h))
    assert d == pytest.approx((f - g) / (e + f + g + h))
    assert lo == pytest.approx(published[0], abs=5e-5) and hi == pytest.approx(published[1], abs=5e-5)


def test_newcombe_paired_is_not_degenerate_without_discordant_pairs():
    for cells in [(10, 0, 0, 10), (20, 0, 0, 0), (0, 0, 0, 20), (19, 0, 0, 1)]:
        d, lo, hi = stats.newcombe_paired(*_table(*cells))
        assert d == 0.0 and lo < -0.01 and hi > 0.01, cells
    # 20 all right under both: phi = 0 (a margin is n), so the limits are -/+ (1 - Wilson lower of 20/20) = -/+ z^2 / (20 + z^2)
    _, lo, hi = stats.newcombe_paired([1] * 20, [1] * 20)
    assert hi == pytest.approx(Z975**2 / (20 + Z975**2), abs=1e-12) and lo == pytest.approx(-hi, abs=1e-12)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.newcombe_paired([1, 0], [1])
    assert all(math.isnan(v) for v in stats.newcombe_paired([], []))


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
@settings(max_examples=80, deadline=None)
def test_newcombe_paired_contains_the_difference_and_stays_in_range(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    d, lo, hi = stats.newcombe_paired(a, b)
    assert d == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert -1.0 <= lo <= d <= hi <= 1.0
    if all(x == y for x, y in pairs):
        assert lo < 0.0 < hi
    md, mlo, mhi = stats.newcombe_paired(b, a)  # swapping the methods mirrors the interval
    assert md == pytest.approx(-d) and mlo == pytest.approx(-hi, abs=1e-12) and mhi == pytest.approx(-lo, abs=1e-12)


def test_ratio_of_means_against_exact_bootstrap_distributions():
    # n = 2, a = [1, 3], b = [1, 1]: a resample is {0,0} (ratio 1, prob 1/4), mixed (4/2 = 2, prob 1/2) or {1,1} (3, prob 1/4),
    # so the 2.5% and 97.5% percentiles of 10,000 resamples are 1 and 3.
    assert stats.ratio_of_means([1, 3], [1, 1]) == (2.0, 1.0, 3.0)
    # b = [0, 1]: {0,0} has denominator 0 and is skipped; mixed gives 4/1 (prob 2/3 of the rest), {1,1} gives 6/2 = 3.
    assert stats.ratio_of_means([1, 3], [0, 1]) == (4.0, 3.0, 4.0)
    # the ratio is recomputed per resample: a = 2 b on every problem makes every resample's ratio exactly 2, whereas dividing
    # the resampled mean of a by the fixed mean of b would spread it out.
    assert stats.ratio_of_means([2, 6, 10, 4], [1, 3, 5, 2]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.ratio_of_means([1, 0], [1])
    assert all(math.isnan(v) for v in stats.ratio_of_means([], []))
    assert math.isnan(stats.ratio_of_means([1, 2], [0, 0])[0])


pairs_of_positive = st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.floats(0.5, 100, allow_nan=False)), min_size=1, max_size=30)


@given(pairs_of_positive, st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_ratio_of_means_properties(pairs, seed):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    r, lo, hi = stats.ratio_of_means(a, b, resamples=400, seed=seed)
    assert r == pytest.approx(sum(a) / sum(b))
    assert lo <= r * (1 + 1e-12) and r <= hi * (1 + 1e-12)  # r >= 0; the slack only absorbs rounding
    assert stats.ratio_of_means(a, b, resamples=400, seed=seed) == (r, lo, hi)
    r2, lo2, hi2 = stats.ratio_of_means(a, [2 * y for y in b], resamples=400, seed=seed)
    assert r2 == pytest.approx(r / 2) and lo2 == pytest.approx(lo / 2) and hi2 == pytest.approx(hi / 2)


def test_holm_matches_a_hand_computation():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> raised to 0.06 by the running max
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.3, 0.5]) == pytest.approx([0.6, 0.6])
    assert stats.holm([0.6, 0.9]) == [1.0, 1.0]  # capped
    out = stats.holm([None, 0.02, float("nan"), 0.5])  # the family is the two real p-values
    assert math.isnan(out[0]) and math.isnan(out[2]) and out[1] == pytest.approx(0.04) and out[3] == pytest.approx(0.5)
    assert stats.holm([]) == []
    with pytest.raises(ValueError):
        stats.holm([1.5])


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=12), st.sampled_from([0.01, 0.05, 0.1]))
@settings(max_examples=80, deadline=None)
def test_holm_is_monotone_and_agrees_with_the_step_down_procedure(ps, alpha):
    adj = stats.holm(ps)
    assert all(p <= q <= 1.0 for p, q in zip(ps, adj))
    assert all(adj[i] <= adj[j] for i in range(len(ps)) for j in range(len(ps)) if ps[i] <= ps[j])
    # Holm's procedure: walk up the sorted p-values, rejecting while p_(i) <= alpha / (m - i); stop at the first failure.
    m = len(ps)
    rejected = set()
    for i, j in enumerate(sorted(range(m), key=lambda j: ps[j])):
        if ps[j] > alpha / (m - i):
            break
        rejected.add(j)
    # compare away from the boundary, where the two sides differ only by rounding
    assert all((adj[j] <= alpha) == (j in rejected) for j in range(m) if not math.isclose(adj[j], alpha, rel_tol=1e-9))
