"""``tts serve``: every client strategy behind one OpenAI-compatible endpoint, with the engines' early stops.

    tts serve --upstream http://127.0.0.1:8000 [--upstream http://127.0.0.1:8001 ...] [--host 127.0.0.1] [--port 8100]

Serves ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health`` and ``/metrics``. A call names a
strategy in its model, ``model="Qwen/Qwen3-8B@majority:n=8"``, or in a top-level body key,
``extra_body={"tts_strategy": "majority:n=8"}``. The SPEC after ``@`` is ``tts bench --method``'s grammar, parsed by
the same registry (:func:`tts_plugins.client.methods.parse_method`) and run by the same code (each method's
:meth:`~tts_plugins.client.methods.BenchMethod.run`, :mod:`~tts_plugins.client.strategies`,
:mod:`~tts_plugins.client.aggregate`): one implementation for ``tts run``, ``tts bench`` and the gateway.

A plain model name is passed through untouched: the body (``tts_*`` keys included), streaming (byte for byte), the
headers and the status code. A body that is not a JSON object is refused by the gateway itself (400).

No code travels over the wire: a SPEC setting that names code (``reward=module:function``) is refused unless the
operator allowed that very value with ``--allow-reward``. Rewards, votes and CarBoN's fit run on worker threads, so
a slow reward delays its own call and nothing else.

A strategy call is answered with one choice: the selected sample's ``content`` and ``reasoning_content`` as the
upstream returned them (a sample of the winning answer: the highest reward, else the shortest finished one),
``usage`` summed over every upstream request the strategy made, and a ``tts`` object (strategy, voted answer,
votes, and per sample its tokens, finish reason and whether the engine stopped it). With ``stream=true`` the
gateway sends SSE comments (``: 5/8 samples``) as keep-alive and progress while it samples, then the selected
sample as chunks, a last chunk with ``usage`` and ``tts``, and ``data: [DONE]``.

Every sample of one call goes to one upstream, so the engine's group stop and DeepConf stop see each other. Calls
go to the healthy upstream with the least outstanding work; a background check takes failing upstreams out of
rotation and puts them back. A call whose upstream fails before any sample finished is retried once on another
upstream (the first attempt's requests are cancelled first, so nothing is answered twice). A client that
disconnects cancels its call: every upstream request of it is closed, and the engines abort them.

Starlette, uvicorn and httpx (the ``[serve]`` extra) are imported only when the gateway runs: ``tts run`` and
``tts bench`` do not need them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tts_plugins.client import aggregate
from tts_plugins.client.methods import BenchMethod, MethodSpec, RunContext, default_methods, parse_method
from tts_plugins.client.server import FIELD, THINK_END, Sample, Server, ServerError, extractor, final_part, load_callable
from tts_plugins.client.strategies import sample_seed

log = logging.getLogger("tts_plugins.serve")

# Ready aliases ``/v1/models`` lists for each upstream model: one per strategy family whose stop runs in the engine.
ALIASES = ("majority:n=8", "short-m:m=1,k=8", "deepconf:32,variant=high")
# The body keys a strategy decides for itself: never forwarded as the client sent them.
STRATEGY_KEYS = ("model", "n", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "seed",
                 "logprobs", "top_logprobs", "tts_strategy")
# Of those, the sampling keys the strategy sets on every request: a client's value would be overridden, so it is
# refused (400) rather than dropped; the SPEC takes the ones its method exposes (majority:n=8,temperature=0.5).
SET_BY_STRATEGY = ("temperature", "top_p", "top_k", "min_p", "logprobs", "top_logprobs")
# Hop-by-hop headers and those the HTTP layers set themselves: never copied from one side to the other.
_HOP = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
                  "date", "server"})
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PASS_THROUGH = "none"  # the strategy label of pass-through calls in /metrics
CLIENT_CLOSED = 499  # the status /metrics counts for a call whose client left before its answer ended (nginx's)
PROBLEM_ID = "serve"  # the problem id the strategies seed from: a call's samples depend on its seed alone


@dataclass
class Config:
    """The gateway's settings (``tts serve``'s flags)."""

    upstreams: Sequence[str]
    host: str = "127.0.0.1"
    port: int = 8100
    max_samples: int = 64  # per call: a SPEC asking for more is refused (400), and so is a strategy that draws more
    max_concurrency: int = 64  # calls in flight
    max_queue: int | None = None  # calls waiting for a slot; beyond it 429 (None: max_concurrency)
    api_key: str | None = None  # protects /v1/*; the key is this gateway's, never forwarded upstream
    upstream_api_key: str | None = None  # sent upstream as Authorization: Bearer KEY (else the client's, without api_key)
    allow_rewards: Sequence[str] = ()  # module:function values a client's SPEC may name (reward=...); nothing else is imported
    timeout: float = 600.0  # seconds per upstream request (between bytes, when streaming)
    health_interval: float = 5.0
    max_n: int = 16  # samples per upstream request
    max_tokens: int = 4096  # per sample, when neither the call nor the SPEC sets max_tokens
    extract: str = "auto"  # the answer extractor the votes use (tts run's --extract)
    keepalive: float = 5.0  # seconds between SSE comments while a streamed strategy call samples
    aliases: Sequence[str] = ALIASES

    def check(self) -> None:
        if not self.upstreams:
            raise ValueError("give at least one --upstream URL")
        for url in self.upstreams:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--upstream must be an http:// or https:// URL, got {url!r}")
        for name in ("max_samples", "max_concurrency", "max_n", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue!r}")
        for name in ("timeout", "health_interval", "keepalive"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number > 0, got {value!r}")
        extractor(self.extract)  # a bad extractor fails at start, not on the first call
        for spec in self.allow_rewards:
            if not _names_code(spec):
                raise ValueError(f"--allow-reward must be module:function, got {spec!r}")
            load_callable(spec, "--allow-reward")
        for spec in self.aliases:
            parse_method(spec)


def _names_code(value: Any) -> bool:
    """Whether a string is what :func:`~tts_plugins.client.server.load_callable` would import: ``module:function``."""
    if not isinstance(value, str):
        return False
    module, colon, attr = value.strip().partition(":")
    return bool(colon and module.strip() and attr.strip())


def _code_refs(value: Any) -> Iterator[str]:
    """Every ``module:function`` string in a setting's value, nested ones included."""
    if isinstance(value, str):
        if _names_code(value):
            yield value.strip()
    elif isinstance(value, Mapping):
        for v in [*value.keys(), *value.values()]:
            yield from _code_refs(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _code_refs(v)


def _show(value: Any, limit: int = 120) -> str:
    """A client's value in a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def base_url(url: str) -> str:
    """An upstream's root: without a trailing ``/`` or ``/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# --- errors -----------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """A call refused or failed: its HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None,
                 body: bytes | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.raw = body  # an upstream's own error body, forwarded as it came

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.error()).encode()

    def error(self) -> dict[str, Any]:
        """The OpenAI-style error object: an upstream's own when it sent one, else ours."""
        if self.raw is not None:
            try:
                data = json.loads(self.raw)
            except (ValueError, RecursionError):
                data = None
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                return data
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def event(self) -> bytes:
        """The error as a stream's last SSE event, on one line, then ``[DONE]``: what a call whose 200 already went
        out can still say."""
        return b"data: " + json.dumps(self.error()).encode() + b"\n\ndata: [DONE]\n\n"


class UpstreamError(ServerError):
    """An upstream request failed: unreachable (``status`` 0), timed out (504), or answered ``status``. ``unsent``:
    no connection could be opened, so the upstream never saw the request."""

    def __init__(self, upstream: Upstream, message: str, status: int, body: bytes | None = None, *, unsent: bool = False) -> None:
        super().__init__(message, status)
        self.upstream, self.body, self.unsent = upstream, body, unsent

    @property
    def retryable(self) -> bool:
        """The upstream, not the request, is at fault: another upstream may answer."""
        return self.status == 0 or self.status >= 500

    def http(self) -> HTTPError:
        if self.status == 0:
            return HTTPError(502, str(self), kind="upstream_error", code="upstream_unreachable")
        if self.status == 504:
            return HTTPError(504, str(self), kind="upstream_error", code="upstream_timeout")
        if self.status >= 500:
            return HTTPError(502, str(self), kind="upstream_error", code="upstream_error")
        return HTTPError(self.status, str(self), kind="upstream_error", body=self.body)


# --- upstreams --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Upstream:
    """One OpenAI-compatible server (an engine, a data-parallel server or a router) and what the gateway knows of it."""

    url: str
    index: int
    client: Any = None  # httpx.AsyncClient
    healthy: bool = True  # until the first check says otherwise
    engine: str | None = None  # "vllm" or "sglang" (SGLang answers /get_model_info); None until reached
    models: list[dict[str, Any]] = field(default_factory=list)
    outstanding: int = 0  # samples in flight
    calls: int = 0  # calls sent here
    last_error: str | None = None

    @property
    def model_ids(self) -> list[str]:
        return [str(m.get("id")) for m in self.models if m.get("id") is not None]

    def down(self, why: str) -> None:
        if self.healthy:
            log.warning("upstream %s out of rotation: %s", self.url, why)
        self.healthy, self.last_error = False, why

    def up(self) -> None:
        if not self.healthy:
            log.warning("upstream %s back in rotation", self.url)
        self.healthy, self.last_error = True, None


def engine_stopped(s: Sample, grouped: bool) -> bool:
    """Whether the engine stopped a sample: a technique's report says so (DeepConf's ``conf.stopped``), or it was
    in an in-engine group (``tts_group``) and ended (finish reason ``stop``) without finishing its thinking, as
    ``tts bench`` recognises a group-stopped member (the group stop sends no report of its own)."""
    if any(isinstance(r, Mapping) and r.get("stopped") for r in (s.reports or {}).values()):
        return True
    if not grouped or s.finish_reason != "stop" or s.answer is not None:
        return False
    if s.reasoning is not None:
        return not s.text.strip()
    return final_part(s.text) == s.text and not any(e in s.text for e in THINK_END)


@dataclass
class Drawn:
    """A sample as the gateway keeps it: the strategy's :class:`Sample` and the upstream's choice as it came."""

    sample: Sample
    choice: Mapping[str, Any]
    grouped: bool

    @property
    def stopped(self) -> bool:
        return engine_stopped(self.sample, self.grouped)


@dataclass(eq=False)
class Call:
    """One attempt of a strategy call on one upstream: what it drew, its requests in flight, its progress."""

    upstream: Upstream
    expected: int  # the samples the SPEC asks for (progress' denominator)
    cap: int  # --max-samples
    asked: int = 0
    drawn: list[Drawn] = field(default_factory=list)
    usage: Counter = field(default_factory=Counter)
    requests: int = 0
    tasks: set = field(default_factory=set)
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def reserve(self, n: int) -> None:
        if self.asked + n > self.cap:
            raise HTTPError(400, f"the strategy asked for more than --max-samples={self.cap} samples ({self.asked} drawn, {n} more asked)",
                            param="model", code="max_samples")
        self.asked += n

    async def cancel(self) -> None:
        """Cancel the call's upstream requests still in flight: each closes its connection, and the engine aborts it."""
        me = asyncio.current_task()
        pending = [t for t in self.tasks if t is not me and not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class CallServer(Server):
    """The strategies' :class:`Server` for one call: its requests carry the client's body (messages or prompt and
    every key a strategy does not decide), go to the call's upstream, and are recorded in the :class:`Call`."""

    def __init__(self, upstream: Upstream, call: Call, *, model: str, path: str, template: Mapping[str, Any], headers: Mapping[str, str],
                 timeout: float, answer: Callable[[str], str | None], offload: Callable[..., Any]) -> None:
        # explicit sampling, as tts bench sends it: the SPEC's top_p with no top_k or min_p, not the model's generation_config
        super().__init__(upstream.url, engine=upstream.engine or "vllm", model=model, timeout=timeout, answer=answer, explicit_sampling=True)
        self._client = upstream.client
        self.upstream, self.call, self.path, self.template, self.headers = upstream, call, path, template, dict(headers)
        self.offload = offload  # the strategies run their rewards, votes and fits through it (strategies._offload)

    def body(self, prompt: str, **kw: Any) -> dict[str, Any]:
        body = super().body(prompt, **kw)
        body.pop("messages", None)
        out = {**self.template, **body}
        key = FIELD[self.engine or "vllm"]
        if isinstance(self.template.get(key), Mapping) or key in body:
            out[key] = {**(self.template.get(key) or {}), **(body.get(key) or {})}
        return out

    async def sample(self, prompt: str, *, n: int = 1, temperature: float = 1.0, max_tokens: int = 256, params: Mapping[str, Any] | None = None,
                     logprobs: int | None = None, seed: int | None = None, phase: str = "sample", temperatures: Sequence[float] | None = None,
                     top_p: float | None = None) -> list[Sample]:
        """``n`` samples in one upstream request (see :meth:`Server.sample`); the call's failures are
        :class:`UpstreamError`, naming the upstream."""
        call, u = self.call, self.upstream
        call.reserve(n)
        body = self.body(prompt, n=n, temperature=temperature, max_tokens=max_tokens, params=params, logprobs=logprobs, seed=seed, top_p=top_p)
        task = asyncio.current_task()
        call.tasks.add(task)
        call.requests += 1
        u.outstanding += n
        try:
            r = await post(u, lambda: self._client.post(u.url + self.path, json=body, headers=self.headers), self.timeout)
        finally:
            u.outstanding -= n
            call.tasks.discard(task)
        if r.status_code != 200:
            raise UpstreamError(u, f"upstream {u.url} answered HTTP {r.status_code}: {r.text[:300]}", r.status_code, r.content)
        # parsing n choices (and the extractor on each) is the operator's code and may be slow: off the event loop
        data, parsed = await self.offload(self._parse, r, n, temperature, phase, temperatures)
        grouped = "tts_group" in (params or {})
        for s, c in parsed:
            call.drawn.append(Drawn(s, c, grouped))
        for k, v in (data.get("usage") or {}).items():
            if isinstance(v, int) and not isinstance(v, bool):
                call.usage[k] += v
        call.progress.set()
        return [s for s, _ in parsed]

    def _parse(self, r: Any, n: int, temperature: float, phase: str,
               temperatures: Sequence[float] | None) -> tuple[dict[str, Any], list[tuple[Sample, Mapping[str, Any]]]]:
        u = self.upstream
        try:
            data = r.json()
            choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        except (ValueError, AttributeError, TypeError, RecursionError):
            raise UpstreamError(u, f"upstream {u.url} answered with no completion: {r.text[:300]}", 502) from None
        if len(choices) != n:
            raise UpstreamError(u, f"upstream {u.url}: asked for {n} samples, it returned {len(choices)}", 502)
        out = []
        for c in choices:
            t = temperatures[c.get("index", 0) % len(temperatures)] if temperatures else temperature
            # the completions API's choice carries text where the chat API's carries a message
            parsed = c if "message" in c else {**c, "message": {"content": c.get("text") or ""}}
            out.append((self._sample(parsed, phase, t, t if self.engine == "sglang" and t > 0 else 1.0), c))
        return data, out


async def post(u: Upstream, send: Callable[[], Any], timeout: float) -> Any:
    """``send()`` to upstream ``u``, its failures as :class:`UpstreamError` naming it. A read error or a broken
    response on a pooled keep-alive connection (the upstream closed it as we sent) is sent once more, as
    :meth:`Server.sample` does; only a second failure, or a connection that cannot be opened, takes the upstream out
    of rotation (``status`` 0: another upstream may answer). A read timeout is a 504 and leaves it in rotation."""
    import httpx

    try:
        try:
            return await send()
        except (httpx.ReadError, httpx.RemoteProtocolError):
            return await send()
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # ConnectTimeout is a TimeoutException: first
        u.down(f"{type(exc).__name__}: {exc}")
        raise UpstreamError(u, f"upstream {u.url} is unreachable ({type(exc).__name__}: {exc})", 0, unsent=True) from None
    except httpx.TimeoutException:
        raise UpstreamError(u, f"upstream {u.url} timed out after {timeout:g} s", 504) from None
    except httpx.HTTPError as exc:
        u.down(f"{type(exc).__name__}: {exc}")
        raise UpstreamError(u, f"upstream {u.url} failed ({type(exc).__name__}: {exc})", 0) from None


# --- limits -----------------------------------------------------------------------------------------------


class Gate:
    """At most ``limit`` calls in flight and ``queue`` waiting; a call beyond both is refused at once."""

    def __init__(self, limit: int, queue: int) -> None:
        self.limit, self.queue = limit, queue
        self.running = self.waiting = 0
        self._free = asyncio.Semaphore(limit)

    def full(self) -> bool:
        return self.running + self.waiting >= self.limit + self.queue

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.full():
            raise HTTPError(429, f"the gateway is busy: {self.running} calls in flight (--max-concurrency {self.limit}) and {self.waiting} "
                                 f"waiting (--max-queue {self.queue}); retry later", kind="rate_limit_error", code="busy")
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._free.release()


# --- metrics ----------------------------------------------------------------------------------------------


class Metrics:
    """Counters in Prometheus' text format: calls, samples, tokens, stopped samples and latency by strategy (the
    method's name; ``none`` for pass-through), retries, refusals, and each upstream's health and outstanding work."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()  # (strategy, status code)
        self.samples: Counter = Counter()  # strategy
        self.tokens: Counter = Counter()  # (strategy, prompt | completion)
        self.stopped: Counter = Counter()  # strategy
        self.retries = 0
        self.latency: dict[str, list[float]] = {}  # strategy -> bucket counts, then sum and count

    def call(self, strategy: str, status: int, seconds: float) -> None:
        self.calls[(strategy, status)] += 1
        h = self.latency.setdefault(strategy, [0.0] * (len(_LATENCY_BUCKETS) + 2))
        for i, bound in enumerate(_LATENCY_BUCKETS):
            h[i] += seconds <= bound
        h[-2] += seconds
        h[-1] += 1

    def render(self, upstreams: Sequence[Upstream], gate: Gate) -> str:
        def esc(v: Any) -> str:
            return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        lines: list[str] = []

        def metric(name: str, kind: str, text: str, rows: Sequence[tuple[dict[str, Any], float]]) -> None:
            lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
            for labels, value in rows:
                tags = ",".join(f'{k}="{esc(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{tags}}} {value:g}" if tags else f"{name} {value:g}")

        metric("tts_serve_calls_total", "counter", "Calls answered, by strategy and HTTP status (499: the client left first).",
               [({"strategy": s, "code": c}, v) for (s, c), v in sorted(self.calls.items())])
        metric("tts_serve_samples_total", "counter", "Samples strategies drew.", [({"strategy": s}, v) for s, v in sorted(self.samples.items())])
        metric("tts_serve_tokens_total", "counter", "Tokens of strategy calls' upstream requests (usage).",
               [({"strategy": s, "kind": k}, v) for (s, k), v in sorted(self.tokens.items())])
        metric("tts_serve_stopped_samples_total", "counter", "Samples the engine stopped (group stop, DeepConf).",
               [({"strategy": s}, v) for s, v in sorted(self.stopped.items())])
        metric("tts_serve_retries_total", "counter", "Calls retried on another upstream.", [({}, self.retries)])
        lines.extend(["# HELP tts_serve_call_seconds Call latency, from arrival to the answer (the stream's end).",
                      "# TYPE tts_serve_call_seconds histogram"])
        for s, h in sorted(self.latency.items()):
            for bound, count in zip(_LATENCY_BUCKETS, h):
                lines.append(f'tts_serve_call_seconds_bucket{{strategy="{esc(s)}",le="{bound:g}"}} {count:g}')
            lines.append(f'tts_serve_call_seconds_bucket{{strategy="{esc(s)}",le="+Inf"}} {h[-1]:g}')
            lines.append(f'tts_serve_call_seconds_sum{{strategy="{esc(s)}"}} {h[-2]:.6f}')
            lines.append(f'tts_serve_call_seconds_count{{strategy="{esc(s)}"}} {h[-1]:g}')
        metric("tts_serve_calls_in_flight", "gauge", "Calls being answered.", [({}, gate.running)])
        metric("tts_serve_calls_queued", "gauge", "Calls waiting for a slot.", [({}, gate.waiting)])
        for name, kind, text, value in (("healthy", "gauge", "1 while the upstream is in rotation.", lambda u: int(u.healthy)),
                                        ("outstanding", "gauge", "Samples in flight on the upstream.", lambda u: u.outstanding),
                                        ("calls_total", "counter", "Calls sent to the upstream.", lambda u: u.calls)):
            metric(f"tts_serve_upstream_{name}", kind, text, [({"upstream": u.url}, value(u)) for u in upstreams])
        return "\n".join(lines) + "\n"


# --- the gateway ------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A strategy call, parsed: the method and its settings, and what each upstream request carries."""

    model: str  # the upstream model name ("" : the upstream's first)
    shown: str  # the model as the client named it (the answer's "model")
    spec: MethodSpec
    path: str
    template: dict[str, Any]
    params: dict[str, Any]  # top-level tts_* keys of the call, sent with each request
    prompt: str  # the problem's prompt, for rewards
    max_tokens: int
    seed: int | None
    stream: bool
    chat: bool

    @property
    def method(self) -> BenchMethod:
        return self.spec.method


def _error(status: int, message: str, **kw: Any) -> HTTPError:
    return HTTPError(status, message, **kw)


def _prompt_text(messages: Sequence[Any]) -> str:
    """The last user message's text (what a reward is shown as the prompt)."""
    for msg in reversed(messages):
        if isinstance(msg, Mapping) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def split_model(model: str) -> tuple[str, str | None]:
    """``"NAME@SPEC"`` -> ``("NAME", "SPEC")``; a plain name -> ``(name, None)``. The first ``@`` splits."""
    name, at, spec = model.partition("@")
    return (name, spec) if at else (model, None)


class Gateway:
    """The ASGI app's state: upstreams, limits, metrics; :meth:`app` builds the Starlette app."""

    def __init__(self, config: Config, *, transport: Any = None) -> None:
        config.check()
        self.config = config
        self.upstreams = [Upstream(base_url(u), i) for i, u in enumerate(config.upstreams)]
        self.answer = extractor(config.extract)
        self.allowed = frozenset(s.strip() for s in config.allow_rewards)
        self.metrics = Metrics()
        self.gate: Gate | None = None
        self.transport = transport  # the upstreams' httpx transport (None: the network; tests give a MockTransport)
        self._pool: ThreadPoolExecutor | None = None
        self._health: asyncio.Task | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        import httpx

        c = self.config
        self.gate = Gate(c.max_concurrency, c.max_concurrency if c.max_queue is None else c.max_queue)
        timeout = httpx.Timeout(c.timeout, connect=min(10.0, c.timeout))
        headers = {"authorization": f"Bearer {c.upstream_api_key}"} if c.upstream_api_key else None
        for u in self.upstreams:
            # idle connections go before the servers' own keep-alive timeout (uvicorn: 5 s), as Server's do
            u.client = httpx.AsyncClient(timeout=timeout, headers=headers, transport=self.transport,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0))
        # rewards, votes (math-verify) and fits: one worker per call in flight, so a slow reward holds only its own call
        self._pool = ThreadPoolExecutor(max_workers=c.max_concurrency, thread_name_prefix="tts-serve")
        await self.check_all()
        self._health = asyncio.ensure_future(self._health_loop())

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        for u in self.upstreams:
            if u.client is not None:
                await u.client.aclose()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def offload(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` on a worker thread: the event loop goes on serving /health and every other call.
        A call cancelled meanwhile stops waiting; the work itself runs to its end."""
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    def upstream_headers(self, request: Any) -> dict[str, str]:
        """The Authorization an upstream gets: ``--upstream-api-key`` (the client's defaults carry it); none when
        ``--api-key`` is set (the client's header holds this gateway's key, not the upstream's); else the client's."""
        if self.config.upstream_api_key or self.config.api_key is not None:
            return {}
        return {k: v for k, v in request.headers.items() if k.lower() == "authorization"}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.check_all()
            except Exception:  # a check must never end the loop
                log.exception("health check failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    async def check(self, u: Upstream) -> None:
        """``/health`` (else ``/v1/models``) answers 200: in rotation; the model list and the engine are refreshed."""
        import httpx

        timeout = min(5.0, self.config.timeout)

        async def get(path: str) -> Any:
            try:
                return await u.client.get(u.url + path, timeout=timeout)
            except (httpx.ReadError, httpx.RemoteProtocolError):  # a pooled connection the upstream closed: once more
                return await u.client.get(u.url + path, timeout=timeout)

        try:
            r = await get("/health")
            models = await get("/v1/models")
            if models.status_code == 200:
                u.models = [m for m in (models.json().get("data") or []) if isinstance(m, dict)]
            if r.status_code != 200 and models.status_code != 200:
                u.down(f"/health answered HTTP {r.status_code}, /v1/models HTTP {models.status_code}")
                return
            if u.engine is None:
                info = await get("/get_model_info")
                u.engine = "sglang" if info.status_code == 200 else "vllm"
            u.up()
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            u.down(f"{type(exc).__name__}: {exc}")

    def pick(self, model: str, exclude: Sequence[Upstream] = ()) -> Upstream | None:
        """The healthy upstream with the least outstanding work among those serving ``model`` (all healthy ones
        when none lists it); ties go to the one that got fewer calls, then to the first listed. With no healthy one
        left, the same among those out of rotation: the health state may be stale (an upstream that came back
        since the last check), and trying costs a refused connection, where not trying is a certain 502."""
        left = [u for u in self.upstreams if u not in exclude]
        live = [u for u in left if u.healthy] or left
        serving = [u for u in live if model in u.model_ids] if model else []
        pool = serving or live
        return min(pool, key=lambda u: (u.outstanding, u.calls, u.index)) if pool else None

    def _no_upstream(self, tried: Sequence[Upstream], errors: Sequence[str]) -> HTTPError:
        down = [f"{u.url} ({u.last_error or 'out of rotation'})" for u in self.upstreams if u not in tried]
        what = "; ".join([*errors, *down])
        return HTTPError(502, f"no upstream could answer: {what}", kind="upstream_error", code="no_upstream")

    # --- the app ---

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        def authorized(request: Any) -> Any:
            key = self.config.api_key
            if key is None or request.headers.get("authorization", "") == f"Bearer {key}":
                return None
            return _json_response(HTTPError(401, "a valid API key is required (Authorization: Bearer <--api-key>)", code="invalid_api_key"))

        async def health(request: Any) -> Any:
            ups = [{"url": u.url, "healthy": u.healthy, "outstanding": u.outstanding, "engine": u.engine, "error": u.last_error}
                   for u in self.upstreams]
            ok = any(u.healthy for u in self.upstreams)
            return JSONResponse({"status": "ok" if ok else "no healthy upstream", "upstreams": ups}, status_code=200 if ok else 503)

        async def metrics(request: Any) -> Any:
            assert self.gate is not None
            return PlainTextResponse(self.metrics.render(self.upstreams, self.gate), media_type="text/plain; version=0.0.4")

        async def models(request: Any) -> Any:
            refused = authorized(request)
            if refused is not None:
                return refused
            return JSONResponse({"object": "list", "data": self.model_list()})

        async def completions(request: Any) -> Any:
            refused = authorized(request)
            if refused is not None:
                return refused
            return Live(self.handle(request, await request.body()))

        routes = [Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
                  Route("/v1/chat/completions", completions, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"])]
        return Starlette(routes=routes, lifespan=lifespan)

    def model_list(self) -> list[dict[str, Any]]:
        out, seen = [], set()
        for u in self.upstreams:
            for m in u.models:
                mid = str(m.get("id"))
                if mid in seen:
                    continue
                seen.add(mid)
                out.append(m)
                for spec in self.config.aliases:
                    out.append({"id": f"{mid}@{spec}", "object": "model", "created": m.get("created", 0), "owned_by": "tts-plugins",
                                "root": mid, "parent": mid})
        return out

    async def handle(self, request: Any, raw: bytes) -> AsyncIterator[Any]:
        """The call's response as :class:`Live` drives it: ``(status, headers)``, then body chunks."""
        t0 = time.perf_counter()
        path = request.url.path
        try:
            body = parse_body(raw)
            name, spec = strategy_of(body)
            plan = None if spec is None else self.plan(path, body, name, spec)
        except HTTPError as exc:
            self.metrics.call("invalid", exc.status, time.perf_counter() - t0)
            async for part in _error_parts(exc):
                yield part
            return
        if plan is None:
            async for part in self.relay(request, raw, path, body, t0):
                yield part
            return
        async for part in self.strategy(request, plan, t0):
            yield part

    # --- pass-through ---

    async def relay(self, request: Any, raw: bytes, path: str, body: Mapping[str, Any], t0: float) -> AsyncIterator[Any]:
        """Pass the call through to one upstream untouched; retried on another only when it could not connect."""
        import httpx

        assert self.gate is not None
        c = self.config
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        n = body.get("n")
        # the call's weight in the outstanding-work balance, and nothing more: the body goes as sent (an upstream
        # refuses a bad n itself), and a client's n of a million or of -5 must not skew where other calls go
        weight = min(max(n, 1), max(c.max_samples, c.max_n)) if _is_int(n) else 1
        strip = _HOP | ({"authorization"} if c.upstream_api_key or c.api_key is not None else set())
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in strip]
        query = request.url.query
        status = 502
        try:
            async with self.gate.slot():
                tried: list[Upstream] = []
                errors: list[str] = []
                while len(tried) < 2:
                    u = self.pick(model, tried)
                    if u is None:
                        break
                    if tried:
                        self.metrics.retries += 1
                    tried.append(u)
                    u.calls += 1
                    u.outstanding += weight
                    try:
                        def send(u: Upstream = u) -> Any:
                            req = u.client.build_request(request.method, u.url + path + (f"?{query}" if query else ""), content=raw,
                                                         headers=headers)
                            return u.client.send(req, stream=True)

                        try:
                            resp = await post(u, send, c.timeout)
                        except UpstreamError as exc:
                            if exc.unsent:
                                errors.append(str(exc))
                                continue
                            raise exc.http() from None
                        try:
                            status = resp.status_code
                            yield status, [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP]
                            try:
                                async for chunk in resp.aiter_raw():
                                    yield chunk
                            except httpx.HTTPError as exc:  # the status is sent: all that is left is to end the stream
                                log.warning("upstream %s broke off a response: %s", u.url, exc)
                                status = 502  # what /metrics counts: the client got a broken answer, not the 200 it began as
                        finally:
                            await resp.aclose()
                        return
                    finally:
                        u.outstanding -= weight
                raise self._no_upstream(tried, errors)
        except HTTPError as exc:
            status = exc.status
            async for part in _error_parts(exc):
                yield part
        except (GeneratorExit, asyncio.CancelledError):
            status = CLIENT_CLOSED
            raise
        finally:
            self.metrics.call(PASS_THROUGH, status, time.perf_counter() - t0)

    # --- strategies ---

    def plan(self, path: str, body: dict[str, Any], name: str, spec: str) -> Plan:
        """Parse and check a strategy call before it waits for a slot; each refusal is a 400 naming what to change."""
        where = "tts_strategy" if body.get("tts_strategy") not in (None, "") else "model"
        try:
            _, m = parse_method(spec)
            m.method.check_run(m, concurrency=self.config.max_samples)
        except ValueError as exc:
            raise _error(400, f"bad tts strategy {spec!r}: {_with_form(str(exc), spec)}", param=where, code="bad_strategy") from None
        self.check_settings(m, where)
        wanted = m.method.sample_count(m.settings)
        if wanted > self.config.max_samples:
            raise _error(400, f"strategy {spec!r} asks for {wanted} samples; this gateway allows at most --max-samples={self.config.max_samples}",
                         param=where, code="max_samples")
        check_body(body, m)
        chat = path.endswith("/chat/completions")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _error(400, "messages must be a non-empty list", param="messages")
            prompt = _prompt_text(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise _error(400, "a strategy call on /v1/completions takes one prompt, a string", param="prompt")
        params = {k: v for k, v in body.items() if k.startswith("tts_") and k != "tts_strategy"}
        template = {k: v for k, v in body.items() if k not in STRATEGY_KEYS and k not in params}
        if not chat:
            template["prompt"] = prompt
        limit = next((body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), self.config.max_tokens)
        max_tokens = int(m.settings.get("max_tokens", limit))
        seed = body.get("seed")
        if params:
            m.params = {**m.params, **params}
        return Plan(model=name, shown=str(body.get("model") or name), spec=m, path=path, template=template, params=params, prompt=prompt,
                    max_tokens=max_tokens, seed=seed, stream=bool(body.get("stream")), chat=chat)

    def check_settings(self, m: MethodSpec, where: str) -> None:
        """No code travels over the wire: a setting the client changed that names ``module:function`` (a reward, an
        extractor, anything a method would import) is refused unless ``--allow-reward`` lists that very value; the
        built-in names (``confidence``, ``agreement``) and the method's own defaults (the operator installed it) stay.
        A setting whose default is a name takes a string."""
        defaults = m.method.defaults
        for key, value in m.settings.items():
            if key in defaults and value == defaults[key]:
                continue
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                raise _error(400, f"in strategy {m.spec!r}: {key} must be a string, got {_show(value)}", param=where, code="bad_strategy")
            for ref in _code_refs(value):
                if ref not in self.allowed:
                    raise _error(400, f"in strategy {m.spec!r}: {key}={ref} names code to run (module:function), and a client may not send "
                                      f"code; the gateway's operator can allow it with --allow-reward {ref}", param=where, code="code_not_allowed")

    async def attempts(self, request: Any, plan: Plan, calls: list[Call]) -> tuple[Call, Any]:
        """Run the strategy on an upstream; once more on another when the first failed before any sample finished."""
        tried: list[Upstream] = []
        errors: list[str] = []
        headers = self.upstream_headers(request)
        problem = {"id": PROBLEM_ID, "prompt": plan.prompt}
        expected = plan.method.sample_count(plan.spec.settings)
        while True:
            u = self.pick(plan.model, tried)
            if u is None:
                raise self._no_upstream(tried, errors)
            tried.append(u)
            u.calls += 1
            call = Call(u, expected, self.config.max_samples)
            calls.append(call)
            model = plan.model or (u.model_ids[0] if u.model_ids else "")
            server = CallServer(u, call, model=model, path=plan.path, template=plan.template, headers=headers, timeout=self.config.timeout,
                                answer=self.answer, offload=self.offload)
            # without the call's seed the strategies draw unseeded; a method that seeds its requests itself (a roster's
            # members) gets a fresh first seed
            first = random.randrange(2**31 - 1) if plan.seed is None else sample_seed(plan.seed, PROBLEM_ID)
            ctx = RunContext(seed=plan.seed, first_seed=first, max_tokens=plan.max_tokens, max_n=self.config.max_n,  # type: ignore[arg-type]
                             group=f"tts-serve-{uuid.uuid4().hex}")
            try:
                return call, await plan.method.run(server, plan.spec, problem, ctx)
            except UpstreamError as exc:
                await call.cancel()
                errors.append(str(exc))
                if exc.retryable and not call.drawn and len(tried) < 2 and self.pick(plan.model, tried) is not None:
                    log.warning("retrying a %s call on another upstream: %s", plan.method.name, exc)
                    self.metrics.retries += 1
                    continue
                if len(tried) > 1 and exc.retryable:
                    raise HTTPError(502 if exc.status != 504 else 504, "no upstream could answer: " + "; ".join(errors), kind="upstream_error",
                                    code="upstream_error") from None
                raise exc.http() from None
            finally:
                await call.cancel()

    async def strategy(self, request: Any, plan: Plan, t0: float) -> AsyncIterator[Any]:
        assert self.gate is not None
        name = plan.method.name
        status = 200
        calls: list[Call] = []
        try:
            async with self.gate.slot():
                if not plan.stream:
                    call, outcome = await self._run(request, plan, calls)
                    answer = await self.answer_body(plan, call, outcome, t0)
                    yield 200, [("content-type", "application/json")]
                    yield json.dumps(answer).encode()
                    return
                async for part in self.stream(request, plan, calls, t0):
                    if isinstance(part, HTTPError):  # failed after its 200: /metrics counts the real status
                        status = part.status
                        part = part.event()
                    yield part
        except HTTPError as exc:
            status = exc.status
            async for part in _error_parts(exc):
                yield part
        except (GeneratorExit, asyncio.CancelledError):
            status = CLIENT_CLOSED
            raise
        finally:
            self.metrics.call(name, status, time.perf_counter() - t0)

    async def _run(self, request: Any, plan: Plan, calls: list[Call]) -> tuple[Call, Any]:
        try:
            return await self.attempts(request, plan, calls)
        except HTTPError:
            raise
        except ServerError as exc:  # a strategy's own check of what came back (e.g. DeepConf without reports)
            where = calls[-1].upstream.url if calls else "?"
            raise HTTPError(502, f"upstream {where}: {exc}", kind="upstream_error", code="upstream_error") from None
        except ValueError as exc:  # a setting only the run could check (a reward that does not load, ...)
            raise HTTPError(400, f"strategy {plan.spec.spec!r}: {exc}", param="model", code="bad_strategy") from None
        except Exception as exc:
            log.exception("strategy %r failed", plan.spec.spec)
            raise HTTPError(500, f"strategy {plan.spec.spec!r} failed: {type(exc).__name__}: {exc}", kind="server_error") from None

    async def stream(self, request: Any, plan: Plan, calls: list[Call], t0: float) -> AsyncIterator[Any]:
        """SSE: the status waits for the first finished sample (or the keep-alive interval), so an upstream that
        fails at once still gets its 502; after it, progress comments, the answer's chunks, usage and ``tts``. A
        failure after the 200 is yielded as its :class:`HTTPError` (the caller counts it and sends its event)."""
        task = asyncio.ensure_future(self._run(request, plan, calls))
        committed, shown = False, None
        try:
            while True:
                call = calls[-1] if calls else None
                waits = [task] + ([asyncio.ensure_future(call.progress.wait())] if call is not None else [])
                done, _ = await asyncio.wait(waits, timeout=self.config.keepalive, return_when=asyncio.FIRST_COMPLETED)
                for w in waits[1:]:
                    w.cancel()
                if call is not None:
                    call.progress.clear()
                if task in done and task.exception() is not None and not committed:
                    raise task.exception()  # type: ignore[misc]
                if not committed and (task in done or (call is not None and call.drawn) or not done):
                    committed = True
                    yield 200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
                call = calls[-1] if calls else None
                if committed and call is not None:
                    line = f": {len(call.drawn)}/{max(call.expected, call.asked)} samples"
                    if line != shown or not done:
                        shown = line
                        yield (line + "\n\n").encode()
                if task in done:
                    break
            exc = task.exception()
            if exc is None:
                try:
                    call, outcome = task.result()
                    answer = await self.answer_body(plan, call, outcome, t0)
                except Exception as late:
                    log.exception("strategy %r: the answer failed", plan.spec.spec)
                    exc = HTTPError(500, f"strategy {plan.spec.spec!r} failed: {type(late).__name__}: {late}", kind="server_error")
            if exc is not None:
                yield exc if isinstance(exc, HTTPError) else HTTPError(500, str(exc), kind="server_error")
                return
            for chunk in _chunks(plan, answer):
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def answer_body(self, plan: Plan, call: Call, outcome: Any, t0: float) -> dict[str, Any]:
        """The OpenAI response: the selected sample as one choice, usage over every sample, and the ``tts`` object.
        The selection and the tally compare answers (math-verify): on a worker thread."""
        drawn = list(call.drawn)
        voted = outcome.answer
        pick, votes = await self.offload(_tally, drawn, voted)
        chosen = drawn[pick].choice if pick is not None else {}
        usage = dict(call.usage)
        if "completion_tokens" not in usage:
            usage["completion_tokens"] = sum(d.sample.tokens for d in drawn)
        usage.setdefault("prompt_tokens", 0)
        usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        name = plan.method.name
        stopped = sum(d.stopped for d in drawn)
        self.metrics.samples[name] += len(drawn)
        self.metrics.stopped[name] += stopped
        self.metrics.tokens[(name, "prompt")] += usage.get("prompt_tokens", 0)
        self.metrics.tokens[(name, "completion")] += usage.get("completion_tokens", 0)
        tts = {"strategy": plan.spec.spec, "method": name, "label": plan.spec.label, "answer": voted,
               "votes": votes, "selected": pick, "stopped": stopped, "upstream": call.upstream.url,
               "requests": call.requests, "seconds": round(time.perf_counter() - t0, 3),
               "samples": [{"tokens": d.sample.tokens, "finish_reason": d.sample.finish_reason, "stopped": d.stopped, "answer": d.sample.answer,
                            "phase": d.sample.phase, **({"reward": d.sample.reward} if d.sample.reward is not None else {})} for d in drawn],
               **_jsonable(dict(outcome.extra))}
        choice: dict[str, Any] = {"index": 0, "finish_reason": chosen.get("finish_reason"), "logprobs": None}
        if plan.chat:
            msg = dict(chosen.get("message") or {"content": None})
            msg.setdefault("role", "assistant")
            choice["message"] = msg
        else:
            choice["text"] = chosen.get("text") or ""
        return {"id": f"{'chatcmpl' if plan.chat else 'cmpl'}-tts-{uuid.uuid4().hex}",
                "object": "chat.completion" if plan.chat else "text_completion", "created": int(time.time()), "model": plan.shown,
                "choices": [choice], "usage": usage, "tts": tts}


def _tally(drawn: Sequence[Drawn], voted: str | None) -> tuple[int | None, dict[str, int]]:
    """The selected sample (:func:`select`) and the votes per answer, equal answers by math-verify."""
    answers = [d.sample.answer for d in drawn]
    tally: Counter = Counter()
    for _, members in aggregate.classes(answers):
        tally[str(aggregate.canonical(answers, members))] += len(members)
    return select(drawn, voted), dict(tally.most_common())


def parse_body(raw: bytes) -> dict[str, Any]:
    """The call's body, a JSON object, else a 400 from the gateway itself (pass-through calls too: an upstream
    would answer the same, less clearly)."""
    try:
        body = json.loads(raw)
    except RecursionError:  # nested deeper than the parser's stack
        raise _error(400, "the body must be a JSON object; it is nested too deeply to parse") from None
    except ValueError as exc:
        raise _error(400, f"the body must be a JSON object; it is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise _error(400, f"the body must be a JSON object, got a JSON {_JSON_TYPES.get(type(body), type(body).__name__)}")
    return body


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def strategy_of(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(upstream model, SPEC)`` of a call: the SPEC after ``@`` in the model or in ``tts_strategy`` (None: a
    pass-through call, which keeps whatever model it sent)."""
    model, given = body.get("model"), body.get("tts_strategy")
    if given is not None and not isinstance(given, str):
        raise _error(400, f"tts_strategy must be a string (a SPEC, e.g. 'majority:n=8'), got {_show(given)}", param="tts_strategy",
                     code="bad_strategy")
    name, spec = split_model(model) if isinstance(model, str) else ("", None)
    if given:
        if model is not None and not isinstance(model, str):
            raise _error(400, f"model must be a string, got {_show(model)}", param="model")
        if spec is not None and spec != given:
            raise _error(400, f"the strategy is named twice, {spec!r} in the model and {given!r} in tts_strategy; name it once",
                         param="tts_strategy", code="bad_strategy")
        spec = given
    return name, spec


def check_body(body: Mapping[str, Any], m: MethodSpec) -> None:
    """A strategy call's own keys, each checked by name (a JSON ``null`` is the key's absence); the sampling keys
    the strategy sets are refused, not silently replaced."""

    def need(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise _error(400, f"{key} must be {what}, got {_show(body[key])}", param=key)

    def given(key: str) -> bool:
        return body.get(key) is not None

    for key in ("max_completion_tokens", "max_tokens"):
        if given(key):
            need(key, _is_int(body[key]) and body[key] >= 1, "an int >= 1")
    if given("stream"):
        need("stream", isinstance(body["stream"], bool), "a boolean")
    if given("seed"):
        need("seed", _is_int(body["seed"]), "an int")
    if given("n"):
        need("n", _is_int(body["n"]) and body["n"] == 1,
             f"1 or absent (a strategy call answers with one choice; ask for more samples in the SPEC: {m.method.form})")
    for key in FIELD.values():
        if given(key):
            need(key, isinstance(body[key], dict), "a JSON object of tts_* keys")
    for key in SET_BY_STRATEGY:
        if not given(key) or (key == "logprobs" and body[key] is False):
            continue
        if key in m.method.keys:
            example = m.spec + ("," if ":" in m.spec else ":") + f"{key}={json.dumps(body[key])}"
            how = f"set it in the SPEC instead, e.g. model='NAME@{example}'"
        else:
            how = f"{m.method.name}'s SPEC does not take it (its settings: {', '.join(m.method.keys)})"
        raise _error(400, f"{key} is set by the strategy {m.method.name!r}, not by the call (got {key}={_show(body[key])}); {how}", param=key,
                     code="set_by_strategy")


def _with_form(message: str, spec: str) -> str:
    """A bad SPEC's message with what was expected: the method's form (its grammar) when the message lacks it."""
    method = default_methods().get(spec.strip().partition(":")[0]) if isinstance(spec, str) else None
    form = method.form if method is not None else "METHOD[:<value>][,key=value...] with one of the known methods"
    return message if "expected" in message and form in message else f"{message}; expected {form}"


def select(drawn: Sequence[Drawn], voted: str | None) -> int | None:
    """The sample that answers: among those giving the voted answer (all when none does), one the engine did not
    stop and that finished, with the highest reward, then the fewest tokens, then the first drawn."""
    if not drawn:
        return None
    idx = list(range(len(drawn)))
    if voted is not None:
        same = [i for i in idx if drawn[i].sample.answer is not None and aggregate.same_answer(str(drawn[i].sample.answer), str(voted))]
        idx = same or idx
    return min(idx, key=lambda i: (drawn[i].stopped, drawn[i].sample.finish_reason != "stop", -(drawn[i].sample.reward or 0.0),
                                   drawn[i].sample.tokens, i))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _chunks(plan: Plan, answer: Mapping[str, Any], size: int = 512) -> list[dict[str, Any]]:
    """The answer as stream chunks: the role, the reasoning and content in pieces, the finish reason, then a last
    chunk with no choice that carries usage and ``tts`` (as OpenAI's ``include_usage`` chunk does)."""
    base = {"id": answer["id"], "object": "chat.completion.chunk" if plan.chat else "text_completion", "created": answer["created"],
            "model": answer["model"]}
    choice = answer["choices"][0]
    out: list[dict[str, Any]] = []

    def piece(delta: dict[str, Any] | None = None, text: str | None = None, finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if plan.chat:
            c["delta"] = delta or {}
        else:
            c["text"] = text or ""
        return {**base, "choices": [c]}

    if plan.chat:
        msg = choice["message"]
        out.append(piece({"role": "assistant", "content": ""}))
        for key in ("reasoning_content", "reasoning", "content"):
            text = msg.get(key)
            if isinstance(text, str):
                out.extend(piece({key: text[i:i + size]}) for i in range(0, len(text), size))
        if msg.get("tool_calls"):
            out.append(piece({"tool_calls": [{**tc, "index": i} for i, tc in enumerate(msg["tool_calls"])]}))
    else:
        text = choice.get("text") or ""
        out.extend(piece(text=text[i:i + size]) for i in range(0, len(text), size))
    out.append(piece(finish=choice.get("finish_reason") or "stop"))
    out.append({**base, "choices": [], "usage": answer["usage"], "tts": answer["tts"]})
    return out


async def _error_parts(exc: HTTPError) -> AsyncIterator[Any]:
    yield exc.status, [("content-type", "application/json")]
    yield exc.body()


def _json_response(exc: HTTPError) -> Any:
    from starlette.responses import Response

    return Response(exc.body(), status_code=exc.status, media_type="application/json")


class Live:
    """An ASGI response driven by an async generator that yields ``(status, headers)`` first, then body chunks.
    A client that disconnects cancels the generator wherever it waits (for a slot, an upstream, a vote), and with
    it every upstream request of the call: each connection is closed, and the engines abort the requests."""

    def __init__(self, parts: AsyncIterator[Any]) -> None:
        self.parts = parts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def pump() -> None:
            status, headers = await self.parts.__anext__()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
            async for chunk in self.parts:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(pump()), asyncio.ensure_future(listen())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, watch):
                t.cancel()
            results = await asyncio.gather(work, watch, return_exceptions=True)
            await self.parts.aclose()
        if isinstance(results[0], OSError):
            return  # the client went away while we wrote
        if isinstance(results[0], BaseException) and not isinstance(results[0], asyncio.CancelledError):
            raise results[0]


# --- the command ------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="an OpenAI-compatible gateway that runs strategies (model=NAME@SPEC) in front of vLLM or SGLang servers",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", action="append", required=True, metavar="URL",
                   help="an OpenAI-compatible vLLM or SGLang server (or a router in front of several); repeat for more")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--max-samples", type=int, default=64, help="the most samples one call may draw (default 64)")
    p.add_argument("--max-concurrency", type=int, default=64, help="calls in flight (default 64); more wait in a queue")
    p.add_argument("--max-queue", type=int, default=None, help="calls waiting for a slot before 429 (default: --max-concurrency)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* (this key is never forwarded upstream)")
    p.add_argument("--upstream-api-key", default=None, metavar="KEY",
                   help="send Authorization: Bearer KEY to the upstreams (default: the client's header, unless --api-key is set)")
    p.add_argument("--allow-reward", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a module:function a client's SPEC may name (reward=...); repeatable. Any other is refused: no code travels "
                        "over the wire. The built-in rewards (confidence, agreement) need no flag")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream request (default 600)")
    p.add_argument("--health-interval", type=float, default=5.0, help="seconds between upstream health checks (default 5)")
    p.add_argument("--max-n", type=int, default=16, help="samples per upstream request (default 16)")
    p.add_argument("--max-tokens", type=int, default=4096, help="per sample, when neither the call nor its SPEC sets max_tokens (default 4096)")
    p.add_argument("--extract", default="auto", help="answer extractor for the votes: auto, last-number, full or module:function")
    p.add_argument("--alias", action="append", default=None, metavar="SPEC",
                   help=f"a strategy /v1/models lists for each model (repeatable; default: {', '.join(ALIASES)})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config(a: argparse.Namespace) -> Config:
    return Config(upstreams=a.upstream, host=a.host, port=a.port, max_samples=a.max_samples, max_concurrency=a.max_concurrency,
                  max_queue=a.max_queue, api_key=a.api_key, upstream_api_key=a.upstream_api_key, allow_rewards=tuple(a.allow_reward),
                  timeout=a.timeout, health_interval=a.health_interval, max_n=a.max_n, max_tokens=a.max_tokens, extract=a.extract,
                  aliases=tuple(a.alias) if a.alias else ALIASES)


def build_app(c: Config) -> Any:
    """The gateway's ASGI app (Starlette), for uvicorn or any ASGI server."""
    return Gateway(c).app()


def main(a: argparse.Namespace) -> int:
    try:
        c = config(a)
        app = build_app(c)
    except ValueError as exc:
        print(f"tts serve: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"tts serve: {exc.name} is missing; install the extra: pip install 'tts-plugins[serve]'", file=sys.stderr)
        return 2
    import uvicorn

    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=c.host, port=c.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0


__all__ = ["ALIASES", "Config", "Gateway", "HTTPError", "UpstreamError", "add_parser", "build_app", "engine_stopped", "main", "select", "split_model"]
