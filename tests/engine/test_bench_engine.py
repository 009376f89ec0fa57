"""``tts bench`` end to end against a real server of each engine, on the trained tiny reasoner and a 5-problem file:
the engine is detected, every method runs with its requests reaching the engine (the group stop and the thinking
cap change what comes back), the outputs are written, and a second run resumes without sending a request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tts_plugins.models import arith

pytestmark = pytest.mark.engine

PRM = "tts_plugins.models.arith:step_reward"
METHODS = ["greedy", "majority:n=3", "short-m:m=1,k=3,vs=majority@3", "think-max:8", f"carbon:n=4,reward={PRM},label=carbon@4,vs=majority@3",
           "trim:2", "majority:n=3,label=majority@3 renamed"]


def _bench(srv, data, out, *extra):
    cmd = [sys.executable, "-m", "tts_plugins.client.cli", "bench", "--base-url", srv.base, "--data", str(data), "--out", str(out),
           "--max-tokens", "200", "--quiet", "--extract", "tts_plugins.models.arith:extract_answer", *extra]
    for m in METHODS:
        cmd += ["--method", m]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_bench_runs_every_method_and_resumes(engines, tmp_path):
    srv = engines.deployed()  # as deployed (reasoning and tool parsers); shared with test_deploy_engine
    data = tmp_path / "data.jsonl"
    problems = [p.to_json(f"p{i}") for i, p in enumerate(arith.held_out(5, steps=None))]
    data.write_text("".join(json.dumps({k: p[k] for k in ("id", "question", "answer", "difficulty")}) + "\n" for p in problems))
    out = tmp_path / "out"
    r = _bench(srv, data, out, "--equal-budget", "samples", "--save-samples")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"on {engines.engine} (" in r.stderr  # the engine was detected
    summary = json.loads((out / "summary.json").read_text())
    rows = {x["method"]: x for x in summary["methods"]}
    assert summary["engine"] == engines.engine and summary["failed"] == 0
    # each method's control at its own settings was added (or found: think-max and trim at greedy, carbon at majority@4)
    assert list(rows) == ["greedy", "majority@3", "short-1@3", "think-max 8", "carbon@4", "trim converge=2", "majority@3 renamed",
                          "majority@3 (top_p=0.95)", "majority@4"]
    assert rows["short-1@3"]["control"] == "majority@3 (top_p=0.95)" and rows["think-max 8"]["control"] == "greedy"
    assert rows["short-1@3"]["vs_control"]["against"] == "majority@3 (top_p=0.95)" and "holm_p" in rows["short-1@3"]["vs_control"]
    assert all(x["problems"] == 5 for x in rows.values())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 5 * len(rows)
    by = {(x["method"], x["id"]): x for x in records}
    for p in problems:  # grading: a record is right exactly when its answer is the reference
        g = by[("greedy", p["id"])]
        assert g["correct"] == (g["answer"] == p["answer"]) and g["samples"] == 1 and len(g["texts"]) == 1
        assert g["thinking_tokens"] <= g["tokens"]
        # the group stop reached the engine: the first member to close its thinking answers, the stopped ones end unthought
        texts = by[("short-1@3", p["id"])]["texts"]
        assert 1 <= sum("</think>" in t for t in texts) and by[("short-1@3", p["id"])]["answer"] is not None
        # the cap reached the engine: at most 8 thinking tokens, then the forced end and the answer
        cap = by[("think-max 8", p["id"])]
        assert cap["texts"][0].split("</think>")[0].count("\n") <= 3 and cap["tokens"] < g["tokens"] + 8
        assert by[("carbon@4", p["id"])]["samples"] == 4
    assert rows["short-1@3"]["tokens_per_problem"] < rows["majority@3"]["tokens_per_problem"]
    if engines.engine == "vllm":  # common random numbers: vLLM seeds choice i of a request with seed + i
        same = sum(by[("majority@3", p["id"])]["texts"] == by[("majority@3 renamed", p["id"])]["texts"] for p in problems)
        # the group's first finisher is its control's sample of the same number, untouched
        kept = sum(any(t in by[("majority@3 (top_p=0.95)", p["id"])]["texts"] for t in by[("short-1@3", p["id"])]["texts"]) for p in problems)
        assert same >= 4 and kept >= 4, (same, kept)  # (a batch's float rounding may, rarely, move one sample)
    assert rows["carbon@4"]["carbon_fitted_T_mean"] > 0 and rows["carbon@4"]["vs_equal_budget"]["against"] == "majority@4"
    v = rows["majority@3"]["vs_baseline"]
    assert v["against"] == "greedy" and v["problems"] == 5 and v["ci95"][0] <= v["difference"] <= v["ci95"][1] and 0 < v["mcnemar_p"] <= 1
    assert rows["short-1@3"]["vs_baseline"]["against"] == "majority@3"
    report = (out / "report.md").read_text()
    assert "| short-1@3 |" in report and "McNemar" in report and "Accuracy % by difficulty" in report
    before = (out / "records.jsonl").read_text()
    r = _bench(srv, data, out, "--equal-budget", "samples", "--save-samples")  # resume: everything is done already
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "records.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text())["methods"] == summary["methods"]


def test_bench_refuses_a_bad_method_before_sending_anything(engines, tmp_path):
    srv = engines.deployed()  # as deployed (reasoning and tool parsers); shared with test_deploy_engine
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "Compute 1 + 2.", "answer": 3}\n')
    r = subprocess.run([sys.executable, "-m", "tts_plugins.client.cli", "bench", "--base-url", srv.base, "--data", str(data), "--out",
                        str(tmp_path / "o"), "--method", "short-m:m=4,k=2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "in spec 'short-m:m=4,k=2': m must be <= k, got m=4, k=2" in r.stderr
    # a tts_* key the engine refuses stops the run with the engine's message naming the key
    r = subprocess.run([sys.executable, "-m", "tts_plugins.client.cli", "bench", "--base-url", srv.base, "--data", str(data), "--out",
                        str(tmp_path / "o"), "--method", "greedy:tts_think_max=-3", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tts_think_max" in r.stderr and "-3" in r.stderr, r.stderr[-2000:]
