"""``tts bench``'s methods as objects: the registry holds every built-in, a plugin's method registered through
``tts_register_bench_methods`` parses, runs and is summarized like a built-in, a taken name is refused, and a bad
SPEC names the method and the form it expects. No server: a fake one draws samples from the seed."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import zlib

import pytest

from tts_plugins import hookimpl
from tts_plugins.client import bench, methods
from tts_plugins.client.methods import OURS, BenchMethod, MethodSpec, Outcome, Setting
from tts_plugins.client.server import Sample
from tts_plugins.manager import plugin_manager

BUILT_IN = ("greedy", "sample", "majority", "inverse-entropy", "best-of-n", "short-m", "think-max", "think-min", "no-think", "trim", "moi",
            "carbon", "deepconf", "ladder", "roe", "roster")


class FakeServer:
    """Samples are a pure function of the seed and the sampling settings; choice i of a request is seeded seed + i."""

    def __init__(self):
        self.calls = []

    async def sample(self, prompt, *, n=1, temperature=1.0, max_tokens=256, params=None, seed=None, top_p=None, temperatures=None, **kw):
        self.calls.append({"n": n, "seed": seed, "params": dict(params or {})})
        out = []
        for i in range(n):
            h = zlib.crc32(repr((seed + i, temperatures[i] if temperatures else temperature, top_p)).encode()) % 1000
            out.append(Sample(text=f"Answer: {h % 3}", answer=str(h % 3), tokens=10 + h % 50, finish_reason="stop", token_ids=[h % 3]))
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Longest(BenchMethod):
    """A plugin's method: n samples in one request, the answer of the longest."""

    async def run(self, server, m: MethodSpec, problem, ctx) -> Outcome:
        s = m.settings
        samples = await server.sample(problem["prompt"], n=s["n"], temperature=float(s["temperature"]), top_p=float(s.get("top_p", 1.0)),
                                      max_tokens=ctx.max_tokens, seed=ctx.first_seed, params={**m.params, "tts_loud": s["loud"]})
        return Outcome(max(samples, key=lambda x: x.tokens).answer, samples, {"longest": max(x.tokens for x in samples)})

    def rules(self, s):
        return [(s["loud"] <= 3, f"loud must be <= 3, got {s['loud']!r}")]

    def summary(self, m, records):
        return {**super().summary(m, records), "longest_mean": sum(r["longest"] for r in records) / len(records)}


LONGEST = Longest("longest", "n samples, the answer of the longest", {"n": Setting(2, OURS), "temperature": Setting(0.5, OURS),
                                                                      "loud": Setting(1, OURS)}, "n", source="a test", title="longest of {n}")


class Registers:
    def __init__(self, *objects):
        self.objects = objects

    @hookimpl
    def tts_register_bench_methods(self, register):
        for obj in self.objects:
            register(obj)


def _registry(*plugins):
    return methods.registered(plugin_manager(load_entry_points=False, extra_plugins=plugins))


def test_the_registry_lists_every_built_in_method_first():
    reg = _registry(Registers(LONGEST))
    assert tuple(reg)[: len(BUILT_IN)] == BUILT_IN and tuple(methods.BUILTIN_METHODS) == BUILT_IN and "longest" in reg
    assert all(reg[name] is methods.BUILTIN_METHODS[name] for name in BUILT_IN)
    listing = bench.list_methods(reg)
    assert all(f"\n{name}" in "\n" + listing for name in (*BUILT_IN, "longest"))


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_default_says_where_it_comes_from(name):
    method = methods.BUILTIN_METHODS[name]
    assert method.help and method.settings, name
    missing = [key for key, s in method.settings.items() if not s.source.strip()]
    assert not missing, f"{name}: settings without a source: {missing}"
    assert method.positional is None or method.positional in method.settings
    m = methods.parse_spec(name, methods.BUILTIN_METHODS)  # the defaults pass the method's own checks
    assert m.settings == method.defaults and m.label.startswith(name.split("-")[0])
    control = method.control(m)
    assert control is None or methods.parse_spec(control, methods.BUILTIN_METHODS).method.plain  # a control has no technique


@pytest.mark.parametrize("name", [n for n in BUILT_IN if n not in ("carbon", "deepconf")])  # those need log-probs and reports
def test_every_built_in_runs_one_problem_on_a_fake_server(name):
    m = methods.parse_spec(name, methods.BUILTIN_METHODS)
    r = asyncio.run(bench.run_one(FakeServer(), m, {"id": "p", "prompt": "q", "answer": "1"}, seed=1, max_tokens=32, max_n=4,
                                  same=lambda x, y: x == y))
    assert r["method"] == m.label and r["samples"] == len(r["lengths"]) >= 1 and r["tokens"] == sum(r["lengths"])


def test_a_plugin_method_parses_runs_and_is_summarized():
    reg = _registry(Registers(LONGEST))
    m = bench.parse_spec("longest:3,loud=2,tts_x=1", reg)
    assert (m.method, m.label, m.settings, m.params) == (LONGEST, "longest of 3 (loud=2, tts_x=1)", {"n": 3, "temperature": 0.5, "loud": 2},
                                                         {"tts_x": 1})
    assert methods.parse_method("longest", reg) == (LONGEST, methods.parse_spec("longest", reg))
    with pytest.raises(ValueError, match=r"in spec 'longest:loud=5': loud must be <= 3, got 5"):
        bench.parse_spec("longest:loud=5", reg)
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0, got -1"):
        bench.parse_spec("longest:temperature=-1", reg)  # the common checks apply to a plugin's settings too
    assert bench.control_spec(m) == "majority:n=3,temperature=0.5,top_p=1"
    control = bench.parse_spec(bench.control_spec(m), reg)

    problems = [{"id": str(i), "prompt": f"q{i}", "answer": str(i % 3)} for i in range(6)]
    records, server = {}, FakeServer()
    for spec in (m, control):
        for p in problems:
            records[(spec.label, p["id"])] = asyncio.run(bench.run_one(server, spec, p, seed=7, max_tokens=16, max_n=2, same=lambda x, y: x == y))
    r = records[(m.label, "0")]
    assert r["samples"] == 3 and r["longest"] == max(r["lengths"])
    assert [c["params"] for c in server.calls[:1]] == [{"tts_x": 1, "tts_loud": 2}]
    # common random numbers: the plugin's samples are its control's
    assert sorted(records[(m.label, "0")]["lengths"]) == sorted(records[(control.label, "0")]["lengths"])

    s = bench.summarize([m, control], problems, records, baseline=control.label, resamples=50, controls={m.label: control.label})
    row = next(x for x in s["methods"] if x["method"] == m.label)
    assert (row["name"], row["source"], row["problems"]) == ("longest", "a test", 6) and row["pass_at_k"]["k"] == 3
    assert row["longest_mean"] == sum(records[(m.label, p["id"])]["longest"] for p in problems) / 6
    assert row["vs_control"]["against"] == control.label and f"| {m.label} |" in bench.markdown(s)


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="bench method 'greedy' is registered twice"):
        _registry(Registers(dataclasses.replace(methods.BUILTIN_METHODS["greedy"])))
    with pytest.raises(ValueError, match="bench method 'longest' is registered twice"):
        _registry(Registers(LONGEST), Registers(dataclasses.replace(LONGEST, help="another")))
    assert _registry(Registers(LONGEST), Registers(LONGEST))["longest"] is LONGEST  # the same object again is harmless
    with pytest.raises(ValueError, match="must be a tts_plugins.client.methods.BenchMethod"):
        _registry(Registers("longest"))


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "two words"}, "a bench method's name must match"),
    ({"name": "x:y"}, "a bench method's name must match"),
    ({"settings": {"n": 2}}, "setting 'n' must be a Setting"),
    ({"settings": {"tts_n": Setting(2)}}, "setting 'tts_n' must be an identifier, not label, vs or a tts_* key"),
    ({"positional": "k"}, "positional 'k' must be one of its settings"),
    ({"unused": ("label",)}, "unused must name common settings"),
])
def test_a_malformed_method_is_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(LONGEST, **kwargs)


@pytest.mark.parametrize("spec, method, form", [
    ("greedy:5", "greedy", "greedy[:key=value[,key=value...]]"),
    ("majority:n=2,3", "majority", "majority[:<n>][,key=value...]"),
    ("majority:n=4,x=1", "majority", "majority[:<n>][,key=value...]"),
    ("short-m:k=8,n=1", "short-m", "short-m[:<k>][,key=value...]"),
    ("think-max:64,budget2=3", "think-max", "think-max[:<budget>][,key=value...]"),
])
def test_a_bad_spec_names_the_method_and_the_form_it_expects(spec, method, form):
    with pytest.raises(ValueError) as e:
        methods.parse_method(spec, methods.BUILTIN_METHODS)
    text = str(e.value)
    assert repr(spec) in text and method in text and f"expected {form}" in text, text


def test_parse_method_defaults_to_every_registered_method():
    method, m = methods.parse_method("short-m:k=4")
    assert method is methods.default_methods()["short-m"] is methods.BUILTIN_METHODS["short-m"]
    assert isinstance(m, MethodSpec) and m.label == "short-1@4" and m.method is method
