"""Thought trimming in a real engine: the repetition trigger on the tiny model's own greedy loops."""

from __future__ import annotations

import pytest

from tts_plugins.logits_processors.trim import DEFAULT_TRIM_CONCLUSION
from tts_plugins.text import encode

from reference import hf_greedy

pytestmark = pytest.mark.engine


def first_repeat(ids, n, repeats):
    seen = {}
    for j in range(n - 1, len(ids)):
        key = tuple(ids[j - n + 1 : j + 1])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= repeats:
            return j
    return None


@pytest.mark.parametrize("n, repeats", [(2, 2), (2, 3), (3, 2)])
def test_repetition_trigger_ends_thinking_where_the_reference_loops(engines, overlap, n, repeats):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    model = engines.tiny_model("dense")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = hf_greedy(model, prompt, 60)
    j = first_repeat(ref, n, repeats)
    assert j is not None, "fixture: the tiny model's greedy thinking must loop"
    params = {"tts_trim_ngram": n, "tts_trim_repeats": repeats, "tts_trim_converge": 0, "tts_trim_max_thoughts": 0}
    forced = encode(tok, DEFAULT_TRIM_CONCLUSION + "</think>")
    [out, plain] = eng.generate([prompt, prompt], [params, {}], max_tokens=j + len(forced) + 4)
    assert out.token_ids[: j + 1] == ref[: j + 1]
    assert out.token_ids[j + 1 : j + 1 + len(forced)] == forced
    assert plain.token_ids == ref[: len(plain.token_ids)], "the plain request beside it is untouched"
