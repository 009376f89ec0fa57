"""The temperature ladder in each engine: which versions' front ends the core's per-sample hook was read for.

The technique is engine-neutral (:mod:`tts_plugins.logits_processors.ladder`):
the core's per-sample front-end hook (``tts_plugins.adapters.vllm_plugin``:
``OutputProcessor.add_request``; ``tts_plugins.adapters.sglang``:
``TokenizerManager`` sends) asks the patch for each child's rung and applies
it. These classes only say which engine versions admission accepts the key on.
"""

from __future__ import annotations

from tts_plugins import patching
from tts_plugins.adapters import vllm_support
from tts_plugins.logits_processors.ladder import LadderPatchBase


class VllmLadderPatch(LadderPatchBase):
    engine, label, min_version, max_version = "vllm", "vLLM", vllm_support.MIN_VERSION, vllm_support.MAX_VERSION


class SglangLadderPatch(LadderPatchBase):
    engine, label, min_version, max_version = "sglang", "SGLang", patching.SGLANG_MIN_VERSION, patching.SGLANG_MAX_VERSION
