"""Live-state counters an operator (or a test) can read from outside the engine.

Every adapter registers a function returning its per-request state counts
(slots, watched token lists, group members and groups, Mixture-of-Inputs
stashes, technique failures). With ``TTS_PLUGINS_DEBUG_FILE=/path/prefix`` in
the server's environment, each engine process writes the merged counts as JSON
to ``/path/prefix.<pid>`` whenever they change at a batch update, an
admission or a release. Unset (the default), :func:`publish` is one boolean
check. After the last request has left, every count except ``*.failures`` is
zero (vLLM applies a finished request's removal at its next step, so read the
counts after one more request).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable

from tts_plugins import envvars

PATH = envvars.get("TTS_PLUGINS_DEBUG_FILE") or None

_sources: list[tuple[str, Callable[[], object]]] = []
_last: str | None = None


def register(name: str, owner: object, method: str = "debug_counts") -> None:
    """Count ``getattr(owner, method)()`` under ``name`` (held weakly: a dead owner drops out)."""
    if PATH:
        _sources.append((name, _bound(weakref.ref(owner), method)))


def _bound(ref: weakref.ref, method: str) -> Callable[[], object]:
    def counts() -> object:
        owner = ref()
        return None if owner is None else getattr(owner, method)()

    return counts


def snapshot() -> dict[str, int]:
    merged: dict[str, int] = {}
    for _, fn in _sources:
        counts = fn()
        for key, value in (counts or {}).items():
            merged[key] = merged.get(key, 0) + int(value)
    return merged


def publish() -> None:
    """Write the counts if they changed (no-op unless ``TTS_PLUGINS_DEBUG_FILE`` is set)."""
    global _last
    if not PATH:
        return
    text = json.dumps(snapshot(), sort_keys=True)
    if text == _last:
        return
    _last = text
    target = f"{PATH}.{os.getpid()}"
    tmp = f"{target}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, target)


def read(prefix: str) -> dict[str, int]:
    """Sum the counts every engine process wrote under ``prefix`` (for tests and operators)."""
    import glob

    total: dict[str, int] = {}
    for path in glob.glob(f"{glob.escape(prefix)}.*"):
        if path.endswith(".tmp"):
            continue
        with open(path) as f:
            for key, value in json.load(f).items():
                total[key] = total.get(key, 0) + int(value)
    return total
