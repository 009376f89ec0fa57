"""RoE rosters in the engines' schedulers and front ends: members start together, a request's samples form one.

The aggregation itself is the engine-neutral technique
:mod:`tts_plugins.logits_processors.roster`; this module makes its members
meet.

* **The gate** (engine core / scheduler process). A roster's members are held
  back from the scheduler's waiting queue until all K have arrived, then
  enqueued one after another, so they are scheduled in the same step and
  decode in lockstep. Each formed roster gets a unique name (the client's
  name, a separator and a formation number), so a name reused by later (or
  concurrent, beyond K) requests forms new rosters. Requests that are not
  roster members are never held. A held member that is aborted (its client
  disconnected or gave up) is dropped from the gate. A roster whose members
  never all arrive waits: it holds no batch slot, no KV cache and no other
  request back; its clients see no tokens until the roster is complete.

  - vLLM: ``Scheduler.add_request`` (around) and ``Scheduler.finish_requests``
    (around: held ids are dropped; the front end already closed them).
  - SGLang: ``Scheduler._add_request_to_queue`` (around; retracted requests
    and the prefix warm-up, ``max_new_tokens == 0``, pass) and
    ``Scheduler.abort_request`` (before: held members it names go back to the
    waiting queue, where SGLang's own abort removes them and answers the client).

* **A request's samples** (``n = K``, ``tts_roe_roster_size = K``, no name):
  the front end names the roster after the request and gives sample ``i`` the
  seed ``seed + i`` (so the members' routing noise differs and the roster is
  reproducible from the request's seed). vLLM already derives child seeds that
  way; SGLang's children share one ``SamplingParams``, so each gets a copy.
  vLLM: in ``OutputProcessor.add_request`` (the temperature ladder's patch
  calls :func:`vllm_child_params`); SGLang: ``TokenizerManager`` sends (the
  ladder's hooks call :func:`sglang_child`).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tts_plugins.logits_processors.roster import GATE_SEP
from tts_plugins.params import ROSTER_CHILD_PREFIX

log = logging.getLogger("tts_plugins.roster")

_FORMED = itertools.count()


def roster_of(extra: Any) -> tuple[str, int] | None:
    """``(name, size)`` of a roster member's flat parameters (admission validated them), else None."""
    if not isinstance(extra, Mapping) or "tts_roe_roster" not in extra or "tts_roe_roster_size" not in extra:
        return None
    name, size = extra["tts_roe_roster"], extra["tts_roe_roster_size"]
    if not isinstance(name, str) or GATE_SEP in name or isinstance(size, bool) or not isinstance(size, int) or size < 2:
        return None
    return name, size


class RosterGate:
    """Members held until their roster is complete: ``name -> [(request id, item), ...]``."""

    def __init__(self) -> None:
        self.held: dict[str, list[tuple[str, Any]]] = {}

    def add(self, name: str, size: int, rid: str, item: Any) -> tuple[str, list[Any]] | None:
        """Hold ``item``; when it completes its roster, return the roster's unique name and its members in arrival order."""
        members = self.held.setdefault(name, [])
        members.append((rid, item))
        if len(members) < size:
            return None
        del self.held[name]
        return f"{name}{GATE_SEP}{next(_FORMED)}", [it for _, it in members]

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


def _renamed(extra: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {**extra, "tts_roe_roster": name}


# --- vLLM -----------------------------------------------------------------------


class VllmRosterPatch:
    name, engine = "roe_roster_gate", "vllm"
    keys: frozenset[str] = frozenset()  # the technique owns the keys; this patch only gathers members
    min_version, max_version = "0.32", "0.33"
    targets = ("vllm.v1.core.sched.scheduler:Scheduler.add_request", "vllm.v1.core.sched.scheduler:Scheduler.finish_requests")

    def install(self, patcher: Any) -> None:
        patcher.replace(self.targets[0], _vllm_add, min_version=self.min_version, max_version=self.max_version)
        patcher.replace(self.targets[1], _vllm_finish, min_version=self.min_version, max_version=self.max_version)


def _gate(owner: Any) -> RosterGate:
    gate = owner.__dict__.get("_tts_roster_gate")
    if gate is None:
        from tts_plugins import debug

        gate = owner.__dict__["_tts_roster_gate"] = RosterGate()
        debug.register("roster_gate", gate)
    return gate


def _vllm_add(orig: Any) -> Any:
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            params = getattr(request, "sampling_params", None)
            roster = roster_of(getattr(params, "extra_args", None))
            if roster is None or request.request_id in self.requests:
                return orig(self, request, *args, **kwargs)
            formed = _gate(self).add(roster[0], roster[1], request.request_id, request)
        except Exception:
            log.exception("tts_plugins: the roster gate failed; the request is scheduled as it came")
            return orig(self, request, *args, **kwargs)
        _publish()
        if formed is None:
            return None
        name, members = formed
        for member in members:
            member.sampling_params.extra_args = _renamed(member.sampling_params.extra_args, name)
            orig(self, member, *args, **kwargs)
        return None

    return add_request


def _vllm_finish(orig: Any) -> Any:
    def finish_requests(self: Any, request_ids: Any, *args: Any, **kwargs: Any) -> Any:
        gate = self.__dict__.get("_tts_roster_gate")
        if gate is not None and len(gate):
            if request_ids is None:
                gate.drop(lambda rid: True)
            else:
                ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
                gate.drop(ids.__contains__)
            _publish()
        return orig(self, request_ids, *args, **kwargs)

    return finish_requests


def vllm_child_params(params: Any, index: int, parent_id: str | None) -> Any:
    """Sample ``index`` of a request whose samples form a roster: the roster is named after the request."""
    extra = getattr(params, "extra_args", None)
    if parent_id is None or not isinstance(extra, Mapping) or "tts_roe_roster_size" not in extra or "tts_roe_roster" in extra:
        return params
    child = copy.copy(params)
    child.extra_args = _renamed(extra, ROSTER_CHILD_PREFIX + parent_id)
    return child


# --- SGLang ---------------------------------------------------------------------


class SglangRosterPatch:
    name, engine = "roe_roster_gate", "sglang"
    keys: frozenset[str] = frozenset()
    targets = (
        "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
        "sglang.srt.managers.scheduler.Scheduler.abort_request",
    )

    def install(self, patcher: Any) -> None:
        from tts_plugins import patching

        patching.sglang_hooks([(self.targets[0], _sglang_add, "around"), (self.targets[1], _sglang_abort, "before")], tag="roster")


def _sglang_add(orig: Any, scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    retracted = kwargs.get("is_retracted", args[0] if args else False)
    try:
        sp = req.sampling_params
        roster = None if retracted or getattr(sp, "max_new_tokens", None) == 0 else roster_of(getattr(sp, "custom_params", None))
        if roster is None:
            return orig(scheduler, req, *args, **kwargs)
        formed = _gate(scheduler).add(roster[0], roster[1], req.rid, req)
        _publish()
    except Exception:
        log.exception("tts_plugins: the roster gate failed; the request is queued as it came")
        return orig(scheduler, req, *args, **kwargs)
    if formed is None:
        return None
    name, members = formed
    for member in members:
        member.sampling_params = copy.copy(member.sampling_params)
        member.sampling_params.custom_params = _renamed(member.sampling_params.custom_params, name)
        orig(scheduler, member, *args, **kwargs)
    return None


def _sglang_abort(scheduler: Any, recv_req: Any, *args: Any, **kwargs: Any) -> None:
    gate = scheduler.__dict__.get("_tts_roster_gate")
    if gate is None or not len(gate):
        return
    rid = getattr(recv_req, "rid", None) or ""
    everything = bool(getattr(recv_req, "abort_all", False))
    for req in gate.drop(lambda r: everything or r.startswith(rid)):
        scheduler.waiting_queue.append(req)  # SGLang's abort, which runs next, removes it and answers its client
    _publish()


def _publish() -> None:
    from tts_plugins import debug

    debug.publish()


def sglang_child(tokenized: Any, index: int) -> None:
    """Sample ``index`` of a request whose samples form a roster: named after the request, seed ``seed + index``."""
    params = getattr(tokenized, "sampling_params", None)
    extra = getattr(params, "custom_params", None)
    if not isinstance(extra, Mapping) or "tts_roe_roster_size" not in extra or "tts_roe_roster" in extra:
        return
    if getattr(params, "max_new_tokens", None) == 0:
        return
    child = copy.copy(params)
    child.custom_params = _renamed(extra, ROSTER_CHILD_PREFIX + _parent_key(params))
    if child.sampling_seed is not None:
        child.sampling_seed = int(child.sampling_seed) + index
    tokenized.sampling_params = child


_SGLANG_KEYS: dict[int, list[Any]] = {}  # id(shared params) -> [params, roster name, children named]; holding params keeps the id unique


def _parent_key(params: Any) -> str:
    """One name for the children of one SGLang request (they share one ``SamplingParams``, which has no ``__dict__``)."""
    entry = _SGLANG_KEYS.get(id(params))
    if entry is None or entry[0] is not params:
        if len(_SGLANG_KEYS) >= 4096:  # requests whose children failed to send: drop the oldest
            _SGLANG_KEYS.pop(next(iter(_SGLANG_KEYS)))
        entry = _SGLANG_KEYS[id(params)] = [params, f"{next(_FORMED)}-{id(params):x}", 0]
    entry[2] += 1
    if entry[2] >= int(getattr(params, "n", 1) or 1):
        del _SGLANG_KEYS[id(params)]
    return entry[1]
