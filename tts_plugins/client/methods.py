"""The methods ``tts bench`` measures, one object each, and the SPEC that names one with its settings.

A method SPEC is a name, an optional positional value after ``:``, and ``key=value`` settings, comma-separated:
``greedy``, ``majority:n=8,temperature=0.7``, ``short-m:m=1,k=8``, ``think-max:512``. Any ``tts_*`` key is sent
with the method's requests (``majority:n=4,tts_moi_beta=1``); ``label=...`` names the row and ``vs=...`` the row it
is compared with. A setting not given takes the method's default; each default says where it comes from (a
paper, the authors' code, or ours).

A method is a :class:`BenchMethod`: its settings, the grammar of its SPEC, its checks, its label, its control,
how it runs one problem and the fields it adds to its summary row. :func:`registered` collects them by name:
the built-ins below and those plugins register through the ``tts_register_bench_methods`` hook.
:func:`parse_method` turns a SPEC into the method and its parsed settings (:class:`MethodSpec`); ``tts bench``
uses it, and so can anything else that names a method by SPEC.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tts_plugins.client import stats
from tts_plugins.client.server import Sample, Server
from tts_plugins.client.strategies import Options, run_problem
from tts_plugins.hookspecs import hookimpl
from tts_plugins.manager import installed_plugin_manager

# Settings every method takes unless it declares them unused (``BenchMethod.unused``); label and vs name rows.
COMMON = ("n", "temperature", "top_p", "max_tokens", "label", "vs")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
OURS = "ours"
DEFINITION = "the method's definition"

# Integer settings and their minimum, numbers >= 0, and shares in (0, 1]: one name means one thing in every method.
_INT_MIN = {"n": 1, "k": 1, "m": 1, "budget": 0, "waves": 1, "converge": 0, "min_tokens": 0, "max_tokens": 1, "warmup": 1, "window": 1,
            "conf_topk": 1}
_NUMBERS = ("temperature", "tau", "beta")
_SHARES = ("tau_intra", "tau_cross")


@dataclass(frozen=True)
class Setting:
    """A method's setting: its default and where the default comes from (a paper, the authors' code, or ``"ours"``)."""

    default: Any
    source: str = OURS


@dataclass(frozen=True)
class RunContext:
    """What one run of a method on one problem may use besides its settings. Seeds come from the run's seed and the
    problem, never from the method or its label (common random numbers): a method and its control draw the same
    samples until the technique acts."""

    seed: int  # the problem's seed; sample j of the problem is seeded from it (strategies.sample_seed(seed, id, j))
    first_seed: int  # sample 0's seed, strategies.sample_seed(seed, id)
    max_tokens: int  # per sample: the spec's max_tokens, else the run's
    max_n: int  # samples per request
    group: str  # a name unique to this run, method and problem (in-engine groups, rosters); at most 128 characters


@dataclass(frozen=True)
class Outcome:
    """One method's result on one problem: the answer, the samples it drew, and fields its record adds."""

    answer: str | None
    samples: Sequence[Sample]
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class MethodSpec:
    """A parsed SPEC: the method, its resolved settings, the ``tts_*`` keys it sends, and its row label."""

    spec: str
    method: BenchMethod
    settings: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    vs: str | None = None  # the label this method is compared with (default: the run's baseline)

    @property
    def name(self) -> str:
        return self.method.name


@dataclass(frozen=True, eq=False)
class BenchMethod:
    """One method ``tts bench`` can run: declarations (fields) and behaviour (methods a subclass may override).
    Compared and hashed by identity: the registry holds one object per name.

    A subclass implements :meth:`run`; the rest has defaults. Settings named like a built-in's (``n``, ``k``,
    ``temperature``, ``tau``, ...) are checked as the built-ins' are; :meth:`rules` adds the method's own checks.
    """

    name: str  # [A-Za-z0-9][A-Za-z0-9._-]*
    help: str  # one line: what it does
    settings: Mapping[str, Setting]  # its own settings with their defaults, in the order labels list them
    positional: str | None = None  # the setting a bare first value sets (``think-max:512``)
    source: str = ""  # where the defaults come from, in one line (``tts bench --list``, summary.json)
    unused: tuple[str, ...] = ()  # common settings (COMMON) it has no use for: refused in its SPEC
    title: str | None = None  # its label's stem, formatted with the settings; None: the name, with @n when n > 1
    title_keys: tuple[str, ...] = ("n",)  # settings the label leaves out of its parenthesis (the title shows them)
    sampled: bool = False  # several samples (n or k > 1) need temperature > 0
    plain: bool = False  # no technique: with no tts_* key it is its own control
    prices_samples: bool = False  # plain samples at its settings: equal-budget votes price a sample by its tokens per sample

    def __post_init__(self) -> None:
        where = f"bench method {self.name!r}"
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(f"a bench method's name must match {NAME.pattern}, got {self.name!r}")
        for key, s in self.settings.items():
            if not isinstance(s, Setting):
                raise ValueError(f"{where}: setting {key!r} must be a Setting(default, source), got {s!r}")
            if not key.isidentifier() or key.startswith("tts_") or key in ("label", "vs"):
                raise ValueError(f"{where}: setting {key!r} must be an identifier, not label, vs or a tts_* key")
        if self.positional is not None and self.positional not in self.settings:
            raise ValueError(f"{where}: positional {self.positional!r} must be one of its settings ({', '.join(self.settings)})")
        bad = [k for k in self.unused if k not in COMMON[:4] or k in self.settings]
        if bad:
            raise ValueError(f"{where}: unused must name common settings it does not declare ({', '.join(COMMON[:4])}), got {bad[0]!r}")

    # --- the SPEC ---

    @property
    def defaults(self) -> dict[str, Any]:
        return {k: s.default for k, s in self.settings.items()}

    @property
    def keys(self) -> list[str]:
        """Every setting its SPEC accepts besides ``tts_*`` keys."""
        return sorted(set(self.settings) | set(COMMON) - set(self.unused))

    @property
    def form(self) -> str:
        """Its SPEC's grammar, e.g. ``majority[:<n>][,key=value...]``."""
        if self.positional:
            return f"{self.name}[:<{self.positional}>][,key=value...]"
        return f"{self.name}[:key=value[,key=value...]]"

    def sample_count(self, settings: Mapping[str, Any]) -> int:
        """The samples it votes over: its control draws as many."""
        return int(settings.get("n", 1))

    def check(self, spec: str, settings: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the spec, the setting, its value and what was expected."""
        for ok, what in self._rules(settings):
            if not ok:
                raise ValueError(f"in spec {spec!r}: {what}")

    def _rules(self, s: Mapping[str, Any]) -> Iterator[tuple[bool, str]]:
        # lazily: a rule may assume the ones before it hold
        yield from _common_rules(s)
        if self.sampled and self.sample_count(s) > 1:
            yield s.get("temperature", 0) > 0, "more than one sample needs temperature > 0"
        yield from self.rules(s)

    def rules(self, s: Mapping[str, Any]) -> Iterable[tuple[bool, str]]:
        """The method's own checks, after the common ones hold: ``(holds, what is expected, got what)`` pairs."""
        return ()

    def check_run(self, m: MethodSpec, *, concurrency: int) -> None:
        """Checks that depend on the run's options (``ValueError``)."""

    # --- rows ---

    def label(self, m: MethodSpec) -> str:
        """Its row's default label: the title, then the settings changed from their defaults and the tts_* keys."""
        s, d = m.settings, self.defaults
        changed = [f"{k}={s[k]}" for k in s if k not in (self.positional,) and d.get(k) != s[k]]
        if self.title is None:
            base, shown = self.name + (f"@{s['n']}" if s.get("n", 1) > 1 else ""), ("n",)
        else:
            base, shown = self.title.format(**s), self.title_keys
        changed = [c for c in changed if c.split("=")[0] not in shown]
        extra = changed + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in m.params.items()]
        return base + (f" ({', '.join(extra)})" if extra else "")

    def control(self, m: MethodSpec) -> str | None:
        """The SPEC of its control: the same number of samples at its own temperature and top_p (common random
        numbers: the same samples) with no technique, voted by majority when there are several. None when it is
        its own control."""
        if self.plain and not m.params:
            return None
        s = m.settings
        t, top_p, n = float(s.get("temperature", 0.0)), float(s.get("top_p", 1.0)), self.sample_count(s)
        if n > 1:
            spec = f"majority:n={n},temperature={t:g},top_p={top_p:g}"
        elif t == 0:
            spec = "greedy"
        else:
            spec = f"sample:temperature={t:g},top_p={top_p:g}"
        if "max_tokens" in s:
            spec += ("," if ":" in spec else ":") + f"max_tokens={s['max_tokens']}"
        return spec

    def summary(self, m: MethodSpec, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Fields its summary row adds from its records: pass@k at the fewest samples any problem got (the unbiased
        estimate) and the mean sample accuracy, when every problem got several samples."""
        n_min = min(r["samples"] for r in records)
        if n_min <= 1:
            return {}
        return {"pass_at_k": {"k": n_min, "value": sum(stats.pass_at_k(r["samples"], r["samples_right"], n_min) for r in records) / len(records)},
                "mean_sample_accuracy": sum(r["samples_right"] / r["samples"] for r in records) / len(records)}

    # --- running ---

    async def run(self, server: Server, m: MethodSpec, problem: Mapping[str, Any], ctx: RunContext) -> Outcome:
        """Run on one ``{"id", "prompt"}`` problem; a :class:`~tts_plugins.client.server.ServerError` is the
        problem's error (or stops the run when the server is unreachable or refuses the method's parameters)."""
        raise NotImplementedError(f"bench method {self.name!r} does not implement run")


def _common_rules(s: Mapping[str, Any]) -> Iterator[tuple[bool, str]]:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, low in _INT_MIN.items():
        if key in s:
            yield is_int(s[key]) and s[key] >= low, f"{key} must be an int >= {low}, got {s[key]!r}"
    for key in _NUMBERS:
        if key in s:
            v = s[key]
            yield (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                   f"{key} must be a number >= 0, got {v!r}")
    if "beta" in s:
        yield s["beta"] > 0, f"beta must be > 0, got {s['beta']!r}"
    if "tau" in s:
        yield s["tau"] <= 100, f"tau must be <= 100, got {s['tau']!r}"
    for key in _SHARES:
        if key in s:
            yield isinstance(s[key], (int, float)) and 0 < s[key] <= 1, f"{key} must be in (0, 1], got {s[key]!r}"
    if "top_p" in s:
        yield isinstance(s["top_p"], (int, float)) and 0 < s["top_p"] <= 1, f"top_p must be in (0, 1], got {s['top_p']!r}"
    if "m" in s and "k" in s:
        yield s["m"] <= s["k"], f"m must be <= k, got m={s['m']}, k={s['k']}"


# --- parsing ----------------------------------------------------------------------------------------------


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if text[:1] in "[{\"":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def _split(text: str) -> list[str]:
    """Comma-separated items; commas inside brackets or quotes stay (``tts_trim_markers=["\\n",","]``)."""
    out, depth, cur, quote = [], 0, "", False
    for ch in text:
        if ch == '"':
            quote = not quote
        elif not quote and ch in "[{(":
            depth += 1
        elif not quote and ch in "]})":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur or out:
        out.append(cur)
    return [x for x in (s.strip() for s in out) if x]


def parse_spec(spec: str, methods: Mapping[str, BenchMethod] | None = None) -> MethodSpec:
    """``name[:value][,key=value...]`` -> :class:`MethodSpec`, among ``methods`` (default: every registered method,
    :func:`default_methods`); a bad spec is a ``ValueError`` naming the spec, what is wrong and what was expected."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string, got {spec!r}")
    methods = default_methods() if methods is None else methods
    name, _, rest = spec.strip().partition(":")
    method = methods.get(name)
    if method is None:
        raise ValueError(f"unknown method {name!r} in spec {spec!r}; known: {', '.join(methods)}")
    settings, params = method.defaults, {}
    label = vs = None
    for i, item in enumerate(_split(rest) if rest else []):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            if i != 0 or method.positional is None:
                only = f" (only the first item may be a bare {method.positional})" if method.positional else ""
                raise ValueError(f"in spec {spec!r}: {item!r} is not key=value{only}; expected {method.form}")
            key, raw = method.positional, item
        value = _value(raw.strip())
        if key.startswith("tts_"):
            params[key] = value
        elif key == "label":
            label = str(raw.strip())
        elif key == "vs":
            vs = str(raw.strip())
        elif key in method.settings or (key in COMMON and key not in method.unused):
            settings[key] = value
        else:
            raise ValueError(f"in spec {spec!r}: unknown setting {key!r} for {name}; settings: {', '.join(method.keys)}, or any tts_* key "
                             f"(expected {method.form})")
    method.check(spec, settings)
    m = MethodSpec(spec.strip(), method, settings, params, vs=vs)
    m.label = label or method.label(m)
    return m


def parse_method(spec: str, methods: Mapping[str, BenchMethod] | None = None) -> tuple[BenchMethod, MethodSpec]:
    """A SPEC's method and the parsed spec (:func:`parse_spec`), for anything that names a method by SPEC."""
    m = parse_spec(spec, methods)
    return m.method, m


# --- the built-in methods ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StrategyMethod(BenchMethod):
    """A method that runs one of the client's strategies (:func:`tts_plugins.client.strategies.run_problem`) with
    ``n`` samples at its temperature and top_p: ``options(settings)`` overrides the strategy's options,
    ``params(settings, ctx)`` adds the ``tts_*`` keys its technique sends."""

    options: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda s: {}
    params: Callable[[Mapping[str, Any], RunContext], Mapping[str, Any]] = lambda s, ctx: {}

    async def run(self, server: Server, m: MethodSpec, problem: Mapping[str, Any], ctx: RunContext) -> Outcome:
        s = m.settings
        params = {**m.params, **self.params(s, ctx)}
        o = dict(n=int(s.get("n", 1)), temperature=float(s.get("temperature", 1.0)), top_p=float(s.get("top_p", 1.0)), max_tokens=ctx.max_tokens,
                 seed=ctx.seed, max_n=ctx.max_n)
        o.update(self.options(s))
        opts = Options(params=params, **o)
        opts.check()
        r = await run_problem(server, problem, opts)
        samples = [Sample(text=x.get("text", ""), reasoning=x.get("reasoning"), answer=x.get("answer"), tokens=x["tokens"],
                          finish_reason=x.get("finish_reason"), temperature=x.get("temperature")) for x in r["samples"]]
        extra: dict[str, Any] = {}
        if r.get("calibration"):
            extra["calibration"] = {k: r["calibration"][k] for k in ("temperature", "bias_tokens")}
        if "early_exit" in r:
            extra["early_exit"] = r["early_exit"]
        if "threshold" in r:  # deepconf
            extra["deepconf"] = {k: r[k] for k in ("threshold", "stopped", "online_waves", "voters", "consensus")}
            extra["early_exit"] = r["n_samples"] < int(s["n"])
        return Outcome(r["answer"], samples, extra)


@dataclass(frozen=True, eq=False)
class _ShortM(StrategyMethod):
    def sample_count(self, settings: Mapping[str, Any]) -> int:
        return int(settings["k"])


@dataclass(frozen=True, eq=False)
class _Carbon(StrategyMethod):
    def rules(self, s: Mapping[str, Any]) -> Iterable[tuple[bool, str]]:
        return [(s["n"] >= 2, f"carbon needs n >= 2 (explore and exploit), got {s['n']}")]

    def summary(self, m: MethodSpec, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = super().summary(m, records)
        cal = [r["calibration"] for r in records if r.get("calibration")]
        if cal:
            out["carbon_fitted_T_mean"] = sum(c["temperature"] for c in cal) / len(cal)
            out["carbon_bias_tokens_mean"] = sum(c["bias_tokens"] for c in cal) / len(cal)
        return out


@dataclass(frozen=True, eq=False)
class _DeepConf(StrategyMethod):
    def rules(self, s: Mapping[str, Any]) -> Iterable[tuple[bool, str]]:
        return [(s["variant"] in ("low", "high"), f"variant must be low or high, got {s['variant']!r}"),
                (s["warmup"] <= s["n"], f"warmup must be <= n (the budget), got warmup={s['warmup']}, n={s['n']}"),
                (0 < s["tau"] <= 1, f"tau must be in (0, 1], got {s['tau']!r}")]


@dataclass(frozen=True, eq=False)
class _Ladder(StrategyMethod):
    def control(self, m: MethodSpec) -> str | None:
        return None  # its rungs are its sampling settings


@dataclass(frozen=True, eq=False)
class _Roster(BenchMethod):
    """k members decode one sequence: greedy, k requests in one roster (member 0 clean, the others noisy), which
    must all be in flight together; with temperature > 0, one request of n = k samples, member 0 clean."""

    def sample_count(self, settings: Mapping[str, Any]) -> int:
        return 1  # a greedy roster decodes one sequence; a sampling roster answers with its clean member, sample 0

    def rules(self, s: Mapping[str, Any]) -> Iterable[tuple[bool, str]]:
        return [(s["k"] >= 2, f"a roster needs k >= 2 members, got {s['k']}")]

    def check_run(self, m: MethodSpec, *, concurrency: int) -> None:
        k = m.settings["k"]
        if float(m.settings["temperature"]) == 0 and k > concurrency:
            raise ValueError(f"method {m.label!r}: a greedy roster of {k} sends {k} requests that must all be in flight together; raise "
                             f"--concurrency to at least {k}")

    def summary(self, m: MethodSpec, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {}  # its samples are members of one decode, not independent draws: no pass@k

    async def run(self, server: Server, m: MethodSpec, problem: Mapping[str, Any], ctx: RunContext) -> Outcome:
        s = m.settings
        k, tau = s["k"], float(s["tau"])
        if float(s["temperature"]) > 0:
            samples = await server.sample(problem["prompt"], n=k, temperature=float(s["temperature"]), max_tokens=ctx.max_tokens,
                                          seed=ctx.first_seed, top_p=float(s.get("top_p", 1.0)),
                                          params={**m.params, "tts_roe_roster_size": k, "tts_roe_tau": tau})
        else:
            members = await asyncio.gather(*(
                server.sample(problem["prompt"], n=1, temperature=float(s["temperature"]), max_tokens=ctx.max_tokens, seed=ctx.first_seed + i,
                              params={**m.params, "tts_roe_roster": ctx.group, "tts_roe_roster_size": k, "tts_roe_tau": 0.0 if i == 0 else tau})
                for i in range(k)))
            samples = [x for ms in members for x in ms]
        return Outcome(samples[0].answer, samples, {"members_identical": len({tuple(x.token_ids or ()) for x in samples}) == 1})


def _greedy(source_n: str = DEFINITION, source_temperature: str = DEFINITION) -> dict[str, Setting]:
    return {"n": Setting(1, source_n), "temperature": Setting(0.0, source_temperature)}


# The titled built-ins' labels leave these out of the parenthesis.
_TITLE_KEYS = ("n", "m", "k", "tau", "waves", "converge", "variant")
_MAJORITY = {"n": Setting(8, "ours (Wang et al.: 40)"), "temperature": Setting(0.7, "arXiv 2203.11171"),
             "top_p": Setting(1.0, "arXiv 2203.11171 (no truncation)")}
_AS_MAJORITY = "ours (majority's settings)"
_S1 = "arXiv 2501.19393 (greedy)"

# The papers' decoding settings where they give them; "ours" where they do not (each says which).
BUILTIN: tuple[BenchMethod, ...] = (
    StrategyMethod("greedy", "one greedy sample", _greedy(), plain=True),
    StrategyMethod("sample", "one sample", {"n": Setting(1, DEFINITION), "temperature": Setting(0.6, "DeepSeek-R1 and Qwen3 model cards"),
                                            "top_p": Setting(0.95, "DeepSeek-R1 and Qwen3 model cards")},
                   source="T=0.6, top_p=0.95: the sampling DeepSeek-R1 and Qwen3 recommend for their thinking mode", sampled=True, plain=True,
                   prices_samples=True),
    StrategyMethod("majority", "self-consistency: n samples, majority vote", _MAJORITY, "n",
                   source="Wang et al. 2023 (arXiv 2203.11171): T=0.7 without top-k truncation for GPT-3/PaLM; n=8 is ours (the paper: 40)",
                   title="majority@{n}", title_keys=_TITLE_KEYS, sampled=True, plain=True, prices_samples=True),
    StrategyMethod("inverse-entropy", "n samples, vote weighted by 1 / mean token entropy",
                   {k: Setting(s.default, _AS_MAJORITY) for k, s in _MAJORITY.items()}, "n",
                   source="arXiv 2511.02309; settings are majority's (ours)",
                   title="inverse-entropy@{n}", title_keys=_TITLE_KEYS, sampled=True, options=lambda s: {"vote": "inverse_entropy"}),
    StrategyMethod("best-of-n", "n samples, the one with the highest reward",
                   {**{k: Setting(s.default, _AS_MAJORITY) for k, s in _MAJORITY.items()}, "reward": Setting("confidence", OURS)}, "n",
                   source="reward 'confidence' (mean token log-prob) is ours; give reward=module:function for a reward model",
                   title="best-of-{n}", title_keys=_TITLE_KEYS, sampled=True,
                   options=lambda s: {"strategy": "best-of-n", "reward": s["reward"]}),
    _ShortM("short-m", "short-m@k: k samples in one in-engine group, stopped once m finish; vote among the m",
            {"m": Setting(1, "arXiv 2505.17813 (short-1@k)"), "k": Setting(8, "ours (the paper: 20)"),
             "temperature": Setting(0.7, "arXiv 2505.17813"), "top_p": Setting(0.95, "arXiv 2505.17813")}, "k",
            source="Hassid et al. 2025 (arXiv 2505.17813): T=0.7, top_p=0.95 (k=20 in the paper; 8 is ours)", unused=("n",),
            title="short-{m}@{k}", title_keys=_TITLE_KEYS, sampled=True,
            options=lambda s: {"n": s["k"], "vote": "short_m", "m": s["m"]},
            params=lambda s, ctx: {"tts_group": ctx.group, "tts_group_stop_after": s["m"]}),
    StrategyMethod("think-max", "thinking cap (s1 budget forcing), greedy", {**_greedy(_S1, _S1), "budget": Setting(512, OURS)}, "budget",
                   source="s1 (arXiv 2501.19393): greedy decoding", title="think-max {budget}", title_keys=_TITLE_KEYS,
                   params=lambda s, ctx: {"tts_think_max": s["budget"]}),
    StrategyMethod("think-min", "thinking minimum with 'Wait' (s1 budget forcing), greedy", {**_greedy(_S1, _S1), "budget": Setting(512, OURS)},
                   "budget", source="s1 (arXiv 2501.19393): greedy decoding, 'Wait'", title="think-min {budget}", title_keys=_TITLE_KEYS,
                   params=lambda s, ctx: {"tts_think_min": s["budget"]}),
    StrategyMethod("no-think", "NoThinking: the thinking block prefilled and closed", _greedy(OURS, OURS), "n",
                   source="arXiv 2504.09858; greedy for one sample is ours (the paper reports pass@k of samples)", sampled=True,
                   params=lambda s, ctx: {"tts_no_think": True}),
    StrategyMethod("trim", "thought trimming (TrimR-style), in the engine",
                   {**_greedy(OURS, OURS), "converge": Setting(3, OURS), "min_tokens": Setting(0, OURS)}, "converge",
                   source="TrimR (arXiv 2505.17155) thresholds are reported, not sourced: converge/min_tokens are our defaults; greedy is ours",
                   title="trim converge={converge}", title_keys=_TITLE_KEYS,
                   params=lambda s, ctx: {"tts_trim": True, "tts_trim_converge": s["converge"], "tts_trim_min_tokens": s["min_tokens"]}),
    StrategyMethod("moi", "Mixture of Inputs (the next input mixes the sampled token and the distribution)",
                   {"n": Setting(1, OURS), "temperature": Setting(0.6, "arXiv 2505.14827"), "top_p": Setting(0.8, "arXiv 2505.14827"),
                    "beta": Setting(1.0, "arXiv 2505.14827")}, "n",
                   source="arXiv 2505.14827: T=0.6, top_p=0.8, beta=1; n > 1 votes by majority", sampled=True,
                   params=lambda s, ctx: {"tts_moi_beta": float(s["beta"])}),
    _Carbon("carbon", "CarBoN: explore, fit T and a bias, exploit; Best-of-N over all",
            {"n": Setting(8, OURS), "temperature": Setting(0.7, OURS), "top_p": Setting(1.0, OURS),
             "reward": Setting("agreement", "ours (the paper: a process reward model)")}, "n",
            source="arXiv 2510.15674 (reported): N1 = N/2 explore; the paper scores with a process reward model; the default "
                   "'agreement' reward with Best-of-N over all N is majority@N by construction: give reward=module:function",
            title="carbon@{n}", title_keys=_TITLE_KEYS, sampled=True, options=lambda s: {"strategy": "carbon", "reward": s["reward"]}),
    _DeepConf("deepconf", "DeepConf online: warmup traces set a confidence threshold, further traces are stopped in the engine "
              "below it, confidence-weighted vote, no more traces once it agrees",
              {"n": Setting(32, "ours (the paper: 256 or 512)"), "temperature": Setting(0.6, "arXiv 2508.15260"),
               "top_p": Setting(0.95, "arXiv 2508.15260"), "warmup": Setting(16, "arXiv 2508.15260"),
               "variant": Setting("low", "arXiv 2508.15260 (DeepConf-low: the 90th percentile)"),
               "window": Setting(2048, "arXiv 2508.15260 and the authors' code"), "conf_topk": Setting(20, "the authors' code"),
               "tau": Setting(0.95, "arXiv 2508.15260"), "adaptive": Setting(True, "arXiv 2508.15260 (adaptive sampling)")}, "n",
              source="arXiv 2508.15260 and facebookresearch/deepconf: T=0.6, top_p=0.95, 16 warmup traces, window 2048, top-20, "
                     "tau 0.95, low = 90th percentile; the budget n=32 is ours (the paper: 256 or 512)",
              title="deepconf-{variant}@{n}", title_keys=_TITLE_KEYS, sampled=True,
              options=lambda s: {"strategy": "deepconf", "warmup": s["warmup"], "deepconf": s["variant"], "window": s["window"],
                                 "conf_topk": s["conf_topk"], "tau": float(s["tau"]), "adaptive": bool(s["adaptive"])}),
    # one wave at a time: a wave cancelled by an early exit would have spent tokens no record counts
    _Ladder("ladder", "temperature ladder with the two-stage multi-temperature vote and early exit",
            {"waves": Setting(1, OURS), "tau_intra": Setting(0.8, "arXiv 2510.02611 (reported)"),
             "tau_cross": Setting(1.0, "arXiv 2510.02611 (reported)")}, "waves",
            source="arXiv 2510.02611 (reported): rungs 0.0..1.2 step 0.1 (13 samples a wave), tau_intra 0.8, tau_cross 1.0",
            unused=("n", "temperature", "top_p"), title="ladder x{waves}", title_keys=_TITLE_KEYS,
            options=lambda s: {"strategy": "ladder", "waves": s["waves"], "min_waves": 1, "ahead": 1, "tau_intra": float(s["tau_intra"]),
                               "tau_cross": float(s["tau_cross"]), "n": 1}),
    StrategyMethod("roe", "RoE routing noise on every token of one sample (MoE models)", {**_greedy(OURS, OURS), "tau": Setting(0.3, OURS)}, "tau",
                   source="arXiv 2509.17238 (reported): per-layer tau, small; 0.3 is ours", title="roe tau={tau}", title_keys=_TITLE_KEYS,
                   params=lambda s, ctx: {"tts_roe_tau": float(s["tau"])}),
    _Roster("roster", "RoE roster: k members (one clean, k-1 noisy) decode one sequence (MoE models); temperature > 0: one "
            "request of n = k samples", {"k": Setting(4, OURS), "temperature": Setting(0.0, "arXiv 2509.17238 (reported: greedy)"),
                                        "tau": Setting(0.3, OURS)}, "k",
            source="arXiv 2509.17238 (reported): one clean member, greedy", unused=("n",), title="roster of {k} tau={tau}",
            title_keys=_TITLE_KEYS),
)
BUILTIN_METHODS: Mapping[str, BenchMethod] = MappingProxyType({m.name: m for m in BUILTIN})


# --- the registry -----------------------------------------------------------------------------------------


@hookimpl
def tts_register_bench_methods(register: Callable[[BenchMethod], None]) -> None:
    """The built-in methods, registered through the hook like a plugin's."""
    for method in BUILTIN:
        register(method)


def registered(pm: Any | None = None) -> dict[str, BenchMethod]:
    """Every method by name, from ``tts_register_bench_methods``: the built-ins first (they take part in the same
    hook call, pluggy's ``call_extra``, ahead of the plugins), then the plugins'. A name registered twice by two
    different objects is a ``ValueError``; the same object twice is harmless."""
    pm = pm or installed_plugin_manager()
    methods: dict[str, BenchMethod] = {}

    def add(method: BenchMethod) -> None:
        if not isinstance(method, BenchMethod):
            raise ValueError(f"a bench method must be a tts_plugins.client.methods.BenchMethod, got {method!r}")
        have = methods.get(method.name)
        if have is method:
            return
        if have is not None:
            raise ValueError(f"bench method {method.name!r} is registered twice ({type(have).__qualname__} and "
                             f"{type(method).__qualname__}); a method's name must be new, the built-ins' included")
        methods[method.name] = method

    pm.hook.tts_register_bench_methods.call_extra([tts_register_bench_methods], {"register": add})
    return methods


@functools.lru_cache(maxsize=1)
def default_methods() -> Mapping[str, BenchMethod]:
    """The methods of this process (cached: entry points do not change while it runs)."""
    return MappingProxyType(registered())


__all__ = ["BUILTIN_METHODS", "COMMON", "BenchMethod", "MethodSpec", "Outcome", "RunContext", "Setting", "StrategyMethod", "default_methods",
           "parse_method", "parse_spec", "registered"]
