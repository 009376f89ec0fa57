"""The reference is generated from declarations: every request key and every environment variable is declared and
described, ``tts plugins`` and the docs' tables list them all, and the core's refusals read the declarations."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tts_plugins import envvars, hookimpl, introspect
from tts_plugins.admission import refuse_structured, refuse_tools
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.params import Key
from tts_plugins.technique import ModelPatch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ngram_ban" / "tts_ngram_ban.py"
SCANNED = ("tts_plugins", "logits_processors", "adapters", "benchmarks", "dev")  # the package and its tools
VARIABLE = re.compile(r"\bTTS_[A-Z0-9_]+\b")
FORCING_PREFIXES = ("tts_think", "tts_no_think", "tts_trim", "tts_group")  # the core's rule before the declarations


def example_module():
    """examples/ngram_ban as it is in this tree (not an installed copy), under a name of its own."""
    spec = importlib.util.spec_from_file_location("tts_ngram_ban_in_tree", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE_MODULE = example_module()
BUILTIN = build_registry(plugin_manager(load_entry_points=False))


def owners():
    """Every class that owns request keys: the built-in techniques, one class per built-in patch, the example."""
    out = {f"technique {cls.name}": cls for cls in BUILTIN.techniques}
    out.update({f"patch {p.name} ({p.engine})": type(p) for p in BUILTIN.patches})
    out["example ngram_ban"] = EXAMPLE_MODULE.NgramBan
    return out


OWNERS = owners()


@pytest.mark.parametrize("owner", sorted(OWNERS))
def test_every_key_is_declared_with_a_type_and_a_description(owner):
    cls = OWNERS[owner]
    names = [spec.name for spec in cls.key_specs]
    assert len(names) == len(set(names)), f"{owner}: a key is declared twice in key_specs: {names}"
    assert set(names) == set(cls.keys), (f"{owner}: key_specs names {sorted(names)} differ from keys {sorted(cls.keys)}: "
                                         "every key needs a Key, and every Key a key")
    for spec in cls.key_specs:
        assert isinstance(spec, Key), f"{owner}: {spec!r} is not a tts_plugins.params.Key"
        assert spec.type.strip(), f"{owner}: {spec.name} has no type"
        assert spec.doc.strip(), f"{owner}: {spec.name} has no description"


def test_forcing_declarations_reproduce_the_old_prefix_rule():
    """The built-ins' ``forces`` say what the core's list of prefixes used to: think, trim and group force tokens in
    the thinking block; nothing else forces anything."""
    for cls in BUILTIN.techniques:
        for spec in cls.key_specs:
            want = "thinking" if spec.name.startswith(FORCING_PREFIXES) else None
            assert spec.forces == want, f"technique {cls.name}: {spec.name} forces {spec.forces!r}, expected {want!r}"
    for patch in BUILTIN.patches:
        assert all(spec.forces is None for spec in patch.key_specs), f"patch {patch.name} declares a key that forces tokens"
    assert [spec.forces for spec in EXAMPLE_MODULE.NgramBan.key_specs] == ["answer"]


def source_files():
    for top in SCANNED:
        path = ROOT / top
        if path.is_file():
            yield path
        else:
            yield from (p for p in sorted(path.rglob("*.py")) if "__pycache__" not in p.parts)


def test_every_variable_in_the_source_is_declared_and_described():
    declared = {v.name: v for v in envvars.VARIABLES}
    assert len(declared) == len(envvars.VARIABLES), "a variable is declared twice"
    found: dict[str, str] = {}
    for path in source_files():
        for name in VARIABLE.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, str(path.relative_to(ROOT)))
    missing = {name: where for name, where in found.items() if name not in declared}
    assert not missing, f"read but not declared in tts_plugins.envvars.VARIABLES (name: first file): {missing}"
    for v in envvars.VARIABLES:
        assert v.doc.strip(), f"{v.name} has no description"
        assert v.where in envvars.WHERE and (v.default is None or isinstance(v.default, str)), v


def test_the_package_reads_its_variables_through_envvars():
    """No module of the package reads a ``TTS_`` variable behind the declarations' back (the client's included)."""
    direct = re.compile(r"""os\.(?:environ\.get|getenv)\(\s*["']TTS_|os\.environ\[\s*["']TTS_""")
    offenders = [str(p.relative_to(ROOT)) for top in ("tts_plugins", "logits_processors", "adapters")
                 for p in sorted((ROOT / top).rglob("*.py")) if direct.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"read TTS_ variables with os.environ instead of tts_plugins.envvars.get: {offenders}"


def test_get_returns_the_environment_else_the_default_and_refuses_undeclared_names(monkeypatch):
    monkeypatch.delenv("TTS_SERVER_URL", raising=False)
    assert envvars.get("TTS_SERVER_URL") == "http://127.0.0.1:8000"
    monkeypatch.setenv("TTS_SERVER_URL", "http://example:1")
    assert envvars.get("TTS_SERVER_URL") == "http://example:1"
    monkeypatch.delenv("TTS_PLUGINS_DEBUG_FILE", raising=False)
    assert envvars.get("TTS_PLUGINS_DEBUG_FILE") is None
    monkeypatch.setenv("TTS_NOT_DECLARED_ANYWHERE", "1")
    with pytest.raises(KeyError, match="TTS_NOT_DECLARED_ANYWHERE"):
        envvars.get("TTS_NOT_DECLARED_ANYWHERE")


def test_the_reference_modules_import_no_torch():
    code = "import sys, tts_plugins.envvars, tts_plugins.introspect, tts_plugins.client.plugins; assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr


def test_tts_plugins_json_lists_every_builtin_technique_and_patch_with_its_keys(capsys):
    from tts_plugins.client.cli import main

    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    techniques = {t["name"]: t for t in info["techniques"]}
    for cls in BUILTIN.techniques:
        t = techniques[cls.name]
        assert t["distribution"] == introspect.BUILTIN and t["engines"] == ["vllm", "sglang"]
        assert [k["name"] for k in t["keys"]] == [s.name for s in cls.key_specs]
        assert all(k["doc"] and k["type"] for k in t["keys"]), t["keys"]
    assert techniques["think"]["effort_key"] == "tts_think_max" and techniques["conf"]["runs_before"] == ["*"]
    assert techniques["group"]["forcing_note"], "group decides by value where it forces: the reference says so"
    patches = {(p["name"], p["engine"]): p for p in info["model_patches"]}
    for patch in BUILTIN.patches:
        p = patches[patch.name, patch.engine]
        assert {k["name"] for k in p["keys"]} == set(patch.keys)
        assert p["min_version"] == patch.min_version and p["max_version"] == patch.max_version
        assert p["active"] is (p["reason"] is None), p
    assert {v["name"] for v in info["environment"]} == {v.name for v in envvars.VARIABLES}


def test_tts_plugins_prints_a_listing(capsys):
    from tts_plugins.client.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for cls in BUILTIN.techniques:
        assert f"  {cls.name}  (" in out and all(k in out for k in cls.keys)
    assert "tts_think_max" in out and "temperature_ladder" in out and "TTS_PLUGINS_DISABLE" in out


def test_a_patch_is_active_only_when_its_engine_is_installed_in_range(monkeypatch):
    """Read from the engine's version metadata (here a stand-in: vLLM 0.32.1 installed, SGLang not)."""
    from tts_plugins import patching

    monkeypatch.setattr(patching, "engine_version", {"vllm": "0.32.1"}.get)

    class Absent(ModelPatch):
        name, engine, label = "absent", "sglang", "SGLang"

    class InRange(ModelPatch):
        name, engine, min_version, max_version = "in_range", "vllm", "0.32", "0.33"

    class TooNew(ModelPatch):
        name, engine, min_version, max_version, label = "too_new", "vllm", "0.30", "0.32", "vLLM"

    class Patches:
        @hookimpl
        def tts_register_model_patches(self, register):
            for cls in (Absent, InRange, TooNew):
                register(cls())

    info = introspect.describe(build_registry(plugin_manager(load_entry_points=False, builtin_techniques=False, extra_plugins=[Patches()])))
    state = {p["name"]: p for p in info["model_patches"]}
    assert not state["absent"]["active"] and state["absent"]["reason"] == "SGLang is not installed"
    assert state["in_range"]["active"] and state["in_range"]["engine_version"] == "0.32.1" and state["in_range"]["reason"] is None
    assert not state["too_new"]["active"] and "< 0.32; this server runs vLLM 0.32.1" in state["too_new"]["reason"]
    json.dumps(info)  # JSON-able as it is


def test_the_markdown_references_hold_every_key_and_variable():
    registry = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[EXAMPLE_MODULE]))
    keys = introspect.request_keys_markdown(registry)
    for cls in registry.techniques:
        assert f"## `{cls.name}`" in keys
        for spec in cls.key_specs:
            assert f"| `{spec.name}` | {spec.type} |" in keys, spec.name
    for patch in registry.patches:
        for name in patch.keys:
            assert f"| `{name}` |" in keys, name
    assert "| `tts_ngram_ban` | int in [2, 16] | — | answer |" in keys
    env = introspect.env_vars_markdown()
    for v in envvars.VARIABLES:
        assert f"| `{v.name}` |" in env


# --- the core's refusals read the declarations: a third-party key with forces="answer" ----------------------------


@pytest.fixture(scope="module")
def with_example():
    return build_registry(plugin_manager(load_entry_points=False, extra_plugins=[EXAMPLE_MODULE]))


def test_a_key_that_forces_the_answer_is_refused_with_any_structured_output_and_with_tools(with_example):
    for after_thinking in (True, False):
        with pytest.raises(ValueError, match=r"tts_ngram_ban=3 cannot be combined with a structured output"):
            refuse_structured({"tts_ngram_ban": 3}, after_thinking, "--reasoning-parser", with_example)
    tools = [{"type": "function", "function": {"name": "add"}}]
    with pytest.raises(ValueError, match=r"tts_ngram_ban=3 cannot be combined with tools"):
        refuse_tools({"tts_ngram_ban": 3}, tools, "auto", with_example)
    refuse_tools({"tts_ngram_ban": 3}, tools, "none", with_example)  # no call to break
    refuse_tools({"tts_ngram_ban": 3}, None, "auto", with_example)


def test_a_key_that_forces_the_thinking_needs_the_grammar_after_thinking(with_example):
    refuse_structured({"tts_think_max": 4}, True, "--reasoning-parser", with_example)
    with pytest.raises(ValueError, match=r"tts_think_max: .*--reasoning-parser"):
        refuse_structured({"tts_think_max": 4}, False, "--reasoning-parser", with_example)
    refuse_tools({"tts_think_max": 4}, [{"type": "function", "function": {"name": "add"}}], "auto", with_example)
    refuse_structured({"tts_carbon_temperature": 0.7}, False, "--reasoning-parser", with_example)  # forces nothing
