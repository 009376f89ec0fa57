"""Think-token steering end to end on the engine-neutral core, with the real tiny tokenizers.

The "model" is synthetic (tests/sim.py) so each property can be stated
exactly: the cap count, the forced sequences, the gate, the extension count.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.technique import SlotRequest
from tts_plugins.text import encode

from sim import Request, Sim, random_model, wants


def chat_prompt(tok, text="What is 2 + 3?"):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def banned_enders(tok):
    """Tokens whose text completes </think> or ends the request: a model that never stops by itself."""
    return [i for i in range(len(tok)) if ">" in tok.decode([i])] + [tok.eos_token_id]


@pytest.fixture(scope="session", params=["dense", "multi"])
def tok(request, dense_tokenizer, multi_tokenizer):
    return dense_tokenizer if request.param == "dense" else multi_tokenizer


@given(cap=st.integers(0, 25), seed=st.integers(0, 10_000),
       conclusion=st.sampled_from(["\n", "", " Considering the limited time, I have to give the solution now.\n"]))
def test_cap_count_is_exact_and_forces_conclusion_then_end(tok, cap, seed, conclusion):
    sim = Sim(tok)
    prompt = chat_prompt(tok)
    model = random_model(len(tok), seed, banned=banned_enders(tok))
    forced = encode(tok, conclusion + "</think>")
    [out] = sim.run([Request(prompt, {"tts_think_max": cap, "tts_think_conclusion": conclusion})], model, cap + len(forced) + 3)
    [plain] = sim.run([Request(prompt, {})], model, cap)
    assert out[:cap] == plain[:cap], "the model's own thinking tokens must be untouched before the cap"
    assert out[cap : cap + len(forced)] == forced
    assert out[cap + len(forced)] != tok.eos_token_id, "the answer after a capped think block is never empty"
    assert decode(tok, out).count("</think>") == 1


@given(seed=st.integers(0, 10_000))
def test_no_think_forces_the_prefill_at_step_zero(tok, seed):
    sim = Sim(tok)
    text = "Okay, I think I have finished thinking."
    forced = encode(tok, text + "\n</think>")
    [out] = sim.run([Request(chat_prompt(tok), {"tts_no_think": True})], random_model(len(tok), seed), len(forced) + 2, stop_at_eos=False)
    assert out[: len(forced)] == forced


def test_no_think_without_an_open_block_prefills_the_whole_block(tok):
    sim = Sim(tok)
    prompt = encode(tok, "What is 2 + 3?")
    forced = encode(tok, "<think>\nOkay, I think I have finished thinking.\n</think>")
    [out] = sim.run([Request(prompt, {"tts_no_think": True})], random_model(len(tok), 1), len(forced), stop_at_eos=False)
    assert out == forced


def end_spelling(tok):
    """A model that, inside thinking, always continues spelling </think> (token by token if it is several)."""
    end_ids = encode(tok, "</think>")

    def favourite(out):
        text = decode(tok, out)
        if "</think>" in text:
            return None
        # longest suffix of out that is a prefix of end_ids
        for k in range(min(len(end_ids) - 1, len(out)), -1, -1):
            if k == 0 or out[-k:] == end_ids[:k]:
                return end_ids[k]
        return end_ids[0]

    return favourite


@given(minimum=st.integers(1, 30), seed=st.integers(0, 1000))
def test_minimum_keeps_thinking_open_and_splices_wait(tok, minimum, seed):
    sim = Sim(tok)
    model = wants(len(tok), end_spelling(tok), seed)
    [out] = sim.run([Request(chat_prompt(tok), {"tts_think_min": minimum})], model, minimum + 40)
    text = decode(tok, out)
    assert "</think>" in text, "once the minimum is met the model may end thinking"
    # thinking tokens: every token before the one that completes the end string
    thinking = next(i for i in range(len(out)) if "</think>" in decode(tok, out[: i + 1]))
    assert thinking >= minimum, f"end of thinking after {thinking} tokens, minimum {minimum}: {text!r}"
    if minimum >= len(encode(tok, "</think>")):  # the model tried to finish inside the window
        assert "Wait" in text.split("</think>")[0]


@given(extend=st.integers(0, 6), seed=st.integers(0, 1000), wait=st.sampled_from(["Wait", "Hmm", "Alternatively", " Let me check the sum again."]))
def test_extension_ignores_exactly_n_attempts(tok, extend, seed, wait):
    sim = Sim(tok)
    model = wants(len(tok), end_spelling(tok), seed)
    params = {"tts_think_extend": extend, "tts_think_wait": wait} if extend else {"tts_think_max": 10_000}
    [out] = sim.run([Request(chat_prompt(tok), params)], model, 10 * (extend + 1) + 20)
    text = decode(tok, out)
    thinking = text.split("</think>")[0]
    assert text.count("</think>") >= 1
    assert thinking.count(wait) == extend, repr(text)


def test_min_and_cap_together(tok):
    sim = Sim(tok)
    model = wants(len(tok), end_spelling(tok), 3)
    [out] = sim.run([Request(chat_prompt(tok), {"tts_think_min": 6, "tts_think_max": 9})], model, 40)
    text = decode(tok, out)
    assert "</think>" in text


# Rows that do not opt in, batch order and slot reuse: the conformance suite checks them for every technique
# (tests/test_conformance.py runs it on the built-ins), so they are not repeated here.


@pytest.mark.parametrize("per_block", [False, True])
def test_a_reopened_thinking_block_counts_against_the_same_budget(dense_tokenizer, per_block):
    """The model ends thinking by itself after 3 tokens, answers, and thinks again: with the cap of 5 the request
    has 2 thinking tokens left (``tts_think_per_block``: the second block gets its own 5)."""
    tok = dense_tokenizer
    sim = Sim(tok)
    think_open, think_close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    plan = [None] * 3 + [think_close, None, think_open]  # answer, then thinking again

    def favourite(out):
        return plan[len(out)] if len(out) < len(plan) else None

    banned = banned_enders(tok)
    base = random_model(len(tok), 5, banned=[b for b in banned if b not in (think_close,)])

    def model(req, out):
        z = base(req, out)
        z[think_close] = -1e9
        fav = favourite(out)
        if fav is not None:
            z[fav] = 1e9
        return z

    params = {"tts_think_max": 5, **({"tts_think_per_block": True} if per_block else {})}
    [out] = sim.run([Request(chat_prompt(tok), params)], model, 20)
    assert decode(tok, out).count("</think>") == 2
    second = out[out.index(think_open) + 1 :]
    left = 5 if per_block else 5 - 3
    assert second[left : left + 2] == encode(tok, "\n</think>")


@given(cap=st.integers(0, 6), seed=st.integers(0, 1000), per_block=st.booleans())
def test_once_the_cap_ended_thinking_the_model_cannot_think_again(dense_tokenizer, cap, seed, per_block):
    """A model that wants to open ``<think>`` at every step after its thinking: the cap ends thinking, and from then
    on the start string is blocked, so the completion holds one thinking block and at most ``cap`` thinking
    tokens; with ``tts_think_per_block`` the model opens another block (and each is capped)."""
    tok = dense_tokenizer
    sim = Sim(tok)
    think_open = tok.convert_tokens_to_ids("<think>")
    base = random_model(len(tok), seed, banned=banned_enders(tok))

    def model(req, out):
        z = base(req, out)
        z[think_open] = 1e9 if "</think>" in decode(tok, out) else -1e9  # inside the first block: think plainly
        return z

    params = {"tts_think_max": cap, **({"tts_think_per_block": True} if per_block else {})}
    [out] = sim.run([Request(chat_prompt(tok), params)], model, cap + 12, stop_at_eos=False)
    text = decode(tok, out)
    if per_block:
        assert text.count("<think>") >= 1 and text.count("</think>") >= 2
    else:
        assert "<think>" not in text and text.count("</think>") == 1
        forced = encode(tok, "\n</think>")
        assert out[cap : cap + len(forced)] == forced  # cap thinking tokens, then the conclusion and the end


@given(seed=st.integers(0, 1000))
def test_host_row_hints_change_nothing(tok, seed):
    prompt = chat_prompt(tok)
    reqs = [Request(prompt, {"tts_think_max": 3}), Request(prompt, {}), Request(prompt, {"tts_think_min": 5}),
            Request(prompt, {"tts_no_think": True})]
    model = wants(len(tok), end_spelling(tok), seed)
    assert Sim(tok, host_rows=True).run(reqs, model, 16) == Sim(tok, host_rows=False).run(reqs, model, 16)


@given(extend=st.integers(1, 4), cut=st.integers(1, 12), seed=st.integers(0, 100))
def test_readmission_with_history_reproduces_the_state(tok, extend, cut, seed):
    """A preempted request comes back with its outputs so far; replaying them must give the same decisions."""
    prompt = chat_prompt(tok)
    model = wants(len(tok), end_spelling(tok), seed)
    params = {"tts_think_extend": extend, "tts_think_max": 40}
    [full] = Sim(tok).run([Request(prompt, params)], model, 30)
    sim = Sim(tok)
    history = list(full[:cut])
    sim.state.admit(sim.rows.take(0), sim.registry.parse(params), SlotRequest(prompt, greedy=True), history)
    out = history
    for _ in range(30 - cut):
        if out and out[-1] == tok.eos_token_id:
            break
        sim.state.observe()
        z = sim.state.apply(model(0, out)[None].clone(), sim.rows.device_view(1), sim.rows.host_view(1))
        out.append(int(z[0].argmax()))
    assert out == full[: len(out)]


# --- graceful landing: a warning before the cap, a grace to end the sentence ------------------------------------


def _sentence_enders(tok):
    return [i for i in range(len(tok)) if tok.decode([i]).rstrip(" ").endswith((".", "!", "?", "\n"))]


@given(cap=st.integers(1, 30), share=st.sampled_from([0.1, 0.5, 0.8, 1.0]), seed=st.integers(0, 1000),
       phrase=st.sampled_from([True, " Time is short."]))
def test_the_warning_is_spliced_once_at_its_share_of_the_cap_and_counts(dense_tokenizer, cap, share, seed, phrase):
    import math

    from tts_plugins.logits_processors.think import DEFAULT_WARN

    tok = dense_tokenizer
    sim = Sim(tok)
    model = random_model(len(tok), seed, banned=banned_enders(tok))
    warn = encode(tok, DEFAULT_WARN if phrase is True else phrase)
    forced = encode(tok, "\n</think>")
    params = {"tts_think_max": cap, "tts_think_warn": phrase, "tts_think_warn_at": share}
    [out] = sim.run([Request(chat_prompt(tok), params)], model, cap + len(forced) + 2)
    [plain] = sim.run([Request(chat_prompt(tok), {})], model, cap)
    at = math.ceil(share * cap)
    if at >= cap:  # no room before the cap: no warning
        assert out[:cap] == plain[:cap] and out[cap : cap + len(forced)] == forced
        return
    assert out[:at] == plain[:at]
    spliced = warn[: cap - at]  # the cap cuts a warning that runs past it
    assert out[at : at + len(spliced)] == spliced
    assert out[cap : cap + len(forced)] == forced, "the warning's tokens count as thinking"
    assert decode(tok, out).count(decode(tok, warn)) <= 1


@given(cap=st.integers(1, 12), grace=st.integers(1, 10), end_after=st.integers(0, 14), seed=st.integers(0, 1000))
def test_the_grace_lets_the_sentence_end_before_the_conclusion(dense_tokenizer, cap, grace, end_after, seed):
    """The model ends a sentence only at step ``cap + end_after``: within the grace, the conclusion comes right after
    it; past the grace, at ``cap + grace``."""
    tok = dense_tokenizer
    sim = Sim(tok)
    enders = _sentence_enders(tok)
    base = random_model(len(tok), seed, banned=banned_enders(tok) + enders)
    dot = encode(tok, ".")[0]

    def model(req, out):
        z = base(req, out)
        if len(out) == cap + end_after:
            z[dot] = 1e9
        return z

    forced = encode(tok, "\n</think>")
    [out] = sim.run([Request(chat_prompt(tok), {"tts_think_max": cap, "tts_think_grace": grace})], model, cap + grace + len(forced) + 2)
    stop = cap + end_after + 1 if end_after < grace else cap + grace
    assert out[stop : stop + len(forced)] == forced
    assert decode(tok, out[:stop]).count("</think>") == 0


@pytest.mark.parametrize(("flat", "needle"), [
    ({"tts_think_warn": True}, "tts_think_warn only takes effect with tts_think_max"),
    ({"tts_think_grace": 4, "tts_think_min": 2}, "tts_think_grace needs tts_think_max"),
    ({"tts_think_max": 8, "tts_think_warn_at": 0.5}, "tts_think_warn_at needs tts_think_warn"),
    ({"tts_think_max": 8, "tts_think_warn": True, "tts_think_warn_at": 0}, "tts_think_warn_at"),
    ({"tts_think_max": 8, "tts_think_warn": True, "tts_think_warn_at": 1.5}, "tts_think_warn_at"),
    ({"tts_think_max": 8, "tts_think_grace": -1}, "tts_think_grace"),
    ({"tts_think_max": 8, "tts_think_grace": 5000}, "tts_think_grace"),
    ({"tts_think_max": 8, "tts_think_warn": ""}, "tts_think_warn"),
    ({"tts_think_max": 8, "tts_think_warn": 3}, "tts_think_warn"),
])
def test_warn_and_grace_keys_are_validated(flat, needle):
    from tts_plugins.logits_processors.think import ThinkParams

    with pytest.raises(ValueError, match=needle):
        ThinkParams.parse(flat)
