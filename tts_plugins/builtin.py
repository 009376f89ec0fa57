"""Built-in hook implementations that are not techniques: the think-string fallback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tts_plugins.hookspecs import hookimpl
from tts_plugins.manager import env_think_strings


@hookimpl(trylast=True)
def tts_think_strings(tokenizer: Any, engine_hint: Mapping[str, str] | None) -> tuple[str, str]:
    """Server-level environment override, then the engine's own reasoning config, then <think>/</think>."""
    env_start, env_end = env_think_strings()
    hint = engine_hint or {}
    start = env_start if env_start is not None else hint.get("start") or "<think>"
    end = env_end if env_end is not None else hint.get("end") or "</think>"
    return start, end
