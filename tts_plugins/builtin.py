"""Every built-in registration, in one place: the techniques, their model patches and the think-string fallback.

The built-ins are registered through the same hooks as any third-party plugin.
:data:`TECHNIQUES` (the techniques and model patches) is its own plugin object,
so a plugin manager can leave the built-in techniques out
(``plugin_manager(builtin_techniques=False)``: the conformance suite, tests);
this module itself carries the hooks every manager has (the think-string
fallback). Importing it imports no engine: each patch imports its engine in
``install()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tts_plugins import envvars
from tts_plugins.hookspecs import hookimpl


class BuiltinTechniques:
    """The built-in techniques and the model patches they need, one instance per engine."""

    @hookimpl
    def tts_register_techniques(self, register: Callable[[type], None]) -> None:
        from tts_plugins.logits_processors.carbon import CarbonCalibration
        from tts_plugins.logits_processors.conf import ConfStop
        from tts_plugins.logits_processors.group import GroupStop
        from tts_plugins.logits_processors.roster import RoERoster
        from tts_plugins.logits_processors.think import ThinkSteering
        from tts_plugins.logits_processors.trim import ThoughtTrim

        # the order of apply is the registry's, from each technique's declarations (ConfStop declares runs_before "*")
        for cls in (ConfStop, ThinkSteering, ThoughtTrim, GroupStop, CarbonCalibration, RoERoster):
            register(cls)

    @hookimpl
    def tts_register_model_patches(self, register: Callable[[Any], None]) -> None:
        from tts_plugins.adapters.ladder import SglangLadderPatch, VllmLadderPatch
        from tts_plugins.adapters.roster import SglangRosterPatch, VllmRosterPatch
        from tts_plugins.adapters.sglang_moi import SglangMoIPatch
        from tts_plugins.adapters.sglang_roe import SglangRoEPatch
        from tts_plugins.adapters.vllm_moi import VllmMoIPatch
        from tts_plugins.adapters.vllm_roe import VllmRoEPatch

        # The order is the order of the services' calls (cache salts, per-sample edits, step observers).
        for patch in (VllmMoIPatch, SglangMoIPatch, VllmLadderPatch, SglangLadderPatch, VllmRoEPatch, SglangRoEPatch,
                      VllmRosterPatch, SglangRosterPatch):
            register(patch())


TECHNIQUES = BuiltinTechniques()


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


def env_think_strings() -> tuple[str | None, str | None]:
    """The server-level overrides ``TTS_PLUGINS_THINK_START`` / ``TTS_PLUGINS_THINK_END`` (None: not set)."""
    return envvars.get("TTS_PLUGINS_THINK_START"), envvars.get("TTS_PLUGINS_THINK_END")


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
