"""Per-request parameters: the shared validators every technique's parser uses.

vLLM's ``vllm_xargs`` carries only a flat dict of str/int/float (or lists), and
SGLang's ``custom_params`` must survive msgpack, so every technique reads its
options from one flat key space. Parsing runs once, at admission, in the
engine's API process. Every error is a ``ValueError`` naming the key, the value
received and what was expected; the ``get_*`` helpers here word it the same way
for every technique (``tts_think_max must be an int >= 0, got -3``).

Each technique's parameter class (a frozen dataclass with a ``parse(flat)``
classmethod, torch-free in behaviour) lives beside the technique, in its
module under ``tts_plugins.logits_processors`` (``ThinkParams`` in ``think``,
``TrimParams`` in ``trim``, ...), so adding a technique does not touch this
module. This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "tts_"
MAX_INT = 2**31 - 1
MAX_TEXT = 1024
WHERE = ("thinking", "answer")  # where a key may make its technique force or forbid tokens (Key.forces)


@dataclass(frozen=True)
class Key:
    """One request key, as a technique or model patch declares it (``key_specs``).

    The request-key reference (the docs, ``tts plugins``) is generated from these declarations, and the core reads
    ``forces`` to refuse requests whose forced text a structured output or a tool call could break.

    ``name``: the ``tts_*`` key. ``type``: what a value must be, in words (``"int >= 0"``, ``"one of 'think',
    'eos'"``). ``default``: what the technique uses when the key is absent (``None``: off, or not set). ``doc``: what
    the key does, in a sentence or two. ``forces``: where setting the key makes the technique force or forbid tokens:
    ``None`` (nowhere: it only reweights, measures or stops at the engine's own EOS), ``"thinking"`` (only inside the
    thinking block: allowed with a structured output when the server applies the grammar after thinking, and with
    tools), ``"answer"`` (inside the answer too: refused with any structured output and with tools). A technique whose
    answer-side effect depends on the value overrides ``LogitsTechnique.forcing``.
    """

    name: str
    type: str
    default: Any
    doc: str
    forces: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.startswith(PREFIX):
            raise ValueError(f"Key name must be a str starting with {PREFIX!r}, got {self.name!r}")
        if self.forces is not None and self.forces not in WHERE:
            raise ValueError(f"Key {self.name}: forces must be None or one of {WHERE}, got {self.forces!r}")


def show(value: Any) -> str:
    """``repr(value)`` cut to 80 characters, for error messages that quote what a client sent."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def get_int(flat: Mapping[str, Any], key: str, default: int | None = None, *, minimum: int = 0, maximum: int = MAX_INT) -> int | None:
    """An int in [minimum, maximum]; bools and non-integral floats are refused."""
    if key not in flat:
        return default
    value = flat[key]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an int >= {minimum}, got {show(flat[key])}")
    if value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{key} must be an int <= {maximum}, got {value}")
    return value


def get_float(
    flat: Mapping[str, Any], key: str, default: float | None = None, *, minimum: float, maximum: float, open_min: bool = False
) -> float | None:
    """A finite float in [minimum, maximum] (``(minimum, maximum]`` with ``open_min``); bools are refused."""
    if key not in flat:
        return default
    value = flat[key]
    low = "> " if open_min else ">= "
    want = f"a finite number {low}{minimum:g} and <= {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be {want}, got {show(value)}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (open_min and value == minimum) or value > maximum:
        raise ValueError(f"{key} must be {want}, got {show(flat[key])}")
    return value


def get_number_list(flat: Mapping[str, Any], key: str, noun: str, *, max_items: int, maximum: float, note: str = "") -> tuple[float, ...]:
    """A list of 1 to ``max_items`` finite numbers in [0, maximum] (``key`` must be present)."""
    value = flat[key]
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items:
        raise ValueError(f"{key} must be a list of 1 to {max_items} {noun}{note}, got {show(value)}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= maximum:
            raise ValueError(f"{key} must hold {noun} in [0, {maximum:g}], got {show(t)} in {show(value)}")
    return tuple(float(t) for t in value)


def get_bool(flat: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A bool; 0/1 and "true"/"false" are accepted because some transports stringify."""
    if key not in flat:
        return default
    value = flat[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{key} must be a bool (true/false), got {show(value)}")


def get_text(flat: Mapping[str, Any], key: str, default: str, *, allow_empty: bool = True) -> str:
    """A string of at most MAX_TEXT characters."""
    if key not in flat:
        return default
    value = flat[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {show(value)}")
    if not allow_empty and not value:
        raise ValueError(f"{key} must be a non-empty string, got ''")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{key} must be a string of at most {MAX_TEXT} characters, got {len(value)} characters")
    if "\x00" in value:
        raise ValueError(f"{key} must not contain NUL characters, got {show(value)}")
    return value


def tts_keys(flat: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``tts_*`` subset of a request's extra arguments (others belong to someone else)."""
    if not flat:
        return {}
    if not isinstance(flat, Mapping):
        raise ValueError(f"request extra arguments must be a JSON object, got {show(flat)}")
    return {k: v for k, v in flat.items() if isinstance(k, str) and k.startswith(PREFIX)}


def get_choice(flat: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (compared exactly)."""
    if key not in flat:
        return default
    value = flat[key]
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {show(value)}")
    return value


def get_text_list(flat: Mapping[str, Any], key: str, default: tuple[str, ...], *, max_items: int = 16) -> tuple[str, ...]:
    """1 to ``max_items`` non-empty strings of at most 64 characters; a single string is a list of one."""
    if key not in flat:
        return default
    value = flat[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or len(value) > max_items:
        raise ValueError(f"{key} must be a list of 1 to {max_items} non-empty strings, got {show(value)}")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > 64:
            raise ValueError(f"{key} must be a list of non-empty strings of at most 64 characters, got item {show(item)}")
    return tuple(value)


def refuse_speculative(flat: Mapping[str, Any] | None, flag: str) -> None:
    """ValueError when a request carries ``tts_*`` keys on a server that runs speculative decoding (``flag``: the
    engine's option). The techniques need one sampled row per request and step; speculative decoding samples draft
    tokens in extra rows and may reject them, so they cannot work there, and running the request plain would drop
    what the client asked for without a word."""
    keys = sorted(tts_keys(flat)) if isinstance(flat, Mapping) else []
    if keys:
        raise ValueError(f"{', '.join(keys)}: tts_* parameters cannot be used on a server that runs speculative decoding "
                         f"({flag}): the techniques need one sampled row per request and step. Send the request to a server "
                         "without speculative decoding, or without these keys")
