"""DeepConf online in a real engine: the confidence each engine measures is the transformers reference's, the
threshold stops exactly the traces whose reference window falls below it (at that step), and the report reaches
the client (offline here; over HTTP with the stock client in test_deploy_engine)."""

from __future__ import annotations

import json

import pytest

from tts_plugins.logits_processors.conf import token_confidence, trace_statistics
from tts_plugins.services import parse_report

pytestmark = pytest.mark.engine

QUESTIONS = ["What is 2 + 3?", "What is 17 * 4 - 9?", "What is 120 + 5 * 3?", "What is 8 - 5?", "Name a colour.", "Count to four.",
             "What is 6 * 7?", "Say hello."]
W, K = 4, 5


def chat_ids(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)


def reference_confidences(model_dir, prompt: list[int], ids: list[int], k: int) -> list[float]:
    """Each generated token's confidence, from the transformers model's float32 logits (float64 formula)."""
    import torch

    from reference import _model

    with torch.no_grad():
        logits = _model(str(model_dir))(torch.tensor([prompt + ids])).logits[0]
    return token_confidence(logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)], k).tolist()


def conf(out) -> dict:
    reports = parse_report(out.stop_reason)
    assert reports and "conf" in reports, f"no report in {out.stop_reason!r}"
    return reports["conf"]


def first_fall(confs: list[float], threshold: float, window: int, min_tokens: int) -> int | None:
    """The step (0-based) at which the windowed mean first falls below ``threshold``, judged from ``min_tokens`` on."""
    for i in range(min_tokens - 1, len(confs)):
        recent = confs[max(0, i + 1 - window) : i + 1]
        if sum(recent) / len(recent) < threshold:
            return i
    return None


def test_the_threshold_stops_exactly_the_traces_whose_reference_window_falls_below(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok, model_dir = eng.tokenizer, engines.tiny_model("dense")
    eos = tok.eos_token_id
    prompts = [chat_ids(tok, q) for q in QUESTIONS]
    plain = eng.generate(prompts, [{}] * len(prompts), max_tokens=40)
    measured = eng.generate(prompts, [{"tts_conf_window": W, "tts_conf_topk": K}] * len(prompts), max_tokens=40)
    refs = []
    for p, a, b in zip(prompts, plain, measured):
        assert b.token_ids == a.token_ids, "measuring alone changes nothing"
        r, confs = conf(b), reference_confidences(model_dir, p, a.token_ids, K)
        want = trace_statistics(confs, W)
        assert not r["stopped"] and r["tokens"] == len(a.token_ids)
        assert abs(r["lowest"] - want["lowest"]) < 1e-3 and abs(r["mean"] - want["mean"]) < 1e-3, (r, want)
        refs.append(confs)
    # a threshold between two traces' lowest windows, clear of every window mean (no tie within float noise)
    lows = sorted(trace_statistics(c, W)["lowest"] for c in refs)
    means = [sum(c[max(0, i + 1 - W) : i + 1]) / len(c[max(0, i + 1 - W) : i + 1]) for c in refs for i in range(W - 1, len(c))]
    candidates = [(a + b) / 2 for a, b in zip(lows, lows[1:])]
    threshold = max(candidates[len(candidates) // 2 - 1 : len(candidates) // 2 + 2], key=lambda t: min(abs(m - t) for m in means))
    assert min(abs(m - threshold) for m in means) > 1e-3
    stopped = eng.generate(prompts, [{"tts_conf_window": W, "tts_conf_topk": K, "tts_conf_threshold": threshold}] * len(prompts), max_tokens=40)
    n_stopped = 0
    for a, s, confs in zip(plain, stopped, refs):
        at = first_fall(confs, threshold, W, W)
        r = conf(s)
        if at is None:
            assert s.token_ids == a.token_ids and not r["stopped"]
            continue
        n_stopped += 1
        assert s.token_ids == a.token_ids[:at] + [eos], f"stopped at step {at}: the token of that step is EOS"
        assert r["stopped"] and r["tokens"] == at + 1 and s.finish_reason == "stop"
    assert 0 < n_stopped < len(prompts)
    spent, full = sum(len(o.token_ids) for o in stopped), sum(len(o.token_ids) for o in plain)
    assert spent < full
    print(f"\n[{engines.engine}] threshold {threshold:.4f}: {n_stopped}/{len(prompts)} traces stopped, tokens {spent} vs {full}")


def test_conf_composes_with_the_think_cap_groups_and_n_samples(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    prompts = [chat_ids(tok, q) for q in QUESTIONS[:2]]
    capped = eng.generate(prompts, [{"tts_think_max": 3}] * 2, max_tokens=24)
    both = eng.generate(prompts, [{"tts_think_max": 3, "tts_conf_window": W}] * 2, max_tokens=24)
    for a, b in zip(capped, both):
        assert b.token_ids == a.token_ids and conf(b)["tokens"] == len(b.token_ids)
    # n sampled traces in one request, in a group with First Finish Search: every sample reports, the group stop still acts
    outs = eng.generate(prompts[:1], [{"tts_group": "g", "tts_group_finish": "eos", "tts_conf_window": W}], max_tokens=32,
                        temperature=1.0, n=4)
    assert len(outs) == 4 and all(conf(o)["tokens"] == len(o.token_ids) for o in outs)
    ended = [len(o.token_ids) for o in outs if o.token_ids[-1] == tok.eos_token_id]
    if ended:  # the first to end stopped the others within two steps
        assert all(len(o.token_ids) <= min(ended) + 2 for o in outs)
    # a threshold above every confidence stops each sample at its first judged step
    cut = eng.generate(prompts[:1], [{"tts_conf_window": 2, "tts_conf_threshold": 1000.0}], max_tokens=32, temperature=1.0, n=4)
    assert [o.token_ids for o in cut] == [[o.token_ids[0], tok.eos_token_id] for o in cut]
    assert all(conf(o) == {**conf(o), "stopped": True, "tokens": 2} for o in cut)


def test_report_keeps_the_engines_own_stop_reason(engines, overlap):
    """A stop token the client asked for still shows: the report carries it as "engine"."""
    eng = engines.offline("dense", overlap)
    tok = eng.tokenizer
    prompt = chat_ids(tok, QUESTIONS[0])
    plain = eng.generate([prompt], [{}], max_tokens=16)[0]
    stop_id = plain.token_ids[3]
    out = eng.generate([prompt], [{"tts_conf_window": W}], max_tokens=16, extra={"stop_token_ids": [stop_id]})[0]
    assert out.token_ids[-1] == stop_id and out.finish_reason == "stop"
    assert json.loads(out.stop_reason)["engine"] == stop_id and conf(out)["tokens"] == len(out.token_ids)
