"""The trained tiny reasoning model in the real engines: it writes the task's format, and steering changes what it
does (the cap cuts its thinking short and it still answers, the minimum splices "Wait" and it re-checks), exactly as
a transformers loop on the same weights says. The accuracy benchmark runs end to end on vLLM.

The model here is trained only until it has learned the format (``tests/models.py``); how accurate the full recipe
is, and what the cap costs in accuracy, are the accuracy benchmark's checks (``benchmarks/accuracy.py``, "testbed").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tts_plugins.models import arith
from tts_plugins.models.trained import prompt_text

from reference import hf_greedy

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


def _thinking_tokens(tok, o) -> int:
    end = tok.convert_tokens_to_ids("</think>")
    return o.token_ids.index(end) if end in o.token_ids else len(o.token_ids)


def test_greedy_answers_in_the_tasks_format_as_transformers_does(setup):
    eng, tok, probs, prompts, model = setup
    outs = eng.generate(prompts, [{}] * N, max_tokens=320)
    for i in range(3):  # token for token what the weights say
        want = hf_greedy(model, prompts[i], 320, eos=tok.eos_token_id)
        assert outs[i].token_ids == want, f"problem {i}: engine {tok.decode(outs[i].token_ids)!r} != reference {tok.decode(want)!r}"
    # the briefly trained model writes the task's format: it closes its thinking and answers on most problems (it has
    # not learned the arithmetic yet, and now and then loops)
    done = [o for o in outs if "</think>" in tok.decode(o.token_ids) and o.finish_reason == "stop"
            and arith.extract_answer(tok.decode(o.token_ids)) is not None]
    assert len(done) >= 0.7 * N, [tok.decode(o.token_ids)[-200:] for o in outs if o not in done][:3]


def test_cap_cuts_thinking_short_and_still_answers(setup):
    eng, tok, probs, prompts, _ = setup
    plain = eng.generate(prompts, [{}] * N, max_tokens=320)
    capped = eng.generate(prompts, [{"tts_think_max": 16}] * N, max_tokens=320)
    for o in capped:
        assert _thinking_tokens(tok, o) <= 16 + 1  # the cap, then the conclusion "\n"
        assert arith.extract_answer(tok.decode(o.token_ids)) is not None, tok.decode(o.token_ids)
    assert sum(map(len, (o.token_ids for o in capped))) < 0.5 * sum(map(len, (o.token_ids for o in plain)))


def test_minimum_splices_wait_and_the_model_rechecks(setup):
    eng, tok, probs, prompts, _ = setup
    # a minimum beyond each problem's own chain, on problems whose chain ends (the briefly trained model loops on some)
    plain = eng.generate(prompts[:16], [{}] * 16, max_tokens=400)
    ended = [i for i, o in enumerate(plain) if "</think>" in tok.decode(o.token_ids)][:8]
    assert len(ended) >= 6
    mins = [_thinking_tokens(tok, plain[i]) + 24 for i in ended]
    outs = eng.generate([prompts[i] for i in ended], [{"tts_think_min": m} for m in mins], max_tokens=480)
    answered = 0
    for o, m in zip(outs, mins):
        text = tok.decode(o.token_ids)
        assert _thinking_tokens(tok, o) >= m, text
        assert "Wait," in text, text  # the model goes on as it learned: "Wait, a + b = c"
        answered += arith.extract_answer(text) is not None
    # after the minimum it closes and answers on at least half (the briefly trained model may loop until max_tokens)
    assert answered >= len(ended) // 2, answered


@pytest.mark.vllm_only
def test_proving_ground_runs_end_to_end(engines, tmp_path):
    """The benchmark that fills the README's table, on 4 problems with the briefly trained dense model: every method
    runs through ``tts bench``, the premises are measured, and the report pairs each row with them. (The MoE half runs
    the same code with the RoE methods, which the roster and RoE engine tests check; CI time goes to those.)"""
    engines.close()  # one engine at a time: the benchmark starts its own servers
    out = tmp_path / "testbed"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--models", "test", "--problems", "4",
                        "--only", "dense", "--out", str(out)], capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:] + "\n--- stdout ---\n" + r.stdout[-2000:]
    dense = {x["method"]: x for x in json.loads((out / "dense" / "summary.json").read_text())["methods"]}
    assert len(dense) >= 22  # every technique, and the controls and equal-budget votes the bench added
    for x in dense.values():
        assert x["problems"] == 4 and 0 <= x["ci95"][0] <= x["accuracy"] <= x["ci95"][1] <= 1 and x["tokens_per_problem"] > 0, x
        assert x["method"] == "greedy" or x["vs_baseline"]["problems"] == 4
        if x["name"] not in ("greedy", "sample", "majority", "ladder"):  # every technique is paired with its control
            assert x["vs_control"]["against"] == x["control"] and x["vs_control"]["problems"] == 4, x["method"]
    assert dense["short-1@4"]["control"] == "majority@4 (top_p=0.95)" and dense["think-max 16"]["control"] == "truncate at 28"
    assert dense["think-max 16"]["tokens_per_problem"] < dense["greedy"]["tokens_per_problem"] < dense["think-min 128"]["tokens_per_problem"]
    # short-1@4 stops the other samples when the first closes its thinking: they end within a step or two of it, and
    # only the winner writes an answer (majority@4 draws its own samples, so its tokens are not compared here)
    short = [json.loads(line) for line in (out / "dense" / "records.jsonl").read_text().splitlines()]
    short = [x for x in short if x.get("method") == "short-1@4"]
    assert len(short) == 4 and all(max(x["lengths"]) - min(x["lengths"]) <= 24 for x in short), [x["lengths"] for x in short]
    assert dense["ladder x1"]["vs_equal_budget"]["against"] == "majority@13"
    prem = json.loads((out / "dense" / "premises.json").read_text())
    assert prem["samples"] == 4 * 4 and set(prem["by_difficulty"]) <= {"easy", "medium", "hard"}
    report = (out / "report.md").read_text()
    assert "| short-1@4 |" in report and "length-correct corr within a question" in report and "McNemar's exact p" in report
    assert "s1's claim" in report and "NoThinking's claim" in report and "Wait spliced on" in report
    where = json.loads((out / "dense" / "premises-where-they-act.json").read_text())
    assert {"s1_splice", "short_m", "trim", "cap_binds"} <= set(where["premises"]) and where["nothinking"]
