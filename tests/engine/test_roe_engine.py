"""RoE routing noise in the real engines on the tiny Qwen3-MoE: parity with a transformers loop.

The oracle (``reference.hf_roe_greedy``) routes every token of the sequence with the model's own gate on the
logits masked to ``TopK(R + tau * G, k)``, with the draws of (seed, position, layer); it recomputes the whole
sequence every step, so it also checks that the engine's KV cache, batching and chunking route each token once,
the same way.
"""

from __future__ import annotations

import pytest
import requests

from reference import hf_greedy, hf_roe_greedy

pytestmark = pytest.mark.engine

WORDS = "the cat sat on a mat and then it ran to see what was in the big red box".split()
SEED = 11


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.encode(" ".join(WORDS[(i * 3) % len(WORDS):] + WORDS)[: 60 + 25 * i]) for i in range(n)]


def want(model, prompt, params, max_new, eos):
    tau = params.get("tts_roe_tau", 0)
    return hf_roe_greedy(model, prompt, max_new, tau, SEED, eos) if tau else hf_greedy(model, prompt, max_new, eos)


BATCH = [{"tts_roe_tau": 1.0}, {}, {"tts_roe_tau": 0.3}, {"tts_roe_tau": 0.0}, {"tts_roe_tau": 3.0}, {}]


@pytest.mark.parametrize("chunked", [None, 32])
def test_noisy_rows_match_the_reference_and_plain_rows_are_untouched(engines, chunked):
    eng = engines.offline("moe", chunked_prefill=chunked)
    model = engines.tiny_model("moe")
    tok = eng.tokenizer
    ps = prompts(tok, len(BATCH))
    outs = eng.generate(ps, BATCH, max_tokens=12, seed=SEED)
    eos = tok.eos_token_id
    differs = 0
    for prompt, params, out in zip(ps, BATCH, outs):
        ref = want(model, prompt, params, 12, eos)
        assert out.token_ids == ref, (params, out.token_ids, ref)
        differs += params.get("tts_roe_tau", 0) > 0 and ref != hf_greedy(model, prompt, 12, eos)
    assert differs >= 1, "the noise must change some routing, or this test could not fail"


def test_noise_is_reproducible_and_never_leaks_through_the_prefix_cache(engines):
    eng = engines.offline("moe")
    model = engines.tiny_model("moe")
    tok = eng.tokenizer
    p = prompts(tok, 3)[2]
    eos = tok.eos_token_id
    first = eng.generate([p], [{"tts_roe_tau": 2.0}], max_tokens=10, seed=SEED)[0].token_ids
    plain = eng.generate([p], [{}], max_tokens=10, seed=SEED)[0].token_ids
    again = eng.generate([p], [{"tts_roe_tau": 2.0}], max_tokens=10, seed=SEED)[0].token_ids
    assert first == again == hf_roe_greedy(model, p, 10, 2.0, SEED, eos)
    assert plain == hf_greedy(model, p, 10, eos), "a plain request after a noisy one with the same prompt is plain"
    other = eng.generate([p], [{"tts_roe_tau": 2.0}], max_tokens=10, seed=SEED + 1)[0].token_ids
    assert other == hf_roe_greedy(model, p, 10, 2.0, SEED + 1, eos)


def test_per_layer_tau_matches_the_reference_and_a_list_of_the_wrong_length_runs_plain(engines):
    eng = engines.offline("moe")
    model = engines.tiny_model("moe")
    tok = eng.tokenizer
    eos = tok.eos_token_id
    p, q, r = prompts(tok, 3)
    batch = [{"tts_roe_tau_layers": [0.0, 3.0]}, {"tts_roe_tau_layers": [3.0, 0.0]}, {"tts_roe_tau_layers": [3.0, 3.0, 3.0]}, {}]
    outs = eng.generate([p, q, r, p], batch, max_tokens=12, seed=SEED)
    first, second = hf_roe_greedy(model, p, 12, [0.0, 3.0], SEED, eos), hf_roe_greedy(model, q, 12, [3.0, 0.0], SEED, eos)
    assert outs[0].token_ids == first and outs[1].token_ids == second, ([o.token_ids for o in outs[:2]], first, second)
    assert first != hf_roe_greedy(model, p, 12, 3.0, SEED, eos) or second != hf_roe_greedy(model, q, 12, 3.0, SEED, eos), \
        "a per-layer list must differ from one tau in every layer, or this test could not fail"
    assert outs[2].token_ids == hf_greedy(model, r, 12, eos), "three taus for a model of two MoE layers: the request runs plain"
    assert outs[3].token_ids == hf_greedy(model, p, 12, eos)


def test_bad_or_unsupported_roe_parameters_are_refused(engines):
    srv = engines.shared_server("moe")
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[srv.engine]
    for extra, fragment in [({"tts_roe_tau": -1}, "tts_roe_tau must be"), ({"tts_roe_tau": "x"}, "tts_roe_tau must be"),
                            ({"tts_roe_tau": 101}, "tts_roe_tau must be"), ({"tts_roe_tau_layers": [1.0, -2.0]}, "tts_roe_tau_layers must hold"),
                            ({"tts_roe_tau_layers": []}, "tts_roe_tau_layers must be a list"),
                            ({"tts_roe_tau": 1.0, "tts_roe_tau_layers": [1.0, 1.0]}, "not both")]:
        r = requests.post(srv.base + "/v1/completions", json={"model": srv.model, "prompt": "hi", "max_tokens": 2, field: extra}, timeout=60)
        assert r.status_code == 400 and fragment in r.text, (extra, r.text[:300])
    r = requests.post(srv.base + "/v1/completions",
                      json={"model": srv.model, "prompt": "hi", "max_tokens": 2, "temperature": 0, field: {"tts_roe_tau": 1.0}}, timeout=60)
    assert r.status_code == 200, r.text
