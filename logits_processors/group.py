"""Group early stop: First Finish Search and short-m@k, inside the engine.

Keys (see :class:`GroupParams`): ``tts_group`` (the group's
id), ``tts_group_stop_after`` (m, default 1), ``tts_group_finish`` (``"think"``:
a member finishes when it closes its thinking block, as short-m@k counts;
``"eos"``: when it ends, as First Finish Search counts; default ``"think"``),
``tts_group_stop_text`` (forced before EOS on stopped members, default empty).

Requests that carry the same ``tts_group`` form a group (one request with
``n > 1`` is a group by itself: its samples share the parameters). Once
``m`` members have finished, every member that has not finished is ended at
once: its next tokens are forced to ``tts_group_stop_text`` and EOS, without a
client round trip. The finished members go on (with ``"think"`` they write
their answers), and the client votes among them (short-m@k: majority, ties to
the shortest; ``tts_plugins.client.aggregate``). A stopped member's response ends
with finish reason ``stop``; it is recognisable by not having finished (no
end-of-thinking string, or the stop text).

Group state is cross-request and lives here, in the engine-neutral technique:
a group exists while it has members in the engine; a member that leaves
(finished, aborted, preempted) leaves its group; an empty group is deleted,
so an id can be reused later without inheriting anything. Members that join a
group which has already stopped are stopped at once. Cost: host work on the
tokens of grouped requests only; ``apply`` forces rows only while a stop is
being delivered, and returns at once otherwise.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tts_plugins.forcing import ForcedTokens
from tts_plugins.params import Key, get_choice, get_int, get_text, show
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest
from tts_plugins.text import StreamMatcher, cached_token_texts, encode, thinking_state

# --- parameters (parsed at admission, torch-free) --------------------------------

# Every key forces the stop text inside the thinking block (GroupStop.forcing: tts_group_finish "eos" acts in the answer).
GROUP_KEY_SPECS = (
    Key("tts_group", "non-empty string (at most 128 characters)", None,
        "The group's id: requests with the same id form a group (one request with n > 1 is a group by itself); "
        "switches the technique on.", forces="thinking"),
    Key("tts_group_stop_after", "int in [1, 100000]", 1,
        "m: once m members have finished, every unfinished member ends at once.", forces="thinking"),
    Key("tts_group_finish", "one of 'think', 'eos'", "think",
        "What counts as finished: 'think' (closed its thinking, as short-m@k counts) or 'eos' (ended, First Finish "
        "Search).", forces="thinking"),
    Key("tts_group_stop_text", "string", "",
        "Forced before EOS on stopped members, so the client can tell them apart.", forces="thinking"),
)
GROUP_KEYS = frozenset(k.name for k in GROUP_KEY_SPECS)


@dataclass(frozen=True)
class GroupParams:
    """Group early stop (First Finish Search, short-m@k) options of one request."""

    group: str
    stop_after: int = 1
    finish: str = "think"  # what counts as a member finishing: "think" (end of thinking) or "eos"
    stop_text: str = ""

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> GroupParams | None:
        if "tts_group" not in flat:
            for key in sorted(GROUP_KEYS - {"tts_group"}):
                if key in flat:
                    raise ValueError(f"{key} needs tts_group (the group's id), got {key}={show(flat[key])} alone")
            return None
        group = flat["tts_group"]
        if not isinstance(group, str) or not group or len(group) > 128 or "\x00" in group:
            raise ValueError(f"tts_group must be a non-empty string of at most 128 characters without NUL, got {show(group)}")
        return cls(
            group=group,
            stop_after=get_int(flat, "tts_group_stop_after", 1, minimum=1, maximum=100_000),
            finish=get_choice(flat, "tts_group_finish", "think", ("think", "eos")),
            stop_text=get_text(flat, "tts_group_stop_text", ""),
        )


# --- the technique ---------------------------------------------------------------


@dataclass
class _Group:
    stop_after: int
    members: set[int] = field(default_factory=set)
    finished: int = 0
    stopped: bool = False


@dataclass
class _Member:
    params: GroupParams
    group: _Group
    matcher: StreamMatcher
    finished: bool = False
    queue: deque[int] = field(default_factory=deque)
    history: int = 0  # tokens of a resumed member's committed output still to be fed as history (set_slot counted them)


STOPPED_MEMORY = 4096  # how many emptied stopped groups are remembered for members that resume after a preemption


class GroupStop(LogitsTechnique):
    name = "group"
    keys = GROUP_KEYS
    key_specs = GROUP_KEY_SPECS

    @classmethod
    def forcing(cls, params: GroupParams, flat: Mapping[str, Any]) -> dict[str, str]:
        """Every key forces its stop text inside the thinking block; with ``tts_group_finish: "eos"`` members are
        ended inside the answer, where a grammar rules and a tool call is written."""
        out = dict.fromkeys(flat, "thinking")
        if params.finish == "eos":
            out["tts_group_finish"] = "answer"
        return out
    argmax_invariant = False

    cross_request_state = True  # members of a group see each other's finish (for the conformance suite)

    @classmethod
    def placement(cls, params: GroupParams) -> str:
        """A group's members (and their samples) run in one engine instance: one data-parallel rank."""
        return f"tts_group:{params.group}"

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        """Valid parameter sets covering this technique's modes, for the conformance suite."""
        return [
            {"tts_group": "a"}, {"tts_group": "b", "tts_group_stop_after": 2},
            {"tts_group": "a", "tts_group_finish": "eos", "tts_group_stop_text": " stop"},
        ]

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> GroupParams | None:
        return GroupParams.parse(flat)

    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        self.texts = cached_token_texts(info)
        self.eos = [i for i in info.eos_token_ids if 0 <= i < info.vocab_size]
        self.forced = ForcedTokens(info.max_slots, info.device, info.pin_memory)
        self.members: dict[int, _Member] = {}
        self.groups: dict[str, _Group] = {}
        # groups that stopped and then emptied (their last members left, perhaps preempted): a member that resumes into
        # one is stopped again; a new request with that id starts a new group (and the id is forgotten)
        self.stopped_ids: OrderedDict[str, None] = OrderedDict()

    @property
    def num_active(self) -> int:
        return len(self.members)

    # --- host side --------------------------------------------------------

    def set_slot(self, slot: int, params: GroupParams | None, request: SlotRequest) -> None:
        old = self.members.pop(slot, None)
        if old is not None:
            old.group.members.discard(slot)
            if not old.group.members:
                self.groups.pop(old.params.group, None)
                if old.group.stopped:
                    self.stopped_ids[old.params.group] = None
                    while len(self.stopped_ids) > STOPPED_MEMORY:
                        self.stopped_ids.popitem(last=False)
        if params is not None:
            if not self.eos:
                raise ValueError("tts_group needs the model's EOS token id to stop members, and none is known")
            history = list(request.output_ids)
            group = self.groups.get(params.group)
            if group is None:
                group = self.groups[params.group] = _Group(stop_after=params.stop_after)
                if history:  # a member resuming into a group that stopped while it was away is stopped again
                    group.stopped = self.stopped_ids.pop(params.group, 0) is None
                else:  # a new request (or one preempted before its first token) with this id: a new group
                    self.stopped_ids.pop(params.group, None)
            prompt = self.info.tokenizer.decode(list(request.prompt_ids), skip_special_tokens=False)
            _, tail = thinking_state(prompt, self.info.think_start, self.info.think_end)
            member = _Member(params=params, group=group, matcher=StreamMatcher(self.info.think_start, self.info.think_end, tail))
            self.members[slot] = member
            group.members.add(slot)
            # a resumed member: did it finish before it left? (the adapter feeds these again next.) The end of its
            # output that is the start of a stop being forced is not its own text: it cannot finish it
            forced = self._stop_done(member, history) if group.stopped else 0
            for t in history[: len(history) - forced]:
                if self._finishes(member, t):
                    member.finished = True
                    break
            member.history = len(history)
            if group.stopped and not member.finished:
                self._stop(member, history)
        self._publish(slot)

    def _finishes(self, member: _Member, t: int) -> bool:
        done = t in self.eos
        if member.params.finish == "think" and not done:
            done = "end" in member.matcher.feed(self.texts[t] if 0 <= t < len(self.texts) else "")
        return done

    def on_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        member = self.members.get(slot)
        if member is None:
            return
        stopped_now: list[_Group] = []
        if member.history:  # a resumed member's committed output: set_slot accounted for it already
            skip = min(member.history, len(token_ids))
            member.history -= skip
            token_ids = token_ids[skip:]
        for t in token_ids:
            if member.queue and member.queue[0] == t:
                member.queue.popleft()
                continue
            if member.finished:
                continue
            # A member with a stop pending may still finish with this token: it was sampled in the same
            # step as the finish that stopped the group (members of a step are fed one after another).
            # Then it counts as finished, like the others of that step; otherwise the stop stays.
            if self._finishes(member, t):
                member.finished = True
                member.queue.clear()
                g = member.group
                g.finished += 1
                if g.finished >= g.stop_after and not g.stopped:
                    g.stopped = True
                    stopped_now.append(g)
        self._publish(slot)
        for g in stopped_now:
            for other in g.members:
                m = self.members[other]
                if not m.finished and not m.queue:
                    self._stop(m)
                    self._publish(other)

    def _stop(self, member: _Member, history: Sequence[int] = ()) -> None:
        """Force the stop text and EOS; a resumed member whose output already ends with the start of them (it was
        stopped when it was preempted) gets the rest."""
        seq = self._stop_seq(member)
        member.queue.extend(seq[self._stop_done(member, history):])

    def _stop_seq(self, member: _Member) -> list[int]:
        return encode(self.info.tokenizer, member.params.stop_text) + [self.eos[0]]

    def _stop_done(self, member: _Member, history: Sequence[int]) -> int:
        """How much of the stop (text and EOS) ``history`` already ends with."""
        seq = self._stop_seq(member)
        return next((k for k in range(min(len(seq) - 1, len(history)), 0, -1) if list(history[-k:]) == seq[:k]), 0)

    def _publish(self, slot: int) -> None:
        member = self.members.get(slot)
        tok = member.queue[0] if member is not None and member.queue else -1
        self.forced.set(slot, tok)

    def debug_counts(self) -> dict[str, int]:
        """Live members and groups: both return to 0 when every request has left."""
        return {"members": len(self.members), "groups": len(self.groups)}

    # --- hot path ---------------------------------------------------------

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        return self.forced.apply(logits, row_slots, host_slots)
