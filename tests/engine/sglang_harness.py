"""SGLang for the tests: stand-ins on the path for the engine's processes, offline engine wrapper."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from harness import SGLANG_KV_TOKENS, Output

STUBS = Path(__file__).resolve().parent.parent / "stubs"
CALLS = Path(tempfile.gettempdir()) / f"tts-sgl-kernel-calls-{os.getpid()}"


def sglang_env() -> dict[str, str]:
    """What SGLang processes need here: CPU engine, and the test stand-ins for sgl_kernel and torchvision."""
    pp = os.environ.get("PYTHONPATH", "")
    return {
        "SGLANG_USE_CPU_ENGINE": "1",
        "PYTHONPATH": f"{STUBS}{os.pathsep}{pp}" if pp else str(STUBS),
        "TTS_SGL_KERNEL_CALLS": str(CALLS),
    }


def activate_stubs() -> None:
    os.environ.update(sglang_env())
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))


class SglangOffline:
    """``sgl.Engine`` on the CPU, float32, torch_native attention."""

    engine = "sglang"

    def __init__(self, model: Path, overlap: bool = True, **kwargs: Any) -> None:
        activate_stubs()
        import sglang as sgl
        from transformers import AutoTokenizer

        t0 = time.perf_counter()
        self.eng = sgl.Engine(
            model_path=str(model), device="cpu", attention_backend="torch_native", dtype="float32", random_seed=0,
            disable_overlap_schedule=not overlap, mem_fraction_static=0.5, max_running_requests=16,
            **{"max_total_tokens": SGLANG_KV_TOKENS, **kwargs},
        )
        self.start_seconds = time.perf_counter() - t0
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))

    def generate(self, prompts: Sequence[str | list[int]], params: Sequence[dict], *, max_tokens: int = 32, **sampling: Any) -> list[Output]:
        sps = []
        for p in params:
            sp = {"temperature": p.get("_temperature", sampling.get("temperature", 0.0)), "max_new_tokens": max_tokens, "skip_special_tokens": False}
            seed = p.get("_seed", sampling.get("seed"))
            p = {k: v for k, v in p.items() if k not in ("_temperature", "_seed")}  # per-request temperature and seed, for mixed batches
            if p:
                sp["custom_params"] = dict(p)
            if seed is not None:
                sp["sampling_seed"] = seed
            if sampling.get("n", 1) > 1:
                sp["n"] = sampling["n"]
            sp.update(sampling.get("extra", {}))  # engine sampling parameters, as named by both engines (stop_token_ids)
            sps.append(sp)
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        extra = {"return_logprob": True} if sampling.get("logprobs") else {}
        outs = self.eng.generate(input_ids=ids, sampling_params=sps, **extra)
        outs = outs if isinstance(outs, list) else [outs]
        return [
            Output(list(o["output_ids"]), o["text"], (o["meta_info"].get("finish_reason") or {}).get("type"),
                   [float(t[0]) for t in o["meta_info"]["output_token_logprobs"]] if extra else None,
                   (o["meta_info"].get("finish_reason") or {}).get("matched"))
            for o in outs
        ]

    def close(self) -> None:
        self.eng.shutdown()
