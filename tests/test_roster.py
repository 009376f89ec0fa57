"""RoE rosters: the aggregation kernel against a per-roster float64 reference, desynchronized members, the
scheduler gate and the front ends' naming of a request's samples."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins import services
from tts_plugins.adapters.sglang import SampleCounter, sglang_child
from tts_plugins.adapters.vllm_plugin import child_params as vllm_child_params
from tts_plugins.batch import SlotState
from tts_plugins.logits_processors.roe import ROE_MAX_TAU, RoEPatchBase
from tts_plugins.logits_processors.roster import GATE_SEP, ROE_PATCH, ROSTER_MAX_TAU, RoERoster, RosterGate, RosterParams, roster_of
from tts_plugins.manager import default_registry
from tts_plugins.technique import EngineInfo, SlotRequest
from tts_plugins.testing.conformance import registry_for

V = 40
SLOTS = 12


def state() -> SlotState:
    return SlotState(registry_for(RoERoster), EngineInfo(vocab_size=V, max_slots=SLOTS, device=torch.device("cpu")))


def admit(s: SlotState, slot: int, name: str, size: int, *, greedy: bool = True, temperature: float = 1.0, seed: int | None = None) -> None:
    s.admit(slot, {"roe_roster": RosterParams(name, size)}, SlotRequest((1, 2), greedy, temperature, seed))


@st.composite
def batches(draw):
    """Rosters of 2-4 members (greedy or not), plain rows, shuffled into a batch."""
    rows: list[tuple[int, str | None, bool, float]] = []  # (slot, roster, greedy, temperature)
    slot = 0
    for r in range(draw(st.integers(1, 3))):
        k = draw(st.integers(2, 4))
        greedy = draw(st.booleans())
        for _ in range(k):
            rows.append((slot, f"r{r}", greedy, draw(st.sampled_from([0.5, 1.0, 1.7]))))
            slot += 1
    for _ in range(draw(st.integers(0, 3))):
        rows.append((SLOTS, None, True, 1.0))
    perm = draw(st.permutations(range(len(rows))))
    return [rows[i] for i in perm], draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(batches())
def test_members_emit_one_token_drawn_from_the_roster_mean_and_other_rows_are_untouched(case):
    rows, seed = case
    s = state()
    sizes = {}
    for _, name, _, _ in rows:
        if name:
            sizes[name] = sizes.get(name, 0) + 1
    for slot, name, greedy, temp in rows:
        if name:
            admit(s, slot, name, sizes[name], greedy=greedy, temperature=temp, seed=7)
    z = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(seed)) * 3
    host = np.array([r[0] for r in rows], dtype=np.int64)
    out = s.apply(z.clone(), torch.from_numpy(host), host)
    tech = s.techniques[0]
    for i, (_slot, name, _, _) in enumerate(rows):
        if name is None:
            assert torch.equal(out[i], z[i]), "a row outside every roster changed"
    for name in sizes:
        idx = [i for i, r in enumerate(rows) if r[1] == name]
        toks = {int(out[i].argmax()) for i in idx}
        assert len(toks) == 1, f"members of {name} emit different tokens {toks}"
        tok = toks.pop()
        for i in idx:  # forced: one finite logit
            assert torch.isfinite(out[i]).sum() == 1 and out[i, tok] == 0
        if rows[idx[0]][2]:  # greedy roster: the argmax of the float64 mean, one member at a time
            mean = tech.reference_mean(z[idx], [rows[i][0] for i in idx])
            assert mean[tok] >= mean.max() - 1e-6


def test_sampled_rosters_draw_from_the_mean_distribution():
    """Fixed seed, 4000 draws of a 2-member roster: frequencies match the mean of the tempered softmaxes."""
    s = state()
    admit(s, 0, "x", 2, greedy=False, temperature=0.8, seed=3)
    admit(s, 1, "x", 2, greedy=False, temperature=0.8, seed=4)
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4), [0.0, 1.5, 1.0, 0.5] + [-30.0] * (V - 4)])
    want = (torch.softmax(z[0].double() / 0.8, -1) + torch.softmax(z[1].double() / 0.8, -1)) / 2
    host = np.array([0, 1], dtype=np.int64)
    counts = np.zeros(V)
    n = 4000
    for _ in range(n):
        out = s.techniques[0].apply(z.clone(), torch.from_numpy(host), host)
        counts[int(out[0].argmax())] += 1
    freq = counts / n
    # 4 standard errors of a binomial frequency at each of the 4 live tokens
    tol = 4 * np.sqrt(want[:4].numpy() * (1 - want[:4].numpy()) / n)
    assert np.all(np.abs(freq[:4] - want[:4].numpy()) <= tol), (freq[:4], want[:4])


def test_a_roster_step_allocates_nothing_once_its_batch_size_was_seen():
    s = state()
    for slot in range(8):
        admit(s, slot, f"r{slot // 4}", 4, greedy=slot < 4, seed=slot)
    tech = s.techniques[0]
    host = np.arange(8, dtype=np.int64)
    z = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    s.apply(z.clone(), torch.from_numpy(host), host)
    grown = tech.ws.grown
    for _ in range(5):
        out = s.apply(z.clone(), torch.from_numpy(host), host)
        for slot in range(8):
            s.feed(slot, [int(out[slot // 4 * 4].argmax())])
    assert tech.ws.grown == grown, "a step reallocated its scratch buffers"


def test_a_member_behind_the_frontier_replays_the_decided_tokens():
    s = state()
    for slot in range(3):
        admit(s, slot, "y", 3)
    s.feed(0, [5, 6])
    s.feed(1, [5, 6])  # slot 2 was not there for those two steps
    z = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    host = np.array([2, 0, 1], dtype=np.int64)
    out = s.apply(z.clone(), torch.from_numpy(host), host)
    assert int(out[0].argmax()) == 5 and torch.isfinite(out[0]).sum() == 1
    front = int(out[1].argmax())
    assert front == int(out[2].argmax())
    mean = s.techniques[0].reference_mean(z[1:], [0, 1])
    assert front == int(mean.argmax()), "the frontier's token comes from the members at the frontier only"


def test_rosters_are_deleted_when_their_members_leave():
    s = state()
    for slot in range(2):
        admit(s, slot, "z", 2)
    s.feed(0, [1])
    s.feed(1, [1])
    tech = s.techniques[0]
    assert tech.debug_counts() == {"members": 2, "rosters": 1}
    s.release(0)
    z = torch.randn(1, V)
    host = np.array([1], dtype=np.int64)
    out = s.apply(z.clone(), torch.from_numpy(host), host)  # the last member goes on alone: its own argmax
    assert int(out[0].argmax()) == int(z[0].argmax())
    s.release(1)
    assert tech.debug_counts() == {"members": 0, "rosters": 0}
    admit(s, 3, "z", 2)  # the name is free again: a fresh roster
    assert tech.rosters["z"].decided == []


def test_roster_params_and_admission_checks():
    assert RosterParams.parse({}) is None
    assert RosterParams.parse({"tts_roe_roster": "a", "tts_roe_roster_size": 4}) == RosterParams("a", 4)
    for flat, fragment in [({"tts_roe_roster": "a"}, "needs tts_roe_roster_size"), ({"tts_roe_roster_size": 1}, "tts_roe_roster_size must be"),
                           ({"tts_roe_roster_size": 65}, "tts_roe_roster_size must be"),
                           ({"tts_roe_roster": "", "tts_roe_roster_size": 2}, "non-empty"),
                           ({"tts_roe_roster": 3, "tts_roe_roster_size": 2}, "must be a string"),
                           ({"tts_roe_roster_size": "2"}, "tts_roe_roster_size must be")]:
        with pytest.raises(ValueError, match=fragment):
            RosterParams.parse(flat)
    req = types.SimpleNamespace(n=3, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    with pytest.raises(ValueError, match="n must be 2, got n=3"):
        RosterParams(None, 2).check_request(req)
    RosterParams(None, 3).check_request(req)
    RosterParams("a", 2).check_request(req)
    with pytest.raises(ValueError, match="top_p"):
        RosterParams("a", 2).check_request(types.SimpleNamespace(n=1, temperature=0.7, top_p=0.9, top_k=0, min_p=0.0))
    RosterParams("a", 2).check_request(types.SimpleNamespace(n=1, temperature=0.7, top_p=1.0, top_k=-1, min_p=0.0))
    RosterParams("a", 2).check_request(types.SimpleNamespace(n=1, temperature=0.7, top_p=1.0, top_k=1 << 30, min_p=0.0))  # SGLang's "all"


def test_the_gate_forms_rosters_of_exactly_k_under_unique_names_and_drops_aborted_members():
    gate = RosterGate()
    assert gate.add("a", 3, "r1", 1) is None and gate.add("a", 3, "r2", 2) is None
    assert gate.add("b", 2, "r3", 3) is None and len(gate) == 3
    assert gate.drop(lambda rid: rid == "r2") == [2]
    assert gate.add("a", 3, "r4", 4) is None
    name, members = gate.add("a", 3, "r5", 5)
    assert members == [1, 4, 5] and name.startswith("a" + GATE_SEP)
    name2, _ = gate.add("b", 2, "r6", 6)
    assert name2 != name and len(gate) == 0 and gate.debug_counts() == {"roster_gate.held": 0}
    assert roster_of({"tts_roe_roster": "a", "tts_roe_roster_size": 2}) == ("a", 2)
    assert roster_of({"tts_roe_roster": name, "tts_roe_roster_size": 3}) is None, "a formed roster is never held again"
    assert roster_of({"tts_roe_roster_size": 2}) is None and roster_of(None) is None


def test_front_ends_name_a_requests_samples_and_split_sglang_seeds():
    params = types.SimpleNamespace(extra_args={"tts_roe_roster_size": 2, "tts_roe_tau": 1.0}, seed=None)
    a, b = vllm_child_params(params, 0, "req-9"), vllm_child_params(params, 1, "req-9")
    assert a.extra_args["tts_roe_roster"] == b.extra_args["tts_roe_roster"] == "n:req-9"
    assert "tts_roe_roster" not in params.extra_args, "the parent's (shared) params are not edited"
    named = types.SimpleNamespace(extra_args={"tts_roe_roster": "mine", "tts_roe_roster_size": 2})
    assert vllm_child_params(named, 0, "p") is named

    shared = types.SimpleNamespace(custom_params={"tts_roe_roster_size": 2}, sampling_seed=5, max_new_tokens=8, n=2)
    kids = [types.SimpleNamespace(sampling_params=shared) for _ in range(2)]
    counter = SampleCounter()
    for kid in kids:  # sent in index order, as SGLang sends a request's samples
        sglang_child(kid, counter)
    names = {k.sampling_params.custom_params["tts_roe_roster"] for k in kids}
    assert len(names) == 1 and next(iter(names)).startswith("n:")
    assert [k.sampling_params.sampling_seed for k in kids] == [5, 6] and shared.sampling_seed == 5
    other = types.SimpleNamespace(sampling_params=types.SimpleNamespace(custom_params={"tts_roe_roster_size": 2}, sampling_seed=None,
                                                                        max_new_tokens=8, n=2))
    sglang_child(other, counter)
    assert other.sampling_params.custom_params["tts_roe_roster"] not in names, "another request's samples form another roster"


def test_without_the_host_row_map_rosters_run_plain_and_nothing_syncs():
    s = state()
    admit(s, 0, "h", 2)
    admit(s, 1, "h", 2)
    z = torch.randn(2, V)
    out = s.techniques[0].apply(z.clone(), torch.arange(2), None)
    assert torch.equal(out, z)


# --- per-member tau in a request's own roster (n = K) ---


def test_member_tau_keys_parse_and_bad_values_are_refused_with_the_key_and_value():
    assert RosterParams.parse({"tts_roe_roster_size": 3, "tts_roe_roster_clean": False}) == RosterParams(None, 3, False)
    assert RosterParams.parse({"tts_roe_roster_size": 3, "tts_roe_roster_clean": "true"}) == RosterParams(None, 3, True)
    assert RosterParams.parse({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, 2.5]}) == RosterParams(None, 2, None, (0.0, 2.5))
    assert RosterParams.parse({"tts_roe_roster_size": 2}).clean is None, "not sent: the default (a clean member 0)"
    for flat, fragment in [
        ({"tts_roe_roster_clean": True}, "tts_roe_roster_clean=True needs tts_roe_roster_size"),
        ({"tts_roe_roster_taus": [0, 1]}, r"tts_roe_roster_taus=\[0, 1\] needs tts_roe_roster_size"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_clean": "yes"}, r"tts_roe_roster_clean must be a bool \(true/false\), got 'yes'"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_clean": 2}, "tts_roe_roster_clean must be a bool"),
        ({"tts_roe_roster_size": 3, "tts_roe_roster_taus": [0, 1]},
         r"tts_roe_roster_taus must hold one tau per member, 3 for tts_roe_roster_size=3, got 2 in \[0, 1\]"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, 101]}, r"tts_roe_roster_taus must hold taus in \[0, 100\], got 101"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, -1]}, r"tts_roe_roster_taus must hold taus in \[0, 100\], got -1"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, float("nan")]}, "tts_roe_roster_taus must hold taus"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, True]}, "tts_roe_roster_taus must hold taus"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": 1.0}, r"tts_roe_roster_taus must be a list of 1 to 64 taus \(one per member\), got 1.0"),
        ({"tts_roe_roster_size": 2, "tts_roe_roster_taus": []}, "tts_roe_roster_taus must be a list of 1 to 64 taus"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            RosterParams.parse(flat)
    # the keys are the roster technique's: the registry's unknown-key check accepts them
    reg = registry_for(RoERoster)
    assert reg.parse({"tts_roe_roster_size": 2, "tts_roe_roster_clean": False, "tts_roe_roster_taus": [0, 1]})["roe_roster"].taus == (0.0, 1.0)
    assert ROSTER_MAX_TAU == ROE_MAX_TAU and ROE_PATCH == RoEPatchBase.name


def test_member_tau_keys_are_refused_for_a_roster_of_separate_requests_and_taus_with_per_layer_taus():
    plain = types.SimpleNamespace(n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    with pytest.raises(ValueError, match=r"tts_roe_roster_taus=\[0.0, 1.0\] applies to the samples of one request .* "
                                         r"\(tts_roe_roster='a'\) each request sets its own tts_roe_tau"):
        RosterParams.parse({"tts_roe_roster": "a", "tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, 1]}).check_request(plain)
    with pytest.raises(ValueError, match="tts_roe_roster_clean=False applies to the samples of one request"):
        RosterParams.parse({"tts_roe_roster": "a", "tts_roe_roster_size": 2, "tts_roe_roster_clean": False}).check_request(plain)
    own = RosterParams.parse({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, 1]})
    for attr in ("extra_args", "custom_params"):  # vLLM's and SGLang's sampling parameters
        req = types.SimpleNamespace(n=2, temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, **{attr: {"tts_roe_tau_layers": [1.0, 2.0]}})
        with pytest.raises(ValueError, match="cannot be combined with tts_roe_tau_layers"):
            own.check_request(req)
        own.check_request(types.SimpleNamespace(n=2, temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, **{attr: {"tts_roe_tau": 1.0}}))
    # a member carries the parent's keys and its roster's name; the engine parses it again (no request check there)
    assert roster_of({"tts_roe_roster": "n:p", "tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, 1], "tts_roe_roster_clean": True}) == ("n:p", 2)


def _vllm_members(extra: dict, n: int, seed: int | None = 40) -> list:
    params = types.SimpleNamespace(extra_args=extra, seed=seed)
    kids = []
    for i in range(n):
        kid = vllm_child_params(params, i, "req-7")
        kids.append(types.SimpleNamespace(extra_args=kid.extra_args, seed=None if seed is None else seed + i))  # vLLM: seed + i
    return kids


def test_a_requests_roster_has_a_clean_member_0_by_default_whose_kv_is_not_salted():
    reg = default_registry()
    kids = _vllm_members({"tts_roe_roster_size": 3, "tts_roe_tau": 2.0}, 3)
    assert [k.extra_args["tts_roe_tau"] for k in kids] == [0.0, 2.0, 2.0]
    assert {k.extra_args["tts_roe_roster"] for k in kids} == {"n:req-7"}
    salts = [services.cache_salt(reg, "vllm", k.extra_args, f"r{i}", k.seed) for i, k in enumerate(kids)]
    assert salts[0] is None, "the clean member routes like a plain request: its KV may be shared"
    assert salts[1:] == ["tts_plugins:roe:tau=2.0:seed=41", "tts_plugins:roe:tau=2.0:seed=42"]
    # per-layer taus: the clean member gets zeros for every layer (not a conflicting tts_roe_tau)
    kids = _vllm_members({"tts_roe_roster_size": 2, "tts_roe_tau_layers": [0.5, 1.0, 0.0]}, 2)
    assert kids[0].extra_args["tts_roe_tau_layers"] == [0.0, 0.0, 0.0] and "tts_roe_tau" not in kids[0].extra_args
    assert kids[1].extra_args["tts_roe_tau_layers"] == [0.5, 1.0, 0.0]
    assert services.cache_salt(reg, "vllm", kids[0].extra_args, "r0", 40) is None
    assert services.cache_salt(reg, "vllm", kids[1].extra_args, "r1", 41) == "tts_plugins:roe:taus=0.5,1.0,0.0:seed=41"
    # no tau at all: nothing to make clean, nothing added
    assert [k.extra_args.get("tts_roe_tau") for k in _vllm_members({"tts_roe_roster_size": 2}, 2)] == [None, None]


def test_roster_clean_false_keeps_every_member_noisy_and_roster_taus_give_each_member_its_own():
    reg = default_registry()
    kids = _vllm_members({"tts_roe_roster_size": 3, "tts_roe_tau": 2.0, "tts_roe_roster_clean": False}, 3)
    assert [k.extra_args["tts_roe_tau"] for k in kids] == [2.0, 2.0, 2.0]
    assert all(services.cache_salt(reg, "vllm", k.extra_args, "r", k.seed) for k in kids), "every member is noisy: all salted"
    kids = _vllm_members({"tts_roe_roster_size": 3, "tts_roe_tau": 2.0, "tts_roe_roster_taus": [1.5, 0, 3]}, 3)
    assert [k.extra_args["tts_roe_tau"] for k in kids] == [1.5, 0.0, 3.0], "the list overrides the clean default and tts_roe_tau"
    assert [services.cache_salt(reg, "vllm", k.extra_args, "r", k.seed) for k in kids] == [
        "tts_plugins:roe:tau=1.5:seed=40", None, "tts_plugins:roe:tau=3.0:seed=42"]
    kids = _vllm_members({"tts_roe_roster_size": 2, "tts_roe_roster_taus": [0, 1], "tts_roe_roster_clean": False}, 2)
    assert [k.extra_args["tts_roe_tau"] for k in kids] == [0.0, 1.0], "the list wins over tts_roe_roster_clean too"
    # SGLang's front end: the same edits, and each sample's own seed (which salts its KV)
    shared = types.SimpleNamespace(custom_params={"tts_roe_roster_size": 3, "tts_roe_tau": 2.0}, sampling_seed=5, max_new_tokens=8, n=3)
    kids = [types.SimpleNamespace(sampling_params=shared) for _ in range(3)]
    counter = SampleCounter()
    for kid in kids:
        sglang_child(kid, counter)
    assert [k.sampling_params.custom_params["tts_roe_tau"] for k in kids] == [0.0, 2.0, 2.0]
    assert [services.cache_salt(reg, "sglang", k.sampling_params.custom_params, "r", k.sampling_params.sampling_seed) for k in kids] == [
        None, "tts_plugins:roe:tau=2.0:seed=6", "tts_plugins:roe:tau=2.0:seed=7"]
    assert shared.custom_params == {"tts_roe_roster_size": 3, "tts_roe_tau": 2.0}, "the parent's (shared) params are not edited"
