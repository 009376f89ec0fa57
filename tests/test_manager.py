"""The plugin manager and registry: discovery, validation, no global state."""

from __future__ import annotations

import pytest

from tts_plugins import hookimpl
from tts_plugins.manager import _ordered, build_registry, default_registry, plugin_manager
from tts_plugins.technique import LogitsTechnique


def make_technique(name, keys):
    class T(LogitsTechnique):
        @classmethod
        def parse_params(cls, flat):
            return dict(flat) or None

        def set_slot(self, slot, params, request):
            pass

        num_active = 0

        def apply(self, logits, row_slots, host_slots=None):
            return logits

    T.name, T.keys = name, frozenset(keys)
    return T


class Registers:
    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def tts_register_techniques(self, register):
        for cls in self.classes:
            register(cls)


def test_builtin_techniques_are_registered():
    reg = build_registry(plugin_manager(load_entry_points=False))
    # conf first: it declares runs_before "*" (it reads the logits before any technique forces a token)
    assert [t.name for t in reg.techniques] == ["conf", "think", "trim", "group", "carbon", "roe_roster"]
    assert reg.key_owner["tts_think_max"] == "think"
    assert reg.key_owner["tts_roe_roster"] == "roe_roster" and reg.key_owner["tts_roe_tau"] == "roe"


def test_each_build_is_fresh_and_building_twice_is_harmless():
    a = build_registry(plugin_manager(load_entry_points=False))
    b = build_registry(plugin_manager(load_entry_points=False))
    assert a.pm is not b.pm and a.techniques == b.techniques
    assert default_registry() is default_registry()


def test_third_party_technique_gets_its_keys():
    extra = make_technique("ngram_ban", {"tts_ngram_n"})
    reg = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Registers(extra)]))
    assert reg.parse({"tts_ngram_n": 3}) == {"ngram_ban": {"tts_ngram_n": 3}}


def test_conflicting_names_and_keys_are_refused():
    with pytest.raises(ValueError, match="named 'think'"):
        build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Registers(make_technique("think", {"tts_x"}))]))
    with pytest.raises(ValueError, match="tts_think_max"):
        build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Registers(make_technique("other", {"tts_think_max"}))]))
    with pytest.raises(ValueError, match="must start with"):
        build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Registers(make_technique("bad", {"think_max"}))]))


def test_the_engines_build_leaves_out_what_a_strict_build_refuses_and_keeps_the_rest(caplog):
    """``strict=False`` (the engine's build): each invalid or conflicting registration, and a plugin whose hook
    raises, is logged and left out; the built-ins keep their names and keys, and a valid plugin still registers."""

    class DuckTyped:
        name, keys = "duck", frozenset({"tts_duck"})

    class Raises:
        @hookimpl
        def tts_register_techniques(self, register):
            register(make_technique("half_registered", {"tts_half"}))
            raise RuntimeError("the plugin's own bug")

    class BadVerifier:
        @hookimpl
        def tts_register_verifiers(self, register):
            register("", lambda: None)

    good = make_technique("ngram_ban", {"tts_ngram_n"})
    bad = [make_technique("think", {"tts_x"}), make_technique("other", {"tts_think_max", "tts_other"}),
           make_technique("badkey", {"think_max"}), DuckTyped]
    pm = plugin_manager(load_entry_points=False, extra_plugins=[Registers(good, *bad), Raises(), BadVerifier()])
    with pytest.raises((ValueError, RuntimeError)):  # strict: the first fault raises
        build_registry(pm)
    with caplog.at_level("ERROR", logger="tts_plugins"):
        reg = build_registry(pm, strict=False)
    assert [t.name for t in reg.techniques] == ["conf", "ngram_ban", "think", "trim", "group", "carbon", "roe_roster"]
    assert reg.key_owner["tts_think_max"] == "think" and "tts_other" not in reg.key_owner and "tts_half" not in reg.key_owner
    assert reg.parse({"tts_ngram_n": 3}) == {"ngram_ban": {"tts_ngram_n": 3}}
    expected = ["two techniques are named 'think'", "request key 'tts_think_max' is claimed by techniques 'think' and 'other'",
                "'badkey'", "must be a subclass", "failed in tts_register_techniques (RuntimeError: the plugin's own bug)",
                "verifier name must be a new non-empty string"]
    assert len(reg.left_out) == len(expected)
    for fragment in expected:
        assert any(fragment in why for why in reg.left_out), (fragment, reg.left_out)
        assert fragment in caplog.text


def test_the_engines_build_survives_declarations_that_raise_or_have_the_wrong_type():
    """Declarations the core reads besides the keys, wrong in type or raising when read: each technique or patch is
    left out with a message, never an exception out of the build; a positional-only hook is called as pluggy calls
    it; model patches keep their registration order, an engine variant of a kept patch included."""
    from tts_plugins.technique import ModelPatch

    mixed = make_technique("mixed", {1, "bad"})
    no_order = make_technique("no_order", {"tts_no_order"})
    no_order.runs_before = None
    odd_effort = make_technique("odd_effort", {"tts_odd_effort"})
    odd_effort.effort_yields_to = 5

    class Meta(type(LogitsTechnique)):
        @property
        def keys(cls):
            raise RuntimeError("keys cannot be read")

    raising = Meta("Raising", (make_technique("raising", set()),), {})

    class Positional:
        @hookimpl
        def tts_register_techniques(self, register, /):
            register(make_technique("positional", {"tts_positional"}))

    def patch(name, engine, keys, **kw):
        return type(name.title(), (ModelPatch,), {"name": name, "engine": engine, "keys": frozenset(keys), **kw})()

    class KeysRaise(ModelPatch):
        name, engine = "keys_raise", "vllm"

        @property
        def keys(self):
            raise RuntimeError("no keys here")

    first, second = patch("mine", "vllm", {"tts_mine"}), patch("mine", "sglang", {"tts_mine"})
    patches = [first, patch("mine", "sglang", {"tts_other"}), second, patch("think", "vllm", {"tts_p"}), KeysRaise(),
               patch("steals", "vllm", {"tts_think_max"}), patch("badver", "vllm", {"tts_badver"}, min_version=5)]

    class Patches:
        @hookimpl
        def tts_register_model_patches(self, register):
            for p in patches:
                register(p)

    pm = plugin_manager(load_entry_points=False, extra_plugins=[Registers(mixed, no_order, odd_effort, raising), Positional(), Patches()])
    reg = build_registry(pm, strict=False)
    names = [t.name for t in reg.techniques]
    assert "positional" in names and not {"mixed", "no_order", "odd_effort", "raising"} & set(names)
    mine = [p for p in reg.patches if p.name == "mine"]
    assert mine == [first, second] and reg.key_owner["tts_mine"] == "mine" and reg.key_owner["tts_think_max"] == "think"
    assert not {"keys_raise", "steals", "badver", "think"} & {p.name for p in reg.patches if p.engine == "vllm" and p.name != "mine"}
    expected = ["'mixed' (from plugin", "key 'bad' must start with", "runs_before must be a tuple of str", "effort_yields_to must be",
                "could not be read (RuntimeError: keys cannot be read)", "declare different keys", "has the name of a technique",
                "could not be read (RuntimeError: no keys here)", "'tts_think_max' is claimed by 'think' and model patch 'steals'",
                "min_version and max_version must be strings"]
    for fragment in expected:
        assert any(fragment in why for why in reg.left_out), (fragment, reg.left_out)
    builtin = build_registry(plugin_manager(load_entry_points=False))
    assert [type(p) for p in reg.patches if p not in patches] == [type(p) for p in builtin.patches]  # the built-ins', in order


def test_a_plugin_that_cannot_load_is_left_out_and_the_others_load(monkeypatch, caplog):
    """Installed plugins load one at a time in the engine's build: a missing module, a plugin that implements a hook
    that does not exist and a plugin that is fine, from one distribution."""
    import importlib.metadata
    import sys
    import types

    from tts_plugins import manager

    good = types.ModuleType("tts_test_good_plugin")
    technique = make_technique("from_entry_point", {"tts_from_ep"})
    good.tts_register_techniques = hookimpl(lambda register: register(technique))
    exits = types.ModuleType("tts_test_exits_plugin")
    exits.tts_register_techniques = hookimpl(lambda register: sys.exit("a plugin's sys.exit()"))
    monkeypatch.setitem(sys.modules, exits.__name__, exits)
    typo = types.ModuleType("tts_test_typo_plugin")
    typo.tts_register_technique = hookimpl(lambda register: None)  # missing "s"
    monkeypatch.setitem(sys.modules, good.__name__, good)
    monkeypatch.setitem(sys.modules, typo.__name__, typo)
    eps = [importlib.metadata.EntryPoint(name, value, manager.ENTRY_POINT_GROUP)
           for name, value in (("missing", "tts_test_no_such_module"), ("typo", typo.__name__), ("good", good.__name__),
                                           ("exits", exits.__name__))]
    dist = types.SimpleNamespace(entry_points=eps, metadata={"Name": "tts-test-plugins"})
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [dist])
    with pytest.raises(ModuleNotFoundError):
        build_registry()
    with caplog.at_level("ERROR", logger="tts_plugins"):
        reg = build_registry(strict=False)
    assert "plugin 'missing' (tts_test_no_such_module, from tts-test-plugins) left out" in caplog.text
    assert "from_entry_point" in [t.name for t in reg.techniques] and reg.key_owner["tts_think_max"] == "think"
    assert len(reg.left_out) == 3, reg.left_out
    assert "plugin 'missing' (tts_test_no_such_module, from tts-test-plugins) left out" in reg.left_out[0]
    assert "'typo'" in reg.left_out[1] and "tts_register_technique" in reg.left_out[1]
    assert "plugin 'exits' failed in tts_register_techniques (SystemExit: a plugin's sys.exit())" in reg.left_out[2]
    from tts_plugins import introspect
    from tts_plugins.client.plugins import render

    info = introspect.describe()
    assert info["left_out"] == list(reg.left_out) and "Left out" in render(info)


def test_a_technique_must_subclass_the_contract_and_gets_its_defaults():
    class DuckTyped:  # has the attributes, but not the contract
        name, keys = "duck", frozenset({"tts_duck"})

    with pytest.raises(ValueError, match="subclass of tts_plugins.technique.LogitsTechnique"):
        build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Registers(DuckTyped)]))
    minimal = make_technique("minimal", {"tts_minimal"})  # implements only what is required
    reg = build_registry(plugin_manager(load_entry_points=False, builtin_techniques=False, extra_plugins=[Registers(minimal)]))
    assert reg.parse({"tts_minimal": 1}, request=object()) == {"minimal": {"tts_minimal": 1}}  # default checks accept
    assert minimal.conformance_params() == [] and not minimal.cross_request_state
    import torch

    from tts_plugins.technique import EngineInfo

    tech = minimal(EngineInfo(vocab_size=4, max_slots=2, device=torch.device("cpu")))
    assert tech.debug_counts() == {} and tech.reference_row(torch.zeros(4), 0) is None


def test_misspelled_hook_is_caught():
    class Typo:
        @hookimpl
        def tts_register_technique(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="tts_register_technique"):
        plugin_manager(load_entry_points=False, extra_plugins=[Typo()])


def test_think_strings_resolution(monkeypatch):
    reg = build_registry(plugin_manager(load_entry_points=False))
    assert reg.think_strings(None) == ("<think>", "</think>")
    assert reg.think_strings(None, engine_hint={"start": "<reason>", "end": "</reason>"}) == ("<reason>", "</reason>")
    monkeypatch.setenv("TTS_PLUGINS_THINK_END", "<|end_think|>")
    assert reg.think_strings(None)[1] == "<|end_think|>"

    class Custom:
        @hookimpl
        def tts_think_strings(self, model_name):
            return ("[T]", "[/T]") if model_name == "mine" else None

    reg = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Custom()]))
    assert reg.think_strings(None, "mine") == ("[T]", "[/T]")
    assert reg.think_strings(None, "other")[0] == "<think>"


def test_think_strings_come_from_the_tokenizer():
    class Tok:
        def __init__(self, added):
            self.added = added

        def get_added_vocab(self):
            return {t: i for i, t in enumerate(self.added)}

    reg = build_registry(plugin_manager(load_entry_points=False))
    assert reg.think_strings(Tok(["<seed:think>", "</seed:think>"])) == ("<seed:think>", "</seed:think>")
    assert reg.think_strings(Tok(["<|im_end|>"])) == ("<think>", "</think>")


# --- what techniques declare, and the core reads -----------------------------------------------------------------


def _registry(*classes, builtins=False):
    return build_registry(plugin_manager(load_entry_points=False, builtin_techniques=builtins, extra_plugins=[Registers(*classes)]))


def test_the_order_of_apply_follows_the_declarations_not_the_registration():
    """ConfStop runs first because it declares runs_before "*" (it reads the logits before anything forces a token),
    wherever it is registered; runs_after and runs_before between named techniques hold; otherwise registration order."""
    a, b, c = make_technique("a", {"tts_a"}), make_technique("b", {"tts_b"}), make_technique("c", {"tts_c"})
    assert [t.name for t in _registry(a, b, c).techniques] == ["a", "b", "c"]
    a.runs_after = ("c",)
    assert [t.name for t in _registry(a, b, c).techniques] == ["b", "c", "a"]
    c.runs_before = ("*",)
    b.runs_before = ("c",)  # b before c, but c before everything that does not say "*": a cycle
    with pytest.raises(ValueError, match="cycle"):
        _ordered([a, b, c])
    assert [t.name for t in _registry(a, b, c).techniques] == ["a", "b", "c"]  # logged; registration order, no crash
    b.runs_before = ()
    assert [t.name for t in _registry(a, b, c).techniques] == ["c", "a", "b"]
    a.runs_after, b.runs_before = ("not_registered",), ("a",)  # a name not registered is ignored
    assert [t.name for t in _registry(a, b, c).techniques] == ["c", "b", "a"]
    conf = next(t for t in default_registry().techniques if t.name == "conf")
    last = make_technique("forces_first", {"tts_forces_first"})
    reg = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Registers(last)]))
    assert reg.techniques[0] is conf and "*" in conf.runs_before


def test_reasoning_effort_sets_the_key_a_technique_declares(caplog):
    from tts_plugins.effort import budget_request

    budget = make_technique("budget", {"tts_budget", "tts_budget_off"})
    assert _registry(budget).effort is None
    assert budget_request("low", {"tts_x": 1}, _registry(budget)) is None  # nothing declares a key: effort adds nothing
    budget.effort_key, budget.effort_yields_to = "tts_budget", frozenset({"tts_budget_off"})
    reg = _registry(budget)
    assert reg.effort == ("tts_budget", frozenset({"tts_budget", "tts_budget_off"}))
    assert budget_request("minimal", {"tts_x": 1}, reg) == {"tts_x": 1, "tts_budget": 256}
    assert budget_request("minimal", {"tts_budget_off": True}, reg) is None
    # conflicting declarations are logged, never raised (a registry that fails to build would stop the engine)
    other = make_technique("other_budget", {"tts_other"})
    other.effort_key = "tts_other"
    with caplog.at_level("ERROR", logger="tts_plugins"):
        assert _registry(budget, other).effort[0] == "tts_budget"
    assert "each declare an effort_key" in caplog.text
    wrong = make_technique("wrong_budget", {"tts_w"})
    wrong.effort_key = "tts_not_mine"
    with caplog.at_level("ERROR", logger="tts_plugins"):
        assert _registry(wrong).effort is None
    assert "not one of its keys" in caplog.text
    assert default_registry().effort == ("tts_think_max", frozenset({"tts_think_max", "tts_no_think"}))


def test_forcing_comes_from_the_declarations():
    """The core's refusals read Key.forces (and a technique's own ``forcing`` when it depends on the value)."""
    from tts_plugins.admission import refuse_structured, refuse_tools
    from tts_plugins.params import Key

    t = make_technique("forcer", {"tts_f_think", "tts_f_answer", "tts_f_plain"})
    t.key_specs = (Key("tts_f_think", "int", None, "forces text while thinking", forces="thinking"),
                   Key("tts_f_answer", "int", None, "forbids tokens in the answer", forces="answer"),
                   Key("tts_f_plain", "int", None, "reweights only"))
    reg = _registry(t)
    assert reg.forcing({"tts_f_think": 1, "tts_f_plain": 2}) == {"tts_f_think": "thinking"}
    refuse_structured({"tts_f_plain": 1}, False, "--reasoning-parser", reg)
    refuse_structured({"tts_f_think": 1}, True, "--reasoning-parser", reg)
    with pytest.raises(ValueError, match="tts_f_think: .* --reasoning-parser"):
        refuse_structured({"tts_f_think": 1}, False, "--reasoning-parser", reg)
    with pytest.raises(ValueError, match="tts_f_answer=1 cannot be combined with a structured output"):
        refuse_structured({"tts_f_answer": 1}, True, "--reasoning-parser", reg)
    with pytest.raises(ValueError, match='tts_f_answer=1 cannot be combined with tools'):
        refuse_tools({"tts_f_answer": 1}, [{"type": "function"}], "auto", reg)
    refuse_tools({"tts_f_answer": 1}, [{"type": "function"}], "none", reg)
    refuse_tools({"tts_f_think": 1}, [{"type": "function"}], "auto", reg)
    broken = make_technique("broken_forcing", {"tts_broken"})
    broken.forcing = classmethod(lambda cls, params, flat: 1 / 0)
    with pytest.raises(ValueError, match="broken_forcing.*ZeroDivisionError"):  # a plugin's failure is a 400, not a 500
        refuse_structured({"tts_broken": 1}, True, "--reasoning-parser", _registry(broken))
    with pytest.raises(ValueError, match=r'tts_group_finish="eos" cannot be combined with a structured output'):
        refuse_structured({"tts_group": "g", "tts_group_finish": "eos"}, True, "--reasoning-parser")
    refuse_structured({"tts_group": "g"}, True, "--reasoning-parser")
