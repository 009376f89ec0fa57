"""Demo: think-token steering in the real vLLM engine on the bundled tiny models.

Run ``./dev demo`` (or ``python -m tts_plugins.demo`` where vLLM is installed).
Builds the tiny models locally (random weights, so the words are noise; the
structure is the point), starts vLLM on the CPU and sends the same question
with different per-request ``tts_*`` parameters in one batch.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def _show(tok, ids: list[int], width: int = 90) -> str:
    text = tok.decode(ids, skip_special_tokens=False).replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def _thinking(tok, ids: list[int]) -> str:
    for i in range(len(ids)):
        if "</think>" in tok.decode(ids[: i + 1], skip_special_tokens=False):
            return str(i)
    return "no end"


def run(model_dir: Path, cases: list[tuple[str, dict]], title: str) -> None:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8, seed=0)
    started = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 17 * 4 - 9?"}], add_generation_prompt=True, tokenize=False)
    sps = [SamplingParams(temperature=0, max_tokens=28, extra_args=p or None, skip_special_tokens=False) for _, p in cases]
    outs = llm.generate([prompt] * len(cases), sps, use_tqdm=False)
    print(f"\n{title}  (engine start {started:.1f}s; one batch of {len(cases)} requests)")
    print(f"  {'request':<34} {'tokens to </think>':>17}  output (prompt opened <think>)")
    for (name, params), out in zip(cases, outs):
        ids = list(out.outputs[0].token_ids)
        print(f"  {name:<34} {_thinking(tok, ids):>17}  {_show(tok, ids)}")
    llm.llm_engine.engine_core.shutdown()
    del llm


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tts_plugins.tiny import build_tiny_model

    root = Path(os.environ.get("TTS_TINY_MODELS", Path(tempfile.gettempdir()) / "tts-plugins-tiny"))
    dense, eager = build_tiny_model(root / "dense", "dense"), build_tiny_model(root / "eager", "eager")
    run(dense, [
        ("plain", {}),
        ("cap: tts_think_max=8", {"tts_think_max": 8}),
        ("cap 3 + conclusion phrase", {"tts_think_max": 3, "tts_think_conclusion": " Considering the limited time, I have to give the solution now.\n"}),
        ("NoThinking: tts_no_think=true", {"tts_no_think": True}),
    ], "Dense tiny model (thinks until something stops it)")
    run(eager, [
        ("plain", {}),
        ("minimum: tts_think_min=6", {"tts_think_min": 6}),
        ("extend: tts_think_extend=2", {"tts_think_extend": 2, "tts_think_wait": "Hmm"}),
        ("min 4 + cap 10", {"tts_think_min": 4, "tts_think_max": 10}),
    ], "Eager tiny model (tries to end thinking at every step)")
    print("\nSame engine, same batch: each request steered only by its own vllm_xargs / extra_args.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
