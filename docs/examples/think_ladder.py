"""tts_register_model_patches: a thinking-budget ladder over a request's samples.

``tts_think_ladder: [256, 1024, 4096]`` gives sample ``i`` of a request with ``n`` samples the thinking cap
``ladder[i % len]`` (``tts_think_max``), so one request spreads its samples over several budgets. It changes nothing
inside the model: it uses one of the core's services, the per-sample front-end hook (``ModelPatch.sample_edit``), so
``install`` has nothing to patch. One instance per engine; both share ``name`` and ``keys``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tts_plugins import hookimpl
from tts_plugins.params import Key, get_number_list
from tts_plugins.services import SampleEdit
from tts_plugins.technique import ModelPatch


@dataclass(frozen=True)
class ThinkLadderParams:
    caps: tuple[int, ...]

    @classmethod
    def parse(cls, flat):
        if "tts_think_ladder" not in flat:
            return None  # not opted in
        caps = get_number_list(flat, "tts_think_ladder", "thinking caps", max_items=64, maximum=1_000_000)
        if any(c != int(c) or c < 1 for c in caps):
            raise ValueError(f"tts_think_ladder must hold ints >= 1, got {list(caps)!r}")
        return cls(tuple(int(c) for c in caps))


class ThinkLadderBase(ModelPatch):
    name = "think_ladder"
    key_specs = (Key("tts_think_ladder", "list of 1 to 64 ints >= 1", None,
                     "Sample i of the request thinks at most ladder[i % len] tokens (its tts_think_max)."),)
    keys = frozenset(k.name for k in key_specs)
    params = ThinkLadderParams  # the default parse_params is ThinkLadderParams.parse
    feature = "the thinking-budget ladder"

    @classmethod
    def conformance_params(cls):
        return [{"tts_think_ladder": [16, 64]}, {"tts_think_ladder": [32]}]

    def install(self, patcher):
        """Nothing to patch: the core's per-sample hook calls sample_edit."""

    def sample_edit(self, parsed, index, parent_id):
        params = parsed.get(self.name)
        if params is None:
            return None
        return SampleEdit(extra={"tts_think_max": params.caps[index % len(params.caps)]})


# the engine versions whose front end the core's per-sample hook was written for
class VllmThinkLadder(ThinkLadderBase):
    engine, label, min_version, max_version = "vllm", "vLLM", "0.32", "0.35"


class SglangThinkLadder(ThinkLadderBase):
    engine, label, min_version, max_version = "sglang", "SGLang", "0.5.20", "0.6"


@hookimpl
def tts_register_model_patches(register):
    register(VllmThinkLadder())
    register(SglangThinkLadder())
