"""Built-in hook implementations that are not techniques: the think-string fallback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tts_plugins.hookspecs import hookimpl
from tts_plugins.manager import env_think_strings


# Thinking delimiters of model families, as single tokens in their tokenizers (first match wins).
KNOWN_PAIRS = (
    ("<think>", "</think>"),
    ("<seed:think>", "</seed:think>"),
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
    ("<reasoning>", "</reasoning>"),
)


def tokenizer_pair(tokenizer: Any) -> tuple[str, str] | None:
    """The first known start/end pair that the tokenizer has as added (special) tokens."""
    try:
        added = set(tokenizer.get_added_vocab())
    except Exception:  # not a Hugging Face tokenizer
        return None
    for start, end in KNOWN_PAIRS:
        if start in added and end in added:
            return start, end
    return None


@hookimpl(trylast=True)
def tts_think_strings(tokenizer: Any, engine_hint: Mapping[str, str] | None) -> tuple[str, str]:
    """Server-level environment override, then the engine's reasoning config, then the tokenizer's own
    thinking tokens, then ``<think>``/``</think>``."""
    env_start, env_end = env_think_strings()
    hint = engine_hint or {}
    found = tokenizer_pair(tokenizer) or ("<think>", "</think>")
    start = env_start if env_start is not None else hint.get("start") or found[0]
    end = env_end if env_end is not None else hint.get("end") or found[1]
    return start, end
