"""Tiny local models for the demo and the tests: no hub, built in about a second.

``build_tiny_model(path, variant=...)`` trains a byte-level BPE tokenizer on
generated arithmetic text and saves a randomly initialised Qwen3 (dense) or
Qwen3-MoE model with safetensors. Variants:

* ``dense``: ``<think>``/``</think>`` are single special tokens.
* ``multi``: ``</think>`` is *not* a token; it is spelled by several ordinary
  tokens, and differently in different contexts.
* ``moe``: Qwen3-MoE, 4 experts, top-2.
* ``eager``: dense, but the weights make the first token of the end-of-thinking
  string the argmax at every step, so "the model tries to stop thinking" is
  deterministic (for the minimum/extension tests and the demo).
* ``wobbly``: dense, with ``</think>`` given about a 10% chance and EOS about
  3% at each step at temperature 1, so sampled chains end their thinking, and
  end, at different, random lengths (for group early stop and its savings).

The chat template opens ``<think>\\n`` in the assistant turn, as reasoning
models' templates do. Needs ``tokenizers``, ``transformers`` and ``torch``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK = ["<think>", "</think>"]
PHRASES = [
    "Wait",
    "Hmm",
    "Alternatively",
    "Okay, I think I have finished thinking.",
    "Considering the limited time, I have to give the solution now.",
    "Let me check the sum again.",
    "The answer is",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def _corpus(seed: int, with_think_text: bool) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(3000):
        a, b, c = rng.randint(0, 999), rng.randint(0, 999), rng.randint(1, 9)
        lines.append(f"What is {a} + {b} * {c}? {b} * {c} = {b * c}. {a} + {b * c} = {a + b * c}.")
        lines.append(f"{rng.choice(PHRASES)} {a} - {c} = {a - c}.\n\n")
    if with_think_text:
        lines += ["<think>\nfirst step\n</think>\n\nThe answer is 4."] * 50
    return lines + PHRASES * 20


def build_tokenizer(path: Path, variant: str, vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL + (THINK if variant != "multi" else ["<think>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    # The multi variant never sees "</think>" in training, so no merge spells it as one token.
    tok.train_from_iterator(_corpus(seed, with_think_text=variant != "multi"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=special[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _calibrate(model, tok, target: int, p: float, seed: int) -> float:
    """The output weight that gives ``target`` probability ``p`` on average (temperature 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok), (4, 48), generator=g)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        others = model.lm_head(h)
    lo, hi = -50.0, 50.0
    for _ in range(60):
        w = (lo + hi) / 2
        z = others.clone()
        z[:, target] = w * h[:, 0]
        lo, hi = (w, hi) if torch.softmax(z, -1)[:, target].mean() < p else (lo, w)
    return (lo + hi) / 2


def build_tiny_model(path: str | Path, variant: str = "dense", *, seed: int = 0, vocab_size: int = 512, model_vocab: int | None = None) -> Path:
    """Build (or reuse, if already built with the same recipe) a tiny model under ``path``.

    ``model_vocab``: the model's vocabulary (embedding and output rows), when larger than the tokenizer's, as
    Qwen pads 151,669 tokens to 151,936: the engine then computes and processes logits of that width, so a
    benchmark on the tiny model sees the per-step cost of a real vocabulary. The extra rows are never sampled
    by a tokenizer and decode to nothing.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    if variant not in ("dense", "multi", "moe", "eager", "wobbly"):
        raise ValueError(f"variant must be one of dense, multi, moe, eager, wobbly, got {variant!r}")
    path = Path(path)
    stamp = {"variant": variant, "seed": seed, "vocab_size": vocab_size, "recipe": 4}
    if model_vocab:
        stamp["model_vocab"] = model_vocab
    marker = path / "tts_tiny.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, variant, vocab_size, seed)
    n_vocab = len(tok)
    common = dict(
        vocab_size=max(n_vocab, model_vocab or 0),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    if variant == "moe":
        cfg = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                             decoder_sparse_step=1, **common)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        cfg = Qwen3Config(intermediate_size=128, **common)
        model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init: distinct, confident argmaxes
            p.mul_(4.0) if p.dim() > 1 else None
        if variant in ("eager", "wobbly"):
            # A constant residual direction (embedding column 0) read only by the end token's output row.
            target = tok.convert_tokens_to_ids("</think>")
            model.model.embed_tokens.weight[:, 0] = 30.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[target, 0] = 10.0 if variant == "eager" else _calibrate(model, tok, target, 0.10, seed)
            if variant == "wobbly":  # and chains end (EOS) at random lengths too, for First Finish Search
                model.lm_head.weight[tok.eos_token_id, 0] = _calibrate(model, tok, tok.eos_token_id, 0.03, seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    marker.write_text(json.dumps(stamp))
    return path
