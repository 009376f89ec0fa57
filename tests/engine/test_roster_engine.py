"""RoE rosters in the real engines on the tiny Qwen3-MoE: K members decode one sequence equal to a transformers
loop that averages the K routed distributions per step; a request's n samples form a roster; an incomplete
roster waits without holding anything else back, and its aborted members leave no state; a request's roster has a
clean member 0 by default, or one tau per member."""

from __future__ import annotations

import concurrent.futures
import glob
import json
import time
from pathlib import Path

import pytest
import requests

from reference import hf_greedy, hf_roster

pytestmark = pytest.mark.engine

WORDS = "the cat sat on a mat and then it ran to see what was in the big red box".split()


def prompt(tok, i: int) -> list[int]:
    return tok.encode(" ".join(WORDS[(i * 5) % len(WORDS):] + WORDS)[: 50 + 20 * i])


MEMBERS = [(0.0, 21), (1.5, 22), (3.0, 23)]  # (tau, seed): one clean member and two noisy ones


@pytest.mark.parametrize("chunked", [None, 24])
def test_a_greedy_roster_is_one_sequence_equal_to_the_averaging_reference(engines, chunked):
    eng = engines.offline("moe", chunked_prefill=chunked)
    model, tok = engines.tiny_model("moe"), eng.tokenizer
    eos = tok.eos_token_id
    p, q = prompt(tok, 0), prompt(tok, 1)
    roster = [{"tts_roe_roster": "g", "tts_roe_roster_size": 3, "_seed": s, **({"tts_roe_tau": t} if t else {})} for t, s in MEMBERS]
    # members interleaved with a plain request
    outs = eng.generate([p, q, p, p], [roster[0], {}, roster[1], roster[2]], max_tokens=10)
    got = [outs[0].token_ids, outs[2].token_ids, outs[3].token_ids]
    assert got[0] == got[1] == got[2], got
    assert outs[1].token_ids == hf_greedy(model, q, 10, eos), "the plain request of the batch is untouched"
    want = hf_roster(model, p, 10, MEMBERS, eos=eos)
    if chunked:
        # 3 prompts of len(p) tokens do not fit one step's 24-token budget, so the members finish their prefills
        # in different steps and the first to finish decides the first tokens alone (documented); the roster still
        # emits one sequence, which is some member's own routing continued by the roster
        assert len(p) * 3 > chunked
        return
    assert got[0] == want, (got[0], want)
    alone = [hf_roster(model, p, 10, [m], eos=eos) for m in MEMBERS]
    assert any(a != want for a in alone), "the roster must differ from some member alone, or this test could not fail"


def test_a_requests_samples_form_a_sampling_roster_reproducible_from_its_seed(engines):
    eng = engines.offline("moe")
    model, tok = engines.tiny_model("moe"), eng.tokenizer
    p = prompt(tok, 2)
    params = [{"tts_roe_roster_size": 3, "tts_roe_tau": 2.0, "_temperature": 0.9}]
    first = eng.generate([p], params, max_tokens=10, n=3, seed=40)
    again = eng.generate([p], params, max_tokens=10, n=3, seed=40)
    assert len(first) == 3 and first[0].token_ids == first[1].token_ids == first[2].token_ids, [o.token_ids for o in first]
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    # both engines give sample i the seed 40 + i (its routing noise); the roster's draw is keyed by the smallest;
    # sample 0 is the roster's clean member (tau 0) by default
    want = hf_roster(model, p, 10, [(0.0, 40), (2.0, 41), (2.0, 42)], temperature=0.9, key=40, eos=tok.eos_token_id)
    assert first[0].token_ids == want, (first[0].token_ids, want)


def test_a_requests_roster_has_a_clean_member_0_unless_told_otherwise_and_takes_per_member_taus(engines):
    eng = engines.offline("moe")
    model, tok = engines.tiny_model("moe"), eng.tokenizer
    p, eos = prompt(tok, 2), tok.eos_token_id
    base = {"tts_roe_roster_size": 3, "tts_roe_tau": 5.0, "_temperature": 0.9}
    cases = [({}, [(0.0, 40), (5.0, 41), (5.0, 42)]),  # the default: sample 0 clean, the others at the request's tau
             ({"tts_roe_roster_clean": False}, [(5.0, 40), (5.0, 41), (5.0, 42)]),  # every member noisy
             ({"tts_roe_roster_taus": [1.0, 0.0, 5.0]}, [(1.0, 40), (0.0, 41), (5.0, 42)])]  # one tau per member
    wants = [hf_roster(model, p, 10, members, temperature=0.9, key=40, eos=eos) for _, members in cases]
    assert len({tuple(w) for w in wants}) == 3, "the three settings must give three sequences, or this test could not fail"
    for (extra, members), want in zip(cases, wants):
        outs = eng.generate([p], [{**base, **extra}], max_tokens=10, n=3, seed=40)
        assert len(outs) == 3 and outs[0].token_ids == outs[1].token_ids == outs[2].token_ids, (extra, [o.token_ids for o in outs])
        assert outs[0].token_ids == want, (extra, members, outs[0].token_ids, want)


def _debug_counts(prefix: str) -> dict[str, int]:
    merged: dict[str, int] = {}
    for f in glob.glob(prefix + ".*"):
        if f.endswith(".tmp"):
            continue
        try:
            counts = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue
        for k, v in counts.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def test_an_incomplete_roster_waits_without_holding_the_batch_and_aborted_members_leave(engines, engine_name):
    srv = engines.shared_server("moe")  # debug counters on, under a prefix fresh for this server
    prefix = engines.debug_prefix
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[srv.engine]

    def post(extra, timeout, max_tokens=6):
        body = {"model": srv.model, "prompt": "the cat sat", "max_tokens": max_tokens, "temperature": 0}
        if extra:
            body[field] = extra
        return requests.post(srv.base + "/v1/completions", json=body, timeout=timeout)

    lonely = {"tts_roe_roster": "lonely", "tts_roe_roster_size": 2}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(post, lonely, 8)
        time.sleep(1.0)
        t0 = time.perf_counter()
        plain = post(None, 60)
        assert plain.status_code == 200 and time.perf_counter() - t0 < 20, "a plain request is served while a roster waits"
        assert not waiting.done(), "one member of a roster of two must wait for the other"
        with pytest.raises(requests.exceptions.ReadTimeout):
            waiting.result()  # the client gives up: the server aborts the held member
    deadline = time.time() + 30
    while time.time() < deadline and _debug_counts(prefix).get("roster_gate.held", 0):
        post(None, 60, max_tokens=1)
        time.sleep(0.5)
    assert _debug_counts(prefix).get("roster_gate.held", 0) == 0, _debug_counts(prefix)
    # the name is free: a complete roster under it runs now
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(post, lonely, 60), pool.submit(post, lonely, 60)
        ra, rb = a.result(), b.result()
    assert ra.status_code == rb.status_code == 200, (ra.text[:200], rb.text[:200])
    assert ra.json()["choices"][0]["text"] == rb.json()["choices"][0]["text"]
    post(None, 60, max_tokens=1)  # vLLM applies a finished request's removal at its next step
    time.sleep(0.5)
    counts = _debug_counts(prefix)
    assert counts.get("roe_roster.members", 0) == 0 and counts.get("roe_roster.rosters", 0) == 0, counts


def test_bad_roster_parameters_are_refused(engines):
    srv = engines.shared_server("moe")
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[srv.engine]
    cases = [({"tts_roe_roster": "a"}, {}, "needs tts_roe_roster_size"),
             ({"tts_roe_roster": "a", "tts_roe_roster_size": 1}, {}, "tts_roe_roster_size must be"),
             ({"tts_roe_roster_size": 3}, {"n": 2, "temperature": 1.0}, "n must be 3"),
             ({"tts_roe_roster": "a", "tts_roe_roster_size": 2}, {"temperature": 1.0, "top_p": 0.5}, "top_p"),
             ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0.0]}, {"n": 2, "temperature": 1.0}, "one tau per member"),
             ({"tts_roe_roster": "a", "tts_roe_roster_size": 2, "tts_roe_roster_clean": False}, {}, "applies to the samples of one request")]
    for extra, sampling, fragment in cases:
        body = {"model": srv.model, "prompt": "hi", "max_tokens": 2, field: extra, **sampling}
        r = requests.post(srv.base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and fragment in r.text, (extra, r.status_code, r.text[:300])
