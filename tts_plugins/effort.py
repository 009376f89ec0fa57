"""``reasoning_effort`` as a thinking budget: the server's map from effort levels to a technique's budget key.

The stock OpenAI client sends ``reasoning_effort="low" | "medium" | "high"`` (and vLLM and SGLang accept a few more
levels). Both engines pass it to the chat template only, where most open reasoning models' templates ignore it, so
on its own it does not limit thinking. With the plugins installed, a chat request that names an effort level gets
the thinking cap of that level, ``tts_think_max``, as if the client had sent it: the think technique then counts
the request's thinking tokens and forces the conclusion and the end of thinking at the budget. The key is the one a
registered technique declares as its ``effort_key`` (the built-in think technique's is ``tts_think_max``); the core
names none.

The map is the server's, from the environment variable ``TTS_PLUGINS_REASONING_EFFORT``, read once at start-up:
comma-separated ``level=tokens`` entries, tokens an integer >= 0, 0 meaning no cap (the level thinks as long as
the model does). Entries given replace the defaults of their levels; the others keep theirs. A malformed map stops
the server at start-up with a message naming the entry (a server that silently ignored it would not limit
anything). Rules:

* An explicit key of the technique's ``effort_yields_to`` on the request (``tts_think_max``, ``tts_no_think``) wins:
  the effort level adds nothing.
* A level the map does not hold (``"none"``, a number, a level of one engine only) adds nothing: ``"none"`` is
  already the engines' own switch (both set the template's ``enable_thinking`` to false).
* Only the chat endpoint carries ``reasoning_effort``; the completions endpoint has no such field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from tts_plugins import envvars
from tts_plugins.manager import Registry, default_registry

__all__ = ["DEFAULT_EFFORT", "ENV", "budget_request", "effort_map", "parse_effort_map", "startup_checks"]

ENV = "TTS_PLUGINS_REASONING_EFFORT"
# thinking tokens per level (0: no cap). The OpenAI levels; "xhigh" and "max" (vLLM, SGLang) think as long as they like.
DEFAULT_EFFORT: dict[str, int] = {"minimal": 256, "low": 1024, "medium": 4096, "high": 0, "xhigh": 0, "max": 0}
MAX_BUDGET = 1 << 30
_LEVEL = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


def parse_effort_map(text: str | None, defaults: Mapping[str, int] = DEFAULT_EFFORT) -> dict[str, int]:
    """The map of ``text`` (``"low=1024,medium=4096,high=0"``) over ``defaults``; ValueError naming a bad entry."""
    out = dict(defaults)
    if text is None or not text.strip():
        return out
    for entry in text.split(","):
        item = entry.strip()
        if not item:
            continue
        level, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not _LEVEL.match(level) or not re.fullmatch(r"\d+", value) or int(value) > MAX_BUDGET:
            raise ValueError(f"{ENV}: bad entry {item!r} in {text!r}: expected level=tokens, a level name (like low) and "
                             f"an integer number of thinking tokens from 0 to {MAX_BUDGET} (0: no cap), comma-separated, "
                             "e.g. low=1024,medium=4096,high=0")
        out[level.lower()] = int(value)
    return out


_CACHE: dict[str, dict[str, int]] = {}


def effort_map() -> dict[str, int]:
    """This process's map (the environment variable over the defaults), parsed once; ValueError when malformed."""
    text = envvars.get(ENV) or ""
    found = _CACHE.get(text)
    if found is None:
        found = _CACHE[text] = parse_effort_map(text)
    return found


def budget_request(effort: Any, extra: Mapping[str, Any] | None, registry: Registry | None = None) -> dict[str, Any] | None:
    """The request's flat parameters with the budget of ``effort`` added under the key a registered technique declares
    (``effort_key``), as a new dict; None when the effort adds nothing (no effort, a level without a cap, no technique
    declares a key, or the request sends one of the keys the technique yields to)."""
    if not isinstance(effort, str):
        return None
    budget = effort_map().get(effort.strip().lower(), 0)
    if budget <= 0:
        return None
    declared = (registry or default_registry()).effort
    if declared is None:
        return None
    key, yields = declared
    if extra and any(k in extra for k in yields):
        return None
    return {**(extra or {}), key: budget}


def startup_checks(log: logging.Logger) -> None:
    """Run by each engine's plugin entry point: server settings that cannot work stop the server at start-up. Both
    engines log and skip a plugin that raises an Exception, which would leave such a setting silently unapplied,
    so this raises SystemExit: a malformed ``TTS_PLUGINS_REASONING_EFFORT``."""
    try:
        effort_map()
    except ValueError as exc:
        log.error("tts_plugins: %s", exc)
        raise SystemExit(f"tts_plugins: {exc}") from None
