"""Test-time-scaling strategies: many samples from a server, one answer. Engine-neutral (vLLM or SGLang).

Each strategy is ``async (server, problem, options) -> result dict`` (see
:func:`run_problem`); the ``tts`` command (:mod:`tts_plugins.client.cli`) runs them
over a JSONL file.

* ``self-consistency``: ``n`` samples at one temperature, then a vote
  (majority by default; ``inverse_entropy``, ``short_m`` (short-m@k: the ``m``
  shortest chains vote, ties to the shortest), ``short_m_at_k`` (all chains vote,
  ties to the shortest), ``confidence_vote`` (weighted by each chain's DeepConf
  lowest group confidence when the server reports one, else its exponentiated
  mean token log-prob) or any registered aggregator).
* ``ladder``: "On the Role of Temperature Sampling in Test-Time Scaling": the
  samples are spread over a temperature ladder (default 0.0, 0.1, ..., 1.2) in
  waves of one sample per rung. A wave is one request with
  ``n = len(ladder)`` and ``tts_temperature_ladder`` (the engine gives sample
  ``i`` rung ``i``), or, with ``ladder_mode="fan-out"``, one request per rung
  (for servers without the package). After each wave the two-stage
  multi-temperature vote is taken; once it is decided (every temperature's
  majority share >= ``tau_intra``, the per-temperature winners agreeing with
  share >= ``tau_cross``), the waves still in flight are cancelled (the
  connection is closed and the engine aborts them) and no more are sent.
* ``carbon``: CarBoN. Explore ``n1`` samples at the base temperature with
  top log-probs; score them with the reward (default: agreement with the
  majority answer, our choice where the paper uses a process reward model);
  keep the ``keep`` best; fit T and a sparse bias on their tokens
  (:func:`tts_plugins.client.calibration.fit_calibration`, L2 penalty ``l2``); exploit
  ``n2`` samples with ``tts_carbon_*`` at request temperature 1 (so the
  engine samples ``softmax((z + b) / T)``, the fitted distribution); select by
  Best-of-N over all ``n1 + n2`` samples.
  With the default agreement reward, Best-of-N over all N samples picks the
  majority answer whatever the calibration did: CarBoN is then majority@N by
  construction. Its effect can only show with a reward that is not the vote,
  a process reward model (``reward=module:function``; on the testbed,
  ``tts_plugins.models.arith:step_reward``, a step checker with noise).
  Each result reports the fitted T and the number of biased tokens.
* ``best-of-n``: ``n`` samples, the one with the highest reward (default:
  ``confidence``, the exponentiated mean token log-prob); ``vote`` may be
  ``weighted_best_of_n`` or ``best_of_majority`` instead.

* ``deepconf``: DeepConf online ("Deep Think with Confidence", arXiv 2508.15260). A warmup of ``warmup`` traces
  (16) runs to the end with the engine measuring each trace's confidence (``tts_conf_window``,
  ``tts_conf_topk``); the stopping threshold is the 90th percentile of their lowest group confidences for
  ``deepconf="low"`` (keep the top 10%) or the 10th for ``"high"`` (top 90%), taken over every warmup trace as
  the authors' online script takes it (the final vote counts answered traces only). Then waves of at most ``max_n``
  traces are sent with ``tts_conf_threshold`` (the engine stops a trace as soon as its windowed confidence falls
  below), until the confidence-weighted vote's consensus reaches ``tau`` (0.95; the paper's adaptive sampling) or
  ``n`` traces (the budget, warmup included) were drawn (``adaptive=False``: the whole budget, as the paper's
  released online script does). The vote: every trace that was not stopped, whose lowest group confidence is at
  least the threshold and that has an answer, weighted by its lowest group confidence (the paper's code).
  The paper samples at temperature 0.6, top-p 0.95 (set ``temperature``/``top_p``); its window is 2048 tokens.

Rewards: ``agreement``, ``confidence``, any reward registered through the
``tts_register_aggregators`` hook, or ``module:function``; the last two are
called as ``fn(prompt, completion) -> float``.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tts_plugins.client import aggregate
from tts_plugins.client.server import Sample, Server, ServerError, load_callable

STRATEGIES = ("self-consistency", "ladder", "carbon", "best-of-n", "deepconf")
DEFAULT_LADDER = tuple(round(0.1 * i, 1) for i in range(13))  # 0.0 .. 1.2, the paper's reproduction default


@dataclass
class Options:
    strategy: str = "self-consistency"
    n: int = 8  # samples (self-consistency, best-of-n; carbon: n1 + n2)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    max_n: int = 16  # samples per request
    seed: int | None = None
    vote: str | None = None  # None: the strategy's default
    m: int = 1  # short-m@k
    reward: str | None = None  # None: the strategy's default
    top_logprobs: int = 20
    params: Mapping[str, Any] = field(default_factory=dict)  # extra tts_* keys sent with every request
    # ladder
    ladder: Sequence[float] = DEFAULT_LADDER
    waves: int = 4
    min_waves: int = 1
    ahead: int = 2  # waves in flight at once
    ladder_mode: str = "engine"  # or "fan-out"
    tau_intra: float = 0.8
    tau_cross: float = 1.0
    # carbon
    n1: int | None = None  # default n // 2
    keep: int | None = None  # default ceil(n1 / 2)
    l2: float = 1e-2
    # deepconf
    deepconf: str = "low"  # "low": threshold at the warmup's 90th percentile (keep the top 10%); "high": the 10th
    warmup: int = 16
    tau: float = 0.95
    adaptive: bool = True  # False: draw the whole budget (as the paper's released online script does)
    window: int = 2048
    conf_topk: int = 20

    def check(self) -> None:
        def need(ok: bool, what: str, value: Any) -> None:
            if not ok:
                raise ValueError(f"{what} got {value!r}")

        need(self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)},", self.strategy)
        need(isinstance(self.n, int) and self.n >= 1, "n must be an int >= 1,", self.n)
        need(isinstance(self.max_n, int) and self.max_n >= 1, "max_n must be an int >= 1,", self.max_n)
        need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0,", self.temperature)
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p must be in (0, 1],", self.top_p)
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an int >= 1,", self.max_tokens)
        need(1 <= self.top_logprobs <= 20, "top_logprobs must be in 1..20,", self.top_logprobs)
        need(isinstance(self.m, int) and self.m >= 1, "m must be an int >= 1,", self.m)
        need(len(self.ladder) >= 1 and all(math.isfinite(t) and t >= 0 for t in self.ladder), "ladder must be temperatures >= 0,", list(self.ladder))
        need(1 <= self.min_waves <= self.waves, "min_waves must be in 1..waves,", self.min_waves)
        need(self.ahead >= 1, "ahead must be >= 1,", self.ahead)
        need(self.ladder_mode in ("engine", "fan-out"), "ladder_mode must be 'engine' or 'fan-out',", self.ladder_mode)
        need(0 < self.tau_intra <= 1 and 0 < self.tau_cross <= 1, "tau_intra and tau_cross must be in (0, 1],", (self.tau_intra, self.tau_cross))
        need(self.l2 >= 0, "l2 must be >= 0,", self.l2)
        need(self.deepconf in ("low", "high"), "deepconf must be 'low' or 'high',", self.deepconf)
        need(isinstance(self.window, int) and self.window >= 1, "window must be an int >= 1,", self.window)
        need(isinstance(self.conf_topk, int) and 1 <= self.conf_topk <= 64, "conf_topk must be in 1..64,", self.conf_topk)
        need(0 < self.tau <= 1, "tau must be in (0, 1],", self.tau)
        if self.strategy == "deepconf":
            need(isinstance(self.warmup, int) and 1 <= self.warmup <= self.n, "deepconf needs 1 <= warmup <= n (the budget),", (self.warmup, self.n))
        if self.strategy == "carbon":
            n1 = self.carbon_n1
            need(1 <= n1 < self.n, "carbon needs 1 <= n1 < n,", (n1, self.n))
            need(1 <= self.carbon_keep <= n1, "keep must be in 1..n1,", self.keep)
        if self.strategy in ("self-consistency", "best-of-n", "deepconf") and self.temperature == 0 and self.n > 1:
            raise ValueError(f"n > 1 samples need temperature > 0 (the engines refuse greedy parallel sampling), got n={self.n}")

    @property
    def carbon_n1(self) -> int:
        return self.n1 if self.n1 is not None else max(1, self.n // 2)

    @property
    def carbon_keep(self) -> int:
        return self.keep if self.keep is not None else max(1, math.ceil(self.carbon_n1 / 2))


# --- rewards ------------------------------------------------------------------


def reward_fn(spec: str, plugin_rewards: Mapping[str, Callable[..., float]] | None = None) -> Callable[[str, Sample, Sequence[Sample]], float]:
    """``(prompt, sample, all samples) -> float`` for a reward name or ``module:function``."""
    if spec == "agreement":
        def agreement(prompt: str, s: Sample, samples: Sequence[Sample]) -> float:
            top = aggregate.majority([x.answer for x in samples]).answer
            return 1.0 if top is not None and s.answer is not None and aggregate.same_answer(s.answer, top) else 0.0
        return agreement
    if spec == "confidence":
        def confidence(prompt: str, s: Sample, samples: Sequence[Sample]) -> float:
            return logprob_confidence(s)
        return confidence
    fn = (plugin_rewards or {}).get(spec) or load_callable(spec, "reward")

    def user(prompt: str, s: Sample, samples: Sequence[Sample]) -> float:
        value = fn(prompt, (s.reasoning + "</think>" if s.reasoning else "") + s.text)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"reward {spec!r} must return a finite number, got {value!r}")
        return float(value)
    return user


def logprob_confidence(s: Sample) -> float:
    """The exponentiated mean token log-prob of a sample (0 without log-probs)."""
    if not s.token_logprobs:
        return 0.0
    return math.exp(sum(s.token_logprobs) / len(s.token_logprobs))


def sample_confidence(s: Sample) -> float:
    """A sample's weight in ``confidence_vote``: the DeepConf report's lowest group confidence when the server sent
    one (``tts_conf_*`` keys), else :func:`logprob_confidence`."""
    lowest = ((s.reports or {}).get("conf") or {}).get("lowest")
    return float(lowest) if lowest is not None else logprob_confidence(s)


def score(reward: Callable[[str, Sample, Sequence[Sample]], float], prompt: str, samples: Sequence[Sample]) -> None:
    for s in samples:
        s.reward = reward(prompt, s, samples)


async def _offload(run: _Run, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``: blocking work (a reward, a vote that compares answers with math-verify, CarBoN's fit).
    A server that declares an ``offload`` coroutine runs it there (``tts serve``'s, whose event loop must stay free
    for its other calls while a slow reward runs); any other runs it inline, as ``tts run`` and ``tts bench`` do."""
    offload = getattr(run.server, "offload", None)
    if offload is None:
        return fn(*args, **kw)
    return await offload(fn, *args, **kw)


# --- sampling -----------------------------------------------------------------


def sample_seed(seed: int, pid: str, first: int = 0) -> int:
    """The seed of a problem's sample number ``first`` (see :func:`_seed`)."""
    return (seed * 1_000_003 + zlib.crc32(pid.encode()) + first) % (2**31 - 1)


def _seed(o: Options, pid: str, first: int) -> int | None:
    """The seed of a request whose first sample is the problem's sample number ``first``. vLLM seeds a request's
    i-th choice with ``seed + i``, so sample j of a problem is seeded ``base + j`` however the samples are split
    into requests: two strategies at the same sampling settings draw the same samples (common random numbers)
    until a technique acts, whatever their names."""
    return None if o.seed is None else sample_seed(o.seed, pid, first)


@dataclass
class _Run:
    server: Server
    problem: Mapping[str, Any]
    o: Options
    requests: int = 0
    drawn: int = 0  # samples asked for so far (the next request's first sample number)

    @property
    def prompt(self) -> str:
        return str(self.problem["prompt"])

    async def draw(self, n: int, *, temperature: float, phase: str, params: Mapping[str, Any] | None = None, logprobs: int | None = None,
                   temperatures: Sequence[float] | None = None) -> list[Sample]:
        """``n`` samples, in requests of at most ``max_n``, concurrently."""
        sizes = [min(self.o.max_n, n - i) for i in range(0, n, self.o.max_n)]
        calls = []
        for size in sizes:
            self.requests += 1
            first, self.drawn = self.drawn, self.drawn + size
            calls.append(self.server.sample(self.prompt, n=size, temperature=temperature, max_tokens=self.o.max_tokens,
                                            params={**self.o.params, **(params or {})}, logprobs=logprobs,
                                            seed=_seed(self.o, str(self.problem["id"]), first), phase=phase, temperatures=temperatures,
                                            top_p=None if temperatures else self.o.top_p))
        return [s for batch in await asyncio.gather(*calls) for s in batch]


VOTES = ("majority", "inverse_entropy", "short_m", "short_m_at_k", "best_of_n", "weighted_best_of_n", "best_of_majority", "confidence_vote")


def _vote(o: Options, samples: Sequence[Sample], default: str, aggregators: Mapping[str, Callable[..., aggregate.Vote]]) -> aggregate.Vote:
    """The vote ``o.vote`` (else ``default``) over ``samples``. The built-in votes get what they need (log-probs,
    lengths, rewards, confidences); a plugin's aggregator is called as ``fn(answers)`` (the hook's contract)."""
    name = o.vote or default
    answers = [s.answer for s in samples]
    if name == "majority":
        return aggregate.majority(answers)
    if name == "inverse_entropy":
        return aggregate.inverse_entropy_vote(answers, [aggregate.chain_entropy(s.top or []) for s in samples])
    if name == "short_m":
        # a chain without an answer did not finish (cut by max_tokens, or stopped by an in-engine tts_group): rank it last
        shortest = sorted(range(len(samples)), key=lambda i: (answers[i] is None, samples[i].tokens, i))[: o.m]
        return aggregate.short_m_at_k([answers[i] for i in shortest], [samples[i].tokens for i in shortest])
    rewards = [s.reward if s.reward is not None else 0.0 for s in samples]
    if name == "best_of_n":
        return aggregate.best_of_n(answers, rewards)
    if name == "weighted_best_of_n":
        return aggregate.weighted_best_of_n(answers, [max(0.0, r) for r in rewards])
    if name == "best_of_majority":
        return aggregate.best_of_majority(answers, rewards)
    if name == "short_m_at_k":  # every chain votes, ties to the class holding the shortest chain
        return aggregate.short_m_at_k(answers, [s.tokens for s in samples])
    if name == "confidence_vote":  # every chain, weighted by its confidence (no top-share filter)
        return aggregate.confidence_vote(answers, [sample_confidence(s) for s in samples])
    plugins = {k: v for k, v in aggregators.items() if k not in aggregate.BUILTIN}
    if name in plugins:
        return plugins[name](answers)
    raise ValueError(f"unknown vote {name!r}; expected {', '.join(VOTES)} or a registered aggregator "
                     f"({', '.join(sorted(plugins)) or 'none'})")


def _result(run: _Run, vote: aggregate.Vote, samples: Sequence[Sample], **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": run.problem["id"], "strategy": run.o.strategy, "answer": vote.answer, "votes": vote.votes, "total": vote.total,
                           "tokens": sum(s.tokens for s in samples), "n_samples": len(samples), "requests": run.requests, **extra}
    if "answer" in run.problem and run.problem["answer"] is not None:
        out["reference"] = run.problem["answer"]
        out["correct"] = vote.answer is not None and aggregate.same_answer(str(vote.answer), str(run.problem["answer"]))
    out["samples"] = [s.record() for s in samples]
    return out


# --- strategies ---------------------------------------------------------------


async def self_consistency(run: _Run, aggregators: Mapping[str, Any], rewards: Mapping[str, Any]) -> dict[str, Any]:
    o = run.o
    logprobs = o.top_logprobs if o.vote == "inverse_entropy" else 1 if o.vote == "confidence_vote" else None
    samples = await run.draw(o.n, temperature=o.temperature, phase="sample", logprobs=logprobs)
    if o.reward:
        await _offload(run, score, reward_fn(o.reward, rewards), run.prompt, samples)
    return _result(run, await _offload(run, _vote, o, samples, "majority", aggregators), samples)


async def best_of_n(run: _Run, aggregators: Mapping[str, Any], rewards: Mapping[str, Any]) -> dict[str, Any]:
    o = run.o
    reward = o.reward or "confidence"
    logprobs = 1 if reward == "confidence" or o.vote == "confidence_vote" else None
    samples = await run.draw(o.n, temperature=o.temperature, phase="sample", logprobs=logprobs)
    await _offload(run, score, reward_fn(reward, rewards), run.prompt, samples)
    return _result(run, await _offload(run, _vote, o, samples, "best_of_n", aggregators), samples)


async def ladder(run: _Run, aggregators: Mapping[str, Any], rewards: Mapping[str, Any]) -> dict[str, Any]:
    o = run.o
    rungs = [float(t) for t in o.ladder]

    async def wave() -> list[Sample]:
        if o.ladder_mode == "engine":
            # the request's own temperature is replaced rung by rung; it only has to be > 0
            return await run.draw(len(rungs), temperature=1.0, phase="sample", params={"tts_temperature_ladder": rungs}, temperatures=rungs)
        parts = await asyncio.gather(*(run.draw(1, temperature=t, phase="sample") for t in rungs))
        return [s for p in parts for s in p]

    samples: list[Sample] = []
    pending: set[asyncio.Task] = set()
    sent = done_waves = cancelled = 0
    vote = aggregate.Vote(None, 0.0, 0.0, False)
    try:
        while sent < o.waves and len(pending) < o.ahead:
            pending.add(asyncio.ensure_future(wave()))
            sent += 1
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                samples.extend(task.result())
                done_waves += 1
            by_t: dict[float, list[str | None]] = {}
            for s in samples:
                by_t.setdefault(float(s.temperature or 0.0), []).append(s.answer)
            vote = await _offload(run, aggregate.multi_temperature_vote, by_t, tau_intra=o.tau_intra, tau_cross=o.tau_cross)
            if vote.decided and done_waves >= o.min_waves:
                break
            while sent < o.waves and len(pending) < o.ahead:
                pending.add(asyncio.ensure_future(wave()))
                sent += 1
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            cancelled = len(pending)
    early = bool(vote.decided) and done_waves < o.waves
    return _result(run, vote, samples, decided=bool(vote.decided), early_exit=early, waves=done_waves, waves_cancelled=cancelled,
                   waves_not_sent=o.waves - sent, ladder=rungs, ladder_mode=o.ladder_mode)


async def carbon(run: _Run, aggregators: Mapping[str, Any], rewards: Mapping[str, Any]) -> dict[str, Any]:
    from tts_plugins.client.calibration import Position, fit_calibration

    o = run.o
    reward = reward_fn(o.reward or "agreement", rewards)
    explore = await run.draw(o.carbon_n1, temperature=o.temperature, phase="explore", logprobs=o.top_logprobs)
    await _offload(run, score, reward, run.prompt, explore)
    kept = sorted(range(len(explore)), key=lambda i: (-(explore[i].reward or 0.0), i))[: o.carbon_keep]
    positions = []
    for i in kept:
        s = explore[i]
        for chosen, top in zip(s.token_ids or [], s.top or []):
            if top:
                positions.append(Position(ids=list(top), logprobs=list(top.values()), chosen=int(chosen)))
    calib = None
    if positions:
        calib = await _offload(run, fit_calibration, positions, l2=o.l2)
        params = calib.request_params()
    else:  # nothing to fit on (empty completions): exploit uncalibrated
        params = {}
    exploit = await run.draw(o.n - o.carbon_n1, temperature=1.0 if params else o.temperature, phase="exploit", params=params,
                             logprobs=1 if o.vote == "confidence_vote" else None)
    samples = explore + exploit
    await _offload(run, score, reward, run.prompt, samples)  # rewards over all N (agreement: with the majority of all N)
    info = None if calib is None else {"temperature": calib.temperature, "bias_tokens": len(calib.bias), "nll_before": calib.nll_before,
                                       "nll_after": calib.nll_after, "positions": len(positions), "kept": len(kept)}
    return _result(run, await _offload(run, _vote, o, samples, "best_of_n", aggregators), samples, calibration=info)


def _conf(s: Sample) -> dict[str, Any]:
    report = (s.reports or {}).get("conf")
    if not report or report.get("lowest") is None and s.tokens:
        raise ServerError("the server returned no confidence report (tts_conf_*): it needs tts-plugins with DeepConf, "
                          "and on vLLM the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0 on GPUs)", 502)
    return report


async def deepconf(run: _Run, aggregators: Mapping[str, Any], rewards: Mapping[str, Any]) -> dict[str, Any]:
    o = run.o
    keys = {"tts_conf_window": o.window, "tts_conf_topk": o.conf_topk}
    samples = await run.draw(o.warmup, temperature=o.temperature, phase="warmup", params=keys)
    lows = [_conf(s)["lowest"] or 0.0 for s in samples]
    # the stopping bar is the percentile over every warmup trace, as the authors' online script sets it (their
    # offline vote filters to answered traces first, as aggregate.confidence_vote does)
    threshold = aggregate.percentile(lows, 90.0 if o.deepconf == "low" else 10.0)

    def voters() -> tuple[list[str | None], list[float]]:
        answers, weights = [], []
        for s in samples:
            r = _conf(s)
            if not r["stopped"] and (r["lowest"] or 0.0) >= threshold and s.answer is not None:
                answers.append(s.answer)
                weights.append(float(r["lowest"]))
        return answers, weights

    vote = await _offload(run, aggregate.confidence_vote, *voters())
    waves = 0
    while len(samples) < o.n and not (o.adaptive and vote.total > 0 and vote.votes >= o.tau * vote.total):
        size = min(o.max_n, o.n - len(samples))
        samples += await run.draw(size, temperature=o.temperature, phase="online", params={**keys, "tts_conf_threshold": threshold})
        waves += 1
        vote = await _offload(run, aggregate.confidence_vote, *voters())
    stopped = sum(bool(_conf(s)["stopped"]) for s in samples)
    consensus = vote.votes / vote.total if vote.total else 0.0
    return _result(run, vote, samples, threshold=threshold, variant=o.deepconf, warmup=o.warmup, online_waves=waves, stopped=stopped,
                   consensus=consensus, voters=len(voters()[0]))


RUNNERS = {"self-consistency": self_consistency, "ladder": ladder, "carbon": carbon, "best-of-n": best_of_n, "deepconf": deepconf}


async def run_problem(server: Server, problem: Mapping[str, Any], o: Options, aggregators: Mapping[str, Any] | None = None,
                      rewards: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``o.strategy`` on one ``{"id", "prompt", "answer"?}`` problem."""
    run = _Run(server, problem, o)
    return await RUNNERS[o.strategy](run, aggregators or {}, rewards or {})


__all__ = ["DEFAULT_LADDER", "Options", "STRATEGIES", "ServerError", "reward_fn", "run_problem"]
