"""Aggregators: pure functions, stated as properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins import hookimpl
from tts_plugins.client.aggregate import (
    Vote,
    best_of_majority,
    best_of_n,
    chain_entropy,
    classes,
    inverse_entropy_vote,
    majority,
    multi_temperature_vote,
    registered,
    same_answer,
    short_m_at_k,
    weighted_best_of_n,
)
from tts_plugins.manager import plugin_manager

# "1/2", "0.5" and "\\frac{1}{2}" are one answer; " 2 " and "2" too; "x" does not parse as math
POOL = ["1/2", "0.5", "\\frac{1}{2}", "2", " 2 ", "3", "x", None]
answers = st.lists(st.sampled_from(POOL), min_size=1, max_size=10)


def norm(a):
    return None if a is None else a.strip()


def test_math_equivalence_by_math_verify():
    assert same_answer("1/2", "0.5") and same_answer("\\frac{1}{2}", "0.5") and same_answer(" 2 ", "2")
    assert not same_answer("2", "3") and not same_answer("x", "2")
    assert [sorted(m) for _, m in classes(["0.5", "3", "1/2", None, "\\frac{1}{2}"])] == [[0, 2, 4], [1]]
    assert majority(["0.5", "3", "1/2", "3", "\\frac{1}{2}"]).votes == 3


def class_of(a):
    return next(i for i, group in enumerate([["1/2", "0.5", "\\frac{1}{2}"], ["2", " 2 "], ["3"], ["x"]]) if a in group)


@given(answers, st.data())
def test_every_vote_is_permutation_invariant(ans, data):
    n = len(ans)
    lengths = data.draw(st.lists(st.integers(1, 100), min_size=n, max_size=n, unique=True))
    rewards = data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))
    ents = data.draw(st.lists(st.floats(0, 5), min_size=n, max_size=n))
    p = data.draw(st.permutations(range(n)))

    def perm(xs):
        return [xs[i] for i in p]

    assert majority(ans) == majority(perm(ans))
    assert short_m_at_k(ans, lengths) == short_m_at_k(perm(ans), perm(lengths))
    assert weighted_best_of_n(ans, rewards).answer == weighted_best_of_n(perm(ans), perm(rewards)).answer
    assert inverse_entropy_vote(ans, ents).answer == inverse_entropy_vote(perm(ans), perm(ents)).answer
    assert best_of_n(ans, rewards) == best_of_n(perm(ans), perm(rewards))
    assert best_of_majority(ans, rewards, 0.3) == best_of_majority(perm(ans), perm(rewards), 0.3)


@given(st.sampled_from([a for a in POOL if a]), st.integers(1, 10), st.data())
def test_a_unanimous_vote_wins_everywhere(a, k, data):
    rewards = data.draw(st.lists(st.floats(0.01, 10), min_size=k, max_size=k))
    assert majority([a] * k) == Vote(a, k, k)
    assert short_m_at_k([a] * k, list(range(k))).answer == a
    assert weighted_best_of_n([a] * k, rewards).answer == a
    assert inverse_entropy_vote([a] * k, [1.0] * k).answer == a
    assert best_of_n([a] * k, rewards).answer == a
    assert best_of_majority([a] * k, rewards, 1.0).answer == a
    assert multi_temperature_vote({0.0: [a] * k, 0.7: [a] * k}) == Vote(a, 2, 2, True)


@given(answers, st.data())
def test_the_winner_has_the_most_votes_and_ties_go_to_the_shortest(ans, data):
    lengths = data.draw(st.lists(st.integers(1, 100), min_size=len(ans), max_size=len(ans), unique=True))
    v = short_m_at_k(ans, lengths)
    counts: dict[int, int] = {}
    for a in ans:
        if a is not None:
            counts[class_of(a)] = counts.get(class_of(a), 0) + 1
    if not counts:
        assert v.answer is None
        return
    top = max(counts.values())
    assert v.votes == top and counts[class_of(v.answer)] == top
    tied = [c for c in counts if counts[c] == top]
    shortest = {c: min(n for a, n in zip(ans, lengths) if a is not None and class_of(a) == c) for c in tied}
    assert shortest[class_of(v.answer)] == min(shortest.values())


@given(answers, st.data())
def test_chains_with_zero_weight_change_nothing(ans, data):
    rewards = data.draw(st.lists(st.floats(0.01, 10), min_size=len(ans), max_size=len(ans)))
    extra = data.draw(st.lists(st.sampled_from(POOL), max_size=5))
    with_zero = weighted_best_of_n(ans + extra, rewards + [0.0] * len(extra))
    without = weighted_best_of_n(ans, rewards)
    assert with_zero.answer == without.answer and math.isclose(with_zero.votes, without.votes)


@given(answers, st.data(), st.floats(0.05, 1.0))
def test_best_of_majority_never_picks_a_rare_answer(ans, data, freq):
    rewards = data.draw(st.lists(st.floats(0, 100), min_size=len(ans), max_size=len(ans)))
    v = best_of_majority(ans, rewards, freq)
    voters = [a for a in ans if a is not None]
    if v.answer is None:
        assert not voters or all(sum(class_of(b) == class_of(a) for b in voters) < freq * len(voters) for a in voters)
        return
    share = sum(class_of(b) == class_of(v.answer) for b in voters)
    assert share >= freq * len(voters)
    best_kept = max(r for a, r in zip(ans, rewards) if a is not None and sum(class_of(b) == class_of(a) for b in voters) >= freq * len(voters))
    assert v.votes == best_kept


def test_multi_temperature_early_exit():
    easy = {0.0: ["4"] * 5, 0.6: ["4"] * 4 + ["5"], 1.2: ["4"] * 5}
    assert multi_temperature_vote(easy) == Vote("4", 3, 3, True)
    split_inside = {0.0: ["4"] * 3 + ["5"] * 2, 0.6: ["4"] * 5}
    assert not multi_temperature_vote(split_inside).decided, "3/5 at T=0 is below tau_intra 0.8"
    disagree = {0.0: ["4"] * 5, 0.6: ["5"] * 5}
    v = multi_temperature_vote(disagree)
    assert not v.decided and v.answer == "4", "winners disagree: no early exit (ties to the smallest answer)"
    assert multi_temperature_vote(disagree, tau_cross=0.5).decided


@given(st.lists(st.lists(st.floats(-20, 0), min_size=1, max_size=8), min_size=1, max_size=10))
def test_chain_entropy_is_bounded_by_log_k(steps):
    e = chain_entropy(steps)
    assert -1e-9 <= e <= max(math.log(len(s)) for s in steps) + 1e-9


def test_certain_chains_outvote_unsure_ones():
    assert inverse_entropy_vote(["1", "2", "2"], [0.01, 2.0, 2.0]).answer == "1"
    assert chain_entropy([{"a": 0.0}]) == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same length"):
        short_m_at_k(["1"], [1, 2])
    with pytest.raises(ValueError, match="finite and >= 0"):
        weighted_best_of_n(["1", "2"], [1.0, -1.0])
    with pytest.raises(ValueError, match="min_frequency"):
        best_of_majority(["1"], [1.0], 0.0)


def test_plugins_add_aggregators_and_rewards():
    class Plugin:
        @hookimpl
        def tts_register_aggregators(self, register_aggregator, register_reward):
            register_aggregator("shortest_answer", lambda answers: Vote(min((a for a in answers if a), key=len), 1, len(answers)))
            register_reward("length_penalty", lambda prompt, completion: -len(completion))

    aggs, rewards = registered(plugin_manager(load_entry_points=False, extra_plugins=[Plugin()]))
    assert {"majority", "best_of_majority", "shortest_answer"} <= set(aggs)
    assert aggs["shortest_answer"](["123", "4"]).answer == "4" and rewards["length_penalty"]("p", "abc") == -3
    with pytest.raises(ValueError, match="new non-empty"):
        class Clash:
            @hookimpl
            def tts_register_aggregators(self, register_aggregator, register_reward):
                register_aggregator("majority", majority)

        registered(plugin_manager(load_entry_points=False, extra_plugins=[Clash()]))
