"""Thought trimming: the triggers on scripted token streams, and the asynchronous verifier."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.logits_processors.trim import DEFAULT_TRIM_CONCLUSION, TrimParams, extract_answer
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.text import encode

from sim import Request, Sim

REG = build_registry(plugin_manager(load_entry_points=False))


def test_trim_params():
    assert REG.parse({"tts_trim": True})["trim"] == TrimParams()
    assert REG.parse({"tts_trim": False}) == {}
    assert REG.parse({"tts_trim_converge": 2})["trim"].converge == 2
    assert REG.parse({"tts_trim_markers": ["Hmm", "So"]})["trim"].markers == ("Hmm", "So")
    for bad, key in [
        ({"tts_trim_converge": 1}, "tts_trim_converge"),
        ({"tts_trim_repeats": 1}, "tts_trim_repeats"),
        ({"tts_trim_markers": []}, "tts_trim_markers"),
        ({"tts_trim_markers": ["ok", 3]}, "tts_trim_markers"),
        ({"tts_trim": False, "tts_trim_ngram": 4}, "tts_trim"),
        ({"tts_trim_verifier": "nobody"}, "tts_trim_verifier"),
    ]:
        with pytest.raises(ValueError, match=key):
            REG.parse(bad)


@pytest.mark.parametrize(
    "thought, answer",
    [
        ("so x = \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{3}", "3"),
        ("nested \\boxed{a_{1} + 2}", "a_{1}+2"),
        ("The answer is 17.", "17"),
        ("Answer: -3", "-3"),
        ("no answer here", None),
        ("broken \\boxed{12", None),
    ],
)
def test_extract_answer(thought, answer):
    assert extract_answer(thought) == answer


def scripted(tok, text):
    """A model that writes ``text`` (its own tokenization) and then free text."""
    ids = encode(tok, text)

    def favourite(out):
        return ids[len(out)] if len(out) < len(ids) else None

    return ids, favourite


def run_script(tok, text, params, steps=None):
    from sim import wants

    ids, fav = scripted(tok, text)
    sim = Sim(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    [out] = sim.run([Request(prompt, params)], wants(len(tok), fav), steps or len(ids) + 30)
    return ids, out


def first_index(tok, ids, predicate):
    for i in range(len(ids)):
        if predicate(tok.decode(ids[: i + 1], skip_special_tokens=False)):
            return i
    raise AssertionError("script never reaches the trigger")


def assert_trimmed_at(tok, ids, out, i, conclusion=DEFAULT_TRIM_CONCLUSION):
    forced = encode(tok, conclusion + "</think>")
    assert out[: i + 1] == ids[: i + 1], "the model's own thinking is untouched up to the trigger"
    assert out[i + 1 : i + 1 + len(forced)] == forced


@given(k=st.integers(2, 4), answer=st.sampled_from(["5", "17", "\\boxed{8}"]))
def test_overthinking_fires_after_k_agreeing_thoughts(dense_tokenizer, k, answer):
    tok = dense_tokenizer
    phrase = f"The answer is {answer}." if "boxed" not in answer else f"So {answer}."
    text = " Let me add 2 and 3. " + " Wait, check: ".join([phrase] * (k + 2)) + " Wait, done."
    ids, out = run_script(tok, text, {"tts_trim_converge": k, "tts_trim_ngram": 0})
    # the k-th answered thought closes when the k-th "Wait" is complete
    i = first_index(tok, ids, lambda s: s.count("Wait") >= k)
    assert_trimmed_at(tok, ids, out, i)


def test_disagreeing_thoughts_do_not_fire(dense_tokenizer):
    tok = dense_tokenizer
    text = " The answer is 5. Wait, the answer is 6. Wait, the answer is 5. Wait, the answer is 7. Wait, ok"
    ids, out = run_script(tok, text, {"tts_trim_converge": 2, "tts_trim_ngram": 0, "tts_trim_max_thoughts": 0})
    assert out[: len(ids)] == ids


def test_repetition_loop_fires(dense_tokenizer):
    tok = dense_tokenizer
    text = " 12 + 7 = 19." * 6
    n = 4
    ids, out = run_script(tok, text, {"tts_trim_ngram": n, "tts_trim_repeats": 3, "tts_trim_converge": 0, "tts_trim_max_thoughts": 0})
    seen, fire = {}, None
    for j in range(n - 1, len(ids)):
        key = tuple(ids[j - n + 1 : j + 1])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= 3:
            fire = j
            break
    assert fire is not None
    assert_trimmed_at(tok, ids, out, fire)


def test_underthinking_fires_after_many_unconverged_thoughts(dense_tokenizer):
    tok = dense_tokenizer
    text = " Hmm 1. Wait 2. Wait 3. Wait 4. Wait 5. Wait 6. Wait 7."
    ids, out = run_script(tok, text, {"tts_trim_max_thoughts": 3, "tts_trim_min_tokens": 0, "tts_trim_ngram": 0})
    i = first_index(tok, ids, lambda s: s.count("Wait") >= 4)  # the 4th thought closes at the 4th marker
    assert_trimmed_at(tok, ids, out, i)


def test_nothing_fires_outside_thinking(dense_tokenizer):
    tok = dense_tokenizer
    text = "</think> The answer is 5. Wait, the answer is 5. Wait, the answer is 5. Wait, the answer is 5."
    ids, out = run_script(tok, text, {"tts_trim_converge": 2})
    assert out[: len(ids)] == ids


class _Judge(http.server.BaseHTTPRequestHandler):
    delay = 0.3
    asked: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.asked.append(body["messages"][0]["content"])
        time.sleep(_Judge.delay)
        reply = {"choices": [{"message": {"role": "assistant", "content": "Yes"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TTS_PLUGINS_VERIFIER_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("TTS_PLUGINS_VERIFIER_MODEL", "judge")
    _Judge.asked.clear()
    yield server
    server.shutdown()


def test_external_verifier_decides_without_blocking_decode(dense_tokenizer, judge):
    from sim import wants

    tok = dense_tokenizer
    reg = build_registry(plugin_manager(load_entry_points=False))
    assert "openai" in reg.verifier_names
    text = " The answer is 5. Wait, the answer is 5. Wait, so 5." + " more thinking" * 40
    ids, fav = scripted(tok, text)
    sim = Sim(tok, registry=reg)
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    params = {"tts_trim_verifier": "openai", "tts_trim_ngram": 0}
    slowest = 0.0
    trim = sim.state._by_name["trim"]
    orig = trim.on_tokens

    def timed(slot, toks):
        nonlocal slowest
        t0 = time.perf_counter()
        orig(slot, toks)
        slowest = max(slowest, time.perf_counter() - t0)

    trim.on_tokens = timed
    model = wants(len(tok), fav)

    def slow_model(req, out):  # about 25 ms a step, so the 0.3 s verdict lands mid-stream
        time.sleep(0.025)
        return model(req, out)

    [out] = sim.run([Request(prompt, params)], slow_model, len(ids) + 20)
    assert _Judge.asked and "First: 5" in _Judge.asked[0] and "Second: 5" in _Judge.asked[0]
    assert slowest < _Judge.delay / 3, f"a decode step waited {slowest:.3f}s for the verifier"
    text_out = tok.decode(out, skip_special_tokens=False)
    assert DEFAULT_TRIM_CONCLUSION.strip() in text_out and "</think>" in text_out
    asked_at = first_index(tok, ids, lambda s: s.count("Wait") >= 2)
    fired_at = out.index(encode(tok, DEFAULT_TRIM_CONCLUSION + "</think>")[0], asked_at + 1)
    assert fired_at >= asked_at + 5, "the verdict took ~0.3 s; decoding went on meanwhile"


@given(answers=st.lists(st.one_of(st.none(), st.sampled_from(["3", "4"])), min_size=1, max_size=7), k=st.integers(2, 3))
def test_overthinking_rule_against_a_reference(dense_tokenizer, answers, k):
    """On any sequence of thoughts, the trigger fires exactly where k consecutive answered thoughts first agree."""
    tok = dense_tokenizer
    thoughts = [f"the answer is {a}." if a else "hmm, not sure." for a in answers]
    text = " " + " Wait, ".join(thoughts) + " Wait, end."
    seen, fire_thought = [], None
    for i, a in enumerate(answers):
        if a is None:
            continue
        seen.append(a)
        if len(seen) >= k and len(set(seen[-k:])) == 1:
            fire_thought = i
            break
    ids, out = run_script(tok, text, {"tts_trim_converge": k, "tts_trim_ngram": 0, "tts_trim_max_thoughts": 0})
    if fire_thought is None:
        assert out[: len(ids)] == ids
    else:  # thought i closes when the (i+1)-th "Wait" is complete
        i = first_index(tok, ids, lambda s: s.count("Wait") >= fire_thought + 1)
        assert_trimmed_at(tok, ids, out, i)
