"""Mixture of Inputs in a real engine: token-for-token parity with a plain transformers loop.

The oracle (``reference.hf_moi_greedy``) feeds ``inputs_embeds`` computed by
the paper's formula over the whole vocabulary in float64; it shares no code
path with the engines' vectorized stash and mixture.
"""

from __future__ import annotations

import pytest

from reference import hf_greedy, hf_logprobs, hf_moi_greedy

pytestmark = pytest.mark.engine

WORDS = "the cat sat on a mat and then it ran to see what was in the big red box".split()


def staggered_prompts(tok, n: int, base: int = 3) -> list[list[int]]:
    return [tok.encode(" ".join(WORDS[(i * 5) % len(WORDS) :] + WORDS)[: 12 * (base + 2 * i)]) for i in range(n)]


def expected(model, prompt, params, max_new, eos):
    if "tts_moi_beta" in params:
        return hf_moi_greedy(model, prompt, max_new, params["tts_moi_beta"], params.get("tts_moi_topk", 20), eos=eos)
    return hf_greedy(model, prompt, max_new, eos)


MIXED_BATCH = [
    {"tts_moi_beta": 1.0},
    {},
    {"tts_moi_beta": 0.5, "tts_moi_topk": 5},
    {"tts_moi_beta": 2.0, "tts_moi_topk": 64},
    {},
    {"tts_moi_beta": 1.0, "tts_moi_topk": 1},
]


def test_greedy_matches_the_reference_in_a_mixed_staggered_batch(engines, overlap):
    """Opted-in rows equal the MoI loop; plain rows equal plain greedy, in one batch of staggered prompts."""
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = staggered_prompts(tok, len(MIXED_BATCH))
    outs = eng.generate(prompts, MIXED_BATCH, max_tokens=24)
    differs = 0
    for i, (prompt, params, out) in enumerate(zip(prompts, MIXED_BATCH, outs)):
        assert out.token_ids == expected(model, prompt, params, 24, tok.eos_token_id), f"row {i} {params}"
        if params and params.get("tts_moi_topk", 20) > 1:
            differs += out.token_ids != hf_greedy(model, prompt, 24, tok.eos_token_id)
    assert differs >= 2, "the mixture must change what the model generates (else this test proves nothing)"


def test_topk_one_is_plain_decoding(engines, overlap):
    """k = 1 makes the distribution certain (H = 0): exactly the sampled token's embedding."""
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    [prompt] = staggered_prompts(tok, 1, base=4)
    [out] = eng.generate([prompt], [{"tts_moi_beta": 0.3, "tts_moi_topk": 1}], max_tokens=20)
    assert out.token_ids == hf_greedy(model, prompt, 20, tok.eos_token_id)


def test_requests_joining_and_leaving(engines, overlap):
    """Two waves: short and long requests finish at different steps while others keep mixing."""
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = staggered_prompts(tok, 4)
    params = [{"tts_moi_beta": 1.0}, {}, {"tts_moi_beta": 1.5}, {"tts_moi_beta": 0.7, "tts_moi_topk": 8}]
    for max_tokens in (5, 17):
        outs = eng.generate(prompts, params, max_tokens=max_tokens)
        for i, out in enumerate(outs):
            assert out.token_ids == expected(model, prompts[i], params[i], max_tokens, tok.eos_token_id), f"row {i}"


def test_plain_requests_never_reuse_kv_computed_from_mixtures(engines, overlap):
    """A plain request whose prompt continues a mixed request's output decodes like a fresh plain request.

    With prefix caching, the mixed request's generated tokens would otherwise hand their KV (computed from
    mixtures, not from the token ids) to the follow-up. Long enough to fill vLLM's cache blocks.
    """
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompt = (tok.encode(" ".join(WORDS * 8)))[:100]  # with 40 generated tokens, past a 128-token block
    [mixed] = eng.generate([prompt], [{"tts_moi_beta": 0.5}], max_tokens=40)
    follow = prompt + mixed.token_ids
    if tok.eos_token_id in follow[len(prompt) :]:
        follow = follow[: len(prompt) + mixed.token_ids.index(tok.eos_token_id)]
    [plain] = eng.generate([follow], [{}], max_tokens=12, logprobs=True)
    assert plain.token_ids == hf_greedy(model, follow, 12, tok.eos_token_id)
    # greedy ids of a random tiny model hardly move; reused mixed KV shifts the log-probs by ~1e-2
    ref = hf_logprobs(model, follow, plain.token_ids)
    assert max(abs(a - b) for a, b in zip(plain.logprobs, ref)) < 2e-3, (plain.logprobs[:4], ref[:4])
    [again] = eng.generate([prompt], [{}], max_tokens=16)
    assert again.token_ids == hf_greedy(model, prompt, 16, tok.eos_token_id)


def test_sampled_mixed_rows_leave_greedy_plain_rows_alone(engines, overlap):
    """Mixed rows sampled at temperature 1 next to greedy plain rows: the plain rows equal plain greedy."""
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = staggered_prompts(tok, 4)
    params = [{"tts_moi_beta": 1.0, "_temperature": 1.0}, {}, {"tts_moi_beta": 0.5, "tts_moi_topk": 40, "_temperature": 1.0}, {}]
    outs = eng.generate(prompts, params, max_tokens=20)
    for i in (1, 3):
        assert outs[i].token_ids == hf_greedy(model, prompts[i], 20, tok.eos_token_id), f"plain row {i}"
    assert all(len(o.token_ids) > 0 for o in outs)


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"tts_moi_beta": 0}, "tts_moi_beta"),
        ({"tts_moi_beta": -2.5}, "tts_moi_beta"),
        ({"tts_moi_beta": "strong"}, "tts_moi_beta"),
        ({"tts_moi_beta": 1.0, "tts_moi_topk": 100000}, "tts_moi_topk"),
        ({"tts_moi_topk": 3}, "tts_moi_topk"),
    ],
)
def test_bad_parameters_are_refused_and_the_engine_goes_on(engines, overlap, bad, key):
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    [prompt] = staggered_prompts(tok, 1)
    with pytest.raises(Exception, match=key):
        eng.generate([prompt], [bad], max_tokens=4)
    [out] = eng.generate([prompt], [{"tts_moi_beta": 1.0}], max_tokens=8)
    assert out.token_ids == hf_moi_greedy(model, prompt, 8, 1.0, eos=tok.eos_token_id)


# --- engines of their own (started last, one each) ---------------------------


def test_chunked_prefill(engines):
    """Prompts longer than the prefill chunk: the discarded samples of partial prefills are never mixed."""
    eng = engines.offline("dense", True, chunked_prefill=64)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = [tok.encode(" ".join(WORDS * 6))[: 70 + 13 * i] for i in range(3)]
    params = [{"tts_moi_beta": 1.0}, {}, {"tts_moi_beta": 0.5, "tts_moi_topk": 10}]
    outs = eng.generate(prompts, params, max_tokens=16)
    for i, out in enumerate(outs):
        assert out.token_ids == expected(model, prompts[i], params[i], 16, tok.eos_token_id), f"row {i}"


@pytest.mark.vllm_only
def test_tensor_parallel_ranks_build_the_same_mixture(engines):
    """TP = 2 on two CPU cores: every rank embeds the top-k through the vocab-parallel embedding (all-reduce)."""
    eng = engines.offline("dense", True, tensor_parallel=2)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = staggered_prompts(tok, len(MIXED_BATCH))
    outs = eng.generate(prompts, MIXED_BATCH, max_tokens=24)
    for i, (prompt, params, out) in enumerate(zip(prompts, MIXED_BATCH, outs)):
        assert out.token_ids == expected(model, prompt, params, 24, tok.eos_token_id), f"row {i} {params}"


@pytest.mark.vllm_only
def test_a_preempted_request_re_prefills_plain_and_resumes_mixing(engines):
    """KV for 9 blocks of 128 tokens, three requests growing to 4 blocks each: vLLM preempts one (recompute).

    The documented behaviour, checked exactly: after t generated tokens the request is re-prefilled with
    plain embeddings (the stashed mixture of its last token is dropped, not applied to a stale row) and
    mixes again from its next sampled token. The reference replays that for some t before the divergence.
    """
    eng = engines.offline("dense", True, num_gpu_blocks_override=9, enable_prefix_caching=False)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = [tok.encode(" ".join(WORDS * 8))[i : i + 100] for i in range(3)]
    params = [{}, {"tts_moi_beta": 1.0}, {"tts_moi_beta": 0.5}]
    outs = eng.generate(prompts, params, max_tokens=300, extra={"ignore_eos": True})
    assert outs[0].token_ids == hf_greedy(model, prompts[0], 300), "a plain request is unaffected by preemption"
    preempted = 0
    for prompt, p, out in zip(prompts[1:], params[1:], outs[1:]):
        ref = hf_moi_greedy(model, prompt, 300, p["tts_moi_beta"])
        if out.token_ids == ref:
            continue
        preempted += 1
        d = next(i for i, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b)
        replays = (t for t in range(d, max(d - 60, 0), -1) if hf_moi_greedy(model, prompt, 300, p["tts_moi_beta"], replain_at=t) == out.token_ids)
        assert next(replays, None) is not None, f"{p}: diverges at {d} and no plain re-prefill point explains it"
    assert preempted >= 1, "no mixed request was preempted: the scenario no longer tests preemption"
