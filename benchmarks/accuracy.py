"""The proving ground: every technique measured with ``tts bench`` on the trained tiny reasoners, with the premise
it relies on measured on the same model and printed beside its effect.

1. Builds the trained models (:mod:`tts_plugins.models.trained`, the full recipe; cached) and writes the held-out
   mixed-difficulty problems (:func:`tts_plugins.models.arith.held_out`, 2 to 12 steps) as ``data.jsonl``.
2. Per model, starts a vLLM OpenAI server (as a user would) and measures the premises on the model's own samples
   (``premises.json``): within a question, are shorter chains more often right (short-m@k); how often is a slip
   corrected after "Wait" and does a check after the answer change it to the right one (s1's minimum); how often
   is the answer reached before the end and re-verified (TrimR); per-difficulty accuracy and token entropy
   (voting, the ladder, MoI, RoE); does the step checker rank right samples above wrong ones (CarBoN with a
   process reward).
3. Runs ``tts bench`` (:mod:`tts_plugins.client.bench`) with every method at its paper's defaults, paired against
   greedy (single-sample methods) or majority@8 (votes), with equal-budget majority baselines.
4. Writes ``report.md``: the bench table with each row's premise beside it.

    .venv/vllm/bin/python benchmarks/accuracy.py --out bench-results/testbed            # ~1 hour on 2 CPU cores
    .venv/vllm/bin/python benchmarks/accuracy.py --quick --models test --out /tmp/smoke # plumbing only
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


def dense_methods(k: int) -> list[str]:
    """Every technique once, at its paper's settings (a CPU hour at 500 problems; what was left out and why is in
    the README)."""
    vote = f"majority@{k}"
    return [
        "greedy",
        "sample",
        f"majority:n={k}",
        f"short-m:m=1,k={k},vs={vote}",
        f"short-m:m=3,k={k},vs={vote}",
        f"best-of-n:n={k},reward={PRM},label=best-of-{k} (step checker),vs={vote}",
        f"carbon:n={k},reward={PRM},label=carbon@{k} (step checker),vs=best-of-{k} (step checker)",
        f"ladder:1,vs={vote}",
        "think-max:24",
        "think-max:48",
        "think-min:128",
        "no-think",
        "trim:2",
        "sample:temperature=0.7,top_p=1.0,label=sample (T=0.7)",
        "trim:2,temperature=0.7,label=trim converge=2 (T=0.7),vs=sample (T=0.7)",
        # the conclusion the reasoner learned after a cut thinking block ("\n", as a cap closes it), not the default phrase
        'trim:2,temperature=0.7,tts_trim_conclusion="\\n",label=trim converge=2 (T=0.7) ending as a cap,vs=sample (T=0.7)',
        "sample:temperature=0.6,top_p=0.8,label=sample (T=0.6, top_p=0.8)",
        "moi:label=moi,vs=sample (T=0.6, top_p=0.8)",
    ]


def moe_methods(k: int, taus: tuple[float, ...]) -> list[str]:
    out = ["greedy", f"majority:n={k}"]
    out += [f"roe:{t}" for t in taus]
    out += [f"roster:k={k},tau={t},vs=greedy" for t in taus]
    out.append(f"roster:k={k},tau={max(taus)},temperature=0.7,label=sampling roster of {k} tau={max(taus)},vs=majority@{k}")
    return out


async def measure_premises(base: str, problems: list[dict], k: int, seed: int, max_tokens: int, concurrency: int) -> dict[str, Any]:
    """The premises, on the model's own samples: k samples per problem at T=0.7 with their top-5 log-probs."""
    from tts_plugins.client import Server, aggregate
    from tts_plugins.client.stats import point_biserial
    from tts_plugins.models import arith

    rows, entropy, prm_right, prm_wrong = [], {}, [], []
    async with Server(base, concurrency=concurrency, answer=arith.extract_answer, keep_special_tokens=True) as server:
        async def one(i: int, p: dict) -> None:
            samples = await server.sample(p["prompt"], n=k, temperature=0.7, max_tokens=max_tokens, logprobs=5, seed=seed * 7919 + i)
            for s in samples:
                text = (s.reasoning + "</think>" + s.text) if s.reasoning else s.text
                rows.append({"id": p["id"], "question": p["prompt"], "answer": p["answer"], "text": text, "tokens": s.tokens,
                             "difficulty": p["difficulty"]})
                entropy.setdefault(p["difficulty"], []).append(aggregate.chain_entropy(s.top or []))
                (prm_right if s.answer == p["answer"] else prm_wrong).append(arith.step_reward(p["prompt"], text))

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
    # length against correctness pooled over questions too (for reference; the premise is within a question)
    out["length_correct_corr_pooled"] = point_biserial([r["tokens"] for r in rows], [arith.extract_answer(r["text"]) == r["answer"] for r in rows])
    return out


def premise_for(name: str, label: str, prem: dict[str, Any]) -> str:
    """The premise a method relies on, as measured (a short cell)."""
    f = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
    d = prem.get("by_difficulty", {})
    if name == "short-m":
        return (f"length-correct corr within a question {f(prem.get('length_correct_corr'))}; shorter half right {f(prem.get('short_right'))}, "
                f"longer half {f(prem.get('long_right'))}")
    if name == "think-min":
        return (f"slips corrected after Wait {f(prem.get('wait_fix_rate'))}; checks that changed the answer changed it to the right one "
                f"{f(prem.get('check_fix_rate'))}")
    if name == "trim":
        return f"samples that reach the answer and re-verify it {f(prem.get('converged_before_end'))}"
    if name == "think-max" or name == "no-think":
        return "tokens per sample by difficulty " + ", ".join(f"{k} {v['tokens_per_sample']:.0f}" for k, v in d.items())
    if name in ("carbon", "best-of-n") and "step checker" in label:
        return f"step checker ranks a right sample above a wrong one: AUC {f(prem.get('step_checker_auc'))}"
    if name in ("majority", "carbon", "best-of-n", "ladder", "moi", "inverse-entropy", "sample", "roe", "roster"):
        return "T=0.7 sample accuracy by difficulty " + ", ".join(f"{k} {v['sample_accuracy_T0.7']:.2f}" for k, v in d.items()) + \
               "; token entropy " + ", ".join(f"{v['mean_token_entropy']:.2f}" for v in d.values())
    return ""


def report(parts: list[tuple[str, dict, dict]]) -> str:
    from tts_plugins.client.bench import _pct

    lines = []
    for model, summary, prem in parts:
        lines += [f"### {model}: {summary['problems']} problems, {summary['engine']}", "",
                  "| method | accuracy % (95% CI) | Δ accuracy, paired 95% CI (vs) | McNemar p | tokens / problem | samples | premise; notes |",
                  "| --- | ---: | --- | ---: | ---: | ---: | --- |"]
        for r in summary["methods"]:
            diffs = [x for x in (r.get("vs_baseline"), r.get("vs_equal_budget")) if x]
            diffs = [x for i, x in enumerate(diffs) if x["against"] not in (y["against"] for y in diffs[:i])]
            dv = "; ".join(f"{_pct(x['difference'])} ({_pct(x['ci95'][0])}, {_pct(x['ci95'][1])}) vs {x['against']}"
                           for x in diffs) or "baseline"
            p = f"{diffs[0]['mcnemar_p']:.2g}" if diffs else ""
            notes = [premise_for(r["name"], r["method"], prem)]
            if "carbon_fitted_T_mean" in r:
                notes.append(f"fitted T {r['carbon_fitted_T_mean']:.2f}, {r['carbon_bias_tokens_mean']:.0f} biased tokens")
            if "pass_at_k" in r:
                notes.append(f"pass@{r['pass_at_k']['k']} {_pct(r['pass_at_k']['value'])}")
            lines.append(f"| {r['method']} | {_pct(r['accuracy'])} ({_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}) | {dv} | {p} | "
                         f"{r['tokens_per_problem']:.0f} | {r['samples_per_problem']:.3g} | {'; '.join(n for n in notes if n)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "testbed")
    ap.add_argument("--problems", type=int, help="held-out problems (default 500; --quick: 5)")
    ap.add_argument("--premise-problems", type=int, help="problems sampled for the premise measurements (default 200; --quick: 5)")
    ap.add_argument("--k", type=int, help="samples for the votes (default 8; --quick: 4)")
    ap.add_argument("--taus", default="0.05,0.1,0.2,0.5", help="RoE taus (single noisy samples and greedy rosters)")
    ap.add_argument("--roster-k", type=int, default=4, help="roster members and the MoE's majority vote")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--only", choices=("dense", "moe"), default=None)
    ap.add_argument("--select", metavar="REGEX", help="run only the method SPECs this regular expression finds (and the baseline, greedy)")
    ap.add_argument("--quick", action="store_true", help="5 problems, k=4 (a smoke run of the plumbing)")
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
    problems = [p.to_json(f"h{i}") for i, p in enumerate(arith.held_out(args.problems, steps=None))]
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
            specs = dense_methods(args.k) if variant == "dense" else moe_methods(args.roster_k, taus)
            if args.select:
                specs = [s for s in specs if s == "greedy" or re.search(args.select, s)]
            argv = ["bench", "--base-url", srv.base, "--data", str(data), "--out", str(out), "--baseline", "greedy", "--equal-budget", "samples",
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

        parts.append((f"{variant} ({card.get('train_steps')} steps x {card.get('batch') or VARIANTS[variant]['batch']})", summary, prem))
    text = report(parts)
    (args.out / "report.md").write_text(text)
    print(text)
    print(f"{args.out}/report.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
