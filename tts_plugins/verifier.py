"""An answer verifier for thought trimming that asks any OpenAI-compatible chat endpoint.

Registered as ``openai`` when ``TTS_PLUGINS_VERIFIER_URL`` (the server's base
URL, e.g. ``http://127.0.0.1:8001/v1``) is set for the engine; the model is
``TTS_PLUGINS_VERIFIER_MODEL`` (default: the server's first model). TrimR uses
a 7B judge the same way: it sees two answers and says whether they agree.
Requests run on a small thread pool; ``submit`` never blocks.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

from tts_plugins import envvars
from tts_plugins.hookspecs import hookimpl

PROMPT = (
    "Two attempts at the same problem reached these final answers.\n"
    "First: {a}\nSecond: {b}\n"
    "Are the two answers mathematically equivalent? Reply with one word: yes or no."
)


class OpenAIVerifier:
    def __init__(self, base_url: str, model: str | None = None, timeout: float = 30.0, workers: int = 4) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tts-verifier")

    def submit(self, previous_answer: str, answer: str, thought: str) -> Future:
        return self.pool.submit(self._ask, previous_answer, answer)

    def _post(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (operator-configured URL)
            return json.loads(resp.read())

    def _ask(self, a: str, b: str) -> bool:
        model = self.model or self._post("/models")["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(a=a, b=b)}], "max_tokens": 4, "temperature": 0}
        reply = self._post("/chat/completions", body)["choices"][0]["message"]["content"] or ""
        return reply.strip().lower().startswith("yes")


def _factory() -> OpenAIVerifier | None:
    url = envvars.get("TTS_PLUGINS_VERIFIER_URL")
    return OpenAIVerifier(url, envvars.get("TTS_PLUGINS_VERIFIER_MODEL")) if url else None


@hookimpl
def tts_register_verifiers(register) -> None:
    if envvars.get("TTS_PLUGINS_VERIFIER_URL"):
        register("openai", _factory)
