"""The client half without an engine: answers, input files, resume, options, the ladder's keys and sample index."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.adapters.sglang import SampleCounter, sglang_child
from tts_plugins.client.cli import InputError, finished_ids, read_problems
from tts_plugins.client.server import extract_auto, extract_full, extract_last_number, final_part
from tts_plugins.client.strategies import Options
from tts_plugins.logits_processors.ladder import LadderParams, LadderPatchBase
from tts_plugins.manager import build_registry


def test_answers_are_read_after_the_thinking_block():
    assert final_part("<think>Answer: 3</think>Answer: 4") == "Answer: 4"
    assert extract_auto("<think>Answer: 3</think> so the answer is: 4.") == "4"
    assert extract_auto("x \\boxed{\\frac{1}{2}} then \\boxed{7}") == "7"
    assert extract_auto("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_auto("<think>Answer: 3</think>no answer here") is None
    assert extract_auto("\\boxed{unclosed") is None
    assert extract_last_number("<think>12</think> 3 then -4.5") == "-4.5"
    assert extract_full("<think>a</think>  b c ") == "b c" and extract_full("") is None


@given(st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=20), st.integers(0, 10_000))
def test_ladder_gives_sample_i_rung_i_mod_len(ladder, i):
    p = LadderParams.parse({"tts_temperature_ladder": ladder})
    assert p.temperature(i) == ladder[i % len(ladder)]


@pytest.mark.parametrize("value, fragment", [
    ([], "a list of 1 to 256"), (0.5, "a list of 1 to 256"), ([0.5, -1], "-1"), ([float("nan")], "nan"), ([True], "True"),
    ([2.5], "2.5"), (["1"], "'1'"), (list(range(257)), "a list of 1 to 256"),
])
def test_bad_ladders_are_refused_naming_the_key(value, fragment):
    with pytest.raises(ValueError, match="tts_temperature_ladder") as err:
        LadderParams.parse({"tts_temperature_ladder": value})
    assert fragment in str(err.value)


def test_a_greedy_request_cannot_carry_a_ladder():
    p = LadderParams.parse({"tts_temperature_ladder": [0.0, 1.0]})
    LadderPatchBase.check_request(p, SimpleNamespace(temperature=0.7, top_k=0))
    for req in (SimpleNamespace(temperature=0.0, top_k=0), SimpleNamespace(temperature=1.0, top_k=1)):
        with pytest.raises(ValueError, match="tts_temperature_ladder.*temperature > 0"):
            LadderPatchBase.check_request(p, req)


def test_the_registry_owns_the_ladder_key():
    reg = build_registry()
    assert reg.key_owner["tts_temperature_ladder"] == "temperature_ladder"
    assert reg.parse({"tts_temperature_ladder": [0.5]}) == {}  # a front-end patch, not a per-step technique


def _sgl_params(n, ladder, max_new_tokens=16):
    return SimpleNamespace(n=n, custom_params={"tts_temperature_ladder": ladder}, max_new_tokens=max_new_tokens, temperature=0.9, top_k=50)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.randoms())
def test_sglang_children_get_their_index_whatever_the_interleaving(ns, rnd):
    """Children of several requests, interleaved; each request's children arrive in index order (as SGLang sends them)."""
    counter = SampleCounter()
    ladder = [0.0, 0.3, 0.6, 1.2]
    parents = [_sgl_params(n, ladder) for n in ns]
    queues = [[(p, i) for i in range(p.n)] for p in parents]
    seen: dict[int, list[float]] = {}
    while any(queues):
        q = rnd.choice([q for q in queues if q])
        parent, i = q.pop(0)
        obj = SimpleNamespace(sampling_params=parent)
        sglang_child(obj, counter)
        child = obj.sampling_params
        assert child is not parent and parent.temperature == 0.9, "the shared parent is never changed"
        want = ladder[i % len(ladder)]
        if want == 0.0:
            assert (child.temperature, child.top_k) == (1.0, 1), "a rung of 0 is SGLang's greedy form"
        else:
            assert (child.temperature, child.top_k) == (want, 50)
        seen.setdefault(id(parent), []).append(child.temperature)
    assert not counter.sent, "every request's count is dropped once its children are sent"


def test_sglang_prefix_warmup_and_plain_requests_are_untouched():
    counter = SampleCounter()
    warm = SimpleNamespace(sampling_params=_sgl_params(4, [0.5], max_new_tokens=0))
    sglang_child(warm, counter)
    assert warm.sampling_params.temperature == 0.9 and not counter.sent
    plain = SimpleNamespace(sampling_params=SimpleNamespace(n=1, custom_params=None, max_new_tokens=8, temperature=0.9, top_k=50))
    before = plain.sampling_params
    sglang_child(plain, counter)
    assert plain.sampling_params is before


def test_problem_files_are_checked_line_by_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "1+1?", "answer": "2"}\n\n{"prompt": "no id"}\n')
    assert [p["id"] for p in read_problems(f)] == ["a", 3]
    for text, fragment in [('{"id": 1}\n', 'non-empty string "prompt"'), ("nope\n", "not JSON"),
                           ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate id"),
                           ('{"id": [1], "prompt": "a"}\n', '"id" must be')]:
        f.write_text(text)
        with pytest.raises(InputError, match=fragment):
            read_problems(f)


def test_resume_counts_only_finished_results(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"id": "a", "answer": "2"}) + "\n" + json.dumps({"id": "b", "error": "boom"}) + "\n" + '{"id": "c", "ans')
    assert finished_ids(out) == {"a"}


def test_options_are_checked():
    Options().check()
    for kwargs, fragment in [({"strategy": "nope"}, "strategy"), ({"n": 0}, "n must"), ({"strategy": "carbon", "n": 1}, "n1 < n"),
                             ({"ladder": (-1.0,)}, "ladder"), ({"min_waves": 5, "waves": 4}, "min_waves"),
                             ({"temperature": 0.0, "n": 4}, "temperature > 0")]:
        with pytest.raises(ValueError, match=fragment):
            Options(**kwargs).check()


def test_cli_reports_an_unreachable_server_and_bad_input(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1, "prompt": "hi"}\n')
    cmd = [sys.executable, "-m", "tts_plugins.client.cli", "run", str(f), "-o", str(tmp_path / "o.jsonl"), "--quiet"]
    r = subprocess.run([*cmd, "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot reach the server at http://127.0.0.1:9" in r.stderr, r.stderr
    r = subprocess.run([*cmd, "--params", '{"think": 1}'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--params keys must start with tts_" in r.stderr, r.stderr
    f.write_text("[1]\n")
    r = subprocess.run([*cmd, "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'non-empty string "prompt"' in r.stderr, r.stderr


def test_short_m_votes_among_chains_that_answered():
    """With an in-engine group stop, the stopped chains are the short ones and have no answer: short-m@k must count
    the m shortest chains that did answer."""
    from tts_plugins.client.server import Sample
    from tts_plugins.client.strategies import _vote

    samples = [Sample("", answer=None, tokens=20), Sample("", answer=None, tokens=21), Sample("", answer="7", tokens=40),
               Sample("", answer="7", tokens=45), Sample("", answer="9", tokens=30)]
    vote = _vote(Options(n=5, vote="short_m", m=3), samples, "majority", {})
    assert (vote.answer, vote.votes, vote.total) == ("7", 2.0, 3.0)
    assert _vote(Options(n=5, vote="short_m", m=1), samples, "majority", {}).answer == "9"
