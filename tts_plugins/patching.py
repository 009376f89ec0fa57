"""The one module allowed to change engine internals; every patch goes through ``Patcher``.

Each patch checks the engine version and that its target exists, refuses to
patch twice, logs what it replaced, and can be undone (tests do).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger("tts_plugins.patching")

_MARK = "__tts_plugins_original__"


@functools.lru_cache(maxsize=None)
def engine_version(engine: str) -> str | None:
    """The installed engine's version (cached: admission asks once per request, and metadata parsing is slow)."""
    for dist in ((engine, f"{engine}-cpu") if engine == "vllm" else (engine,)):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


@dataclass
class Patcher:
    """Replaces attributes of engine classes or modules, and remembers how to undo it."""

    engine: str
    applied: list[tuple[Any, str, Any]] = field(default_factory=list)

    def replace(self, target: str, make: Callable[[Any], Any], *, min_version: str | None = None, max_version: str | None = None) -> bool:
        """Replace ``module:attr.path`` by ``make(original)``; False if skipped.

        ``min_version`` is inclusive and ``max_version`` exclusive: a patch
        written against one engine's internals refuses versions nobody read.
        """
        ver = engine_version(self.engine)
        if ver is None:
            log.warning("tts_plugins: %s is not installed; not patching %s", self.engine, target)
            return False
        if not version_in_range(ver, min_version, max_version):
            log.error("tts_plugins: %s %s is outside the versions [%s, %s) this patch was written for; not patching %s",
                      self.engine, ver, min_version or "any", max_version or "any", target)
            return False
        module_name, _, path = target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name)
        original = getattr(owner, attr, None)
        if original is None:
            log.warning("tts_plugins: %s has no %s; not patching", self.engine, target)
            return False
        if getattr(original, _MARK, None) is not None:
            return False  # already patched in this process
        new = make(original)
        setattr(new, _MARK, original)
        setattr(owner, attr, new)
        self.applied.append((owner, attr, original))
        log.info("tts_plugins: patched %s (%s %s)", target, self.engine, ver)
        return True

    def undo(self) -> None:
        while self.applied:
            owner, attr, original = self.applied.pop()
            setattr(owner, attr, original)


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
    """Install every registered patch for ``engine``; returns the patcher (undo() reverts)."""
    patcher = Patcher(engine)
    for patch in registry.model_patches():
        if getattr(patch, "engine", None) == engine:
            patch.install(patcher)
    return patcher


SGLANG_MIN_VERSION = "0.5.20"


def sglang_hooks(hooks: list[tuple[str, Callable[..., Any], str]], tag: str = "core") -> bool:
    """Register ``(target, hook, kind)`` hooks with SGLang's own ``HookRegistry`` (kind: before/after/around).

    SGLang applies them right after its general plugins ran, in each process.
    Checks the version and that every target exists first; registers nothing
    on a mismatch, and nothing twice in one process (per ``tag``).
    """
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    ver = engine_version("sglang")
    if ver is None or _vtuple(ver) < _vtuple(SGLANG_MIN_VERSION):
        log.warning("tts_plugins: sglang %s is older than %s; not hooking", ver, SGLANG_MIN_VERSION)
        return False
    done = HookRegistry.__dict__.get("_tts_plugins_registered")
    if not isinstance(done, set):
        done = set()
        HookRegistry._tts_plugins_registered = done
    if tag in done:
        return False
    for target, _, _ in hooks:
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError) as exc:
            log.warning("tts_plugins: sglang %s has no %s (%s); not hooking", ver, target, exc)
            return False
    for target, hook, kind in hooks:
        HookRegistry.register(target, hook, HookType(kind))
        log.info("tts_plugins: hooked %s (%s, sglang %s)", target, kind, ver)
    done.add(tag)
    return True
