"""The docs: the README stays a landing page, the site's nav and pages agree, the generated references list every
registered key and variable, the hook reference's examples work against the current API, and a strict build passes.

The strict build needs mkdocs and Material (the ``docs`` extra); ``./dev test`` installs them into the vLLM environment
before the unit tests run, and also builds the site in a phase of its own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
README_MAX_LINES = 160
FIRST_SCREEN = 40


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hooks():
    return _module("tts_docs_hooks", DOCS / "hooks.py")


@pytest.fixture(scope="module")
def examples():
    """The hook reference's example modules, by file stem (imported from their files, as a plugin's module is)."""
    return {p.stem: _module(f"tts_docs_example_{p.stem}", p) for p in sorted(EXAMPLES.glob("*.py"))}


def _nav_files() -> list[str]:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # mkdocs' !relative and other tags
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    found: list[str] = []

    def walk(entry):
        if isinstance(entry, str):
            found.append(entry)
        elif isinstance(entry, list):
            for e in entry:
                walk(e)
        elif isinstance(entry, dict):
            for v in entry.values():
                walk(v)

    walk(config["nav"])
    return found


# --- the README -------------------------------------------------------------------------------------------------


def test_readme_is_a_landing_page_with_the_two_commands_on_its_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    first = "\n".join(lines[:FIRST_SCREEN])
    for command in ("./dev demo", "./dev test"):
        assert command in first, f"README.md's first {FIRST_SCREEN} lines must show {command!r} (CI runs the README's test command)"


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")}
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, f"README.md links to files that do not exist: {missing}"


# --- the site's structure --------------------------------------------------------------------------------------


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = _nav_files()
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert len(nav) == len(set(nav)), f"mkdocs.yml's nav lists a page twice: {sorted(p for p in nav if nav.count(p) > 1)}"
    assert not sorted(set(pages) - set(nav)), f"pages missing from mkdocs.yml's nav: {sorted(set(pages) - set(nav))}"
    assert not sorted(set(nav) - set(pages)), f"nav entries without a page in docs/: {sorted(set(nav) - set(pages))}"


def test_the_proving_ground_page_holds_the_benchmark_markers():
    """``benchmarks/accuracy.py --docs`` writes its tables between these markers; without them it refuses to write."""
    source = (ROOT / "benchmarks" / "accuracy.py").read_text()
    begin, end = re.search(r'^BEGIN, END = "([^"]+)", "([^"]+)"$', source, re.MULTILINE).groups()
    page = (DOCS / "results" / "proving-ground.md").read_text()
    assert page.count(begin) == 1 and page.count(end) == 1 and page.index(begin) < page.index(end)


def test_the_docs_extra_pins_what_dev_installs():
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    dev = re.search(r"^DOCS_DEPS=\(([^)]*)\)", (ROOT / "dev").read_text(), re.MULTILINE).group(1).split()
    assert sorted(extra) == sorted(dev), f"pyproject.toml's docs extra {extra} and ./dev's DOCS_DEPS {dev} disagree"


# --- the generated references ----------------------------------------------------------------------------------


def test_every_registered_request_key_is_on_the_generated_page(hooks):
    from tts_plugins.manager import build_registry, plugin_manager

    registry = build_registry(plugin_manager(load_entry_points=False))  # the package's own (the page leaves plugins out)
    keys = {k for cls in registry.techniques for k in cls.keys} | {k for patch in registry.patches for k in patch.keys}
    assert keys, "the registry holds no request key"
    page = hooks.expand((DOCS / "reference" / "request-keys.md").read_text(), "reference/request-keys.md")
    assert "<!-- generated:" not in page, "a marker was left unexpanded"
    missing = sorted(k for k in keys if f"`{k}`" not in page)
    assert not missing, f"request keys missing from the generated reference: {missing}"


def test_every_environment_variable_is_on_the_generated_page(hooks):
    from tts_plugins import envvars

    page = hooks.expand((DOCS / "reference" / "env-vars.md").read_text(), "reference/env-vars.md")
    missing = sorted(v.name for v in envvars.VARIABLES if f"`{v.name}`" not in page)
    assert not missing, f"environment variables missing from the generated reference: {missing}"


def test_every_builtin_technique_has_its_generated_keys_on_a_technique_page():
    """Each built-in technique's and model patch's keys table is generated into its own page under docs/techniques/."""
    from tts_plugins import introspect

    info = introspect.describe()
    builtin = {e["name"] for e in info["techniques"] + info["model_patches"] if e["distribution"] == introspect.BUILTIN and e["keys"]}
    named = set()
    for page in (DOCS / "techniques").glob("*.md"):
        for m in re.finditer(r"^<!-- generated: request-keys((?: [\w.-]+)+) -->$", page.read_text(), re.MULTILINE):
            named |= set(m.group(1).split())
    assert not sorted(builtin - named), f"built-ins whose keys no technique page shows: {sorted(builtin - named)}"


def test_a_named_block_keeps_only_its_techniques(hooks):
    text = hooks.expand("<!-- generated: request-keys think -->\n")
    assert "`tts_think_max`" in text and "`tts_trim`" not in text and "## " not in text
    with pytest.raises(hooks.PluginError, match="no technique or model patch named nope"):
        hooks.expand("<!-- generated: request-keys nope -->\n")


def test_an_unknown_marker_fails_the_build(hooks):
    with pytest.raises(hooks.PluginError, match="unknown generated block 'nope'"):
        hooks.expand("text\n<!-- generated: nope -->\n", "page.md")
    assert hooks.expand("`<!-- generated: env-vars -->` inside a sentence\n") == "`<!-- generated: env-vars -->` inside a sentence\n"


# --- the hook reference's examples -----------------------------------------------------------------------------


def test_every_hook_has_an_example_included_in_the_reference(examples):
    from tts_plugins import hookspecs

    hooks_page = (DOCS / "plugins" / "hooks.md").read_text()
    specs = sorted(n for n in dir(hookspecs) if n.startswith("tts_") and callable(getattr(hookspecs, n)))
    implemented = {n for m in examples.values() for n in specs if hasattr(m, n)}
    assert implemented == set(specs), f"hooks without an example in docs/examples/: {sorted(set(specs) - implemented)}"
    for spec in specs:
        assert f"## `{spec}`" in hooks_page, f"docs/plugins/hooks.md has no section for {spec}"
    for stem in examples:
        assert f'--8<-- "docs/examples/{stem}.py"' in hooks_page, f"docs/examples/{stem}.py is not included in the hook reference"


def test_the_first_example_snippet_runs(examples):
    from tts_plugins.manager import build_registry, plugin_manager

    registry = build_registry(plugin_manager(extra_plugins=[examples["eos_bias"]]))
    assert registry.parse({"tts_eos_bias": -2.0}) == {"eos_bias": -2.0}
    with pytest.raises(ValueError, match="tts_eos_bias"):
        registry.parse({"tts_eos_bias": 1000})


def test_example_technique_passes_the_conformance_suite(examples):
    from tts_plugins.testing import conformance

    conformance.check_all(examples["eos_bias"].EosBias, conformance.tiny_info(), 8)


def test_example_model_patch(examples):
    from tts_plugins import services
    from tts_plugins.manager import build_registry, plugin_manager
    from tts_plugins.testing import conformance

    mod = examples["think_ladder"]
    registry = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[mod]))
    assert {p.engine for p in registry.patches if p.name == "think_ladder"} == {"vllm", "sglang"}
    for patch in (mod.VllmThinkLadder, mod.SglangThinkLadder):
        for check in conformance.PATCH_CHECKS.values():
            check(patch)
    flat = {"tts_think_ladder": [16, 64, 256]}
    assert registry.parse_patches(flat) == {"think_ladder": mod.ThinkLadderParams((16, 64, 256))}
    caps = [services.sample_edit(registry, "vllm", flat, i, "parent").extra["tts_think_max"] for i in range(4)]
    assert caps == [16, 64, 256, 16]
    with pytest.raises(ValueError, match="tts_think_ladder"):
        registry.parse_patches({"tts_think_ladder": [0.5]})


def test_example_verifier(examples):
    from tts_plugins.manager import build_registry, plugin_manager

    registry = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[examples["numeric_verifier"]]))
    assert registry.parse({"tts_trim_verifier": "numeric"})["trim"].verifier == "numeric"
    verifier = registry.verifiers()["numeric"]
    assert verifier.submit("0.50", ".5", "thought").result() is True
    assert verifier.submit("x", "y", "thought").result() is False


def test_example_think_strings(examples):
    from tts_plugins.manager import build_registry, plugin_manager

    registry = build_registry(plugin_manager(load_entry_points=False, extra_plugins=[examples["seed_think"]]))
    assert registry.think_strings(None, "ByteDance-Seed/Seed-OSS-36B-Instruct") == ("<seed:think>", "</seed:think>")
    assert registry.think_strings(None, "Qwen/Qwen3-8B") == ("<think>", "</think>")


def test_example_aggregator_and_reward(examples):
    pytest.importorskip("math_verify")
    from tts_plugins.client.aggregate import registered
    from tts_plugins.manager import plugin_manager

    aggregators, rewards = registered(plugin_manager(load_entry_points=False, extra_plugins=[examples["shortest_vote"]]))
    assert aggregators["unanimous"](["1/2", "0.5", None]).answer is not None
    assert aggregators["unanimous"](["1", "2"]).answer is None
    assert rewards["brevity"]("prompt", "ab") > rewards["brevity"]("prompt", "abc")


def test_example_bench_method(examples):
    from tts_plugins.client import methods
    from tts_plugins.manager import plugin_manager

    registered = methods.registered(plugin_manager(load_entry_points=False, extra_plugins=[examples["ngram_ban_method"]]))
    method, spec = methods.parse_method("ngram-ban:4", registered)
    assert method is examples["ngram_ban_method"].NGRAM_BAN and spec.settings["size"] == 4 and spec.label == "ngram-ban 4"
    assert method.control(spec) == "greedy"
    with pytest.raises(ValueError, match="size must be an int in"):
        methods.parse_method("ngram-ban:1", registered)


def test_the_tutorial_quotes_the_example_plugin_as_it_is():
    """Every line of the tutorial's code blocks titled ``tts_ngram_ban.py`` is a line of the example plugin."""
    source = {line.strip() for line in (ROOT / "examples" / "ngram_ban" / "tts_ngram_ban.py").read_text().splitlines()}
    page = (DOCS / "plugins" / "tutorial.md").read_text()
    blocks = re.findall(r'^```python title="tts_ngram_ban.py"\n(.*?)^```', page, re.MULTILINE | re.DOTALL)
    assert blocks, "the tutorial quotes no fragment of the example plugin"
    stale = [line for b in blocks for line in b.splitlines() if line.strip() and line.strip() not in source]
    assert not stale, f"docs/plugins/tutorial.md quotes lines the example plugin no longer has: {stale}"


# --- the build -------------------------------------------------------------------------------------------------


def test_the_site_builds_in_strict_mode(tmp_path):
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed here (pip install '.[docs]'; ./dev test installs it)")
    # from a folder outside the clone, so the hook imports the installed tts_plugins, as the docs phase does
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (tmp_path / "site" / "reference" / "request-keys.html").exists()
