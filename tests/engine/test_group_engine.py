"""Group early stop in a real engine: short-m@k / First Finish Search without a client round trip."""

from __future__ import annotations

import pytest

from tts_plugins.text import encode

pytestmark = pytest.mark.engine

QUESTIONS = ["What is 2 + 3?", "What is 17 * 4 - 9?", "What is 120 + 5 * 3?", "What is 8 - 5?"]


def chat_ids(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)


def closing_step(tok, ids):
    """Index of the token that completes </think>, or None."""
    for i in range(len(ids)):
        if "</think>" in tok.decode(ids[: i + 1], skip_special_tokens=False):
            return i
    return None


def test_first_to_finish_thinking_ends_the_rest_of_its_group(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    caps = [2, 5, 8, 11]  # member i closes its thinking after caps[i] tokens
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    stop_text = " [stopped]"
    grouped = eng.generate(prompts, [{"tts_group": "q7", "tts_think_max": c, "tts_group_stop_text": stop_text} for c in caps], max_tokens=40)
    alone = eng.generate(prompts, [{"tts_think_max": c} for c in caps], max_tokens=40)
    stop_step = caps[0] + len(encode(tok, "\n</think>"))
    assert grouped[0].token_ids == alone[0].token_ids, "the member that finished goes on untouched"
    tail = encode(tok, stop_text) + [tok.eos_token_id]
    for i, out in enumerate(grouped[1:], 1):
        # The engine may admit members a step apart, so a member's own step count at the stop can lag the
        # finisher's by one; it must never run past it, and nothing but the stop may change its tokens.
        j = len(out.token_ids) - len(tail)
        assert out.token_ids[j:] == tail, f"member {i} must end with the stop text and EOS"
        assert out.token_ids[:j] == alone[i].token_ids[:j], f"member {i} before the stop"
        assert stop_step - 2 <= j <= stop_step, f"member {i} stopped after {j} tokens; the group finished at {stop_step}"
        assert out.finish_reason == "stop" and out.text.endswith(stop_text)
    spent = sum(len(o.token_ids) for o in grouped)
    full = sum(len(o.token_ids) for o in alone)
    print(f"\n[{engines.engine}] short-1@4 decode tokens {spent} vs all-4 {full}: ratio {spent / full:.2f}")


def test_groups_and_plain_requests_do_not_interfere(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    params = [{"tts_group": "a", "tts_think_max": 1}, {"tts_group": "a"}, {"tts_group": "b"}, {}]
    outs = eng.generate(prompts, params, max_tokens=24)
    plain = eng.generate(prompts, [{}] * 4, max_tokens=24)
    assert outs[1].token_ids[-1] == tok.eos_token_id and len(outs[1].token_ids) < 24
    assert outs[2].token_ids == plain[2].token_ids and outs[3].token_ids == plain[3].token_ids
    # the same group id used again later starts a fresh group
    again = eng.generate(prompts[:2], [{"tts_group": "a"}, {"tts_group": "a"}], max_tokens=24)
    assert [o.token_ids for o in again] == [p.token_ids for p in plain[:2]]


def test_n_samples_of_one_request_form_a_group(engines, overlap):
    """short-1@k with n=k in one request: sampled chains of random length; the first to finish thinking ends the rest."""
    eng = engines.offline("wobbly", overlap)
    tok = eng.tokenizer
    prompt = chat_ids(tok, QUESTIONS[1])
    k = 8
    grouped = eng.generate([prompt], [{"tts_group": "n8"}], max_tokens=48, temperature=1.0, seed=11, n=k)
    free = eng.generate([prompt], [{}], max_tokens=48, temperature=1.0, seed=11, n=k)
    assert len(grouped) == k
    closes = [closing_step(tok, o.token_ids) for o in grouped]
    # a sample finishes when it closes its thinking, or ends (EOS) without closing it
    finishes = [c if c is not None else len(o.token_ids) - 1 for o, c in zip(grouped, closes)]
    first = min(finishes)
    for o, c, f in zip(grouped, closes, finishes):
        if f <= first + 1:  # finished in the same step as the first, give or take the start offset
            continue
        # stopped at the next step; the engine may start the samples a step apart (one step of slack)
        assert o.token_ids[-1] == tok.eos_token_id and len(o.token_ids) <= first + 3, (first, c, len(o.token_ids))
    spent = sum(len(o.token_ids) for o in grouped)
    full = sum(len(o.token_ids) for o in free)
    assert spent < full
    print(f"\n[{engines.engine}] short-1@{k} (n={k}, one request) decode tokens {spent} vs all-{k} {full}: ratio {spent / full:.2f}")


def test_first_finish_search_counts_the_eos_of_the_first_to_end(engines, overlap):
    """First Finish Search (finish = EOS): the first sample to end stops the rest, whose EOS comes right after."""
    eng = engines.offline("wobbly", overlap)
    tok = eng.tokenizer
    prompt = chat_ids(tok, QUESTIONS[2])
    k = 8
    grouped = eng.generate([prompt], [{"tts_group": "ffs", "tts_group_finish": "eos"}], max_tokens=64, temperature=1.0, seed=5, n=k)
    free = eng.generate([prompt], [{}], max_tokens=64, temperature=1.0, seed=5, n=k)
    natural = [o for o in free if o.token_ids[-1] == tok.eos_token_id]
    assert natural, "fixture: some samples must end by themselves within 64 tokens"
    shortest = min(len(o.token_ids) for o in grouped)
    assert all(len(o.token_ids) <= shortest + 2 for o in grouped), [len(o.token_ids) for o in grouped]
    spent, full = sum(len(o.token_ids) for o in grouped), sum(len(o.token_ids) for o in free)
    assert spent < full
    print(f"\n[{engines.engine}] first-finish@{k} decode tokens {spent} vs all-{k} {full}: ratio {spent / full:.2f}")
