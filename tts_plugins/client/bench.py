"""``tts bench``: measure test-time-scaling methods on your server and your data, with paired statistics.

    tts bench --base-url http://127.0.0.1:8000 --data problems.jsonl --out bench/ \\
        --method greedy --method majority:n=8 --method short-m:m=1,k=8 --method think-max:512

Data: JSONL, one problem per line, ``{"question": ..., "answer": ...}`` with an
optional ``id`` and ``difficulty`` (``prompt`` is accepted for ``question``).
Each question is sent as the user message of a chat completion, so the
server's chat template applies. Answers are extracted from the text after
thinking (``--extract``: ``auto`` takes the last ``\\boxed{}``, else what follows
``Answer:``) and graded against the reference with math-verify.

A method SPEC is a name, an optional positional value after ``:``, and
``key=value`` settings, comma-separated: ``greedy``, ``majority:n=8,temperature=0.7``,
``short-m:m=1,k=8``, ``think-max:512``, ``carbon:n=8``. Any ``tts_*`` key is sent
with the method's requests (``majority:n=4,tts_moi_beta=1``); ``label=...``
names the row. Every method runs at its paper's default settings unless a
setting is given (``tts bench --list`` prints them with their sources). Each method is one object
(:mod:`tts_plugins.client.methods`); a plugin adds its own through the ``tts_register_bench_methods`` hook.

Every method is paired with its **control**: the same number of samples at the
method's own temperature and top_p, with no technique (greedy or one sample for
single-sample techniques, majority for votes; ``--no-controls`` leaves them
out). Seeds come from ``--seed``, the problem and the sample's number, never
from the method or its label (common random numbers): a method and its control
draw the same samples until the technique acts, and renaming a row changes
nothing. ``--equal-budget samples`` (``tokens``, ``both``) adds, for every method
that spends more than one sample's worth, a majority vote at the same mean
number of samples (or tokens) per problem, at the method's own sampling settings.

Output in ``--out``: ``records.jsonl`` (one line per method and problem: answer,
correct, decode tokens, thinking tokens, samples, wall time; appended as
problems finish, so running the same command again resumes), ``summary.json``,
``report.md`` and ``pareto.png`` (accuracy against tokens, with intervals; needs
matplotlib). The report gives accuracy with a Wilson interval; each comparison's
difference with Newcombe's paired interval (right when discordant problems are
few or none), problems won and lost, McNemar's exact p Holm-adjusted over all
the comparisons reported, and the ratio of mean tokens with a paired bootstrap
interval; per difficulty when the data has it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tts_plugins.client import aggregate, stats
from tts_plugins.client.methods import BUILTIN_METHODS, BenchMethod, MethodSpec, RunContext, default_methods, parse_spec, registered
from tts_plugins.client.runs import add_base_url, finished_results, gather_all, iter_jsonl, run_guarded, server_url
from tts_plugins.client.server import EXTRACTORS, Sample, Server, ServerError, extractor, final_part
from tts_plugins.client.strategies import sample_seed

THINK_START = ("<think>", "<seed:think>", "\u25c1think\u25b7", "<|begin_of_thought|>", "<reasoning>")

# --- controls ---------------------------------------------------------------------------------------------


def _key(m: MethodSpec) -> str:
    """What a method does, without its label: two methods with the same key draw the same samples and answer alike
    (``top_p=1`` and ``top_p=1.0`` are one setting)."""
    def norm(v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    return json.dumps([m.name, {k: norm(v) for k, v in m.settings.items()}, m.params], sort_keys=True, default=str)


def control_spec(m: MethodSpec) -> str | None:
    """The control at the method's own sampling settings and sample count: the same samples (common random numbers)
    with no technique, voted by majority when there are several (:meth:`BenchMethod.control`). None for a control
    itself (greedy, sample, majority with no ``tts_*`` key) and for the ladder (its rungs are its sampling settings)."""
    return m.method.control(m)


def add_controls(methods: Sequence[MethodSpec]) -> tuple[list[MethodSpec], dict[str, str]]:
    """Each method's control (:func:`control_spec`), reusing a method already in the run that does the same thing.
    Returns the controls to add and method label -> control label."""
    have = {_key(m): m.label for m in methods}
    labels = {m.label for m in methods}
    added: list[MethodSpec] = []
    mapping: dict[str, str] = {}
    for m in methods:
        spec = control_spec(m)
        if spec is None:
            continue
        c = parse_spec(spec, BUILTIN_METHODS)  # controls are built-in methods
        if _key(c) not in have:
            if c.label in labels:
                c.label += " (control)"
            added.append(c)
            have[_key(c)] = c.label
            labels.add(c.label)
        mapping[m.label] = have[_key(c)]
    return added, mapping


# --- running ----------------------------------------------------------------------------------------------


def read_data(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    out, seen = [], set()
    for no, line, p in iter_jsonl(path):
        q = p.get("question", p.get("prompt")) if isinstance(p, dict) else None
        if not isinstance(q, str) or not q:
            raise ValueError(f'{path}:{no}: expected an object with a non-empty string "question", got {line[:120]!r}')
        if "answer" not in p or p["answer"] is None:
            raise ValueError(f'{path}:{no}: "answer" is missing (tts bench grades every problem)')
        pid = str(p.get("id", no))
        if pid in seen:
            raise ValueError(f"{path}:{no}: duplicate id {pid!r}")
        seen.add(pid)
        out.append({"id": pid, "prompt": q, "answer": str(p["answer"]), "difficulty": p.get("difficulty")})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def prompt_opens_thinking(samples: Sequence[Sample]) -> bool:
    """Whether the chat template opened thinking in the prompt: some sample closes thinking it never opened."""
    for s in samples:
        full = (s.reasoning + "</think>" + s.text) if s.reasoning else s.text
        if len(final_part(full)) < len(full) and not any(m in full for m in THINK_START):
            return True
    return False


def thinking_tokens(s: Sample, prompt_opened: bool = False) -> int:
    """Decode tokens spent thinking: the share of the sample's tokens that the thinking text takes (by characters),
    exact when the completion has no thinking or is only thinking. A completion that opened thinking and never
    closed it (cut off by ``max_tokens``, or stopped by a group) is all thinking, and so is one that never closed
    it when the prompt opened it (``prompt_opened``: :func:`prompt_opens_thinking` on the problem's samples)."""
    full = (s.reasoning + "</think>" + s.text) if s.reasoning else s.text
    answer_part = final_part(full)
    if len(answer_part) == len(full):  # no end of thinking: all thinking if it was opened (cut off, or stopped)
        return s.tokens if s.reasoning or prompt_opened or any(m in full for m in THINK_START) else 0
    return round(s.tokens * (len(full) - len(answer_part)) / max(1, len(full)))


def _group_name(nonce: str, label: str, pid: str) -> str:
    """A short group / roster name, unique to this run, method and problem (engines cap names at 128 characters)."""
    return f"bench-{nonce}-{zlib.crc32(label.encode()):08x}-{zlib.crc32(str(pid).encode()):08x}"


def _seed(seed: int, pid: str) -> int:
    """A problem's seed: from the run's seed and the problem, never from the method or its label, so every method
    at the same sampling settings draws the same samples (common random numbers) and renaming a row changes
    nothing. Sample j of the problem is seeded from this plus j (see ``strategies._seed``)."""
    return (seed * 1_000_003 + zlib.crc32(str(pid).encode())) % (2**31 - 1)


async def run_one(server: Server, m: MethodSpec, p: Mapping[str, Any], *, seed: int, max_tokens: int, max_n: int,
                  same: Callable[[str, str], bool], save_samples: bool = False, nonce: str = "0") -> dict[str, Any]:
    """One method on one problem (:meth:`BenchMethod.run`): the record ``records.jsonl`` keeps."""
    t0 = time.perf_counter()
    rseed = _seed(seed, str(p["id"]))
    ctx = RunContext(seed=rseed, first_seed=sample_seed(rseed, str(p["id"])),  # sample 0's seed, as the strategies seed it
                     max_tokens=int(m.settings.get("max_tokens", max_tokens)), max_n=max_n, group=_group_name(nonce, m.label, p["id"]))
    outcome = await m.method.run(server, m, p, ctx)
    answer, samples, extra = outcome.answer, list(outcome.samples), dict(outcome.extra)
    right = [x.answer is not None and same(str(x.answer), str(p["answer"])) for x in samples]
    opened = prompt_opens_thinking(samples)
    if save_samples:
        extra["texts"] = [(x.reasoning + "</think>" + x.text) if x.reasoning else x.text for x in samples]
    return {"method": m.label, "id": p["id"], "difficulty": p.get("difficulty"), "answer": answer, "reference": p["answer"],
            "correct": answer is not None and same(str(answer), str(p["answer"])), "tokens": sum(x.tokens for x in samples),
            "thinking_tokens": sum(thinking_tokens(x, opened) for x in samples), "samples": len(samples), "samples_right": sum(right),
            "finish": [x.finish_reason for x in samples], "lengths": [x.tokens for x in samples], "right": right,
            "wall_s": round(time.perf_counter() - t0, 3), **extra}


def read_records(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished records by (method label, problem id); errors are retried and a half-written last line (an
    interrupted run) is skipped."""
    return {(r["method"], str(r["id"])): r for r in finished_results(path) if "method" in r}


async def run_methods(server: Server, methods: Sequence[MethodSpec], problems: Sequence[Mapping[str, Any]], out: Path, *, seed: int,
                      max_tokens: int, max_n: int, concurrency: int, same: Callable[[str, str], bool], progress: bool,
                      done: dict[tuple[str, str], dict[str, Any]], save_samples: bool = False, fingerprint: Callable[..., str] | None = None,
                      nonce: str = "0") -> int:
    """Run what is not in ``done`` yet; append each record as it finishes. Returns the number of failed problems
    (their errors are recorded and retried on resume).

    An unreachable server stops the run; so does a request the server refuses (HTTP 400/422) before any problem
    of that method succeeded (the method's parameters are wrong: every problem would fail alike). A refusal after
    that (one problem's prompt too long, say), a timeout or a malformed response is that problem's error."""
    todo = [(m, p) for m in methods for p in problems if (m.label, p["id"]) not in done]
    succeeded = {m.label: sum((m.label, p["id"]) in done for p in problems) for m in methods}
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(methods) * len(problems), initial=len(methods) * len(problems) - len(todo), unit="problem",
                       file=sys.stderr, dynamic_ncols=True, desc="tts bench")
        except ImportError:
            bar = None
    failed = 0
    limit = asyncio.Semaphore(max(1, concurrency))
    with (out / "records.jsonl").open("a", encoding="utf-8") as f:
        if f.tell() and not (out / "records.jsonl").read_bytes().endswith(b"\n"):
            f.write("\n")

        async def one(m: MethodSpec, p: Mapping[str, Any]) -> None:
            nonlocal failed
            async with limit:
                try:
                    r = await run_one(server, m, p, seed=seed, max_tokens=max_tokens, max_n=max_n, same=same, save_samples=save_samples,
                                      nonce=nonce)
                    succeeded[m.label] += 1
                except ServerError as exc:
                    if exc.status in (0, 404) or (exc.status in (400, 422) and not succeeded[m.label]):
                        raise ServerError(f"method {m.label!r}: {exc}", exc.status) from None
                    r = {"method": m.label, "id": p["id"], "error": str(exc)}
                    failed += 1
                if fingerprint is not None:
                    r["fp"] = fingerprint(m, p)
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            if "error" not in r:
                done[(m.label, str(p["id"]))] = r
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(m.label[:30])

        # method by method (the progress bar moves through the table), problems concurrently within a method
        try:
            for m in methods:
                await gather_all(one(m, p) for mm, p in todo if mm is m)
        finally:
            if bar is not None:
                bar.close()
    return failed


# --- statistics and reports --------------------------------------------------------------------------------


def summarize(methods: Sequence[MethodSpec], problems: Sequence[Mapping[str, Any]], records: Mapping[tuple[str, str], Mapping[str, Any]], *,
              baseline: str | None, resamples: int = 10_000, seed: int = 0, equal: Mapping[str, str] | None = None,
              equal_tokens: Mapping[str, str] | None = None, controls: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per method: accuracy with its Wilson interval, tokens, samples, pass@N, and paired comparisons (to its control
    at its own sampling settings, to the baseline, to majority at equal samples and at equal tokens), per difficulty.

    A comparison pairs the problems both methods finished: the accuracy difference with Newcombe's paired interval
    (right when discordant pairs are few or none), wins and losses, McNemar's exact p and its Holm adjustment over
    every comparison in the summary, and the ratio of mean tokens with a paired bootstrap interval."""
    ids = [str(p["id"]) for p in problems]
    diff_of = {str(p["id"]): p.get("difficulty") for p in problems}
    rows: list[dict[str, Any]] = []
    by_label = {m.label: m for m in methods}
    for m in methods:
        recs = [records[(m.label, i)] for i in ids if (m.label, i) in records]
        if not recs:
            continue
        right = sum(bool(r["correct"]) for r in recs)
        lo, hi = stats.wilson(right, len(recs))
        row: dict[str, Any] = {
            "method": m.label, "spec": m.spec, "name": m.name, "settings": m.settings, "params": m.params, "source": m.method.source,
            "problems": len(recs), "accuracy": right / len(recs), "ci95": [lo, hi], "right": right,
            "tokens_per_problem": sum(r["tokens"] for r in recs) / len(recs),
            "thinking_tokens_per_problem": sum(r["thinking_tokens"] for r in recs) / len(recs),
            "samples_per_problem": sum(r["samples"] for r in recs) / len(recs), "wall_s_per_problem": sum(r["wall_s"] for r in recs) / len(recs),
            "equal_budget_for": sorted(k for k, v in {**(equal or {}), **(equal_tokens or {})}.items() if v == m.label) or None,
            "control": (controls or {}).get(m.label),
        }
        row.update(m.method.summary(m, recs))  # pass@k, and what the method adds
        if any(r.get("early_exit") for r in recs):
            row["early_exits"] = sum(bool(r.get("early_exit")) for r in recs)
        groups = sorted({diff_of[r["id"]] for r in recs if diff_of.get(r["id"]) is not None}, key=str)
        if groups:
            row["by_difficulty"] = {str(g): {"problems": len(sub), "accuracy": sum(r["correct"] for r in sub) / len(sub),
                                             "tokens_per_problem": sum(r["tokens"] for r in sub) / len(sub)}
                                    for g in groups for sub in [[r for r in recs if diff_of[r["id"]] == g]]}
        rows.append(row)

    def paired(a_label: str, b_label: str) -> dict[str, Any] | None:
        common = [i for i in ids if (a_label, i) in records and (b_label, i) in records]
        if not common:
            return None
        a = [bool(records[(a_label, i)]["correct"]) for i in common]
        b = [bool(records[(b_label, i)]["correct"]) for i in common]
        d, lo, hi = stats.newcombe_paired(a, b)
        wins, losses = stats.discordant(a, b)
        ta = [float(records[(a_label, i)]["tokens"]) for i in common]
        tb = [float(records[(b_label, i)]["tokens"]) for i in common]
        ratio, rlo, rhi = stats.ratio_of_means(ta, tb, resamples, seed)
        return {"against": b_label, "problems": len(common), "difference": d, "ci95": [lo, hi], "mcnemar_p": stats.mcnemar(a, b),
                "wins": wins, "losses": losses, "token_ratio": None if math.isnan(ratio) else ratio,
                "token_ratio_ci95": None if math.isnan(ratio) else [rlo, rhi], "tokens": sum(ta) / len(ta), "against_tokens": sum(tb) / len(tb)}

    # one family: every comparison the summary reports, each pair computed and counted once (a method's control is
    # often its baseline and its equal-budget vote too)
    unique: dict[tuple[str, str], dict[str, Any] | None] = {}
    for row in rows:
        for key, against in (("vs_control", row["control"]), ("vs_baseline", by_label[row["method"]].vs or baseline),
                             ("vs_equal_samples", (equal or {}).get(row["method"])), ("vs_equal_tokens", (equal_tokens or {}).get(row["method"]))):
            if against and against != row["method"] and against in by_label:
                pair = (row["method"], against)
                if pair not in unique:
                    unique[pair] = paired(*pair)
                row[key] = unique[pair]
        if "vs_equal_samples" in row:
            row["vs_equal_budget"] = row["vs_equal_samples"]  # the name earlier summaries used
    found = [v for v in unique.values() if v]
    for v, p in zip(found, stats.holm([v["mcnemar_p"] for v in found])):
        v["holm_p"] = p
    return {"baseline": baseline, "problems": len(problems), "resamples": resamples, "comparisons": len(found), "methods": rows}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _delta(v: Mapping[str, Any] | None, against: bool = False) -> str:
    """``+2.0 (-1.5, 5.5) 7W/3L p=0.34`` (Newcombe's interval, wins and losses, Holm-adjusted p)."""
    if not v:
        return ""
    p = v.get("holm_p", v["mcnemar_p"])
    out = f"{_pct(v['difference'])} ({_pct(v['ci95'][0])}, {_pct(v['ci95'][1])}) {v['wins']}W/{v['losses']}L p={p:.2g}"
    return out + (f" vs {v['against']}" if against else "")


def _ratio(v: Mapping[str, Any] | None) -> str:
    if not v or v.get("token_ratio") is None:
        return ""
    lo, hi = v.get("token_ratio_ci95") or (float("nan"), float("nan"))
    return f"{v['token_ratio']:.2f} ({lo:.2f}, {hi:.2f})"


def markdown(summary: Mapping[str, Any]) -> str:
    base = summary.get("baseline")
    lines = [f"Accuracy with Wilson 95% intervals. Δ: accuracy difference in points with Newcombe's paired 95% interval, problems won and "
             f"lost, and McNemar's exact p Holm-adjusted over the {summary.get('comparisons', 0)} comparisons below. Tokens ×: the ratio "
             "of mean decode tokens with a paired bootstrap 95% interval. The control runs at the method's own temperature, top_p and "
             "sample count, on the same seeds (common random numbers).", "",
             f"| method | accuracy % (95% CI) | Δ vs its control | tokens × control | Δ vs {base or 'baseline'} | Δ vs majority, equal samples | "
             "Δ vs majority, equal tokens | tokens / problem | thinking tokens | samples | pass@k |",
             "| --- | ---: | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in summary["methods"]:
        c, v = r.get("vs_control"), r.get("vs_baseline")
        dv = _delta(v, v is not None and v["against"] != base) if v else "(baseline)" if r["method"] == base else ""
        pn = f"{_pct(r['pass_at_k']['value'])} (k={r['pass_at_k']['k']})" if "pass_at_k" in r else ""
        lines.append(f"| {r['method']} | {_pct(r['accuracy'])} ({_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}) | {_delta(c, True)} | {_ratio(c)} | "
                     f"{dv} | {_delta(r.get('vs_equal_samples'), True)} | {_delta(r.get('vs_equal_tokens'), True)} | "
                     f"{r['tokens_per_problem']:.0f} | {r['thinking_tokens_per_problem']:.0f} | {r['samples_per_problem']:.3g} | {pn} |")
    groups = sorted({g for r in summary["methods"] for g in r.get("by_difficulty", {})}, key=_difficulty_order)
    if groups:
        lines += ["", "Accuracy % by difficulty (problems):", "",
                  "| method | " + " | ".join(f"{g} ({summary['methods'][0].get('by_difficulty', {}).get(g, {}).get('problems', '')})"
                                             for g in groups) + " |",
                  "| --- |" + " ---: |" * len(groups)]
        for r in summary["methods"]:
            cells = [(_pct(r["by_difficulty"][g]["accuracy"]) if g in r.get("by_difficulty", {}) else "") for g in groups]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    extras = [r for r in summary["methods"] if "carbon_fitted_T_mean" in r]
    for r in extras:
        lines.append(f"\n{r['method']}: fitted temperature {r['carbon_fitted_T_mean']:.3f} on average, "
                     f"{r['carbon_bias_tokens_mean']:.1f} biased tokens per problem.")
    return "\n".join(lines) + "\n"


def _difficulty_order(g: str) -> tuple:
    order = {"easy": 0, "medium": 1, "hard": 2}
    return (order.get(g, 3), g)


def plot(summary: Mapping[str, Any], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("tts bench: matplotlib is not installed; no Pareto chart (pip install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["methods"]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in rows:
        lo, hi = r["ci95"]
        ax.errorbar(r["tokens_per_problem"], r["accuracy"], yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]], fmt="o", capsize=3, ms=5)
        ax.annotate(r["method"], (r["tokens_per_problem"], r["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["tokens_per_problem"], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    ax.plot([r["tokens_per_problem"] for r in front], [r["accuracy"] for r in front], "--", color="grey", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens per problem (log)")
    ax.set_ylabel("accuracy (95% bootstrap interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- command line ------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="measure methods on your server and data, with paired statistics",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_url(b)
    b.add_argument("--data", type=Path, help='JSONL: {"question", "answer", "id"?, "difficulty"?} per line')
    b.add_argument("--method", action="append", default=[], metavar="SPEC", help="a method SPEC (repeat); see --list")
    b.add_argument("-o", "--out", "--output", dest="out", type=Path,
                   help="output folder (records.jsonl, summary.json, report.md, pareto.png); resumes")
    b.add_argument("--baseline", default=None, help="the method label the others are compared with (default: the first method)")
    b.add_argument("--equal-budget", choices=("off", "samples", "tokens", "both"), default="off",
                   help="add majority votes at each method's mean samples (or tokens, or both) per problem, at the method's own "
                        "temperature and top_p, and compare")
    b.add_argument("--no-controls", action="store_true",
                   help="do not add each method's control (the same samples without the technique, at the method's own settings)")
    b.add_argument("--engine", choices=("auto", "vllm", "sglang"), default="auto")
    b.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    b.add_argument("--extract", default="auto", help=f"answer extractor: {', '.join(EXTRACTORS)} or module:function (text) -> str | None")
    b.add_argument("--grader", choices=("math-verify", "exact"), default="math-verify")
    b.add_argument("--max-tokens", type=int, default=1024, help="per sample, unless a spec sets max_tokens")
    b.add_argument("--max-n", type=int, default=16, help="samples per request")
    b.add_argument("--concurrency", type=int, default=16, help="problems (and requests) in flight at once")
    b.add_argument("--limit", type=int, default=None, help="only the first N problems")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--save-samples", action="store_true", help="keep every sample's text in records.jsonl (for premise measurements)")
    b.add_argument("--list", action="store_true", help="list the methods, their default settings and sources, and exit")
    return b


def list_methods(methods: Mapping[str, BenchMethod] | None = None) -> str:
    """Each method (default: every registered one) with its default settings and their source."""
    out = []
    for m in (default_methods() if methods is None else methods).values():
        d = ", ".join(f"{k}={v}" for k, v in m.defaults.items())
        out.append(f"{m.name}{f':<{m.positional}>' if m.positional else ''}  {m.help}\n    defaults: {d}\n    source: {m.source or '-'}")
    return "\n".join(out)


def _equal_budget(methods: Sequence[MethodSpec], summary_rows: Mapping[str, Mapping[str, Any]], mode: str,
                  controls: Mapping[str, str] | None = None) -> tuple[list[MethodSpec], dict[str, str]]:
    """For every method spending more than one sample's worth: the majority vote at its mean samples (or tokens) per
    problem, at the method's own temperature and top_p (majority's defaults for a greedy method). Tokens buy samples
    at the cost per sample of the method's control, else of majority or single samples at the same settings, else
    of all of them. Returns the votes to add (those not run already) and method -> vote label."""
    added: list[MethodSpec] = []
    mapping: dict[str, str] = {}
    have = {_key(m): m.label for m in methods}
    by_label = {m.label: m for m in methods}
    kinds = {**BUILTIN_METHODS, **{m.name: m.method for m in methods}}

    def prices(r: Mapping[str, Any]) -> bool:  # plain samples (BenchMethod.prices_samples), at least one a problem
        kind = kinds.get(r["name"])
        return kind is not None and kind.prices_samples and r["samples_per_problem"] > 0

    def per_sample(m: MethodSpec) -> float | None:
        c = summary_rows.get((controls or {}).get(m.label, ""))
        if c and c["samples_per_problem"] > 0:
            return c["tokens_per_problem"] / c["samples_per_problem"]
        t, p = m.settings.get("temperature"), m.settings.get("top_p", 1.0)
        rows = [r for label, r in summary_rows.items() if prices(r)
                and label in by_label and (by_label[label].settings.get("temperature"), by_label[label].settings.get("top_p", 1.0)) == (t, p)]
        rows = rows or [r for r in summary_rows.values() if prices(r)]
        return sum(r["tokens_per_problem"] / r["samples_per_problem"] for r in rows) / len(rows) if rows else None

    for m in methods:
        r = summary_rows.get(m.label)
        if r is None or m.name == "majority":  # the equal-budget vote is a majority: one is its own
            continue
        if mode == "samples":
            k = round(r["samples_per_problem"])
        else:
            cost = per_sample(m)
            if not cost:
                continue
            k = round(r["tokens_per_problem"] / cost)
        if k < 2:
            continue
        t = float(m.settings.get("temperature", 0.0))
        spec = f"majority:n={k}" + (f",temperature={t:g},top_p={float(m.settings.get('top_p', 1.0)):g}" if t > 0 else "")
        vote = parse_spec(spec, BUILTIN_METHODS)
        if _key(vote) not in have:
            added.append(vote)
            have[_key(vote)] = vote.label
        mapping[m.label] = have[_key(vote)]
    return added, mapping


async def bench(a: argparse.Namespace) -> int:
    known = registered()
    methods = [parse_spec(s, known) for s in a.method]
    labels = [m.label for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"two methods have the label {dup[0]!r}; give one of them label=...")
    baseline = a.baseline or labels[0]
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} is not one of the methods' labels: {', '.join(labels)}")
    for m in methods:
        if m.vs is not None and m.vs not in labels:
            raise ValueError(f"method {m.label!r}: vs={m.vs!r} is not one of the methods' labels: {', '.join(labels)}")
    for m in methods:
        m.method.check_run(m, concurrency=a.concurrency)
    problems = read_data(a.data, a.limit)
    a.out.mkdir(parents=True, exist_ok=True)
    same = aggregate.same_answer if a.grader == "math-verify" else (lambda x, y: x.strip() == y.strip())
    done = read_records(a.out / "records.jsonl")
    server = Server(server_url(a.base_url), engine=None if a.engine == "auto" else a.engine, model=a.model, concurrency=a.concurrency,
                    timeout=a.timeout, answer=extractor(a.extract), keep_special_tokens=True, explicit_sampling=True)
    t0 = time.perf_counter()
    async with server:
        print(f"tts bench: {len(problems)} problems x {len(methods)} methods on {server.engine} ({server.model}) at {server.base_url}",
              file=sys.stderr)
        def fingerprint(m: MethodSpec, p: Mapping[str, Any]) -> str:
            """What a record depends on: a record written under other settings, data or model is not reused."""
            what = [m.spec, m.settings, m.params, a.max_tokens, a.seed, server.model, a.extract, a.grader, p["prompt"], p["answer"]]
            return f"{zlib.crc32(json.dumps(what, sort_keys=True, default=str).encode()):08x}"

        # records written under other settings are done again (records without a fingerprint are kept)
        for key in [k for k, r in done.items() if "fp" in r]:
            m = next((x for x in methods if x.label == key[0]), None)
            p = next((x for x in problems if x["id"] == key[1]), None)
            if m is not None and p is not None and done[key]["fp"] != fingerprint(m, p):
                del done[key]
        nonce = f"{zlib.crc32(f'{time.time_ns()}:{os.getpid()}'.encode()):08x}"
        kw = dict(seed=a.seed, max_tokens=a.max_tokens, max_n=a.max_n, concurrency=a.concurrency, same=same, progress=not a.quiet, done=done,
                  save_samples=a.save_samples, fingerprint=fingerprint, nonce=nonce)
        controls: dict[str, str] = {}
        if not a.no_controls:
            extra, controls = add_controls(methods)
            methods = methods + extra
        failed = await run_methods(server, methods, problems, a.out, **kw)
        equal: dict[str, str] = {}
        equal_tokens: dict[str, str] = {}
        for mode in ("samples", "tokens") if a.equal_budget == "both" else () if a.equal_budget == "off" else (a.equal_budget,):
            first = summarize(methods, problems, done, baseline=baseline, resamples=10, seed=a.seed)
            extra, mapping = _equal_budget(methods, {r["method"]: r for r in first["methods"]}, mode, controls)
            (equal if mode == "samples" else equal_tokens).update(mapping)
            if extra:
                failed += await run_methods(server, extra, problems, a.out, **kw)
                methods = methods + extra
        engine, model = server.engine, server.model
    summary = summarize(methods, problems, done, baseline=baseline, resamples=a.resamples, seed=a.seed, equal=equal,
                        equal_tokens=equal_tokens, controls=controls)
    summary.update(engine=engine, model=model, data=str(a.data), seed=a.seed, max_tokens=a.max_tokens, grader=a.grader, extract=a.extract,
                   seconds=round(time.perf_counter() - t0, 1), failed=failed)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown(summary)
    (a.out / "report.md").write_text(f"# tts bench: {model} on {engine}, {len(problems)} problems from {a.data.name}\n\n" + table)
    plot(summary, a.out / "pareto.png", f"{model} ({engine}), {len(problems)} problems, seed {a.seed}")
    print(table, file=sys.stdout)
    print(f"tts bench: {a.out}/records.jsonl, summary.json, report.md, pareto.png ({summary['seconds']} s; {failed} failed)",
          file=sys.stderr)
    return 1 if failed else 0


def main(a: argparse.Namespace) -> int:
    if a.list:
        print(list_methods(registered()))
        return 0
    missing = [f for f, v in (("--data", a.data), ("--out", a.out), ("--method", a.method)) if not v]
    if missing:
        print(f"tts bench: error: {', '.join(missing)} required", file=sys.stderr)
        return 2
    status, failure = run_guarded("tts bench", a.out / "records.jsonl", lambda: bench(a))
    return status if failure is None else failure


__all__ = ["add_controls", "add_parser", "control_spec", "list_methods", "main", "markdown", "parse_spec", "read_data", "read_records",
           "run_one", "summarize"]
