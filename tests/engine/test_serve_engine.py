"""``tts serve`` end to end: the gateway as a user starts it (``tts serve --upstream URL``, the installed package),
in front of a real vLLM or SGLang server running the trained tiny reasoner, driven by the stock ``openai`` client and
by ``curl``.

Where the simulation simplifies: the failover test's second upstream is a TCP forwarder to the same engine (this
machine runs one engine at a time), stopped mid-run; the gateway sees two upstreams and loses one.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tts_plugins.client import aggregate
from tts_plugins.models import arith

from harness import free_port

pytestmark = pytest.mark.engine

EXTRACT = "tts_plugins.models.arith:extract_answer"
PRM = "tts_plugins.models.arith:step_reward"
QUESTIONS = [p.question for p in arith.held_out(8, steps=None)]


class Gateway:
    """``tts serve`` in a subprocess (cwd outside the checkout: the installed package runs)."""

    def __init__(self, *upstreams: str, args: tuple[str, ...] = (), healthy: bool = True) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tempfile.mkstemp(prefix="tts-serve-", suffix=".log")[1]
        cmd = [sys.executable, "-m", "tts_plugins.client.cli", "serve", "--port", str(self.port), "--extract", EXTRACT,
               "--health-interval", "0.5", *[a for u in upstreams for a in ("--upstream", u)], *args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tts serve exited:\n{self.log()}"
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.base + "/health", timeout=2).status_code in ((200,) if healthy else (200, 503)):
                    return
            time.sleep(0.2)
        raise AssertionError(f"tts serve did not start:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=kw.pop("timeout", 300))

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="module")
def upstream(engines):
    return engines.deployed()  # the trained reasoner with reasoning and tool parsers (shared with the deploy and bench tests)


@pytest.fixture(scope="module")
def gateway(upstream):
    gw = Gateway(upstream.base, args=("--max-samples", "16", "--allow-reward", PRM))
    yield gw
    gw.close()


def _chat(gw_or_srv, model, question, **kw):
    return gw_or_srv.client().chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def _check_tts(r, n=None):
    """A strategy answer: one choice, a tts object whose samples add up to usage, and the voted answer in the choice."""
    body = r.model_dump() if hasattr(r, "model_dump") else r
    tts = body["tts"]
    assert len(body["choices"]) == 1
    samples = tts["samples"]
    if n is not None:
        assert len(samples) == n, tts
    assert sum(s["tokens"] for s in samples) == body["usage"]["completion_tokens"], (tts, body["usage"])
    assert sum(tts["votes"].values()) == sum(s["answer"] is not None for s in samples)
    assert tts["stopped"] == sum(s["stopped"] for s in samples)
    choice = body["choices"][0]
    if "message" in choice:  # the answer line is in the content, or in the reasoning when the parser kept it all there
        msg = choice["message"]
        content = next((t for t in (msg.get("content"), msg.get("reasoning_content"), msg.get("reasoning"))
                        if t and arith.extract_answer(t) is not None), msg.get("content") or "")
    else:
        content = choice["text"]
    if tts["answer"] is not None:
        assert aggregate.same_answer(str(arith.extract_answer(content)), str(tts["answer"])), (content, tts["answer"])
    return tts


def test_a_plain_model_is_passed_through_untouched(upstream, gateway):
    """Greedy: the gateway's answer is the engine's, streaming and not; a tts_* key reaches the engine; the engine's
    400 comes back as a 400."""
    q = QUESTIONS[0]
    direct = _chat(upstream, upstream.model, q, max_tokens=120, temperature=0)
    via = _chat(gateway, upstream.model, q, max_tokens=120, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content and via.usage.completion_tokens == direct.usage.completion_tokens
    assert not hasattr(via, "tts") or getattr(via, "tts", None) is None
    stream = _chat(gateway, upstream.model, q, max_tokens=120, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == direct.choices[0].message.content
    field = {"vllm": "vllm_xargs", "sglang": "custom_params"}[upstream.engine]
    capped = _chat(gateway, upstream.model, q, max_tokens=120, temperature=0, extra_body={field: {"tts_think_max": 4}})
    assert capped.usage.completion_tokens < direct.usage.completion_tokens  # the cap acted in the engine
    bad = requests.post(gateway.base + "/v1/chat/completions", timeout=60, json={
        "model": upstream.model, "messages": [{"role": "user", "content": q}], "max_tokens": 8, field: {"tts_think_max": -1}})
    assert bad.status_code == 400 and "tts_think_max" in bad.text


@pytest.mark.parametrize("spec, n", [("majority:n=4", 4), ("short-m:m=1,k=4", 4), (f"best-of-n:n=4,reward={PRM}", 4),
                                     ("deepconf:8,warmup=4,window=16", None), ("carbon:n=4", 4)])
def test_each_strategy_family_answers_with_a_valid_tts_object(upstream, gateway, spec, n):
    r = _chat(gateway, f"{upstream.model}@{spec}", QUESTIONS[1], max_tokens=200, seed=3)
    tts = _check_tts(r, n)
    assert r.model == f"{upstream.model}@{spec}" and tts["strategy"] == spec
    if spec.startswith("deepconf"):
        assert 4 <= len(tts["samples"]) <= 8


def test_the_engine_stops_the_losers_of_short_m_behind_the_gateway(upstream, gateway):
    """short-1@4 through the gateway: the in-engine group stop ends the members that had not finished when the first
    closed its thinking, and tts reports them; majority@4 on the same samples runs every member to its end."""
    stopped = short = full = 0
    for i, q in enumerate(QUESTIONS[:4]):
        s = _check_tts(_chat(gateway, f"{upstream.model}@short-m:m=1,k=4", q, max_tokens=200, seed=i), 4)
        m = _check_tts(_chat(gateway, f"{upstream.model}@majority:n=4,top_p=0.95", q, max_tokens=200, seed=i), 4)
        stopped += s["stopped"]
        short += sum(x["tokens"] for x in s["samples"])
        full += sum(x["tokens"] for x in m["samples"])
        assert m["stopped"] == 0
    assert stopped > 0 and short < full, (stopped, short, full)


def test_streaming_a_strategy_sends_progress_then_the_answer_with_usage_and_tts(upstream, gateway):
    body = {"model": f"{upstream.model}@majority:n=6", "messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": 200,
            "stream": True, "seed": 5}
    comments, chunks = [], []
    with requests.post(gateway.base + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert any(re.fullmatch(r": \d+/6 samples", c) for c in comments), comments
    last = chunks[-1]
    assert last["choices"] == [] and "usage" in last and "tts" in last
    message = {key: "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])
               for key in ("content", "reasoning_content", "reasoning")}
    tts = _check_tts({"choices": [{"message": message}], "usage": last["usage"], "tts": last["tts"]}, 6)
    assert tts["strategy"] == "majority:n=6"
    # the stock client reads the same stream
    seen = [c for c in _chat(gateway, f"{upstream.model}@majority:n=6", QUESTIONS[2], max_tokens=200, stream=True, seed=5)]
    assert seen[-1].choices == [] and seen[-1].model_extra["tts"]["strategy"] == "majority:n=6"


def test_curl_as_a_third_party_client(upstream, gateway):
    """A tool that knows nothing of the project: curl, with the strategy in the body's tts_strategy key."""
    body = json.dumps({"model": upstream.model, "tts_strategy": "majority:n=3", "max_tokens": 200,
                       "messages": [{"role": "user", "content": QUESTIONS[3]}]})
    out = subprocess.run(["curl", "-sS", "--fail-with-body", gateway.base + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_tts(json.loads(out.stdout), 3)
    models = json.loads(subprocess.run(["curl", "-sS", gateway.base + "/v1/models"], capture_output=True, text=True, timeout=60).stdout)
    ids = [m["id"] for m in models["data"]]
    assert upstream.model in ids and f"{upstream.model}@short-m:m=1,k=8" in ids


def test_a_hundred_concurrent_calls_with_a_mix_of_strategies_are_all_answered(upstream, gateway):
    specs = ["", "@majority:n=2", "@short-m:m=1,k=3", "@best-of-n:n=2", "@majority:n=3,top_p=0.95"]

    def one(i):
        spec = specs[i % len(specs)]
        r = _chat(gateway, upstream.model + spec, QUESTIONS[i % len(QUESTIONS)], max_tokens=32, seed=i,
                  **({} if spec else {"temperature": 0}))
        if spec:
            _check_tts(r, int(re.search(r"[nk]=(\d+)", spec).group(1)))
        else:  # 32 tokens may end inside the thinking block: the parser then gives reasoning and no content
            m = r.choices[0].message
            assert r.choices[0].finish_reason in ("stop", "length") and (m.content or (m.model_extra or {}).get("reasoning")
                                                                         or (m.model_extra or {}).get("reasoning_content"))
        return spec

    with ThreadPoolExecutor(100) as pool:
        done = list(pool.map(one, range(100)))
    assert len(done) == 100
    metrics = requests.get(gateway.base + "/metrics", timeout=30).text
    assert re.search(r'tts_serve_calls_total\{[^}]*strategy="majority"[^}]*\} \d+', metrics), metrics[:2000]


LOAD_KEYS = ("num_running_reqs", "num_waiting_reqs", "num_queue_reqs")


def _running(srv) -> float:
    """Requests the engine is running or has queued: vLLM's Prometheus gauges, SGLang's scheduler loads (/v1/loads,
    asked of the scheduler, where its gauges are published only every few steps)."""
    if srv.engine == "vllm":
        text = requests.get(srv.base + "/metrics", timeout=30).text
        names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names))

    def total(x) -> float:
        if isinstance(x, dict):
            return sum(float(v) if k in LOAD_KEYS and isinstance(v, (int, float)) else total(v) for k, v in x.items())
        return sum(total(v) for v in x) if isinstance(x, list) else 0.0

    loads = requests.get(srv.base + "/v1/loads", timeout=30).json()
    assert any(k in json.dumps(loads) for k in LOAD_KEYS), loads
    return total(loads)


def _generated(srv) -> float | None:
    """Tokens the engine generated so far (vLLM's ``vllm:generation_tokens_total``); None where not published."""
    if srv.engine != "vllm":
        return None
    text = requests.get(srv.base + "/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:generation_tokens_total"))


def test_a_client_that_disconnects_aborts_every_upstream_request_of_its_call(upstream):
    """A client (curl, which hangs up by itself after 3 s) streams a strategy call of 64 samples of 950 tokens with no
    EOS (four upstream requests of 16, four times what the engine runs at once: half a minute of work or more). Soon
    after it leaves, the engine runs nothing, the gateway counts the call as 499, and the engine generated far fewer
    than the 64 x 950 tokens asked for (vLLM counts them), so the gateway aborted every upstream request of the call.
    vLLM aborts at once; SGLang notices a closed connection of a request that does not stream every 4 s
    (SGLANG_REQUEST_STATE_WAIT_TIMEOUT), and is checked to have run the call before its client left.

    The client leaves on its own clock, and the call outlasts any stall: on a loaded machine the test process and the
    gateway can stall for seconds while the engine runs (seen after the hundred-call test), longer than a call of
    16 samples lasts on vLLM."""
    n, max_tokens, stay = 64, 950, 3
    gw = Gateway(upstream.base, args=("--max-samples", str(n), "--max-n", "16"))
    try:
        body = json.dumps({"model": f"{upstream.model}@majority:n={n}", "messages": [{"role": "user", "content": QUESTIONS[4]}],
                           "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
        assert _running(upstream) == 0
        before = _generated(upstream)
        client = subprocess.Popen(["curl", "-sN", "--max-time", str(stay), gw.base + "/v1/chat/completions",
                                   "-H", "Content-Type: application/json", "-d", body], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen = 0.0
        while client.poll() is None:
            seen = max(seen, _running(upstream))
            time.sleep(0.05)
        left = time.monotonic()
        out = client.stdout.read().decode(errors="replace")
        assert client.returncode == 28, f"curl should have timed out (28) mid-call, got {client.returncode}: {out[-2000:]}"
        assert "data:" not in out, f"the call should still have been sampling when its client left: {out[:2000]}"
        while _running(upstream) > 0 and time.monotonic() < left + 15:
            time.sleep(0.1)
        assert _running(upstream) == 0, "the engine still runs the samples of a call whose client left"
        idle = time.monotonic() - left
        closed = 'tts_serve_calls_total{strategy="majority",code="499"}'
        wait = time.monotonic() + 10
        while not _metric(gw, closed) and time.monotonic() < wait:
            time.sleep(0.1)
        assert _metric(gw, closed), f"the gateway should count the call as left by its client:\n{gw.log()}"
        if before is not None:
            ran = _generated(upstream) - before
            assert 0 < ran < n * max_tokens / 2, f"the engine generated {ran:g} of the call's {n * max_tokens} tokens: it was not aborted"
            print(f"\n[{upstream.engine}] the engine ran nothing {idle:.1f}s after the client left, having generated {ran:g} "
                  f"of {n * max_tokens} tokens")
        else:
            assert seen > 0, "the engine was never seen running the call"
            print(f"\n[{upstream.engine}] the engine ran nothing {idle:.1f}s after the client left (it ran {seen:g} requests)")
    finally:
        gw.close()


def _metric(gw, prefix: str) -> bool:
    return any(line.startswith(prefix + " ") for line in requests.get(gw.base + "/metrics", timeout=30).text.splitlines())


class Forwarder:
    """A TCP forwarder to an upstream: a second route to the same engine that the test can cut."""

    def __init__(self, target_port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.target = target_port
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.stopped:  # accepted while being stopped: the route is cut, this connection too
                client.close()
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            if self.stopped:  # stop() may have closed the others before these two were listed
                for c in (client, server):
                    c.close()
                return
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (close alone may not)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
                c.close()


def test_two_upstreams_one_stopped_mid_run_and_every_call_is_answered(upstream):
    fwd = Forwarder(int(upstream.base.rsplit(":", 1)[1]))
    gw = Gateway(upstream.base, fwd.base)
    try:
        def one(i, **kw):
            return _chat(gw, f"{upstream.model}@majority:n=3", QUESTIONS[i % len(QUESTIONS)], max_tokens=100, seed=i, **kw)

        with ThreadPoolExecutor(12) as pool:
            # long samples (no EOS), so that calls are in flight through the forwarder when it is cut
            futures = [pool.submit(one, i, extra_body={"ignore_eos": True}) for i in range(16)]
            deadline = time.monotonic() + 30
            while len(fwd.conns) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            fwd.stop()
            answers = [f.result() for f in futures]
        routes = [a.tts["upstream"] for a in answers]
        for a in answers:
            _check_tts(a, 3)
        assert set(routes) <= {upstream.base, fwd.base}
        time.sleep(1.5)  # the health check has taken the cut route out
        after = [one(i).tts["upstream"] for i in range(4)]
        assert set(after) == {upstream.base}, after
        metrics = requests.get(gw.base + "/metrics", timeout=30).text
        retried = sum(float(x) for x in re.findall(r"^tts_serve_retries_total(?:\{[^}]*\})? (\S+)$", metrics, re.MULTILINE))
        assert retried >= 1, "no call was in flight on the cut route: the test did not test a failover"
        assert re.search(r'tts_serve_upstream_healthy\{upstream="' + re.escape(fwd.base) + r'"\} 0', metrics), metrics[-1500:]
    finally:
        gw.close()
        fwd.stop()


def test_bad_specs_and_limits_are_refused_with_clear_messages(upstream, gateway):
    def post(gw, model, **kw):
        return requests.post(gw.base + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 16, **kw})

    r = post(gateway, f"{upstream.model}@majority:n=zero")
    assert r.status_code == 400 and "majority:n=zero" in r.text and "expected" in r.text, r.text
    r = post(gateway, f"{upstream.model}@no-such-method")
    assert r.status_code == 400 and "no-such-method" in r.text, r.text
    r = post(gateway, f"{upstream.model}@majority:n=64")
    assert r.status_code == 400 and "16" in r.text and "max-samples" in r.text, r.text
    r = post(gateway, upstream.model, tts_strategy=7)
    assert r.status_code == 400 and "tts_strategy" in r.text, r.text
    # one call at a time and no queue: a second call while one runs gets a 429; a gateway key is enforced
    gw = Gateway(upstream.base, args=("--max-concurrency", "1", "--max-queue", "0", "--api-key", "secret"))
    try:
        assert requests.post(gw.base + "/v1/chat/completions", json={"model": upstream.model, "messages": []}, timeout=30).status_code == 401
        slow = {"model": f"{upstream.model}@majority:n=4", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 600,
                "ignore_eos": True}
        headers = {"Authorization": "Bearer secret"}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(requests.post, gw.base + "/v1/chat/completions", json=slow, headers=headers, timeout=300)
            deadline = time.monotonic() + 30
            while "tts_serve_calls_in_flight 1" not in requests.get(gw.base + "/metrics", timeout=30).text and time.monotonic() < deadline:
                time.sleep(0.05)
            second = requests.post(gw.base + "/v1/chat/completions", json=slow, headers=headers, timeout=300)
            assert second.status_code == 429, second.text
            assert first.result().status_code == 200
        down = Gateway("http://127.0.0.1:9", args=("--health-interval", "30"), healthy=False)  # nothing listens on port 9
        try:
            r = post(down, f"{upstream.model}@majority:n=2")
            assert r.status_code == 502 and "127.0.0.1:9" in r.text, r.text
        finally:
            down.close()
    finally:
        gw.close()
