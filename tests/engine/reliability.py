"""Reliability checks against a real server: fuzzed parameters, load, soak, fault isolation.

Shared by ``tests/engine/test_reliability.py`` (CI sizes) and
``benchmarks/reliability.py`` (full sizes, prints the figures). Everything
talks HTTP to a server on 127.0.0.1 that has the deliberately faulty
third-party plugin (``tests/plugins/faulty``) installed through the
``tts_plugins`` entry-point group and ``TTS_PLUGINS_DEBUG_FILE`` set.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests
from hypothesis import strategies as st

from tts_plugins import debug
from tts_plugins.manager import build_registry, plugin_manager

FAULTY_DIR = Path(__file__).resolve().parent.parent / "plugins" / "faulty"
BROKEN_DIR = FAULTY_DIR.parent / "broken"  # plugins the server must leave out; only ever on a server's path
FIELD = {"vllm": "vllm_xargs", "sglang": "custom_params"}
QUESTIONS = ["What is 2 + 3?", "What is 17 * 4 - 9?", "What is 120 + 5 * 3?", "Name a prime above 10.", "Is 91 prime?"]


EFFORT_MAP = "low=3,medium=5,high=0"  # the shared server's reasoning_effort budgets (test_think_engine)


def server_env(debug_prefix: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join((str(FAULTY_DIR), str(BROKEN_DIR))), "TTS_PLUGINS_DEBUG_FILE": debug_prefix,
            "TTS_PLUGINS_REASONING_EFFORT": EFFORT_MAP}


def oracle():
    """The registry the server runs (built-ins plus the faulty plugin), for the expected verdicts."""
    import sys

    if str(FAULTY_DIR) not in sys.path:
        sys.path.insert(0, str(FAULTY_DIR))
    import tts_faulty_plugin

    return build_registry(plugin_manager(load_entry_points=False, extra_plugins=[tts_faulty_plugin]))


# --- fuzzed parameters ---------------------------------------------------------

INT_KEYS = {"tts_think_max": (0, None), "tts_think_min": (0, None), "tts_think_extend": (0, None), "tts_group_stop_after": (1, 100_000),
            "tts_trim_converge": (0, 1000), "tts_trim_max_thoughts": (0, 100_000), "tts_trim_min_tokens": (0, None), "tts_trim_ngram": (0, 1024),
            "tts_trim_repeats": (2, 1000), "tts_moi_topk": (1, 256), "tts_roe_roster_size": (2, 64), "tts_think_grace": (0, 1024)}
TEXT_KEYS = ["tts_think_warn",
             "tts_think_wait", "tts_think_conclusion", "tts_no_think_text", "tts_group_stop_text", "tts_trim_conclusion", "tts_group",
             "tts_trim_verifier", "tts_roe_roster"]
BOOL_KEYS = ["tts_no_think", "tts_trim", "tts_think_per_block"]
FLOAT_KEYS = {"tts_think_warn_at": (0.0, 1.0), "tts_moi_beta": (0.0, 1e6), "tts_carbon_temperature": (1e-3, 1e3)}
NUMBER_LIST_KEYS = ["tts_temperature_ladder", "tts_carbon_bias_ids", "tts_carbon_bias_values", "tts_roe_tau_layers"]
NONNEG_FLOAT_KEYS = {"tts_roe_tau": 100.0}  # 0 is valid (the model's own routing)
CHOICE_KEYS = {"tts_group_finish": ("think", "eos")}
LIST_KEYS = ["tts_trim_markers"]

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.lists(st.integers(-5, 5), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
unicode_text = st.text(st.characters(codec="utf-8"), max_size=60)


@st.composite
def bad_value(draw, key: str) -> tuple[Any, bool]:
    """A value for ``key`` and whether it is certainly invalid by construction."""
    if key in INT_KEYS:
        lo, hi = INT_KEYS[key]
        return draw(st.one_of(
            st.integers(lo - 10**6, lo - 1).map(lambda v: (v, True)),
            st.integers(2**31, 2**64).map(lambda v: (v, True)),
            st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.5, "7", [1], {"a": 1}, None]).map(lambda v: (v, True)),
            st.integers(lo, lo + 3).map(lambda v: (v, False)),
            *([st.just((hi, False)), st.just((hi + 1, True))] if hi is not None else []),
        ))
    if key in FLOAT_KEYS:
        lo, hi = FLOAT_KEYS[key]
        return draw(st.one_of(
            st.sampled_from([0, 0.0, -1.0, float("nan"), float("inf"), 1e300, "1.0", True, [1.0]]).map(lambda v: (v, True)),
            st.floats(1e-6, 10).map(lambda v: (v, False)),
        ))
    if key in NONNEG_FLOAT_KEYS:
        return draw(st.one_of(
            st.sampled_from([-1.0, float("nan"), float("inf"), 1e300, NONNEG_FLOAT_KEYS[key] * 1.01, "1.0", True, [1.0]]).map(lambda v: (v, True)),
            st.floats(0, NONNEG_FLOAT_KEYS[key]).map(lambda v: (v, False)),
        ))
    if key in BOOL_KEYS:
        return draw(st.one_of(st.sampled_from([2, -1, "maybe", 0.5, [True], None]).map(lambda v: (v, True)),
                              st.sampled_from([True, False, 0, 1, "true"]).map(lambda v: (v, False))))
    if key in CHOICE_KEYS:
        return draw(st.one_of(st.text(max_size=8).filter(lambda t: t not in CHOICE_KEYS[key]).map(lambda v: (v, True)),
                              st.sampled_from(CHOICE_KEYS[key]).map(lambda v: (v, False))))
    if key in NUMBER_LIST_KEYS:
        return draw(st.one_of(
            st.sampled_from(["0.5", 7, None, [True], [[1]], [{"a": 1}], ["1"]]).map(lambda v: (v, True)),
            st.lists(st.floats(-3, 3), min_size=1, max_size=6).map(lambda v: (v, False)),  # the oracle decides
            st.lists(st.integers(-3, 600), min_size=0, max_size=6).map(lambda v: (v, False)),
            st.lists(st.just(0.5), min_size=1025, max_size=1100).map(lambda v: (v, True)),  # over every list key's limit
        ))
    if key in LIST_KEYS:
        return draw(st.one_of(
            st.lists(st.text(min_size=1, max_size=5), min_size=17, max_size=5000).map(lambda v: (v, True)),
            st.sampled_from([[], [1, 2], [""], None, 7]).map(lambda v: (v, True)),  # (one string is one marker: valid)
            st.lists(unicode_text.filter(lambda t: t and "\x00" not in t), min_size=1, max_size=4).map(lambda v: (v, False)),
        ))
    # text keys
    return draw(st.one_of(
        st.integers().map(lambda v: (v, True)),
        st.just(("x" * 5000, True)),
        st.just(("a\x00b", True)),
        st.lists(st.text(max_size=3), max_size=3).map(lambda v: (v, True)),
        unicode_text.map(lambda v: (v, False)),  # borderline: the oracle decides (e.g. empty group id)
    ))


ALL_KEYS = [*INT_KEYS, *TEXT_KEYS, *BOOL_KEYS, *FLOAT_KEYS, *CHOICE_KEYS, *LIST_KEYS, *NUMBER_LIST_KEYS, *NONNEG_FLOAT_KEYS]


@st.composite
def param_sets(draw) -> tuple[dict[str, Any], str | None]:
    """A ``tts_*`` parameter set and the key that certainly makes it invalid (None: the oracle decides)."""
    params: dict[str, Any] = {}
    certain: str | None = None
    for key in draw(st.lists(st.sampled_from(ALL_KEYS), min_size=1, max_size=4, unique=True)):
        value, bad = draw(bad_value(key))
        params[key] = value
        if bad and certain is None:
            certain = key
    if "tts_roe_roster" in params and "tts_roe_roster_size" in params:
        # a valid named roster would wait for members that never come (tested on its own): keep one of the two,
        # so the set is refused (a name without a size; a size without a name on a request with n = 1)
        del params["tts_roe_roster"]
        certain = None if certain == "tts_roe_roster" else certain
    if draw(st.integers(0, 9)) == 0:  # an unknown key
        unknown = "tts_" + draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        if unknown not in ALL_KEYS and unknown != "tts_faulty":
            params[unknown] = draw(junk)
            certain = certain or unknown
    return params, certain


def first_key(message: str) -> str | None:
    found = re.search(r"tts_[A-Za-z0-9_]+", message)
    return found.group(0) if found else None


@dataclass
class FuzzReport:
    tried: int = 0
    rejected: int = 0  # 4xx
    accepted: int = 0  # 200
    non_json: int = 0  # sent as non-standard JSON (NaN/inf); any 4xx is accepted for those
    engine_rejected: int = 0  # refused by the engine's own checks before the plugin (vLLM: integers beyond int64)
    failures: list[str] = field(default_factory=list)
    crashes: int = 0


def _temperature(params: dict[str, Any]) -> float:
    # a ladder replaces the temperature of a sampled request (a greedy one is refused: tested on its own)
    return 0.7 if "tts_temperature_ladder" in params else 0.0


def _body(engine: str, model: str, params: dict[str, Any]) -> str:
    body = {"model": model, "prompt": "What is 1 + 1?", "max_tokens": 3, "temperature": _temperature(params), FIELD[engine]: params}
    return json.dumps(body, allow_nan=True)


def transport(engine: str, text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The parameters the server's own request model hands to the plugin (vLLM's pydantic model coerces
    some values, e.g. ``true`` to ``1``), or the reason it rejects the body before the plugin sees it."""
    body = json.loads(text)
    if engine != "vllm":
        return body[FIELD[engine]], None
    import pydantic
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    try:
        return CompletionRequest.model_validate(body).vllm_xargs or {}, None
    except pydantic.ValidationError as exc:
        return None, str(exc)


VLLM_INT64 = "extra_args integers must be between -2**63 and 2**64 - 1"


def _has_huge_int(params: dict[str, Any]) -> bool:
    values = [x for v in params.values() for x in (v if isinstance(v, list) else [v])]
    return any(isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64 for v in values)


def fuzz_once(server: Any, registry: Any, params: dict[str, Any], certain: str | None, report: FuzzReport) -> None:
    report.tried += 1
    request = SimpleNamespace(temperature=_temperature(params), top_k=-1, top_p=1.0, min_p=0.0, n=1)
    try:
        registry.parse(params, engine=server.engine, request=request)
        if certain is not None:
            report.failures.append(f"the parser accepted a certainly bad set {params!r} (bad key {certain})")
            return
    except ValueError:
        pass
    text = _body(server.engine, server.model, params)
    non_json = any(isinstance(v, float) and not math.isfinite(v) for v in params.values())
    report.non_json += non_json
    seen, rejected_by_transport = transport(server.engine, text)
    expect_error = rejected_by_transport is not None
    if seen is not None:
        try:
            registry.parse(seen, engine=server.engine, request=request)
        except ValueError:
            expect_error = True
    r = requests.post(server.base + "/v1/completions", data=text, headers={"Content-Type": "application/json"}, timeout=120)
    named = any(k in r.text for k in params)
    if not expect_error:
        if r.status_code == 200 and r.json()["choices"]:
            report.accepted += 1
        else:
            report.failures.append(f"valid {params!r} got {r.status_code}: {r.text[:300]}")
    elif 400 <= r.status_code < 500 and (non_json or named):
        report.rejected += 1
    elif 400 <= r.status_code < 500 and VLLM_INT64 in r.text and _has_huge_int(params):
        report.rejected += 1
        report.engine_rejected += 1
    else:
        report.failures.append(f"invalid {params!r} got {r.status_code} (naming a key: {named}): {r.text[:300]}")


def check_serving(server: Any) -> bool:
    r = requests.post(server.base + "/v1/completions",
                      json={"model": server.model, "prompt": "What is 1 + 1?", "max_tokens": 3, FIELD[server.engine]: {"tts_think_max": 1}},
                      timeout=120)
    return server.alive() and r.status_code == 200 and len(r.json()["choices"]) == 1


# --- load, soak, faults ------------------------------------------------------------


def chat_prompt(tok: Any, q: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)


def random_request(rng: random.Random, i: int) -> dict[str, Any]:
    """One request of the load mix: ``{"params", "n", "temperature", "greedy"}``."""
    kind = rng.choice(["plain", "plain", "cap", "min", "no_think", "trim", "moi", "group", "faulty", "cap_moi"])
    params: dict[str, Any] = {
        "plain": {}, "cap": {"tts_think_max": rng.randint(0, 6)}, "min": {"tts_think_min": rng.randint(1, 8), "tts_think_wait": "Hmm"},
        "no_think": {"tts_no_think": True}, "trim": {"tts_trim": True, "tts_trim_ngram": 4, "tts_trim_repeats": 2},
        "moi": {"tts_moi_beta": rng.choice([0.5, 1.0, 2.0])},
        "group": {"tts_group": f"load-{i}", "tts_group_stop_after": 1, "tts_group_finish": "eos"},
        "faulty": {"tts_faulty": rng.choice(["apply", "tokens", "admit"]), "tts_think_max": rng.randint(1, 4)},
        "cap_moi": {"tts_think_max": 3, "tts_moi_beta": 1.0},
    }[kind]
    if kind == "group":
        return {"params": params, "n": 3, "temperature": 0.8, "greedy": False, "kind": kind}
    return {"params": params, "n": 1, "temperature": 0.0, "greedy": True, "kind": kind}


def complete(server: Any, prompt: str, req: dict[str, Any], max_tokens: int, timeout: float = 300) -> dict[str, Any]:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": req["temperature"], "n": req["n"],
            "skip_special_tokens": False, FIELD[server.engine]: req["params"]}
    r = requests.post(server.base + "/v1/completions", json=body, timeout=timeout)
    r.raise_for_status()
    return r.json()


def without_faulty(req: dict[str, Any]) -> dict[str, Any]:
    return {**req, "params": {k: v for k, v in req["params"].items() if k != "tts_faulty"}}


@dataclass
class LoadReport:
    sent: int = 0
    complete: int = 0
    lost: int = 0
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0


class PeakWatch:
    """Polls the debug counters in the background while a run is under way; keeps each count's peak."""

    def __init__(self, prefix: str | None, every: float = 0.05) -> None:
        import threading

        self.prefix, self.every, self.peak = prefix, every, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for k, v in debug.read(self.prefix).items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
            except (OSError, ValueError):  # a file being replaced
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> PeakWatch:
        if self.prefix:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.prefix:
            self._thread.join()


def run_load(server: Any, tok: Any, n: int, compare: int, seed: int = 0, max_tokens: int = 16, prefix: str | None = None) -> LoadReport:
    """``n`` requests at once (a thread each), then ``compare`` of the greedy ones re-sent alone."""
    rng = random.Random(seed)
    reqs = [(chat_prompt(tok, rng.choice(QUESTIONS)), random_request(rng, i)) for i in range(n)]
    report = LoadReport(sent=n)
    t0 = time.perf_counter()
    with PeakWatch(prefix) as watch, ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(complete, server, p, r, max_tokens) for p, r in reqs]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:  # lost: no complete response
                results.append(exc)
    report.seconds = time.perf_counter() - t0
    report.peak = watch.peak
    for (_prompt, req), res in zip(reqs, results):
        ok = (isinstance(res, dict) and len(res.get("choices", [])) == req["n"]
              and all(c.get("finish_reason") in ("stop", "length") and c.get("text") is not None for c in res["choices"]))
        report.complete += ok
        report.lost += not ok
    greedy = [(i, p, r) for i, (p, r) in enumerate(reqs) if r["greedy"] and isinstance(results[i], dict)]
    for i, prompt, req in rng.sample(greedy, min(compare, len(greedy))):
        # a faulty request's technique is switched off before it touches a logit: it equals the request without it
        alone = complete(server, prompt, without_faulty(req), max_tokens)
        report.compared += 1
        if alone["choices"][0]["text"] != results[i]["choices"][0]["text"]:
            report.mismatches.append(f"{req['params']}: {results[i]['choices'][0]['text']!r} != alone {alone['choices'][0]['text']!r}")
    return report


@dataclass
class SoakReport:
    sent: int = 0
    errors: int = 0
    peak: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def settle_counts(server: Any, prefix: str, tok: Any) -> dict[str, int]:
    """Counts once the server is idle (vLLM drops finished requests at its next step: send one plain request)."""
    complete(server, chat_prompt(tok, QUESTIONS[0]), {"params": {}, "n": 1, "temperature": 0.0}, 2)
    time.sleep(0.5)
    return debug.read(prefix)


def live(counts: dict[str, int]) -> dict[str, int]:
    """Counts of live per-request state (failure tallies are history, not state)."""
    return {k: v for k, v in counts.items() if not k.endswith("failures") and v}


def run_soak(server: Any, tok: Any, n: int, prefix: str, workers: int = 16, seed: int = 1,
             on_progress: Callable[[int], None] | None = None) -> SoakReport:
    prompts = [chat_prompt(tok, q) for q in QUESTIONS]
    report = SoakReport(sent=n)
    t0 = time.perf_counter()

    def one(i: int) -> bool:
        req = random_request(random.Random(seed * 100_003 + i), i)
        try:
            complete(server, prompts[i % len(prompts)], req, 2 + i % 3)
            return True
        except Exception:
            return False

    done = 0
    with PeakWatch(prefix) as watch, ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, n, 200):
            batch = list(pool.map(one, range(start, min(n, start + 200))))
            report.errors += batch.count(False)
            done += len(batch)
            if on_progress:
                on_progress(done)
    report.seconds = time.perf_counter() - t0
    report.peak = watch.peak
    report.after = settle_counts(server, prefix, tok)
    return report


def run_aborts(server: Any, tok: Any, n: int, seed: int = 2) -> int:
    """``n`` streaming requests with techniques on, each dropped by the client after its first chunk
    (the server aborts them). Returns how many streams started."""
    def one(i: int) -> int:
        req = random_request(random.Random(seed * 7919 + i), i)
        body = {"model": server.model, "prompt": chat_prompt(tok, QUESTIONS[i % len(QUESTIONS)]), "max_tokens": 900, "ignore_eos": True,
                "temperature": req["temperature"], "n": req["n"], "stream": True, FIELD[server.engine]: req["params"]}
        with requests.post(server.base + "/v1/completions", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    return 1  # leaving the block closes the connection mid-stream
        return 0

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(one, range(n)))
