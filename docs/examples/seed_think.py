"""tts_think_strings: the thinking strings of a model family whose tokenizer does not declare them.

ByteDance's Seed-OSS models think between ``<seed:think>`` and ``</seed:think>``. Return them for those models and
``None`` for every other, so the next implementation (in the end the built-in one: the server's environment
override, the engine's reasoning config, the tokenizer's own thinking tokens, ``<think>``) decides.
"""

from __future__ import annotations

from tts_plugins import hookimpl


@hookimpl
def tts_think_strings(tokenizer, model_name, engine_hint):
    if model_name and "seed-oss" in model_name.lower():
        return "<seed:think>", "</seed:think>"
    return None
