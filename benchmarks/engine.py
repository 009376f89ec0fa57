"""Decode throughput of a real engine with the plugins: ratios to the same engine with them disabled.

Runs the engine offline on the tiny dense model, its vocabulary padded to
Qwen's 151,936 (``--vocab``), with a batch of requests
(greedy by default, ``--temperature`` to sample; fixed length, EOS ignored so every configuration decodes the
same number of tokens) in these configurations:

* ``disabled``: the package installed but switched off (``TTS_PLUGINS_DISABLE=1``);
  the closest to "without the package" one engine process can be.
* ``unused``: enabled, no request opted in. Target >= 0.98x disabled.
* one configuration per technique with every request opted in (think cap,
  think minimum, trim, group, CarBoN, DeepConf's confidence, Mixture of Inputs). Target >= 0.90x disabled.

``disabled`` needs its own engine process (the switch is read at start), so
the two engines run one after the other; inside the enabled engine the
configurations are interleaved, repetition by repetition. Reported: median
tokens per second, spread, and the ratio to ``disabled``.

    python benchmarks/engine.py --engine vllm --quick --json out.json
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

CONFIGS = {
    "unused": {},
    "think-cap": {"tts_think_max": 8},
    "think-min": {"tts_think_min": 10**6},
    "trim": {"tts_trim": True},
    "group": {"tts_group": "bench", "tts_group_stop_after": 10**5},
    "carbon": {"tts_carbon_temperature": 0.7, "tts_carbon_bias_ids": list(range(16)), "tts_carbon_bias_values": [0.5] * 16},
    "conf": {"tts_conf_window": 16},  # DeepConf: measured every step (no threshold, so every trace runs to the end)
    "moi": {"tts_moi_beta": 1.0},  # Mixture of Inputs: a model patch, not a logits technique
    # the logits techniques of the hot-path targets on every request at once (the think minimum gates, trim watches,
    # the group counts, CarBoN tempers); DeepConf's per-step log-softmax is measured on its own ("conf")
    "all-logits": {"tts_think_min": 10**6, "tts_trim": True, "tts_group": "bench-all", "tts_group_stop_after": 10**5,
                   "tts_carbon_temperature": 0.7, "tts_carbon_bias_ids": list(range(16)), "tts_carbon_bias_values": [0.5] * 16},
}
TARGETS = {"unused": 0.98}


def _prompts(tok, n):
    qs = [f"What is {a} + {b} * {c}?" for a, b, c in zip(range(11, 11 + n), range(3, 3 + n), range(2, 2 + n))]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False) for q in qs]


def _vllm_worker(model: str, disabled: bool, configs: list[str], batch: int, tokens: int, reps: int, temperature: float, out_q) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
    if disabled:
        os.environ["TTS_PLUGINS_DISABLE"] = "1"
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=batch, seed=0)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": p} for p in _prompts(tok, batch)]

    def run(name):
        params = CONFIGS[name]
        sps = [SamplingParams(temperature=temperature, seed=i, max_tokens=tokens, min_tokens=tokens, ignore_eos=True,
                              extra_args=dict(params) or None) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        dt = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / dt

    run(configs[0])  # warm-up
    times = {c: [] for c in configs}
    for _ in range(reps):
        for c in configs:
            times[c].append(run(c))
    out_q.put(times)
    llm.llm_engine.engine_core.shutdown()


def _sglang_worker(model: str, disabled: bool, configs: list[str], batch: int, tokens: int, reps: int, temperature: float, out_q) -> None:
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    if disabled:
        os.environ["TTS_PLUGINS_DISABLE"] = "1"
    stubs = Path(__file__).resolve().parent.parent / "tests" / "stubs"
    sys.path.insert(0, str(stubs))
    os.environ["PYTHONPATH"] = f"{stubs}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    import sglang as sgl
    from transformers import AutoTokenizer

    eng = sgl.Engine(model_path=model, device="cpu", attention_backend="torch_native", dtype="float32", random_seed=0,
                     mem_fraction_static=0.5, max_running_requests=batch, max_total_tokens=131072)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = _prompts(tok, batch)

    def run(name):
        params = CONFIGS[name]
        sp = {"temperature": temperature, "max_new_tokens": tokens, "min_new_tokens": tokens, "ignore_eos": True}
        if params:
            sp["custom_params"] = dict(params)
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=prompts, sampling_params=[sp] * len(prompts))
        dt = time.perf_counter() - t0
        return sum(len(o["output_ids"]) for o in outs) / dt

    run(configs[0])
    times = {c: [] for c in configs}
    for _ in range(reps):
        for c in configs:
            times[c].append(run(c))
    out_q.put(times)
    eng.shutdown()


def measure(engine: str, model: str, disabled: bool, configs: list[str], batch: int, tokens: int, reps: int,
            temperature: float = 0.0) -> dict[str, list[float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    target = _vllm_worker if engine == "vllm" else _sglang_worker
    p = ctx.Process(target=target, args=(model, disabled, configs, batch, tokens, reps, temperature, q))
    p.start()
    times = q.get(timeout=1800)
    p.join(timeout=120)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 repetitions of 32 tokens")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (a greedy row gated by the think minimum reads its whole row for its maximum); "
                         "the reasoning techniques' papers sample at 0.6")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--vocab", type=int, default=151_936,
                    help="the tiny model's vocabulary (default Qwen's 151,936, so the processors' share of a step is not hidden)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CONFIGS) + " (unused always runs)")
    args = ap.parse_args(argv)
    configs = ["unused"] + [c for c in (args.cases.split(",") if args.cases else CONFIGS) if c != "unused"]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; expected one of {', '.join(CONFIGS)}")
    if args.quick:
        args.reps, args.tokens = 3, 32
    from tts_plugins.models.tiny import build_tiny_model

    model = str(build_tiny_model(Path(tempfile.gettempdir()) / "tts-plugins-tiny" / f"dense-v{args.vocab}", "dense", model_vocab=args.vocab))
    print(f"[{args.engine}] batch {args.batch}, {args.tokens} tokens a request, {args.reps} repetitions, vocabulary {args.vocab}, "
          f"temperature {args.temperature}", flush=True)
    base = measure(args.engine, model, True, ["unused"], args.batch, args.tokens, args.reps, args.temperature)["unused"]
    print(f"[{args.engine}] disabled engine done", flush=True)
    runs = measure(args.engine, model, False, configs, args.batch, args.tokens, args.reps, args.temperature)
    base_med = statistics.median(base)
    unused_med = statistics.median(runs["unused"])
    results = [{"engine": args.engine, "case": "disabled", "tok_per_s": base_med, "spread": max(base) - min(base), "ratio": 1.0}]
    for name, vals in runs.items():
        med = statistics.median(vals)
        target = TARGETS.get(name, 0.90)
        results.append({
            "engine": args.engine, "case": name, "tok_per_s": med, "batch": args.batch, "vocab": args.vocab, "temperature": args.temperature,
            "ms_per_step": args.batch / med * 1e3, "spread": max(vals) - min(vals), "ratio": med / base_med,
            # same engine, interleaved: the comparison least exposed to process-to-process noise
            "ratio_to_unused": med / unused_med, "target": target, "meets_target": med / base_med >= target,
        })
    print(f"\n{'case':<12} {'tok/s':>9} {'spread':>8} {'ratio':>7} {'vs unused':>9}  target (ratio to disabled)")
    for r in results:
        t = r.get("target")
        print(f"{r['case']:<12} {r['tok_per_s']:9.1f} {r['spread']:8.1f} {r['ratio']:7.3f} {r.get('ratio_to_unused', 1.0):9.3f}  "
              + ("" if t is None else f">= {t}: {'ok' if r['meets_target'] else 'MISSED'}"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
