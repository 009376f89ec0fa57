"""The client half: talk to either engine's OpenAI-compatible server and put ``tts_*`` keys where it reads them.

vLLM reads per-request extras from ``vllm_xargs`` (a flat dict); SGLang reads
``custom_params``. Both take the same flat ``tts_*`` keys::

    from openai import OpenAI
    from tts_plugins.client.server import extra_body

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(
        model=MODEL, messages=[...], max_tokens=512,
        extra_body=extra_body("vllm", tts_think_max=256),
    )

:class:`Server` is the asynchronous client the strategies (:mod:`tts_plugins.client.strategies`)
and the ``tts`` command use: one chat-completions call returns
:class:`Sample` objects with the answer extracted, the tokens spent, and, when
asked, each position's top log-probabilities with token ids (vLLM:
``return_tokens_as_token_ids``; SGLang: ``return_meta_info``). Log-probabilities
are reported as the model's raw ones in both engines: vLLM returns raw ones by
default, and SGLang's (taken after the request temperature) are multiplied
back by it.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tts_plugins.params import PREFIX
from tts_plugins.services import parse_report

FIELD = {"vllm": "vllm_xargs", "sglang": "custom_params"}


def extra_body(engine: str, /, **params: Any) -> dict[str, Any]:
    """The ``extra_body`` for an OpenAI client request to ``engine`` ("vllm" or "sglang")."""
    if engine not in FIELD:
        raise ValueError(f"engine must be one of {sorted(FIELD)}, got {engine!r}")
    bad = [k for k in params if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"parameter names must start with {PREFIX!r}, got {bad[0]!r}")
    return {FIELD[engine]: dict(params)} if params else {}


# --- answers ------------------------------------------------------------------

THINK_END = ("</think>", "</seed:think>", "\u25c1/think\u25b7", "<|end_of_thought|>", "</reasoning>")


def final_part(text: str) -> str:
    """The text after the last end-of-thinking string (all of it if there is none)."""
    cut = max((text.rfind(e) + len(e) for e in THINK_END if e in text), default=0)
    return text[cut:]


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip() or None
    return None


_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_auto(text: str) -> str | None:
    """The last ``\\boxed{...}``, else what follows the last ``Answer:``, in the part after thinking."""
    text = final_part(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    found = _ANSWER_LINE.findall(text)
    if found:
        answer = found[-1].strip().rstrip(".").strip()
        return answer or None
    return None


def extract_last_number(text: str) -> str | None:
    found = _NUMBER.findall(final_part(text))
    return found[-1] if found else None


def extract_full(text: str) -> str | None:
    return final_part(text).strip() or None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {"auto": extract_auto, "last-number": extract_last_number, "full": extract_full}


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """``module:function`` (client side only; nothing of it travels to the server)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{what} must be a built-in name or module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {what} {spec!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is not callable")
    return fn


def extractor(spec: str) -> Callable[[str], str | None]:
    return EXTRACTORS[spec] if spec in EXTRACTORS else load_callable(spec, "answer extractor")


# --- samples ------------------------------------------------------------------


@dataclass
class Sample:
    """One sampled completion."""

    text: str
    reasoning: str | None = None
    answer: str | None = None
    tokens: int = 0
    finish_reason: str | None = None
    temperature: float | None = None
    phase: str = "sample"
    reward: float | None = None
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = None  # the chosen token's raw log-prob per position
    top: list[dict[int, float]] | None = None  # each position's top ids -> raw log-probs
    reports: dict[str, Any] | None = None  # the engine techniques' reports on this sample (e.g. "conf": DeepConf's)

    def record(self) -> dict[str, Any]:
        """What the output JSONL keeps of a sample (log-probabilities are summarized, not stored)."""
        out: dict[str, Any] = {"answer": self.answer, "tokens": self.tokens, "finish_reason": self.finish_reason,
                               "temperature": self.temperature, "phase": self.phase, "text": self.text}
        if self.reasoning:
            out["reasoning"] = self.reasoning
        if self.reward is not None:
            out["reward"] = self.reward
        if self.token_logprobs:
            out["mean_logprob"] = sum(self.token_logprobs) / len(self.token_logprobs)
        if self.reports:
            out["reports"] = self.reports
        return out


TIMED_OUT = 408  # ServerError.status of a request that timed out
BAD_RESPONSE = 502  # ServerError.status of a response that is not what was asked for


class ServerError(RuntimeError):
    """The server could not be reached, or it refused a request (``status`` is the HTTP status, 0 if unreachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Server:
    """An OpenAI-compatible vLLM or SGLang server.

    ``engine`` is detected when None (SGLang answers ``/get_model_info``, vLLM
    does not); ``model`` is the first one ``/v1/models`` lists when None.
    ``concurrency`` bounds the requests in flight from this client.
    """

    base_url: str
    engine: str | None = None
    model: str | None = None
    concurrency: int = 8
    timeout: float = 600.0
    api_key: str = "none"
    answer: Callable[[str], str | None] = extract_auto
    # keep special tokens in the text (``skip_special_tokens: false``), so the end of thinking stays visible when
    # the server runs no reasoning parser and the tokenizer makes "</think>" a special token (``tts bench`` counts
    # thinking tokens by it); end-of-turn markers at the end of a choice are dropped
    keep_special_tokens: bool = False
    # send top_p, top_k and min_p explicitly on sampled requests (top_k -1 and min_p 0: no truncation), so neither
    # engine fills them from the model's generation_config.json (both do by default): what was asked is what runs
    explicit_sampling: bool = False
    _client: Any = field(default=None, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)
    requests_sent: int = 0
    cancelled: int = 0

    async def __aenter__(self) -> Server:
        import httpx

        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        # Idle connections are dropped before the servers' own keep-alive timeout (uvicorn: 5 s), so a request is
        # not sent on a connection the server is closing at that moment.
        self._client = httpx.AsyncClient(timeout=self.timeout, headers={"Authorization": f"Bearer {self.api_key}"},
                                         limits=httpx.Limits(keepalive_expiry=2.0))
        self._slots = asyncio.Semaphore(self.concurrency)
        try:
            if self.model is None:
                models = (await self._get("/v1/models")).json().get("data") or []
                if not models:
                    raise ServerError(f"{self.base_url}/v1/models lists no model")
                self.model = models[0]["id"]
            if self.engine is None:
                self.engine = await self._detect()
        except BaseException:
            await self._client.aclose()
            raise
        if self.engine not in FIELD:
            await self._client.aclose()
            raise ValueError(f"engine must be one of {sorted(FIELD)}, got {self.engine!r}")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.aclose()

    async def _get(self, path: str) -> Any:
        import httpx

        try:
            r = await self._client.get(self.base_url + path)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the server at {self.base_url} ({type(exc).__name__}: {exc}); is it running?") from None
        if r.status_code != 200:
            raise ServerError(f"{self.base_url}{path} answered HTTP {r.status_code}: {r.text[:300]}", r.status_code)
        return r

    async def _detect(self) -> str:
        try:
            await self._get("/get_model_info")
            return "sglang"
        except ServerError as exc:
            if exc.status == 0:
                raise
            return "vllm"

    def body(self, prompt: str, *, n: int, temperature: float, max_tokens: int, params: Mapping[str, Any] | None = None,
             logprobs: int | None = None, seed: int | None = None, top_p: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": n,
                                "temperature": temperature, "max_tokens": max_tokens}
        if self.explicit_sampling and temperature > 0:
            body.update(top_p=1.0 if top_p is None else top_p, top_k=-1, min_p=0.0)
        elif top_p is not None and top_p < 1:
            body["top_p"] = top_p
        if seed is not None:
            body["seed"] = seed
        if self.keep_special_tokens:
            body["skip_special_tokens"] = False
        if logprobs is not None:
            body.update(logprobs=True, top_logprobs=logprobs)
        if self.engine == "vllm":
            body["return_token_ids"] = True
            if logprobs is not None:
                body["return_tokens_as_token_ids"] = True
        else:
            body["return_meta_info"] = True
        if params:
            body.update(extra_body(self.engine, **params))
        return body

    async def sample(self, prompt: str, *, n: int = 1, temperature: float = 1.0, max_tokens: int = 256,
                     params: Mapping[str, Any] | None = None, logprobs: int | None = None, seed: int | None = None,
                     phase: str = "sample", temperatures: Sequence[float] | None = None, top_p: float | None = None) -> list[Sample]:
        """``n`` samples of one chat prompt (one request). ``temperatures``: each choice's temperature, for the record.

        Raises :class:`ServerError` when the server is unreachable or refuses the
        request (its message names the offending key). Cancelling the awaiting
        task closes the connection, and both engines then abort the request.
        """
        import httpx

        body = self.body(prompt, n=n, temperature=temperature, max_tokens=max_tokens, params=params, logprobs=logprobs, seed=seed, top_p=top_p)
        assert self._slots is not None, "use `async with Server(...)`"
        async with self._slots:
            self.requests_sent += 1
            try:
                try:
                    r = await self._client.post(self.base_url + "/v1/chat/completions", json=body)
                except (httpx.ReadError, httpx.RemoteProtocolError):
                    # a pooled connection closed under us (the server got no request, or lost the connection): once more
                    r = await self._client.post(self.base_url + "/v1/chat/completions", json=body)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            except httpx.TimeoutException:
                raise ServerError(f"the request timed out after {self.timeout:g} s", TIMED_OUT) from None
            except httpx.HTTPError as exc:
                raise ServerError(f"cannot reach the server at {self.base_url} ({type(exc).__name__}: {exc}); is it running?") from None
        if r.status_code != 200:
            raise ServerError(f"the server refused the request (HTTP {r.status_code}): {_error_text(r)}", r.status_code)
        data = r.json()
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != n:
            raise ServerError(f"asked for {n} samples, the server returned {len(choices)}", BAD_RESPONSE)
        out = []
        for c in choices:
            t = temperatures[c.get("index", 0) % len(temperatures)] if temperatures else temperature
            # SGLang's log-probs are taken after the temperature (greedy rows: before it)
            out.append(self._sample(c, phase, t, t if self.engine == "sglang" and t > 0 else 1.0))
        return out

    def _sample(self, choice: Mapping[str, Any], phase: str, temperature: float, scale: float) -> Sample:
        msg = choice.get("message") or {}
        text = msg.get("content") or ""
        if self.keep_special_tokens:
            text = _strip_end_markers(text)
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        ids, lps, top = None, None, None
        if self.engine == "vllm":
            ids = choice.get("token_ids")
            content = ((choice.get("logprobs") or {}).get("content")) or None
            if content is not None:
                lps = [float(e["logprob"]) for e in content]
                top = [{_vllm_id(t["token"]): float(t["logprob"]) for t in e.get("top_logprobs") or []} for e in content]
                ids = ids or [_vllm_id(e["token"]) for e in content]
        else:
            meta = choice.get("meta_info") or {}
            ids = choice.get("response_token_ids")
            if meta.get("output_token_logprobs"):
                lps = [float(e[0]) * scale for e in meta["output_token_logprobs"]]
                ids = ids or [int(e[1]) for e in meta["output_token_logprobs"]]
                top = [{int(t[1]): float(t[0]) * scale for t in step or []} for step in meta.get("output_top_logprobs") or []]
            tokens_meta = meta.get("completion_tokens")
        tokens = len(ids) if ids is not None else (lps and len(lps)) or 0
        if self.engine == "sglang" and not tokens:
            tokens = int(tokens_meta or 0)
        full = text if reasoning is None else f"{reasoning}</think>{text}"
        # the techniques' reports ride in the stop-reason field: vLLM's stop_reason, SGLang's matched_stop
        reports = parse_report(choice.get("stop_reason")) or parse_report(choice.get("matched_stop"))
        return Sample(text=text, reasoning=reasoning, answer=self.answer(full), tokens=int(tokens), finish_reason=choice.get("finish_reason"),
                      temperature=temperature, phase=phase, token_ids=list(ids) if ids is not None else None, token_logprobs=lps, top=top,
                      reports=reports)


_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end|>", "<|return|>")


def _strip_end_markers(text: str) -> str:
    while True:
        stripped = text.rstrip()
        for m in _END_MARKERS:
            if stripped.endswith(m):
                text = stripped[: -len(m)]
                break
        else:
            return text


def _vllm_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ServerError(f"expected a token id in the log-probs (return_tokens_as_token_ids), got {token!r}", BAD_RESPONSE)
    return int(token[len("token_id:"):])


def _error_text(r: Any) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:500]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:500]
    return str(err)[:500]
