"""The proving ground: every technique measured with ``tts bench`` on the trained tiny reasoners, against its control,
with the premise it relies on measured where it acts and printed beside its effect.

1. Builds the trained models (:mod:`tts_plugins.models.trained`, the full recipe; cached) and writes the problems
   (``--data-seed``: -1 is :func:`tts_plugins.models.arith.held_out`, any other seed fresh ones; 2 to 12 steps).
2. Per model, starts a vLLM OpenAI server (as a user would) and samples the model (8 samples at T=0.7 with top-5
   log-probs) for the premises that need no technique: per-difficulty accuracy and entropy, the step checker's and
   DeepConf's confidence's AUC (``premises.json``).
3. Runs ``tts bench`` with every method at its paper's settings; the bench pairs each with its control (the same
   samples at the method's own temperature, top_p and sample count, on the same seeds) and adds majority at equal
   samples and at equal tokens. s1's cap runs against plain truncation at the same limit, at three budgets that bind;
   NoThinking draws 16 samples for its pass@k against thinking's at equal tokens.
4. Measures the premises where each technique acts, from the bench's own records (``premises-where-they-act.json``):
   s1's spliced "Wait" on think-min's outputs against its greedy control, short-m's on its control's samples,
   trimming's and the cap's on greedy.
5. Writes ``report.md`` (and, with ``--docs docs/results/proving-ground.md``, the docs page's tables between its testbed
   markers; ``--readme`` is the old name of the flag): each row's effect beside its premise.

    .venv/vllm/bin/python benchmarks/accuracy.py --out bench-results/testbed --docs docs/results/proving-ground.md   # ~1 hour, 2 CPUs
    .venv/vllm/bin/python benchmarks/accuracy.py --quick --models test --out /tmp/smoke           # plumbing only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engine")]

PRM = "tts_plugins.models.arith:step_reward"


BUDGETS = (16, 32, 64)  # s1's thinking caps: budgets that bind on medium and hard problems
ANSWER_ALLOWANCE = 12  # tokens after the cap for "</think>", the answer line and the end (the same limit for truncation)


def dense_methods(k: int, deepconf_n: int = 32) -> list[str]:
    """Every technique once, at its paper's settings. ``tts bench`` adds each method's control (the same samples
    without the technique, at the method's own temperature, top_p and sample count) and majority at equal samples
    and at equal tokens."""
    out = ["greedy", "sample", f"majority:n={k}",
           f"short-m:m=1,k={k}", f"short-m:m=3,k={k}",
           # the window scaled as the paper's 2048 is to its traces: about a tenth of these 40-250-token traces
           f"deepconf:{deepconf_n},variant=high,window=16", f"deepconf:{deepconf_n},variant=low,window=16",
           f"best-of-n:n={k},reward={PRM},label=best-of-{k} (step checker)",
           f"carbon:n={k},reward={PRM},label=carbon@{k} (step checker)",
           "ladder:1",
           "think-min:128",
           "trim:2",
           "trim:2,temperature=0.7,top_p=1.0,label=trim converge=2 (T=0.7)",
           # the conclusion the reasoner learned after a cut thinking block ("\n", as a cap closes it), not the default phrase
           'trim:2,temperature=0.7,top_p=1.0,tts_trim_conclusion="\\n",label=trim converge=2 (T=0.7) ending as a cap',
           "moi",
           # NoThinking's claim: pass@k against thinking's pass@k at equal tokens (the thinking samples: majority's)
           f"no-think:n={2 * k},temperature=0.7,top_p=1.0,label=no-think@{2 * k} (T=0.7)"]
    for b in BUDGETS:  # s1's claim: budget forcing against plain truncation at the same token budget
        limit = b + ANSWER_ALLOWANCE
        out += [f"greedy:max_tokens={limit},label=truncate at {limit}",
                f"think-max:{b},max_tokens={limit},label=think-max {b},vs=truncate at {limit}"]
    return out


def moe_methods(k: int, taus: tuple[float, ...]) -> list[str]:
    out = ["greedy", f"majority:n={k}"]
    out += [f"roe:{t}" for t in taus]
    out += [f"roster:k={k},tau={t}" for t in taus]
    out.append(f"roster:k={k},tau={max(taus)},temperature=0.7,label=sampling roster of {k} tau={max(taus)}")
    return out


# --- premises where each technique acts, from the bench's own records -------------------------------------------


def _wilson_cell(k: int, n: int) -> dict:
    from tts_plugins.client import stats

    lo, hi = stats.wilson(k, n) if n else (float("nan"), float("nan"))
    return {"k": k, "n": n, "share": k / n if n else float("nan"), "ci95": [lo, hi]}


def record_premises(records: dict, problems: list[dict], labels: dict[str, str]) -> dict:
    """Premises measured on the samples each technique acts on (``tts bench --save-samples`` records):

    * ``s1_splice``: think-min against its greedy control (the same tokens until the first spliced "Wait"): of
      the problems where a "Wait" was spliced (the texts differ), the share whose answer changed, and of those the
      share that changed to the right answer.
    * ``short_m``: on short-m's control (k samples at its T and top_p): the shortest sample's accuracy against the
      mean sample's, and the within-question length-correctness correlation.
    * ``trim``: on greedy, the share that state the same answer twice (converged, then re-verified).
    * ``cap_binds``: on greedy, the share of problems whose thinking runs past each s1 budget."""
    from tts_plugins.client.stats import point_biserial
    from tts_plugins.models import arith

    by_id = {p["id"]: p for p in problems}
    out: dict = {}
    tmin, greedy, sm = labels.get("think-min"), labels.get("greedy"), labels.get("short-m control")
    if tmin and greedy:
        spliced = changed = right = wrong_from_right = 0
        for pid in by_id:
            a, g = records.get((tmin, pid)), records.get((greedy, pid))
            if not a or not g or not a.get("texts") or not g.get("texts"):
                continue
            if a["texts"][0] == g["texts"][0]:
                continue
            spliced += 1
            if str(a["answer"]) != str(g["answer"]):
                changed += 1
                right += bool(a["correct"])
                wrong_from_right += bool(g["correct"]) and not a["correct"]
        out["s1_splice"] = {"spliced": spliced, "changed": _wilson_cell(changed, spliced), "changed_to_right": _wilson_cell(right, changed),
                            "right_to_wrong": wrong_from_right}
    if sm:
        corrs, shortest, mean = [], [], []
        for pid in by_id:
            r = records.get((sm, pid))
            if not r or not r.get("lengths"):
                continue
            lens, ok = r["lengths"], r["right"]
            c = point_biserial(lens, ok)
            if c is not None:
                corrs.append(c)
            i = min(range(len(lens)), key=lambda j: (lens[j], j))
            shortest.append(bool(ok[i]))
            mean.append(sum(ok) / len(ok))
        out["short_m"] = {"questions_mixed": len(corrs), "length_correct_corr": sum(corrs) / len(corrs) if corrs else float("nan"),
                          "shortest_right": _wilson_cell(sum(shortest), len(shortest)),
                          "mean_sample_right": sum(mean) / len(mean) if mean else float("nan")}
    if greedy:
        texts = [(by_id[pid], records[(greedy, pid)]) for pid in by_id if (greedy, pid) in records and records[(greedy, pid)].get("texts")]
        conv = sum(arith.analyze(p["prompt"], r["texts"][0])["converged_early"] for p, r in texts)
        out["trim"] = {"converged_then_reverified": _wilson_cell(conv, len(texts))}
        think = [r["thinking_tokens"] for _, r in texts]
        out["cap_binds"] = {str(b): _wilson_cell(sum(t > b for t in think), len(think)) for b in BUDGETS}
    return out


def nothinking_curve(records: dict, problems: list[dict], nothink: str, thinking: str) -> list[dict]:
    """NoThinking's claim: pass@k of NoThinking against pass@k of thinking at equal tokens. For each k of thinking,
    NoThinking gets as many samples as the same tokens buy (at most its n), per problem, both unbiased estimates."""
    from tts_plugins.client import stats

    rows = []
    pairs = [(records[(nothink, p["id"])], records[(thinking, p["id"])]) for p in problems
             if (nothink, p["id"]) in records and (thinking, p["id"]) in records]
    if not pairs:
        return rows
    tok_nt = sum(a["tokens"] / a["samples"] for a, _ in pairs) / len(pairs)
    tok_th = sum(b["tokens"] / b["samples"] for _, b in pairs) / len(pairs)
    n = min(min(a["samples"] for a, _ in pairs), min(b["samples"] for _, b in pairs))
    for k in (1, 2, 4, 8):
        if k > n:
            break
        kn = max(1, min(n, round(k * tok_th / tok_nt)))
        th = [stats.pass_at_k(b["samples"], b["samples_right"], k) for _, b in pairs]
        nt = [stats.pass_at_k(a["samples"], a["samples_right"], kn) for a, _ in pairs]
        d, lo, hi = stats.paired_bootstrap(nt, th, 5000, 0)
        rows.append({"thinking_k": k, "thinking_tokens": k * tok_th, "thinking_pass": sum(th) / len(th), "nothinking_k": kn,
                     "nothinking_tokens": kn * tok_nt, "nothinking_pass": sum(nt) / len(nt), "difference": d, "ci95": [lo, hi],
                     "capped": kn == n and round(k * tok_th / tok_nt) > n})
    return rows


def lowest_group_confidence(top: list[dict], window: int = 16) -> float:
    """DeepConf's lowest group confidence from per-token top log-probs: token confidence ``-mean(top log-probs)``,
    averaged over sliding windows of ``window`` tokens (the whole trace when shorter), the lowest window."""
    c = [-sum(t.values()) / len(t) for t in top if t]
    if not c:
        return 0.0
    w = min(window, len(c))
    s = sum(c[:w])
    low = s
    for i in range(w, len(c)):
        s += c[i] - c[i - w]
        low = min(low, s)
    return low / w


async def measure_premises(base: str, problems: list[dict], k: int, seed: int, max_tokens: int, concurrency: int) -> dict[str, Any]:
    """The premises, on the model's own samples: k samples per problem at T=0.7 with their top-5 log-probs."""
    from tts_plugins.client import Server, aggregate
    from tts_plugins.client.stats import point_biserial
    from tts_plugins.models import arith

    rows, entropy, prm_right, prm_wrong, conf_right, conf_wrong = [], {}, [], [], [], []
    async with Server(base, concurrency=concurrency, answer=arith.extract_answer, keep_special_tokens=True) as server:
        async def one(i: int, p: dict) -> None:
            samples = await server.sample(p["prompt"], n=k, temperature=0.7, max_tokens=max_tokens, logprobs=5, seed=seed * 7919 + i)
            for s in samples:
                text = (s.reasoning + "</think>" + s.text) if s.reasoning else s.text
                rows.append({"id": p["id"], "question": p["prompt"], "answer": p["answer"], "text": text, "tokens": s.tokens,
                             "difficulty": p["difficulty"]})
                entropy.setdefault(p["difficulty"], []).append(aggregate.chain_entropy(s.top or []))
                (prm_right if s.answer == p["answer"] else prm_wrong).append(arith.step_reward(p["prompt"], text))
                if s.answer is not None and s.top:  # DeepConf's signal: the lowest sliding-window mean of -mean(top log-probs)
                    (conf_right if s.answer == p["answer"] else conf_wrong).append(lowest_group_confidence(s.top))

        await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    out = arith.premises(rows)
    by_d = {}
    for d in sorted({r["difficulty"] for r in rows}):
        sub = [r for r in rows if r["difficulty"] == d]
        acc = sum(arith.extract_answer(r["text"]) == r["answer"] for r in sub) / len(sub)
        by_d[d] = {"sample_accuracy_T0.7": acc, "mean_token_entropy": sum(entropy[d]) / len(entropy[d]),
                   "tokens_per_sample": sum(r["tokens"] for r in sub) / len(sub)}
    out["by_difficulty"] = by_d
    # the step checker as a process reward: does it rank a right sample above a wrong one? (AUC over pairs)
    if prm_right and prm_wrong:
        wins = sum((a > b) + 0.5 * (a == b) for a in prm_right for b in prm_wrong)
        out["step_checker_auc"] = wins / (len(prm_right) * len(prm_wrong))
    if conf_right and conf_wrong:  # DeepConf's premise: answered traces with a low lowest-group confidence are more often wrong
        out["deepconf_conf_auc"] = sum((a > b) + 0.5 * (a == b) for a in conf_right for b in conf_wrong) / (len(conf_right) * len(conf_wrong))
    # length against correctness pooled over questions too (for reference; the premise is within a question)
    out["length_correct_corr_pooled"] = point_biserial([r["tokens"] for r in rows], [arith.extract_answer(r["text"]) == r["answer"] for r in rows])
    return out


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _cell(c: dict | None) -> str:
    if not c or not c.get("n"):
        return "n/a"
    return f"{c['k']}/{c['n']} = {100 * c['share']:.0f}% ({100 * c['ci95'][0]:.0f}, {100 * c['ci95'][1]:.0f})"


def premise_for(name: str, label: str, prem: dict[str, Any], rec: dict[str, Any]) -> str:
    """The premise a method relies on, measured where it acts (a short cell), and whether it held."""
    d = prem.get("by_difficulty", {})
    if name == "short-m" and "short_m" in rec:
        s = rec["short_m"]
        held = s["shortest_right"]["share"] > s["mean_sample_right"]
        return (f"on its control's samples: the shortest right {_cell(s['shortest_right'])} against a sample's {100 * s['mean_sample_right']:.0f}%; "
                f"length-correct corr within a question {_f(s['length_correct_corr'])} ({'held' if held else 'failed'})")
    if name == "think-min" and "s1_splice" in rec:
        s = rec["s1_splice"]
        ch = s["changed"]
        return (f"on its own outputs: Wait spliced on {s['spliced']} problems; answer changed {_cell(ch)}; of those to the right answer "
                f"{_cell(s['changed_to_right'])}, right to wrong {s['right_to_wrong']}")
    if name == "trim" and "trim" in rec:
        return f"on greedy: converged, then re-verified {_cell(rec['trim']['converged_then_reverified'])}"
    if name == "think-max" and "cap_binds" in rec:
        budget = label.split()[1] if len(label.split()) > 1 else ""
        return f"on greedy: thinking runs past {budget} tokens {_cell(rec['cap_binds'].get(budget))}"
    if name == "deepconf":
        return f"lowest group confidence ranks a right trace above a wrong one (T=0.7, top-5): AUC {_f(prem.get('deepconf_conf_auc'))}"
    if name in ("carbon", "best-of-n") and "step checker" in label:
        return f"step checker ranks a right sample above a wrong one: AUC {_f(prem.get('step_checker_auc'))}"
    if name == "no-think":
        return "see the NoThinking table (pass@k at equal tokens)"
    if name in ("majority", "ladder", "moi", "inverse-entropy", "sample", "roe", "roster") and d:
        return "T=0.7 sample accuracy by difficulty " + ", ".join(f"{k} {v['sample_accuracy_T0.7']:.2f}" for k, v in d.items()) + \
               "; token entropy " + ", ".join(f"{v['mean_token_entropy']:.2f}" for v in d.values())
    return ""


def report(parts: list[tuple[str, dict, dict, dict, list]]) -> str:
    from tts_plugins.client.bench import _delta, _pct, _ratio

    lines = ["Accuracy with Wilson 95% intervals. Δ: the difference in points with Newcombe's paired 95% interval, problems won (W) and "
             "lost (L), and McNemar's exact p Holm-adjusted over every comparison of the model's table. Each method runs against its "
             "control: the same number of samples at its own temperature and top_p, on the same seeds, without the technique. "
             "Tokens ×: mean decode tokens against the control's, with a paired bootstrap 95% interval.", ""]
    for model, summary, prem, rec, curve in parts:
        lines += [f"### {model}: {summary['problems']} problems, {summary['engine']}, seed {summary.get('seed')}", "",
                  "| method | accuracy % (95% CI) | Δ vs its control | tokens × control | Δ vs majority, equal samples | "
                  "Δ vs majority, equal tokens | tokens / problem | premise, measured where the technique acts |",
                  "| --- | ---: | --- | ---: | --- | --- | ---: | --- |"]
        for r in summary["methods"]:
            c = r.get("vs_control")
            v = r.get("vs_baseline") if r.get("vs_baseline") and (not c or r["vs_baseline"]["against"] != c["against"]) else None
            cells = [_delta(c, True) if c else "no control (its rungs are its settings)" if r["name"] == "ladder" else "control"]
            if v and "truncate" in v["against"]:
                cells[0] = _delta(c, True) + "<br>" + _delta(v, True)
            lines.append(f"| {r['method']} | {_pct(r['accuracy'])} ({_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}) | {cells[0]} | {_ratio(c)} | "
                         f"{_delta(r.get('vs_equal_samples'), True)} | {_delta(r.get('vs_equal_tokens'), True)} | {r['tokens_per_problem']:.0f} | "
                         f"{premise_for(r['name'], r['method'], prem, rec)} |")
        lines.append("")
        s1 = [r for r in summary["methods"] if r["name"] == "think-max" and r.get("vs_baseline") and "truncate" in r["vs_baseline"]["against"]]
        if s1:
            by = {r["method"]: r for r in summary["methods"]}
            lines += ["s1's claim, budget forcing against plain truncation at the same token limit (greedy):", "",
                      "| thinking budget | limit | truncation accuracy % | think-max accuracy % | Δ (95% CI) | thinking runs past the budget |",
                      "| ---: | ---: | ---: | ---: | --- | --- |"]
            for r in s1:
                t = by[r["vs_baseline"]["against"]]
                budget = r["method"].split()[1]
                lines.append(f"| {budget} | {r['settings'].get('max_tokens')} | {_pct(t['accuracy'])} | {_pct(r['accuracy'])} | "
                             f"{_delta(r['vs_baseline'])} | {_cell(rec.get('cap_binds', {}).get(budget))} |")
            lines.append("")
        if curve:
            lines += ["NoThinking's claim, pass@k against thinking's pass@k at equal tokens (T=0.7; unbiased pass@k; paired bootstrap):", "",
                      "| thinking k | tokens | thinking pass@k % | NoThinking k | tokens | NoThinking pass@k % | Δ (95% CI) |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            for c in curve:
                lines.append(f"| {c['thinking_k']} | {c['thinking_tokens']:.0f} | {_pct(c['thinking_pass'])} | {c['nothinking_k']}"
                             f"{' (all it drew)' if c['capped'] else ''} | {c['nothinking_tokens']:.0f} | {_pct(c['nothinking_pass'])} | "
                             f"{_pct(c['difference'])} ({_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}) |")
            lines.append("")
    return "\n".join(lines)


BEGIN, END = "<!-- testbed report: begin (benchmarks/accuracy.py --readme) -->", "<!-- testbed report: end -->"


def into_readme(path: Path, text: str) -> None:
    """Replace what is between the testbed markers of ``path`` (the docs' proving-ground page) with ``text`` (the tables
    come from report.md, never by hand)."""
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no testbed markers ({BEGIN} ... {END})")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + text.rstrip() + "\n" + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "testbed")
    ap.add_argument("--problems", type=int, help="held-out problems (default 500; --quick: 5)")
    ap.add_argument("--premise-problems", type=int, help="problems sampled for the premise measurements (default 200; --quick: 5)")
    ap.add_argument("--k", type=int, help="samples for the votes (default 8; --quick: 4)")
    ap.add_argument("--taus", default="0.05,0.1,0.2,0.5", help="RoE taus (single noisy samples and greedy rosters)")
    ap.add_argument("--roster-k", type=int, default=4, help="roster members and the MoE's majority vote")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (samples derive from it, the problem and the sample's number)")
    ap.add_argument("--data-seed", type=int, default=-1, help="which problems: -1 is the held-out set; any other seed draws fresh ones")
    ap.add_argument("--deepconf-n", type=int, default=32, help="DeepConf's budget (warmup 16, the paper's)")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--only", choices=("dense", "moe"), default=None)
    ap.add_argument("--select", metavar="REGEX", help="run only the method SPECs this regular expression finds (and the baseline, greedy)")
    ap.add_argument("--quick", action="store_true", help="5 problems, k=4 (a smoke run of the plumbing)")
    ap.add_argument("--docs", "--readme", dest="readme", type=Path, metavar="PAGE",
                    help="also write the report into this page (docs/results/proving-ground.md), between its testbed markers; "
                         "--readme is the old name")
    ap.add_argument("--models", choices=("full", "test"), default="full",
                    help="full: the trained recipe; test: the test suite's briefly trained models (plumbing: their accuracies mean nothing)")
    args = ap.parse_args(argv)
    args.problems = args.problems or (5 if args.quick else 500)
    args.premise_problems = min(args.problems, args.premise_problems or (5 if args.quick else 200))
    args.k = args.k or (4 if args.quick else 8)
    taus = tuple(float(t) for t in args.taus.split(","))

    from tts_plugins.client import bench
    from tts_plugins.client.cli import parser
    from tts_plugins.models import arith
    from tts_plugins.models.trained import build_reasoning_model

    from harness import Server as EngineServer
    from models import TRAINED, tiny_model

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data.jsonl"
    drawn = arith.problems(args.problems, seed=args.data_seed, steps=None)  # -1: arith.held_out
    problems = [p.to_json(f"h{i}") for i, p in enumerate(drawn)]
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    parts, t0 = [], time.perf_counter()
    for model, variant in (("reasoning", "dense"), ("reasoning-moe", "moe")):
        if args.only and args.only != variant:
            continue
        if args.models == "test":
            path = tiny_model(model)
        else:
            root = Path(os.environ.get("TTS_TINY_MODELS", Path(tempfile.gettempdir()) / "tts-plugins-tiny"))
            path = build_reasoning_model(root / model, TRAINED[model])
        card = json.loads((path / "tts_reasoning.json").read_text())
        print(f"{model}: {path}; transformers check: greedy {card.get('accuracy_T0')}, T=1 {card.get('accuracy_T1')}", flush=True)
        out = args.out / variant
        out.mkdir(exist_ok=True)
        # A token budget no batch reaches: vLLM 0.32 on CPU dies when it chunks the prefill of a seeded request.
        srv = EngineServer("vllm", path, python=sys.executable, args=("--max-num-seqs", "256", "--max-num-batched-tokens", "16384"))
        try:
            prem_file = out / "premises.json"
            if prem_file.exists():
                prem = json.loads(prem_file.read_text())
            else:
                prem = asyncio.run(measure_premises(srv.base, problems[: args.premise_problems], args.k, args.seed, args.max_tokens,
                                                    args.concurrency))
                prem_file.write_text(json.dumps(prem, indent=1))
            print(f"{model} premises: " + json.dumps({k: v for k, v in prem.items() if k != "by_difficulty"}), flush=True)
            specs = dense_methods(args.k, args.deepconf_n) if variant == "dense" else moe_methods(args.roster_k, taus)
            if args.select:
                specs = [s for s in specs if s == "greedy" or re.search(args.select, s)]
            argv = ["bench", "--base-url", srv.base, "--data", str(data), "--out", str(out), "--baseline", "greedy", "--equal-budget", "both",
                    "--save-samples",
                    "--max-tokens", str(args.max_tokens), "--concurrency", str(args.concurrency), "--seed", str(args.seed), "--extract",
                    "tts_plugins.models.arith:extract_answer"]
            for s in specs:
                argv += ["--method", s]
            if not sys.stderr.isatty():
                argv.append("--quiet")
            status = bench.main(parser().parse_args(argv))
            if status == 2:
                return 2
        finally:
            srv.close()
        summary = json.loads((out / "summary.json").read_text())
        from tts_plugins.models.trained import VARIANTS

        records = bench.read_records(out / "records.jsonl")
        rows = {r["method"]: r for r in summary["methods"]}
        labels = {"greedy": "greedy" if "greedy" in rows else None}
        for r in summary["methods"]:
            if r["name"] == "think-min":
                labels["think-min"] = r["method"]
            if r["name"] == "short-m" and r.get("control"):
                labels.setdefault("short-m control", r["control"])
        rec = record_premises(records, problems, {k: v for k, v in labels.items() if v})
        nt = next((r for r in summary["methods"] if r["name"] == "no-think" and r["samples_per_problem"] > 1), None)
        curve = nothinking_curve(records, problems, nt["method"], nt["control"]) if nt and nt.get("control") else []
        (out / "premises-where-they-act.json").write_text(json.dumps({"premises": rec, "nothinking": curve}, indent=1))
        parts.append((f"{variant} ({card.get('train_steps')} steps x {card.get('batch') or VARIANTS[variant]['batch']}; greedy "
                      f"{card.get('accuracy_T0')} by transformers)", summary, prem, rec, curve))
    text = report(parts)
    (args.out / "report.md").write_text(text)
    if args.readme:
        into_readme(args.readme, text)
    print(text)
    print(f"{args.out}/report.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
