"""DeepConf online on the trained reasoner: its premise measured on the model's own traces, then DeepConf-low and
-high against majority voting at the same number of traces, paired on the same problems.

1. Serves the trained dense reasoner (full recipe, cached) with vLLM as a user would.
2. The premise (``premise.json``): DeepConf stops and down-weights traces of low confidence, so it helps only
   where a trace's lowest group confidence tells right traces from wrong ones. On ``k`` samples per problem
   (T=0.6, top_p=0.95, the engine measuring each trace: ``tts_conf_window``), the AUC of the lowest group
   confidence for right against wrong traces, pooled and within a problem, and the accuracy of the traces at or
   above their problem's 90th / 10th percentile against all traces.
3. ``tts bench`` with ``majority`` (n traces), ``deepconf`` low and high (budget n, warmup, the window), each
   adaptive (no more traces once the weighted vote agrees, the paper's Algorithm 2) and with the whole budget (the
   paper's released script), each paired with majority on the same problems: accuracy and tokens, each with a 95%
   paired-bootstrap interval.
4. ``report.md``.

    .venv/vllm/bin/python benchmarks/deepconf.py --out bench-results/deepconf     # about 20 minutes on 2 CPU cores

The paper's window is 2048 tokens on traces of thousands; the reasoner's traces are 40 to 250 tokens, so the
window here is 16 (about a tenth of a trace), and the budget 32 with 8 warmup traces (the paper: 256 or 512, 16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engine")]


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a right trace's confidence > a wrong one's), ties half."""
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


async def measure_premise(base: str, problems: list[dict], k: int, window: int, seed: int, max_tokens: int, concurrency: int) -> dict[str, Any]:
    from tts_plugins.client import Server, aggregate
    from tts_plugins.models import arith

    per: list[list[tuple[float, bool, int]]] = []
    async with Server(base, concurrency=concurrency, answer=arith.extract_answer, keep_special_tokens=True) as server:
        async def one(i: int, p: dict) -> None:
            samples = await server.sample(p["prompt"], n=k, temperature=0.6, top_p=0.95, max_tokens=max_tokens, seed=seed * 7919 + i,
                                          params={"tts_conf_window": window})
            per.append([((s.reports or {})["conf"]["lowest"], s.answer == p["answer"], s.tokens, s.answer is not None) for s in samples])

        await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    right = [c for traces in per for c, ok, _, _ in traces if ok]
    wrong = [c for traces in per for c, ok, _, _ in traces if not ok]
    within = [a for traces in per if (a := auc([c for c, ok, _, _ in traces if ok], [c for c, ok, _, _ in traces if not ok])) is not None]

    def top_share(q: float) -> float:
        # the percentile over a problem's answered traces, as the authors' offline vote filters (an unanswered trace is
        # wrong here, and counts against the share)
        kept = []
        for traces in per:
            answered = [x for x, _, _, a in traces if a]
            if answered:
                bar = aggregate.percentile(answered, q)
                kept += [ok for c, ok, _, a in traces if a and c >= bar]
        return sum(kept) / len(kept) if kept else float("nan")

    all_traces = [ok for traces in per for _, ok, _, _ in traces]
    return {"problems": len(problems), "samples": k, "window": window, "trace_accuracy": sum(all_traces) / len(all_traces),
            "auc_pooled": auc(right, wrong), "auc_within_problem_mean": sum(within) / len(within) if within else None,
            "problems_with_right_and_wrong": len(within), "accuracy_top10pct": top_share(90.0), "accuracy_top90pct": top_share(10.0),
            "tokens_per_trace": sum(t for traces in per for _, _, t, _ in traces) / len(all_traces)}


def paired_tokens(records: dict, a: str, b: str, ids: list[str]) -> dict[str, Any]:
    from tts_plugins.client import stats

    common = [i for i in ids if (a, i) in records and (b, i) in records]
    ta = [float(records[(a, i)]["tokens"]) for i in common]
    tb = [float(records[(b, i)]["tokens"]) for i in common]
    ratio, lo, hi = stats.ratio_of_means(ta, tb)  # the ratio recomputed in every resample, not over a fixed baseline mean
    return {"against": b, "tokens": sum(ta) / len(ta), "against_tokens": sum(tb) / len(tb), "token_ratio": ratio, "ratio_ci95": [lo, hi],
            "saved": 1 - ratio, "saved_ci95": [1 - hi, 1 - lo]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "deepconf")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--premise-problems", type=int, default=100)
    ap.add_argument("-n", type=int, default=32, help="traces per problem: majority's n and DeepConf's budget")
    ap.add_argument("--warmup", type=int, default=16, help="warmup traces (16, the paper's; with 8, DeepConf-low's filter keeps one)")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--models", choices=("full", "test"), default="full", help="test: the test suite's briefly trained model (plumbing)")
    args = ap.parse_args(argv)

    from tts_plugins.client import bench
    from tts_plugins.client.cli import parser
    from tts_plugins.models import arith
    from tts_plugins.models.trained import build_reasoning_model

    from harness import Server as EngineServer
    from models import TRAINED, tiny_model

    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    problems = [p.to_json(f"h{i}") for i, p in enumerate(arith.held_out(args.problems, steps=None))]
    data = args.out / "data.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    root = Path(os.environ.get("TTS_TINY_MODELS", Path(tempfile.gettempdir()) / "tts-plugins-tiny"))
    path = tiny_model("reasoning") if args.models == "test" else build_reasoning_model(root / "reasoning", TRAINED["reasoning"])
    n, w = args.n, args.window
    vote = f"majority@{n}"
    specs = [f"majority:n={n},temperature=0.6,top_p=0.95,label={vote}",
             f"deepconf:{n},warmup={args.warmup},window={w},variant=low,label=deepconf-low@{n},vs={vote}",
             f"deepconf:{n},warmup={args.warmup},window={w},variant=high,label=deepconf-high@{n},vs={vote}",
             # the whole budget, no consensus stop (the paper's released script): the early stop and the filter alone
             f"deepconf:{n},warmup={args.warmup},window={w},variant=low,adaptive=false,label=deepconf-low@{n} whole budget,vs={vote}",
             f"deepconf:{n},warmup={args.warmup},window={w},variant=high,adaptive=false,label=deepconf-high@{n} whole budget,vs={vote}"]
    srv = EngineServer("vllm", path, python=sys.executable, args=("--max-num-seqs", "256", "--max-num-batched-tokens", "16384"))
    try:
        prem_file = args.out / "premise.json"
        if prem_file.exists():
            prem = json.loads(prem_file.read_text())
        else:
            prem = asyncio.run(measure_premise(srv.base, problems[: args.premise_problems], 8, w, args.seed, args.max_tokens, args.concurrency))
            prem_file.write_text(json.dumps(prem, indent=1))
        print("premise: " + json.dumps(prem), flush=True)
        argv = ["bench", "--base-url", srv.base, "--data", str(data), "--out", str(args.out), "--baseline", vote, "--max-tokens",
                str(args.max_tokens), "--concurrency", str(max(1, args.concurrency // 8)), "--seed", str(args.seed), "--extract",
                "tts_plugins.models.arith:extract_answer", "--max-n", "8"]
        for s in specs:
            argv += ["--method", s]
        if not sys.stderr.isatty():
            argv.append("--quiet")
        if bench.main(parser().parse_args(argv)) == 2:
            return 2
    finally:
        srv.close()
    summary = json.loads((args.out / "summary.json").read_text())
    records = bench.read_records(args.out / "records.jsonl")
    ids = [p["id"] for p in problems]
    rows = []
    for r in summary["methods"]:
        row = {"method": r["method"], "accuracy": r["accuracy"], "ci95": r["ci95"], "tokens_per_problem": r["tokens_per_problem"],
               "samples_per_problem": r["samples_per_problem"]}
        if r["method"] != vote:
            row["vs_majority"] = r.get("vs_baseline")
            row["tokens_vs_majority"] = paired_tokens(records, r["method"], vote, ids)
            recs = [records[(r["method"], i)] for i in ids if (r["method"], i) in records]
            dc = [x["deepconf"] for x in recs if x.get("deepconf")]
            row["stopped_per_problem"] = sum(d["stopped"] for d in dc) / len(dc)
            row["early_exits"] = sum(bool(x.get("early_exit")) for x in recs)
        rows.append(row)
    out = {"premise": prem, "methods": rows, "settings": {"n": n, "warmup": args.warmup, "window": w, "problems": len(problems),
                                                          "temperature": 0.6, "top_p": 0.95}, "seconds": round(time.perf_counter() - t0)}
    (args.out / "deepconf.json").write_text(json.dumps(out, indent=1))
    text = report(out)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


def report(out: dict[str, Any]) -> str:
    p, s = out["premise"], out["settings"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"Premise ({p['problems']} problems x {p['samples']} traces, T=0.6, top_p=0.95, window {p['window']}): trace accuracy "
             f"{pct(p['trace_accuracy'])}%; AUC of the lowest group confidence, right vs wrong traces: pooled {p['auc_pooled']:.3f}, "
             f"within a problem {p['auc_within_problem_mean'] or float('nan'):.3f} ({p['problems_with_right_and_wrong']} problems with both); "
             f"accuracy of the traces in their problem's top 10% by confidence {pct(p['accuracy_top10pct'])}%, top 90% "
             f"{pct(p['accuracy_top90pct'])}%.", "",
             f"{s['problems']} held-out problems, budget {s['n']} traces, warmup {s['warmup']}, window {s['window']}:", "",
             "| method | accuracy % (95% CI) | Δ accuracy vs majority, paired 95% CI | tokens / problem | tokens saved vs majority, paired 95% CI "
             "| traces / problem | stopped / problem |", "| --- | ---: | --- | ---: | --- | ---: | ---: |"]
    for r in out["methods"]:
        v, t = r.get("vs_majority"), r.get("tokens_vs_majority")
        dv = f"{pct(v['difference'])} ({pct(v['ci95'][0])}, {pct(v['ci95'][1])})" if v else "baseline"
        dt = f"{pct(t['saved'])}% ({pct(t['saved_ci95'][0])}, {pct(t['saved_ci95'][1])})" if t else ""
        lines.append(f"| {r['method']} | {pct(r['accuracy'])} ({pct(r['ci95'][0])}, {pct(r['ci95'][1])}) | {dv} | {r['tokens_per_problem']:.0f} | "
                     f"{dt} | {r['samples_per_problem']:.1f} | {r.get('stopped_per_problem', 0):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
