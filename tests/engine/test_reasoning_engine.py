"""The trained tiny reasoning model in the real engines: it answers held-out arithmetic, and steering changes what
it does (the cap cuts its thinking short and costs accuracy, the minimum splices "Wait" and it re-checks), exactly
as a transformers loop on the same weights says. The accuracy benchmark runs end to end on vLLM.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reference import hf_greedy
from tts_plugins.models import arith
from tts_plugins.models.trained import prompt_text

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
N = 40  # held-out problems


@pytest.fixture(scope="module")
def setup(engines):
    eng = engines.offline("reasoning")
    tok = eng.tokenizer
    probs = arith.held_out(N)
    prompts = [tok.encode(prompt_text(p.question), add_special_tokens=False) for p in probs]
    return eng, tok, probs, prompts, engines.tiny_model("reasoning")


def _score(tok, outs, probs) -> float:
    return sum(arith.extract_answer(tok.decode(o.token_ids)) == str(p.answer) for o, p in zip(outs, probs)) / len(probs)


def _thinking_tokens(tok, o) -> int:
    end = tok.convert_tokens_to_ids("</think>")
    return o.token_ids.index(end) if end in o.token_ids else len(o.token_ids)


def test_greedy_answers_most_held_out_problems_as_transformers_does(setup):
    eng, tok, probs, prompts, model = setup
    outs = eng.generate(prompts, [{}] * N, max_tokens=160)
    acc = _score(tok, outs, probs)
    card = json.loads((model / "tts_reasoning.json").read_text())
    assert acc >= 0.6, f"greedy accuracy {acc:.2f} on {N} held-out problems (training card: {card})"
    for i in range(3):  # token for token what the weights say
        want = hf_greedy(model, prompts[i], 160, eos=tok.eos_token_id)
        assert outs[i].token_ids == want, f"problem {i}: engine {tok.decode(outs[i].token_ids)!r} != reference {tok.decode(want)!r}"
    for o in outs:
        assert "</think>" in tok.decode(o.token_ids) and o.finish_reason == "stop"


def test_sampling_at_temperature_one_is_right_often_but_not_always(setup):
    eng, tok, probs, prompts, _ = setup
    outs = eng.generate(prompts, [{"_seed": 100 + i} for i in range(N)], max_tokens=160, temperature=1.0, n=4)
    acc = sum(arith.extract_answer(tok.decode(o.token_ids)) == str(probs[i // 4].answer) for i, o in enumerate(outs)) / len(outs)
    assert 0.25 <= acc <= 0.85, f"single-sample accuracy at T=1 is {acc:.2f} over {len(outs)} samples"


def test_cap_cuts_thinking_short_still_answers_and_costs_accuracy(setup):
    eng, tok, probs, prompts, _ = setup
    plain = eng.generate(prompts, [{}] * N, max_tokens=160)
    capped = eng.generate(prompts, [{"tts_think_max": 16}] * N, max_tokens=160)
    for o in capped:
        assert _thinking_tokens(tok, o) <= 16 + 1  # the cap, then the conclusion "\n"
        assert arith.extract_answer(tok.decode(o.token_ids)) is not None, tok.decode(o.token_ids)
    assert sum(map(len, (o.token_ids for o in capped))) < 0.5 * sum(map(len, (o.token_ids for o in plain)))
    assert _score(tok, capped, probs) < _score(tok, plain, probs) - 0.2


def test_minimum_splices_wait_and_the_model_rechecks(setup):
    eng, tok, probs, prompts, _ = setup
    outs = eng.generate(prompts[:8], [{"tts_think_min": 110}] * 8, max_tokens=220)
    for o, p in zip(outs, probs):
        text = tok.decode(o.token_ids)
        assert _thinking_tokens(tok, o) >= 110, text
        assert "Wait," in text, text  # the model goes on as it learned: "Wait, a + b = c"
        assert arith.extract_answer(text) is not None, text


@pytest.mark.vllm_only
def test_accuracy_benchmark_runs_end_to_end(engines, tmp_path):
    engines.close()  # one engine at a time: the benchmark starts its own servers
    out, png = tmp_path / "acc.json", tmp_path / "acc.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--problems", "6", "--json", str(out), "--png", str(png)],
                       capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:] + "\n--- stdout ---\n" + r.stdout[-2000:]
    report = json.loads(out.read_text())
    rows = {x["method"]: x for x in report["results"]}
    assert len(rows) == 25 and png.stat().st_size > 10_000
    for x in rows.values():
        assert 0 <= x["ci95"][0] <= x["accuracy"] <= x["ci95"][1] <= 1 and x["tokens_per_problem"] > 0, x
    assert rows["cap 16"]["tokens_per_problem"] < rows["greedy"]["tokens_per_problem"] < rows["min 128 (Wait)"]["tokens_per_problem"]
    assert rows["short-1@4"]["tokens_per_problem"] < rows["majority@4"]["tokens_per_problem"]
    assert rows["MoE greedy roster of 4"]["members_identical"] and rows["MoE greedy roster of 4"]["samples_per_problem"] == 4
