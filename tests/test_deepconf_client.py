"""The client side of DeepConf: the percentile, the confidence-weighted filtered vote, the online strategy's
warmup, threshold, waves, adaptive stop and vote (against a scripted server)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.client import aggregate
from tts_plugins.client.server import Sample, ServerError
from tts_plugins.client.strategies import Options, run_problem


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 50), min_size=1, max_size=20), st.floats(0, 100))
def test_percentile_is_numpys(values, q):
    assert math.isclose(aggregate.percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["1", "2", "3", None]), st.floats(0.5, 20)), min_size=1, max_size=16),
       st.sampled_from([None, 0.1, 0.5, 0.9]))
def test_confidence_vote_keeps_the_top_share_and_weighs_by_confidence(traces, keep):
    answers, confs = [a for a, _ in traces], [c for _, c in traces]
    vote = aggregate.confidence_vote(answers, confs, keep)
    answered = [c for a, c in traces if a is not None]  # the percentile is over the traces that have an answer
    bar = -math.inf if keep is None or not answered else float(np.percentile(answered, 100 * (1 - keep)))
    weight: dict[str, float] = {}
    for a, c in traces:
        if a is not None and c >= bar:
            weight[a] = weight.get(a, 0.0) + c
    if not weight:
        assert vote.answer is None
        return
    best = max(weight.values())
    assert vote.answer == min(a for a, w in weight.items() if w == best)  # ties: the smallest answer
    assert math.isclose(vote.votes, best) and math.isclose(vote.total, sum(weight.values()))


def test_unanswered_traces_do_not_set_the_percentile():
    # answered: "A" at 10, "B" at 5: the top half is "A". Counting the unanswered 20, 30, 40 the median would be 20
    # and no answered trace would be kept.
    answers, confs = ["B", None, "A", None, None], [5.0, 20.0, 10.0, 30.0, 40.0]
    vote = aggregate.confidence_vote(answers, confs, keep=0.5)
    assert (vote.answer, vote.votes, vote.total) == ("A", 10.0, 10.0)
    assert aggregate.confidence_vote([None, None], [3.0, 4.0], keep=0.1) == aggregate.Vote(None, 0.0, 0.0)


def test_equal_confidences_are_a_majority_vote():
    answers = ["4", "5", "4", None, "5", "4"]
    a, b = aggregate.confidence_vote(answers, [2.0] * 6), aggregate.majority(answers)
    assert a.answer == b.answer and a.votes / a.total == b.votes / b.total


class Scripted:
    """A server whose traces are drawn from a script: (answer, lowest, stopped under a threshold above lowest)."""

    engine = "vllm"

    def __init__(self, script: list[tuple[str | None, float]]) -> None:
        self.script, self.i, self.calls = script, 0, []

    async def sample(self, prompt, *, n=1, params=None, phase="sample", **kw):
        self.calls.append((n, dict(params or {}), phase))
        thr = (params or {}).get("tts_conf_threshold")
        out = []
        for _ in range(n):
            answer, lowest = self.script[self.i % len(self.script)]
            self.i += 1
            stopped = thr is not None and lowest < thr
            out.append(Sample(text="", answer=None if stopped else answer, tokens=5 if stopped else 20, phase=phase,
                              reports={"conf": {"stopped": stopped, "tokens": 5, "lowest": lowest, "mean": lowest + 1}}))
        return out


def run(server, **kw) -> dict:
    o = Options(strategy="deepconf", max_n=4, **kw)
    o.check()
    return asyncio.run(run_problem(server, {"id": "p", "prompt": "q", "answer": "7"}, o))


def test_deepconf_low_thresholds_at_the_90th_percentile_and_stops_at_consensus():
    # warmup: 10 traces; lowest 1..10; only the two most confident (9, 10) are at or above the 90th percentile (9.1): ...
    warm = [("7" if c >= 9 else "3", float(c)) for c in range(1, 11)]
    online = [("7", 12.0), ("3", 2.0), ("7", 11.0), ("7", 13.0)]
    srv = Scripted(warm + online * 10)
    res = run(srv, n=30, warmup=10, deepconf="low", tau=0.95)
    assert math.isclose(res["threshold"], float(np.percentile([c for _, c in warm], 90)))
    assert srv.calls[0][1] == {"tts_conf_window": 2048, "tts_conf_topk": 20} and sum(c[0] for c in srv.calls[:3]) == 10
    # ... the warmup's "7" at 10 (>= 9.1) is the only voter: consensus 1 >= 0.95 before any online trace
    assert res["answer"] == "7" and res["correct"] and res["online_waves"] == 0 and res["n_samples"] == 10


def test_deepconf_draws_waves_until_consensus_or_budget():
    warm = [("7", 5.0), ("3", 5.0), ("7", 1.0), ("3", 1.0)]  # threshold (high: 10th percentile) 1.0; a 50/50 split
    online = [("3", 0.5), ("7", 6.0), ("7", 6.0), ("3", 6.0)]  # the first is stopped by the threshold
    srv = Scripted(warm + online * 10)
    res = run(srv, n=12, warmup=4, deepconf="high", tau=0.95)
    assert res["n_samples"] == 12 and res["online_waves"] == 2  # never reached 0.95: the budget ends it
    online_calls = [c for c in srv.calls if c[2] == "online"]
    assert len(online_calls) == 2 and all(c[1]["tts_conf_threshold"] == res["threshold"] == 1.0 for c in online_calls)
    assert res["stopped"] == 2 and res["answer"] == "7"
    # the stopped traces never vote; the others weigh their lowest group confidence
    assert math.isclose(res["votes"], 5.0 + 1.0 + 4 * 6.0) and math.isclose(res["total"], res["votes"] + 5.0 + 1.0 + 2 * 6.0)


def test_deepconf_stopping_bar_is_the_percentile_of_every_warmup_trace():
    # as the authors' online script sets it: unanswered warmup traces count toward the bar (they never vote)
    warm = [("7", 1.0), ("3", 2.0), ("7", 3.0), ("7", 4.0), (None, 20.0), (None, 21.0)]
    srv = Scripted(warm + [("7", 5.0)] * 10)
    res = run(srv, n=6, warmup=6, deepconf="high")
    assert math.isclose(res["threshold"], float(np.percentile([1.0, 2.0, 3.0, 4.0, 20.0, 21.0], 10)))
    assert res["answer"] == "7"


def test_deepconf_refuses_a_server_without_reports():
    class Plain(Scripted):
        async def sample(self, prompt, **kw):
            return [Sample(text="", answer="1", tokens=3) for _ in range(kw.get("n", 1))]

    with pytest.raises(ServerError, match="no confidence report"):
        run(Plain([]), n=4, warmup=2)


@pytest.mark.parametrize("kw, fragment", [({"warmup": 0}, "warmup"), ({"warmup": 9, "n": 8}, "warmup"), ({"deepconf": "mid"}, "deepconf"),
                                          ({"tau": 0}, "tau"), ({"window": 0}, "window"), ({"conf_topk": 65}, "conf_topk")])
def test_bad_deepconf_options_are_refused(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        Options(strategy="deepconf", **kw).check()


def test_without_adaptive_sampling_the_whole_budget_is_drawn():
    warm = [("7" if c >= 9 else "3", float(c)) for c in range(1, 11)]
    srv = Scripted(warm + [("7", 12.0)] * 20)
    res = run(srv, n=18, warmup=10, deepconf="low", adaptive=False)
    assert res["n_samples"] == 18 and res["online_waves"] == 2 and res["answer"] == "7"
