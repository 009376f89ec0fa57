"""The built-in techniques, registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable

from tts_plugins.hookspecs import hookimpl


@hookimpl
def tts_register_techniques(register: Callable[[type], None]) -> None:
    from tts_plugins.logits_processors.group import GroupStop
    from tts_plugins.logits_processors.think import ThinkSteering
    from tts_plugins.logits_processors.trim import ThoughtTrim

    register(ThinkSteering)
    register(ThoughtTrim)
    register(GroupStop)
