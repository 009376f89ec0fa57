"""What ``tts run`` and ``tts bench`` share: the server's address, JSONL input, resumable output, running problems
together, and the guard that turns bad input, a refusing server and an interruption into an exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tts_plugins import envvars
from tts_plugins.client.server import ServerError

# the address used when neither --base-url nor $TTS_SERVER_URL is given, as envvars declares it
DEFAULT_URL = next(v.default for v in envvars.VARIABLES if v.name == "TTS_SERVER_URL")


class InputError(ValueError):
    pass


def server_url(given: str | None = None) -> str:
    """``--base-url`` when given, else ``$TTS_SERVER_URL``, else :data:`DEFAULT_URL`."""
    return given or envvars.get("TTS_SERVER_URL") or DEFAULT_URL


def add_base_url(p: argparse.ArgumentParser) -> None:
    """``--base-url`` (the OpenAI client's name; ``--url`` is an alias), the same in every client command."""
    p.add_argument("--base-url", "--url", dest="base_url", default=None, metavar="URL",
                   help=f"server base URL (default $TTS_SERVER_URL, else {DEFAULT_URL})")


def iter_jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, line, value)`` for each non-blank line; unreadable files and bad JSON are :class:`InputError`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield no, line, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{no}: not JSON ({exc.msg})") from None


def finished_results(path: Path) -> Iterator[dict[str, Any]]:
    """The results in an output file so far: lines with an error, or cut short by an interruption, do not count."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "id" in r and "error" not in r:
            yield r


def finished_ids(path: Path) -> set[str]:
    """Ids with a result in the output file."""
    return {str(r["id"]) for r in finished_results(path)}


async def gather_all(coros: Iterable[Awaitable[Any]]) -> None:
    """Run ``coros`` concurrently; if one fails (or this is cancelled), cancel the rest and wait for them to end."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_guarded(prog: str, where: Path, coro: Callable[[], Awaitable[Any]]) -> tuple[Any, int | None]:
    """Run ``coro()``; bad input, an unreachable or refusing server and an interruption are reported on stderr
    (with where the finished results are) and give the exit status: ``(result, None)`` or ``(None, status)``."""
    try:
        return asyncio.run(coro()), None
    except ValueError as exc:  # InputError included
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None, 2
    except ServerError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        print(f"{prog}: results finished so far are in {where}; run the same command again to resume", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; results finished so far are in {where}; run the same command again to resume", file=sys.stderr)
        return None, 130


__all__ = ["DEFAULT_URL", "InputError", "add_base_url", "finished_ids", "finished_results", "gather_all", "iter_jsonl", "run_guarded", "server_url"]
