"""Client-side aggregation of sampled answers: pure functions of (answers, log-probs, rewards).

Answers are grouped into equivalence classes by :func:`same_answer`, which
uses Hugging Face's ``math-verify`` (``1/2``, ``0.5`` and ``\\frac{1}{2}`` agree)
and falls back to whitespace-insensitive string equality for answers it
cannot parse. Chains without an answer (``None``) never vote. Every function
returns a :class:`Vote`: the winning answer (the first-seen member of its
class, its smallest member as written), its weight and the total weight. Ties
go to the smallest answer, so every vote is invariant under reordering the chains.

* :func:`majority`: self-consistency.
* :func:`short_m_at_k`: "Don't Overthink it": majority among the m chains that
  finished first, ties to the shortest chain.
* :func:`inverse_entropy_vote`: "The Sequential Edge": each chain weighs
  1 / its mean token entropy (:func:`chain_entropy` estimates it from top-k
  log-probs).
* :func:`best_of_n` / :func:`weighted_best_of_n`: the highest reward / the
  class with the largest summed reward.
* :func:`best_of_majority`: Best-of-Majority (arXiv 2510.03199): only classes
  whose frequency reaches ``min_frequency`` of the votes qualify, then the
  highest reward among them (the paper keeps the top-k by reward; with k = 1
  that is this).
* :func:`multi_temperature_vote`: the two-stage vote of "On the Role of
  Temperature Sampling in Test-Time Scaling" with early exit: within each
  temperature the majority share must reach ``tau_intra`` (0.8), and the
  per-temperature winners must agree with share ``tau_cross`` (1.0).

Third-party aggregators and reward functions come in through the
``tts_register_aggregators`` hook (:func:`registered`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Vote:
    answer: str | None
    votes: float
    total: float
    decided: bool = True  # multi-temperature vote: whether the early-exit criteria hold


def _norm(answer: str | None) -> str | None:
    if answer is None:
        return None
    answer = answer.strip().replace(" ", "")
    return answer or None


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    from math_verify import parse

    # no signal-based timeout: aggregation may run in worker threads
    return tuple(parse(answer, parsing_timeout=None))


@functools.lru_cache(maxsize=16384)
def same_answer(a: str, b: str) -> bool:
    """Mathematical equivalence by math-verify; string equality (spaces ignored) when either side does not parse."""
    if _norm(a) == _norm(b):
        return True
    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    from math_verify import verify

    return bool(verify(list(pa), list(pb), timeout_seconds=None)) or bool(verify(list(pb), list(pa), timeout_seconds=None))


def classes(answers: Sequence[str | None]) -> list[tuple[str, list[int]]]:
    """Equivalence classes in order of first appearance: ``[(representative, [indices])]``; None is left out."""
    out: list[tuple[str, list[int]]] = []
    for i, a in enumerate(answers):
        if _norm(a) is None:
            continue
        for rep, members in out:
            if same_answer(rep, a):
                members.append(i)
                break
        else:
            out.append((a, [i]))
    return out


def _weighted(answers: Sequence[str | None], weights: Sequence[float], tie: Callable[[str, list[int]], Any] | None = None) -> Vote:
    if len(answers) != len(weights):
        raise ValueError(f"answers and weights must have the same length, got {len(answers)} and {len(weights)}")
    for w in weights:
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weights must be finite and >= 0, got {w!r}")
    # a class is reported by its smallest member that carries weight: zero-weight chains change nothing
    groups = [(canonical(answers, [i for i in members if weights[i] > 0] or members), members) for _, members in classes(answers)]
    total = float(sum(weights[i] for _, members in groups for i in members))
    if not groups or total <= 0:
        return Vote(None, 0.0, total)

    def key(group: tuple[str, list[int]]) -> tuple:
        rep, members = group
        return (-sum(weights[i] for i in members), tie(rep, members) if tie else 0, _norm(rep), rep)

    rep, members = min(groups, key=key)
    return Vote(rep, float(sum(weights[i] for i in members)), total)


def canonical(answers: Sequence[str | None], members: Sequence[int]) -> str:
    """A class's answer as reported: its smallest member (normalized, then as written), whatever the order."""
    return min((answers[i] for i in members), key=lambda a: (_norm(a), a))  # type: ignore[arg-type,return-value]


def majority(answers: Sequence[str | None]) -> Vote:
    """Most frequent answer class (ties: the smallest answer)."""
    return _weighted(answers, [1.0] * len(answers))


def short_m_at_k(answers: Sequence[str | None], lengths: Sequence[int]) -> Vote:
    """short-m@k: majority among the finished chains, ties to the class holding the shortest chain."""
    if len(answers) != len(lengths):
        raise ValueError(f"answers and lengths must have the same length, got {len(answers)} and {len(lengths)}")
    return _weighted(answers, [1.0] * len(answers), tie=lambda rep, members: min(lengths[i] for i in members))


def chain_entropy(top_logprobs: Sequence[Mapping[str, float] | Sequence[float]]) -> float:
    """Mean per-token entropy of one chain, estimated from each step's top-k log-probs (renormalized)."""
    ents = []
    for step in top_logprobs:
        values = list(step.values()) if isinstance(step, Mapping) else list(step)
        if not values:
            continue
        m = max(values)
        ps = [math.exp(v - m) for v in values]
        z = sum(ps)
        ents.append(-sum(p / z * math.log(p / z) for p in ps if p > 0))
    return sum(ents) / len(ents) if ents else 0.0


def inverse_entropy_vote(answers: Sequence[str | None], entropies: Sequence[float], eps: float = 1e-6) -> Vote:
    """Each chain weighs ``1 / (mean token entropy + eps)``: confident chains count more."""
    return _weighted(answers, [1.0 / (max(0.0, e) + eps) for e in entropies])


def best_of_n(answers: Sequence[str | None], rewards: Sequence[float]) -> Vote:
    """The answer of the single highest-reward chain (ties: the smallest answer)."""
    if len(answers) != len(rewards):
        raise ValueError(f"answers and rewards must have the same length, got {len(answers)} and {len(rewards)}")
    scored = [(r, a) for a, r in zip(answers, rewards) if _norm(a) is not None]
    if not scored:
        return Vote(None, 0.0, 0.0)
    best = max(r for r, _ in scored)
    top = [a for r, a in scored if r == best]
    return Vote(min(top, key=lambda a: (_norm(a), a)), float(best), float(len(scored)))


def weighted_best_of_n(answers: Sequence[str | None], rewards: Sequence[float]) -> Vote:
    """The class with the largest summed reward (rewards must be >= 0)."""
    return _weighted(answers, rewards)


def best_of_majority(answers: Sequence[str | None], rewards: Sequence[float], min_frequency: float = 0.2) -> Vote:
    """Best-of-Majority: among classes holding at least ``min_frequency`` of the votes, the highest reward."""
    if not 0 < min_frequency <= 1:
        raise ValueError(f"min_frequency must be in (0, 1], got {min_frequency!r}")
    if len(answers) != len(rewards):
        raise ValueError(f"answers and rewards must have the same length, got {len(answers)} and {len(rewards)}")
    groups = classes(answers)
    n = sum(len(m) for _, m in groups)
    kept = [(canonical(answers, members), members) for _, members in groups if len(members) >= min_frequency * n]
    if not kept:
        return Vote(None, 0.0, float(n))
    reward, _, rep = max((max(rewards[i] for i in members), [-ord(c) for c in rep], rep) for rep, members in kept)
    return Vote(rep, float(reward), float(n))


def multi_temperature_vote(answers_by_temperature: Mapping[float, Sequence[str | None]], tau_intra: float = 0.8, tau_cross: float = 1.0) -> Vote:
    """Two-stage vote: per-temperature majorities, then the majority of those winners.

    The final answer: each temperature's majority answer (a tie inside a temperature goes to the smallest answer,
    compared normalized, then as written; a temperature whose samples all lack an answer has no winner), then
    the majority over those winners, one vote per temperature (a tie between winners again goes to the smallest
    answer). Our choice where the paper is not specific: the tie-break is deterministic and independent of
    sample order, not random. ``decided`` is the early-exit test: every temperature's majority share is at
    least ``tau_intra`` and the winners' agreement share is at least ``tau_cross``.
    """
    winners, intra_ok = [], True
    for t in sorted(answers_by_temperature):
        v = majority(answers_by_temperature[t])
        if v.answer is None:
            intra_ok = False
            continue
        winners.append(v.answer)
        intra_ok &= v.votes >= tau_intra * v.total
    cross = majority(winners)
    decided = bool(winners) and intra_ok and cross.votes >= tau_cross * len(answers_by_temperature)
    return Vote(cross.answer, cross.votes, float(len(answers_by_temperature)), decided)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * min(max(q, 0.0), 100.0) / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def confidence_vote(answers: Sequence[str | None], confidences: Sequence[float], keep: float | None = None) -> Vote:
    """DeepConf's offline vote: keep the traces whose confidence is in the top ``keep`` share (0.1: DeepConf's
    eta = 10%, the traces at or above the 90th percentile; 0.9: eta = 90%; None: all), then a majority weighted by
    confidence (each trace's lowest group confidence, or any trace confidence >= 0). Traces without an answer
    never vote and do not count towards the percentile either: it is taken over the answered traces only, as the
    authors' offline analysis filters to traces with an extracted answer first (with no answered trace, nothing
    votes). ``total`` is the kept traces' weight. Ties go to the smallest answer."""
    if len(answers) != len(confidences):
        raise ValueError(f"answers and confidences must have the same length, got {len(answers)} and {len(confidences)}")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    weights = [float(c) for c in confidences]
    answered = [w for a, w in zip(answers, weights) if _norm(a) is not None]
    if keep is not None and answered:
        bar = percentile(answered, 100.0 * (1.0 - keep))
        weights = [w if w >= bar else 0.0 for w in weights]
    return _weighted(answers, [max(0.0, w) for w in weights])


BUILTIN: dict[str, Callable[..., Vote]] = {
    "majority": majority, "short_m_at_k": short_m_at_k, "inverse_entropy": inverse_entropy_vote,
    "best_of_n": best_of_n, "weighted_best_of_n": weighted_best_of_n, "best_of_majority": best_of_majority,
    "confidence_vote": confidence_vote,
}


def registered(pm: Any | None = None) -> tuple[dict[str, Callable[..., Vote]], dict[str, Callable[..., float]]]:
    """Aggregators (built-in and from plugins) and reward functions from ``tts_register_aggregators``."""
    from tts_plugins.manager import installed_plugin_manager

    pm = pm or installed_plugin_manager()
    aggregators, rewards = dict(BUILTIN), {}

    def add_aggregator(name: str, fn: Callable[..., Vote]) -> None:
        if not isinstance(name, str) or not name or name in aggregators:
            raise ValueError(f"aggregator name must be a new non-empty string, got {name!r}")
        aggregators[name] = fn

    def add_reward(name: str, fn: Callable[..., float]) -> None:
        if not isinstance(name, str) or not name or name in rewards:
            raise ValueError(f"reward name must be a new non-empty string, got {name!r}")
        rewards[name] = fn

    pm.hook.tts_register_aggregators(register_aggregator=add_aggregator, register_reward=add_reward)
    return aggregators, rewards
