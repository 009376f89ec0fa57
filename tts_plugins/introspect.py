"""What is installed, from the declarations: techniques, model patches, verifiers, aggregators, environment variables.

:func:`describe` is ``tts plugins --json``; :func:`request_keys_markdown` and :func:`env_vars_markdown` are the
reference tables of the docs site. Everything comes from what the code declares (``key_specs``, ``min_version``,
:data:`tts_plugins.envvars.VARIABLES`), so the reference cannot drift from the code; a key without a declaration
is listed with an empty description, which ``tests/test_reference.py`` refuses for the built-ins.

Importing this module imports no torch and no engine; :func:`describe` builds a registry (which imports the
techniques, hence torch) but never imports an engine: whether a model patch is active here is read from the
installed engine's version metadata.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

from tts_plugins import envvars

__all__ = ["BUILTIN", "ENGINES", "describe", "env_vars_markdown", "request_keys_markdown", "show_default", "version_range"]

BUILTIN = "built-in"
ENGINES = ("vllm", "sglang")  # a logits technique runs in every engine the package has an adapter for
_LABELS = {"vllm": "vLLM", "sglang": "SGLang"}


def describe(registry: Any = None) -> dict[str, Any]:
    """Everything installed in this environment, as a JSON-able dict: ``techniques`` (in the order their ``apply``
    runs), ``model_patches`` (one entry per engine, with ``active`` and the ``reason`` when not), ``verifiers``,
    ``aggregators`` and ``rewards`` (the client's), ``environment`` (every variable the package reads),
    ``disabled`` (``TTS_PLUGINS_DISABLE`` is set here) and ``left_out`` (each plugin or registration an engine started
    here would log and leave out, and why). ``registry``: a :class:`tts_plugins.manager.Registry`
    (default: a fresh one from the installed plugins)."""
    from tts_plugins import manager

    registry = registry if registry is not None else manager.build_registry(strict=False)  # as an engine builds it
    aggregators, rewards = _client_functions(registry)
    return {
        "left_out": list(registry.left_out),
        "techniques": [_technique(cls) for cls in registry.techniques],
        "model_patches": [_patch(patch) for patch in registry.patches],
        "verifiers": [{"name": name, **_origin(factory)} for name, factory in sorted(registry.verifier_factories.items())],
        "aggregators": aggregators,
        "rewards": rewards,
        "environment": [{"name": v.name, "default": v.default, "where": v.where, "doc": v.doc} for v in envvars.VARIABLES],
        "disabled": manager.disabled(),
    }


def request_keys_markdown(registry: Any = None) -> str:
    """One markdown table per technique and per model patch with keys: key, type, default, where it forces tokens,
    meaning (from ``key_specs``)."""
    info = describe(registry)
    out: list[str] = []
    for t in info["techniques"]:
        note = f" {t['forcing_note']}" if t["forcing_note"] else ""
        out.append(f"## `{t['name']}`\n\nTechnique on logits ({_from(t)}; {' and '.join(_LABELS[e] for e in t['engines'])}).{note}\n\n"
                   + _keys_table(t["keys"]))
    variants: dict[str, list[dict[str, Any]]] = {}
    for p in info["model_patches"]:
        variants.setdefault(p["name"], []).append(p)
    for name, ps in variants.items():
        if not ps[0]["keys"]:
            continue  # always on: no request key
        engines = "; ".join(f"{_LABELS.get(p['engine'], p['engine'])} {version_range(p)}" for p in ps)
        out.append(f"## `{name}`\n\nModel patch ({_from(ps[0])}; {engines}).\n\n" + _keys_table(ps[0]["keys"]))
    return "\n\n".join(out) + "\n"


def env_vars_markdown() -> str:
    """One markdown table of every environment variable the package and its tools read: name, default, whose
    environment, meaning (from :data:`tts_plugins.envvars.VARIABLES`)."""
    rows = ["| variable | default | where | meaning |", "| --- | --- | --- | --- |"]
    for v in envvars.VARIABLES:
        default = "" if v.default is None else f"`{v.default}`"
        rows.append(f"| `{v.name}` | {default} | {v.where} | {_cell(v.doc)} |")
    return "\n".join(rows) + "\n"


# --- the parts --------------------------------------------------------------------------------------------------


def _technique(cls: type) -> dict[str, Any]:
    from tts_plugins.technique import LogitsTechnique

    overridden = getattr(cls.forcing, "__func__", None) is not LogitsTechnique.forcing.__func__  # forces by value
    return {
        "name": cls.name,
        **_origin(cls),
        "engines": list(ENGINES),
        "keys": _keys(cls),
        "forcing_note": _first_paragraph(cls.forcing.__doc__) if overridden else None,
        "effort_key": getattr(cls, "effort_key", None),
        "effort_yields_to": sorted(getattr(cls, "effort_yields_to", ())),
        "runs_before": list(getattr(cls, "runs_before", ())),
        "runs_after": list(getattr(cls, "runs_after", ())),
        "argmax_invariant": bool(getattr(cls, "argmax_invariant", False)),
    }


def _patch(patch: Any) -> dict[str, Any]:
    engine = getattr(patch, "engine", None)
    low, high = getattr(patch, "min_version", None), getattr(patch, "max_version", None)
    version, reason = _engine_state(engine, patch, low, high)
    return {
        "name": patch.name,
        **_origin(type(patch)),
        "engine": engine,
        "keys": _keys(type(patch)),
        "min_version": low,
        "max_version": high,
        "engine_version": version,
        "active": reason is None,
        "reason": reason,
    }


def _engine_state(engine: str | None, patch: Any, low: str | None, high: str | None) -> tuple[str | None, str | None]:
    """``(installed engine version, None when the patch would be installed here, else why not)``. Reads version
    metadata only: a patch's own ``refuse()`` (e.g. a model runner it does not support) may import the engine, so it
    is left to the server's start-up."""
    from tts_plugins import patching

    label = getattr(patch, "label", None) or _LABELS.get(engine or "", engine or "the engine")
    try:
        version = patching.engine_version(engine) if engine else None
        if version is None:
            return None, f"{label} is not installed"
        reason = patching.version_refusal(engine, label, getattr(patch, "feature", None) or f"model patch {patch.name!r}",
                                          low or "0", high or "999", getattr(patch, "hint", ""))
        return version, reason
    except Exception as exc:  # a broken metadata entry must not break the listing
        return None, f"the {label} version could not be read ({type(exc).__name__}: {exc})"


def _keys(cls: type) -> list[dict[str, Any]]:
    """The class's keys, declared ones in declaration order, then undeclared ones (no type, no description)."""
    keys = frozenset(getattr(cls, "keys", ()) or ())
    specs = [s for s in getattr(cls, "key_specs", ()) if s.name in keys]
    out = [{"name": s.name, "type": s.type, "default": _jsonable(s.default), "forces": s.forces, "doc": s.doc} for s in specs]
    declared = {s.name for s in specs}
    out += [{"name": k, "type": None, "default": None, "forces": None, "doc": None} for k in sorted(keys - declared)]
    return out


def _client_functions(registry: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The client's aggregators and rewards registered with this registry's plugin manager (empty if they cannot be
    collected: the listing is for the engine side first)."""
    try:
        from tts_plugins.client import aggregate

        aggregators, rewards = aggregate.registered(registry.pm)
    except Exception:
        return [], []
    return ([{"name": n, **_origin(f)} for n, f in sorted(aggregators.items())],
            [{"name": n, **_origin(f)} for n, f in sorted(rewards.items())])


def _origin(obj: Any) -> dict[str, Any]:
    """``{"module", "distribution"}``: where ``obj`` is defined and which installed distribution provides it
    (``"built-in"`` for this package; ``None`` when no distribution claims the module, e.g. a test's plugin)."""
    module = getattr(obj, "__module__", None) or ""
    return {"module": module or None, "distribution": _distribution(module)}


@functools.lru_cache(maxsize=256)
def _distribution(module: str) -> str | None:
    if module == "tts_plugins" or module.startswith("tts_plugins."):
        return BUILTIN
    if not module:
        return None
    try:
        from importlib.metadata import entry_points, packages_distributions

        for ep in entry_points(group="tts_plugins"):
            target = ep.value.split(":")[0].strip()
            if module == target or module.startswith(target + "."):
                dist = getattr(ep, "dist", None)
                if dist is not None:
                    return dist.name
        found = packages_distributions().get(module.split(".")[0])
        return found[0] if found else None
    except Exception:
        return None


# --- formatting -------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    text = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    return text.replace("``", "`") or None


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def show_default(value: Any) -> str:
    """A key's default as the references print it: JSON, or ``—`` when there is none (absent means what the doc
    says)."""
    return "—" if value is None else json.dumps(value, ensure_ascii=False)


def _keys_table(keys: Iterable[dict[str, Any]]) -> str:
    rows = ["| key | type | default | forces tokens in | meaning |", "| --- | --- | --- | --- | --- |"]
    for k in keys:
        default = show_default(k["default"])
        default = default if default == "—" else f"`{_cell(default)}`"
        rows.append(f"| `{k['name']}` | {_cell(k['type'] or '')} | {default} | {k['forces'] or ''} | {_cell(k['doc'] or '')} |")
    return "\n".join(rows)


def _from(entry: dict[str, Any]) -> str:
    dist = entry.get("distribution")
    return BUILTIN if dist == BUILTIN else f"from {dist}" if dist else f"from {entry.get('module')}"


def version_range(patch: dict[str, Any]) -> str:
    """A model patch's engine versions (from :func:`describe`), as the references print them."""
    low, high = patch.get("min_version"), patch.get("max_version")
    if low and high:
        return f">= {low}, < {high}"
    return f">= {low}" if low else f"< {high}" if high else "any version"
