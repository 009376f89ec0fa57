"""The one module allowed to change engine internals; every patch goes through ``Patcher``.

Each patch checks the engine version and that its target exists, has an owner
(the patch's name), refuses a target another owner already patched, logs what
it replaced, and can be undone (tests do). SGLang patches register hooks with
SGLang's own ``HookRegistry`` through :func:`sglang_hooks`, version-bounded the
same way.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple

log = logging.getLogger("tts_plugins.patching")

_MARK = "__tts_plugins_original__"  # on a replacement: the exact object it replaced
_OWNER_MARK = "__tts_plugins_owner__"  # on a replacement: the name of the patch that installed it

# Which owner patched which target in this process: {"module.Class.attr": owner}. Module-level on purpose: it
# mirrors the monkeypatches themselves, which are process-global; every Patcher in the process must see it
# (vLLM runs its general plugins more than once per process, each run with a Patcher of its own), and it lives
# exactly as long as the patches it records (Patcher.undo removes their entries).
_OWNERS: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def engine_version(engine: str) -> str | None:
    """The running engine's version (cached: admission asks once per request, and metadata parsing is slow).

    The imported package's own ``__version__`` when it is loaded (what actually runs, also when a tree of another
    release is put first on the path), else the installed distribution's metadata."""
    import sys

    mod = sys.modules.get(engine)
    ver = getattr(mod, "__version__", None) if mod is not None else None
    if isinstance(ver, str) and ver[:1].isdigit():
        return ver
    for dist in ((engine, f"{engine}-cpu") if engine == "vllm" else (engine,)):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


class Applied(NamedTuple):
    """One replacement a :class:`Patcher` made, with what it takes to undo it exactly."""

    target: str  # canonical name ("module.Class.attr"), the key of the ownership record
    holder: Any  # the module or class whose attribute was replaced
    attr: str
    original: Any  # the raw attribute: for a classmethod or staticmethod, the descriptor object itself
    replacement: Any  # the raw attribute installed
    inherited: bool  # the class only inherited the attribute: undo deletes the override instead of restoring
    owner: str


@dataclass
class Patcher:
    """Replaces attributes of engine classes or modules, and remembers how to undo it.

    Every replacement has an owner, the name of the patch that makes it (``install_patches`` labels the patcher
    with each ``ModelPatch.name`` in turn; a test passes ``owner=``). In one process, the same owner patching the
    same target again is a no-op (general plugins can run twice in a process); another owner patching it raises
    ``RuntimeError`` naming both, since two wrappers of one engine method would silently depend on their order.
    """

    engine: str
    owner: str | None = None
    applied: list[Applied] = field(default_factory=list)

    def replace(self, target: str, make: Callable[[Any], Any], *, min_version: str | None = None,
                max_version: str | None = None, owner: str | None = None) -> bool:
        """Replace ``module:attr.path`` by ``make(original)``; True if replaced, False if skipped or refused.

        ``min_version`` is inclusive and ``max_version`` exclusive: a patch written against one engine's
        internals refuses versions nobody read. A target that does not exist is refused too; every refusal is
        logged as an error. ``owner`` defaults to the patcher's.

        On a class the raw attribute is read (not through the descriptor protocol), so a classmethod stays a
        classmethod and a staticmethod a staticmethod: ``make`` gets the original as a call needs it (for a
        classmethod bound to the class, for a staticmethod the plain function) and may return a plain function,
        which is wrapped back into the same kind (a classmethod's replacement then takes ``cls`` first).
        :meth:`undo` restores the identical original object.
        """
        ver = engine_version(self.engine)
        if ver is None:
            log.warning("tts_plugins: %s is not installed; not patching %s", self.engine, target)
            return False
        if not version_in_range(ver, min_version, max_version):
            log.error("tts_plugins: %s %s is outside the versions [%s, %s) this patch was written for; not patching %s",
                      self.engine, ver, min_version or "any", max_version or "any", target)
            return False
        who = owner or self.owner
        if not who:
            raise ValueError(f"patching {target} needs an owner: Patcher({self.engine!r}, owner=...) or replace(..., owner=...)")
        try:
            holder, attr = _resolve(target)
            original, inherited = _raw_attribute(holder, attr)
        except (ImportError, AttributeError) as exc:
            log.error("tts_plugins: %s %s: cannot find %s (%s); not patching it (owner %s)", self.engine, ver, target, exc, who)
            return False
        name = _target_name(holder, attr)
        previous = _OWNERS.get(name)
        if previous == who:
            log.debug("tts_plugins: %s already patched %s in this process; skipping", who, name)
            return False
        if previous is not None:
            raise RuntimeError(
                f"tts_plugins: {who!r} cannot patch {name}: {previous!r} already patched it in this process "
                f"(two patches of one target would depend on their order; make one of them compose with the other)"
            )
        new = _same_kind(original, make(_callable(holder, original)), target)
        _mark(new, original, who)
        setattr(holder, attr, new)
        _OWNERS[name] = who
        self.applied.append(Applied(name, holder, attr, original, new, inherited, who))
        log.info("tts_plugins: %s patched %s (%s %s)", who, name, self.engine, ver)
        return True

    def undo(self) -> None:
        """Restore every original this patcher replaced, newest first, and release those targets' ownership."""
        while self.applied:
            done = self.applied.pop()
            current = _own_dict(done.holder).get(done.attr)
            if current is not done.replacement:
                log.warning("tts_plugins: %s was replaced again after %s patched it; restoring the original anyway",
                            done.target, done.owner)
            if not done.inherited:
                setattr(done.holder, done.attr, done.original)
            elif done.attr in _own_dict(done.holder):
                delattr(done.holder, done.attr)
            _unmark(done.replacement)  # make() may have returned an object that outlives the patch
            if _OWNERS.get(done.target) == done.owner:
                del _OWNERS[done.target]
            log.info("tts_plugins: %s restored %s", done.owner, done.target)


def patch_owner(target: str) -> str | None:
    """Who patched ``target`` (canonical ``module.Class.attr`` name) in this process, or None."""
    return _OWNERS.get(target)


def _resolve(target: str) -> tuple[Any, str]:
    """``module:attr.path`` -> (the module or class holding the last attribute, its name)."""
    module_name, sep, path = target.partition(":")
    if not sep or not path:
        raise ValueError(f"patch target must look like 'package.module:Class.attr', got {target!r}")
    holder: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        holder = getattr(holder, name)
    return holder, attr


def _resolve_dotted(name: str) -> Any:
    """``pkgutil.resolve_name`` for ``a.b.Class.attr`` (SGLang's form), keeping the import error it would swallow.

    ``pkgutil`` stops importing at the first prefix that fails for any reason and reports the next attribute as
    missing; when a module exists but its import fails (a missing dependency), that failure is the real reason.
    """
    parts = name.split(".")
    module_name = parts.pop(0)
    obj: Any = importlib.import_module(module_name)
    failed: ImportError | None = None
    while parts:
        candidate = f"{module_name}.{parts[0]}"
        try:
            obj = importlib.import_module(candidate)
        except ModuleNotFoundError as exc:
            if exc.name != candidate:
                failed = exc
            break
        except ImportError as exc:
            failed = exc
            break
        module_name = candidate
        parts.pop(0)
    try:
        for part in parts:
            obj = getattr(obj, part)
    except AttributeError as exc:
        if failed is not None:
            raise ImportError(f"importing {module_name}.{parts[0]} failed: {failed}") from failed
        raise exc
    return obj


def _own_dict(holder: Any) -> Any:
    return getattr(holder, "__dict__", {})


def _raw_attribute(holder: Any, attr: str) -> tuple[Any, bool]:
    """The attribute as stored (a classmethod as its descriptor), and whether ``holder`` only inherits it."""
    own = _own_dict(holder)
    if attr in own:
        return own[attr], False
    if isinstance(holder, type):
        return inspect.getattr_static(holder, attr), True  # AttributeError when missing
    return getattr(holder, attr), True  # e.g. a module's lazy __getattr__


def _callable(holder: Any, raw: Any) -> Any:
    """What ``make`` receives: the original as a call needs it."""
    if isinstance(raw, classmethod):
        return raw.__get__(None, holder)
    if isinstance(raw, staticmethod):
        return raw.__func__
    return raw


def _same_kind(original: Any, new: Any, target: str) -> Any:
    for kind in (classmethod, staticmethod):
        if isinstance(original, kind):
            if isinstance(new, kind):
                return new
            if isinstance(new, (classmethod, staticmethod)):
                raise TypeError(f"{target} is a {kind.__name__}; its replacement must not be a {type(new).__name__}")
            return kind(new)
    return new


def _mark(new: Any, original: Any, owner: str) -> None:
    # For whoever inspects a patched engine (the ownership record is what decides conflicts). On the descriptor and
    # on the function inside it: a lookup through the class sees the function (a bound classmethod forwards
    # attribute reads to it), a raw lookup sees the descriptor.
    for obj in (new, getattr(new, "__func__", None)):
        if obj is None:
            continue
        try:
            setattr(obj, _MARK, original)
            setattr(obj, _OWNER_MARK, owner)
        except (AttributeError, TypeError):
            pass  # e.g. a builtin: the ownership record still knows


def _unmark(new: Any) -> None:
    for obj in (new, getattr(new, "__func__", None)):
        for mark in (_MARK, _OWNER_MARK):
            if mark in _own_dict(obj):
                delattr(obj, mark)


def _target_name(holder: Any, attr: str) -> str:
    """One name per patched attribute, however the target string reached it (re-exports resolve to the same)."""
    if isinstance(holder, type):
        return f"{holder.__module__}.{holder.__qualname__}.{attr}"
    if isinstance(holder, types.ModuleType):
        return f"{holder.__name__}.{attr}"
    return f"{holder!r}.{attr}"


def version_in_range(ver: str, min_version: str | None = None, max_version: str | None = None) -> bool:
    """``min_version <= ver < max_version`` (either bound may be None), comparing release numbers."""
    v = _vtuple(ver)
    if min_version is not None and v < _vtuple(min_version):
        return False
    return max_version is None or v < _vtuple(max_version)


def version_refusal(engine: str, label: str, feature: str, min_version: str, max_version: str, hint: str = "") -> str | None:
    """Why ``feature`` cannot run on the installed ``engine`` (not installed, or outside the range it was written
    for), or None. ``hint`` (e.g. " (send ... instead)") ends the range message."""
    ver = engine_version(engine)
    if ver is None:
        return f"{label} is not installed"
    if not version_in_range(ver, min_version, max_version):
        return f"{feature} supports {label} >= {min_version}, < {max_version}; this server runs {label} {ver}{hint}"
    return None


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def install_patches(registry: Any, engine: str) -> Patcher:
    """Install every registered patch for ``engine``, each as the owner of what it patches (its ``name``).

    Returns the patcher; ``undo()`` reverts every replacement it made.
    """
    patcher = Patcher(engine)
    try:
        for patch in registry.model_patches():
            if patch.engine == engine:
                patcher.owner = patch.name
                patch.install(patcher)
    finally:
        patcher.owner = None
    return patcher


# The SGLang versions the core hooks (adapters/sglang.py) were written and tested against: min inclusive, max exclusive.
SGLANG_MIN_VERSION, SGLANG_MAX_VERSION = "0.5.20", "0.5.24"
_HOOKED = "_tts_plugins_registered"  # on the hook registry: the tags that registered in this process


def sglang_hooks(hooks: list[tuple[str, Callable[..., Any], str]], *, tag: str, min_version: str = SGLANG_MIN_VERSION,
                 max_version: str = SGLANG_MAX_VERSION, registry: Any = None) -> bool:
    """Register ``(target, hook, kind)`` hooks with SGLang's own ``HookRegistry`` (kind: before/after/around).

    SGLang applies them right after its general plugins ran, in each process; several hooks on one target chain
    (so, unlike :meth:`Patcher.replace`, two owners may hook the same target). ``min_version`` is inclusive and
    ``max_version`` exclusive, as for vLLM patches: every caller states the range its hooks were written for.
    Checks the version and that every target exists first and registers nothing on a mismatch (one error log
    line naming the version and range); registers nothing twice in one process per ``tag`` (the owner: the
    patch's name, or "core"). Returns whether it registered.

    ``registry`` is SGLang's ``HookRegistry`` when None; a test passes a stand-in with
    ``register(target, hook, kind)``, which then receives ``kind`` as the plain string.
    """
    ver = engine_version("sglang")
    if ver is None:
        log.warning("tts_plugins: sglang is not installed; not hooking %s", tag)
        return False
    if not version_in_range(ver, min_version, max_version):
        log.error("tts_plugins: sglang %s is outside the versions [%s, %s) the %s hooks were written for; not hooking",
                  ver, min_version, max_version, tag)
        return False
    if registry is None:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        registry, hook_type = HookRegistry, HookType
    else:
        hook_type = str
    done = _own_dict(registry).get(_HOOKED)
    if not isinstance(done, set):
        done = set()
        setattr(registry, _HOOKED, done)
    if tag in done:
        log.debug("tts_plugins: %s hooks already registered in this process; skipping", tag)
        return False
    for target, _, _ in hooks:
        try:
            _resolve_dotted(target)
        except (ImportError, AttributeError) as exc:
            log.error("tts_plugins: sglang %s: cannot find %s (%s); not hooking %s", ver, target, exc, tag)
            return False
    for target, hook, kind in hooks:
        registry.register(target, hook, hook_type(kind))
        log.info("tts_plugins: %s hooked %s (%s, sglang %s)", tag, target, kind, ver)
    done.add(tag)
    return True
