"""Mixture of Inputs: cost of the stash (after sampling) and the mixture (before the forward) per step.

Times :class:`MoIStash` ``stash`` + ``mix`` for a batch whose every row opted
in, interleaved with two floors measured in the same run: the plain
embedding lookup of the batch (what the mixture replaces) and one copy of the
logits (the hot-path floor of ``benchmarks/hotpath.py``). Also reports the
state held per request (O(k), independent of the sequence length) next to the
``max_len x hidden`` buffer per request that the authors' patch keeps.

The whole engine step is measured by ``benchmarks/engine.py --cases moi``.

    python benchmarks/moi.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from tts_plugins.logits_processors.moi import MoIParams, MoIStash

SHAPES = {  # (vocabulary, hidden): the bundled tiny model and a Qwen3-8B-sized one
    "tiny": (512, 64),
    "qwen3-8b": (151_936, 4096),
}


def timed(fn, device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6


def bench(shape: str, batch: int, topk: int, reps: int, device: torch.device, dtype: torch.dtype) -> dict:
    vocab, hidden = SHAPES[shape]
    gen = torch.Generator(device="cpu").manual_seed(0)
    table = torch.randn(vocab, hidden, generator=gen).to(device, dtype)
    logits = torch.randn(batch, vocab, generator=gen).to(device, dtype)
    sampled = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    out = torch.empty_like(logits)
    stash = MoIStash(batch, device)
    slots = np.array([stash.admit(i, MoIParams(beta=1.0, topk=topk)) for i in range(batch)], np.int64)
    pos = np.arange(batch, dtype=np.int64)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, table)

    def moi() -> None:
        stash.stash(slots, logits, sampled, pos)
        stash.mix(slots, embed)

    cases = {"moi": moi, "embed": lambda: embed(sampled), "copy": lambda: out.copy_(logits)}
    for fn in cases.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            times[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": shape, "vocab": vocab, "hidden": hidden, "batch": batch, "topk": topk, "dtype": str(dtype).replace("torch.", ""),
        "device": str(device), "moi_us": med["moi"], "embed_us": med["embed"], "copy_us": med["copy"],
        "moi_spread_us": max(times["moi"]) - min(times["moi"]),
        "ratio_to_copy": med["moi"] / med["copy"],
        "state_bytes_per_request": stash.bytes_per_request(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="15 repetitions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-len", type=int, default=32768, help="for the comparison with a max_len x hidden buffer")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 15
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = [bench(s, args.batch, args.topk, args.reps, device, dtype) for s in SHAPES]
    print(f"batch {args.batch}, top-{args.topk}, {args.dtype}, {args.device}, median of {args.reps}")
    print(f"{'shape':<10} {'moi us':>9} {'embed us':>9} {'copy us':>9} {'x copy':>7} {'state/request':>14} {'max_len x hidden':>17}")
    for r in results:
        full = args.max_len * r["hidden"] * torch.finfo(dtype).bits // 8
        r["authors_buffer_bytes_per_request"] = full
        print(f"{r['shape']:<10} {r['moi_us']:9.1f} {r['embed_us']:9.1f} {r['copy_us']:9.1f} {r['ratio_to_copy']:7.2f} "
              f"{r['state_bytes_per_request']:>12} B {full / 2**20:>13.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
