"""Admission refusals that depend on what the techniques declare: structured outputs and tools.

A structured output (a JSON schema, regex, choice or grammar) masks every token the grammar does not allow, and a
tool call must stay parseable. A technique that forces or forbids tokens says where, per key
(:class:`tts_plugins.params.Key` ``forces``, or its ``forcing`` classmethod when it depends on the value):

* ``"thinking"``: only inside the thinking block. Safe when the server applies the grammar after thinking (the
  engines' reasoning parser arranges it, ``flag``); refused when the grammar rules from the first token, since the
  grammar would reject the forced text (an engine then ends the request with a server error, or masks every token).
* ``"answer"``: inside the answer too, where the grammar rules and where a tool call is written: refused with any
  structured output and with tools (``tool_choice`` other than ``"none"``).

The core names no technique: a third-party plugin's declarations are read the same way. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tts_plugins.manager import Registry, default_registry
from tts_plugins.params import show, tts_keys

STRUCTURED = "a structured output (response_format, a JSON schema, regex or grammar)"


def _forcing(flat: Mapping[str, Any] | None, registry: Registry | None) -> tuple[dict[str, Any], dict[str, str]]:
    keys = tts_keys(flat) if isinstance(flat, Mapping) else {}
    if not keys:
        return keys, {}
    return keys, (registry or default_registry()).forcing(keys)


def _named(keys: Mapping[str, Any], names: list[str]) -> str:
    def one(k: str) -> str:
        try:
            return f"{k}={json.dumps(keys[k])}"
        except (TypeError, ValueError):
            return f"{k}={show(keys[k])}"

    return ", ".join(one(k) for k in names)


def refuse_structured(flat: Mapping[str, Any] | None, grammar_after_thinking: bool, flag: str, registry: Registry | None = None) -> None:
    """ValueError when a request with a structured output carries keys whose forced text the grammar could reject:
    ``"answer"`` keys always, ``"thinking"`` keys unless the grammar applies after thinking (``flag``: the engine's
    option that arranges it)."""
    keys, where = _forcing(flat, registry)
    _refuse_answer(keys, where, STRUCTURED, "where the grammar may not allow them; drop the key or the structured output")
    thinking = sorted(k for k, w in where.items() if w == "thinking")
    if thinking and not grammar_after_thinking:
        raise ValueError(f"{', '.join(thinking)}: with {STRUCTURED} these need the server's {flag}, so that the grammar "
                         "applies after the thinking block: they force text inside it, which a grammar applied from the "
                         "first token would reject")


def refuse_tools(flat: Mapping[str, Any] | None, tools: Any, tool_choice: Any, registry: Registry | None = None) -> None:
    """ValueError when a request that lets the model call tools carries ``"answer"`` keys: the technique would force
    or forbid tokens inside the answer, possibly inside a tool call, leaving a broken call. ``"thinking"`` keys land
    before any call (``tool_choice`` "required" or a named function is a structured output: :func:`refuse_structured`)."""
    if not tools or tool_choice == "none":
        return
    keys, where = _forcing(flat, registry)
    _refuse_answer(keys, where, 'tools (tool_choice other than "none")',
                   'possibly inside a tool call; drop the key, or use tool_choice="none"')


def _refuse_answer(keys: Mapping[str, Any], where: Mapping[str, str], what: str, why: str) -> None:
    answer = sorted(k for k, w in where.items() if w == "answer")
    if answer:
        raise ValueError(f"{_named(keys, answer)} cannot be combined with {what}: "
                         f"{'this key makes' if len(answer) == 1 else 'these keys make'} a technique force or forbid tokens "
                         f"inside the answer, {why}")
