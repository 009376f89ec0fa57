"""Demo: the real vLLM engine on the tiny reasoning model trained here, steered per request.

Run ``./dev demo`` (or ``python -m tts_plugins.models.demo`` where vLLM is installed).
On first use it trains the model (a 4-layer Qwen3, about 5 minutes on
two CPU cores; cached afterwards, see :mod:`tts_plugins.models.trained`). Then it starts
vLLM on the CPU and shows, on held-out chained arithmetic:

1. one question, one batch, each request steered only by its own parameters:
   plain, a thinking cap, a minimum that splices "Wait", NoThinking;
2. what the cap and the minimum do to accuracy and tokens over 40 problems;
3. a vote: one sample at temperature 1 against the majority of 8.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

PROBLEMS = 40


def _show(text: str, width: int = 110) -> str:
    """One line: the beginning and the end (where the re-checks and the answer are)."""
    text = text.replace("\n", " / ")
    return text if len(text) <= width else text[:38] + " ... " + text[-(width - 43):]


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tts_plugins.client import aggregate, arith
    from tts_plugins.models.trained import build_reasoning_model, prompt_text

    root = Path(os.environ.get("TTS_TINY_MODELS", Path(tempfile.gettempdir()) / "tts-plugins-tiny"))
    model = build_reasoning_model(root / "reasoning", "dense")
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=64, seed=0)
    print(f"\nvLLM started in {time.perf_counter() - t0:.1f}s on {model}")
    probs = arith.held_out(PROBLEMS)
    prompts = [prompt_text(p.question) for p in probs]

    def run(params: dict | None, *, n: int = 1, temperature: float = 0.0, which=range(PROBLEMS)):
        sps = [SamplingParams(n=n, temperature=temperature, seed=(1000 + i) if temperature else None, max_tokens=200, extra_args=params)
               for i in which]
        return llm.generate([prompts[i] for i in which], sps, use_tqdm=False)

    p = probs[0]
    cases = [("plain", {}), ("cap: tts_think_max=16", {"tts_think_max": 16}), ("minimum: tts_think_min=110", {"tts_think_min": 110}),
             ("NoThinking: tts_no_think=true", {"tts_no_think": True})]
    outs = llm.generate([prompts[0]] * len(cases),
                        [SamplingParams(temperature=0, max_tokens=200, extra_args=c or None, skip_special_tokens=False) for _, c in cases],
                        use_tqdm=False)
    print(f"\n1. {p.question}   (the answer is {p.answer}; the prompt opens <think>; greedy; one batch)")
    for (name, _), out in zip(cases, outs):
        c = out.outputs[0]
        print(f"  {name:<30} {len(c.token_ids):4d} tokens  answer {arith.extract_answer(c.text)!s:>4}   {_show(c.text)}")

    def score(outs) -> tuple[float, float]:
        right = sum(arith.extract_answer(o.outputs[0].text) == str(q.answer) for o, q in zip(outs, probs))
        return right / len(probs), sum(len(o.outputs[0].token_ids) for o in outs) / len(probs)

    print(f"\n2. The cap and the minimum over {PROBLEMS} held-out problems (greedy): accuracy, decode tokens per problem")
    for name, params in [("plain", None), ("cap 16", {"tts_think_max": 16}), ("cap 48", {"tts_think_max": 48}),
                         ("minimum 110", {"tts_think_min": 110}), ("NoThinking", {"tts_no_think": True})]:
        acc, toks = score(run(params))
        print(f"  {name:<14} accuracy {acc:5.0%}   {toks:6.1f} tokens")

    print("\n3. A vote: 8 samples at temperature 1 per problem")
    outs = run(None, n=8, temperature=1.0)
    single = majority = 0
    for o, q in zip(outs, probs):
        answers = [arith.extract_answer(c.text) for c in o.outputs]
        single += sum(a == str(q.answer) for a in answers)
        majority += aggregate.majority(answers).answer == str(q.answer)
    answers = [arith.extract_answer(c.text) for c in outs[0].outputs]
    print(f"  problem 1's samples answer {answers}; the majority says {aggregate.majority(answers).answer} (right: {probs[0].answer})")
    print(f"  one sample: {single / (8 * PROBLEMS):.0%} right; majority of 8: {majority / PROBLEMS:.0%} right")
    print("\nEvery technique against accuracy and tokens: benchmarks/accuracy.py (README, 'What each technique buys').")
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
