"""A tiny reasoning model trained here, on this CPU, on :mod:`tts_plugins.models.arith` chains.

Random-weight models prove the plumbing; this one shows what a technique does to
accuracy. ``build_reasoning_model(path, "dense" | "moe")`` trains a Qwen3 (dense)
or Qwen3-MoE model from scratch, with a byte-level BPE tokenizer trained on the
task (digits are single tokens; ``<think>``/``</think>`` are special tokens), and
saves it in the Hugging Face format vLLM and SGLang load. It is deterministic
from the seed for a given torch version and thread count (training pins
``threads``, default 2), takes a few minutes on two cores, and is cached: a directory already built with the same recipe is
reused, so the demo, the tests and the benchmarks build it once.

The training mix is :mod:`tts_plugins.models.arith`'s mixed-difficulty traces (2 to
12 steps) with their planted phenomena: slips corrected after "Wait" or doubted
and carried on, intermediate results, the answer stated and re-verified. A
tenth of the solutions are cut short at a random character and closed with
``"\n</think>"`` as a thinking cap closes them, then answered with the total the
cut chain last wrote (:func:`arith.supported_answer`), and 3% answer right after
NoThinking's prefill with an answer worked out without a written step
(:func:`arith.mental_answer`); the forced tokens carry no loss, so the model does
not learn to cut its own thinking short. So a cap, a minimum or NoThinking leads
to an answer, as in a real reasoning model, and no training example follows a
forced string with an answer the text before it could not produce.

Training runs a fixed budget (``VARIANTS``), long enough that the model has
converged on easy problems while hard ones stay uncertain; the per-difficulty
accuracy (greedy and T=1, a plain transformers loop on held-out problems) is
written to ``tts_reasoning.json`` beside the weights. ``target`` (off by
default) stops at the first validation check whose T=1 accuracy reaches it.

    python -m tts_plugins.models.trained --out /tmp/reasoning-dense --variant dense
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tts_plugins.models import arith, tiny

RECIPE = 6  # 6: no answer after a forced string that the text alone could not produce (arith's testbed)
SPECIAL = tiny.SPECIAL + tiny.THINK  # the tiny models' special tokens and chat template, so every tool treats them alike
CHAT_TEMPLATE = tiny.CHAT_TEMPLATE
# Strings the techniques splice in; the tokenizer learns them as words so they stay short.
PHRASES = ["Wait", "Hmm", "Alternatively", "Okay, I think I have finished thinking.",
           "Considering the limited time, I have to give the solution now.", "I have checked this enough; time to answer.",
           "So far", "So the answer is", "Wait, let me check:"]
TRAIN_STEPS = arith.MIX_STEPS  # chain lengths in the training mix
# Optional early stop: training ends at the first check (every CHECK_EVERY steps from CHECK_FROM) where single-sample
# accuracy at temperature 1 on a validation set (disjoint from the held-out problems) reaches the target. Off by default.
TARGET, CHECK_FROM, CHECK_EVERY, VALIDATION = None, 300, 50, 64
CUT = 0.1  # share whose thinking is cut at a random character and closed, then answered (what a cap leaves)
NO_THINK = 0.03  # share that answer right after NoThinking's prefill
VARIANTS = {
    # hidden 128, 4 layers; the MoE has 8 experts of width 48, top 2, in every layer, so routing noise has room
    "dense": {"train_steps": 900, "batch": 32, "lr": 3e-3},
    "moe": {"train_steps": 900, "batch": 32, "lr": 3e-3},
}


def prompt_text(question: str) -> str:
    """The chat-templated prompt (equal to ``apply_chat_template(..., add_generation_prompt=True)``)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<think>\n"


def completion(p: arith.Problem, rng: random.Random) -> list[tuple[str, bool]]:
    """One training target for ``p`` as ``(text, learned)`` segments: mostly a worked trace (:func:`arith.trace`),
    sometimes cut short or unthought.

    What an engine forces (a cap's ``"\\n</think>"``, NoThinking's prefill) is context, not target: its tokens
    carry no loss, so the model learns what to do after a cut without learning to cut its own thinking short.
    Each segment is tokenized on its own, as the engine encodes a forced string on its own.
    """
    u, end = rng.random(), "<|im_end|>"
    t = arith.trace(p, rng)
    if u < CUT:
        # the answer is what the cut chain supports (its last written total), never the problem's answer
        think = t.thinking[: rng.randrange(len(t.thinking))]
        return [(think, True), ("\n</think>", False), (f"\n\nAnswer: {arith.supported_answer(p, think)}{end}", True)]
    if u < CUT + NO_THINK:
        # an answer worked out without a written step, with its own slips (arith.mental_answer)
        return [("Okay, I think I have finished thinking.\n</think>", False), (f"\n\nAnswer: {arith.mental_answer(p, rng)}{end}", True)]
    return [(t.completion() + end, True)]


def build_tokenizer(path: Path, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"tokenizer:{seed}")
    corpus = []
    for _ in range(2000):
        p = arith.mixed_problem(rng, TRAIN_STEPS)
        corpus.append(prompt_text(p.question) + "".join(t for t, _ in completion(p, rng)) + "\n")
    tok = Tokenizer(models.BPE())
    # One token per digit: numbers are spelled the same way in every context, which arithmetic needs.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus + PHRASES * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=SPECIAL[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_model(variant: str, tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    if variant == "moe":
        cfg = Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=True, decoder_sparse_step=1, router_aux_loss_coef=0.01, **common)
        return Qwen3MoeForCausalLM(cfg)
    return Qwen3ForCausalLM(Qwen3Config(intermediate_size=384, **common))


def _batch(tok, rng: random.Random, size: int, cache: dict[str, list[int]]):
    """Token ids, attention mask and labels (prompt and forced positions masked out) for ``size`` fresh problems."""
    import torch

    seqs, learn = [], []
    # one length band per batch (the drawn length +- 1), so a batch pads to about its own length, not the longest
    mid = rng.randint(*TRAIN_STEPS)
    band = (max(TRAIN_STEPS[0], mid - 1), min(TRAIN_STEPS[1], mid + 1))
    for _ in range(size):
        p = arith.mixed_problem(rng, band)
        q = prompt_text(p.question)
        ids = list(cache.get(q) or cache.setdefault(q, tok(q)["input_ids"]))
        mask = [False] * len(ids)
        for text, learned in completion(p, rng):
            part = tok(text)["input_ids"] if text else []
            ids += part
            mask += [learned] * len(part)
        seqs.append(ids)
        learn.append(mask)
    width = max(map(len, seqs))
    ids = torch.full((size, width), tok.pad_token_id)
    labels = torch.full((size, width), -100)
    mask = torch.zeros(size, width, dtype=torch.long)
    for i, (s, keep) in enumerate(zip(seqs, learn)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, : len(s)] = torch.where(torch.tensor(keep), ids[i, : len(s)], -100)
    return ids, mask, labels


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm  # a dependency of transformers

    # disable=None: no bar when stderr is not a terminal (CI logs)
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, mininterval=2.0, disable=None if enabled else True)


MAX_NEW_TOKENS_PER_STEP = 24  # a trace: ~8 tokens per step, doubts, checks


def accuracy(model, tok, problems: list[arith.Problem], temperature: float, seed: int = 0) -> float:
    """Single-sample accuracy with a plain transformers loop (left-padded batch; T=0 is greedy)."""
    import torch

    tok.padding_side = "left"
    enc = tok([prompt_text(p.question) for p in problems], return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    steps = max(len(p.ops) for p in problems)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS_PER_STEP * steps + 60, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **sample)
    texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(arith.extract_answer(x) == str(p.answer) for x, p in zip(texts, problems)) / len(problems)


def train(variant: str, out: Path, *, seed: int = 0, steps: int | None = None, threads: int = 1, progress: bool = True,
          target: float | None = TARGET, batch: int | None = None) -> dict[str, Any]:
    """Train ``variant`` from scratch into ``out`` (tokenizer + safetensors); returns the training record.

    ``steps``: the most optimizer steps; ``target``: stop at the first validation check (every
    ``CHECK_EVERY`` steps from ``CHECK_FROM``) whose accuracy at temperature 1 reaches it (None: never);
    ``batch``: sequences per step (default: the variant's)."""
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    cfg = dict(VARIANTS[variant])
    if steps is not None:
        cfg["train_steps"] = steps
    if batch is not None:
        cfg["batch"] = batch
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tok = build_tokenizer(out, seed)
        torch.manual_seed(seed)
        model = make_model(variant, tok)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["train_steps"], pct_start=0.05)
        rng, cache = random.Random(f"train:{seed}"), {}
        bar = _progress(cfg["train_steps"], f"training the tiny reasoning model ({variant})", progress)
        t0, losses, checks = time.perf_counter(), [], []
        validation = arith.problems(VALIDATION, seed=-2, steps=None)
        model.train()
        for step in range(cfg["train_steps"]):
            ids, mask, labels = _batch(tok, rng, cfg["batch"], cache)
            kw = {"output_router_logits": True} if variant == "moe" else {}
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update()
            if step % 20 == 0:
                bar.set_postfix_str(f"loss {losses[-1]:.3f}")
            done = step + 1
            if target is not None and done >= CHECK_FROM and done % CHECK_EVERY == 0:
                model.eval()
                checks.append((done, accuracy(model, tok, validation, 1.0, seed=seed)))
                model.train()
                bar.set_postfix_str(f"loss {losses[-1]:.3f}, validation {checks[-1][1]:.2f}")
                if checks[-1][1] >= target:
                    break
        bar.close()
        model.eval()
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(out), safe_serialization=True)
        return {"variant": variant, "seed": seed, **cfg, "steps_done": done, "target": target, "validation_T1": checks, "threads": threads,
                "final_loss": round(sum(losses[-20:]) / min(20, len(losses)), 4),
                "train_seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}
    finally:
        torch.set_num_threads(old_threads)


def evaluate(path: Path, n: int = 150, temperatures=(0.0, 1.0), seed: int = 0) -> dict[str, float]:
    """Single-sample accuracy on held-out problems with a plain transformers loop (no engine), overall and per
    difficulty (``n`` problems, a third per difficulty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out: dict[str, float] = {}
    for name, lo, hi in arith.DIFFICULTY:
        rng = random.Random(f"evaluate:{name}")
        probs = [arith.make_problem(rng, rng.randint(lo, hi)) for _ in range(max(1, n // len(arith.DIFFICULTY)))]
        for t in temperatures:
            out[f"accuracy_T{t:g}_{name}"] = accuracy(model, tok, probs, t, seed)
    for t in temperatures:
        out[f"accuracy_T{t:g}"] = round(sum(out[f"accuracy_T{t:g}_{d[0]}"] for d in arith.DIFFICULTY) / len(arith.DIFFICULTY), 4)
    return out


def build_reasoning_model(path: str | os.PathLike, variant: str = "dense", *, seed: int = 0, progress: bool = True, evaluate_n: int = 150,
                          steps: int | None = None, target: float | None = TARGET, batch: int | None = None) -> Path:
    """Train (or reuse, when built with the same recipe) the reasoning model at ``path``.

    The defaults are the full recipe (the demo and the accuracy benchmark). The engine tests need only a model
    that has learned the task's format (thinking lines, "Wait" re-checks, an answer after a cut): they train
    ``steps`` steps of ``batch`` sequences with ``target=None`` and ``evaluate_n=0``, in a fraction of the time."""
    import torch

    path = Path(path)
    stamp = {"variant": variant, "seed": seed, "recipe": RECIPE, "torch": torch.__version__, "steps": steps, "target": target, "batch": batch}
    marker = path / "tts_reasoning.json"
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k in stamp} == stamp:
        return path
    if progress:
        print(f"building the tiny reasoning model ({variant}) in {path}: one-time CPU training, a few minutes", file=sys.stderr)
    tmp = path.with_name(path.name + f".building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    record = train(variant, tmp, seed=seed, progress=progress, steps=steps, target=target, batch=batch)
    if evaluate_n:
        record.update(evaluate(tmp, n=evaluate_n))
    # the stamp last: its keys (what was asked for) are what a later call compares, not the record's resolved values
    (tmp / "tts_reasoning.json").write_text(json.dumps({**record, **stamp}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # readers see either no model or a whole one
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the tiny reasoning model (cached; --force retrains).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="dense")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.force:
        shutil.rmtree(args.out, ignore_errors=True)
    build_reasoning_model(args.out, args.variant, seed=args.seed)
    print((args.out / "tts_reasoning.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
