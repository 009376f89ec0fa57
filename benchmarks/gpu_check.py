"""The GPU check: the key engine checks on vLLM's Model Runner V2 (vLLM 0.34 on CUDA) and on SGLang, one line each.

    ./dev gpu            # on a CUDA machine with vLLM 0.34 (and SGLang) installed beside tts-plugins; under 10 minutes
    python benchmarks/gpu_check.py --dry-run    # what CI runs: imports and arguments only

It builds the tiny models (random weights and the test reasoner, locally), then, on vLLM's MRV2:
think cap and minimum (the cap ends thinking within its budget; the minimum splices its text), group stop (a group's
unfinished members are ended once one finishes), DeepConf stop and report (a threshold no trace can reach stops every
trace, and each carries its report), Mixture of Inputs and RoE (refused with a 400 on 0.34, as the README states, or
run where the installed vLLM supports them); then ``benchmarks/hotpath.py --device cuda --quick``. SGLang's engine
checks on GPU are not in it yet (its CPU engine runs the full suite in CI). Prints ``PASS``/``FAIL``/``SKIP`` and one line per check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="import and parse arguments only (CI)")
    ap.add_argument("--models", type=Path, default=Path(os.environ.get("TTS_TINY_MODELS", ROOT / ".cache" / "tiny")))
    ap.add_argument("--skip-hotpath", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap


def _line(results: list, name: str, ok: bool | None, detail: str) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    results.append({"check": name, "status": status, "detail": detail})
    print(f"{status:4}  {name:<34} {detail}", flush=True)


def vllm_checks(models: Path, results: list) -> None:
    from vllm import LLM, SamplingParams

    from tts_plugins.models.trained import prompt_text
    from tts_plugins.services import parse_report

    sys.path.insert(0, str(ROOT / "tests"))
    from models import tiny_model

    reasoner = tiny_model("reasoning")
    t0 = time.perf_counter()
    llm = LLM(model=str(reasoner), dtype="float32", max_model_len=1024, max_num_seqs=64, seed=0, gpu_memory_utilization=0.3)
    _line(results, "vLLM starts with the plugins", True, f"{time.perf_counter() - t0:.0f}s, runner: Model Runner V2")
    tok = llm.get_tokenizer()
    end = tok.convert_tokens_to_ids("</think>")
    prompt = prompt_text("What is 9 - 5 + 7 + 1 - 3 + 8?")

    def gen(extra, **kw):
        sp = SamplingParams(**{"temperature": 0, "max_tokens": 200, "extra_args": extra, **kw})
        return llm.generate([prompt], [sp], use_tqdm=False)[0]

    out = gen({"tts_think_max": 12}).outputs[0]
    ids = list(out.token_ids)
    _line(results, "think cap (tts_think_max=12)", end in ids[:14], f"</think> at token {ids.index(end) + 1 if end in ids else None}")
    plain = list(gen(None).outputs[0].token_ids)
    long = list(gen({"tts_think_min": len(plain) + 20}).outputs[0].token_ids)
    first_end = long.index(end) + 1 if end in long else None
    plain_end = plain.index(end) + 1 if end in plain else None
    _line(results, "think minimum", plain_end is not None and (first_end is None or first_end > len(plain)),
          f"plain ends at {plain_end}, the minimum at {first_end}")
    outs = gen({"tts_group": "gpu-check", "tts_group_stop_after": 1}, n=8, temperature=0.8, seed=1).outputs
    finished = sum(end in c.token_ids for c in outs)
    _line(results, "group stop (short-1@8)", finished <= 2, f"{finished} of 8 samples closed their thinking, the rest were ended")
    outs = gen({"tts_conf_threshold": 100.0, "tts_conf_window": 4, "tts_conf_min_tokens": 4}, n=4, temperature=0.8, seed=2).outputs
    reports = [parse_report(c.stop_reason) for c in outs]
    stopped = [c for c in outs if len(c.token_ids) <= 6]
    _line(results, "DeepConf stop and report", len(stopped) == 4 and all(r and "conf" in r for r in reports),
          f"{len(stopped)} of 4 stopped by token 6; reports: {json.dumps(reports[0])[:80]}")
    import vllm

    from tts_plugins.patching import version_in_range

    for key, value in (("tts_moi_beta", 1.0), ("tts_roe_tau", 0.3)):
        try:
            gen({key: value}, temperature=0.7)
        except ValueError as exc:  # refused at admission, as documented for MRV2 on 0.34
            _line(results, f"{key} refused", key in str(exc) and vllm.__version__ in str(exc), f"{str(exc)[:90]}")
        else:
            _line(results, f"{key} refused", not version_in_range(vllm.__version__, "0.34"), "admitted (it must be refused from 0.34)")
    llm.llm_engine.engine_core.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dry_run:
        import importlib.util

        for mod in ("tts_plugins.adapters.vllm_plugin", "tts_plugins.adapters.vllm", "tts_plugins.services", "tts_plugins.models.trained"):
            assert importlib.util.find_spec(mod) is not None, mod
        print("gpu_check: dry run (imports and arguments)")
        return 0
    os.environ.setdefault("TTS_TINY_MODELS", str(args.models))
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    results: list = []
    t0 = time.perf_counter()
    try:
        vllm_checks(args.models, results)
    except Exception as exc:
        _line(results, "vLLM checks", False, f"{type(exc).__name__}: {exc}"[:200])
    if not args.skip_hotpath:
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hotpath.py"), "--device", "cuda", "--quick"], capture_output=True, text=True)
        _line(results, "hotpath.py --device cuda", run.returncode == 0, (run.stdout.strip().splitlines() or [run.stderr[-200:]])[-1][:120])
    _line(results, "total time", time.perf_counter() - t0 < 600, f"{time.perf_counter() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
