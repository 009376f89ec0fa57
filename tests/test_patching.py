"""The patcher: version bounds, target checks, one owner per target, descriptors kept, undo exact.

Everything runs against a fake engine module registered in ``sys.modules``; only the last test needs SGLang.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types

import pytest

from tts_plugins import hookimpl, patching
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.patching import Patcher, install_patches, patch_owner, sglang_hooks
from tts_plugins.technique import ModelPatch

FAKE = "tts_fake_engine"
ENGINE_SOURCE = '''
def top(x):
    return x + 1


class Runner:
    scale = 10

    def step(self, x):
        return x * self.scale

    @classmethod
    def make(cls, x):
        return (cls.__name__, x)

    @staticmethod
    def helper(x):
        return -x


class FastRunner(Runner):
    scale = 100
'''


@pytest.fixture
def engine(monkeypatch, caplog):
    """A fresh fake engine module at version 1.5.0 (``fake`` is its package name); leaves no ownership behind."""
    module = types.ModuleType(FAKE)
    exec(compile(ENGINE_SOURCE, f"<{FAKE}>", "exec"), module.__dict__)  # classes get __module__ == FAKE
    alias = types.ModuleType(f"{FAKE}_alias")  # re-exports Runner, as engines' __init__ files do
    alias.Runner = module.Runner
    monkeypatch.setitem(sys.modules, FAKE, module)
    monkeypatch.setitem(sys.modules, alias.__name__, alias)
    set_version(monkeypatch, "1.5.0")
    caplog.set_level(logging.DEBUG, logger="tts_plugins.patching")
    yield module
    leftover = [name for name in patching._OWNERS if name.startswith(FAKE)]
    for name in leftover:
        del patching._OWNERS[name]
    assert not leftover, f"a test left {leftover} patched: every test must undo what it patched"


def set_version(monkeypatch, ver):
    monkeypatch.setattr(patching, "engine_version", lambda engine: ver)


def times_two(original):
    def step(self, x):
        return 2 * original(self, x)

    return step


def errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# --- one owner per target ----------------------------------------------------------


def test_a_second_owner_patching_the_same_target_is_refused_naming_both(engine):
    alpha, beta = Patcher("fake", owner="alpha"), Patcher("fake", owner="beta")
    try:
        assert alpha.replace(f"{FAKE}:Runner.step", times_two)
        patched = engine.Runner.__dict__["step"]
        with pytest.raises(RuntimeError, match=rf"'beta' cannot patch {FAKE}\.Runner\.step: 'alpha' already patched it"):
            beta.replace(f"{FAKE}:Runner.step", times_two)
        # the same object reached through a re-export is the same target
        with pytest.raises(RuntimeError, match="'beta'.*'alpha'"):
            beta.replace(f"{FAKE}_alias:Runner.step", times_two)
        assert beta.applied == [] and engine.Runner.__dict__["step"] is patched
        assert patch_owner(f"{FAKE}.Runner.step") == "alpha"
        assert engine.Runner().step(3) == 60
    finally:
        beta.undo()
        alpha.undo()


def test_the_same_owner_patching_twice_is_a_no_op(engine, caplog):
    first, again = Patcher("fake", owner="alpha"), Patcher("fake", owner="alpha")  # a general plugin run twice
    try:
        assert first.replace(f"{FAKE}:Runner.step", times_two)
        patched = engine.Runner.__dict__["step"]
        assert not first.replace(f"{FAKE}:Runner.step", times_two)
        assert not again.replace(f"{FAKE}:Runner.step", times_two)
        assert engine.Runner.__dict__["step"] is patched and engine.Runner().step(3) == 60  # wrapped once, not twice
        assert len(first.applied) == 1 and again.applied == []
        assert f"alpha already patched {FAKE}.Runner.step in this process; skipping" in caplog.text
    finally:
        again.undo()
        first.undo()
    assert engine.Runner().step(3) == 30


def test_a_patch_needs_an_owner(engine):
    with pytest.raises(ValueError, match="needs an owner"):
        Patcher("fake").replace(f"{FAKE}:Runner.step", times_two)
    patcher = Patcher("fake")
    try:
        assert patcher.replace(f"{FAKE}:top", lambda original: original, owner="given_per_call")
        assert patch_owner(f"{FAKE}.top") == "given_per_call"
    finally:
        patcher.undo()


# --- classmethods and staticmethods keep their kind ----------------------------------


def test_classmethod_and_staticmethod_patches_keep_their_kind_and_undo_restores_the_identical_object(engine):
    Runner = engine.Runner
    raw_make, raw_helper = Runner.__dict__["make"], Runner.__dict__["helper"]
    patcher = Patcher("fake", owner="kinds")

    def wrap_make(original):  # original: bound to Runner; the replacement takes cls first
        def make(cls, x):
            return ("patched", cls.__name__, *original(x))

        return make

    def wrap_helper(original):  # original: the plain function
        return lambda x: 10 * original(x)

    try:
        assert patcher.replace(f"{FAKE}:Runner.make", wrap_make)
        assert patcher.replace(f"{FAKE}:Runner.helper", wrap_helper)
        assert isinstance(inspect.getattr_static(Runner, "make"), classmethod)
        assert isinstance(inspect.getattr_static(Runner, "helper"), staticmethod)
        assert Runner.make(3) == ("patched", "Runner", "Runner", 3)
        assert Runner().make(3) == ("patched", "Runner", "Runner", 3)
        assert engine.FastRunner.make(3)[:2] == ("patched", "FastRunner")
        assert Runner.helper(2) == -20 and Runner().helper(2) == -20
        # the mark sticks: read through the class (a bound method forwards to its function) and raw
        assert Runner.make.__tts_plugins_original__ is raw_make
        assert inspect.getattr_static(Runner, "make").__tts_plugins_original__ is raw_make
        assert Runner.helper.__tts_plugins_original__ is raw_helper
        assert Runner.make.__tts_plugins_owner__ == "kinds"
    finally:
        patcher.undo()
    assert Runner.__dict__["make"] is raw_make and Runner.__dict__["helper"] is raw_helper
    assert Runner.make(3) == ("Runner", 3) and Runner.helper(2) == -2


def test_a_replacement_that_already_is_a_classmethod_is_kept_and_another_kind_is_refused(engine):
    patcher = Patcher("fake", owner="kinds")
    try:
        assert patcher.replace(f"{FAKE}:Runner.make", lambda original: classmethod(lambda cls, x: ("own", x)))
        assert engine.Runner.make(1) == ("own", 1)
        with pytest.raises(TypeError, match="is a staticmethod; its replacement must not be a classmethod"):
            patcher.replace(f"{FAKE}:Runner.helper", lambda original: classmethod(lambda cls, x: x), owner="other")
    finally:
        patcher.undo()
    assert engine.Runner.make(1) == ("Runner", 1)


def test_an_inherited_method_is_overridden_on_the_subclass_and_undo_removes_the_override(engine):
    patcher = Patcher("fake", owner="sub")
    try:
        assert patcher.replace(f"{FAKE}:FastRunner.step", times_two)
        assert engine.FastRunner().step(1) == 200 and engine.Runner().step(1) == 10
    finally:
        patcher.undo()
    assert "step" not in engine.FastRunner.__dict__ and engine.FastRunner().step(1) == 100


# --- version bounds and targets ------------------------------------------------------


@pytest.mark.parametrize(("ver", "patched"), [("0.9.9", False), ("1.0", True), ("1.9.9", True), ("2.0", False),
                                               ("2.0.1+cpu", False)])
def test_versions_below_min_and_at_max_are_refused(engine, monkeypatch, caplog, ver, patched):
    set_version(monkeypatch, ver)
    patcher = Patcher("fake", owner="bounded")
    try:
        assert patcher.replace(f"{FAKE}:Runner.step", times_two, min_version="1.0", max_version="2.0") is patched
        assert (engine.Runner().step(1) == 20) is patched
        if not patched:
            assert errors(caplog) == [f"tts_plugins: fake {ver} is outside the versions [1.0, 2.0) this patch was written "
                                      f"for; not patching {FAKE}:Runner.step"]
            assert patcher.applied == [] and patch_owner(f"{FAKE}.Runner.step") is None
    finally:
        patcher.undo()


def test_an_engine_that_is_not_installed_is_not_patched(engine, monkeypatch, caplog):
    set_version(monkeypatch, None)
    assert not Patcher("fake", owner="absent").replace(f"{FAKE}:Runner.step", times_two)
    assert "fake is not installed" in caplog.text and engine.Runner().step(1) == 10


@pytest.mark.parametrize("target", [f"{FAKE}:Runner.no_such_method", f"{FAKE}:NoSuchClass.step", f"{FAKE}:no_such_function",
                                    "tts_no_such_module:Runner.step"])
def test_a_missing_target_is_refused_with_a_log(engine, caplog, target):
    patcher = Patcher("fake", owner="seeker")
    assert not patcher.replace(target, times_two)
    assert patcher.applied == []
    (line,) = errors(caplog)
    assert f"fake 1.5.0: cannot find {target}" in line and "not patching it (owner seeker)" in line


# --- undo ------------------------------------------------------------------------------


def test_undo_restores_every_target_in_reverse_order_and_releases_ownership(engine, caplog):
    originals = {name: engine.Runner.__dict__[name] for name in ("step", "make", "helper")} | {"top": engine.top}
    targets = [f"{FAKE}:Runner.step", f"{FAKE}:Runner.make", f"{FAKE}:Runner.helper", f"{FAKE}:top"]
    first = Patcher("fake", owner="first")
    for target in targets:
        assert first.replace(target, lambda original: original)  # identity: undo must still clean the marks
    caplog.clear()
    first.undo()
    restored = [r.getMessage() for r in caplog.records if "restored" in r.getMessage()]
    canonical = [f"{FAKE}.Runner.step", f"{FAKE}.Runner.make", f"{FAKE}.Runner.helper", f"{FAKE}.top"]
    assert restored == [f"tts_plugins: first restored {name}" for name in reversed(canonical)]
    assert first.applied == [] and all(patch_owner(name) is None for name in canonical)
    assert {name: engine.Runner.__dict__[name] for name in ("step", "make", "helper")} | {"top": engine.top} == originals
    assert not hasattr(engine.top, "__tts_plugins_owner__")
    # released: another owner may now patch every target
    second = Patcher("fake", owner="second")
    try:
        assert all(second.replace(target, lambda original: original) for target in targets)
    finally:
        second.undo()


def test_install_patches_makes_each_model_patch_the_owner_of_its_targets(engine):
    class Doubling(ModelPatch):
        name, engine = "doubling", "fake"

        def install(self, patcher):
            patcher.replace(f"{FAKE}:Runner.step", times_two, min_version="1.0", max_version="2.0")

    class Tripling(ModelPatch):
        name, engine = "tripling", "fake"

        def install(self, patcher):
            patcher.replace(f"{FAKE}:Runner.step", lambda original: original, min_version="1.0", max_version="2.0")

    class Elsewhere(ModelPatch):
        name, engine = "elsewhere", "other_engine"

        def install(self, patcher):
            raise AssertionError("a patch for another engine must not be installed")

    registry = types.SimpleNamespace(model_patches=lambda: [Elsewhere(), Doubling(), Doubling()])
    patcher = install_patches(registry, "fake")  # the second Doubling is the same owner: a no-op
    try:
        assert patch_owner(f"{FAKE}.Runner.step") == "doubling" and patcher.owner is None
        assert engine.Runner().step(1) == 20
        with pytest.raises(RuntimeError, match="'tripling' cannot patch .*'doubling' already patched it"):
            install_patches(types.SimpleNamespace(model_patches=lambda: [Tripling()]), "fake")
    finally:
        patcher.undo()
    assert engine.Runner().step(1) == 10


# --- SGLang hooks ------------------------------------------------------------------


class FakeHookRegistry:
    """Stands in for SGLang's ``HookRegistry``: records what would be registered."""

    def __init__(self):
        self.registered = []

    def register(self, target, hook, kind):
        self.registered.append((target, hook, kind))


def noop_hook(original, *args, **kwargs):
    return original(*args, **kwargs)


HOOKS = [(f"{FAKE}.Runner.step", noop_hook, "around"), (f"{FAKE}.top", noop_hook, "after")]


@pytest.mark.parametrize(("ver", "hooked"), [("0.5.19", False), ("0.5.20", True), ("0.5.23", True), ("0.5.24", False)])
def test_sglang_hooks_refuse_versions_below_min_and_at_max(engine, monkeypatch, caplog, ver, hooked):
    set_version(monkeypatch, ver)
    registry = FakeHookRegistry()
    assert sglang_hooks(HOOKS, tag="t", min_version="0.5.20", max_version="0.5.24", registry=registry) is hooked
    assert registry.registered == (HOOKS if hooked else [])
    if not hooked:
        assert errors(caplog) == [f"tts_plugins: sglang {ver} is outside the versions [0.5.20, 0.5.24) the t hooks were "
                                  "written for; not hooking"]


def test_sglang_hooks_default_to_the_tested_range(engine, monkeypatch):
    assert (patching.SGLANG_MIN_VERSION, patching.SGLANG_MAX_VERSION) == ("0.5.20", "0.5.24")
    set_version(monkeypatch, "0.6.0")
    assert not sglang_hooks(HOOKS, tag="t", registry=FakeHookRegistry())


def test_sglang_hooks_register_once_per_tag_and_nothing_when_a_target_is_missing(engine, monkeypatch, caplog):
    set_version(monkeypatch, "0.5.23")
    registry = FakeHookRegistry()
    assert sglang_hooks(HOOKS, tag="a", registry=registry)
    assert not sglang_hooks(HOOKS, tag="a", registry=registry)  # a general plugin run twice
    assert sglang_hooks(HOOKS[:1], tag="b", registry=registry)  # SGLang chains hooks of one target: owners compose
    assert registry.registered == HOOKS + HOOKS[:1]
    missing = [*HOOKS, (f"{FAKE}.Runner.no_such_method", noop_hook, "before")]
    assert not sglang_hooks(missing, tag="c", registry=registry)
    assert registry.registered == HOOKS + HOOKS[:1]  # not even the targets that exist
    assert f"sglang 0.5.23: cannot find {FAKE}.Runner.no_such_method" in errors(caplog)[0]
    set_version(monkeypatch, None)
    assert not sglang_hooks(HOOKS, tag="d", registry=registry) and "sglang is not installed" in caplog.text


def test_a_hook_target_whose_module_fails_to_import_names_the_import_error(engine, monkeypatch, tmp_path, caplog):
    package = tmp_path / "tts_fake_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "broken.py").write_text("import tts_no_such_dependency\n\nclass Thing:\n    def run(self):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    set_version(monkeypatch, "0.5.23")
    try:
        assert not sglang_hooks([("tts_fake_pkg.broken.Thing.run", noop_hook, "around")], tag="t", registry=FakeHookRegistry())
    finally:
        sys.modules.pop("tts_fake_pkg", None)
    (line,) = errors(caplog)
    assert "importing tts_fake_pkg.broken failed: No module named 'tts_no_such_dependency'" in line


def test_every_sglang_hook_caller_states_its_version_bounds(monkeypatch):
    """The core adapter and every SGLang model patch pass ``min_version`` and ``max_version`` explicitly."""
    from tts_plugins.adapters import sglang as sglang_adapter

    calls = []

    def record(hooks, *, tag, **bounds):
        calls.append((tag, bounds))
        return True

    monkeypatch.setattr(patching, "sglang_hooks", record)
    set_version(monkeypatch, "0.5.23")
    monkeypatch.delenv("TTS_PLUGINS_DISABLE", raising=False)
    sglang_adapter.register()
    assert "core" in {tag for tag, _ in calls} and len(calls) >= 2
    for tag, bounds in calls:
        assert set(bounds) == {"min_version", "max_version"}, f"sglang_hooks(tag={tag!r}) must state both bounds"
        assert patching.version_in_range(bounds["min_version"], None, bounds["max_version"]), (tag, bounds)


def test_sglang_hooks_register_with_sglangs_hook_registry():
    pytest.importorskip("sglang")
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    ver = patching.engine_version("sglang")
    assert patching.version_in_range(ver, patching.SGLANG_MIN_VERSION, patching.SGLANG_MAX_VERSION), ver
    target = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
    saved = {key: list(hooks) for key, hooks in HookRegistry._hooks.items()}
    try:
        assert sglang_hooks([(target, noop_hook, "around")], tag="test_patching")
        assert not sglang_hooks([(target, noop_hook, "around")], tag="test_patching")
        ours = [(kind, hook) for kind, hook, _ in HookRegistry._hooks[target] if hook is noop_hook]
        assert ours == [(HookType.AROUND, noop_hook)]
    finally:
        # HookRegistry has no unregister (and reset() would drop other plugins' hooks too): restore what was there
        HookRegistry._hooks.clear()
        HookRegistry._hooks.update(saved)
        HookRegistry.__dict__[patching._HOOKED].discard("test_patching")


# --- the registry takes ModelPatch instances --------------------------------------------


class Registers:
    def __init__(self, *patches):
        self.patches = patches

    @hookimpl
    def tts_register_model_patches(self, register):
        for patch in self.patches:
            register(patch)


def registry_with(*patches):
    pm = plugin_manager(load_entry_points=False, builtin_techniques=False, extra_plugins=[Registers(*patches)])
    return build_registry(pm)


class Checked(ModelPatch):
    name, engine, keys = "checked", "vllm", frozenset({"tts_checked_level"})

    @classmethod
    def parse_params(cls, flat):
        return flat.get("tts_checked_level")

    def check_request(self, params, request):
        if request.temperature == 0:
            raise ValueError(f"tts_checked_level={params!r} needs a sampling request")


def test_a_model_patch_must_be_a_ModelPatch_instance():
    class Prose:
        name, engine, keys = "prose", "vllm", frozenset()

        def install(self, patcher):
            pass

        def __repr__(self):
            return "<Prose patch>"

    with pytest.raises(ValueError, match=r"model patch <Prose patch> must be an instance of a subclass of .*\.ModelPatch"):
        registry_with(Prose())
    with pytest.raises(ValueError, match="model patch .* must be an instance"):
        registry_with(Checked)  # the class, not an instance


def test_model_patch_declarations_are_validated():
    class NoEngine(ModelPatch):
        name = "no_engine"

    class SetKeys(ModelPatch):
        name, engine, keys = "set_keys", "vllm", {"tts_set_keys"}

    class EmptyRange(ModelPatch):
        name, engine, min_version, max_version = "empty_range", "vllm", "0.33", "0.33"

    with pytest.raises(ValueError, match="needs a non-empty str name and an engine"):
        registry_with(NoEngine())
    with pytest.raises(ValueError, match="'set_keys' keys must be a frozenset"):
        registry_with(SetKeys())
    with pytest.raises(ValueError, match="'empty_range' has an empty version range"):
        registry_with(EmptyRange())


def test_the_registry_calls_the_declared_patch_methods(monkeypatch):
    class AlwaysOn(ModelPatch):
        name, engine = "always_on", "vllm"

    reg = registry_with(Checked(), AlwaysOn())
    assert reg.key_owner["tts_checked_level"] == "checked"
    sampling, greedy = types.SimpleNamespace(temperature=1.0), types.SimpleNamespace(temperature=0)
    assert reg.parse_patches({"tts_checked_level": 2}, request=sampling) == {"checked": 2}
    assert reg.parse_patches({}) == {}  # a patch without keys is never parsed
    with pytest.raises(ValueError, match="tts_checked_level=2 needs a sampling request"):
        reg.parse_patches({"tts_checked_level": 2}, request=greedy)
    set_version(monkeypatch, "0.32.1")
    assert reg.parse_patches({"tts_checked_level": 2}, engine="vllm") == {"checked": 2}  # no bounds: supported
    assert reg.parse_patches({"tts_checked_level": 2}, engine="sglang") == {}
