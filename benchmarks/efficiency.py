"""Decode tokens spent by group early stop and the think cap, against all-k sampling, in the real vLLM engine.

On the ``wobbly`` tiny model (sampled chains end their thinking after a
random number of tokens) each prompt gets k samples (``n=k`` in one request,
temperature 1, the same seed for every strategy):

* ``all-k``: every sample runs to completion (``max_tokens``).
* ``short-1@k`` / ``short-3@k``: ``tts_group`` with m = 1 / 3, finish = end of thinking.
* ``first-finish``: ``tts_group`` with m = 1, finish = EOS (First Finish Search).
* ``think-cap``: ``tts_think_max`` on every sample, no group.

Writes JSON (``--json``) and a bar chart (``--png``, needs matplotlib).

    python benchmarks/efficiency.py --quick --json eff.json --png eff.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

STRATEGIES = {
    "all-k": lambda i: {},
    "short-1@k": lambda i: {"tts_group": f"p{i}", "tts_group_stop_after": 1},
    "short-3@k": lambda i: {"tts_group": f"p{i}", "tts_group_stop_after": 3},
    "first-finish": lambda i: {"tts_group": f"p{i}", "tts_group_stop_after": 1, "tts_group_finish": "eos"},
    "think-cap": lambda i: {"tts_think_max": 4},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="4 prompts, 48 tokens")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_tokens = 4, 48
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from tts_plugins.models.tiny import build_tiny_model

    model = str(build_tiny_model(Path(tempfile.gettempdir()) / "tts-plugins-tiny" / "wobbly", "wobbly"))
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=max(16, args.k), seed=0)
    tok = llm.get_tokenizer()
    prompts = [
        {"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": f"What is {7 * i + 3} + {i}?"}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False)}
        for i in range(args.prompts)
    ]
    end = tok.convert_tokens_to_ids("</think>")
    results = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    for name, make in tqdm(list(STRATEGIES.items()), desc="strategies"):
        sps = [SamplingParams(n=args.k, temperature=1.0, seed=1000 + i, max_tokens=args.max_tokens, extra_args=make(i) or None)
               for i in range(args.prompts)]
        outs = llm.generate(prompts, sps, use_tqdm=False)
        spent = sum(len(c.token_ids) for o in outs for c in o.outputs)
        thinking = sum(list(c.token_ids).index(end) if end in c.token_ids else len(c.token_ids) for o in outs for c in o.outputs)
        results.append({"strategy": name, "k": args.k, "prompts": args.prompts, "decode_tokens": spent, "thinking_tokens": thinking})
    base, base_think = results[0]["decode_tokens"], results[0]["thinking_tokens"]
    for r in results:
        r["ratio_to_all_k"] = r["decode_tokens"] / base
        r["thinking_ratio_to_all_k"] = r["thinking_tokens"] / base_think
    print(f"\n{'strategy':<14} {'decode tokens':>14} {'ratio':>7} {'thinking tokens':>16} {'ratio':>7}   "
          f"(k={args.k}, {args.prompts} prompts, max {args.max_tokens} tokens)")
    for r in results:
        print(f"{r['strategy']:<14} {r['decode_tokens']:14d} {r['ratio_to_all_k']:7.2f} "
              f"{r['thinking_tokens']:16d} {r['thinking_ratio_to_all_k']:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        xs = range(len(results))
        ax.bar([x - 0.2 for x in xs], [r["decode_tokens"] for r in results], width=0.4, color="#4c72b0", label="decode tokens")
        ax.bar([x + 0.2 for x in xs], [r["thinking_tokens"] for r in results], width=0.4, color="#dd8452", label="of which thinking")
        ax.set_xticks(list(xs), [r["strategy"] for r in results])
        ax.set_ylabel("tokens")
        ax.legend()
        ax.set_title(f"Tokens spent, k={args.k}, {args.prompts} prompts (tiny model, vLLM CPU)")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
