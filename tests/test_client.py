"""The client half without an engine: answers, input files, resume, options, the ladder's keys and sample index."""

from __future__ import annotations

import http.server
import json
import math
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.adapters.sglang import SampleCounter, sglang_child
from tts_plugins.client import aggregate
from tts_plugins.client.aggregate import Vote
from tts_plugins.client.cli import InputError, finished_ids, read_problems
from tts_plugins.client.cli import main as cli_main
from tts_plugins.client.server import Sample, extract_auto, extract_full, extract_last_number, final_part
from tts_plugins.client.strategies import VOTES, Options, _vote
from tts_plugins.logits_processors.ladder import LadderParams, LadderPatchBase
from tts_plugins.manager import build_registry
from tts_plugins.services import report_json


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


class _Fake(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible vLLM server: each choice from ``script`` (answer, tokens, mean log-prob, DeepConf lowest or None)."""

    script: list = []
    bodies: list = []

    def _send(self, code: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"data": [{"id": "fake"}]})
        else:  # no /get_model_info: the client takes it for vLLM
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Fake.bodies.append(body)
        choices = []
        for i in range(body["n"]):
            answer, tokens, logprob, lowest = _Fake.script[i % len(_Fake.script)]
            text = f"Answer: {answer}" if answer else "no idea"
            c = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "token_ids": list(range(tokens)),
                 "stop_reason": None}
            if body.get("logprobs"):
                step = {"token": "token_id:1", "logprob": logprob, "top_logprobs": [{"token": "token_id:1", "logprob": logprob}]}
                c["logprobs"] = {"content": [step] * tokens}
            if lowest is not None:
                c["stop_reason"] = report_json({"conf": {"stopped": False, "tokens": tokens, "lowest": lowest, "mean": lowest}})
            choices.append(c)
        self._send(200, {"choices": choices})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake(tmp_path):
    """``(run, bodies)``: ``run(script, *flags)`` runs ``tts run`` on one problem against the fake server and returns
    ``(exit status, result or None)``; ``bodies`` are the request bodies it got."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Fake.bodies = []
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "p", "prompt": "q", "answer": "9"}) + "\n")

    def run(script, *flags):
        _Fake.script = list(script)
        out = tmp_path / f"o{len(_Fake.bodies)}.jsonl"
        url = f"http://127.0.0.1:{server.server_address[1]}"
        status = cli_main(["run", str(problems), "-o", str(out), "--url", url, "--quiet", *flags])
        lines = out.read_text().splitlines() if out.exists() else []
        return status, json.loads(lines[0]) if lines else None

    yield run, _Fake.bodies
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("strategy", ["self-consistency", "best-of-n"])
@pytest.mark.parametrize("vote", sorted(set(VOTES) | set(aggregate.BUILTIN)))
def test_every_built_in_vote_runs_through_tts_run(fake, strategy, vote):
    run, _ = fake
    script = [("9", 10, -0.1, None), ("7", 20, -0.2, None), ("9", 30, -0.3, None)]
    status, r = run(script, "--strategy", strategy, "--vote", vote, "--reward", "agreement", "-n", "3")  # a reward for the *best_of_* votes
    assert status == 0 and r["answer"] == "9" and r["correct"], r


def test_short_m_at_k_gets_the_token_counts(fake):
    run, _ = fake
    # 2 against 2: majority's tie goes to the smallest answer ("7"), short-m@k's to the class with the shortest chain ("9")
    script = [("7", 20, -0.1, None), ("9", 10, -0.1, None), ("7", 30, -0.1, None), ("9", 40, -0.1, None)]
    assert run(script, "--vote", "majority", "-n", "4")[1]["answer"] == "7"
    assert run(script, "--vote", "short_m_at_k", "-n", "4")[1]["answer"] == "9"


def test_confidence_vote_weighs_deepconf_reports_else_log_prob_confidence(fake):
    run, bodies = fake
    # reports: "9" at lowest 5 outweighs two "7" at lowest 1 each
    status, r = run([("7", 5, -0.1, 1.0), ("9", 5, -0.1, 5.0), ("7", 5, -0.1, 1.0)], "--vote", "confidence_vote", "-n", "3")
    assert status == 0 and (r["answer"], r["votes"], r["total"]) == ("9", 5.0, 7.0)
    # no reports: exp(mean log-prob), so one sure "9" (exp(-0.01)) outweighs two unsure "7" (exp(-3) each); log-probs were asked for
    status, r = run([("7", 5, -3.0, None), ("9", 5, -0.01, None), ("7", 5, -3.0, None)], "--vote", "confidence_vote", "-n", "3")
    assert status == 0 and r["answer"] == "9" and math.isclose(r["votes"], math.exp(-0.01))
    assert math.isclose(r["total"], math.exp(-0.01) + 2 * math.exp(-3))
    assert bodies[-1]["logprobs"] is True


def test_unknown_votes_are_refused_and_plugin_aggregators_get_the_answers_only(fake, capsys):
    run, bodies = fake
    assert run([("9", 5, -0.1, None)], "--vote", "nope") == (2, None) and not bodies
    assert "unknown --vote 'nope'" in capsys.readouterr().err
    samples = [Sample("", answer="7", tokens=3), Sample("", answer=None, tokens=9)]
    seen = []

    def mine(*args, **kwargs):
        seen.append((args, kwargs))
        return Vote("7", 1, 1)

    vote = _vote(Options(n=2, vote="mine"), samples, "majority", {**aggregate.BUILTIN, "mine": mine})
    assert vote.answer == "7" and seen == [((["7", None],), {})]
    with pytest.raises(ValueError, match="unknown vote 'nope'.*short_m_at_k.*confidence_vote.*registered aggregator \\(mine\\)"):
        _vote(Options(n=2, vote="nope"), samples, "majority", {**aggregate.BUILTIN, "mine": aggregate.majority})


def test_top_p_reaches_the_request(fake):
    run, bodies = fake
    assert run([("9", 5, -0.1, None)], "--top-p", "0.9", "-n", "2")[0] == 0
    assert bodies and all(b["top_p"] == 0.9 for b in bodies)


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "x"])
def test_bad_top_p_is_refused_naming_the_flag(fake, capsys, value):
    run, bodies = fake
    with pytest.raises(SystemExit) as exc:
        run([("9", 5, -0.1, None)], "--top-p", value)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument --top-p: must be a number in (0, 1], got '{value}'" in err, err
    assert not bodies


@pytest.mark.parametrize("command", [["run", "p.jsonl", "-o", "o.jsonl"], ["bench"]])
@pytest.mark.parametrize("old, new", [("--url", "--base-url")])
def test_a_flags_old_and_new_spellings_parse_alike(command, old, new):
    from tts_plugins.client.cli import parser

    a, b = parser().parse_args([*command, old, "http://h:1"]), parser().parse_args([*command, new, "http://h:1"])
    assert a.base_url == b.base_url == "http://h:1"
    assert parser().parse_args(command).base_url is None  # resolved when the command runs: $TTS_SERVER_URL, else the default


@pytest.mark.parametrize("command, dest", [(["run", "p.jsonl"], "output"), (["bench"], "out")])
def test_the_output_flag_has_every_spelling(command, dest):
    from tts_plugins.client.cli import parser

    values = {str(getattr(parser().parse_args([*command, flag, "x"]), dest)) for flag in ("-o", "--out", "--output")}
    assert values == {"x"}


def test_the_server_url_comes_from_the_flag_then_the_environment(monkeypatch):
    from tts_plugins.client.runs import DEFAULT_URL, server_url

    monkeypatch.delenv("TTS_SERVER_URL", raising=False)
    assert server_url(None) == DEFAULT_URL == "http://127.0.0.1:8000"
    monkeypatch.setenv("TTS_SERVER_URL", "http://env:2")
    assert server_url(None) == "http://env:2" and server_url("http://flag:3") == "http://flag:3"


def test_tts_bench_runs_end_to_end_on_a_fake_server(tmp_path):
    """The whole ``tts bench`` path without an engine: the methods' registry, controls, equal-budget votes, records and report."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Fake.bodies, _Fake.script = [], [("9", 10, -0.1, None), ("7", 20, -0.2, None), ("9", 30, -0.3, None)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "question": f"q{i}", "answer": "9"}) + "\n" for i in range(3)))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        status = cli_main(["bench", "--url", url, "--data", str(data), "-o", str(tmp_path / "b"), "--method", "greedy", "--method", "think-max:8",
                           "--method", "short-m:m=1,k=3", "--equal-budget", "samples", "--grader", "exact", "--quiet"])
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["methods"]}
    assert list(rows) == ["greedy", "think-max 8", "short-1@3", "majority@3 (top_p=0.95)"]  # short-m's control is its equal-samples vote
    assert rows["think-max 8"]["control"] == "greedy" and rows["short-1@3"]["control"] == "majority@3 (top_p=0.95)"
    assert rows["short-1@3"]["equal_budget_for"] is None and rows["majority@3 (top_p=0.95)"]["equal_budget_for"] == ["short-1@3"]
    assert any(b.get("vllm_xargs", {}).get("tts_think_max") == 8 for b in _Fake.bodies)
    assert "| short-1@3 |" in (tmp_path / "b" / "report.md").read_text()
