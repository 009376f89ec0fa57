"""Think-token steering in a real engine, offline and over HTTP.

The same cases run against every engine (``--engine vllm|sglang``). Expected
token ids come from the tokenizer and a plain transformers greedy loop, never
from the engine under test.
"""

from __future__ import annotations

import pytest
import requests

from tts_plugins.client import extra_body
from tts_plugins.text import encode

from reference import hf_greedy

pytestmark = pytest.mark.engine

NO_THINK = "Okay, I think I have finished thinking."
QUESTIONS = ["What is 2 + 3?", "What is 17 * 4 - 9?", "What is 120 + 5 * 3?"]


def chat_ids(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)


def chat_text(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)


# --- dense model: </think> is one special token ---------------------------


@pytest.mark.parametrize("cap", [0, 1, 5, 12])
def test_cap_forces_conclusion_and_end_after_exactly_cap_tokens(engines, overlap, cap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    prompt = chat_ids(tok, QUESTIONS[0])
    [out] = eng.generate([prompt], [{"tts_think_max": cap}], max_tokens=cap + 10)
    forced = encode(tok, "\n</think>")
    ref = hf_greedy(engines.tiny_model("dense"), prompt, cap)
    assert out.token_ids[:cap] == ref[:cap], "thinking before the cap is the model's own"
    assert out.token_ids[cap : cap + len(forced)] == forced
    assert len(out.token_ids) > cap + len(forced) and out.token_ids[cap + len(forced)] != tok.eos_token_id


def test_configurable_conclusion_phrase(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    phrase = " Considering the limited time, I have to give the solution now.\n"
    [out] = eng.generate([chat_ids(tok, QUESTIONS[1])], [{"tts_think_max": 3, "tts_think_conclusion": phrase}], max_tokens=40)
    assert out.token_ids[3 : 3 + len(encode(tok, phrase + "</think>"))] == encode(tok, phrase + "</think>")


def test_no_think_prefills_at_step_zero(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    [out] = eng.generate([chat_ids(tok, QUESTIONS[0])], [{"tts_no_think": True}], max_tokens=24)
    forced = encode(tok, NO_THINK + "\n</think>")
    assert out.token_ids[: len(forced)] == forced


def test_mixed_batch_plain_rows_equal_a_run_without_the_package(engines, overlap):
    """Plain rows next to steered ones decode exactly like transformers' greedy loop."""
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    prompts = [chat_ids(tok, QUESTIONS[i % 3]) for i in range(6)]
    params = [{}, {"tts_think_max": 2}, {}, {"tts_no_think": True}, {"tts_think_min": 4, "tts_think_extend": 1}, {}]
    outs = eng.generate(prompts, params, max_tokens=20)
    for i in (0, 2, 5):
        assert outs[i].token_ids == hf_greedy(engines.tiny_model("dense"), prompts[i], 20, tok.eos_token_id), f"plain row {i}"
    assert outs[1].token_ids[2:4] == encode(tok, "\n</think>")
    assert outs[3].token_ids[: len(encode(tok, NO_THINK))] == encode(tok, NO_THINK)


def test_bad_parameters_are_refused_and_the_engine_goes_on(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    for bad, key in [({"tts_think_max": -3}, "tts_think_max"), ({"tts_think_mx": 3}, "tts_think_mx"), ({"tts_no_think": "maybe"}, "tts_no_think")]:
        with pytest.raises(Exception, match=key) as err:  # vLLM wraps it in VLLMValidationError
            eng.generate([chat_ids(tok, QUESTIONS[0])], [bad], max_tokens=4)
        assert "ValidationError" in type(err.value).__name__ or isinstance(err.value, ValueError)
    [out] = eng.generate([chat_ids(tok, QUESTIONS[0])], [{"tts_think_max": 1}], max_tokens=6)
    assert out.token_ids[1:3] == encode(tok, "\n</think>")


@pytest.mark.vllm_only
def test_composes_with_vllms_thinking_token_budget(engines, engine_name, overlap):
    if engine_name != "vllm":
        pytest.fail("thinking_token_budget is vLLM's; this test is selected for vLLM only")
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    prompt = chat_ids(tok, QUESTIONS[0])
    end = tok.convert_tokens_to_ids("</think>")
    # our cap is tighter: ours acts first
    [ours] = eng.generate([prompt], [{"tts_think_max": 2}], max_tokens=12, extra={"thinking_token_budget": 6})
    assert ours.token_ids[2:4] == encode(tok, "\n</think>")
    # vLLM's budget is tighter than our minimum: vLLM's forcing runs last and wins; our state follows it
    [theirs] = eng.generate([prompt], [{"tts_think_min": 10}], max_tokens=12, extra={"thinking_token_budget": 4})
    [budget_only] = eng.generate([prompt], [{}], max_tokens=12, extra={"thinking_token_budget": 4})
    assert end in theirs.token_ids[:6]
    assert theirs.token_ids[: theirs.token_ids.index(end) + 1] == budget_only.token_ids[: budget_only.token_ids.index(end) + 1]
    assert theirs.token_ids.count(end) == 1



# --- multi model: </think> spans several tokens -----------------------------


@pytest.mark.parametrize("cap", [0, 4])
def test_multi_token_end_string_cap(engines, overlap, cap):
    eng = engines.offline("multi", overlap)
    tok = eng.tokenizer
    forced = encode(tok, "\n</think>")
    assert len(encode(tok, "</think>")) > 1, "fixture: </think> must be several tokens here"
    prompt = chat_ids(tok, QUESTIONS[2])
    [out] = eng.generate([prompt], [{"tts_think_max": cap}], max_tokens=cap + len(forced) + 6)
    assert out.token_ids[:cap] == hf_greedy(engines.tiny_model("multi"), prompt, cap)
    assert out.token_ids[cap : cap + len(forced)] == forced
    assert "</think>" in tok.decode(out.token_ids)


def test_multi_token_end_string_no_think(engines, overlap):
    eng = engines.offline("multi", overlap)
    tok = eng.tokenizer
    [out] = eng.generate([chat_ids(tok, QUESTIONS[0])], [{"tts_no_think": True}], max_tokens=30)
    assert tok.decode(out.token_ids, skip_special_tokens=False).startswith(NO_THINK + "\n</think>")


# --- eager model: always tries to end thinking ------------------------------


def thinking_part(tok, out):
    text = tok.decode(out.token_ids, skip_special_tokens=False)
    return text.split("</think>")[0] if "</think>" in text else None


def test_eager_model_really_tries_to_stop(engines, overlap):
    eng = engines.offline("eager", overlap)
    tok = eng.tokenizer
    [out] = eng.generate([chat_ids(tok, QUESTIONS[0])], [{}], max_tokens=4)
    assert out.token_ids[0] == tok.convert_tokens_to_ids("</think>")


@pytest.mark.parametrize("minimum", [1, 6, 15])
def test_minimum_suppresses_the_end_and_splices_wait(engines, overlap, minimum):
    eng = engines.offline("eager", overlap)
    tok = eng.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    [out] = eng.generate([chat_ids(tok, QUESTIONS[1])], [{"tts_think_min": minimum}], max_tokens=minimum + 8)
    assert end in out.token_ids
    assert out.token_ids.index(end) == minimum, "the eager model ends as soon as the minimum allows"
    assert thinking_part(tok, out) == "Wait" * minimum
    assert tok.eos_token_id not in out.token_ids[:minimum]


@pytest.mark.parametrize("extend, wait", [(1, "Wait"), (3, "Hmm"), (2, "Alternatively")])
def test_extension_ignores_exactly_n_attempts(engines, overlap, extend, wait):
    eng = engines.offline("eager", overlap)
    tok = eng.tokenizer
    [out] = eng.generate([chat_ids(tok, QUESTIONS[2])], [{"tts_think_extend": extend, "tts_think_wait": wait}], max_tokens=40)
    assert thinking_part(tok, out) == wait * extend


def test_extension_under_sampling(engines, overlap):
    eng = engines.offline("eager", overlap)
    tok = eng.tokenizer
    outs = eng.generate([chat_ids(tok, QUESTIONS[0])] * 4, [{"tts_think_extend": 2}] * 4, max_tokens=30, temperature=1.0, seed=7)
    for out in outs:
        assert thinking_part(tok, out) is not None and thinking_part(tok, out).count("Wait") >= 2


# --- over HTTP --------------------------------------------------------------


def test_http_completions_and_chat(engines, engine_name):
    # vLLM: the processor is named on the command line *and* installed as an entry point (the shared server)
    srv = engines.shared_server("dense")
    from transformers import AutoTokenizer

    model = engines.tiny_model("dense")
    tok = AutoTokenizer.from_pretrained(str(model))
    client = srv.client()
    prompt = chat_text(tok, QUESTIONS[0])
    r = client.completions.create(
        model=srv.model, prompt=prompt, max_tokens=12, temperature=0,
        extra_body={**extra_body(engine_name, tts_think_max=3), "skip_special_tokens": False},
    )
    ref = hf_greedy(model, chat_ids(tok, QUESTIONS[0]), 3)
    assert r.choices[0].text.startswith(tok.decode(ref + encode(tok, "\n</think>"), skip_special_tokens=False))
    c = client.chat.completions.create(
        model=srv.model, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=30, temperature=0,
        extra_body={**extra_body(engine_name, tts_no_think=True), "skip_special_tokens": False},
    )
    msg = c.choices[0].message
    assert NO_THINK in ((msg.content or "") + (getattr(msg, "reasoning_content", None) or ""))


def test_http_reasoning_effort_is_a_thinking_budget(engines, engine_name):
    """The stock client's ``reasoning_effort`` caps thinking at the server's budget for that level (the shared
    server runs ``TTS_PLUGINS_REASONING_EFFORT=low=3,medium=5,high=0``): exactly that many thinking tokens, as
    transformers decodes them, then the conclusion and the end of thinking. ``high`` (0) does not cap, and an
    explicit ``tts_think_max`` wins over the level."""
    from transformers import AutoTokenizer

    from reliability import EFFORT_MAP

    srv = engines.shared_server("dense")
    model = engines.tiny_model("dense")
    tok = AutoTokenizer.from_pretrained(str(model))
    client = srv.client()
    budgets = {k: int(v) for k, v in (e.split("=") for e in EFFORT_MAP.split(","))}
    ids = chat_ids(tok, QUESTIONS[2])
    plain = hf_greedy(model, ids, 24)

    def chat(effort, **keys):
        body = {**extra_body(engine_name, **keys), "skip_special_tokens": False} if keys else {"skip_special_tokens": False}
        c = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=24,
                                           temperature=0, reasoning_effort=effort, extra_body=body)
        msg = c.choices[0].message
        return (getattr(msg, "reasoning_content", None) or "") + (msg.content or "")

    for effort in ("low", "medium"):
        want = tok.decode(plain[: budgets[effort]] + encode(tok, "\n</think>"), skip_special_tokens=False)
        assert chat(effort).startswith(want), effort
    longer = plain[: budgets["medium"] + 6]
    assert "</think>" not in tok.decode(longer, skip_special_tokens=False)  # so a cut would show
    assert chat("high").startswith(tok.decode(longer, skip_special_tokens=False))  # 0: no cap
    assert chat("low", tts_think_max=1).startswith(tok.decode(plain[:1] + encode(tok, "\n</think>"), skip_special_tokens=False))


def test_http_the_warning_is_spliced_at_its_share_of_the_cap(engines, engine_name):
    """``tts_think_warn`` at half of a cap of 8: four thinking tokens as transformers decodes them, the phrase,
    then the cap's conclusion and end once the request has thought 8 tokens in all (the phrase counts)."""
    from transformers import AutoTokenizer

    srv = engines.shared_server("dense")
    model = engines.tiny_model("dense")
    tok = AutoTokenizer.from_pretrained(str(model))
    phrase = " Hurry up."
    r = srv.client().completions.create(
        model=srv.model, prompt=chat_text(tok, QUESTIONS[0]), max_tokens=12, temperature=0,
        extra_body={**extra_body(engine_name, tts_think_max=8, tts_think_warn=phrase, tts_think_warn_at=0.5), "skip_special_tokens": False},
    )
    warn = encode(tok, phrase)[:4]
    ref = hf_greedy(model, chat_ids(tok, QUESTIONS[0]), 4)
    text = r.choices[0].text
    assert text.startswith(tok.decode(ref + warn, skip_special_tokens=False)), text
    assert len(encode(tok, text.partition("</think>")[0])) >= 8 and "</think>" in text, text


@pytest.mark.parametrize("per_block", [False, True], ids=["whole-request", "per-block"])
def test_http_a_capped_request_cannot_open_thinking_again(engines, engine_name, per_block):
    """The client pushes ``<think>`` with a logit bias: once the cap of 2 has ended thinking, the request's budget is
    spent and ``<think>`` cannot be produced again (one thinking block, whatever the bias); with
    ``tts_think_per_block`` the model opens block after block, each capped at 2."""
    from transformers import AutoTokenizer

    srv = engines.shared_server("dense")
    tok = AutoTokenizer.from_pretrained(str(engines.tiny_model("dense")))
    keys = {"tts_think_max": 2, **({"tts_think_per_block": True} if per_block else {})}
    r = srv.client().completions.create(
        model=srv.model, prompt=chat_text(tok, QUESTIONS[1]), max_tokens=16, temperature=0,
        logit_bias={str(tok.convert_tokens_to_ids("<think>")): 100},
        extra_body={**extra_body(engine_name, **keys), "skip_special_tokens": False},
    )
    text = r.choices[0].text
    first, _, after = text.partition("</think>")
    assert first.count("<think>") == 2 and after, text  # the bias rules inside thinking: two <think> tokens, the cap
    if per_block:
        assert after.startswith("<think>") and text.count("</think>") >= 2, text
    else:
        assert "<think>" not in after and "</think>" not in after, text


@pytest.mark.parametrize(
    "params, key",
    [
        ({"tts_think_max": -1}, "tts_think_max"),
        ({"tts_think_max": "ten"}, "tts_think_max"),
        ({"tts_think_min": 9, "tts_think_max": 2}, "tts_think_min"),
        ({"tts_unknown": 1}, "tts_unknown"),
        ({"tts_no_think": 7}, "tts_no_think"),
        ({"tts_think_max": 2**40}, "tts_think_max"),
        ({"tts_moi_beta": -1}, "tts_moi_beta"),
        ({"tts_moi_beta": 1.0, "tts_moi_topk": 0}, "tts_moi_topk"),
        ({"tts_moi_topk": 4}, "tts_moi_topk"),
    ],
)
def test_http_bad_parameters_get_400_and_the_server_keeps_serving(engines, engine_name, params, key):
    srv = engines.shared_server("dense")
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[engine_name]
    body = {"model": srv.model, "prompt": "What is 1 + 1?", "max_tokens": 4, field: params}
    r = requests.post(srv.base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert key in r.text
    ok = requests.post(srv.base + "/v1/completions",
                       json={"model": srv.model, "prompt": "What is 1 + 1?", "max_tokens": 4, field: {"tts_think_max": 1}}, timeout=60)
    assert ok.status_code == 200 and srv.alive()


def test_http_mixture_of_inputs_matches_the_reference(engines, engine_name):
    """MoI over the OpenAI endpoint (same server as above): the text equals the MoI reference loop's."""
    from transformers import AutoTokenizer

    from reference import hf_moi_greedy

    srv = engines.shared_server("dense")
    model = engines.tiny_model("dense")
    tok = AutoTokenizer.from_pretrained(str(model))
    prompt = chat_ids(tok, QUESTIONS[2])
    r = srv.client().completions.create(
        model=srv.model, prompt=prompt, max_tokens=16, temperature=0,
        extra_body={**extra_body(engine_name, tts_moi_beta=0.5, tts_moi_topk=10), "skip_special_tokens": False},
    )
    ref = hf_moi_greedy(model, prompt, 16, 0.5, 10, eos=tok.eos_token_id)
    assert r.choices[0].text == tok.decode(ref, skip_special_tokens=False)


@pytest.mark.vllm_only
def test_http_named_and_installed_processor_runs_once(engines, engine_name):
    srv = engines.shared_server("dense")
    r = requests.post(srv.base + "/v1/completions",
                      json={"model": srv.model, "prompt": "What is 1 + 1?", "max_tokens": 6, "vllm_xargs": {"tts_think_extend": 1}}, timeout=60)
    assert r.status_code == 200
    log = srv.log()
    assert log.count("this duplicate stays inert") == 1, "the second instance in the engine must stay inert"


def test_engine_parity_greedy_ids(engines, overlap):
    """The same request with the same keys gives the same ids in every engine: both equal this reference."""
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    model = engines.tiny_model("dense")
    prompt = chat_ids(tok, QUESTIONS[1])
    ref = hf_greedy(model, prompt, 4)
    forced = encode(tok, "\n</think>")
    # a cap of 4 forces "\n</think>" after the model's own 4 tokens; what follows is transformers' greedy
    expected = ref + forced
    expected += hf_greedy(model, prompt + expected, 16 - len(expected))
    [out] = eng.generate([prompt], [{"tts_think_max": 4}], max_tokens=16)
    assert out.token_ids == expected
