"""RoE rosters: K requests decode one sequence, each step sampling from the mean of their distributions.

Paper: "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling
with RoE" (arXiv 2509.17238; no public code). The same token is computed K
times with different noisy expert routings (``tts_roe_tau`` per member, one
may be clean with tau 0), the K next-token distributions are aggregated, one
token is sampled and fed to all K.

Keys (:class:`tts_plugins.params.RosterParams`): ``tts_roe_roster`` (the
roster's name) and ``tts_roe_roster_size`` (K). A request with ``n = K`` and no
name is a roster by itself: the engines' front ends name its samples' roster
after the request (``tts_plugins.adapters.roster``), and give each sample its
own seed (``seed + i``) so that their routing noise differs.

Each step, for each roster, the members whose output has reached the
roster's frontier (normally all K) contribute ``softmax(z_k / T_k)`` (``T``
the member's temperature; 1 for greedy members) and the roster's
distribution is their **mean** (our choice: the paper says "aggregated"
without a formula; probability averaging is the standard mixture and keeps
every member's mass). The roster's token is then

* greedy rosters (the first member to join is greedy): ``argmax`` of the mean;
* sampling rosters: a Gumbel-max draw from the mean, with counter-based noise
  keyed by the roster's seed (the smallest member seed, else a hash of its
  name) and the roster's draw number, so a roster is reproducible from its
  seed and every member draws the same token.

Every member's row is then forced to that token (every other logit -inf), so
whatever sampler the engine runs, all members emit it: the roster stays one
sequence. Members' ``top_p``/``top_k``/``min_p`` would not apply to this
draw, so admission refuses them. Log-probabilities an engine reports are its
own (vLLM: the member's raw logits; with processed log-probs, 0 for the token).

Synchronization: the engines' schedulers hold a roster's members until all K
have arrived and admit them together (``tts_plugins.adapters.roster``). If a
member still falls behind (a prefill chunked over two steps, a preemption) it
is forced, step by step, to the tokens the roster already decided, and the
roster's later steps aggregate the members at the frontier: the roster never
waits on the batch and never splits. A member that leaves (finished, aborted)
leaves its roster; an empty roster is deleted, so its name can be reused.

Hot path: host work is numpy over the batch's member rows; device work is one
softmax over the member rows, an ``index_add`` per roster, and two in-place
writes. A batch without members returns at once.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tts_plugins.logits_processors.roe import gumbel
from tts_plugins.params import ROSTER_KEYS, RosterParams
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest

log = logging.getLogger("tts_plugins")

GATE_SEP = "\x1e"  # the schedulers' gate appends SEP + a formation number to a roster's name
_DRAW_STREAM = 1 << 20  # the noise stream of roster draws (router noise uses the layer numbers)


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
    argmax_invariant = False

    cross_request_state = True  # a member's row depends on the other members (for the conformance suite)

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
        self._free = list(range(info.max_slots - 1, -1, -1))
        self.key_np = np.zeros(info.max_slots, dtype=np.int64)
        self.draw_np = np.zeros(info.max_slots, dtype=np.int64)
        self.greedy_np = np.zeros(info.max_slots, dtype=bool)
        self.late_steps = 0  # member-steps forced behind the frontier (desynchronized members)
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
                self._free.append(r.index)
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
            if not self._free:
                raise ValueError("no free roster row")
            r = self.rosters[name] = _Roster(name=name, size=params.size, index=self._free.pop(), greedy=request.greedy)
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
        # aggregate in slot order, so the sums do not depend on where the engine put the rows
        order = np.lexsort((slots, ~front))
        rows, slots, front = rows[order], slots[order], front[order]
        nf = int(front.sum())
        tokens = np.empty(rows.size, dtype=np.int64)
        tokens[nf:] = self.force_np[slots[nf:]]
        self.late_steps += rows.size - nf
        dev = logits.device
        idx = torch.from_numpy(rows).to(dev)
        tok = torch.from_numpy(tokens).to(dev)
        if nf:
            groups, inverse, counts = np.unique(self.group_np[slots[:nf]], return_inverse=True, return_counts=True)
            inv_t = torch.from_numpy(self.inv_t_np[slots[:nf]]).to(dev)
            probs = torch.softmax(logits[idx[:nf]].float().mul_(inv_t.unsqueeze(1)), dim=-1)  # the gather is a fresh copy
            mean = torch.zeros(groups.size, logits.shape[1], dtype=torch.float32, device=dev)
            member_group = torch.from_numpy(inverse.reshape(-1)).to(dev)
            mean.index_add_(0, member_group, probs)
            mean /= torch.from_numpy(counts.astype(np.float32)).to(dev).unsqueeze(1)
            choice = mean.argmax(-1)
            sampling = np.flatnonzero(~self.greedy_np[groups])
            if sampling.size:  # Gumbel-max draws for the sampling rosters only
                sel = torch.from_numpy(sampling).to(dev)
                noise = gumbel(torch.from_numpy(self.key_np[groups[sampling]]).to(dev), torch.from_numpy(self.draw_np[groups[sampling]]).to(dev),
                               _DRAW_STREAM, logits.shape[1])
                choice[sel] = (mean[sel].double().log() + noise).argmax(-1)
            tok[:nf] = choice[member_group]
            self.draw_np[groups] += 1
        logits.index_fill_(0, idx, float("-inf"))
        logits[idx, tok] = 0.0
        return logits

    def reference_mean(self, logits: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """The roster distribution of one roster's member rows, one member at a time in float64 (for tests)."""
        acc = torch.zeros(logits.shape[1], dtype=torch.float64)
        for row, slot in enumerate(slots):
            acc += torch.softmax(logits[row].double() * float(self.inv_t_np[slot]), -1)
        return acc / len(slots)
