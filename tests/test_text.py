"""Finding strings in token streams, however they were split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.text import StreamMatcher, completion_sets, partial_match, thinking_state

ALPHA = "<>/thinkab\n"
texts = st.text(alphabet=ALPHA, max_size=40)


def naive_events(text: str, start: str, end: str) -> list[str]:
    events, pos = [], 0
    while True:
        s, e = text.find(start, pos), text.find(end, pos)
        if s < 0 and e < 0:
            return events
        if e < 0 or 0 <= s < e:
            events.append("start")
            pos = s + len(start)
        else:
            events.append("end")
            pos = e + len(end)


@given(text=texts, cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stream_matcher_equals_matching_the_whole_text(text, cuts):
    pieces, prev = [], 0
    for c in sorted(set(min(c, len(text)) for c in cuts)) + [len(text)]:
        pieces.append(text[prev:c])
        prev = c
    m = StreamMatcher("<think>", "</think>")
    got = [e for p in pieces for e in m.feed(p)]
    assert got == naive_events(text, "<think>", "</think>")


@given(vocab=st.lists(st.text(alphabet=ALPHA, max_size=6), min_size=1, max_size=30), j=st.integers(0, 7))
def test_completion_sets_are_exactly_the_completing_tokens(vocab, j):
    pattern = "</think>"
    sets = completion_sets(vocab, pattern)
    assert len(sets) == len(pattern)
    expected = [i for i, t in enumerate(vocab) if pattern in pattern[:j] + t]
    assert sets[j] == expected


@given(tail=texts)
def test_partial_match_is_the_longest_proper_prefix_suffix(tail):
    pattern = "</think>"
    j = partial_match(tail, pattern)
    assert j < len(pattern) and tail.endswith(pattern[:j])
    assert not any(tail.endswith(pattern[:k]) for k in range(j + 1, len(pattern)))


def test_thinking_state_of_prompts():
    assert thinking_state("<|im_start|>assistant\n<think>\n", "<think>", "</think>")[0] is True
    assert thinking_state("<think>a</think>answer", "<think>", "</think>")[0] is False
    assert thinking_state("<think>a</think>b<think>again", "<think>", "</think>")[0] is True
    assert thinking_state("no thinking here", "<think>", "</think>")[0] is False
    inside, tail = thinking_state("<think>x</thi", "<think>", "</think>")
    assert inside and tail == "x</thi"
