"""What a serving team runs on day one, through the stock openai client against real servers: a reasoning parser
splits steered thinking from the answer (streaming as non-streaming), a JSON schema after a steered thinking block
holds, and a configuration that cannot work is refused with a 400 instead of failing mid-generation."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from tts_plugins.client import extra_body
from tts_plugins.text import encode

from reference import hf_greedy

pytestmark = pytest.mark.engine

QUESTION = "What is 2 + 3?"
SCHEMA = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": {"type": "string", "enum": ["yes", "no"]}}}
STEERED = [
    {"tts_think_max": 4, "tts_think_conclusion": " Time is up.\n"},
    {"tts_no_think": True},
    {"tts_think_max": 6, "tts_think_warn": " Hurry.", "tts_think_warn_at": 0.5},
]


def _body(engine_name, keys):
    body = extra_body(engine_name, **keys) if keys else {}
    # the tiny tokenizer marks <think> and </think> special (Qwen3's does not); SGLang's parser reads the text
    return {**body, "skip_special_tokens": False} if engine_name == "sglang" else body


def _chat(srv, engine_name, keys, stream=False, **kwargs):
    r = srv.client().chat.completions.create(model=srv.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=20,
                                             temperature=0, stream=stream, extra_body=_body(engine_name, keys), **kwargs)
    if not stream:
        m = r.choices[0].message
        return getattr(m, "reasoning_content", None) or getattr(m, "reasoning", None) or "", m.content or ""
    reasoning = content = ""
    for chunk in r:
        if chunk.choices:
            d = chunk.choices[0].delta
            reasoning += getattr(d, "reasoning_content", None) or getattr(d, "reasoning", None) or ""
            content += d.content or ""
    return reasoning, content


@pytest.fixture(scope="module")
def parsed(engines):
    # the trained reasoner's server with reasoning and tool parsers, shared with tts bench's tests (one engine start)
    return engines.deployed()


@pytest.mark.parametrize("keys", STEERED, ids=["cap", "no-think", "warn"])
def test_reasoning_parser_splits_steered_thinking_and_streaming_agrees(engines, engine_name, parsed, keys):
    from transformers import AutoTokenizer

    model = engines.tiny_model("reasoning")
    tok = AutoTokenizer.from_pretrained(str(model))
    reasoning, content = _chat(parsed, engine_name, keys)
    assert (reasoning, content) == _chat(parsed, engine_name, keys, stream=True)
    assert content and "</think>" not in content and "<think>" not in reasoning + content
    if "tts_no_think" in keys:
        assert reasoning.startswith("Okay, I think I have finished thinking.")
        return
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False)
    if "tts_think_warn" in keys:  # half of the cap of 6, then the phrase (cut at the cap), then the conclusion
        want = tok.decode(hf_greedy(model, ids, 3) + encode(tok, keys["tts_think_warn"])[:3] + encode(tok, "\n"), skip_special_tokens=False)
    else:
        want = tok.decode(hf_greedy(model, ids, 4), skip_special_tokens=False) + keys["tts_think_conclusion"]
    assert reasoning == want
    if keys.get("tts_think_conclusion", "").strip():
        assert keys["tts_think_conclusion"].strip() not in content


@pytest.mark.parametrize("keys", [{"tts_think_max": 4}, {"tts_no_think": True}], ids=["cap", "no-think"])
def test_a_json_schema_holds_after_steered_thinking(engine_name, parsed, keys):
    """With the reasoning parser the grammar applies after the thinking block: the thinking is steered (capped at 4,
    or skipped) and the content is valid for the schema, sampled or greedy."""
    for temperature in (0, 1.0):
        r = parsed.client().chat.completions.create(model=parsed.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=30,
                                                    temperature=temperature, seed=3, response_format=SCHEMA,
                                                    extra_body=_body(engine_name, keys))
        m = r.choices[0].message
        assert json.loads(m.content) in ("yes", "no") and r.choices[0].finish_reason == "stop"
        reasoning = getattr(m, "reasoning_content", None) or getattr(m, "reasoning", None) or ""
        assert reasoning.endswith("\n") and len(reasoning) < 200


TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]


@pytest.mark.parametrize("keys", STEERED[:2], ids=["cap", "no-think"])
def test_tools_with_auto_choice_keep_the_forced_text_in_the_thinking(engine_name, parsed, keys):
    """A request that offers tools (tool_choice auto, under the server's tool parser) with steered thinking: no
    error, the forced text is in the reasoning, and neither the content nor any tool call holds it."""
    r = parsed.client().chat.completions.create(model=parsed.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
                                                temperature=0, tools=TOOLS, tool_choice="auto", extra_body=_body(engine_name, keys))
    m = r.choices[0].message
    reasoning = getattr(m, "reasoning_content", None) or getattr(m, "reasoning", None) or ""
    forced = keys.get("tts_think_conclusion", "Okay, I think I have finished thinking.").strip()
    assert forced in reasoning
    calls = " ".join(c.function.name + c.function.arguments for c in (m.tool_calls or []))
    assert forced not in (m.content or "") + calls and "</think>" not in (m.content or "") + calls


def test_a_group_stop_at_eos_with_tools_is_refused(engine_name, parsed):
    """The group stop at EOS would end samples inside the answer, possibly inside a tool call: a 400 naming the key
    (with tool_choice "none" the tools cannot be called, and the request runs)."""
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[engine_name]
    body = {"model": parsed.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "tools": TOOLS,
            "tool_choice": "auto", field: {"tts_group": "tools", "tts_group_finish": "eos"}}
    r = requests.post(parsed.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "tts_group_finish" in r.text, r.text
    ok = requests.post(parsed.base + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("extra", [{"response_format": SCHEMA}, {"tools": TOOLS, "tool_choice": "auto"}])
def test_the_core_refuses_the_example_plugin_under_a_grammar_or_with_tools_from_its_declaration(engine_name, parsed, extra):
    """The example plugin (examples/ngram_ban) declares that tts_ngram_ban forbids tokens inside the answer
    (``Key.forces = "answer"``) and has no refusal code of its own: the core refuses it with a structured output and
    with tools, a 400 naming the key, and the same request without the key runs."""
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[engine_name]
    body = {"model": parsed.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, **extra}
    r = requests.post(parsed.base + "/v1/chat/completions", json={**body, field: {"tts_ngram_ban": 2}}, timeout=60)
    assert r.status_code == 400 and "tts_ngram_ban=2" in r.text, r.text
    ok = requests.post(parsed.base + "/v1/chat/completions", json=body, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("keys, needle", [
    ({"tts_think_max": 4}, "--reasoning-parser"),
    ({"tts_no_think": True}, "--reasoning-parser"),
    ({"tts_group": "g", "tts_group_finish": "eos"}, "tts_group_finish="),
])
def test_without_a_reasoning_parser_a_json_schema_with_forced_thinking_is_refused(engines, engine_name, keys, needle):
    """Without the parser the grammar applies from the first token and would reject the forced text (vLLM ended such
    requests with a 500): a 400 naming the keys instead, and the server serves on."""
    srv = engines.shared_server("dense")
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[engine_name]
    body = {"model": srv.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "response_format": SCHEMA, field: keys}
    r = requests.post(srv.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.text and sorted(keys)[0] in r.text
    ok = requests.post(srv.base + "/v1/chat/completions", json={**body, field: {}}, timeout=60)
    assert ok.status_code == 200 and json.loads(ok.json()["choices"][0]["message"]["content"]) in ("yes", "no")


# --- data parallel: a group's members run on one rank ---------------------------------------

DP_ARGS = {"vllm": ("--data-parallel-size", "2", "--max-model-len", "2048"), "sglang": ("--dp-size", "2", "--max-total-tokens", "65536")}
DP_ENV = {"vllm": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, "sglang": {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}}  # a core per rank


@pytest.fixture(scope="module")
def two_ranks(engines, engine_name):
    return engines.server("wobbly", args=DP_ARGS[engine_name], env=DP_ENV[engine_name])


def _served_per_rank(srv, engine_name):
    """How many sequences each data-parallel rank has started: vLLM's finished requests per engine (its Prometheus
    metrics), SGLang's new sequences per DP rank (its scheduler's prefill log lines)."""
    counts: dict[str, float] = {}
    if engine_name == "vllm":
        for line in requests.get(srv.base + "/metrics", timeout=30).text.splitlines():
            if line.startswith("vllm:request_success_total{"):
                engine = line.split('engine="', 1)[1].split('"', 1)[0]
                counts[engine] = counts.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    else:
        for rank, seqs in re.findall(r" DP(\d+)\] Prefill batch, #new-seq: (\d+)", srv.log()):
            counts[rank] = counts.get(rank, 0.0) + float(seqs)
    return counts


def _per_rank(srv, engine_name, run):
    before = _served_per_rank(srv, engine_name)
    out = run()
    time.sleep(0.5)  # the counts of the last step are published after the response
    after = _served_per_rank(srv, engine_name)
    return out, sorted(after[r] - before.get(r, 0.0) for r in after)


def _token_ids(choice):
    ids = getattr(choice, "token_ids", None)  # vLLM's return_token_ids
    return list(ids if ids is not None else choice.model_extra["response_token_ids"])  # SGLang's


def _sampled(srv, engine_name, keys, n=6):
    # unseeded: SGLang gives every sample of a seeded request the same seed, so they would not differ
    body = {**(extra_body(engine_name, **keys) if keys else {}), "return_token_ids": True}
    r = srv.client().chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "What is 120 + 5 * 3?"}],
                                             n=n, max_tokens=64, temperature=1.0, extra_body=body)
    return [_token_ids(c) for c in r.choices]


def test_data_parallel_keeps_the_samples_of_a_group_on_one_rank(engine_name, two_ranks):
    """n samples of one request with First Finish Search on two data-parallel ranks: the engine spreads plain
    samples over both ranks, where each half would stop only at its own first finisher (measured on vLLM before the
    placement: 29 of 60 samples ran past the first to end). A group's samples all run on one rank, and every sample
    ends within a step of the first. Lengths differ by a little more than that step: the n children of one request
    reach the rank's engine core one by one, and on a loaded CPU they may join the batch over two or three steps
    (seen once in CI: [22, 21, 20, 19, 20, 20])."""
    spent = full = 0
    for i in range(4):
        keys = {"tts_group": f"ffs-{i}", "tts_group_finish": "eos"}
        grouped, ranks = _per_rank(two_ranks, engine_name, lambda: _sampled(two_ranks, engine_name, keys))
        lens = [len(ids) for ids in grouped]
        assert max(ranks) >= 6, f"the six samples ran on both ranks: {ranks}"
        assert len(lens) == 6 and max(lens) <= min(lens) + 4, f"sample lengths {lens}"
        free, ranks = _per_rank(two_ranks, engine_name, lambda: _sampled(two_ranks, engine_name, {}))
        assert max(ranks) < 6, f"fixture: the engine spreads plain samples over both ranks, {ranks}"
        spent += sum(lens)
        full += sum(len(ids) for ids in free)
    assert spent < full
    print(f"\n[{engine_name}] DP=2 first-finish@6 decode tokens {spent} vs all-6 {full}: ratio {spent / full:.2f}")


def test_data_parallel_sends_the_separate_requests_of_a_named_group_to_one_rank(engine_name, two_ranks):
    """Separate requests of one tts_group all run on one rank (whenever they arrive), where plain requests are
    spread over both by load: what the group's members need to see each other's finish."""
    client = two_ranks.client()

    def four(keys):
        for _ in range(4):
            client.chat.completions.create(model=two_ranks.model, messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
                                           temperature=0, extra_body=_body(engine_name, keys))

    assert _per_rank(two_ranks, engine_name, lambda: four({}))[1] == [2.0, 2.0], "fixture: plain requests are spread"
    assert _per_rank(two_ranks, engine_name, lambda: four({"tts_group": "named"}))[1] == [0.0, 4.0]
    assert _per_rank(two_ranks, engine_name, lambda: four({"tts_group": "another", "tts_think_max": 2}))[1] == [0.0, 4.0]


# --- DeepConf online over HTTP: the stock client sees the stop and the report; the strategy runs end to end ---------


def _report(engine_name, choice):
    from tts_plugins.services import parse_report

    extra = choice.model_extra or {}
    reports = parse_report(extra.get("stop_reason" if engine_name == "vllm" else "matched_stop"))
    assert reports and "conf" in reports, f"no report in {extra!r}"
    return reports["conf"]


def test_deepconf_stop_and_report_reach_the_stock_client(engines, engine_name, parsed):
    client = parsed.client()
    msgs = [{"role": "user", "content": QUESTION}]
    # a threshold above every confidence: each sample is stopped at its first judged step (the window's 2nd token)
    r = client.chat.completions.create(model=parsed.model, messages=msgs, max_tokens=30, temperature=1.0, n=3,
                                       extra_body=extra_body(engine_name, tts_conf_window=2, tts_conf_threshold=1000.0))
    assert r.usage.completion_tokens == 6
    for c in r.choices:
        assert c.finish_reason == "stop" and _report(engine_name, c) == {**_report(engine_name, c), "stopped": True, "tokens": 2}
    # measured only: the sample runs as it would, and reports every token it produced
    plain = client.chat.completions.create(model=parsed.model, messages=msgs, max_tokens=30, temperature=0)
    r = client.chat.completions.create(model=parsed.model, messages=msgs, max_tokens=30, temperature=0,
                                       extra_body=extra_body(engine_name, tts_conf_window=8))
    rep = _report(engine_name, r.choices[0])
    assert r.choices[0].message.content == plain.choices[0].message.content and not rep["stopped"]
    assert rep["tokens"] == r.usage.completion_tokens and 0 < rep["lowest"] <= rep["mean"] + 1e-9 or rep["tokens"] < 8
    # streaming: the last chunk carries it
    last = None
    for chunk in client.chat.completions.create(model=parsed.model, messages=msgs, max_tokens=30, temperature=0, stream=True,
                                                extra_body=extra_body(engine_name, tts_conf_window=8)):
        if chunk.choices and chunk.choices[0].finish_reason:
            last = chunk.choices[0]
    assert last is not None and _report(engine_name, last) == rep


@pytest.mark.parametrize("keys, key", [({"tts_conf_window": 0}, "tts_conf_window"), ({"tts_conf_threshold": "low"}, "tts_conf_threshold"),
                                       ({"tts_conf_topk": 100}, "tts_conf_topk")])
def test_deepconf_bad_values_get_a_400_naming_the_key(engines, engine_name, parsed, keys, key):
    r = requests.post(f"{parsed.base}/v1/chat/completions", timeout=60,
                      json={"model": parsed.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
                            **extra_body(engine_name, **keys)})
    assert r.status_code == 400 and key in r.text, r.text[:500]
    assert parsed.alive()


def test_deepconf_strategy_runs_end_to_end(engines, engine_name, parsed, tmp_path):
    """``tts run --strategy deepconf`` on the trained reasoner: the warmup sets the threshold, the online traces
    are stopped by the engine exactly when their windowed confidence falls below it, the vote is the weighted one."""
    import subprocess
    import sys

    from tts_plugins.client.aggregate import confidence_vote
    from tts_plugins.models import arith

    problems = [{"id": f"p{i}", "prompt": p.question, "answer": p.answer} for i, p in enumerate(arith.held_out(3, steps=None))]
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out = tmp_path / "out.jsonl"
    window = 8
    r = subprocess.run([sys.executable, "-m", "tts_plugins.client.cli", "run", str(data), "-o", str(out), "--url", parsed.base,
                        "--strategy", "deepconf", "-n", "12", "--warmup", "4", "--max-n", "4", "--window", str(window), "--no-adaptive",
                        "--temperature", "0.6", "--max-tokens", "200", "--quiet", "--extract", "tts_plugins.models.arith:extract_answer"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 3
    online = 0
    for x in results:
        warm = [s for s in x["samples"] if s["phase"] == "warmup"]
        assert len(warm) == 4 and all(not s["reports"]["conf"]["stopped"] for s in warm)
        for s in x["samples"]:
            rep = s["reports"]["conf"]
            assert rep["tokens"] == s["tokens"]
            if s["phase"] == "online" and rep["tokens"] >= window and abs(rep["lowest"] - x["threshold"]) > 1e-4:
                online += 1
                assert rep["stopped"] == (rep["lowest"] < x["threshold"]), (rep, x["threshold"])
        voters = [(s["answer"], s["reports"]["conf"]["lowest"]) for s in x["samples"]
                  if not s["reports"]["conf"]["stopped"] and s["reports"]["conf"]["lowest"] >= x["threshold"] and s["answer"] is not None]
        assert x["answer"] == confidence_vote([a for a, _ in voters], [c for _, c in voters]).answer
    assert online > 0
