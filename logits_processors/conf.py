"""Confidence-guided early stop of a trace, inside the engine: DeepConf online.

Paper: "Deep Think with Confidence" (Fu, Wang, Tian, Zhao; arXiv 2508.15260; code facebookresearch/deepconf).

Per step i of an opted-in request, from the logits the engine is about to sample from:

* token confidence ``C_i = -(1/k) * sum_{j<=k} log P_i(j)`` over the ``k`` largest log-probabilities
  (``tts_conf_topk``, default 20, the paper's), that is ``logsumexp(z) - mean(top-k of z)``;
* group confidence: the mean of ``C`` over the last ``w`` tokens (``tts_conf_window``, default 2048, the paper's);
  before ``w`` tokens exist, the mean over the tokens so far;
* the stop: once at least ``tts_conf_min_tokens`` tokens were judged (default: the window, so only full windows
  are judged, as the paper's online mode does), a trace whose group confidence is below
  ``tts_conf_threshold`` (the paper's ``s``) is stopped at that very step: its token is EOS (raised above
  every other logit; a row whose EOS the engine has masked, e.g. under ``min_tokens``, is stopped as soon as EOS
  is allowed). Without a threshold the trace is only measured.

Reported when the trace ends (``report_fields``, :meth:`ConfStop.report`; the adapters put it in the response: vLLM's
``stop_reason``, SGLang's ``matched_stop``): whether it was stopped, the tokens judged, the lowest group
confidence over full windows (the paper's "lowest group confidence"; a trace shorter than the window reports
the mean over its tokens, as the paper's code does) and the mean token confidence.

Where we differ, and why:
* The logits are the ones our processors see: in vLLM after its own logit bias, bad-words and min-tokens
  masks, before temperature; in SGLang before its penalties and temperature. The paper's code asks vLLM for
  raw log-probabilities (before any processing). Without those options the two are the same.
* The stop is decided on the device and delivered in the same step, without a round trip to the host (that
  step's token is EOS, as the authors' current processor, facebookresearch/deepconf ``deepconf/processors.py``,
  writes it too).

Hot path: for the opted-in rows only (gathered when they are not the whole batch), one fused ``log_softmax``
into a reused float32 buffer, one exact two-pass top-k of it (:func:`tts_plugins.reduce.topk_rows`), and
``O(rows)`` updates of per-slot buffers: a ring
of the last ``w`` confidences (``[slots, w]`` float32, sized on admission to the largest window asked for so
far), the window's running sum (float64), the lowest group confidence, the total and the count. Nothing is
read back per step: a packed ``[slots, 4]`` copy of the statistics goes to a host buffer with
``non_blocking`` (pinned on a GPU), read when a trace ends. No host sync, no allocation of the vocabulary's
size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tts_plugins.params import Key, get_float, get_int
from tts_plugins.reduce import topk_rows
from tts_plugins.slots import HostMirror, Workspace
from tts_plugins.technique import EngineInfo, LogitsTechnique

# --- parameters (parsed at admission, torch-free) --------------------------------

MAX_WINDOW = 8192  # the ring is slots x window float32: 8 MiB per 256 slots at the maximum
MAX_TOPK = 64  # vLLM serves at most 20 log-probs per token by default; the paper uses 20
MAX_THRESHOLD = 1e4  # a confidence is at most log(vocabulary), about 12 for 151,936 tokens

# Any key turns the measurement on; a stop writes the engine's own EOS, so nothing is forced (Key.forces None).
CONF_KEY_SPECS = (
    Key("tts_conf_threshold", f"number in [{-MAX_THRESHOLD:g}, {MAX_THRESHOLD:g}], or null", None,
        "The paper's s: a trace whose group confidence falls below it is stopped (its next token is EOS); absent or "
        "null, the confidence is only measured and reported."),
    Key("tts_conf_window", f"int in [1, {MAX_WINDOW}]", 2048,
        "w: the group confidence is the mean token confidence over the last w tokens."),
    Key("tts_conf_topk", f"int in [1, {MAX_TOPK}]", 20,
        "k: a token's confidence is minus the mean of its k largest log-probabilities."),
    Key("tts_conf_min_tokens", "int in [1, 10000000]", None,
        "Judge no trace before this many tokens; absent, the window's length (only full windows are judged, as the "
        "paper's online mode)."),
)
CONF_KEYS = frozenset(k.name for k in CONF_KEY_SPECS)


@dataclass(frozen=True)
class ConfParams:
    """DeepConf online for one request: measure token confidence, stop when the window falls below ``threshold``."""

    threshold: float | None = None  # None: never stop, only measure and report
    window: int = 2048
    topk: int = 20
    min_tokens: int = 2048

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> ConfParams | None:
        if not any(k in flat for k in CONF_KEYS):
            return None
        threshold = None if flat.get("tts_conf_threshold") is None else get_float(
            flat, "tts_conf_threshold", minimum=-MAX_THRESHOLD, maximum=MAX_THRESHOLD)
        window = get_int(flat, "tts_conf_window", 2048, minimum=1, maximum=MAX_WINDOW)
        return cls(
            threshold=threshold,
            window=window,
            topk=get_int(flat, "tts_conf_topk", 20, minimum=1, maximum=MAX_TOPK),
            min_tokens=get_int(flat, "tts_conf_min_tokens", window, minimum=1, maximum=10_000_000),
        )


# --- the technique ---------------------------------------------------------------

_COUNT, _TOTAL, _LOWEST, _STOPPED = range(4)  # the packed statistics' columns
_RAISE = 1e4  # a stopped row's EOS logit: this far above the row's maximum


class ConfStop(LogitsTechnique):
    name = "conf"
    keys = CONF_KEYS
    key_specs = CONF_KEY_SPECS
    runs_before = ("*",)  # it measures the model's own logits, before any technique forces a token

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [
            {"tts_conf_window": 4},
            {"tts_conf_threshold": 5.0, "tts_conf_window": 3, "tts_conf_topk": 5, "tts_conf_min_tokens": 2},
            {"tts_conf_threshold": 100.0, "tts_conf_window": 2, "tts_conf_min_tokens": 1},  # stops at once: EOS raised
        ]

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> ConfParams | None:
        return ConfParams.parse(flat)

    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        n, dev = info.max_slots + 1, info.device
        self.eos = next((i for i in info.eos_token_ids if 0 <= i < info.vocab_size), None)
        mirror = {"device": dev, "pin_memory": info.pin_memory}
        self._thr = HostMirror(n, torch.float32, fill=float("-inf"), **mirror)  # -inf: never stops
        self._win = HostMirror(n, torch.int64, fill=1, **mirror)
        self._k = HostMirror(n, torch.int64, fill=1, **mirror)
        self._min = HostMirror(n, torch.int64, fill=1, **mirror)
        self._kmax = np.zeros(n, dtype=np.int64)  # top-k per slot on the host (0: not opted in)
        self._ring = torch.zeros(n, 0, dtype=torch.float32, device=dev)  # grows on admission to the largest window
        self._wsum = torch.zeros(n, dtype=torch.float64, device=dev)  # the window's running sum
        self._stats = torch.zeros(n, 4, dtype=torch.float64, device=dev)  # count, total, lowest, stopped
        self._stats[:, _LOWEST] = math.inf
        self._prev = self._stats.clone()  # the statistics before each slot's latest step
        on_cpu = dev.type == "cpu"
        self._stats_host = self._stats if on_cpu else torch.zeros(n, 4, dtype=torch.float64, pin_memory=info.pin_memory)
        self._prev_host = self._prev if on_cpu else torch.zeros(n, 4, dtype=torch.float64, pin_memory=info.pin_memory)
        self._iota = torch.arange(max(n, MAX_TOPK), device=dev)  # row and top-k indices, sliced per step
        self.active: set[int] = set()
        self.ws = Workspace(dev, info.pin_memory)

    @property
    def num_active(self) -> int:
        return len(self.active)

    # --- host side --------------------------------------------------------

    def set_slot(self, slot: int, params: ConfParams | None, request: Any) -> None:
        if params is not None and params.threshold is not None and self.eos is None:
            raise ValueError("tts_conf_threshold needs the model's EOS token id to stop a trace, and none is known")
        self.active.discard(slot)
        if params is not None and params.window > self._ring.shape[1]:  # admission, not per step
            ring = torch.zeros(self._ring.shape[0], params.window, dtype=torch.float32, device=self.info.device)
            ring[:, : self._ring.shape[1]] = self._ring
            self._ring = ring
        # a new or cleared slot starts from nothing (device writes, enqueued in order before the next apply)
        self._ring[slot] = 0.0
        self._wsum[slot] = 0.0
        fresh = torch.tensor([0.0, 0.0, math.inf, 0.0], dtype=torch.float64)
        for t in {id(x): x for x in (self._stats, self._prev, self._stats_host, self._prev_host)}.values():
            t[slot] = fresh
        thr, win, k, low = self._thr.np, self._win.np, self._k.np, self._min.np
        thr[slot], win[slot], k[slot], low[slot], self._kmax[slot] = -np.inf, 1, 1, 1, 0
        if params is not None:
            self.active.add(slot)
            thr[slot] = -np.inf if params.threshold is None else params.threshold
            win[slot], k[slot], low[slot], self._kmax[slot] = params.window, params.topk, params.min_tokens, params.topk
        for m in (self._thr, self._win, self._k, self._min):
            m.mark_dirty()

    report_fields = ("tokens", "total", "lowest", "stopped")

    def report_values(self, slots: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
        """The packed statistics of ``slots`` from the host copy (no sync; on a GPU it may lag by a step); with
        ``tokens``, a slot judged one step more than its request produced reports the step before."""
        out = self._stats_host.numpy()[slots]
        if tokens is not None:
            past = out[:, _COUNT] > np.asarray(tokens)
            if past.any():
                out[past] = self._prev_host.numpy()[slots[past]]
        out[self._kmax[slots] == 0] = np.nan
        return out

    @classmethod
    def report(cls, values: Mapping[str, float]) -> dict[str, Any]:
        """``{"stopped", "tokens", "lowest", "mean"}``: whether the threshold stopped the trace, the tokens judged,
        the lowest group confidence over full windows (the mean of all when the trace is shorter than the window)
        and the mean token confidence; the confidences are ``None`` when no token was judged."""
        count, total, lowest = int(values["tokens"]), values["total"], values["lowest"]
        mean = total / count if count else None
        low = (mean if math.isinf(lowest) else lowest) if count else None
        return {"stopped": bool(values["stopped"]), "tokens": count, "lowest": None if low is None else round(low, 6),
                "mean": None if mean is None else round(mean, 6)}

    def debug_counts(self) -> dict[str, int]:
        return {"slots": len(self.active)}

    # --- hot path ---------------------------------------------------------

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        if not self.active:
            return logits
        if host_slots is None:
            rows, kmax = None, int(self._kmax.max())
            slots = row_slots
        else:
            on = self._kmax[host_slots] > 0
            if not on.any():
                return logits
            kmax = int(self._kmax[host_slots].max())
            if on.all():
                rows, slots = None, row_slots
            else:
                rows = self.ws.upload("rows", np.flatnonzero(on))
                slots = row_slots.index_select(0, rows)
        self._step(logits, rows, slots, kmax)
        if self._stats_host is not self._stats:
            self._stats_host.copy_(self._stats, non_blocking=True)
            self._prev_host.copy_(self._prev, non_blocking=True)
        return logits

    def _step(self, logits: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor, kmax: int) -> None:
        n, vocab = logits.shape
        kmax = min(kmax, vocab)
        r = n if rows is None else rows.shape[0]
        if logits.dtype == torch.float32:
            src = logits if rows is None else torch.index_select(logits, 0, rows, out=self.ws.get("rows", r, vocab, logits.dtype))
        else:  # half precision: the rows in float32 once (CPUs reduce half precision slowly; sums must not accumulate in it)
            src = self.ws.get("rows32", r, vocab, torch.float32)
            src.copy_(logits if rows is None else logits.index_select(0, rows))
        # the log-probabilities in one fused pass into a reused float32 buffer (a log-sum-exp of its own would be
        # three passes over the rows: torch's log_softmax keeps each row in cache), then their top-k
        logp = torch.log_softmax(src, -1, out=self.ws.get("logp", r, vocab, torch.float32))
        top, ids = topk_rows(logp, kmax, None, self.ws)
        k = self._k.device_view()[slots]
        take = self._iota[:kmax].unsqueeze(0) < k.unsqueeze(1)
        conf = -(top * take).sum(-1) / k  # C_i of each row
        # the rolling window, for the rows whose trace is not stopped
        stats = self._stats[slots]
        live = stats[:, _STOPPED] == 0
        count = stats[:, _COUNT].to(torch.int64)
        win = self._win.device_view()[slots]
        at = count % win
        old = self._ring[slots, at]
        old = torch.where(count >= win, old, 0.0)
        self._ring[slots, at] = torch.where(live, conf, old)
        c64 = conf.double()
        wsum = self._wsum[slots] + torch.where(live, c64 - old.double(), 0.0)
        self._wsum[slots] = wsum
        count1 = count + live.to(torch.int64)
        group = wsum / torch.minimum(count1, win).clamp_min(1).double()
        full = live & (count1 >= win)
        lowest = torch.where(full, torch.minimum(stats[:, _LOWEST], group), stats[:, _LOWEST])
        fell = live & (count1 >= self._min.device_view()[slots]) & (group < self._thr.device_view()[slots].double())
        deliver = fell | ~live  # stopped now, or before while the engine masked EOS: this step's token is EOS
        new = torch.stack([count1.double(), stats[:, _TOTAL] + torch.where(live, c64, 0.0), lowest, deliver.double()], 1)
        self._prev[slots] = torch.where(live.unsqueeze(1), stats, self._prev[slots])  # a stopped slot's step changes nothing
        self._stats[slots] = new
        if self.eos is None:
            return
        dst_rows = rows if rows is not None else self._iota[:n] if n <= len(self._iota) else torch.arange(n, device=logits.device)
        cur = logits[dst_rows, self.eos]
        allowed = deliver & (cur > float("-inf"))
        if logits.dtype != torch.float16:  # float32, float64 and bfloat16 hold a raise of 1e4 above the row, divided by any temperature
            peak = src.gather(1, ids[:, :1]).squeeze(1)  # the row's maximum logit
            logits[dst_rows, self.eos] = torch.where(allowed, (peak + _RAISE).to(logits.dtype), cur)
        else:  # float16 cannot (its maximum is 65504): every other token of a stopped row goes
            sub = logits.index_select(0, dst_rows)
            sub.masked_fill_(allowed.unsqueeze(1), float("-inf"))
            sub[:, self.eos] = torch.where(allowed, 0.0, cur.float()).to(logits.dtype)
            logits.index_copy_(0, dst_rows, sub)

    def reference_row(self, logits_row: torch.Tensor, slot: int) -> torch.Tensor:
        """``apply``'s effect on one row (called after it): unchanged, except a stopped trace's EOS raised above the
        row's maximum."""
        z = logits_row.clone()
        if slot in self.active and self.eos is not None and float(self._stats_host[slot, _STOPPED]) and z[self.eos] > float("-inf"):
            z[self.eos] = z.max() + _RAISE
        return z


def token_confidence(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``C = -(1/k) * sum of the k largest log-probabilities`` of each row, in float64 (the reference)."""
    lp = torch.log_softmax(logits.double(), -1)
    return -lp.topk(min(k, lp.shape[-1]), -1).values.mean(-1)


def trace_statistics(confs: list[float], window: int) -> dict[str, float]:
    """The paper's per-trace statistics from its token confidences (float64): the lowest mean over full windows
    of ``window`` tokens (the mean of all when the trace is shorter), and the mean; the reference of
    :meth:`ConfStop.report`."""
    c = np.asarray(confs, dtype=np.float64)
    if len(c) < window:
        lowest = float(c.mean())
    else:
        s = np.concatenate([[0.0], np.cumsum(c)])
        lowest = float(((s[window:] - s[:-window]) / window).min())
    return {"lowest": lowest, "mean": float(c.mean())}
