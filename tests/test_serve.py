"""``tts serve`` against fake upstreams: a small Starlette app that speaks the OpenAI chat and completions API (``n``
choices with deterministic answers, streaming, finish reasons, the engines' reports) with switches to fail or
hang, and the stock ``openai`` client against the gateway. No engine runs here; tests/engine runs the real ones."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from tts_plugins.client.serve import Config, Gateway, build_app  # noqa: E402

MODEL = "fake-model"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 3 + 4."}]


# --- the fake upstream ------------------------------------------------------------------------------------


class Fake:
    """An OpenAI-compatible upstream. Choice ``i`` answers ``answers[i % len(answers)]`` in ``i + 4`` tokens; with
    ``tts_group`` members after the first ``tts_group_stop_after`` end unfinished (as the group stop ends them);
    with ``tts_conf_window`` each choice carries a DeepConf report in ``stop_reason``, and with
    ``tts_conf_threshold`` odd choices are stopped. ``fail``: HTTP 500; ``hang``: wait until the client goes;
    ``refuse_after``: requests after that many are refused (400, a pretty-printed error body, 0.2 s late)."""

    def __init__(self, answers: tuple[str, ...] = ("7", "7", "5")) -> None:
        self.answers = answers
        self.reset()
        self.app = Starlette(routes=[Route("/health", self.health), Route("/v1/models", self.models),
                                     Route("/v1/chat/completions", self.complete, methods=["POST"]),
                                     Route("/v1/completions", self.complete, methods=["POST"])])

    def reset(self) -> None:
        self.fail = self.hang = self.down = False
        self.refuse_after: int | None = None
        self.raw: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.active = self.closed = 0

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self.raw]

    async def health(self, request: Request) -> Response:
        return Response(status_code=503 if self.down else 200)

    async def models(self, request: Request) -> Response:
        if self.down:
            return Response(status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]})

    async def complete(self, request: Request) -> Response:
        raw = await request.body()
        self.raw.append(raw)
        self.headers.append(dict(request.headers))
        body = json.loads(raw)
        if self.fail:
            return JSONResponse({"error": {"message": "the fake engine failed", "type": "InternalServerError", "code": 500}}, status_code=500)
        if self.refuse_after is not None and len(self.raw) > self.refuse_after:
            await asyncio.sleep(0.2)
            error = {"error": {"message": "the fake engine refused\nthis request", "type": "BadRequestError", "param": None, "code": 400}}
            return Response(json.dumps(error, indent=2), status_code=400, media_type="application/json")
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError", "code": 404}},
                                status_code=404)
        if self.hang:
            self.active += 1
            try:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.02)
            finally:
                self.active -= 1
                self.closed += 1
            return Response(status_code=499)
        chat = request.url.path.endswith("/chat/completions")
        choices = [self.choice(i, body, chat) for i in range(int(body.get("n") or 1))]
        usage = {"prompt_tokens": 10, "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        head = {"id": "cmpl-fake", "created": 1, "model": MODEL}
        if not body.get("stream"):
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage})

        async def events() -> Any:
            for c in choices:
                i = c["index"]
                if chat:
                    for delta in ({"role": "assistant", "content": ""}, {"reasoning_content": c["message"]["reasoning_content"]},
                                  {"content": c["message"]["content"]}):
                        yield _sse({**head, "object": "chat.completion.chunk", "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]})
                else:
                    yield _sse({**head, "object": "text_completion", "choices": [{"index": i, "text": c["text"], "finish_reason": "stop"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def choice(self, i: int, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        xargs = body.get("vllm_xargs") or {}
        answer = self.answers[i % len(self.answers)]
        reasoning, content, finish, report = f"3 + 4 = {answer} (sample {i})", f"Answer: {answer}", "stop", None
        if "tts_group" in xargs and i >= int(xargs.get("tts_group_stop_after", 1)):
            content = ""  # stopped by the group before it closed its thinking
        if "tts_conf_window" in xargs:
            stopped = "tts_conf_threshold" in xargs and i % 2 == 1
            lowest = 0.1 if stopped else round(0.9 - 0.01 * i, 6)
            if stopped:
                content = ""
            report = json.dumps({"tts": {"conf": {"stopped": stopped, "tokens": i + 4, "lowest": lowest, "mean": lowest}}, "engine": None})
        out: dict[str, Any] = {"index": i, "finish_reason": finish, "stop_reason": report, "token_ids": list(range(i + 4)), "logprobs": None}
        if chat:
            out["message"] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        else:
            out["text"] = f"{reasoning}</think>{content}"
        return out


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


# --- servers in threads -----------------------------------------------------------------------------------


class Running:
    """An ASGI app under uvicorn in a thread, on a free port."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, what=f"uvicorn on {self.url}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def dead_url() -> str:
    """An address nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[Fake, Fake, str, str]]:
    a, b = Fake(), Fake()
    ra, rb = Running(a.app), Running(b.app)
    yield a, b, ra.url, rb.url
    ra.close()
    rb.close()


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "fakes" in request.fixturenames:
        a, b, _, _ = request.getfixturevalue("fakes")
        a.reset()
        b.reset()


@pytest.fixture
def gateway() -> Iterator[Callable[..., str]]:
    """``gateway(*upstreams, **config) -> its URL``; stopped after the test."""
    running: list[Running] = []

    def start(*upstreams: str, transport: Any = None, **kw: Any) -> str:
        config = Config(upstreams=list(upstreams), **kw)
        r = Running(build_app(config) if transport is None else Gateway(config, transport=transport).app())
        running.append(r)
        return r.url

    yield start
    for r in running:
        r.close()


def client(url: str, key: str = "none", timeout: float = 20.0) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def post(url: str, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> Any:
    """A raw call: ``body`` as JSON, or bytes as they are (what the openai client would never send)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **kw.pop("headers", {})}, timeout=20, **kw)


def metric(url: str, line: str) -> bool:
    return line in httpx.get(url + "/metrics").text


def slow_reward(prompt: str, completion: str) -> float:
    """An operator's reward model that takes a second per sample (allowed with --allow-reward)."""
    time.sleep(1.0)
    return float(len(completion))


SLOW_REWARD = f"{__name__}:slow_reward"


class Scripted:
    """An upstream behind ``httpx.MockTransport`` (what the wire does, scripted): its POSTs fail in turn with the
    transport errors of ``script`` (an httpx exception class each), then answer as :class:`Fake` does."""

    URL = "http://scripted-upstream:8000"

    def __init__(self, *script: type[Exception]) -> None:
        self.script = list(script)
        self.posts = 0
        self.fake = Fake()
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            if request.url.path == "/v1/models":
                return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake"}]})
            return httpx.Response(200 if request.url.path == "/health" else 404)
        self.posts += 1
        if self.script:
            raise self.script.pop(0)("scripted transport failure", request=request)
        body = json.loads(request.content)
        choices = [self.fake.choice(i, body, chat=True) for i in range(int(body.get("n") or 1))]
        usage = {"prompt_tokens": 10, "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
        data = {"id": "cmpl-scripted", "object": "chat.completion", "created": 1, "model": MODEL, "choices": choices, "usage": usage}
        # a stream, as the network gives one (a response built from content counts as already read)
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=httpx.ByteStream(json.dumps(data).encode()))


# --- pass-through -----------------------------------------------------------------------------------------


def test_plain_model_passes_through_untouched(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    extra = {"tts_think_max": 5, "vllm_xargs": {"tts_moi_beta": 1.0}}
    direct = client(url_a).chat.completions.create(model=MODEL, messages=MESSAGES, n=2, extra_body=extra)
    via = client(gw).chat.completions.create(model=MODEL, messages=MESSAGES, n=2, extra_body=extra)
    assert via.model_dump() == direct.model_dump()
    assert a.raw[0] == a.raw[1], "the body reached the upstream as the client sent it"
    assert a.bodies[1]["tts_think_max"] == 5 and a.bodies[1]["vllm_xargs"] == {"tts_moi_beta": 1.0}


def test_pass_through_keeps_the_upstream_status_and_error(fakes, gateway):
    _, _, url_a, _ = fakes
    gw = gateway(url_a)
    with pytest.raises(openai.NotFoundError) as err:
        client(gw).chat.completions.create(model="missing", messages=MESSAGES)
    assert "`missing` does not exist" in str(err.value)


def test_pass_through_streams_byte_for_byte(fakes, gateway):
    _, _, url_a, _ = fakes
    gw = gateway(url_a)
    body = {"model": MODEL, "messages": MESSAGES, "n": 3, "stream": True, "stream_options": {"include_usage": True}}

    def raw(url: str) -> tuple[int, str, bytes]:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as r:
            return r.status_code, r.headers["content-type"], b"".join(r.iter_raw())

    assert raw(gw) == raw(url_a)
    chunks = list(client(gw).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Answer: 7"


# --- strategies -------------------------------------------------------------------------------------------


def test_majority_answers_the_vote_with_summed_usage(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = client(gw).chat.completions.create(model=f"{MODEL}@majority:n=8", messages=MESSAGES, max_tokens=64, extra_body={"stop": ["\n\n\n"]})
    tts = r.model_extra["tts"]
    assert r.model == f"{MODEL}@majority:n=8" and len(r.choices) == 1
    assert r.choices[0].message.content == "Answer: 7"
    assert r.choices[0].message.model_extra["reasoning_content"].startswith("3 + 4 = 7")
    assert tts["method"] == "majority" and tts["answer"] == "7" and tts["votes"] == {"7": 6, "5": 2}
    assert len(tts["samples"]) == 8 and not any(s["stopped"] for s in tts["samples"])
    assert all(s["finish_reason"] == "stop" for s in tts["samples"])
    assert r.usage.completion_tokens == sum(s["tokens"] for s in tts["samples"]) == sum(range(4, 12))
    assert r.usage.prompt_tokens == 10 and r.usage.total_tokens == 10 + r.usage.completion_tokens
    (sent,) = a.bodies
    assert sent["model"] == MODEL and sent["n"] == 8 and sent["temperature"] == 0.7 and sent["max_tokens"] == 64
    assert sent["messages"] == MESSAGES and sent["stop"] == ["\n\n\n"], "the client's other keys reach each request"


def test_tts_strategy_key_names_the_strategy_too(fakes, gateway):
    _, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = client(gw).chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"tts_strategy": "majority:n=4"})
    assert r.model_extra["tts"]["strategy"] == "majority:n=4" and r.model_extra["tts"]["answer"] == "7"


def test_short_m_reports_the_samples_the_engine_stopped(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = client(gw).chat.completions.create(model=f"{MODEL}@short-m:m=2,k=6", messages=MESSAGES)
    tts = r.model_extra["tts"]
    xargs = a.bodies[0]["vllm_xargs"]
    assert xargs["tts_group_stop_after"] == 2 and xargs["tts_group"].startswith("tts-serve-")
    assert [s["stopped"] for s in tts["samples"]] == [False, False, True, True, True, True]
    assert tts["stopped"] == 4 and tts["answer"] == "7" and r.choices[0].message.content == "Answer: 7"


def test_deepconf_votes_the_traces_its_threshold_kept(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = client(gw).chat.completions.create(model=f"{MODEL}@deepconf:8,warmup=4,variant=high,adaptive=false", messages=MESSAGES)
    tts = r.model_extra["tts"]
    assert [b["n"] for b in a.bodies] == [4, 4] and "tts_conf_threshold" in a.bodies[1]["vllm_xargs"]
    assert tts["deepconf"]["stopped"] == 2 == sum(s["stopped"] for s in tts["samples"])
    assert tts["answer"] == "7" and r.usage.completion_tokens == sum(s["tokens"] for s in tts["samples"])


def test_completions_endpoint_runs_strategies(fakes, gateway):
    _, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = client(gw).completions.create(model=f"{MODEL}@majority:n=4", prompt="Compute 3 + 4.")
    assert r.choices[0].text.endswith("Answer: 7") and r.model_extra["tts"]["answer"] == "7"


def test_streamed_strategy_sends_progress_then_the_answer(fakes, gateway):
    _, _, url_a, _ = fakes
    gw = gateway(url_a)
    body = {"model": f"{MODEL}@majority:n=8", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gw + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    comments = [x for x in lines if x.startswith(":")]
    assert comments and comments[-1] == ": 8/8 samples", lines
    data = [x[len("data: "):] for x in lines if x.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == sum(range(4, 12)) and last["tts"]["answer"] == "7"
    chunks = list(client(gw).chat.completions.create(model=f"{MODEL}@majority:n=8", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Answer: 7"
    assert chunks[-1].usage.completion_tokens == sum(range(4, 12)) and chunks[-1].model_extra["tts"]["votes"] == {"7": 6, "5": 2}


def test_concurrent_calls_with_mixed_strategies_are_all_answered(fakes, gateway):
    _, b, url_a, url_b = fakes
    gw = gateway(url_a, url_b, max_concurrency=8, max_queue=64)
    models = [f"{MODEL}@majority:n=4", f"{MODEL}@short-m:m=1,k=4", f"{MODEL}@deepconf:8,warmup=4", MODEL]

    async def run() -> list[Any]:
        c = openai.AsyncOpenAI(base_url=gw + "/v1", api_key="none", max_retries=0, timeout=30)
        try:
            return await asyncio.gather(*(c.chat.completions.create(model=models[i % 4], messages=MESSAGES) for i in range(48)))
        finally:
            await c.close()

    answers = asyncio.run(run())
    assert len(answers) == 48 and all(r.choices[0].message.content == "Answer: 7" for r in answers)
    for i, r in enumerate(answers):
        if i % 4 != 3:
            assert r.model_extra["tts"]["answer"] == "7" and r.model_extra["tts"]["samples"], f"call {i} ({models[i % 4]})"
    assert b.raw, "the calls were spread over both upstreams"


# --- refusals and limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected, form", [("majority:n=zero", "n must be an int >= 1", "expected majority[:<n>][,key=value...]"),
                                                  ("nosuch:3", "unknown method 'nosuch'", "expected METHOD[:<value>][,key=value...]"),
                                                  ("majority:n=4,bogus=1", "unknown setting 'bogus'", "expected majority[:<n>][,key=value...]"),
                                                  ("deepconf:8,warmup=9", "warmup must be <= n", "expected deepconf[:<n>][,key=value...]")])
def test_bad_spec_is_a_400_naming_it_and_what_was_expected(fakes, gateway, spec, expected, form):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    with pytest.raises(openai.BadRequestError) as err:
        client(gw).chat.completions.create(model=f"{MODEL}@{spec}", messages=MESSAGES)
    assert spec in str(err.value) and expected in str(err.value) and form in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client(gw).chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"tts_strategy": spec})
    assert spec in str(err.value) and err.value.body["param"] == "tts_strategy"
    assert not a.raw, "nothing was sent upstream"


def test_max_samples_is_a_400(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a, max_samples=8)
    with pytest.raises(openai.BadRequestError) as err:
        client(gw).chat.completions.create(model=f"{MODEL}@majority:n=16", messages=MESSAGES)
    assert "--max-samples=8" in str(err.value) and "16 samples" in str(err.value)
    assert not a.raw
    # the ladder's draws are decided as it runs (13 samples a wave): its second wave is refused
    with pytest.raises(openai.BadRequestError) as err:
        client(gw).chat.completions.create(model=f"{MODEL}@ladder:2", messages=MESSAGES)
    assert "more than --max-samples=8" in str(err.value) and not a.raw


def test_calls_beyond_concurrency_and_queue_get_429(fakes, gateway):
    a, _, url_a, _ = fakes
    a.hang = True
    gw = gateway(url_a, max_concurrency=1, max_queue=0)
    first = threading.Thread(target=_abandoned_call, args=(gw, {"model": MODEL, "messages": MESSAGES}, 1.5))
    first.start()
    wait_for(lambda: a.active == 1, what="the first call to reach the upstream")
    with pytest.raises(openai.RateLimitError) as err:
        client(gw).chat.completions.create(model=f"{MODEL}@majority:n=2", messages=MESSAGES)
    assert "--max-concurrency 1" in str(err.value)
    first.join()


def test_api_key_is_enforced_and_never_forwarded(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a, api_key="secret")
    with pytest.raises(openai.AuthenticationError):
        client(gw, key="wrong").chat.completions.create(model=f"{MODEL}@majority:n=2", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        client(gw, key="wrong").models.list()
    r = client(gw, key="secret").chat.completions.create(model=f"{MODEL}@majority:n=2", messages=MESSAGES)
    assert r.model_extra["tts"]["answer"] == "7"
    client(gw, key="secret").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert len(a.headers) == 2 and not any("authorization" in h for h in a.headers), "the gateway's key stays at the gateway"
    assert httpx.get(gw + "/health").status_code == 200


@pytest.mark.parametrize("kw, client_key, sent", [({"api_key": "secret", "upstream_api_key": "up-key"}, "secret", "Bearer up-key"),
                                                  ({"upstream_api_key": "up-key"}, "mine", "Bearer up-key"),
                                                  ({}, "mine", "Bearer mine")])
def test_upstreams_get_the_upstream_key_else_the_clients_without_api_key(fakes, gateway, kw, client_key, sent):
    a, _, url_a, _ = fakes
    gw = gateway(url_a, **kw)
    client(gw, key=client_key).chat.completions.create(model=f"{MODEL}@majority:n=2", messages=MESSAGES)
    client(gw, key=client_key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert [h["authorization"] for h in a.headers] == [sent, sent], "strategy and pass-through alike"


# --- no code over the wire, and bodies the gateway refuses itself -----------------------------------------


@pytest.mark.parametrize("spec", [f"best-of-n:2,reward={SLOW_REWARD}", 'best-of-n:2,reward="os:getcwd"', "carbon:4,reward=os:getcwd"])
def test_a_spec_naming_code_is_refused_unless_the_operator_allowed_it(fakes, gateway, spec):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = post(gw, {"model": f"{MODEL}@{spec}", "messages": MESSAGES})
    error = r.json()["error"]
    ref = spec.rpartition("reward=")[2].strip('"')
    assert r.status_code == 400 and error["code"] == "code_not_allowed", r.text
    assert f"reward={ref}" in error["message"] and f"--allow-reward {ref}" in error["message"]
    r = post(gw, {"model": MODEL, "messages": MESSAGES, "tts_strategy": spec})
    assert r.status_code == 400 and error["code"] == "code_not_allowed" and r.json()["error"]["param"] == "tts_strategy"
    r = post(gw, {"model": f'{MODEL}@best-of-n:2,reward=["{ref}"]', "messages": MESSAGES})
    assert r.status_code == 400 and "reward must be a string" in r.json()["error"]["message"]
    assert not a.raw, "refused before anything was sampled, so nothing was imported or called"
    for builtin in ("best-of-n:2", "best-of-n:2,reward=agreement", "carbon:4,reward=confidence"):
        assert client(gw).chat.completions.create(model=f"{MODEL}@{builtin}", messages=MESSAGES).model_extra["tts"]["answer"] == "7"


def test_an_allowed_slow_reward_runs_off_the_event_loop(fakes, gateway):
    a, _, url_a, _ = fakes
    gw = gateway(url_a, allow_rewards=[SLOW_REWARD])
    done: list[Any] = []
    caller = threading.Thread(target=lambda: done.append(post(gw, {"model": f"{MODEL}@best-of-n:2,reward={SLOW_REWARD}", "messages": MESSAGES})))
    caller.start()
    wait_for(lambda: len(a.raw) == 1, what="the samples to be drawn")
    time.sleep(0.2)  # inside the reward's two seconds
    t0 = time.perf_counter()
    assert httpx.get(gw + "/health", timeout=10).status_code == 200
    waited = time.perf_counter() - t0
    caller.join()
    assert waited < 0.3, f"/health waited {waited:.2f} s behind a reward"
    (r,) = done
    assert r.status_code == 200 and [s["reward"] for s in r.json()["tts"]["samples"]] == [float(len("3 + 4 = 7 (sample 0)</think>Answer: 7")),
                                                                                           float(len("3 + 4 = 7 (sample 1)</think>Answer: 7"))]


def test_allow_reward_must_name_a_function_that_loads():
    for bad, says in (("confidence", "must be module:function"), ("no_such_module_here:f", "cannot load")):
        with pytest.raises(ValueError, match=says):
            Config(upstreams=["http://127.0.0.1:1"], allow_rewards=[bad]).check()
    Config(upstreams=["http://127.0.0.1:1"], allow_rewards=[SLOW_REWARD]).check()


@pytest.mark.parametrize("raw, says", [(b"[" * 100_000, "nested too deeply"), (b"[1, 2]", "got a JSON array"), (b'"hi"', "got a JSON string"),
                                       (b"not json", "not valid JSON"), (b"", "not valid JSON")])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_that_is_not_a_json_object_is_a_400_from_the_gateway(fakes, gateway, raw, says, path):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = post(gw, raw, path)
    assert r.status_code == 400 and "the body must be a JSON object" in r.json()["error"]["message"] and says in r.text, r.text
    assert not a.raw, "nothing reached the upstream"
    assert metric(gw, 'tts_serve_calls_total{strategy="invalid",code="400"} 1')


@pytest.mark.parametrize("extra, param, message", [
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be an int >= 1, got 0"),
    ({"max_completion_tokens": "64"}, "max_completion_tokens", "max_completion_tokens must be an int >= 1, got '64'"),
    ({"max_tokens": 64, "max_completion_tokens": 1.5}, "max_completion_tokens", "max_completion_tokens must be an int >= 1, got 1.5"),
    ({"stream": "yes"}, "stream", "stream must be a boolean, got 'yes'"),
    ({"seed": 1.5}, "seed", "seed must be an int, got 1.5"),
    ({"n": 1.0}, "n", "got 1.0"), ({"n": True}, "n", "got True"), ({"n": 8}, "n", "got 8"),
    ({"vllm_xargs": [1]}, "vllm_xargs", "vllm_xargs must be a JSON object of tts_* keys, got [1]"),
    ({"custom_params": "x"}, "custom_params", "custom_params must be a JSON object of tts_* keys, got 'x'"),
    ({"model": 5, "tts_strategy": "short-m:m=1,k=4"}, "model", "model must be a string, got 5"),
    ({"tts_strategy": 5}, "tts_strategy", "tts_strategy must be a string (a SPEC, e.g. 'majority:n=8'), got 5"),
])
def test_a_strategy_calls_keys_are_checked_by_name(fakes, gateway, extra, param, message):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = post(gw, {"model": f"{MODEL}@short-m:m=1,k=4", "messages": MESSAGES, **extra})
    assert r.status_code == 400 and message in r.json()["error"]["message"] and r.json()["error"]["param"] == param, r.text
    if param == "n":
        assert "n must be 1 or absent" in r.text and "short-m[:<k>][,key=value...]" in r.text
    assert not a.raw


@pytest.mark.parametrize("key, value, spec, how", [("temperature", 0.5, "majority:n=8", "majority:n=8,temperature=0.5"),
                                                   ("top_p", 0.9, "short-m:m=1,k=4", "short-m:m=1,k=4,top_p=0.9"),
                                                   ("top_k", 20, "majority:n=8", "majority's SPEC does not take it"),
                                                   ("min_p", 0.1, "majority:8", "majority's SPEC does not take it"),
                                                   ("logprobs", True, "majority:n=4", "majority's SPEC does not take it"),
                                                   ("temperature", 0.3, "ladder:2", "ladder's SPEC does not take it")])
def test_sampling_keys_the_strategy_sets_are_refused_not_dropped(fakes, gateway, key, value, spec, how):
    a, _, url_a, _ = fakes
    gw = gateway(url_a)
    r = post(gw, {"model": f"{MODEL}@{spec}", "messages": MESSAGES, key: value})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == key and f"{key} is set by the strategy" in error["message"] and how in error["message"]
    assert not a.raw
    ok = post(gw, {"model": f"{MODEL}@majority:n=2", "messages": MESSAGES, "temperature": None, "logprobs": False, "n": 1, "max_tokens": None})
    assert ok.status_code == 200, "null is the key's absence; logprobs false and n 1 ask for nothing"


# --- upstreams --------------------------------------------------------------------------------------------


def test_a_failing_upstream_is_retried_on_the_other(fakes, gateway):
    a, b, url_a, url_b = fakes
    a.fail = True
    gw = gateway(url_a, url_b)
    r = client(gw).chat.completions.create(model=f"{MODEL}@majority:n=4", messages=MESSAGES)
    assert r.model_extra["tts"]["answer"] == "7" and r.model_extra["tts"]["upstream"] == url_b
    assert len(a.raw) == 1 and len(b.raw) == 1, "one failed attempt, one answer: nothing answered twice"
    assert "tts_serve_retries_total 1" in httpx.get(gw + "/metrics").text


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError])
@pytest.mark.parametrize("model", [f"{MODEL}@majority:n=2", MODEL])
def test_a_stale_keepalive_connection_is_sent_once_more_to_the_same_upstream(gateway, error, model):
    up = Scripted(error)
    gw = gateway(Scripted.URL, transport=up.transport)
    r = client(gw).chat.completions.create(model=model, messages=MESSAGES)
    assert r.choices[0].message.content == "Answer: 7" and up.posts == 2
    assert metric(gw, f'tts_serve_upstream_healthy{{upstream="{Scripted.URL}"}} 1') and metric(gw, "tts_serve_retries_total 0")


@pytest.mark.parametrize("script, status, healthy", [((httpx.ConnectTimeout,), 502, 0), ((httpx.ConnectError,), 502, 0),
                                                     ((httpx.ReadError, httpx.RemoteProtocolError), 502, 0), ((httpx.ReadTimeout,), 504, 1)])
@pytest.mark.parametrize("model", [f"{MODEL}@majority:n=2", MODEL])
def test_an_upstream_that_cannot_answer_is_named_and_only_a_dead_one_leaves_rotation(gateway, script, status, healthy, model):
    up = Scripted(*script)
    gw = gateway(Scripted.URL, transport=up.transport)
    r = post(gw, {"model": model, "messages": MESSAGES})
    assert r.status_code == status and Scripted.URL in r.json()["error"]["message"], r.text
    assert up.posts == len(script) and metric(gw, f'tts_serve_upstream_healthy{{upstream="{Scripted.URL}"}} {healthy}')


@pytest.mark.parametrize("model", [f"{MODEL}@majority:n=2", MODEL])
def test_with_no_upstream_in_rotation_the_others_are_tried_before_a_502(fakes, gateway, model):
    a, _, url_a, _ = fakes
    a.down = True  # its health check fails, its completions do not: the health state is stale
    gw = gateway(url_a, health_interval=60)
    assert metric(gw, f'tts_serve_upstream_healthy{{upstream="{url_a}"}} 0')
    r = client(gw).chat.completions.create(model=model, messages=MESSAGES)
    assert r.choices[0].message.content == "Answer: 7" and len(a.raw) == 1


def test_all_upstreams_down_is_a_502_naming_them(gateway):
    dead = [dead_url(), dead_url()]
    gw = gateway(*dead)
    with pytest.raises(openai.InternalServerError) as err:
        client(gw).chat.completions.create(model=f"{MODEL}@majority:n=4", messages=MESSAGES)
    assert err.value.status_code == 502 and all(u in str(err.value) for u in dead)
    with pytest.raises(openai.InternalServerError) as err:
        client(gw).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert err.value.status_code == 502 and all(u in str(err.value) for u in dead)
    with httpx.stream("POST", gw + "/v1/chat/completions", json={"model": f"{MODEL}@majority:n=4", "messages": MESSAGES, "stream": True}) as r:
        assert r.status_code == 502 and all(u in r.read().decode() for u in dead), "a streamed call that fails at once still gets its status"
    assert httpx.get(gw + "/health").status_code == 503


@pytest.mark.parametrize("model", [f"{MODEL}@majority:n=2", MODEL])
def test_an_upstream_that_times_out_is_a_504_naming_it(fakes, gateway, model):
    a, _, url_a, _ = fakes
    a.hang = True
    gw = gateway(url_a, timeout=0.3)
    with pytest.raises(openai.InternalServerError) as err:
        client(gw).chat.completions.create(model=model, messages=MESSAGES)
    assert err.value.status_code == 504 and url_a in str(err.value)
    wait_for(lambda: a.closed == 1 and a.active == 0, what="the timed-out request to be closed")


def test_health_check_takes_an_upstream_out_and_back(fakes, gateway):
    a, b, url_a, url_b = fakes
    gw = gateway(url_a, url_b, health_interval=0.1)
    a.down = True
    wait_for(lambda: 'tts_serve_upstream_healthy{upstream="%s"} 0' % url_a in httpx.get(gw + "/metrics").text, what="upstream a out")
    client(gw).chat.completions.create(model=f"{MODEL}@majority:n=2", messages=MESSAGES)
    assert not a.raw and len(b.raw) == 1
    a.down = False
    wait_for(lambda: 'tts_serve_upstream_healthy{upstream="%s"} 1' % url_a in httpx.get(gw + "/metrics").text, what="upstream a back")


def _abandoned_call(url: str, body: dict[str, Any], after: float) -> None:
    """A client that gives up after ``after`` seconds and closes its connection."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=after)


@pytest.mark.parametrize("model, requests", [(f"{MODEL}@majority:n=20", 2), (MODEL, 1)])
def test_client_disconnect_closes_every_upstream_request(fakes, gateway, model, requests):
    a, _, url_a, _ = fakes
    a.hang = True
    gw = gateway(url_a)
    caller = threading.Thread(target=_abandoned_call, args=(gw, {"model": model, "messages": MESSAGES}, 0.5))
    caller.start()
    wait_for(lambda: a.active == requests, what=f"{requests} upstream requests in flight")
    caller.join()
    wait_for(lambda: a.closed == requests and a.active == 0, what="the upstream to see its requests closed")
    wait_for(lambda: f'tts_serve_upstream_outstanding{{upstream="{url_a}"}} 0' in httpx.get(gw + "/metrics").text, what="outstanding at 0")
    strategy = "majority" if "@" in model else "none"
    wait_for(lambda: metric(gw, f'tts_serve_calls_total{{strategy="{strategy}",code="499"}} 1'), what="the call counted as left by its client")
    assert 'code="200"' not in httpx.get(gw + "/metrics").text


def test_a_streamed_call_that_fails_after_its_200_ends_with_one_error_event(fakes, gateway):
    a, _, url_a, _ = fakes
    a.refuse_after = 1  # DeepConf's warmup is answered, its next wave refused
    gw = gateway(url_a, keepalive=0.05)
    body = {"model": f"{MODEL}@deepconf:8,warmup=4,adaptive=false", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gw + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith((":", "data: ")) for x in lines), lines
    data = [x[len("data: "):] for x in lines if x.startswith("data: ")]
    assert len(data) == 2 and data[1] == "[DONE]", lines
    error = json.loads(data[0])["error"]
    assert error["message"] == "the fake engine refused\nthis request" and error["type"] == "BadRequestError"
    text = httpx.get(gw + "/metrics").text
    assert 'tts_serve_calls_total{strategy="deepconf",code="400"} 1' in text and 'code="200"' not in text, text


@pytest.mark.parametrize("n, weight", [(10**6, 32), (-5, 1), ("two", 1), (2.5, 1)])
def test_pass_through_n_goes_as_sent_and_weighs_at_most_the_largest_call(fakes, gateway, n, weight):
    a, _, url_a, _ = fakes
    a.hang = True
    gw = gateway(url_a, max_samples=32)
    caller = threading.Thread(target=_abandoned_call, args=(gw, {"model": MODEL, "messages": MESSAGES, "n": n}, 0.4))
    caller.start()
    wait_for(lambda: a.active == 1, what="the call to reach the upstream")
    assert metric(gw, f'tts_serve_upstream_outstanding{{upstream="{url_a}"}} {weight}')
    caller.join()
    assert a.bodies[0]["n"] == n, "the body went as sent"
    wait_for(lambda: metric(gw, f'tts_serve_upstream_outstanding{{upstream="{url_a}"}} 0'), what="outstanding back at 0")


def test_streamed_call_keeps_alive_then_a_disconnect_closes_it(fakes, gateway):
    a, _, url_a, _ = fakes
    a.hang = True
    gw = gateway(url_a, keepalive=0.1)
    body = {"model": f"{MODEL}@majority:n=4", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gw + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == ": 0/4 samples"
        wait_for(lambda: a.active == 1, what="the upstream request")
    wait_for(lambda: a.closed == 1 and a.active == 0, what="the upstream to see its request closed")


# --- models and metrics -----------------------------------------------------------------------------------


def test_models_lists_upstream_models_and_strategy_aliases(fakes, gateway):
    _, _, url_a, url_b = fakes
    gw = gateway(url_a, url_b)
    ids = [m.id for m in client(gw).models.list()]
    assert ids[0] == MODEL and ids.count(MODEL) == 1
    assert f"{MODEL}@majority:n=8" in ids and f"{MODEL}@short-m:m=1,k=8" in ids


def test_metrics_count_calls_samples_tokens_and_stops(fakes, gateway):
    _, _, url_a, _ = fakes
    gw = gateway(url_a)
    c = client(gw)
    c.chat.completions.create(model=f"{MODEL}@short-m:m=2,k=6", messages=MESSAGES)
    c.chat.completions.create(model=MODEL, messages=MESSAGES)
    text = httpx.get(gw + "/metrics").text
    for line in ('tts_serve_calls_total{strategy="short-m",code="200"} 1', 'tts_serve_calls_total{strategy="none",code="200"} 1',
                 'tts_serve_samples_total{strategy="short-m"} 6', 'tts_serve_stopped_samples_total{strategy="short-m"} 4',
                 f'tts_serve_tokens_total{{strategy="short-m",kind="completion"}} {sum(range(4, 10))}',
                 'tts_serve_call_seconds_count{strategy="short-m"} 1', f'tts_serve_upstream_healthy{{upstream="{url_a}"}} 1'):
        assert line in text, f"{line!r} not in /metrics:\n{text}"


def test_serve_is_a_tts_subcommand():
    from tts_plugins.client.cli import parser
    from tts_plugins.client.serve import config

    a = parser().parse_args(["serve", "--upstream", "http://127.0.0.1:8000", "--max-samples", "8", "--allow-reward", SLOW_REWARD,
                             "--allow-reward", "pkg.prm:score", "--upstream-api-key", "up-key"])
    assert a.command == "serve" and a.upstream == ["http://127.0.0.1:8000"] and a.max_samples == 8
    c = config(a)
    assert c.allow_rewards == (SLOW_REWARD, "pkg.prm:score") and c.upstream_api_key == "up-key" and c.api_key is None
