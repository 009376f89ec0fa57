"""``tts``: run a test-time-scaling strategy over a JSONL of problems against a vLLM or SGLang server.

    tts run problems.jsonl -o results.jsonl --base-url http://127.0.0.1:8000 --strategy ladder
    tts bench --base-url http://127.0.0.1:8000 --data problems.jsonl --method greedy --method majority:n=8 --out bench/

``tts bench`` (:mod:`tts_plugins.client.bench`) compares methods with paired statistics.

Input lines are ``{"id": ..., "prompt": "...", "answer": ...}`` (``answer``
optional). Each result is written (and flushed) as soon as its problem is
done: the chosen answer, every sample, the tokens spent, and ``correct`` when
the problem has an answer. Running the same command again skips the ids
already in the output file, so an interrupted run loses nothing finished.
The summary (problems, samples, tokens, requests, early exits, accuracy) goes
to stderr and, with ``--summary FILE``, to a JSON file.

Exit status: 0 done, 1 some problems failed (their errors are in the output
as ``{"id", "error"}`` lines and are retried on resume), 2 bad input or the
server is unreachable or refuses the parameters, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tts_plugins.client import bench
from tts_plugins.client.aggregate import registered
from tts_plugins.client.runs import InputError, add_base_url, finished_ids, gather_all, iter_jsonl, run_guarded, server_url
from tts_plugins.client.server import EXTRACTORS, Server, ServerError, extractor
from tts_plugins.client.strategies import DEFAULT_LADDER, STRATEGIES, VOTES, Options, reward_fn, run_problem


def read_problems(path: Path) -> list[dict[str, Any]]:
    problems, seen = [], set()
    for no, line, p in iter_jsonl(path):
        if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not p["prompt"]:
            raise InputError(f'{path}:{no}: expected an object with a non-empty string "prompt", got {line[:120]!r}')
        pid = p.get("id", no)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InputError(f'{path}:{no}: "id" must be a string or an int, got {pid!r}')
        if str(pid) in seen:
            raise InputError(f"{path}:{no}: duplicate id {pid!r}")
        seen.add(str(pid))
        problems.append({**p, "id": pid})
    return problems


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")  # argparse names --top-p before it
    return value


def _params(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--params must be a JSON object of tts_* keys: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--params must be a JSON object of tts_* keys, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tts", description="Test-time-scaling strategies against a vLLM or SGLang OpenAI-compatible server.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a strategy over a JSONL of problems")
    r.add_argument("problems", type=Path, help='JSONL: {"id", "prompt", "answer"?} per line')
    r.add_argument("-o", "--output", "--out", dest="output", type=Path, required=True, help="JSONL results, appended as problems finish (resumes)")
    add_base_url(r)
    r.add_argument("--engine", choices=["auto", "vllm", "sglang"], default="auto")
    r.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    r.add_argument("--strategy", choices=STRATEGIES, default="self-consistency")
    r.add_argument("-n", "--samples", type=int, default=8, help="samples per problem (carbon: n1 + n2; ladder: per wave, see --waves)")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling's top-p, in (0, 1] (default 1: off)")
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--max-n", type=int, default=16, help="samples per request")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--vote", default=None,
                   help=f"{', '.join(VOTES)} or a registered aggregator. short_m_at_k: all samples vote, ties to the shortest; "
                        "confidence_vote: each sample weighs the DeepConf report's lowest group confidence when the server sends one "
                        "(--params with tts_conf_* keys), else the exponentiated mean token log-prob (the confidence reward)")
    r.add_argument("--m", type=int, default=1, help="short-m@k's m")
    r.add_argument("--reward", default=None, help="agreement, confidence, a registered reward, or module:function (prompt, completion) -> float")
    r.add_argument("--extract", default="auto", help=f"answer extractor: {', '.join(EXTRACTORS)} or module:function (text) -> str | None")
    r.add_argument("--params", type=_params, default={}, help='extra tts_* keys for every request, as JSON, e.g. \'{"tts_think_max": 128}\'')
    r.add_argument("--ladder", type=_float_list, default=list(DEFAULT_LADDER), help="temperatures, comma-separated (default 0.0..1.2 step 0.1)")
    r.add_argument("--waves", type=int, default=4, help="ladder: at most this many waves of one sample per rung")
    r.add_argument("--min-waves", type=int, default=1, help="ladder: waves before the early-exit test")
    r.add_argument("--ahead", type=int, default=2, help="ladder: waves in flight at once")
    r.add_argument("--ladder-mode", choices=["engine", "fan-out"], default="engine",
                   help="engine: one request per wave with tts_temperature_ladder; fan-out: one per rung")
    r.add_argument("--tau-intra", type=float, default=0.8)
    r.add_argument("--tau-cross", type=float, default=1.0)
    r.add_argument("--n1", type=int, default=None, help="carbon: explore samples (default n // 2)")
    r.add_argument("--keep", type=int, default=None, help="carbon: explore samples the fit keeps (default ceil(n1 / 2))")
    r.add_argument("--l2", type=float, default=1e-2, help="carbon: L2 penalty on the bias")
    r.add_argument("--deepconf", choices=["low", "high"], default="low",
                   help="deepconf: low keeps the top 10%% of the warmup's confidence (threshold at its 90th percentile), high the top 90%%")
    r.add_argument("--warmup", type=int, default=16, help="deepconf: warmup traces (the threshold's sample); -n is the budget")
    r.add_argument("--tau", type=float, default=0.95, help="deepconf: stop drawing once the weighted vote's consensus reaches this")
    r.add_argument("--no-adaptive", action="store_true", help="deepconf: draw the whole budget (no stop at consensus)")
    r.add_argument("--window", type=int, default=2048, help="deepconf: the group confidence's window (tokens)")
    r.add_argument("--conf-topk", type=int, default=20, help="deepconf: top-k log-probs of a token's confidence")
    r.add_argument("--top-logprobs", type=int, default=20)
    r.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    r.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON here")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    from tts_plugins.client import plugins, serve

    bench.add_parser(sub)
    plugins.add_parser(sub)
    serve.add_parser(sub)
    return ap


def options(a: argparse.Namespace) -> Options:
    o = Options(strategy=a.strategy, n=a.samples, temperature=a.temperature, max_tokens=a.max_tokens, max_n=a.max_n, seed=a.seed, vote=a.vote,
                m=a.m, reward=a.reward, top_logprobs=a.top_logprobs, params=a.params, ladder=tuple(a.ladder), waves=a.waves, min_waves=a.min_waves,
                ahead=a.ahead, ladder_mode=a.ladder_mode, tau_intra=a.tau_intra, tau_cross=a.tau_cross, n1=a.n1, keep=a.keep, l2=a.l2,
                deepconf=a.deepconf, warmup=a.warmup, tau=a.tau, adaptive=not a.no_adaptive, window=a.window, conf_topk=a.conf_topk,
                top_p=a.top_p)
    o.check()
    bad = [k for k in o.params if not str(k).startswith("tts_")]
    if bad:
        raise InputError(f"--params keys must start with tts_, got {bad[0]!r}")
    return o


class Summary:
    def __init__(self) -> None:
        self.problems = self.samples = self.tokens = self.requests = self.early_exits = self.waves_cancelled = 0
        self.graded = self.correct = self.failed = self.skipped = 0
        self.start = time.monotonic()

    def add(self, r: dict[str, Any]) -> None:
        if "error" in r:
            self.failed += 1
            return
        self.problems += 1
        self.samples += r["n_samples"]
        self.tokens += r["tokens"]
        self.requests += r["requests"]
        self.early_exits += bool(r.get("early_exit"))
        self.waves_cancelled += int(r.get("waves_cancelled", 0))
        if "correct" in r:
            self.graded += 1
            self.correct += bool(r["correct"])

    def as_dict(self) -> dict[str, Any]:
        out = {"problems": self.problems, "failed": self.failed, "skipped_done": self.skipped, "samples": self.samples, "tokens": self.tokens,
               "requests": self.requests, "early_exits": self.early_exits, "waves_cancelled": self.waves_cancelled,
               "seconds": round(time.monotonic() - self.start, 2)}
        if self.graded:
            out.update(graded=self.graded, correct=self.correct, accuracy=self.correct / self.graded)
        return out


async def run(a: argparse.Namespace) -> tuple[Summary, int]:
    o = options(a)
    problems = read_problems(a.problems)
    done = finished_ids(a.output)
    todo = [p for p in problems if str(p["id"]) not in done]
    summary = Summary()
    summary.skipped = len(problems) - len(todo)
    aggregators, rewards = registered()
    if o.vote and o.vote not in VOTES and o.vote not in aggregators:
        plugins = ", ".join(sorted(set(aggregators) - set(VOTES))) or "none"
        raise InputError(f"unknown --vote {o.vote!r}; expected {', '.join(VOTES)} or a registered aggregator ({plugins})")
    if o.reward:
        reward_fn(o.reward, rewards)  # fail before any request if it does not load
    server = Server(server_url(a.base_url), engine=None if a.engine == "auto" else a.engine, model=a.model, concurrency=a.concurrency,
                    timeout=a.timeout, answer=extractor(a.extract))
    bar = None
    if not a.quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(problems), initial=summary.skipped, unit="problem", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None
    status = 0
    a.output.parent.mkdir(parents=True, exist_ok=True)
    async with server:
        with a.output.open("a", encoding="utf-8") as out:
            if a.output.stat().st_size and not a.output.read_bytes().endswith(b"\n"):
                out.write("\n")  # an interrupted run left half a line: start on a fresh one
            async def one(p: dict[str, Any]) -> None:
                nonlocal status
                try:
                    r = await run_problem(server, p, o, aggregators, rewards)
                except ServerError as exc:
                    if exc.status in (0, 400, 404, 422):  # unreachable, or the parameters are refused: every problem would fail alike
                        raise
                    r, status = {"id": p["id"], "error": str(exc)}, 1
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
                out.flush()
                summary.add(r)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tokens=summary.tokens, acc=f"{summary.correct}/{summary.graded}" if summary.graded else "-")

            # problems run concurrently; the server's semaphore bounds the requests in flight
            limit = asyncio.Semaphore(max(1, a.concurrency))

            async def bounded(p: dict[str, Any]) -> None:
                async with limit:
                    await one(p)

            try:
                await gather_all(bounded(p) for p in todo)
            finally:
                if bar is not None:
                    bar.close()
    return summary, status


def report(summary: Summary, a: argparse.Namespace) -> None:
    s = summary.as_dict()
    line = (f"tts: {s['problems']} problems ({s['skipped_done']} already done, {s['failed']} failed), {s['samples']} samples, "
            f"{s['tokens']} tokens, {s['requests']} requests, {s['early_exits']} early exits "
            f"({s['waves_cancelled']} waves cancelled), {s['seconds']} s")
    if "accuracy" in s:
        line += f", accuracy {s['correct']}/{s['graded']} = {s['accuracy']:.3f}"
    print(line, file=sys.stderr)
    if a.summary:
        a.summary.write_text(json.dumps(s, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.command == "bench":
        return bench.main(a)
    if a.command == "serve":
        from tts_plugins.client import serve

        return serve.main(a)
    if a.command == "plugins":
        from tts_plugins.client import plugins

        return plugins.main(a)
    result, failure = run_guarded("tts", a.output, lambda: run(a))
    if failure is not None:
        return failure
    summary, status = result
    report(summary, a)
    return status


if __name__ == "__main__":
    sys.exit(main())
