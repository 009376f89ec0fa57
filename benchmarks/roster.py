"""Step cost of a RoE roster of K = 4 relative to one plain request, in a real engine on the tiny Qwen3-MoE.

Configurations, interleaved repetition by repetition inside one engine (greedy, fixed length, EOS ignored, so
each decodes the same number of steps):

* ``plain-1``: one plain request (the reference);
* ``noisy-1``: one request with routing noise (``tts_roe_tau`` 1.0);
* ``plain-4``: four plain requests of the same prompt (what K samples cost without a roster);
* ``roster-4``: a roster of four (taus 0, 1, 1, 1): four routed forwards and the aggregation per token.

Reported: median milliseconds per decode step (wall time / tokens of one sequence) and the ratios to ``plain-1``
and ``plain-4``. A roster spends K forwards per token by design; the number to watch is ``roster-4 / plain-4``
(the aggregation, the noise and the gate on top of batching K requests).

    python benchmarks/roster.py --engine vllm --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROSTER = [{"tts_roe_roster": "bench", "tts_roe_roster_size": 4, **({"tts_roe_tau": 1.0} if i else {})} for i in range(4)]
CONFIGS = {"plain-1": [{}], "noisy-1": [{"tts_roe_tau": 1.0}], "plain-4": [{}] * 4, "roster-4": ROSTER}
PROMPT = "the cat sat on a mat and then it ran to see what was in the big red box " * 2


def _params(name: str, run: int) -> list[dict]:
    # a fresh roster name per run, so no run waits on another's members
    return [{**p, "tts_roe_roster": f"bench-{run}"} if "tts_roe_roster" in p else dict(p) for p in CONFIGS[name]]


def _vllm_worker(model: str, tokens: int, reps: int, out_q) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8, seed=0)
    prompt = {"prompt_token_ids": llm.get_tokenizer().encode(PROMPT)}
    counter = iter(range(10**9))

    def run(name):
        params = _params(name, next(counter))
        sps = [SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, seed=i, extra_args=p or None)
               for i, p in enumerate(params)]
        t0 = time.perf_counter()
        outs = llm.generate([prompt] * len(sps), sps, use_tqdm=False)
        dt = time.perf_counter() - t0
        if name == "roster-4":
            assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1, "the roster's members diverged"
        return dt / tokens * 1e3

    _loop(run, reps, out_q)
    llm.llm_engine.engine_core.shutdown()


def _sglang_worker(model: str, tokens: int, reps: int, out_q) -> None:
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    stubs = Path(__file__).resolve().parent.parent / "tests" / "stubs"
    sys.path.insert(0, str(stubs))
    os.environ["PYTHONPATH"] = f"{stubs}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    import sglang as sgl
    from transformers import AutoTokenizer

    eng = sgl.Engine(model_path=model, device="cpu", attention_backend="torch_native", dtype="float32", random_seed=0,
                     mem_fraction_static=0.5, max_running_requests=8, max_total_tokens=131072)
    ids = AutoTokenizer.from_pretrained(model).encode(PROMPT)
    counter = iter(range(10**9))

    def run(name):
        sps = []
        for i, p in enumerate(_params(name, next(counter))):
            sp = {"temperature": 0, "max_new_tokens": tokens, "min_new_tokens": tokens, "ignore_eos": True, "sampling_seed": i}
            if p:
                sp["custom_params"] = p
            sps.append(sp)
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=[ids] * len(sps), sampling_params=sps)
        dt = time.perf_counter() - t0
        if name == "roster-4":
            assert len({tuple(o["output_ids"]) for o in outs}) == 1, "the roster's members diverged"
        return dt / tokens * 1e3

    _loop(run, reps, out_q)
    eng.shutdown()


def _loop(run, reps: int, out_q) -> None:
    for name in CONFIGS:  # warm-up
        run(name)
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(reps):
        for c in CONFIGS:
            times[c].append(run(c))
    out_q.put(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repetitions of 32 tokens")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.tokens = 3, 32
    from tts_plugins.models.tiny import build_tiny_model

    model = str(build_tiny_model(Path(tempfile.gettempdir()) / "tts-plugins-tiny" / "moe", "moe"))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_vllm_worker if args.engine == "vllm" else _sglang_worker, args=(model, args.tokens, args.reps, q))
    p.start()
    times = q.get(timeout=1800)
    p.join(timeout=120)
    med = {c: statistics.median(v) for c, v in times.items()}
    results = [{"engine": args.engine, "case": c, "ms_per_step": med[c], "spread_ms": max(v) - min(v), "ratio_to_plain_1": med[c] / med["plain-1"],
                "ratio_to_plain_4": med[c] / med["plain-4"], "tokens": args.tokens, "reps": args.reps} for c, v in times.items()]
    print(f"\n[{args.engine}] tiny Qwen3-MoE, {args.tokens} tokens, {args.reps} repetitions")
    print(f"{'case':<10} {'ms/step':>8} {'spread':>8} {'vs plain-1':>10} {'vs plain-4':>10}")
    for r in results:
        print(f"{r['case']:<10} {r['ms_per_step']:8.2f} {r['spread_ms']:8.2f} {r['ratio_to_plain_1']:10.2f} {r['ratio_to_plain_4']:10.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
