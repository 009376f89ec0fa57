"""#5 end to end on a real server: the temperature ladder and CarBoN's calibration against hand computation on
the model's logits, and the ``tts`` command for every strategy (resume, errors, early exit included).

One server per engine for the module. vLLM runs with ``--logprobs-mode processed_logprobs`` so that, as in
SGLang by default, returned log-probs are those the sampler drew from (after our processors and the temperature).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from reference import _model

pytestmark = pytest.mark.engine

FIELD = {"vllm": "vllm_xargs", "sglang": "custom_params"}
PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to four.", "Say hello."]


@pytest.fixture(scope="module")
def served(engines):
    srv = engines.shared_server("dense")  # on vLLM with --logprobs-mode processed_logprobs
    return srv, engines.tiny_model("dense")


def hf_logits(model_dir: Path, ids: list[int]):
    import torch

    with torch.no_grad():
        return _model(str(model_dir))(torch.tensor([ids])).logits[0, -1].double()


def first_top(srv, ids: list[int], *, n: int = 1, temperature: float = 1.0, params: dict | None = None, k: int = 5,
              seed: int = 1) -> list[dict[int, float]]:
    """Each sample's top-k log-probs at the first generated position (token id -> log-prob), prompted with token ids
    (vLLM: /v1/completions with ``return_tokens_as_token_ids``; SGLang: /generate, whose log-probs carry ids)."""
    if srv.engine == "vllm":
        body = {"model": srv.model, "prompt": ids, "max_tokens": 1, "n": n, "temperature": temperature, "logprobs": k, "seed": seed,
                "return_tokens_as_token_ids": True, **({"vllm_xargs": params} if params else {})}
        r = requests.post(srv.base + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [{int(t.split(":", 1)[1]): float(v) for t, v in c["logprobs"]["top_logprobs"][0].items()}
                for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    sp = {"max_new_tokens": 1, "n": n, "temperature": temperature, **({"custom_params": params} if params else {})}
    r = requests.post(srv.base + "/generate", json={"input_ids": ids, "sampling_params": sp, "return_logprob": True, "top_logprobs_num": k},
                      timeout=120)
    assert r.status_code == 200, r.text
    outs = r.json() if isinstance(r.json(), list) else [r.json()]
    return [{int(e[1]): float(e[0]) for e in o["meta_info"]["output_top_logprobs"][0]} for o in outs]


def assert_matches(got: dict[int, float], want, what: str, k: int = 5, tol: float = 2e-3) -> None:
    """The engine's top-k ids are the reference's, and every log-prob it returned (top-k, plus the sampled token
    when vLLM adds it) equals the reference's."""
    import torch

    order = torch.argsort(want, descending=True)[:k].tolist()
    assert set(order) <= set(got), f"{what}: top ids {sorted(got)} vs {sorted(order)}"
    worst = max(abs(got[i] - float(want[i])) for i in got)
    assert worst < tol, f"{what}: log-probs differ from the hand computation by {worst:.2e}"


def prompt_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text)["input_ids"]


# --- in the engine ------------------------------------------------------------


def test_ladder_gives_sample_i_rung_i(served):
    """One request, n = 5, ladder [0.5, 2, 0.8]: choice i's first-step distribution is softmax(z / ladder[i % 3])."""
    import torch

    srv, model_dir = served
    ids = prompt_ids(model_dir, "The ladder sends")
    z = hf_logits(model_dir, ids)
    ladder = [0.5, 2.0, 0.8]
    tops = first_top(srv, ids, n=5, temperature=1.0, params={"tts_temperature_ladder": ladder})
    for i, top in enumerate(tops):
        assert_matches(top, torch.log_softmax(z / ladder[i % 3], -1), f"choice {i} at temperature {ladder[i % 3]}")
    # the neighbouring rungs really differ, so the check can fail
    assert abs(tops[0][max(tops[0], key=tops[0].get)] - tops[1][max(tops[1], key=tops[1].get)]) > 0.05


def test_ladder_rung_zero_is_greedy_and_the_rest_sample(served):
    srv, model_dir = served
    ids = prompt_ids(model_dir, "Greedy or not")
    body = {"model": srv.model, "prompt": ids, "max_tokens": 12, "n": 4, "temperature": 1.0, "seed": 3,
            FIELD[srv.engine]: {"tts_temperature_ladder": [0.0, 2.0]}}
    r = requests.post(srv.base + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    greedy = requests.post(srv.base + "/v1/completions", json={"model": srv.model, "prompt": ids, "max_tokens": 12, "temperature": 0.0},
                           timeout=120).json()
    assert texts[0] == texts[2] == greedy["choices"][0]["text"], "rungs of 0 decode greedily"
    assert texts[1] != texts[0] and texts[3] != texts[0], "rungs of 2 sample (12 tokens of a flat random model)"


def test_ladder_refuses_greedy_requests_and_bad_rungs(served):
    srv, _ = served
    for temperature, ladder, fragment in [(0.0, [0.5], "temperature > 0"), (1.0, [0.5, -1], "tts_temperature_ladder must hold"),
                                          (1.0, [2.5], "in [0, 2]"), (1.0, [], "tts_temperature_ladder must be a list")]:
        body = {"model": srv.model, "prompt": "x", "max_tokens": 2, "temperature": temperature, FIELD[srv.engine]: {"tts_temperature_ladder": ladder}}
        r = requests.post(srv.base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and fragment in r.text, (temperature, ladder, r.status_code, r.text[:300])


@pytest.mark.parametrize("request_temperature", [1.0, 0.6])
def test_carbon_in_engine_matches_the_hand_computation(served, request_temperature):
    """``(z + b) / T`` on the model's own logits, then the request temperature: the engine's first-step log-probs equal it."""
    import torch

    srv, model_dir = served
    ids = prompt_ids(model_dir, "Calibrate this")
    z = hf_logits(model_dir, ids)
    bias_ids = [int(i) for i in torch.argsort(z, descending=True)[[0, 3, 7]]]
    bias_values = [-1.5, 2.0, 3.25]
    T = 1.7
    params = {"tts_carbon_temperature": T, "tts_carbon_bias_ids": bias_ids, "tts_carbon_bias_values": bias_values}
    b = torch.zeros_like(z)
    b[bias_ids] = torch.tensor(bias_values, dtype=z.dtype)
    want = torch.log_softmax((z + b) / T / request_temperature, -1)
    calibrated = first_top(srv, ids, temperature=request_temperature, params=params)[0]
    plain = first_top(srv, ids, temperature=request_temperature)[0]
    assert_matches(calibrated, want, f"CarBoN T={T} at request temperature {request_temperature}")
    assert_matches(plain, torch.log_softmax(z / request_temperature, -1), "the same request without CarBoN")


# --- the tts command ----------------------------------------------------------


def tts(srv, tmp_path: Path, *args: str, problems: list[dict] | None = None,
        out: str = "out.jsonl") -> tuple[subprocess.CompletedProcess, list[dict], dict]:
    src = tmp_path / "problems.jsonl"
    if problems is not None or not src.exists():
        src.write_text("".join(json.dumps(p) + "\n" for p in (problems or [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])))
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "tts_plugins.client.cli", "run", str(src), "-o", str(tmp_path / out), "--url", srv.base, "--quiet",
           "--summary", str(summary), "--max-tokens", "4", "--extract", "full", "--seed", "7", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = []
    for x in (tmp_path / out).read_text().splitlines() if (tmp_path / out).exists() else []:
        try:
            lines.append(json.loads(x))
        except json.JSONDecodeError:  # a line an interrupted run left half-written
            pass
    return r, lines, json.loads(summary.read_text()) if summary.exists() and r.returncode == 0 else {}


def check_common(r, lines, summary, n_problems: int) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(lines) == n_problems and len({x["id"] for x in lines}) == n_problems
    for x in lines:
        assert x["tokens"] == sum(s["tokens"] for s in x["samples"]) > 0
        assert x["n_samples"] == len(x["samples"])
    assert summary["problems"] == n_problems and summary["tokens"] == sum(x["tokens"] for x in lines)
    assert summary["samples"] == sum(x["n_samples"] for x in lines)


def test_cli_self_consistency_votes_the_majority_of_its_samples(served, tmp_path):
    from tts_plugins.client.aggregate import majority

    srv, _ = served
    problems = [{"id": f"p{i}", "prompt": p, "answer": "nothing"} for i, p in enumerate(PROMPTS)]
    r, lines, summary = tts(srv, tmp_path, "--strategy", "self-consistency", "-n", "6", "--max-n", "4", problems=problems)
    check_common(r, lines, summary, len(PROMPTS))
    for x in lines:
        assert x["n_samples"] == 6 and x["requests"] == 2, "6 samples in requests of at most 4"
        assert x["answer"] == majority([s["answer"] for s in x["samples"]]).answer
        assert x["correct"] is False
    assert summary["graded"] == len(PROMPTS) and summary["accuracy"] == 0.0
    assert "accuracy 0/4" in r.stderr


def test_cli_resumes_without_redoing_finished_problems(served, tmp_path):
    srv, _ = served
    r, lines, _ = tts(srv, tmp_path, "-n", "2")
    assert r.returncode == 0 and len(lines) == len(PROMPTS)
    kept = lines[:1]
    (tmp_path / "out.jsonl").write_text(json.dumps(kept[0]) + "\n" + '{"id": "p1", "answ')  # killed mid-write
    r, lines, summary = tts(srv, tmp_path, "-n", "2")
    assert r.returncode == 0, r.stderr
    done = [x for x in lines if "answer" in x]
    assert sorted(x["id"] for x in done) == sorted(f"p{i}" for i in range(len(PROMPTS)))
    assert summary["skipped_done"] == 1 and summary["problems"] == len(PROMPTS) - 1
    assert done[0] == kept[0], "the finished result is left as it was"


def test_cli_ladder_exits_early_and_cancels_waves_in_flight(served, tmp_path):
    """All-greedy rungs agree at once: the vote is decided after the first wave, and the second wave,
    queued behind it (concurrency 1), is cancelled instead of being waited for."""
    srv, _ = served
    r, lines, summary = tts(srv, tmp_path, "--strategy", "ladder", "--ladder", "0,0,0", "--waves", "4", "--ahead", "2", "--concurrency", "1")
    check_common(r, lines, summary, len(PROMPTS))
    for x in lines:
        assert x["decided"] and x["early_exit"] and x["waves"] == 1
        assert x["waves"] + x["waves_cancelled"] + x["waves_not_sent"] == 4 and x["waves_cancelled"] >= 1
        assert x["n_samples"] == 3 and len({s["answer"] for s in x["samples"]}) == 1
    assert summary["early_exits"] == len(PROMPTS) and summary["waves_cancelled"] >= len(PROMPTS)
    assert requests.get(srv.base + "/health", timeout=10).status_code == 200


def test_cli_ladder_without_agreement_runs_every_wave(served, tmp_path):
    srv, _ = served
    for mode in ("engine", "fan-out"):
        r, lines, summary = tts(srv, tmp_path, "--strategy", "ladder", "--ladder", "0,2", "--waves", "3", "--ladder-mode", mode, out=f"{mode}.jsonl")
        check_common(r, lines, summary, len(PROMPTS))
        for x in lines:
            # a sample at temperature 2 may still agree with greedy now and then: that problem stops early
            waves = x["waves"] if x["early_exit"] else 3
            temps = sorted(s["temperature"] for s in x["samples"])
            assert temps == [0.0] * waves + [2.0] * waves, (mode, temps)
            if not x["decided"]:
                assert x["waves"] == 3 and not x["early_exit"]
        assert summary["early_exits"] < len(PROMPTS), "temperature 2 rarely agrees with greedy"


def test_cli_carbon_explores_fits_and_exploits(served, tmp_path):
    from tts_plugins.client.aggregate import best_of_n, majority, same_answer

    srv, _ = served
    r, lines, summary = tts(srv, tmp_path, "--strategy", "carbon", "-n", "6", "--n1", "4", "--keep", "2")
    check_common(r, lines, summary, len(PROMPTS))
    for x in lines:
        phases = [s["phase"] for s in x["samples"]]
        assert phases == ["explore"] * 4 + ["exploit"] * 2
        cal = x["calibration"]
        assert cal["kept"] == 2 and cal["positions"] > 0 and 0.05 <= cal["temperature"] <= 20 and cal["nll_after"] <= cal["nll_before"] + 1e-9
        top = majority([s["answer"] for s in x["samples"]]).answer
        assert [s["reward"] for s in x["samples"]] == [1.0 if s["answer"] is not None and same_answer(s["answer"], top) else 0.0
                                                       for s in x["samples"]]
        assert x["answer"] == best_of_n([s["answer"] for s in x["samples"]], [s["reward"] for s in x["samples"]]).answer


def test_cli_best_of_n_picks_the_most_confident_sample(served, tmp_path):
    srv, _ = served
    r, lines, summary = tts(srv, tmp_path, "--strategy", "best-of-n", "-n", "5")
    check_common(r, lines, summary, len(PROMPTS))
    for x in lines:
        rewards = [s["reward"] for s in x["samples"]]
        assert rewards == pytest.approx([math.exp(s["mean_logprob"]) for s in x["samples"]])
        best = max(rewards)
        assert x["answer"] in {s["answer"] for s in x["samples"] if s["reward"] == best}


def test_cli_reports_a_refused_parameter_and_keeps_the_server(served, tmp_path):
    srv, _ = served
    r, lines, _ = tts(srv, tmp_path, "--params", '{"tts_think_max": -3}')
    assert r.returncode == 2 and "HTTP 400" in r.stderr and "tts_think_max" in r.stderr, r.stderr[-2000:]
    assert lines == []
    r, lines, summary = tts(srv, tmp_path, "--params", '{"tts_think_max": 2}', "-n", "2", out="ok.jsonl")
    check_common(r, lines, summary, len(PROMPTS))
