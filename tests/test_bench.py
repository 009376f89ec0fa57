"""``tts bench`` without a server: the paired statistics against hand computations, the method SPEC parser (bad
specs are clear errors), resume, and the report built from records."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.client import bench, stats


def test_mcnemar_matches_a_hand_computation():
    # 10 problems: a right & b wrong on 3, a wrong & b right on 1, 6 concordant.
    a = [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    b = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
    assert stats.discordant(a, b) == (3, 1)
    # n = 4 discordant, k = 1: p = 2 * (C(4,0) + C(4,1)) / 16 = 2 * 5 / 16
    assert stats.mcnemar(a, b) == pytest.approx(10 / 16)
    assert stats.mcnemar(a, a) == 1.0
    # 10 discordant all one way: p = 2 / 2^10
    assert stats.mcnemar([1] * 10, [0] * 10) == pytest.approx(2 / 1024)


def test_paired_bootstrap_difference_and_interval():
    a = [1.0] * 30 + [0.0] * 70
    b = [1.0] * 20 + [0.0] * 80  # b's right problems are a subset of a's: every difference is 0 or +1
    d, lo, hi = stats.paired_bootstrap(a, b, resamples=4000, seed=1)
    assert d == pytest.approx(0.10)
    # the paired differences are Bernoulli(0.1) over 100 problems: sd of the mean = sqrt(0.1 * 0.9 / 100) = 0.03
    assert lo == pytest.approx(0.10 - 1.96 * 0.03, abs=0.015) and hi == pytest.approx(0.10 + 1.96 * 0.03, abs=0.015)
    assert lo >= 0.0  # a never loses a problem: no resample can go below 0
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_bootstrap([1, 0], [1])


def test_paired_interval_is_tighter_than_separate_ones_when_methods_agree():
    a = [1.0] * 55 + [0.0] * 45
    b = [1.0] * 50 + [0.0] * 50
    _, lo, hi = stats.paired_bootstrap(a, b, resamples=3000)
    la, ha = stats.bootstrap_mean(a, 3000)
    assert hi - lo < 0.5 * (ha - la)


def test_pass_at_k_is_the_unbiased_estimate():
    assert stats.pass_at_k(8, 0, 1) == 0.0 and stats.pass_at_k(8, 8, 3) == 1.0
    assert stats.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert stats.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 5, 1)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None)
def test_mcnemar_is_a_probability_and_symmetric(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    p = stats.mcnemar(a, b)
    assert 0.0 < p <= 1.0 and p == stats.mcnemar(b, a)


@pytest.mark.parametrize("spec, label, settings, params", [
    ("greedy", "greedy", {"n": 1, "temperature": 0.0}, {}),
    ("majority:n=8,temperature=0.7", "majority@8", {"n": 8, "temperature": 0.7, "top_p": 1.0}, {}),
    ("short-m:m=1,k=8", "short-1@8", {"m": 1, "k": 8, "temperature": 0.7, "top_p": 0.95}, {}),
    ("think-max:512", "think-max 512", {"n": 1, "temperature": 0.0, "budget": 512}, {}),
    ("carbon:n=8", "carbon@8", {"n": 8, "temperature": 0.7, "top_p": 1.0, "reward": "agreement"}, {}),
    ("moi", "moi", {"n": 1, "temperature": 0.6, "top_p": 0.8, "beta": 1.0}, {}),
    ("majority:4,tts_moi_beta=1", "majority@4 (tts_moi_beta=1)", {"n": 4, "temperature": 0.7, "top_p": 1.0}, {"tts_moi_beta": 1}),
    ('trim:2,tts_trim_markers=["\\n",","]', 'trim converge=2 (tts_trim_markers=["\\n", ","])',
     {"n": 1, "temperature": 0.0, "converge": 2, "min_tokens": 0}, {"tts_trim_markers": ["\n", ","]}),
    ("majority:n=8,label=sc", "sc", {"n": 8, "temperature": 0.7, "top_p": 1.0}, {}),
    ("short-m:k=4,vs=majority@4", "short-1@4", {"m": 1, "k": 4, "temperature": 0.7, "top_p": 0.95}, {}),
])
def test_specs_resolve_to_the_papers_defaults(spec, label, settings, params):
    m = bench.parse_spec(spec)
    assert (m.label, m.settings, m.params) == (label, settings, params)


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty"),
    ("foo", "unknown method 'foo'"),
    ("majority:n=0", "n must be an int >= 1, got 0"),
    ("short-m:m=3,k=2", "m must be <= k, got m=3, k=2"),
    ("think-max:abc", "budget must be an int >= 0, got 'abc'"),
    ("majority:n=4,x=1", "unknown setting 'x' for majority"),
    ("majority:n=2,temperature=0", "more than one sample needs temperature > 0"),
    ("greedy:5", "'5' is not key=value"),
    ("sample:top_p=0", "top_p must be in (0, 1], got 0"),
    ("roster:k=1", "a roster needs k >= 2 members"),
    ("moi:beta=0", "beta must be > 0, got 0"),
    ("ladder:1,tau_intra=1.5", "tau_intra must be in (0, 1], got 1.5"),
    ("ladder:1,temperature=0.5", "unknown setting 'temperature' for ladder"),  # the rungs set the temperatures
    ("short-m:k=8,n=1", "unknown setting 'n' for short-m"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError) as e:
        bench.parse_spec(spec)
    assert message in str(e.value) and (not spec or repr(spec) in str(e.value))


def _record(method, pid, correct, tokens=10, samples=1, difficulty=None):
    return {"method": method, "id": pid, "difficulty": difficulty, "answer": "1", "reference": "1", "correct": correct, "tokens": tokens,
            "thinking_tokens": tokens // 2, "samples": samples, "samples_right": int(correct), "wall_s": 0.1, "lengths": [tokens],
            "finish": ["stop"], "right": [correct]}


def test_resume_skips_finished_records_and_a_half_written_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_record("greedy", "1", True)) + "\n" + json.dumps({"method": "greedy", "id": "2", "error": "HTTP 500"}) + "\n"
                    + '{"method": "greedy", "id": "3", "corr')
    done = bench.read_records(path)
    assert set(done) == {("greedy", "1")}  # the error is retried, the torn line is ignored


def test_summary_pairs_methods_on_the_same_problems_and_reports_by_difficulty():
    problems = [{"id": str(i), "difficulty": "easy" if i < 10 else "hard"} for i in range(20)]
    a = [bench.parse_spec("greedy"), bench.parse_spec("majority:n=4")]
    recs = {}
    for i in range(20):
        recs[("greedy", str(i))] = _record("greedy", str(i), i % 2 == 0, difficulty=problems[i]["difficulty"])
        recs[("majority@4", str(i))] = _record("majority@4", str(i), i % 2 == 0 or i < 4, tokens=40, samples=4,
                                               difficulty=problems[i]["difficulty"])
    s = bench.summarize(a, problems, recs, baseline="greedy", resamples=500)
    rows = {r["method"]: r for r in s["methods"]}
    v = rows["majority@4"]["vs_baseline"]
    assert v["difference"] == pytest.approx(2 / 20) and (v["wins"], v["losses"]) == (2, 0) and v["mcnemar_p"] == pytest.approx(0.5)
    assert v["token_ratio"] == pytest.approx(4.0)
    assert rows["greedy"]["by_difficulty"]["easy"]["accuracy"] == 0.5 and rows["majority@4"]["by_difficulty"]["easy"]["accuracy"] == 0.7
    table = bench.markdown(s)
    assert "| majority@4 | 60.0" in table and "(baseline)" in table and "easy (10)" in table


def test_equal_budget_adds_a_majority_at_each_methods_samples():
    methods = [bench.parse_spec("greedy"), bench.parse_spec("short-m:m=1,k=6"), bench.parse_spec("think-min:64")]
    rows = {"greedy": {"name": "greedy", "samples_per_problem": 1, "tokens_per_problem": 50},
            "short-1@6": {"name": "short-m", "samples_per_problem": 6, "tokens_per_problem": 200},
            "think-min 64": {"name": "think-min", "samples_per_problem": 1, "tokens_per_problem": 150}}
    added, mapping = bench._equal_budget(methods, rows, "samples")
    # at short-m's own sampling settings (T=0.7, top_p=0.95), not majority's defaults
    assert [m.label for m in added] == ["majority@6 (top_p=0.95)"] and mapping == {"short-1@6": "majority@6 (top_p=0.95)"}
    assert added[0].settings == {"n": 6, "temperature": 0.7, "top_p": 0.95}
    rows["majority@6 (top_p=0.95)"] = {"name": "majority", "samples_per_problem": 6, "tokens_per_problem": 300}
    methods += added
    added, mapping = bench._equal_budget(methods, rows, "tokens")  # 50 tokens per sample: 200 buys 4 samples, 150 three
    assert [m.label for m in added] == ["majority@4 (top_p=0.95)", "majority@3"]
    assert mapping == {"short-1@6": "majority@4 (top_p=0.95)", "think-min 64": "majority@3"}  # a greedy method: majority's defaults
    # the cost per sample comes from the method's own control when there is one
    added, mapping = bench._equal_budget(methods, rows, "tokens", {"short-1@6": "majority@6 (top_p=0.95)"})
    assert mapping["short-1@6"] == "majority@4 (top_p=0.95)"  # 300 / 6 = 50 tokens a sample at its own settings


@pytest.mark.parametrize("spec, control", [
    ("short-m:m=1,k=8", "majority:n=8,temperature=0.7,top_p=0.95"),
    ("deepconf:32,variant=high", "majority:n=32,temperature=0.6,top_p=0.95"),
    ("think-max:64", "greedy"),
    ("think-max:64,max_tokens=76", "greedy:max_tokens=76"),
    ("think-min:64,temperature=0.7,top_p=0.9", "sample:temperature=0.7,top_p=0.9"),
    ("moi", "sample:temperature=0.6,top_p=0.8"),
    ("roster:k=4,tau=0.05", "greedy"),
    ("roster:k=4,tau=0.5,temperature=0.7", "sample:temperature=0.7,top_p=1"),
    ("no-think:n=8,temperature=0.7,max_tokens=64", "majority:n=8,temperature=0.7,top_p=1,max_tokens=64"),
    ("majority:n=4,tts_moi_beta=1", "majority:n=4,temperature=0.7,top_p=1"),
    ("greedy", None), ("sample", None), ("majority:n=8,top_p=0.95", None), ("ladder:1", None),
])
def test_every_method_has_a_control_at_its_own_settings(spec, control):
    assert bench.control_spec(bench.parse_spec(spec)) == control


def test_controls_reuse_a_method_that_does_the_same_thing():
    methods = [bench.parse_spec(s) for s in ("greedy", "think-max:64", "short-m:k=8", "majority:n=8,top_p=0.95,label=sc")]
    added, mapping = bench.add_controls(methods)
    assert added == [] and mapping == {"think-max 64": "greedy", "short-1@8": "sc"}
    added, mapping = bench.add_controls([bench.parse_spec("best-of-n:n=4"), bench.parse_spec("majority:n=4")])
    assert added == [] and mapping == {"best-of-4": "majority@4"}  # top_p=1 and the default 1.0 are one setting
    added, mapping = bench.add_controls([bench.parse_spec("majority:n=8,tts_moi_beta=1,label=majority@8")])
    assert [m.label for m in added] == ["majority@8 (control)"] and mapping == {"majority@8": "majority@8 (control)"}


class SeededServer:
    """A stand-in server whose samples are a pure function of the seed and the sampling settings, seeding choice i
    of a request with ``seed + i`` as vLLM does: what common random numbers rest on."""

    def __init__(self):
        self.seeds = []

    async def sample(self, prompt, *, n=1, temperature=1.0, max_tokens=256, params=None, seed=None, top_p=None, **kw):
        from tts_plugins.client.server import Sample

        out = []
        for i in range(n):
            self.seeds.append(seed + i)
            h = hash((seed + i, temperature, top_p)) % 1000
            out.append(Sample(text=f"Answer: {h % 3}", answer=str(h % 3), tokens=10 + h % 50, finish_reason="stop"))
        return out


def test_common_random_numbers_two_labels_at_the_same_settings_give_equal_records():
    import asyncio

    p = {"id": "p7", "prompt": "Compute 1 + 2.", "answer": "1"}

    def run(spec, max_n=16):
        srv = SeededServer()
        r = asyncio.run(bench.run_one(srv, bench.parse_spec(spec), p, seed=3, max_tokens=64, max_n=max_n, same=lambda x, y: x == y))
        return {k: v for k, v in r.items() if k not in ("method", "wall_s")}, srv.seeds

    a, seeds_a = run("majority:n=8,label=one")
    b, seeds_b = run("majority:n=8,label=two")
    assert a == b and seeds_a == seeds_b  # renaming a row changes nothing
    c, seeds_c = run("majority:n=8,label=three", max_n=3)  # split into requests of 3, 3, 2: the same samples
    assert c == a and sorted(seeds_c) == sorted(seeds_a)
    _, seeds_sm = run("short-m:m=1,k=8,top_p=1.0")  # short-m at majority's settings draws majority's samples
    assert sorted(seeds_sm) == sorted(seeds_a)
    srv = SeededServer()  # another problem draws other samples
    asyncio.run(bench.run_one(srv, bench.parse_spec("majority:n=8"), {**p, "id": "p8"}, seed=3, max_tokens=64, max_n=16,
                              same=lambda x, y: x == y))
    assert not set(srv.seeds) & set(seeds_a)


def test_data_errors_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "1 + 1?", "answer": 2}\n{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: \"answer\" is missing"):
        bench.read_data(p)
    p.write_text('{"prompt": "1 + 1?", "answer": 2, "id": 7, "difficulty": "easy"}\n')
    assert bench.read_data(p) == [{"id": "7", "prompt": "1 + 1?", "answer": "2", "difficulty": "easy"}]


def test_thinking_tokens_count_thinking_cut_off_by_max_tokens():
    from tts_plugins.client.server import Sample

    assert bench.thinking_tokens(Sample(text="<think>\n7 + 5 = 12\n12 - 3", tokens=20)) == 20  # opened, never closed
    assert bench.thinking_tokens(Sample(text="Answer: 3", tokens=4)) == 0
    # by characters: "7 + 5 = 12</think>" is 18 of the 29 characters
    assert bench.thinking_tokens(Sample(text="\n\nAnswer: 3", reasoning="7 + 5 = 12", tokens=10)) == round(10 * 18 / 29)
    assert bench.thinking_tokens(Sample(text="", reasoning="7 + 5 = 12 and on", tokens=10)) == 10
    # the chat template opened thinking in the prompt: a sample that closes it shows so, and a stopped one is all thinking
    closed, stopped = Sample(text="7 + 5 = 12\n</think>\n\nAnswer: 12", tokens=12), Sample(text="7 + 5 =", tokens=5)
    assert bench.prompt_opens_thinking([stopped, closed]) and not bench.prompt_opens_thinking([stopped])
    assert bench.thinking_tokens(stopped, prompt_opened=True) == 5 and bench.thinking_tokens(stopped) == 0


def test_group_names_stay_short_and_differ_by_run_method_and_problem():
    names = {bench._group_name(n, m, p) for n in ("a", "b") for m in ("short-1@8", "short-3@8") for p in ("1", "x" * 500)}
    assert len(names) == 8 and max(map(len, names)) <= 128


def test_summary_reports_pass_at_k_at_the_fewest_samples():
    problems = [{"id": "1"}, {"id": "2"}]
    m = bench.parse_spec("majority:n=4")
    recs = {("majority@4", "1"): {**_record("majority@4", "1", True, samples=4), "samples_right": 1},
            ("majority@4", "2"): {**_record("majority@4", "2", False, samples=2), "samples_right": 0}}
    row = bench.summarize([m], problems, recs, baseline=None, resamples=10)["methods"][0]
    assert row["pass_at_k"] == {"k": 2, "value": pytest.approx((stats.pass_at_k(4, 1, 2) + 0.0) / 2)}


def test_summary_intervals_hold_when_every_answer_is_right_and_no_pair_disagrees():
    problems = [{"id": str(i)} for i in range(10)]
    methods = [bench.parse_spec("greedy"), bench.parse_spec("think-max:64")]
    recs = {(m.label, str(i)): _record(m.label, str(i), True, tokens=20 if m.name == "greedy" else 10) for m in methods for i in range(10)}
    s = bench.summarize(methods, problems, recs, baseline="greedy", resamples=200, controls={"think-max 64": "greedy"})
    rows = {r["method"]: r for r in s["methods"]}
    lo, hi = rows["greedy"]["ci95"]
    assert hi == 1.0 and lo == pytest.approx(stats.wilson(10, 10)[0]) and lo < 0.75  # 10/10 is not (1.0, 1.0)
    c = rows["think-max 64"]["vs_control"]
    assert c["difference"] == 0 and c["ci95"][0] < 0 < c["ci95"][1] and (c["wins"], c["losses"]) == (0, 0)  # zero discordant pairs
    assert c["token_ratio"] == pytest.approx(0.5) and c["token_ratio_ci95"] == pytest.approx([0.5, 0.5])
    assert c["holm_p"] == 1.0 and s["comparisons"] == 1  # the control and the baseline are one comparison
    table = bench.markdown(s)
    assert "0W/0L" in table and "0.50 (0.50, 0.50)" in table
