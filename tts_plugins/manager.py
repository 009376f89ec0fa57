"""Build the plugin manager and the registry of techniques.

Nothing here is global: :func:`build_registry` returns a fresh, validated
:class:`Registry` each call. Adapters keep one per processor instance, and the
admission path caches one per process with :func:`default_registry` (building
twice is harmless; pluggy refuses to register the same plugin twice anyway).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from tts_plugins import envvars, hookspecs
from tts_plugins.params import PREFIX, tts_keys

if TYPE_CHECKING:
    from tts_plugins.technique import LogitsTechnique, ModelPatch

log = logging.getLogger("tts_plugins")

ENTRY_POINT_GROUP = "tts_plugins"


def plugin_manager(*, load_entry_points: bool = True, extra_plugins: Iterable[Any] = (), builtin_techniques: bool = True,
                   errors: list[str] | None = None) -> pluggy.PluginManager:
    """A new plugin manager with the built-in techniques, installed third-party plugins and ``extra_plugins``.

    With ``errors`` (a list), an installed plugin that cannot be imported or registered, or that implements a hook
    that does not exist, is left out and described in ``errors``: the engine's path, where one bad plugin must not
    stop the engine. Without it, the first such plugin raises (a plugin author's tests see it at once)."""
    from tts_plugins import builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if builtin_techniques:
        pm.register(builtin.TECHNIQUES, name="tts_plugins.builtin.techniques")
    pm.register(builtin, name="tts_plugins.builtin")
    from tts_plugins import verifier

    pm.register(verifier, name="tts_plugins.verifier")
    if load_entry_points:
        if errors is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            _load_entry_points(pm, errors)
    for plugin in extra_plugins:
        pm.register(plugin)
    if errors is None:
        pm.check_pending()
        return pm
    while True:  # a plugin that implements a hook that does not exist (a misspelled name) is left out
        try:
            pm.check_pending()
            return pm
        except pluggy.PluginValidationError as exc:
            errors.append(f"plugin {pm.get_name(exc.plugin)!r} left out: {exc}")
            pm.unregister(exc.plugin)


def installed_plugin_manager(left_out: list[str] | None = None) -> pluggy.PluginManager:
    """The built-ins and the installed plugins, for an engine's registry and the client's (``tts bench``'s methods,
    aggregators, rewards): a plugin that cannot be loaded is logged and left out (and described in ``left_out``)."""
    errors: list[str] = []
    pm = plugin_manager(errors=errors)
    for why in errors:
        log.error("tts_plugins: %s", why)
    if left_out is not None:
        left_out.extend(errors)
    return pm


def _load_entry_points(pm: pluggy.PluginManager, errors: list[str]) -> None:
    """``pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)``, one plugin at a time: one that fails to import or to
    register is described in ``errors`` and left out, and the others load."""
    import importlib.metadata

    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
                pm._plugin_distinfo.append((plugin, dist))  # as pluggy's loader records it (list_plugin_distinfo)
            except (Exception, SystemExit) as exc:  # a plugin that calls sys.exit() on import must not end the engine
                errors.append(f"plugin {ep.name!r} ({ep.value}, from {_dist_name(dist)}) left out: it could not be loaded "
                              f"({type(exc).__name__}: {exc})")
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)


@dataclass(frozen=True)
class Registry:
    """The techniques one engine runs, and who owns which request key."""

    pm: pluggy.PluginManager
    techniques: tuple[type[LogitsTechnique], ...]
    key_owner: Mapping[str, str]
    verifier_factories: Mapping[str, Any]
    patches: tuple[ModelPatch, ...] = ()
    left_out: tuple[str, ...] = ()  # what a tolerant build (the engine's) left out, and why

    @property
    def verifier_names(self) -> frozenset[str]:
        return frozenset(self.verifier_factories)

    def verifiers(self) -> dict[str, Any]:
        """Fresh verifier instances for one engine process (unconfigured ones left out)."""
        made = {name: factory() for name, factory in self.verifier_factories.items()}
        return {name: v for name, v in made.items() if v is not None}

    def parse(self, extra: Mapping[str, Any] | None, engine: str | None = None, request: Any = None) -> dict[str, Any]:
        """Parse a request's flat extra arguments into ``{technique name: params}``.

        Keys not starting with ``tts_`` are ignored (they belong to other
        processors); an unknown ``tts_*`` key is a ``ValueError``. With
        ``engine`` (admission), the keys of model patches are checked too,
        including that this engine can run them; with ``request`` (the engine's
        sampling parameters), a patch's or technique's ``check_request(params, request)``
        sees them too.
        """
        flat = tts_keys(extra)
        unknown = sorted(k for k in flat if k not in self.key_owner)
        if unknown:
            raise ValueError(
                f"unknown request key {unknown[0]} (value {flat[unknown[0]]!r}); expected one of: "
                + ", ".join(sorted(self.key_owner))
            )
        self.parse_patches(flat, engine, request)
        parsed = {}
        for cls in self.techniques:
            params = cls.parse_params({k: v for k, v in flat.items() if k in cls.keys})
            if params is not None:
                cls.check_params(params, self)
                if request is not None:
                    cls.check_request(params, request)
                parsed[cls.name] = params
        return parsed

    def parse_patches(self, extra: Mapping[str, Any] | None, engine: str | None = None, request: Any = None) -> dict[str, Any]:
        """``{patch name: params}`` for the model patches a request turns on.

        With ``engine``, only that engine's patches, and each must be able to
        run in the installed engine (``supported()``), else ``ValueError``.
        """
        flat = tts_keys(extra)
        out: dict[str, Any] = {}
        for patch in self.patches:
            if not patch.keys or patch.name in out:  # a patch without keys is always on: no request turns it on
                continue
            if engine is not None and patch.engine != engine:
                continue
            params = patch.parse_params({k: v for k, v in flat.items() if k in patch.keys})
            if params is None:
                continue
            reason = patch.supported() if engine is not None else None
            if reason is not None:
                key = sorted(k for k in flat if k in patch.keys)[0]
                raise ValueError(f"{key}={flat[key]!r} is refused: {reason}")
            if request is not None:
                patch.check_request(params, request)
            out[patch.name] = params
        return out

    def forcing(self, extra: Mapping[str, Any] | None) -> dict[str, str]:
        """``{key: "thinking" | "answer"}`` for the keys of a request that make a technique force or forbid tokens
        (each technique's ``forcing`` declaration); ValueError for keys that do not parse."""
        flat = tts_keys(extra)
        out: dict[str, str] = {}
        for cls in self.techniques:
            mine = {k: v for k, v in flat.items() if k in cls.keys}
            params = cls.parse_params(mine) if mine else None
            if params is None:
                continue
            try:
                out.update(cls.forcing(params, mine))
            except Exception as exc:  # a plugin's declaration that fails: the request is refused, not a server error
                raise ValueError(f"{', '.join(sorted(mine))}: technique {cls.name!r} could not say where it forces tokens "
                                 f"({type(exc).__name__}: {exc})") from None
        for patch in self.patches:  # a model patch's keys may declare it too
            for spec in patch.key_specs:
                if spec.forces and spec.name in flat:
                    out[spec.name] = spec.forces
        return out

    @property
    def effort(self) -> tuple[str, frozenset[str]] | None:
        """``(key, keys that make an effort level add nothing)`` of the technique whose ``effort_key`` holds (the
        first that declares a key of its own: :func:`build_registry` logs the others), or None."""
        for cls in self.techniques:
            if cls.effort_key and cls.effort_key in cls.keys:
                return cls.effort_key, frozenset(cls.effort_yields_to) | {cls.effort_key}
        return None

    def think_strings(self, tokenizer: Any, model_name: str | None = None, engine_hint: Mapping[str, str] | None = None) -> tuple[str, str]:
        result = self.pm.hook.tts_think_strings(tokenizer=tokenizer, model_name=model_name, engine_hint=engine_hint)
        start, end = result
        if not end:
            raise ValueError(f"think end string must be non-empty, got {end!r}")
        return start, end

    def model_patches(self) -> list[ModelPatch]:
        return list(self.patches)


def build_registry(pm: pluggy.PluginManager | None = None, *, strict: bool = True) -> Registry:
    """Collect and validate the registered techniques, verifiers and model patches.

    ``strict`` (the default, for plugin authors and tests): the first invalid or conflicting registration raises
    ValueError. ``strict=False`` is the engine's build (:func:`default_registry`, the adapters): a plugin that fails to
    load, a hook that raises, and each invalid or conflicting registration (or one whose declarations raise when read)
    are logged as errors and left out, listed in :attr:`Registry.left_out`; the built-ins are checked first, so a
    plugin that claims a built-in's name or key is the one left out. A plugin must not stop the engine, nor take the
    built-ins down with it."""
    left_out: list[str] = []
    if pm is None:
        pm = plugin_manager() if strict else installed_plugin_manager(left_out)

    def refuse(message: str) -> None:
        if strict:
            raise ValueError(message)
        log.error("tts_plugins: %s; left out", message)
        left_out.append(message)

    def check(kind: str, plugin: str | None, item: Any, accept: Callable[[], None]) -> None:
        """``accept()`` validates and records one registration; what it raises is refused (tolerant: left out)."""
        try:
            accept()
        except ValueError as exc:
            refuse(str(exc))
        except Exception as exc:
            if strict:
                raise
            refuse(f"{kind} {item!r}{_by(plugin)} could not be read ({type(exc).__name__}: {exc})")

    from tts_plugins.technique import LogitsTechnique  # here: importing the manager stays torch-free

    names: dict[str, type[LogitsTechnique]] = {}
    owner: dict[str, str] = {}

    def technique(plugin: str | None, cls: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, LogitsTechnique)):
            raise ValueError(f"technique {cls!r}{_by(plugin)} must be a subclass of tts_plugins.technique.LogitsTechnique")
        name = getattr(cls, "name", None)  # declared on the base class, set by each technique
        if not isinstance(name, str) or not name:
            raise ValueError(f"technique {cls!r}{_by(plugin)} must have a non-empty str name")
        keys = getattr(cls, "keys", None)
        if not isinstance(keys, frozenset):
            raise ValueError(f"technique {name!r}{_by(plugin)} must declare keys, a frozenset of its tts_* request keys")
        if names.get(name) is cls:
            return  # the same class registered twice
        if name in names:
            raise ValueError(f"two techniques are named {name!r}: {names[name]!r} and {cls!r}{_by(plugin)}")
        _check_keys(f"technique {name!r}{_by(plugin)}", keys)
        _check_declarations(f"technique {name!r}{_by(plugin)}", cls)
        taken = sorted(k for k in keys if k in owner)
        if taken:
            raise ValueError(f"request key {taken[0]!r} is claimed by techniques {owner[taken[0]]!r} and {name!r}{_by(plugin)}")
        names[name] = cls
        owner.update(dict.fromkeys(keys, name))

    registered = _registered(pm, "tts_register_techniques", strict, refuse)
    for plugin, cls in _builtins_first(registered):
        check("technique", plugin, cls, functools.partial(technique, plugin, cls))
    accepted = {id(cls) for cls in names.values()}
    techniques = list(dict.fromkeys(cls for _, cls in registered if id(cls) in accepted))  # registration order
    # Declarations that conflict are logged, not raised: a registry that fails to build would stop the engine, and
    # a plugin's wrong declaration must not take the built-ins down with it.
    try:
        ordered = _ordered(techniques)
    except ValueError as exc:
        log.error("tts_plugins: %s; the techniques run in registration order", exc)
        ordered = techniques
    for cls in ordered:
        if cls.effort_key and cls.effort_key not in cls.keys:
            log.error("tts_plugins: technique %r declares effort_key %r, not one of its keys; ignored", cls.name, cls.effort_key)
    effort = [cls.name for cls in ordered if cls.effort_key and cls.effort_key in cls.keys]
    if len(effort) > 1:
        log.error("tts_plugins: techniques %s each declare an effort_key; reasoning_effort sets %r's only", ", ".join(map(repr, effort)),
                  effort[0])

    factories: dict[str, Any] = {}

    def verifier(plugin: str | None, name: Any, factory: Any) -> None:
        if not isinstance(name, str) or not name or name in factories:
            raise ValueError(f"verifier name must be a new non-empty string, got {name!r}{_by(plugin)}")
        factories[name] = factory

    for plugin, (name, factory) in _builtins_first(_registered(pm, "tts_register_verifiers", strict, refuse, pairs=True)):
        check("verifier", plugin, name, functools.partial(verifier, plugin, name, factory))

    from tts_plugins.patching import version_in_range
    from tts_plugins.technique import ModelPatch

    patch_keys: dict[str, frozenset[str]] = {}
    kept: set[int] = set()

    def model_patch(plugin: str | None, patch: Any) -> None:
        if not isinstance(patch, ModelPatch):
            raise ValueError(f"model patch {patch!r}{_by(plugin)} must be an instance of a subclass of tts_plugins.technique.ModelPatch")
        name = getattr(patch, "name", None)  # declared on the base class, set by each patch
        if not isinstance(name, str) or not name or getattr(patch, "engine", None) not in ("vllm", "sglang"):
            raise ValueError(f"model patch {patch!r}{_by(plugin)} needs a non-empty str name and an engine ('vllm' or 'sglang')")
        keys = patch.keys
        if not isinstance(keys, frozenset):
            raise ValueError(f"model patch {name!r}{_by(plugin)} keys must be a frozenset of its tts_* request keys, got {keys!r}")
        lo, hi = patch.min_version, patch.max_version
        if not all(v is None or isinstance(v, str) for v in (lo, hi)):
            raise ValueError(f"model patch {name!r}{_by(plugin)}: min_version and max_version must be strings or None, got {lo!r} and {hi!r}")
        if lo is not None and hi is not None and not version_in_range(lo, None, hi):
            raise ValueError(f"model patch {name!r}{_by(plugin)} has an empty version range: min_version {lo!r} >= max_version {hi!r}")
        if name in names:
            raise ValueError(f"model patch {name!r}{_by(plugin)} has the name of a technique")
        if name in patch_keys:  # the same patch for another engine (or version range): it shares the keys
            if patch_keys[name] != keys:
                raise ValueError(f"model patches named {name!r} declare different keys: {sorted(patch_keys[name])} and {sorted(keys)}"
                                 f"{_by(plugin)}")
            kept.add(id(patch))
            return
        _check_keys(f"model patch {name!r}{_by(plugin)}", keys)
        taken = sorted(k for k in keys if k in owner)
        if taken:
            raise ValueError(f"request key {taken[0]!r} is claimed by {owner[taken[0]]!r} and model patch {name!r}{_by(plugin)}")
        patch_keys[name] = keys
        owner.update(dict.fromkeys(keys, name))
        kept.add(id(patch))

    registered_patches = _registered(pm, "tts_register_model_patches", strict, refuse)
    for plugin, patch in _builtins_first(registered_patches):
        check("model patch", plugin, patch, functools.partial(model_patch, plugin, patch))
    patches = [patch for _, patch in registered_patches if id(patch) in kept]  # registration order
    return Registry(pm=pm, techniques=tuple(ordered), key_owner=owner, verifier_factories=factories, patches=tuple(patches),
                    left_out=tuple(left_out))


def _check_keys(what: str, keys: frozenset[Any]) -> None:
    bad = [k for k in keys if not isinstance(k, str) or not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{what} key {min(bad, key=repr)!r} must start with {PREFIX!r}")


def _check_declarations(what: str, cls: type) -> None:
    """The ordering and effort declarations are what the core reads of a technique besides its keys."""
    for attr in ("runs_before", "runs_after", "effort_yields_to"):
        value = getattr(cls, attr)
        if isinstance(value, str) or not isinstance(value, (tuple, list, frozenset, set)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{what}: {attr} must be a tuple of str, got {value!r}")
    if cls.effort_key is not None and not isinstance(cls.effort_key, str):
        raise ValueError(f"{what}: effort_key must be a str or None, got {cls.effort_key!r}")


BUILTIN_PLUGINS = ("tts_plugins.builtin.techniques", "tts_plugins.builtin", "tts_plugins.verifier")


def _registered(pm: pluggy.PluginManager, hook: str, strict: bool, refuse: Callable[[str], None],
                pairs: bool = False) -> list[tuple[str | None, Any]]:
    """``[(plugin name, what it registered)]`` from a ``tts_register_*`` hook, in pluggy's call order. Strict: one
    hook call (a plugin's exception propagates). Else each plugin's implementation alone, called as pluggy calls it
    (positionally): one that raises is refused, and the others' registrations stand."""
    if strict:
        got: list[Any] = []
        getattr(pm.hook, hook)(register=_adder(got, pairs))
        return [(None, x) for x in got]
    out: list[tuple[str | None, Any]] = []
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):  # pluggy calls the last registered first
        mine: list[Any] = []
        add = _adder(mine, pairs)
        try:
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise TypeError("a register hook cannot be a wrapper")
            impl.function(*[add for _ in impl.argnames])
        except (Exception, SystemExit) as exc:
            refuse(f"plugin {impl.plugin_name!r} failed in {hook} ({type(exc).__name__}: {exc}), so nothing it registers there is used")
            continue
        out.extend((impl.plugin_name, x) for x in mine)
    return out


def _dist_name(dist: Any) -> str:
    try:
        return str(dist.metadata["Name"] or "?")
    except Exception:  # broken metadata must not turn a logged error into a crash
        return "?"


def _adder(into: list[Any], pairs: bool) -> Callable[..., None]:
    """The ``register`` callable a hook gets: ``register(x)``, or ``register(name, factory)`` for verifiers."""
    if not pairs:
        return into.append

    def register(name: str, factory: Callable[[], Any]) -> None:
        into.append((name, factory))

    return register


def _builtins_first(items: list[tuple[str | None, Any]]) -> list[tuple[str | None, Any]]:
    """The package's own registrations checked first: a plugin that claims a built-in's name or key is left out."""
    return sorted(items, key=lambda item: item[0] not in BUILTIN_PLUGINS)


def _by(plugin: str | None) -> str:
    return f" (from plugin {plugin!r})" if plugin and plugin not in BUILTIN_PLUGINS else ""


def _ordered(techniques: list[type[LogitsTechnique]]) -> list[type[LogitsTechnique]]:
    """The techniques in the order their ``apply`` runs: each declaration of ``runs_before`` / ``runs_after`` holds
    (``"*"`` in ``runs_before``: before every technique that does not itself declare it), else registration order.
    ValueError on a cycle."""
    index = {cls.name: i for i, cls in enumerate(techniques)}
    first = {cls.name for cls in techniques if "*" in cls.runs_before}
    after: dict[str, set[str]] = {cls.name: set() for cls in techniques}  # name -> the names that must run before it
    for cls in techniques:
        for other in cls.runs_before:
            targets = [n for n in index if n not in first] if other == "*" else [other] if other in index else []
            for t in targets:
                if t != cls.name:
                    after[t].add(cls.name)
        for other in cls.runs_after:
            if other in index and other != cls.name:
                after[cls.name].add(other)
    out: list[type[LogitsTechnique]] = []
    done: set[str] = set()
    while len(out) < len(techniques):
        ready = [cls for cls in techniques if cls.name not in done and after[cls.name] <= done]
        if not ready:
            stuck = sorted(n for n in index if n not in done)
            raise ValueError(f"techniques {', '.join(map(repr, stuck))} declare runs_before/runs_after in a cycle")
        out.append(ready[0])
        done.add(ready[0].name)
    return out


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry of this process (cached: entry points do not change while it runs). Tolerant: a plugin that
    cannot load or registers something invalid is logged and left out (:attr:`Registry.left_out`)."""
    return build_registry(strict=False)


def disabled() -> bool:
    """``TTS_PLUGINS_DISABLE=1``: the operator's switch; installed plugins then do nothing in this engine."""
    return (envvars.get("TTS_PLUGINS_DISABLE") or "").lower() in ("1", "true", "yes")
