"""Aggregators: pure functions, stated as properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.aggregate import majority, short_m_at_k

answers = st.lists(st.one_of(st.none(), st.sampled_from(["1", "2", "3", " 2 "])), min_size=1, max_size=12)


@given(answers, st.data())
def test_permutation_invariant(ans, data):
    lengths = data.draw(st.lists(st.integers(1, 100), min_size=len(ans), max_size=len(ans), unique=True))
    perm = data.draw(st.permutations(range(len(ans))))
    assert short_m_at_k(ans, lengths) == short_m_at_k([ans[i] for i in perm], [lengths[i] for i in perm])


@given(st.sampled_from(["1", "7"]), st.integers(1, 10))
def test_unanimous_vote_wins(a, k):
    v = majority([a] * k)
    assert (v.answer, v.votes, v.total) == (a, k, k)


@given(answers, st.data())
def test_winner_has_the_most_votes_and_ties_go_to_the_shortest(ans, data):
    lengths = data.draw(st.lists(st.integers(1, 100), min_size=len(ans), max_size=len(ans), unique=True))
    v = short_m_at_k(ans, lengths)
    normed = [a.strip() if a else None for a in ans]
    counts = {a: normed.count(a) for a in normed if a}
    if not counts:
        assert v.answer is None
        return
    top = max(counts.values())
    assert v.votes == top and counts[v.answer] == top
    tied = [a for a in counts if counts[a] == top]
    shortest = {a: min(n for x, n in zip(normed, lengths) if x == a) for a in tied}
    assert shortest[v.answer] == min(shortest.values())


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="same length"):
        short_m_at_k(["1"], [1, 2])
