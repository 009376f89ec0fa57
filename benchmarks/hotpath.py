"""Hot-path cost of every registered logits technique, as ratios to a memory-bound floor.

For each technique and case the script times ``apply`` on a realistic batch
(vocabulary 151,936 by default) and, interleaved in the same run, the floor
``out.copy_(logits)`` into a preallocated buffer: one read and one write of
the same tensor. Reported: median microseconds, spread, and the ratio.

Cases: ``unused`` (no row opted in; target <= 0.01x copy), ``active`` (every
row opted in and acted on this step; target <= 2x copy), ``mixed`` (a quarter
of the rows; target <= 2x copy). A technique whose work is a reduction (the
RoE roster: one softmax over its member rows, one sum per roster; DeepConf: a
top-20 and a log-sum-exp of its rows) is measured against the one reduction it
needs over the same rows instead (the roster: that softmax; DeepConf: one
top-20, the issue's unit; target <= 1.5x). The model
patches' kernels have their own floors: Mixture of Inputs' stash against a
copy of the logits (<= 2x), RoE's routing mask against the router's own
softmax and top-k (<= 2x). Each target is in the JSON next to its figure.
Needs only torch and the package: it runs unchanged on a GPU machine
(``--device cuda``) without an engine.

    python benchmarks/hotpath.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tts_plugins.batch import RowMap, SlotState
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.technique import EngineInfo, SlotRequest

TARGETS = {"unused": 0.01, "active": 2.0, "mixed": 2.0}
REDUCE_TARGET = 1.5  # a technique whose work is a reduction: at most 1.5x the one reduction it needs, in the same run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e6


def cases(tok):
    """{technique: {case: setup(state, rows, batch, prompt)}}; each setup admits rows so ``apply`` has work."""

    def admit(state, rows, r, flat, prompt, greedy=None):
        parsed = state.registry.parse(flat)
        if parsed:
            state.admit(rows.take(r), parsed, SlotRequest(prompt, greedy=r % 2 == 0 if greedy is None else greedy), [])
        return rows.slot_of(r)

    def think(flat_of, greedy=None):  # greedy: None, half the rows greedy; False, every row sampled
        def setup(state, rows, batch, prompt):
            for r in range(batch):
                admit(state, rows, r, flat_of(r), prompt, greedy)
        return setup

    forced = {"tts_no_think": True}  # forced from step 0
    gated = {"tts_think_min": 10**6}  # gate closed for the whole run

    def trim(share):  # share: one row in `share` opts in; 0: none
        def setup(state, rows, batch, prompt):
            loop = {"tts_trim_ngram": 2, "tts_trim_repeats": 2, "tts_trim_converge": 0, "tts_trim_max_thoughts": 0}
            for r in range(batch):
                opted = share and r % share == 0
                slot = admit(state, rows, r, loop if opted else {}, prompt)
                if opted:
                    state.feed(slot, [5, 6, 5, 6])  # a loop: the trigger fires, the conclusion is being forced
        return setup

    def group(share):
        def setup(state, rows, batch, prompt):
            slots = [admit(state, rows, r, {"tts_group": "g", "tts_group_finish": "eos"} if share and r % share == 0 else {}, prompt)
                     for r in range(batch)]
            if share:
                state.feed(slots[0], [tok.eos_token_id])  # the first finishes: the others are being stopped
        return setup

    def roster(share):  # rows in rosters of 4 (greedy and sampling alternately); share: one row in `share` joins
        def setup(state, rows, batch, prompt):
            members = [r for r in range(batch) if share and r % share == 0]
            for r in range(batch):
                flat = {"tts_roe_roster": f"r{members.index(r) // 4}", "tts_roe_roster_size": 4} if r in members else {}
                admit(state, rows, r, flat, prompt)
        return setup

    def carbon(share):
        def setup(state, rows, batch, prompt):
            flat = {"tts_carbon_temperature": 0.7, "tts_carbon_bias_ids": list(range(11)), "tts_carbon_bias_values": [0.5] * 11}
            for r in range(batch):
                admit(state, rows, r, flat if share and r % share == 0 else {}, prompt)
        return setup

    def conf(share):  # DeepConf: every row measured and judged against a threshold (none falls below: no stop)
        def setup(state, rows, batch, prompt):
            flat = {"tts_conf_threshold": 0.0, "tts_conf_window": 2048, "tts_conf_topk": 20}
            for r in range(batch):
                admit(state, rows, r, flat if share and r % share == 0 else {}, prompt)
        return setup

    return {
        # DeepConf's step is a log-softmax of its rows and a top-20 of it: its target is a ratio to one top-20 of those rows
        "conf": {"unused": conf(0), "reduce-all": conf(1), "reduce-mixed": conf(4)},
        # a roster's step is one softmax of its member rows and a sum per roster: its target is a ratio to that softmax
        "roe_roster": {"unused": roster(0), "reduce-all": roster(1), "reduce-mixed": roster(4)},
        "carbon": {"unused": carbon(0), "active": carbon(1), "mixed": carbon(4)},
        "think": {
            "unused": think(lambda r: {}),
            "active-force": think(lambda r: forced),
            "active-gate": think(lambda r: gated),
            "active-gate-sampled": think(lambda r: gated, greedy=False),  # no greedy row: no row maximum is read
            "mixed": think(lambda r: forced if r % 8 == 0 else gated if r % 8 == 4 else {}),
        },
        "trim": {"unused": trim(0), "active": trim(1), "mixed": trim(4)},
        "group": {"unused": group(0), "active": group(1), "mixed": group(4)},
    }


def bench(args) -> list[dict]:
    from transformers import AutoTokenizer

    from tts_plugins.models.tiny import build_tiny_model

    device = torch.device(args.device)
    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "tts-plugins-tiny" / "dense", "dense")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    registry = build_registry(plugin_manager(load_entry_points=False))
    results = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for batch in args.batch:
        info = EngineInfo(vocab_size=args.vocab, max_slots=batch, device=device, tokenizer=tok, eos_token_ids=(tok.eos_token_id,),
                          pin_memory=device.type == "cuda")
        for technique, case, setup in [(t, c, f) for t, cs in cases(tok).items() for c, f in cs.items() if not args.only or t in args.only]:
            state, rows = SlotState(registry, info), RowMap(batch, info)
            setup(state, rows, batch, prompt)
            row_slots = rows.device_view(batch)
            # vLLM V1 and SGLang hand the row map over on the host as well (V2 too, without speculative decoding)
            host_slots = rows.host_view(batch) if not args.device_only else None
            for dname in args.dtype:
                logits = torch.randn(batch, args.vocab, device=device).to(dtypes[dname])
                out = torch.empty_like(logits)
                for _ in range(3):  # warm-up
                    out.copy_(logits)
                    state.apply(logits, row_slots, host_slots)
                # a reduction technique (the roster) is measured against the one softmax it needs over the same rows
                members = [r for r in range(batch) if int(rows.slot_of(r)) != info.neutral_slot] if case.startswith("reduce") else []
                ref, ref_name = None, "softmax of the member rows"
                if members and technique == "conf":
                    # one top-20 over the rows the kernel reads (gathered first when they are not the whole batch)
                    ref_name = "top-20 of the member rows"
                    midx = torch.tensor(members, device=device)
                    picked = logits if len(members) == batch else torch.empty(len(members), args.vocab, device=device, dtype=logits.dtype)
                    vals = torch.empty(len(members), 20, device=device, dtype=logits.dtype)
                    idx = torch.empty(len(members), 20, device=device, dtype=torch.int64)

                    def ref(midx=midx, picked=picked, vals=vals, idx=idx):
                        if picked is not logits:
                            torch.index_select(logits, 0, midx, out=picked)
                        return torch.topk(picked, 20, -1, out=(vals, idx))
                elif members:
                    midx = torch.tensor(members, device=device)
                    # into reused buffers, as the roster works (a fresh [rows, vocab] per call would time the allocator)
                    picked = torch.empty(len(members), args.vocab, device=device, dtype=logits.dtype)
                    soft = torch.empty(len(members), args.vocab, device=device, dtype=torch.float32)

                    def ref(midx=midx, picked=picked, soft=soft):
                        torch.index_select(logits, 0, midx, out=picked)
                        return torch.ops.aten.softmax.int_out(picked, -1, torch.float32, out=soft)
                copy_t, apply_t, ref_t = [], [], []
                for _ in range(args.reps):  # interleaved, so drift hits all alike
                    copy_t.append(timed(lambda: out.copy_(logits), device))
                    apply_t.append(timed(lambda: state.apply(logits, row_slots, host_slots), device))
                    if ref is not None:
                        ref_t.append(timed(ref, device))
                cm, am = statistics.median(copy_t), statistics.median(apply_t)
                results.append(record(technique, case, batch, args.vocab, dname, am, cm, apply_t,
                                      reference=(ref_name, statistics.median(ref_t)) if ref_t else None))
    return results


def record(technique: str, case: str, batch: int, vocab: int, dname: str, am: float, cm: float | None, times: list[float],
           reference: tuple[str, float] | None = None, reference_target: float = REDUCE_TARGET) -> dict:
    """One measurement with its target stated next to its figure (printed as it is taken)."""
    rec = {"technique": technique, "case": case, "batch": batch, "vocab": vocab, "dtype": dname,
           "ratio_to_copy": None if cm is None else am / cm, "median_us": am, "copy_us": cm,
           "spread_us": statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0] if len(times) >= 4 else 0.0}
    if reference is not None:
        name, ref_us = reference
        rec.update({"reference": name, "reference_us": ref_us, "ratio_to_reference": am / ref_us,
                    "target": f"<= {reference_target}x {name}", "meets_target": am / ref_us <= reference_target})
    else:
        target = TARGETS.get(case.split("-")[0]) if cm is not None else None
        rec.update({"target": None if target is None else f"<= {target}x copy", "meets_target": None if target is None else am / cm <= target})
    extra = f"  {name} {ref_us:9.1f} us  ratio {am / ref_us:6.3f}" if reference is not None else ""
    own = "" if cm is None else f"  copy {cm:9.1f} us  ratio {am / cm:7.4f}"
    print(f"{technique:<10} {case:<13} batch {batch:>4} {dname}  apply {am:10.1f} us{own}{extra}"
          + ("" if rec["target"] is None else f"  target {rec['target']}: {'ok' if rec['meets_target'] else 'MISSED'}"), flush=True)
    return rec


def model_patch_kernels(args) -> list[dict]:
    """The model patches' per-step kernels. Mixture of Inputs' stash: before sampling, the top-k distribution of the
    opted-in rows, read in place (every row: ``active-stash``; a quarter: ``mixed-stash``), then the sampled ids;
    against a copy of the logits, target <= 2x. RoE's routing mask for one step of a Qwen3-MoE-shaped model (48 MoE
    layers, 128 experts, top 8): the noise of every layer drawn once, then each layer's mask; against the router's
    own softmax and top-k over the same logits in every layer, target <= 2x."""
    import logging

    from tts_plugins.logits_processors.moi import MoIParams, MoIStash
    from tts_plugins.logits_processors.roe import RoEModel, StepNoise

    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = []
    for batch in args.batch:
        for dname in args.dtype:
            logits = torch.randn(batch, args.vocab, device=device).to(dtypes[dname])
            out = torch.empty_like(logits)
            sampled = torch.randint(0, args.vocab, (batch,), device=device)
            for case, share in (("active-stash", 1), ("mixed-stash", 4)):
                stash = MoIStash(batch, device)
                rows = np.arange(0, batch, share, dtype=np.int64)
                slots = np.array([stash.admit(i, MoIParams()) for i in range(len(rows))], dtype=np.int64)

                def fn(stash=stash, rows=rows, slots=slots, share=share):
                    index = stash.stash_distribution(slots, logits, None if share == 1 else rows)
                    stash.stash_sampled(slots, sampled if index is None else sampled.index_select(0, index), rows)

                copy_t, t = [], []
                for i in range(args.reps + 3):
                    c, a = timed(lambda: out.copy_(logits), device), timed(fn, device)
                    if i >= 3:
                        copy_t.append(c)
                        t.append(a)
                results.append(record("moi", case, batch, args.vocab, dname, statistics.median(t), statistics.median(copy_t), t))
            layers, experts, top = 48, 128, 8
            routers = [torch.randn(batch, experts, device=device).to(dtypes[dname]) for _ in range(layers)]
            model = RoEModel({3 * i: i for i in range(layers)}, logging.getLogger("hotpath"))
            seeds, pos = torch.arange(batch, device=device), torch.arange(batch, device=device)
            tau = torch.full((batch, layers), 0.5, device=device)
            tau[1::2] = 0.0  # half the tokens are plain requests

            def mask():
                step = StepNoise(model, seeds, pos, tau)
                for i, r in enumerate(routers):
                    step.mask(r, top, 3 * i)

            def plain():
                for r in routers:
                    torch.topk(torch.softmax(r, -1, dtype=torch.float32), top, -1)

            plain_t, t = [], []
            for i in range(args.reps + 3):
                p, a = timed(plain, device), timed(mask, device)
                if i >= 3:
                    plain_t.append(p)
                    t.append(a)
            pm, am = statistics.median(plain_t), statistics.median(t)
            results.append(record("roe", "mask-step", batch, experts, dname, am, None, t, reference=("router softmax and top-k", pm),
                                  reference_target=2.0))
    return results


def host_step_cost(args) -> list[dict]:
    """Per-step host cost of the token state machines (trigger checks included), per opted-in row."""
    from transformers import AutoTokenizer

    from tts_plugins.models.tiny import build_tiny_model

    model_dir = build_tiny_model(Path(tempfile.gettempdir()) / "tts-plugins-tiny" / "dense", "dense")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    registry = build_registry(plugin_manager(load_entry_points=False))
    cases = {
        "think (cap)": {"tts_think_max": 10**6},
        "trim (all triggers)": {"tts_trim": True},
        "group": {"tts_group": "g", "tts_group_stop_after": 10**5},
    }
    results = []
    rows = 64
    text_ids = tok.encode(" 12 + 7 = 19. Wait, the answer is 19. But let me check 3 * 4 = 12.\n\n", add_special_tokens=False)
    for name, params in cases.items():
        info = EngineInfo(vocab_size=len(tok), max_slots=rows, device=torch.device("cpu"), tokenizer=tok, eos_token_ids=(tok.eos_token_id,))
        state = SlotState(registry, info)
        for slot in range(rows):
            state.admit(slot, registry.parse(params), SlotRequest(prompt))
        times = []
        for step in range(args.reps * 10):
            t = text_ids[step % len(text_ids)]
            t0 = time.perf_counter()
            for slot in range(rows):
                state.feed(slot, (t,))
            times.append((time.perf_counter() - t0) * 1e6)
        med = statistics.median(times)
        results.append({"technique": name, "case": "host-step", "batch": rows, "median_us": med, "per_row_us": med / rows})
        print(f"host   {name:<20} {rows} opted-in rows: {med:8.1f} us per step, {med / rows:6.2f} us per row", flush=True)

    # Batch-state churn: each step one opted-in request leaves and another joins (vLLM V1 row events).
    info = EngineInfo(vocab_size=len(tok), max_slots=rows, device=torch.device("cpu"), tokenizer=tok, eos_token_ids=(tok.eos_token_id,))
    state, rowmap = SlotState(registry, info), RowMap(rows, info)
    parsed = registry.parse({"tts_think_max": 64, "tts_group": "g"})
    for r in range(rows):
        state.admit(rowmap.take(r), parsed, SlotRequest(prompt), [])
    times = []
    for step in range(args.reps * 10):
        r = step % rows
        t0 = time.perf_counter()
        state.release(rowmap.clear(r))
        state.admit(rowmap.take(r), parsed, SlotRequest(prompt), [])
        rowmap.device_view(rows)
        times.append((time.perf_counter() - t0) * 1e6)
    med = statistics.median(times)
    results.append({"technique": "batch-state", "case": "join+leave", "batch": rows, "median_us": med})
    print(f"host   batch state: one request leaves and one joins (think + group): {med:8.1f} us", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="batch 64, fp32, 15 repetitions")
    p.add_argument("--device-only", action="store_true", help="no host row map (the V2 path under speculative decoding)")
    p.add_argument("--json", type=Path)
    p.add_argument("--only", nargs="+", help="these logits techniques only (conf, think, trim, group, carbon, roe_roster), no patch kernels")
    p.add_argument("--patches", action="store_true", help="the model patches' kernels only (MoI stash, RoE mask)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.dtype, args.reps = [64], ["fp32"], 15
    torch.manual_seed(0)
    results = [] if args.patches else bench(args)
    if args.patches:
        results += model_patch_kernels(args)
    elif not args.only:
        results += model_patch_kernels(args)
        results += host_step_cost(args)
    missed = [r for r in results if r.get("meets_target") is False]
    print(f"\n{len(results)} measurements, {len(missed)} missed targets"
          + ("".join(f"\n  MISSED: {r['technique']} {r['case']} batch {r['batch']} {r['dtype']}: target {r['target']}"
                     for r in missed)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
