"""Model patches under the conformance suite: every built-in patch of both engines keeps the host-side
invariants, and a deliberately broken patch fails them (the engine half runs in tests/engine/)."""

from __future__ import annotations

from typing import Any

import pytest

from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.technique import ModelPatch
from tts_plugins.testing.conformance import PATCH_CHECKS, ConformanceError, check_patch_in_engine

PATCHES = {f"{p.engine}:{p.name}": type(p) for p in build_registry(plugin_manager(load_entry_points=False)).model_patches()}


def test_the_built_in_patches_are_all_here():
    names = {k.split(":")[1] for k in PATCHES}
    assert {"moi", "roe", "temperature_ladder", "roe_roster_gate"} <= names, names
    assert {k.split(":")[0] for k in PATCHES} == {"vllm", "sglang"}


@pytest.mark.parametrize("check", sorted(PATCH_CHECKS))
@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_every_built_in_patch_keeps_the_invariants(patch, check):
    PATCH_CHECKS[check](PATCHES[patch])


class Sloppy(ModelPatch):
    """Accepts anything for its key, and crashes on a dict."""

    name, engine, keys = "sloppy", "vllm", frozenset({"tts_sloppy"})

    @classmethod
    def parse_params(cls, flat: Any) -> Any:
        if "tts_sloppy" not in flat:
            return None
        value = flat["tts_sloppy"]
        return len(value) if isinstance(value, dict) else value + 0 if isinstance(value, int) else 1

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [{"tts_sloppy": 1}, {"tts_other": 2}]


class Unkeyed(Sloppy):
    """Has keys but no example parameters."""

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return []


@pytest.mark.parametrize("patch,check,why", [
    (Sloppy, "patch_parse_rejects_bad_input", "accepted every junk value"),
    (Sloppy, "patch_examples_parse", "does not turn the patch on"),
    (Unkeyed, "patch_examples_parse", "no parameter set"),
])
def test_a_broken_patch_fails(patch, check, why):
    with pytest.raises(ConformanceError, match=why):
        PATCH_CHECKS[check](patch)


def test_the_engine_half_catches_a_patch_that_leaks_into_plain_rows():
    """The engine check with a stand-in engine whose opted-in requests shift their batch neighbours' tokens."""

    class Leaky(Sloppy):
        @classmethod
        def neutral_params(cls) -> list[dict[str, Any]]:
            return [{"tts_sloppy": 0}]

        @classmethod
        def conformance_params(cls) -> list[dict[str, Any]]:
            return [{"tts_sloppy": 1}]

    def leaky_engine(prompts, params, max_new):
        opted = any(params)
        return [[t + (1 if opted and not p else 0) for t in prompt[:max_new]] for prompt, p in zip(prompts, params)]

    def neutral_changes_output(prompts, params, max_new):
        return [[t + (p.get("tts_sloppy", 0) == 0 and bool(p)) for t in prompt[:max_new]] for prompt, p in zip(prompts, params)]

    with pytest.raises(ConformanceError, match="patch_plain_rows_identical"):
        check_patch_in_engine(Leaky, leaky_engine, [[1, 2, 3], [4, 5]])
    with pytest.raises(ConformanceError, match="patch_neutral_is_plain"):
        check_patch_in_engine(Leaky, neutral_changes_output, [[1, 2, 3], [4, 5]])
    check_patch_in_engine(Leaky, lambda ps, params, n: [list(p[:n]) for p in ps], [[1, 2, 3], [4, 5]])  # a faithful engine passes
