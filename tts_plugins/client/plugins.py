"""``tts plugins [--json]``: what is installed in this environment, as the code declares it.

The techniques (in the order they run, with their request keys, types and defaults), the model patches (the
engine versions each was written for, and whether it is active here, with the reason when not), the verifiers,
the client's aggregators and rewards, and the environment variables. ``--json`` prints
:func:`tts_plugins.introspect.describe`. Run it where the engine is installed to see what a server started there
would accept.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tts_plugins import introspect


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("plugins", help="list the installed techniques, model patches and their request keys",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print everything as JSON (tts_plugins.introspect.describe)")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        info = introspect.describe()
    except Exception as exc:  # a broken plugin: say which, the way an engine would log it
        print(f"tts plugins: the registry could not be built: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    print(render(info), end="")
    return 0


def render(info: dict[str, Any]) -> str:
    """The plain listing of :func:`tts_plugins.introspect.describe`'s result."""
    out: list[str] = []
    if info.get("disabled"):
        out.append("TTS_PLUGINS_DISABLE is set: a server started with this environment ignores every tts_* key.\n")
    if info.get("left_out"):
        out.append("Left out (an engine started here logs these as errors and runs without them):")
        out.extend(f"  {why}" for why in info["left_out"])
        out.append("")
    out.append("Techniques (in the order they run; vLLM and SGLang):")
    for t in info["techniques"]:
        out.append(f"  {t['name']}  ({_source(t)})")
        extra = []
        if t["effort_key"]:
            extra.append(f"reasoning_effort sets {t['effort_key']}")
        if t["runs_before"]:
            extra.append("runs before " + ", ".join("every other technique" if n == "*" else n for n in t["runs_before"]))
        if t["runs_after"]:
            extra.append(f"runs after {', '.join(t['runs_after'])}")
        if extra:
            out.append(f"    {'; '.join(extra)}")
        out.extend(_keys(t["keys"]))
    out.append("")
    out.append("Model patches (per engine: the versions each was written for, and whether it is active here):")
    variants: dict[str, list[dict[str, Any]]] = {}
    for p in info["model_patches"]:
        variants.setdefault(p["name"], []).append(p)
    for name, ps in variants.items():
        out.append(f"  {name}  ({_source(ps[0])}){'' if ps[0]['keys'] else '  always on: no request key'}")
        for p in ps:
            state = "active" if p["active"] else f"inactive: {p['reason']}"
            out.append(f"    {p['engine']} {introspect.version_range(p)}: {state}")
        out.extend(_keys(ps[0]["keys"]))  # the engines' variants of a patch share its keys
    out.append("")
    for title, field in (("Verifiers", "verifiers"), ("Aggregators (client)", "aggregators"), ("Rewards (client)", "rewards")):
        names = [e["name"] if e["distribution"] == introspect.BUILTIN else f"{e['name']} ({_source(e)})" for e in info[field]]
        out.append(f"{title}: {', '.join(names) if names else '(none)'}")
    out.append("")
    out.append("Environment variables:")
    width = max((len(v["name"]) for v in info["environment"]), default=0)
    for v in info["environment"]:
        default = "" if v["default"] is None else f" (default {v['default']})"
        out.append(f"  {v['name']:<{width}}  {v['where']}{default}")
    return "\n".join(out) + "\n"


def _keys(keys: list[dict[str, Any]]) -> list[str]:
    width = max((len(k["name"]) for k in keys), default=0)
    lines = []
    for k in keys:
        forces = {"thinking": "; forces tokens while thinking", "answer": "; forces tokens in the answer"}.get(k["forces"] or "", "")
        lines.append(f"    {k['name']:<{width}}  {k['type'] or '(undeclared)'}, default {introspect.show_default(k['default'])}{forces}")
    return lines


def _source(entry: dict[str, Any]) -> str:
    dist = entry.get("distribution")
    return introspect.BUILTIN if dist == introspect.BUILTIN else dist or entry.get("module") or "?"
