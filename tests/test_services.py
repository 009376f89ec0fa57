"""The core's services (tts_plugins.services): what the adapters offer every technique, without naming any."""

from __future__ import annotations

import types

import numpy as np

from tts_plugins import hookimpl, services
from tts_plugins.adapters import vllm_plugin
from tts_plugins.adapters.sglang import SampleCounter, sglang_child
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.services import SampleEdit
from tts_plugins.technique import ModelPatch


def builtin_registry():
    return build_registry(plugin_manager(load_entry_points=False))


def test_sample_edits_of_every_patch_are_merged():
    """A ladder and a roster of a request's own samples: sample i gets its rung, the roster's name and its own seed."""
    reg = builtin_registry()
    flat = {"tts_temperature_ladder": [0.5, 1.5], "tts_roe_roster_size": 2}
    for engine in ("vllm", "sglang"):
        edit = services.sample_edit(reg, engine, flat, 1, "req-7")
        assert edit == SampleEdit(temperature=1.5, extra={"tts_roe_roster": "n:req-7"}, own_seed=True)
    assert services.sample_edit(reg, "vllm", {"tts_think_max": 3}, 0, "req-7") is None, "no patch edits this request"
    assert services.sample_edit(reg, "vllm", None, 0, None) is None
    named = {"tts_roe_roster": "mine", "tts_roe_roster_size": 2}
    assert services.sample_edit(reg, "vllm", named, 0, "req-7") is None, "a named roster is not renamed"


def test_cache_salts_are_declared_by_the_patches_and_combined():
    reg = builtin_registry()
    both = {"tts_moi_beta": 0.5, "tts_roe_tau": 2.0, "tts_think_max": 4}
    assert services.cache_salt(reg, "vllm", both, "r1", 3) == "tts_plugins:moi:beta=0.5:topk=20|tts_plugins:roe:tau=2.0:seed=3"
    # SGLang keeps mixed KV out of its radix cache instead (skip_radix_cache_insert): only RoE salts there
    assert services.cache_salt(reg, "sglang", both, "r1", 3) == "tts_plugins:roe:tau=2.0:seed=3"
    assert services.cache_salt(reg, "vllm", {"tts_moi_beta": 0.5, "tts_moi_topk": 5}, "r1", None) != \
        services.cache_salt(reg, "vllm", {"tts_moi_beta": 0.5}, "r1", None), "settings that change the KV change the salt"
    unseeded = services.cache_salt(reg, "vllm", {"tts_roe_tau": 1.0}, "r1", None)
    assert unseeded != services.cache_salt(reg, "vllm", {"tts_roe_tau": 1.0}, "r2", None), "unseeded noise differs per request"
    assert services.cache_salt(reg, "vllm", {"tts_think_max": 4}, "r1", 3) is None
    assert services.cache_salt(reg, "vllm", {"tts_roe_tau": 0.0}, "r1", 3) is None, "tau 0 is the model's own routing"


def test_only_patches_that_observe_the_step_are_step_observers():
    reg = builtin_registry()
    assert [(p.name, p.engine) for p in services.step_observers(reg, "sglang")] == [("moi", "sglang")]
    assert services.step_observers(reg, "vllm") == ()


class Doubler(ModelPatch):
    """A third-party patch using the per-sample service: sample i runs at temperature 0.1 * (i + 1)."""

    name, engine, keys = "doubler", "sglang", frozenset({"tts_doubler"})

    @classmethod
    def parse_params(cls, flat):
        return flat.get("tts_doubler")

    def install(self, patcher):
        pass

    def sample_edit(self, parsed, index, parent_id):
        return SampleEdit(temperature=0.1 * (index + 1)) if parsed.get(self.name) else None


def test_a_third_party_patch_subscribes_to_the_per_sample_hook():
    class Plugin:
        @hookimpl
        def tts_register_model_patches(self, register):
            register(Doubler())

    reg = build_registry(plugin_manager(load_entry_points=False, builtin_techniques=False, extra_plugins=[Plugin()]))
    shared = types.SimpleNamespace(n=3, custom_params={"tts_doubler": True}, max_new_tokens=8, temperature=0.9, top_k=50, sampling_seed=4)
    counter = SampleCounter()
    kids = [types.SimpleNamespace(sampling_params=shared) for _ in range(3)]
    for kid in kids:
        sglang_child(kid, counter, reg)
    assert [round(k.sampling_params.temperature, 6) for k in kids] == [0.1, 0.2, 0.3]
    assert [k.sampling_params.sampling_seed for k in kids] == [4, 4, 4], "own seeds only when a patch asks for them"
    assert shared.temperature == 0.9 and not counter.sent


def test_vllm_discarded_rows_are_read_from_the_sampling_runner_only():
    mask = np.array([False, True, False, False])
    runner = types.SimpleNamespace(discard_request_mask=types.SimpleNamespace(np=mask))
    seen = []
    sample_tokens = vllm_plugin._wrap_sample_tokens(lambda self, grammar: seen.append(vllm_plugin.discarded_rows(3)))
    assert vllm_plugin.discarded_rows(3) is None, "outside a sampling step nothing is known"
    sample_tokens(runner, None)
    assert seen[0].tolist() == [False, True, False]
    assert vllm_plugin.discarded_rows(3) is None, "the mark ends with the step"
