"""RoE rosters in the engines' schedulers: members start together.

The aggregation, the gate's bookkeeping (:class:`~tts_plugins.logits_processors.roster.RosterGate`)
and the naming of a request's samples are the engine-neutral technique
:mod:`tts_plugins.logits_processors.roster`; this module hooks the gate into
each engine's scheduler.

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
  named by the core's per-sample front-end hook, which asks
  :meth:`~tts_plugins.logits_processors.roster.RosterPatchBase.sample_edit`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from tts_plugins import patching
from tts_plugins.adapters import vllm_support
from tts_plugins.logits_processors.roster import RosterGate, RosterPatchBase, renamed, roster_of

log = logging.getLogger("tts_plugins.roster")


# --- vLLM -----------------------------------------------------------------------


class VllmRosterPatch(RosterPatchBase):
    engine, min_version, max_version = "vllm", vllm_support.MIN_VERSION, vllm_support.MAX_VERSION
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
            member.sampling_params.extra_args = renamed(member.sampling_params.extra_args, name)
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


# --- SGLang ---------------------------------------------------------------------


class SglangRosterPatch(RosterPatchBase):
    engine, min_version, max_version = "sglang", patching.SGLANG_MIN_VERSION, patching.SGLANG_MAX_VERSION
    targets = (
        "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
        "sglang.srt.managers.scheduler.Scheduler.abort_request",
    )

    def install(self, patcher: Any) -> None:
        patching.sglang_hooks([(self.targets[0], _sglang_add, "around"), (self.targets[1], _sglang_abort, "before")], tag="roster",
                              min_version=self.min_version, max_version=self.max_version)


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
        member.sampling_params.custom_params = renamed(member.sampling_params.custom_params, name)
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
