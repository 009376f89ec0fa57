"""Client-side aggregation of sampled answers (pure functions: no engine, no torch).

``short_m_at_k`` is the vote of "Don't Overthink it" (short-m@k): among the m
chains that finished first, majority over their extracted answers, ties broken
by the shortest chain. ``majority`` is self-consistency. Answers are compared
after :func:`tts_plugins.logits_processors.trim.extract_answer`-style
normalization (strip, no spaces); chains without an answer do not vote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Vote:
    answer: str | None
    votes: int
    total: int


def _norm(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = answer.strip().replace(" ", "")
    return answer or None


def majority(answers: Sequence[str | None]) -> Vote:
    """Most frequent answer; ties go to the answer seen first. ``None`` answers do not vote."""
    return short_m_at_k(answers, list(range(len(answers))))


def short_m_at_k(answers: Sequence[str | None], lengths: Sequence[int]) -> Vote:
    """short-m@k: majority among the finished chains, ties to the answer of the shortest chain."""
    if len(answers) != len(lengths):
        raise ValueError(f"answers and lengths must have the same length, got {len(answers)} and {len(lengths)}")
    counts: dict[str, int] = {}
    shortest: dict[str, int] = {}
    for a, n in zip(answers, lengths):
        a = _norm(a)
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        shortest[a] = min(shortest.get(a, n), n)
    if not counts:
        return Vote(None, 0, 0)
    best = min(counts, key=lambda a: (-counts[a], shortest[a], a))
    return Vote(best, counts[best], sum(counts.values()))
