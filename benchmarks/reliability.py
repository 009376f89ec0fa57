"""Full-size reliability run against one real server: fuzzed parameters, concurrent load, soak, aborts.

Starts the engine's OpenAI-compatible server on 127.0.0.1 (tiny dense model,
the deliberately faulty third-party plugin installed by entry point, debug
counters on), then prints the figures: parameter sets tried, 4xx, accepted,
crashes; requests sent, complete, lost, compared with the same request alone,
mismatches; soak requests, errors, peak and leftover per-request state. Run it
in the engine's own environment (each engine pins its own torch):

    .venv/vllm/bin/python benchmarks/reliability.py --engine vllm --json vllm.json
    .venv/sglang/bin/python benchmarks/reliability.py --engine sglang --json sglang.json

CI runs the same checks at smaller sizes (``tests/engine/test_reliability.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "engine")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    ap.add_argument("--fuzz", type=int, default=1000)
    ap.add_argument("--load", type=int, default=200)
    ap.add_argument("--soak", type=int, default=3000)
    ap.add_argument("--aborts", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="200 fuzzed sets, 200 concurrent (50 compared), 500 soak, 24 aborts")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    compare = args.load
    if args.quick:
        args.fuzz, args.soak, args.aborts, compare = 200, 500, 24, 50

    from hypothesis import HealthCheck, given, settings
    from transformers import AutoTokenizer

    import reliability as rel
    from harness import Server
    from models import tiny_model

    model = tiny_model("dense")
    tok = AutoTokenizer.from_pretrained(str(model))
    prefix = os.path.join(tempfile.mkdtemp(prefix="tts-debug-"), "counts")
    env = rel.server_env(prefix)
    extra_args: tuple[str, ...] = ()
    if args.engine == "sglang":
        from sglang_harness import sglang_env

        base = sglang_env()
        env = {**base, **env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{base['PYTHONPATH']}"}
        extra_args = ("--mem-fraction-static", "0.5", "--max-running-requests", "16", "--max-total-tokens", "131072")
    srv = Server(args.engine, model, args=extra_args, env=env)
    out: dict = {"engine": args.engine, "server_start_s": srv.start_seconds}
    try:
        registry = rel.oracle()
        fuzz = rel.FuzzReport()
        crashed: list[int] = []

        @settings(max_examples=args.fuzz, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(rel.param_sets())
        def one(case):
            rel.fuzz_once(srv, registry, *case, fuzz)
            if fuzz.tried % 50 == 0 and not rel.check_serving(srv):
                crashed.append(fuzz.tried)

        t0 = time.perf_counter()
        one()
        fuzz.crashes = len(crashed) + (not srv.alive())
        out["fuzz"] = {**asdict(fuzz), "failures": fuzz.failures[:20], "n_failures": len(fuzz.failures), "seconds": time.perf_counter() - t0}
        print(f"[{args.engine}] fuzz: tried {fuzz.tried}, 4xx {fuzz.rejected} ({fuzz.engine_rejected} by the engine's own checks), "
              f"accepted {fuzz.accepted}, wrong verdicts {len(fuzz.failures)}, crashes {fuzz.crashes}", flush=True)

        load = rel.run_load(srv, tok, n=args.load, compare=compare, prefix=prefix)
        load_after = rel.live(rel.settle_counts(srv, prefix, tok))
        out["load"] = {**asdict(load), "mismatches": load.mismatches[:20], "n_mismatches": len(load.mismatches), "leftover": load_after}
        print(f"[{args.engine}] load: sent {load.sent} at once, complete {load.complete}, lost {load.lost}, compared alone {load.compared}, "
              f"mismatches {len(load.mismatches)}, {load.seconds:.1f}s, leftover state {load_after or 'none'}", flush=True)

        soak = rel.run_soak(srv, tok, n=args.soak, prefix=prefix,
                            on_progress=lambda d: print(f"  soak {d}/{args.soak}", flush=True) if d % 1000 == 0 else None)
        out["soak"] = asdict(soak)
        print(f"[{args.engine}] soak: {soak.sent} requests, {soak.errors} errors, {soak.seconds:.1f}s, "
              f"peak {rel.live(soak.peak)}, leftover {rel.live(soak.after) or 'none'}", flush=True)

        started = rel.run_aborts(srv, tok, n=args.aborts)
        time.sleep(3)
        abort_after = rel.live(rel.settle_counts(srv, prefix, tok))
        out["aborts"] = {"started": started, "leftover": abort_after}
        print(f"[{args.engine}] aborts: {started} streams dropped mid-way, leftover {abort_after or 'none'}", flush=True)
        out["alive"] = srv.alive() and rel.check_serving(srv)
        out["failure_counts"] = {k: v for k, v in rel.settle_counts(srv, prefix, tok).items() if k.endswith("failures")}
        print(f"[{args.engine}] server alive at the end: {out['alive']}; technique failures isolated: {out['failure_counts']}")
    finally:
        srv.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    ok = (not out["fuzz"]["n_failures"] and not out["fuzz"]["crashes"] and out["load"]["lost"] == 0 and not out["load"]["n_mismatches"]
          and not out["load"]["leftover"] and not rel.live(out["soak"]["after"]) and not out["aborts"]["leftover"] and out["alive"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
