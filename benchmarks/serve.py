"""``tts serve`` against direct: majority@k, short-1@k and DeepConf through the gateway and straight against the same
upstream, on the trained reasoner's problems, with tokens and wall time per strategy.

Give it a running vLLM or SGLang server (with tts-plugins installed) of the trained reasoner (or any model; the
problems are :mod:`tts_plugins.models.arith`'s, graded by their answer line). It starts the gateway in this process
(``tts serve --upstream URL`` on a free port) and runs each strategy twice over the same problems:

* gateway: the stock ``openai`` client, ``model="NAME@SPEC"``, one call per problem;
* direct: the method's own :meth:`~tts_plugins.client.methods.BenchMethod.run` against the upstream, as
  ``tts bench`` runs it.

Both draw the same samples: the gateway seeds a call from its ``seed`` alone (problem id ``serve``), and the direct
run uses the same id and seed, so tokens should agree and wall time shows what the gateway adds. The routes take
turns (``--first``), because the second run of a strategy finds the prompts in the engine's prefix cache.

    .venv/vllm/bin/python benchmarks/serve.py --base-url http://127.0.0.1:8000 --problems 100 --out bench-results/serve.json

It prints a markdown table (the "Measured" table of docs/serve.md) and, with ``--out``, writes every number as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

EXTRACT = "tts_plugins.models.arith:extract_answer"


def default_specs(k: int, deepconf_n: int, window: int) -> list[str]:
    """majority@k against the two strategies whose stops run in the engine (short-1@k's group stop, DeepConf's)."""
    return [f"majority:n={k}", f"short-m:m=1,k={k}", f"deepconf:{deepconf_n},variant=high,window={window}"]


class Gateway:
    """``tts serve`` under uvicorn in a thread, on a free port (or ``port``)."""

    def __init__(self, upstream: str, *, port: int, max_samples: int, concurrency: int, max_tokens: int, timeout: float) -> None:
        import uvicorn

        from tts_plugins.client.serve import Config, build_app

        config = Config(upstreams=[upstream], max_samples=max_samples, max_concurrency=concurrency, max_tokens=max_tokens, extract=EXTRACT,
                        timeout=timeout)
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(config), log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the gateway did not start on {self.url}")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _row(spec: str, route: str, results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    n = max(1, len(ok))
    return {"strategy": spec, "route": route, "problems": len(results), "errors": len(results) - len(ok),
            "accuracy": sum(r["correct"] for r in ok) / n, "completion_tokens": sum(r["tokens"] for r in ok),
            "tokens_per_problem": sum(r["tokens"] for r in ok) / n, "samples_per_problem": sum(r["samples"] for r in ok) / n,
            "stopped_per_problem": sum(r["stopped"] for r in ok) / n, "wall_s": round(wall, 3),
            "s_per_problem": round(wall / max(1, len(results)), 4),
            "first_error": next((r["error"] for r in results if "error" in r), None)}


async def through_gateway(url: str, model: str, spec: str, problems: list[dict], *, seed: int, max_tokens: int, concurrency: int,
                          timeout: float) -> tuple[list[dict[str, Any]], float]:
    import openai

    from tts_plugins.client.aggregate import same_answer

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    limit = asyncio.Semaphore(concurrency)

    async def one(p: dict) -> dict[str, Any]:
        async with limit:
            try:
                r = await client.chat.completions.create(model=f"{model}@{spec}", messages=[{"role": "user", "content": p["prompt"]}],
                                                         max_tokens=max_tokens, seed=seed)
            except openai.APIError as exc:
                return {"id": p["id"], "error": str(exc)}
        tts = r.model_extra["tts"]
        answer = tts["answer"]
        return {"id": p["id"], "answer": answer, "correct": answer is not None and same_answer(str(answer), str(p["answer"])),
                "tokens": r.usage.completion_tokens, "samples": len(tts["samples"]), "stopped": tts["stopped"]}

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(p) for p in problems))
    finally:
        await client.close()
    return list(results), time.perf_counter() - t0


async def direct(base: str, model: str, spec: str, problems: list[dict], *, seed: int, max_tokens: int, max_n: int, concurrency: int,
                 timeout: float) -> tuple[list[dict[str, Any]], float]:
    from tts_plugins.client.aggregate import same_answer
    from tts_plugins.client.methods import RunContext, parse_method
    from tts_plugins.client.serve import PROBLEM_ID, engine_stopped
    from tts_plugins.client.server import Server, extractor
    from tts_plugins.client.strategies import sample_seed

    drawn_by_call: dict[str, list] = {}

    class Recording(Server):
        """Keeps every sample it draws, with whether its request was in an in-engine group (as the gateway does)."""

        async def sample(self, prompt: str, **kw: Any) -> list:
            out = await super().sample(prompt, **kw)
            drawn_by_call.setdefault(self._call, []).extend((s, "tts_group" in (kw.get("params") or {})) for s in out)
            return out

    _, m = parse_method(spec)
    # the gateway's samples: explicit sampling, the same problem id and seed
    server = Recording(base, model=model, concurrency=concurrency * max_n, timeout=timeout, answer=extractor(EXTRACT), explicit_sampling=True)
    limit = asyncio.Semaphore(concurrency)

    async def one(p: dict) -> dict[str, Any]:
        async with limit:
            call = uuid.uuid4().hex
            ctx = RunContext(seed=seed, first_seed=sample_seed(seed, PROBLEM_ID), max_tokens=int(m.settings.get("max_tokens", max_tokens)),
                             max_n=max_n, group=f"bench-serve-{call}")
            mine = Recording(server.base_url, engine=server.engine, model=server.model, timeout=timeout, answer=server.answer,
                             explicit_sampling=True)
            mine._client, mine._slots, mine._call = server._client, server._slots, call
            try:
                outcome = await m.method.run(mine, m, {"id": PROBLEM_ID, "prompt": p["prompt"]}, ctx)
            except Exception as exc:  # one problem's failure is its row's error, as in tts bench
                return {"id": p["id"], "error": f"{type(exc).__name__}: {exc}"}
        drawn = drawn_by_call.pop(call, [])
        answer = outcome.answer
        return {"id": p["id"], "answer": answer, "correct": answer is not None and same_answer(str(answer), str(p["answer"])),
                "tokens": sum(s.tokens for s, _ in drawn), "samples": len(drawn), "stopped": sum(engine_stopped(s, g) for s, g in drawn)}

    async with server:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in problems))
        return list(results), time.perf_counter() - t0


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| strategy | route | problems | accuracy | completion tokens / problem | samples / problem | stopped / problem | wall s | "
           "gateway / direct wall |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    direct_wall = {r["strategy"]: r["wall_s"] for r in rows if r["route"] == "direct"}
    for r in rows:
        ratio = f"{r['wall_s'] / direct_wall[r['strategy']]:.2f}" if r["route"] == "gateway" and direct_wall.get(r["strategy"]) else ""
        err = f" ({r['errors']} failed)" if r["errors"] else ""
        out.append(f"| {r['strategy']} | {r['route']} | {r['problems']}{err} | {r['accuracy']:.3f} | {r['tokens_per_problem']:.1f} | "
                   f"{r['samples_per_problem']:.2f} | {r['stopped_per_problem']:.2f} | {r['wall_s']:.2f} | {ratio} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="The upstream must be running; this script starts only the gateway.")
    ap.add_argument("--base-url", required=True, help="the upstream vLLM or SGLang server (with tts-plugins), e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="the model name (default: the first the upstream lists)")
    ap.add_argument("--problems", type=int, default=100, help="problems (default 100)")
    ap.add_argument("--data-seed", type=int, default=-1, help="which problems: -1 is the held-out set (as benchmarks/accuracy.py draws them)")
    ap.add_argument("--k", type=int, default=8, help="samples of majority and short-1 (default 8)")
    ap.add_argument("--deepconf-n", type=int, default=32, help="DeepConf's budget (default 32; warmup 16)")
    ap.add_argument("--window", type=int, default=16, help="DeepConf's window, scaled to the reasoner's short traces (default 16; the paper: 2048)")
    ap.add_argument("--spec", action="append", default=None, metavar="SPEC", help="strategies to run instead of the defaults (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--max-n", type=int, default=16, help="samples per upstream request (the gateway's --max-n)")
    ap.add_argument("--concurrency", type=int, default=16, help="calls (problems) in flight, both routes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", choices=("gateway", "direct", "alternate"), default="alternate",
                    help="which route of a strategy runs first (the second finds its prompts cached); alternate: by turns")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--port", type=int, default=0, help="the gateway's port (default: a free one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows and the run's settings as JSON here")
    a = ap.parse_args(argv)

    import httpx

    from tts_plugins.client.serve import base_url
    from tts_plugins.models import arith

    base = base_url(a.base_url)
    model = a.model
    if model is None:
        try:
            model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            print(f"benchmarks/serve.py: cannot list the models of {base} ({exc}); is the server running?", file=sys.stderr)
            return 2
    problems = [p.to_json(f"h{i}") for i, p in enumerate(arith.problems(a.problems, seed=a.data_seed, steps=None))]
    specs = a.spec or default_specs(a.k, a.deepconf_n, a.window)
    from tts_plugins.client.methods import parse_method

    parsed = [parse_method(s)[1] for s in specs]
    max_samples = max(m.method.sample_count(m.settings) for m in parsed)
    gw = Gateway(base, port=a.port, max_samples=max(64, max_samples), concurrency=a.concurrency, max_tokens=a.max_tokens, timeout=a.timeout)
    rows: list[dict[str, Any]] = []
    kw = dict(seed=a.seed, max_tokens=a.max_tokens, concurrency=a.concurrency, timeout=a.timeout)
    try:
        # untimed: the first call of each route pays for imports, connections and the engine's warm-up
        asyncio.run(through_gateway(gw.url, model, specs[0], problems[:1], **kw))
        asyncio.run(direct(base, model, specs[0], problems[:1], max_n=a.max_n, **kw))
        for i, spec in enumerate(specs):
            order = ["gateway", "direct"]
            if a.first == "direct" or (a.first == "alternate" and i % 2 == 1):
                order.reverse()
            got = {}
            for route in order:
                if route == "gateway":
                    results, wall = asyncio.run(through_gateway(gw.url, model, spec, problems, **kw))
                else:
                    results, wall = asyncio.run(direct(base, model, spec, problems, max_n=a.max_n, **kw))
                got[route] = _row(spec, route, results, wall)
                print(f"{spec} {route}: {got[route]['wall_s']} s, {got[route]['tokens_per_problem']:.1f} tokens/problem", file=sys.stderr, flush=True)
            rows += [got["gateway"], got["direct"]]
    finally:
        gw.close()
    print(table(rows))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        a.out.write_text(json.dumps({"settings": {**settings, "model": model, "specs": specs}, "machine": platform.platform(), "rows": rows},
                                    indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
