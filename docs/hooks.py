"""MkDocs hook: the reference tables generated from the code's own declarations, so the docs cannot drift from it.

A line of a page that is exactly ``<!-- generated: NAME -->`` is replaced, at build time, by the markdown that
:mod:`tts_plugins.introspect` generates for NAME: ``request-keys`` (every built-in technique's and model patch's
``key_specs``; installed third-party plugins are left out) or ``env-vars`` (:data:`tts_plugins.envvars.VARIABLES`).
``<!-- generated: request-keys think -->`` keeps only the named techniques' or model patches' sections (without
their headings), for a technique's own page. An unknown NAME, an unknown technique, or a package that cannot be
imported fails the build: a page must never be published without its table.

Registered under ``hooks:`` in ``mkdocs.yml``. The build imports the installed ``tts_plugins`` (the wheel, or
``pip install -e .``), the same package an engine would load.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from mkdocs.exceptions import PluginError
except ImportError:  # tests/test_docs.py expands the markers without mkdocs installed
    PluginError = RuntimeError

GENERATORS = {"request-keys": "request_keys_markdown", "env-vars": "env_vars_markdown"}
MARKER = re.compile(r"^<!-- generated: ([\w-]+)((?: [\w.-]+)*) -->[ \t]*$", re.MULTILINE)
SECTION = re.compile(r"^## `([^`]+)`\n", re.MULTILINE)  # request_keys_markdown's heading of one technique or patch


def generate(name: str, where: str = "a page", only: tuple[str, ...] = ()) -> str:
    """The generated markdown for marker ``name``, restricted to the sections ``only`` names (``PluginError`` naming
    ``where`` when it cannot be made)."""
    if name not in GENERATORS:
        raise PluginError(f"{where}: unknown generated block {name!r}; known: {', '.join(sorted(GENERATORS))}")
    if only and name != "request-keys":
        raise PluginError(f"{where}: only the request-keys block takes technique names, got {name!r} with {' '.join(only)}")
    try:
        from tts_plugins import introspect
    except ImportError as exc:
        raise PluginError(f"{where}: the generated {name} table needs the tts_plugins package installed beside mkdocs "
                          f"(pip install -e . or the project's wheel): {exc}") from exc
    function = getattr(introspect, GENERATORS[name], None)
    if function is None:
        raise PluginError(f"{where}: tts_plugins.introspect has no {GENERATORS[name]}() for the generated {name} table")
    if name == "request-keys":  # the package's own techniques: not whatever third-party plugin the build machine has
        from tts_plugins.manager import build_registry, plugin_manager

        text = function(build_registry(plugin_manager(load_entry_points=False))).rstrip() + "\n"
    else:
        text = function().rstrip() + "\n"
    return sections(text, only, where) if only else text


def sections(text: str, names: tuple[str, ...], where: str = "a page") -> str:
    """The sections of the request-key reference ``text`` for ``names``, in that order, without their headings."""
    parts = SECTION.split(text)
    found = dict(zip(parts[1::2], parts[2::2]))
    missing = [n for n in names if n not in found]
    if missing:
        raise PluginError(f"{where}: no technique or model patch named {', '.join(missing)} in the request-key reference "
                          f"(registered: {', '.join(found)})")
    return "\n".join(found[n].strip() + "\n" for n in names)


def expand(markdown: str, where: str = "a page") -> str:
    """``markdown`` with every marker line replaced by its generated table."""
    return MARKER.sub(lambda m: generate(m.group(1), where, tuple(m.group(2).split())), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand(markdown, page.file.src_uri)
