"""RoE rosters: K requests decode one sequence, each step sampling from the mean of their distributions.

Paper: "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling
with RoE" (arXiv 2509.17238; no public code). The same token is computed K
times with different noisy expert routings (``tts_roe_tau`` per member, one
may be clean with tau 0), the K next-token distributions are aggregated, one
token is sampled and fed to all K.

Keys (:class:`RosterParams`): ``tts_roe_roster`` (the roster's name) and
``tts_roe_roster_size`` (K). A request with ``n = K`` and no name is a roster
by itself: the core's per-sample front-end hook asks the roster patch
(:meth:`RosterPatchBase.sample_edit`) and names its samples' roster after the
request, and gives each sample its own seed (``seed + i``) so that their
routing noise differs.

Per-member tau in such a roster (the paper's roster has one clean member,
tau = 0, next to K-1 noisy ones). Through the same sample edit, each sample
gets its own RoE key, which the RoE router patch and the cache salt read as
they read any request's:

* by default, sample 0 is **clean** (``tts_roe_tau: 0``, or a list of zeros
  when the request gave ``tts_roe_tau_layers``) and samples 1..K-1 keep the
  request's ``tts_roe_tau`` / ``tts_roe_tau_layers``;
* ``tts_roe_roster_clean: false``: every sample keeps the request's tau (all
  noisy);
* ``tts_roe_roster_taus``: K floats in [0, 100], sample ``i`` gets
  ``tts_roe_tau: taus[i]`` (one tau for every MoE layer); it overrides the
  clean default and the request's ``tts_roe_tau``, and cannot be combined with
  ``tts_roe_tau_layers``.

Both keys are for a request's own samples only: a roster of separate requests
(``tts_roe_roster`` named) sets each member's tau on the member, so admission
refuses them there. The clean member routes exactly like a plain request, so
its KV carries no RoE cache salt and may share prefixes with plain requests;
each noisy member's KV is salted by its own tau and seed.

KV cache: the paper names its KV strategy "Clean Cache". Its full text was not
available to us; its abstract (arXiv 2509.17238) says only "we introduce an
efficient batching strategy and a specialized KV-caching mechanism that
minimizes compute and memory overhead", and a third-party summary
(sciencestack.ai/paper/2509.17238) calls it "a Clean Cache KV strategy to
manage compute and memory". The name suggests one KV cache computed with the
clean routing (tau = 0), which the K noisy proposals of each token would
attend to, so that only the current token is computed K times. That is a
reading; we found no source that specifies it. We do **not** do that: each
member keeps its own KV, computed under its own routing at every position
(as if the K members were K full models), so a roster holds K caches, and a
noisy member attends to its own noisy keys and values. The results of the two
schemes differ, so ours is not claimed to reproduce the paper's numbers; the
engine tests compare the roster with a reference that recomputes every
member's whole sequence under its own routing.

Each step, for each roster, the members whose output has reached the
roster's frontier (normally all K) contribute ``softmax(z_k / T_k)`` (``T``
the member's temperature; 1 for greedy members) and the roster's
distribution is their **mean** (our choice: the paper says "aggregated"
without a formula; probability averaging is the standard mixture and keeps
every member's mass). The roster's token is then

* greedy rosters (the first member to join is greedy): ``argmax`` of the mean;
* sampling rosters: an inverse-CDF draw from the mean, with one
  counter-based uniform keyed by the roster's seed (the smallest member seed,
  else a hash of its name) and the roster's draw number, so a roster is
  reproducible from its seed and every member draws the same token.

Every member's row is then forced to that token (every other logit -inf), so
whatever sampler the engine runs, all members emit it: the roster stays one
sequence. Members' ``top_p``/``top_k``/``min_p`` would not apply to this
draw, so admission refuses them. Log-probabilities an engine reports are its
own (vLLM: the member's raw logits; with processed log-probs, 0 for the token).

Synchronization: the engines' schedulers hold a roster's members until all K
have arrived and admit them together (:class:`RosterGate`, hooked into each
engine's scheduler by ``tts_plugins.adapters.roster``). If a
member still falls behind (a prefill chunked over two steps, a preemption) it
is forced, step by step, to the tokens the roster already decided, and the
roster's later steps aggregate the members at the frontier: the roster never
waits on the batch and never splits. A member that leaves (finished, aborted)
leaves its roster; an empty roster is deleted, so its name can be reused.

Hot path: host work is numpy over the batch's member rows; device work is one
softmax over the member rows, one sum per roster (a cumulative sum and a
search for the sampling ones), and two in-place writes, in scratch buffers
reused from step to step. A batch without members returns at once.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tts_plugins.noise import uniform
from tts_plugins.params import Key, get_bool, get_int, get_number_list, get_text, show
from tts_plugins.reduce import argmax_rows
from tts_plugins.services import SampleEdit
from tts_plugins.slots import SlotAllocator, Workspace
from tts_plugins.technique import GREEDY_TEMPERATURE, EngineInfo, LogitsTechnique, ModelPatch, SlotRequest

log = logging.getLogger("tts_plugins")

GATE_SEP = "\x1e"  # the schedulers' gate appends SEP + a formation number to a roster's name
_DRAW_STREAM = 1 << 20  # the noise stream of roster draws (router noise uses the layer numbers)

ROSTER_MAX_SIZE = 64
ROSTER_MAX_NAME = 200
ROSTER_MAX_TAU = 100.0  # RoE's bound on a tau (tts_roe_tau)

ROSTER_KEY_SPECS = (
    Key("tts_roe_roster", f"non-empty string (at most {ROSTER_MAX_NAME} characters)", None,
        "The roster's name: the requests that share it (and tts_roe_roster_size) decode one sequence together, from "
        "the mean of their distributions (absent with n = tts_roe_roster_size: the request's own samples form the "
        "roster)."),
    Key("tts_roe_roster_size", f"int in [2, {ROSTER_MAX_SIZE}]", None,
        "K, the roster's members; required by every roster key. The members are held back until all K have arrived."),
    Key("tts_roe_roster_clean", "bool", True,
        "For a request's own samples: sample 0 routes clean (tau 0) and the others keep the request's tts_roe_tau / "
        "tts_roe_tau_layers; false makes every sample noisy. Refused with tts_roe_roster."),
    Key("tts_roe_roster_taus", f"list of K numbers in [0, {ROSTER_MAX_TAU:g}]", None,
        "For a request's own samples: sample i routes with tau taus[i] in every MoE layer, overriding "
        "tts_roe_roster_clean and tts_roe_tau. Refused with tts_roe_roster and with tts_roe_tau_layers."),
)
ROSTER_KEYS = frozenset(k.name for k in ROSTER_KEY_SPECS)
ROSTER_CHILD_PREFIX = "n:"  # names the engines' front ends give the samples of one request (n = K)
ROE_PATCH = "roe"  # the name RoE's model patch parses a request's tts_roe_tau / tts_roe_tau_layers under


@dataclass(frozen=True)
class RosterParams:
    """A RoE roster: ``size`` requests (or the ``n = size`` samples of one request) decode one sequence together.

    ``tts_roe_roster``: the roster's name (any string the members share; omit it with ``n = size`` and the
    request's samples form the roster). ``tts_roe_roster_size``: K in [2, 64], required.

    For a request's own samples only (refused with ``tts_roe_roster``, where each request sets its own tau):
    ``tts_roe_roster_clean`` (bool, default true): sample 0 routes clean (tau 0) and the others keep the request's
    ``tts_roe_tau`` / ``tts_roe_tau_layers``; false: every sample keeps them. ``tts_roe_roster_taus``: K floats in
    [0, 100], sample ``i`` routes with tau ``taus[i]`` in every MoE layer; it overrides both the clean default and
    ``tts_roe_tau`` (and is refused with ``tts_roe_tau_layers``). ``clean`` is None when the request did not send
    ``tts_roe_roster_clean`` (then true).
    """

    name: str | None
    size: int
    clean: bool | None = None
    taus: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> RosterParams | None:
        given = sorted(k for k in flat if k in ROSTER_KEYS)
        if not given:
            return None
        if "tts_roe_roster_size" not in flat:
            key = "tts_roe_roster" if "tts_roe_roster" in flat else given[0]
            raise ValueError(f"{key}={show(flat[key])} needs tts_roe_roster_size "
                             f"(the number of members, 2 to {ROSTER_MAX_SIZE})")
        size = int(get_int(flat, "tts_roe_roster_size", minimum=2, maximum=ROSTER_MAX_SIZE))
        name = None
        if "tts_roe_roster" in flat:
            name = get_text(flat, "tts_roe_roster", "", allow_empty=False)
            if len(name) > ROSTER_MAX_NAME:
                raise ValueError(f"tts_roe_roster must be at most {ROSTER_MAX_NAME} characters, got {len(name)} characters")
        clean = get_bool(flat, "tts_roe_roster_clean") if "tts_roe_roster_clean" in flat else None
        taus = None
        if "tts_roe_roster_taus" in flat:
            taus = get_number_list(flat, "tts_roe_roster_taus", "taus", max_items=ROSTER_MAX_SIZE, maximum=ROSTER_MAX_TAU,
                                   note=" (one per member)")
            if len(taus) != size:
                raise ValueError(f"tts_roe_roster_taus must hold one tau per member, {size} for tts_roe_roster_size={size}, "
                                 f"got {len(taus)} in {show(flat['tts_roe_roster_taus'])}")
        return cls(name, size, clean, taus)

    def check_request(self, request: Any) -> None:
        """Admission checks against the engine's sampling parameters (vLLM's or SGLang's)."""
        n = int(getattr(request, "n", 1) or 1)
        if self.name is None and n != self.size:
            raise ValueError(f"tts_roe_roster_size={self.size} without tts_roe_roster makes the request's own samples the roster, "
                             f"so n must be {self.size}, got n={n}")
        if self.name is not None and (self.taus is not None or self.clean is not None):
            key, value = ("tts_roe_roster_taus", list(self.taus)) if self.taus is not None else ("tts_roe_roster_clean", self.clean)
            raise ValueError(f"{key}={show(value)} applies to the samples of one request (n = tts_roe_roster_size, without "
                             f"tts_roe_roster); in a roster of separate requests (tts_roe_roster={show(self.name)}) each request "
                             f"sets its own tts_roe_tau")
        if self.taus is not None and "tts_roe_tau_layers" in _flat_of(request):
            raise ValueError(f"tts_roe_roster_taus={show(list(self.taus))} gives each member one tau for every MoE layer; it "
                             f"cannot be combined with tts_roe_tau_layers (send one of them)")
        temperature = getattr(request, "temperature", None)
        if temperature is not None and temperature >= GREEDY_TEMPERATURE and getattr(request, "top_k", None) != 1:
            top_p = getattr(request, "top_p", 1.0)
            min_p = getattr(request, "min_p", 0.0)
            top_k = getattr(request, "top_k", 0)
            if (top_p is not None and top_p < 1.0) or (min_p is not None and min_p > 0.0) or (top_k is not None and 1 < top_k < (1 << 30)):
                raise ValueError(f"tts_roe_roster_size={self.size}: a roster samples from the mean of its members' distributions at the "
                                 f"request temperature; top_p, top_k and min_p are not applied to that draw, so send them unset "
                                 f"(got top_p={top_p!r}, top_k={top_k!r}, min_p={min_p!r})")

    def member_tau(self, index: int, roe: Any) -> dict[str, Any]:
        """The RoE key of sample ``index`` of a request whose samples form this roster ({}: the request's own).

        ``roe``: the request's parsed RoE parameters (``tau``, ``layers``), or None when it routes plainly.
        """
        if self.taus is not None:
            return {"tts_roe_tau": self.taus[index]} if index < len(self.taus) else {}
        if index != 0 or self.clean is False or roe is None:
            return {}
        layers = getattr(roe, "layers", None)
        return {"tts_roe_tau_layers": [0.0] * len(layers)} if layers is not None else {"tts_roe_tau": 0.0}


def _flat_of(request: Any) -> Mapping[str, Any]:
    """The flat ``tts_*`` arguments of an engine's sampling parameters (vLLM ``extra_args``, SGLang ``custom_params``)."""
    for attr in ("extra_args", "custom_params"):
        flat = getattr(request, attr, None)
        if isinstance(flat, Mapping):
            return flat
    return {}


def base_name(name: str) -> str:
    return name.split(GATE_SEP, 1)[0]


@dataclass
class _Roster:
    name: str
    size: int
    index: int  # row of the per-roster buffers
    greedy: bool
    seeds: list[int] = field(default_factory=list)
    members: dict[int, _Member] = field(default_factory=dict)
    decided: list[int] = field(default_factory=list)  # the roster's sequence so far
    draws: int = 0
    warned: bool = False

    @property
    def key(self) -> int:
        return min(self.seeds) % (1 << 62) if self.seeds else zlib.crc32(base_name(self.name).encode())


@dataclass
class _Member:
    roster: _Roster
    pos: int = 0  # tokens this member has emitted


class RoERoster(LogitsTechnique):
    name = "roe_roster"
    keys = ROSTER_KEYS
    key_specs = ROSTER_KEY_SPECS
    argmax_invariant = False

    cross_request_state = True  # a member's row depends on the other members (for the conformance suite)

    @classmethod
    def placement(cls, params: RosterParams) -> str:
        """A roster's members run in one engine instance: one data-parallel rank (a request's own samples when
        the roster is not named)."""
        return "" if params.name is None else f"tts_roe_roster:{params.name}"

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [{"tts_roe_roster": "a", "tts_roe_roster_size": 2}, {"tts_roe_roster": "b", "tts_roe_roster_size": 3}]

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> RosterParams | None:
        return RosterParams.parse(flat)

    @classmethod
    def check_request(cls, params: RosterParams, request: Any) -> None:
        params.check_request(request)

    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        n = info.max_slots + 1
        self.member_np = np.zeros(n, dtype=bool)
        self.front_np = np.zeros(n, dtype=bool)  # the member has reached its roster's frontier
        self.group_np = np.zeros(n, dtype=np.int64)
        self.force_np = np.full(n, -1, dtype=np.int64)  # a member behind the frontier: the decided token it emits
        self.inv_t_np = np.ones(n, dtype=np.float32)
        self.members: dict[int, _Member] = {}
        self.rosters: dict[str, _Roster] = {}
        self.roster_rows = SlotAllocator(info.max_slots, what="rosters", owner="roe_roster")  # a row of key/draw/greedy per roster
        self.key_np = np.zeros(info.max_slots, dtype=np.int64)
        self.draw_np = np.zeros(info.max_slots, dtype=np.int64)
        self.greedy_np = np.zeros(info.max_slots, dtype=bool)
        self.late_steps = 0  # member-steps forced behind the frontier (desynchronized members)
        self.ws = Workspace(info.device, info.pin_memory)  # the step's scratch: reused, so a step allocates nothing
        self._warned_no_host = False

    @property
    def num_active(self) -> int:
        return len(self.members)

    # --- host side --------------------------------------------------------

    def set_slot(self, slot: int, params: RosterParams | None, request: SlotRequest) -> None:
        old = self.members.pop(slot, None)
        if old is not None:
            r = old.roster
            r.members.pop(slot, None)
            if not r.members:
                del self.rosters[r.name]
                self.roster_rows.free(r.index)
            else:
                self._publish(r)
        self.member_np[slot] = self.front_np[slot] = False
        self.force_np[slot] = -1
        if params is None:
            return
        name = params.name
        if name is None:
            raise ValueError("tts_roe_roster_size without a roster name reached the engine (the front end names a request's samples); it runs plain")
        r = self.rosters.get(name)
        if r is None:
            r = self.rosters[name] = _Roster(name=name, size=params.size, index=self.roster_rows.take(), greedy=request.greedy)
            self.greedy_np[r.index] = r.greedy
            self.draw_np[r.index] = 0
        if (len(r.members) >= r.size or params.size != r.size) and not r.warned:
            # the schedulers' gate forms rosters of exactly K under unique names; without it, a name reused by
            # concurrent requests makes one larger roster, which still decodes one sequence
            r.warned = True
            log.warning("tts_plugins: roster %r (size %d) gets a member beyond its size or with size %d; it aggregates all %d",
                        base_name(name), r.size, params.size, len(r.members) + 1)
        if request.seed is not None:
            r.seeds.append(int(request.seed))
        self.key_np[r.index] = r.key
        self.members[slot] = _Member(r)
        r.members[slot] = self.members[slot]
        self.member_np[slot] = True
        self.group_np[slot] = r.index
        self.inv_t_np[slot] = 1.0 if request.greedy or request.temperature <= 0 else 1.0 / request.temperature
        self._publish(r)

    def on_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        m = self.members.get(slot)
        if m is None:
            return
        r = m.roster
        for t in token_ids:
            if m.pos == len(r.decided):
                r.decided.append(int(t))
            elif m.pos < len(r.decided) and r.decided[m.pos] != t and not r.warned:
                r.warned = True
                log.warning("tts_plugins: a member of roster %r emitted %d where the roster decided %d (another technique forced it?)",
                            base_name(r.name), t, r.decided[m.pos])
            m.pos += 1
        self._publish(r)

    def _publish(self, r: _Roster) -> None:
        # a member's output never runs past the roster's sequence (its tokens extend it), so the frontier is its end
        for slot, m in r.members.items():
            self.front_np[slot] = m.pos >= len(r.decided)
            self.force_np[slot] = r.decided[m.pos] if m.pos < len(r.decided) else -1

    def debug_counts(self) -> dict[str, int]:
        """Live members and rosters: both return to 0 when every request has left."""
        return {"members": len(self.members), "rosters": len(self.rosters)}

    # --- hot path ---------------------------------------------------------

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        if not self.members:
            return logits
        if host_slots is None:
            # the members' rows are found on the host; an adapter without the host map (none of ours) gets plain rows
            if not self._warned_no_host:
                self._warned_no_host = True
                log.error("tts_plugins: RoE rosters need the batch's row map on the host; roster requests run plain")
            return logits
        rows = np.flatnonzero(self.member_np[host_slots])
        if rows.size == 0:
            return logits
        slots = host_slots[rows]
        front = self.front_np[slots]
        # frontier members first, grouped by roster with the sampling rosters first, members in slot order: the
        # sums do not depend on where the engine put the rows, and the sampling rosters' sums are one block
        group = self.group_np[slots]
        order = np.lexsort((slots, group, self.greedy_np[group], ~front))
        rows, slots, front, group = rows[order], slots[order], front[order], group[order]
        nf = int(front.sum())
        tokens = np.empty(rows.size, dtype=np.int64)
        tokens[nf:] = self.force_np[slots[nf:]]
        self.late_steps += rows.size - nf
        ws, vocab = self.ws, logits.shape[1]
        idx = ws.upload("rows", rows)
        tok = ws.upload("tokens", tokens)
        if nf:
            groups, first, inverse, counts = np.unique(group[:nf], return_index=True, return_inverse=True, return_counts=True)
            # np.unique sorts the rosters by index; keep them in member order (sampling rosters first)
            rank = np.argsort(first, kind="stable")
            groups, counts = groups[rank], counts[rank]
            inverse = np.argsort(rank)[inverse.reshape(-1)]
            g = groups.size
            inv_t = self.inv_t_np[slots[:nf]]
            tempered = np.flatnonzero(inv_t != 1.0)
            total = ws.get("sum", g, vocab, torch.float32)
            member_roster = ws.upload("member_roster", inverse)
            k = int(counts[0])
            # every row of the batch a frontier member: the softmax runs in place in the logits (every row is
            # overwritten below), with no gathered copy; the rosters' sums then add the rows where they are
            direct = nf == logits.shape[0] and logits.dtype == torch.float32 and logits.is_contiguous()
            if direct:
                if tempered.size:
                    by_row = np.ones(nf, dtype=np.float32)
                    by_row[rows[:nf]] = inv_t
                    logits.mul_(ws.upload("inv_t", by_row.reshape(-1, 1)))
                roster_of_row = np.empty(nf, dtype=np.int64)
                roster_of_row[rows[:nf]] = inverse
                probs = torch.ops.aten.softmax.int_out(logits, -1, None, out=logits)
                total.zero_().index_add_(0, ws.upload("roster_of_row", roster_of_row), probs)
            else:
                # the one softmax: the frontier members' rows, tempered, in float32, in place in one reused buffer
                scaled = ws.get("scaled", nf, vocab, torch.float32)
                if logits.dtype == torch.float32:
                    torch.index_select(logits, 0, idx[:nf], out=scaled)
                else:
                    scaled.copy_(torch.index_select(logits, 0, idx[:nf], out=ws.get("gathered", nf, vocab, logits.dtype)))
                if tempered.size:  # the sampling rosters come first, greedy members are untempered: a prefix of the rows
                    m = int(tempered[-1]) + 1
                    scaled[:m].mul_(ws.upload("inv_t", inv_t[:m].reshape(-1, 1)))
                probs = torch.ops.aten.softmax.int_out(scaled, -1, None, out=scaled)
                # each roster's sum of its members' distributions (the mean times K: same argmax, same draw)
                if np.all(counts == k):  # every roster complete at the frontier (the usual case): k - 1 vectorized adds
                    by_member = probs.view(g, k, vocab)
                    if k == 1:
                        total.copy_(by_member[:, 0])
                    else:
                        torch.add(by_member[:, 0], by_member[:, 1], out=total)
                        for j in range(2, k):  # over the members of a roster (k <= the roster size), not over requests
                            total.add_(by_member[:, j])
                else:
                    total.zero_().index_add_(0, member_roster, probs)
            choice = ws.get("choice", 1, g, torch.int64)[0]
            ns = int((~self.greedy_np[groups]).sum())  # the first ns rosters sample
            if ns < g:  # the greedy rosters' argmax
                argmax_rows(total[ns:], out=choice[ns:])
            if ns:  # inverse-CDF draws: one counter-based uniform per roster, keyed by (roster seed, draw number)
                cdf = torch.cumsum(total[:ns], -1, out=ws.get("cdf", ns, vocab, torch.float32))
                u = uniform(ws.upload("keys", self.key_np[groups[:ns]]), ws.upload("draws", self.draw_np[groups[:ns]]), _DRAW_STREAM, 1)
                target = u.float().clamp_(max=1.0 - 2.0**-23).mul_(cdf[:, -1:])
                drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
                choice[:ns] = drawn[:, 0]
            tok[:nf] = choice[member_roster]
            self.draw_np[groups] += 1
        if rows.size == logits.shape[0]:
            logits.fill_(float("-inf"))
        else:
            logits.index_fill_(0, idx, float("-inf"))
        logits[idx, tok] = 0.0
        return logits

    def reference_mean(self, logits: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """The roster distribution of one roster's member rows, one member at a time in float64 (for tests)."""
        acc = torch.zeros(logits.shape[1], dtype=torch.float64)
        for row, slot in enumerate(slots):
            acc += torch.softmax(logits[row].double() * float(self.inv_t_np[slot]), -1)
        return acc / len(slots)


# --- the schedulers' gate and the front ends' naming (engine-neutral; tts_plugins.adapters.roster hooks them) ---


def roster_of(extra: Any) -> tuple[str, int] | None:
    """``(name, size)`` of a request the gate must hold (a member of a named roster not formed yet), else None.

    ``extra`` is the request's flat parameters, which admission validated; they are read with the parser.
    """
    if not isinstance(extra, Mapping) or "tts_roe_roster" not in extra:
        return None
    name = extra["tts_roe_roster"]
    if isinstance(name, str) and GATE_SEP in name:  # the gate formed this roster: never held again
        return None
    params = RosterParams.parse({k: v for k, v in extra.items() if k in ROSTER_KEYS})
    return None if params is None or params.name is None else (params.name, params.size)


def renamed(extra: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A member's flat parameters with its roster's (formed) name."""
    return {**extra, "tts_roe_roster": name}


class RosterGate:
    """Members held until their roster is complete: ``name -> [(request id, item), ...]``.

    Each formed roster gets a unique name (the client's name, :data:`GATE_SEP` and a formation number), so a
    name reused by later (or concurrent, beyond K) requests forms new rosters.
    """

    def __init__(self) -> None:
        self.held: dict[str, list[tuple[str, Any]]] = {}
        self._formed = itertools.count()

    def add(self, name: str, size: int, rid: str, item: Any) -> tuple[str, list[Any]] | None:
        """Hold ``item``; when it completes its roster, return the roster's unique name and its members in arrival order."""
        members = self.held.setdefault(name, [])
        members.append((rid, item))
        if len(members) < size:
            return None
        del self.held[name]
        return f"{name}{GATE_SEP}{next(self._formed)}", [it for _, it in members]

    def drop(self, match: Callable[[str], bool]) -> list[Any]:
        """Remove (and return) the held members whose request id matches."""
        out = []
        for name in list(self.held):
            keep = [(rid, it) for rid, it in self.held[name] if not match(rid)]
            out += [it for rid, it in self.held[name] if match(rid)]
            if keep:
                self.held[name] = keep
            else:
                del self.held[name]
        return out

    def __len__(self) -> int:
        return sum(len(v) for v in self.held.values())

    def debug_counts(self) -> dict[str, int]:
        """Members held back: 0 once every roster is complete or its members were aborted."""
        return {"roster_gate.held": len(self)}


class RosterPatchBase(ModelPatch):
    """What the engines' roster patches share: the samples of a request with ``n = K`` and no name form its roster.

    The keys belong to the technique (:class:`RoERoster`); the patch owns none. Subclasses hook their engine's
    scheduler with a :class:`RosterGate`.
    """

    name = "roe_roster_gate"

    def sample_edit(self, parsed: Mapping[str, Any], index: int, parent_id: str | None) -> SampleEdit | None:
        """Sample ``index`` of a request whose samples form a roster: the roster is named after the request, the
        sample gets its own seed (``seed + index``) so that the members' routing noise differs, and its own tau
        (:meth:`RosterParams.member_tau`: sample 0 clean by default, or ``tts_roe_roster_taus[index]``)."""
        params = parsed.get(RoERoster.name)
        if params is None or params.name is not None or parent_id is None:
            return None
        extra = {"tts_roe_roster": ROSTER_CHILD_PREFIX + parent_id, **params.member_tau(index, parsed.get(ROE_PATCH))}
        return SampleEdit(extra=extra, own_seed=True)
