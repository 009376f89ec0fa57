"""Demo: the real vLLM engine on the tiny reasoning model trained here, steered per request.

Run ``./dev demo`` (or ``python -m tts_plugins.models.demo`` where vLLM is installed).
On first use it trains the model (a 4-layer Qwen3, about 15 minutes on
two CPU cores with its evaluation; cached afterwards, see :mod:`tts_plugins.models.trained`). Then it starts
vLLM on the CPU and shows, on held-out chained arithmetic:

1. one question, one batch, each request steered only by its own keys:
   plain, a thinking cap, NoThinking;
2. short-m@k (``tts_group``: the first samples to finish thinking end the rest,
   inside the engine) against majority voting over the same 8 samples per
   problem: the same problems, the same seeds, the same temperature and top_p,
   so the only difference is the group stop. It prints both accuracies and the
   decode tokens each spent.

``--model DIR`` serves another reasoner of the same format (CI points it at the
test reasoner it has already trained) and ``--problems N`` sets the problem count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from tts_plugins import envvars

PROBLEMS = 40
SAMPLES = 8
TEMPERATURE, TOP_P = 0.7, 0.95  # short-m@k's settings (tts bench's short-m method); majority runs at the same ones


def _show(text: str, width: int = 96) -> str:
    """One line: the beginning and the end (where the re-checks and the answer are)."""
    text = text.replace("\n", " / ")
    return text if len(text) <= width else text[:36] + " ... " + text[-(width - 41):]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tts_plugins.models.demo",
                                 description="The plugins at work in a real vLLM engine on the tiny reasoner.")
    ap.add_argument("--model", type=Path, default=envvars.get("TTS_DEMO_MODEL") or None,
                    help="a reasoner directory (default: train the full recipe under $TTS_TINY_MODELS or the temp folder)")
    ap.add_argument("--problems", type=int, default=int(envvars.get("TTS_DEMO_PROBLEMS") or PROBLEMS),
                    help="held-out problems (default %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.problems < 1:
        raise SystemExit("--problems must be at least 1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its per-call timeout notice is not for this screen
    import vllm
    from vllm import LLM, SamplingParams

    from tts_plugins.client import aggregate
    from tts_plugins.client.stats import newcombe_paired, ratio_of_means
    from tts_plugins.models import arith
    from tts_plugins.models.trained import build_reasoning_model, prompt_text

    model = args.model
    if model is None:
        root = Path(envvars.get("TTS_TINY_MODELS") or Path(tempfile.gettempdir()) / "tts-plugins-tiny")
        model = build_reasoning_model(root / "reasoning", "dense")
    n = args.problems
    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=64, seed=0)
    print(f"\ntts-plugins on vLLM {vllm.__version__}: the engine started in {time.perf_counter() - t0:.0f}s on {model}")
    probs = arith.held_out(n, steps=None)  # mixed difficulty, 2 to 12 steps
    prompts = [prompt_text(p.question) for p in probs]

    # 1. the plugins at work: four requests in one batch, each steered by its own keys
    p = probs[0]
    cases = [("plain", {}), ("tts_think_max=16", {"tts_think_max": 16}), ("tts_no_think=true", {"tts_no_think": True})]
    outs = llm.generate([prompts[0]] * len(cases),
                        [SamplingParams(temperature=0, max_tokens=256, extra_args=c or None, skip_special_tokens=False) for _, c in cases],
                        use_tqdm=False)
    print(f"\n1. One batch, each request steered by its own keys (greedy). {p.question}  The answer is {p.answer}.")
    for (name, _), out in zip(cases, outs):
        c = out.outputs[0]
        print(f"   {name:<18} {len(c.token_ids):4d} tokens  answer {arith.extract_answer(c.text)!s:>5}   {_show(c.text)}")

    # 2. short-m@k against majority, the same samples' seeds and settings
    def sample(extra: dict | None) -> list:
        sps = [SamplingParams(n=SAMPLES, temperature=TEMPERATURE, top_p=TOP_P, seed=1000 + i * SAMPLES, max_tokens=256,
                              extra_args=None if extra is None else {**extra, "tts_group": f"demo-{i}"}) for i in range(n)]
        return llm.generate(prompts, sps, use_tqdm=False)

    t1 = time.perf_counter()
    plain = sample(None)
    grouped = sample({"tts_group_stop_after": 1})
    seconds = time.perf_counter() - t1
    rows = []
    for o_plain, o_group, q in zip(plain, grouped, probs):
        a_plain = [arith.extract_answer(c.text) for c in o_plain.outputs]
        maj = aggregate.majority(a_plain).answer == str(q.answer)
        # short-m@k votes among the samples that finished (an answer); the engine ended the others early
        done = [(arith.extract_answer(c.text), len(c.token_ids)) for c in o_group.outputs if arith.extract_answer(c.text) is not None]
        short = bool(done) and aggregate.short_m_at_k([a for a, _ in done], [t for _, t in done]).answer == str(q.answer)
        # ended by the group stop: shorter than the same sample (same seed) without it, and no answer
        stopped = sum(len(g.token_ids) < len(c.token_ids) and arith.extract_answer(g.text) is None for g, c in zip(o_group.outputs, o_plain.outputs))
        rows.append((maj, short, sum(len(c.token_ids) for c in o_plain.outputs), sum(len(c.token_ids) for c in o_group.outputs), stopped))
    acc_m, acc_s = sum(r[0] for r in rows) / n, sum(r[1] for r in rows) / n
    tok_m, tok_s = sum(r[2] for r in rows) / n, sum(r[3] for r in rows) / n
    wins, losses = sum(r[1] and not r[0] for r in rows), sum(r[0] and not r[1] for r in rows)
    print(f"\n2. Self-consistency over {n} held-out problems, {SAMPLES} samples each (T={TEMPERATURE}, top_p={TOP_P}, the same seeds):")
    print(f"   majority@{SAMPLES}                      accuracy {acc_m:6.1%}   {tok_m:7.1f} decode tokens per problem")
    print(f"   short-1@{SAMPLES} (tts_group, in-engine) accuracy {acc_s:6.1%}   {tok_s:7.1f} decode tokens per problem")
    _, acc_lo, acc_hi = newcombe_paired([bool(r[1]) for r in rows], [bool(r[0]) for r in rows])
    ratio, tok_lo, tok_hi = ratio_of_means([r[3] for r in rows], [r[2] for r in rows])
    print(f"   => the group stop spent {1 - ratio:.0%} fewer tokens (x{ratio:.2f} of majority's, 95% paired bootstrap "
          f"x{tok_lo:.2f} to x{tok_hi:.2f}); accuracy {100 * (acc_s - acc_m):+.1f} points (Newcombe 95% {100 * acc_lo:+.1f} to "
          f"{100 * acc_hi:+.1f}; {wins} problems won, {losses} lost)")
    print(f"   {sum(r[4] for r in rows) / n:.1f} of {SAMPLES} samples per problem were ended by the engine")
    print(f"   ({seconds:.0f}s for both; one problem's paired numbers are noisy: `tts bench` gives intervals on your own model and data)")
    print("\nNext: the README's request examples for `vllm serve` and SGLang, and `tts bench` to measure a technique on your model.")
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
