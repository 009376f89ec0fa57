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


# --- data-parallel placement -------------------------------------------------------------


def test_placement_names_what_must_share_an_engine():
    reg = builtin_registry()
    assert services.placement(reg, {"tts_group": "q7"}) == "tts_group:q7"
    assert services.placement(reg, {"tts_roe_roster": "r", "tts_roe_roster_size": 2}) == "tts_roe_roster:r"
    assert services.placement(reg, {"tts_roe_roster_size": 4}) == "", "an unnamed roster: the request's own samples"
    assert services.placement(reg, {"tts_think_max": 4, "tts_temperature_ladder": [0.5, 1.0]}) is None, "per-row techniques"
    assert services.placement(reg, None) is None and services.placement(reg, {"other": 1}) is None
    both = {"tts_group": "g", "tts_roe_roster": "r", "tts_roe_roster_size": 2}
    assert services.placement(reg, both) == "tts_group:g", "two names: the first in sorted order, every time"


def test_ranks_are_stable_across_processes_and_cover_every_rank():
    import subprocess
    import sys

    names = [f"tts_group:g{i}" for i in range(64)]
    here = [services.rank_for(n, 4) for n in names]
    code = "import sys; from tts_plugins.services import rank_for; print([rank_for(n, 4) for n in sys.argv[1:]])"
    there = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert there.strip() == str(here), "a front end in another process sends a group to the same rank"
    assert set(here) == {0, 1, 2, 3} and all(services.rank_for(n, 1) == 0 for n in names)


def _vllm_request(extra, rank=None, rid="chatcmpl-1"):
    return types.SimpleNamespace(request_id=rid, data_parallel_rank=rank, sampling_params=types.SimpleNamespace(extra_args=extra))


def test_vllm_front_end_places_groups_and_rosters_unless_pinned():
    reg = builtin_registry()
    a, b = _vllm_request({"tts_group": "g"}, rid="x"), _vllm_request({"tts_group": "g"}, rid="y")
    assert vllm_plugin.place(a, 8, reg) == vllm_plugin.place(b, 8, reg) == services.rank_for("tts_group:g", 8)
    own = _vllm_request({"tts_roe_roster_size": 2}, rid="r-1")
    assert vllm_plugin.place(own, 8, reg) == services.rank_for("request:r-1", 8), "a request's own samples: by its id"
    pinned = _vllm_request({"tts_group": "g"}, rank=5)
    assert vllm_plugin.place(pinned, 8, reg) is None and pinned.data_parallel_rank == 5, "the client's pin wins"
    plain = _vllm_request({"tts_think_max": 3})
    assert vllm_plugin.place(plain, 8, reg) is None and plain.data_parallel_rank is None, "load balancing as before"
    one = _vllm_request({"tts_group": "g"})
    assert vllm_plugin.place(one, 1, reg) is None and one.data_parallel_rank is None


def test_vllm_counts_ranks_as_its_own_front_end_does():
    cfg = types.SimpleNamespace(data_parallel_size=4, data_parallel_size_local=2, local_engines_only=False)
    assert vllm_plugin.data_parallel_ranks(cfg) == 4
    cfg.local_engines_only = True  # external or hybrid load balancing: this front end reaches its local engines only
    assert vllm_plugin.data_parallel_ranks(cfg) == 2


def test_sglang_children_of_a_group_share_a_rank_unless_routed():
    reg = builtin_registry()
    counter = SampleCounter()
    shared = types.SimpleNamespace(n=3, custom_params={"tts_roe_roster_size": 3}, max_new_tokens=8, temperature=1.0, top_k=-1,
                                   sampling_seed=1)
    kids = [types.SimpleNamespace(sampling_params=shared, routed_dp_rank=None) for _ in range(3)]
    for kid in kids:
        sglang_child(kid, counter, reg, num_ranks=4)
    assert len({k.routed_dp_rank for k in kids}) == 1 and kids[0].routed_dp_rank is not None
    named = [types.SimpleNamespace(sampling_params=types.SimpleNamespace(n=1, custom_params={"tts_group": "q"}, max_new_tokens=8),
                                   routed_dp_rank=None) for _ in range(2)]
    for req in named:
        sglang_child(req, counter, reg, num_ranks=4)
    assert [r.routed_dp_rank for r in named] == [services.rank_for("tts_group:q", 4)] * 2, "separate requests, one group"
    routed = types.SimpleNamespace(sampling_params=types.SimpleNamespace(n=1, custom_params={"tts_group": "q"}, max_new_tokens=8),
                                   routed_dp_rank=3)
    sglang_child(routed, counter, reg, num_ranks=4)
    assert routed.routed_dp_rank == 3
    single = types.SimpleNamespace(sampling_params=types.SimpleNamespace(n=1, custom_params={"tts_group": "q"}, max_new_tokens=8),
                                   routed_dp_rank=None)
    sglang_child(single, counter, reg)
    assert single.routed_dp_rank is None, "one rank: nothing to choose"


def test_vllm_refuses_groups_and_rosters_when_tensor_parallel_ranks_sample_their_own_slots(monkeypatch):
    reg = builtin_registry()
    monkeypatch.setattr(vllm_plugin, "uses_v2_runner", lambda: True)
    sharded = types.SimpleNamespace(tensor_parallel_size=2, enable_batch_sharded_sampling=True)
    assert vllm_plugin.sharded_sampling(sharded) == 2
    for extra in ({"tts_group": "g"}, {"tts_roe_roster_size": 2}, {"tts_roe_roster": "r", "tts_roe_roster_size": 2}):
        try:
            vllm_plugin.refuse_sharded(extra, 2, reg)
        except ValueError as exc:
            assert "--enable-batch-sharded-sampling" in str(exc) and sorted(extra)[0] in str(exc)
        else:
            raise AssertionError(f"{extra} must be refused")
    vllm_plugin.refuse_sharded({"tts_think_max": 4}, 2, reg)  # per-row techniques run on the rank that samples the row
    for replicated in (types.SimpleNamespace(tensor_parallel_size=2, enable_batch_sharded_sampling=None),
                       types.SimpleNamespace(tensor_parallel_size=1, enable_batch_sharded_sampling=True),
                       types.SimpleNamespace(tensor_parallel_size=2)):  # vLLM 0.32 has no such setting
        assert vllm_plugin.sharded_sampling(replicated) == 1
    monkeypatch.setattr(vllm_plugin, "uses_v2_runner", lambda: False)
    assert vllm_plugin.sharded_sampling(sharded) == 1, "the V1 runner samples every row on every rank"


def test_placement_keys_are_the_keys_of_the_techniques_that_place():
    reg = builtin_registry()
    flat = {"tts_group": "g", "tts_group_stop_after": 2, "tts_think_max": 4, "tts_roe_roster": "r", "tts_roe_roster_size": 2}
    assert services.placement_keys(reg, flat) == ["tts_group", "tts_group_stop_after", "tts_roe_roster", "tts_roe_roster_size"]
    assert services.placement_keys(reg, {"tts_think_max": 4}) == [] and services.placement_keys(reg, None) == []
