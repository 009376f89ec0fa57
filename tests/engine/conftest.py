"""Engine fixtures: one real engine alive at a time, switched by model variant."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Server, VllmOffline  # noqa: E402

pytestmark = pytest.mark.engine


class EnginePool:
    """Starts the offline engine a test asks for, closing the one before (never two at once)."""

    def __init__(self, engine: str, tiny_model) -> None:
        self.engine, self.tiny_model = engine, tiny_model
        self.current = None
        self.key = None
        self.debug_prefix: str | None = None  # where the shared server writes its debug counters
        self.starts: list[tuple[str, float]] = []  # every engine start, in order (the suite's main cost)

    def offline(self, variant: str, overlap: bool = True, chunked_prefill: int | None = None, tensor_parallel: int = 1, **engine_args):
        """The offline engine on a tiny model; ``overlap`` is SGLang's overlap scheduler (vLLM on CPU has none).

        ``chunked_prefill``: a small prefill chunk (tokens), so long prompts prefill over several steps.
        ``tensor_parallel``: vLLM only, one CPU core per rank. ``engine_args``: passed to the engine as is.
        """
        key = ("offline", variant, overlap, chunked_prefill, tensor_parallel, tuple(sorted(engine_args.items())))
        if self.key != key:
            self.close()
            model = self.tiny_model(variant)
            if self.engine == "vllm":
                kwargs = {"reasoning_parser": "qwen3"} if variant == "dense" else {}
                kwargs.update(engine_args)
                if chunked_prefill:
                    kwargs.update(enable_chunked_prefill=True, max_num_batched_tokens=chunked_prefill)
                if tensor_parallel > 1:
                    kwargs.update(tensor_parallel_size=tensor_parallel, distributed_executor_backend="mp")
                    # one core per rank; read when the workers start, so restored right after
                    with _env(VLLM_CPU_OMP_THREADS_BIND="|".join(str(i) for i in range(tensor_parallel))):
                        self.current = VllmOffline(model, **kwargs)
                else:
                    self.current = VllmOffline(model, **kwargs)
            else:
                from sglang_harness import SglangOffline

                extra = {"chunked_prefill_size": chunked_prefill} if chunked_prefill else {}
                extra.update(engine_args)
                self.current = SglangOffline(model, overlap=overlap, **extra)
            self.key = key
            name = (f"offline-{variant}{'' if overlap else '-no-overlap'}{f'-chunk{chunked_prefill}' if chunked_prefill else ''}"
                    f"{f'-tp{tensor_parallel}' if tensor_parallel > 1 else ''}{'-' + '-'.join(engine_args) if engine_args else ''}")
            self.starts.append((name, self.current.start_seconds))
        return self.current

    def server(self, variant: str, args=(), env=None):
        key = ("server", variant, tuple(args), tuple(sorted((env or {}).items())))
        if self.key != key:
            self.close()
            if self.engine == "sglang":
                from sglang_harness import sglang_env

                base = sglang_env()
                extra = dict(env or {})
                if "PYTHONPATH" in extra:  # keep the stand-ins on the path too
                    extra["PYTHONPATH"] = f"{extra['PYTHONPATH']}{os.pathsep}{base['PYTHONPATH']}"
                env = {**base, **extra}
                args = ("--mem-fraction-static", "0.5", "--max-running-requests", "16", *args)
            self.current = Server(self.engine, self.tiny_model(variant), args=args, env=env)
            self.key = key
            self.starts.append((f"server-{variant}", self.current.start_seconds))
        return self.current

    def deployed(self):
        """The trained reasoner's server as a serving team runs it, with a reasoning parser and a tool parser
        (the deploy and bench tests share it: one engine start)."""
        args = {"vllm": ("--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"),
                "sglang": ("--reasoning-parser", "qwen3", "--tool-call-parser", "qwen25")}[self.engine]
        return self.server("reasoning", args=args)

    def shared_server(self, variant: str):
        """The one HTTP server per model that the HTTP tests share (an engine start is the suite's main cost).

        Configured for all of them at once: on the dense model, vLLM also names the processor on the command line
        (it must run once although installed too) and returns processed log-probs (the client's checks); both
        engines load the deliberately faulty third-party plugin (the reliability tests), and every server writes
        its debug counters under ``self.debug_prefix``, fresh for each start.
        """
        from reliability import server_env

        args: tuple[str, ...] = ()
        if variant == "dense" and self.engine == "vllm":
            args = ("--logits-processors", "tts_plugins.adapters.vllm:TTSLogitsProcessor", "--logprobs-mode", "processed_logprobs")
        key = ("server", variant, args, "shared")
        if self.key != key:
            prefix = os.path.join(tempfile.mkdtemp(prefix="tts-debug-"), "counts")
            env = server_env(prefix) if variant == "dense" else {"TTS_PLUGINS_DEBUG_FILE": prefix}
            self.server(variant, args=args, env=env)
            self.key, self.debug_prefix = key, prefix
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current, self.key = None, None
            time.sleep(1)


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_generate_tests(metafunc):
    """SGLang runs the offline cases with its overlap scheduler on and off; vLLM on CPU has one mode."""
    if "overlap" in metafunc.fixturenames:
        engine = metafunc.config.getoption("--engine") or ("vllm" if _has("vllm") else "sglang")
        modes = [True, False] if engine == "sglang" else [True]
        # the multi-token end string is matched on the host, the same with either scheduler: its tests run with the
        # overlap scheduler only (one engine start less; the dense model's tests cover both schedulers)
        # likewise the wobbly model's group tests: group stop under both schedulers is the dense model's tests' job
        if any(f'engines.offline("{m}"' in inspect.getsource(metafunc.function) for m in ("multi", "wobbly")):
            modes = [True]
        metafunc.parametrize("overlap", modes, ids=lambda v: "overlap" if v else "no-overlap", scope="session")


_ENGINE_CALL = re.compile(r"engines\.(offline|server|shared_server|deployed)\((.*?)\)\s*(#.*)?$", re.M)


def _engine_key(item) -> str:
    """The engine configuration a test asks the pool for, read from its source and its fixtures' (the first
    ``engines.offline(...)``/``engines.server(...)`` call), normalised; "~" (last) for tests that start their own."""
    sources = [getattr(item, "function", None)]
    for name in getattr(item, "fixturenames", ()):
        defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
        sources += [d.func for d in defs if d.func.__module__ == item.module.__name__]
    for fn in sources:
        if fn is None:
            continue
        with contextlib.suppress(OSError, TypeError):
            m = _ENGINE_CALL.search(inspect.getsource(fn))
            if m:
                args = re.sub(r"\s+", "", m.group(2))
                # a parametrized argument (chunked_prefill=chunked) is its value in this test
                for name, value in getattr(getattr(item, "callspec", None), "params", {}).items():
                    args = re.sub(rf"\b{name}\b", repr(value), args)
                return m.group(1) + ":" + re.sub(r",\w+=None\b", "", args)  # a None keyword is the default
    return "~"


def pytest_collection_modifyitems(config, items):
    """Run the engine tests grouped by the engine they need, so each configuration starts once per session.

    Engine start is most of the suite's time (10 to 30 s each); file order would restart the same
    configurations many times. Stable: tests keep their order within a configuration."""
    def key(pair):
        i, item = pair
        if item.get_closest_marker("engine") is None:
            return (0, "", "", i)
        overlap = getattr(getattr(item, "callspec", None), "params", {}).get("overlap", True)
        return (1, str(not overlap), _engine_key(item), i)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def _has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def engines(engine_name):
    from models import tiny_model

    pool = EnginePool(engine_name, tiny_model)
    yield pool
    pool.close()
    STARTS[engine_name] = pool.starts


STARTS: dict[str, list[tuple[str, float]]] = {}  # engine -> its starts this session, for the summary


def pytest_terminal_summary(terminalreporter):
    """How many times each engine started, and what that cost (the suite's main cost: keep it small)."""
    for engine, starts in STARTS.items():
        total = sum(s for _, s in starts)
        terminalreporter.write_line(f"[{engine}] {len(starts)} engine starts, {total:.0f}s: " + ", ".join(f"{k}={v:.1f}" for k, v in starts))
