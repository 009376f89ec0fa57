"""reasoning_effort as a thinking budget (tts_plugins.effort): the server's map, its rules, and start-up refusal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tts_plugins.effort import DEFAULT_EFFORT, ENV, budget_request, parse_effort_map

levels = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@given(st.dictionaries(levels, st.integers(0, 10**6), max_size=5))
def test_a_map_parses_over_the_defaults(entries):
    text = ",".join(f"{k}={v}" for k, v in entries.items())
    assert parse_effort_map(text) == {**DEFAULT_EFFORT, **entries}
    assert parse_effort_map(" " + text.replace(",", " , ") + " ,") == {**DEFAULT_EFFORT, **entries}  # spaces, a trailing comma


def test_defaults_and_an_empty_map():
    assert parse_effort_map(None) == parse_effort_map("") == DEFAULT_EFFORT
    assert DEFAULT_EFFORT["low"] == 1024 and DEFAULT_EFFORT["medium"] == 4096 and DEFAULT_EFFORT["high"] == 0


@pytest.mark.parametrize("entry", ["low", "low=", "=5", "low=-1", "low=1.5", "low=ten", "low=5=6", "1ow=5", "low=99999999999", "lo w=3"])
def test_a_bad_entry_is_named(entry):
    with pytest.raises(ValueError) as err:
        parse_effort_map(f"medium=10,{entry}")
    assert ENV in str(err.value) and repr(entry.strip()) in str(err.value) and "level=tokens" in str(err.value)


def test_budget_rules(monkeypatch):
    monkeypatch.setenv(ENV, "low=7,medium=0")
    assert budget_request("low", None) == {"tts_think_max": 7}
    assert budget_request("LOW", {"tts_group": "g"}) == {"tts_group": "g", "tts_think_max": 7}
    assert budget_request("medium", None) is None  # 0: no cap
    assert budget_request("none", None) is None  # the engines' own switch
    assert budget_request(0.5, None) is None  # SGLang's numeric effort: not a level
    assert budget_request("low", {"tts_think_max": 2}) is None  # the request's own cap wins
    assert budget_request("low", {"tts_no_think": True}) is None
    extra = {"tts_trim": True}
    budget_request("low", extra)
    assert extra == {"tts_trim": True}  # the request's own dict is not changed


def _load(engine: str, value: str) -> subprocess.CompletedProcess:
    """The engine's own plugin loader, in a fresh process, with the map in the environment."""
    code = {"vllm": "from vllm.plugins import load_general_plugins as f; f(); print('LOADED')",
            "sglang": "from sglang.srt.plugins import load_plugins as f; f(); print('LOADED')"}[engine]
    env = {**os.environ, ENV: value}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd="/")


@pytest.mark.parametrize("engine", ["vllm", pytest.param("sglang", marks=pytest.mark.sglang_only)])
def test_a_bad_map_stops_the_engine_at_start_up(engine):
    """vLLM and SGLang log and skip a plugin that raises an Exception; a malformed map must not be skipped."""
    pytest.importorskip(engine)
    bad = _load(engine, "low=1024,medium=lots")
    assert bad.returncode != 0 and "LOADED" not in bad.stdout
    assert "'medium=lots'" in bad.stderr and ENV in bad.stderr  # (a good map loads: every engine test's server runs one)
