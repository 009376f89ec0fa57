"""The built-in techniques, registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable

from tts_plugins.hookspecs import hookimpl


@hookimpl
def tts_register_techniques(register: Callable[[type], None]) -> None:
    from tts_plugins.logits_processors.carbon import CarbonCalibration
    from tts_plugins.logits_processors.group import GroupStop
    from tts_plugins.logits_processors.roster import RoERoster
    from tts_plugins.logits_processors.think import ThinkSteering
    from tts_plugins.logits_processors.trim import ThoughtTrim

    register(ThinkSteering)
    register(ThoughtTrim)
    register(GroupStop)
    register(CarbonCalibration)
    register(RoERoster)


@hookimpl
def tts_register_model_patches(register: Callable[[object], None]) -> None:
    # Importing these modules imports no engine: each patch imports its engine in install().
    from tts_plugins.adapters.ladder import SglangLadderPatch, VllmLadderPatch
    from tts_plugins.adapters.sglang_moi import SglangMoIPatch
    from tts_plugins.adapters.vllm_moi import VllmMoIPatch

    register(VllmMoIPatch())
    register(SglangMoIPatch())
    register(VllmLadderPatch())
    register(SglangLadderPatch())
    from tts_plugins.adapters.sglang_roe import SglangRoEPatch
    from tts_plugins.adapters.vllm_roe import VllmRoEPatch

    register(VllmRoEPatch())
    register(SglangRoEPatch())
    from tts_plugins.adapters.roster import SglangRosterPatch, VllmRosterPatch

    register(VllmRosterPatch())
    register(SglangRosterPatch())
