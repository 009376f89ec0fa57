"""Accuracy against decode tokens for every technique, on the trained tiny reasoning models, in the real vLLM engine.

Held-out multi-step arithmetic (:mod:`tts_plugins.models.arith`, the default difficulty),
the trained models (:mod:`tts_plugins.models.trained`; built on first use), one vLLM
OpenAI server per model, and every request sent through the project's client
(:class:`tts_plugins.client.Server`, :func:`tts_plugins.client.strategies.run_problem`).
Per method: accuracy with a 95% bootstrap interval over problems, decode tokens
per problem (every sample's tokens, stopped ones included), samples per problem.

Dense model (``reasoning``): greedy; one sample at T=1; majority@k; the
inverse-entropy vote@k; Best-of-N by confidence; the temperature ladder with the
two-stage multi-temperature vote; CarBoN; short-1@k and short-3@k (in-engine group
stop); the think cap and minimum (s1 "Wait") sweeps, greedy; NoThinking; thought
trimming; Mixture of Inputs (one sample and majority@k). MoE model
(``reasoning-moe``): greedy, one sample, majority@K, routing noise alone, a greedy
roster of K (one clean member, K-1 noisy) and a sampling roster (``n = K``).

Writes JSON (``--json``) and a Pareto chart of accuracy against tokens (``--png``).

    .venv/vllm/bin/python benchmarks/accuracy.py --json acc.json --png acc.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engine")]


@dataclass
class Method:
    name: str
    family: str
    model: str = "reasoning"
    options: dict[str, Any] = field(default_factory=dict)  # tts_plugins.client.strategies.Options fields
    per_problem: Any = None  # pid -> extra tts_* params (group and roster names)
    roster: tuple[float, ...] | None = None  # greedy roster: one request per member, these taus


def methods(k: int, roster_k: int) -> list[Method]:
    greedy = {"n": 1, "temperature": 0.0}
    one = {"n": 1, "temperature": 1.0}
    vote = {"n": k, "temperature": 1.0}
    out = [
        Method("greedy", "baseline", options=greedy),
        Method("1 sample T=1", "baseline", options=one),
        Method(f"majority@{k}", "vote", options=vote),
        Method(f"inverse-entropy@{k}", "vote", options={**vote, "vote": "inverse_entropy"}),
        Method(f"best-of-{k} (confidence)", "vote", options={**vote, "strategy": "best-of-n"}),
        Method("ladder 0..1.2 (13 rungs)", "temperature", options={"strategy": "ladder", "waves": 2, "ahead": 1}),
        Method(f"CarBoN n={k}", "carbon", options={**vote, "strategy": "carbon"}),
    ]
    for m in (1, 3):
        out.append(Method(f"short-{m}@{k}", "group stop", options={**vote, "vote": "short_m", "m": m},
                          per_problem=lambda pid, m=m: {"tts_group": f"short{m}-{pid}", "tts_group_stop_after": m}))
    for cap in (16, 32, 48, 64):
        out.append(Method(f"cap {cap}", "think cap", options={**greedy, "params": {"tts_think_max": cap}}))
    for low in (96, 128):
        out.append(Method(f"min {low} (Wait)", "think min", options={**greedy, "params": {"tts_think_min": low}}))
    out += [
        Method("NoThinking", "think cap", options={**greedy, "params": {"tts_no_think": True}}),
        Method("trim: 5 thoughts", "trim", options={**greedy, "params": {"tts_trim": True, "tts_trim_markers": ["\n"], "tts_trim_max_thoughts": 5,
                                                                          "tts_trim_min_tokens": 0}}),
        Method("MoI 1 sample", "MoI", options={**one, "params": {"tts_moi_beta": 1.0}}),
        Method(f"MoI majority@{k}", "MoI", options={**vote, "params": {"tts_moi_beta": 1.0}}),
    ]
    rk = {"n": roster_k, "temperature": 1.0}
    out += [
        Method("MoE greedy", "baseline", "reasoning-moe", options=greedy),
        Method("MoE 1 sample T=1", "baseline", "reasoning-moe", options=one),
        Method(f"MoE majority@{roster_k}", "vote", "reasoning-moe", options=rk),
        Method("MoE RoE tau=1, 1 sample", "RoE", "reasoning-moe", options={**one, "params": {"tts_roe_tau": 1.0}}),
        Method(f"MoE greedy roster of {roster_k}", "RoE", "reasoning-moe", roster=(0.0,) + (1.0,) * (roster_k - 1)),
        Method(f"MoE sampling roster of {roster_k}", "RoE", "reasoning-moe",
               options={**rk, "params": {"tts_roe_roster_size": roster_k, "tts_roe_tau": 1.0}}),
    ]
    return out


def testbed_checks(results: list[dict]) -> dict[str, dict]:
    """What the trained model must be for the other rows to mean something (the engine tests use a briefly trained
    model and check only what the engines do): it answers most problems greedily, its single samples at T=1 are right
    often but not always (so votes have room), and cutting its thinking to 16 tokens costs accuracy."""
    acc = {(r["model"], r["method"]): r["accuracy"] for r in results}
    out = {}
    if ("reasoning", "greedy") in acc:
        out["greedy accuracy"] = {"figure": acc["reasoning", "greedy"], "wanted": ">= 0.6", "met": acc["reasoning", "greedy"] >= 0.6}
    if ("reasoning", "1 sample T=1") in acc:
        a = acc["reasoning", "1 sample T=1"]
        out["single-sample accuracy at T=1"] = {"figure": a, "wanted": "0.25 to 0.85", "met": 0.25 <= a <= 0.85}
    if ("reasoning", "cap 16") in acc and ("reasoning", "greedy") in acc:
        cost = acc["reasoning", "greedy"] - acc["reasoning", "cap 16"]
        out["accuracy the 16-token cap costs"] = {"figure": cost, "wanted": "> 0.2", "met": cost > 0.2}
    return out


def bootstrap(correct: list[bool], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over problems."""
    rng, n = random.Random(seed), len(correct)
    means = sorted(sum(correct[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


async def run_method(server, method: Method, problems: list[dict], seed: int, max_tokens: int) -> list[dict]:
    from tts_plugins.client import aggregate
    from tts_plugins.client.strategies import Options, run_problem

    async def one(p: dict) -> dict:
        if method.roster is not None:
            k = len(method.roster)
            members = await asyncio.gather(*(
                server.sample(p["prompt"], n=1, temperature=0.0, max_tokens=max_tokens, seed=seed * 100 + i,
                              params={"tts_roe_roster": f"r-{p['id']}", "tts_roe_roster_size": k, "tts_roe_tau": tau})
                for i, tau in enumerate(method.roster)))
            samples = [s for m in members for s in m]
            answer = samples[0].answer
            return {"correct": answer is not None and aggregate.same_answer(answer, p["answer"]), "tokens": sum(s.tokens for s in samples),
                    "n_samples": k, "identical": len({tuple(s.token_ids or ()) for s in samples}) == 1}
        opts = dict(method.options)
        params = {**opts.pop("params", {}), **(method.per_problem(p["id"]) if method.per_problem else {})}
        o = Options(max_tokens=max_tokens, seed=seed, max_n=64, params=params, **opts)
        o.check()
        r = await run_problem(server, p, o)
        return {"correct": bool(r.get("correct")), "tokens": r["tokens"], "n_samples": r["n_samples"]}

    return await asyncio.gather(*(one(p) for p in problems))


async def run_model(base: str, todo: list[Method], problems: list[dict], seed: int, max_tokens: int, concurrency: int) -> list[dict]:
    from tts_plugins.client import Server
    from tts_plugins.models import arith

    out = []
    async with Server(base, engine="vllm", concurrency=concurrency, answer=arith.extract_answer) as server:
        for m in todo:
            t0 = time.perf_counter()
            rows = await run_method(server, m, problems, seed, max_tokens)
            correct = [r["correct"] for r in rows]
            lo, hi = bootstrap(correct, seed=seed)
            rec = {"method": m.name, "family": m.family, "model": m.model, "problems": len(rows), "accuracy": sum(correct) / len(rows),
                   "ci95": [lo, hi], "tokens_per_problem": sum(r["tokens"] for r in rows) / len(rows),
                   "samples_per_problem": sum(r["n_samples"] for r in rows) / len(rows), "seconds": round(time.perf_counter() - t0, 1)}
            if m.roster is not None:
                rec["members_identical"] = all(r["identical"] for r in rows)
            out.append(rec)
            print(f"  {m.name:<30} acc {rec['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]  tokens/problem {rec['tokens_per_problem']:8.1f}  "
                  f"({rec['seconds']:.1f}s)", flush=True)
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [2.2, 1]})
    families = sorted({r["family"] for r in results})
    colors = dict(zip(families, plt.cm.tab10.colors))
    for ax, model in zip(axes, ("reasoning", "reasoning-moe")):
        rows = [r for r in results if r["model"] == model]
        if not rows:
            ax.set_visible(False)
            continue
        for r in rows:
            lo, hi = r["ci95"]
            ax.errorbar(r["tokens_per_problem"], r["accuracy"], yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], fmt="o",
                        color=colors[r["family"]], capsize=3, ms=5)
            ax.annotate(r["method"], (r["tokens_per_problem"], r["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front, best = [], -1.0  # Pareto frontier: no other method is both cheaper and more accurate
        for r in sorted(rows, key=lambda r: (r["tokens_per_problem"], -r["accuracy"])):
            if r["accuracy"] > best:
                front.append(r)
                best = r["accuracy"]
        ax.plot([r["tokens_per_problem"] for r in front], [r["accuracy"] for r in front], "--", color="grey", lw=1, label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("decode tokens per problem (log)")
        ax.set_ylabel("accuracy (95% bootstrap interval)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("dense" if model == "reasoning" else "MoE")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[f], label=f) for f in families]
    axes[0].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, help="held-out problems (default 100; --quick: 12)")
    ap.add_argument("--k", type=int, help="samples for the votes, CarBoN and short-m@k (default 8; --quick: 4)")
    ap.add_argument("--roster-k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--only", help="comma-separated method names (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer problems and samples (a smoke run)")
    ap.add_argument("--models", choices=("full", "test"), default="full",
                    help="full: the trained recipe (cached beside the demo's); test: the test suite's briefly trained models "
                         "(a run of the plumbing: their accuracies mean nothing)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--markdown", type=Path, help="the results as a Markdown table")
    args = ap.parse_args(argv)
    args.problems = args.problems or (12 if args.quick else 100)
    args.k = args.k or (4 if args.quick else 8)

    from tts_plugins.models import arith
    from tts_plugins.models.trained import build_reasoning_model

    from harness import Server as EngineServer
    from models import TRAINED, tiny_model

    problems = [p.to_json(f"h{i}") for i, p in enumerate(arith.held_out(args.problems))]
    todo = methods(args.k, args.roster_k)
    if args.only:
        names = {s.strip() for s in args.only.split(",")}
        todo = [m for m in todo if m.name in names]
    results: list[dict] = []
    t0 = time.perf_counter()
    for model in ("reasoning", "reasoning-moe"):
        mine = [m for m in todo if m.model == model]
        if not mine:
            continue
        if args.models == "test":
            path = tiny_model(model)
        else:
            root = Path(os.environ.get("TTS_TINY_MODELS", Path(tempfile.gettempdir()) / "tts-plugins-tiny"))
            path = build_reasoning_model(root / model, TRAINED[model])
        card = json.loads((path / "tts_reasoning.json").read_text())
        print(f"{model}: {path} (trained in {card['train_seconds']}s; transformers check: greedy {card.get('accuracy_T0')}, "
              f"T=1 {card.get('accuracy_T1')})", flush=True)
        # A token budget no batch reaches: vLLM 0.32 on CPU dies when it chunks the prefill of a seeded request
        # (its CPU generator has no offset to rewind), and every request here is seeded.
        srv = EngineServer("vllm", path, python=sys.executable, args=("--max-num-seqs", "64", "--max-num-batched-tokens", "16384"))
        try:
            results += asyncio.run(run_model(srv.base, mine, problems, args.seed, args.max_tokens, args.concurrency))
        finally:
            srv.close()
    report = {"engine": "vllm", "problems": args.problems, "steps": arith.DEFAULT_STEPS, "max_operand": arith.DEFAULT_MAX_OPERAND,
              "k": args.k, "roster_k": args.roster_k, "seed": args.seed, "max_tokens": args.max_tokens, "bootstrap_resamples": 2000,
              "seconds": round(time.perf_counter() - t0, 1), "results": results}
    report["testbed"] = testbed_checks(results) if args.models == "full" else {}
    print(f"\n{'method':<32} {'model':<6} {'accuracy':>8}  {'95% CI':<15} {'tokens/problem':>14} {'samples':>7}")
    for r in results:
        print(f"{r['method']:<32} {'MoE' if r['model'] == 'reasoning-moe' else 'dense':<6} {r['accuracy']:8.3f}  "
              f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]   {r['tokens_per_problem']:14.1f} {r['samples_per_problem']:7.1f}")
    for name, check in report["testbed"].items():
        print(f"{'' if check['met'] else 'MISSED '}testbed: {name}: {check['figure']:.2f} (wanted {check['wanted']})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        lines = ["| model | method | accuracy | 95% interval | decode tokens / problem | samples / problem |",
                 "| --- | --- | ---: | --- | ---: | ---: |"]
        lines += [f"| {'MoE' if r['model'] == 'reasoning-moe' else 'dense'} | {r['method']} | {r['accuracy']:.2f} | "
                  f"{r['ci95'][0]:.2f} to {r['ci95'][1]:.2f} | "
                  f"{r['tokens_per_problem']:.0f} | {r['samples_per_problem']:g} |" for r in results]
        args.markdown.write_text("\n".join(lines) + "\n")
    if args.png:
        plot(results, args.png, f"Held-out arithmetic ({args.problems} problems, {arith.DEFAULT_STEPS} steps), vLLM on CPU, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
