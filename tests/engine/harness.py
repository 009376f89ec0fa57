"""Real engines for the tests: offline engines and OpenAI-compatible servers on 127.0.0.1.

One engine runs at a time (fixtures are module-scoped and close their engine).
Every engine speaks the same small interface, so the engine suite is written
once and parametrized over engines.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

STARTUP_TIMEOUT = 240


@dataclass
class Output:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[float] | None = None  # of each generated token, when asked for (``logprobs=True``)
    stop_reason: Any = None  # vLLM's stop_reason, SGLang's finish_reason["matched"] (technique reports ride here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmOffline:
    """``vllm.LLM`` on the CPU, float32, eager."""

    engine = "vllm"

    def __init__(self, model: Path, **kwargs: Any) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**{"model": str(model), "dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 16, "seed": 0,
                          **kwargs})
        self.start_seconds = time.perf_counter() - t0
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str | list[int]], params: Sequence[dict], *, max_tokens: int = 32, **sampling: Any) -> list[Output]:
        from vllm import SamplingParams

        n = sampling.get("n", 1)
        sps = [
            SamplingParams(n=n, temperature=p.get("_temperature", sampling.get("temperature", 0.0)), max_tokens=max_tokens,
                           extra_args={k: v for k, v in p.items() if k not in ("_temperature", "_seed")} or None, skip_special_tokens=False,
                           seed=p.get("_seed", sampling.get("seed")), logprobs=0 if sampling.get("logprobs") else None, **sampling.get("extra", {}))
            for p in params
        ]
        inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
        outs = self.llm.generate(inputs, sps, use_tqdm=False)

        def logprobs(c):
            if not sampling.get("logprobs"):
                return None
            return [float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids)]

        return [Output(list(c.token_ids), c.text, c.finish_reason, logprobs(c), c.stop_reason) for o in outs for c in o.outputs]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        import gc

        gc.collect()


# SGLang sizes its KV pool from --mem-fraction-static of the host's memory: gigabytes of float32 pages on a CPU,
# written at start-up (about half of each start). The tiny models' tests need a few thousand tokens at once.
SGLANG_KV_TOKENS = 131072


class Server:
    """An engine's OpenAI-compatible HTTP server in a subprocess, on 127.0.0.1."""

    def __init__(self, engine: str, model: Path, python: str = sys.executable, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.model = str(model)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix=f"tts-{engine}-server-", suffix=".log")[1])
        if engine == "vllm":
            cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--dtype", "float32", "--enforce-eager",
                   "--max-model-len", "1024", "--max-num-seqs", "16", "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0", *args]
            full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        else:
            cmd = [python, "-m", "sglang.launch_server", "--model-path", self.model, "--device", "cpu", "--attention-backend", "torch_native",
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--random-seed", "0",
                   "--max-total-tokens", str(SGLANG_KV_TOKENS), *args]
            full_env = {**os.environ, **(env or {})}
        t0 = time.perf_counter()
        self._log = open(self.log_path, "w")
        # cwd outside the checkout, so the installed package (not the source folder) is imported
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=tempfile.gettempdir(), start_new_session=True)
        self._wait()
        self.start_seconds = time.perf_counter() - t0

    def _wait(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"{self.engine} server did not start in {STARTUP_TIMEOUT}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=120)

    def close(self) -> None:
        import signal

        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running(factory, *args: Any, **kwargs: Any) -> Iterator[Any]:
    engine = factory(*args, **kwargs)
    try:
        yield engine
    finally:
        engine.close()
