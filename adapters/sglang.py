"""SGLang adapter: every registered technique in SGLang's sampling step, per request, JSON only.

Activated by SGLang's own general-plugin entry-point group ``sglang.srt.plugins``
(entry point name ``tts_plugins``), which SGLang loads in the launcher, every
scheduler process and the detokenizer; restrict or disable it with SGLang's
``SGLANG_PLUGINS`` whitelist. Requests carry flat ``tts_*`` keys in
``sampling_params.custom_params`` (offline and ``/generate``) or the top-level
``custom_params`` field of ``/v1/completions`` and ``/v1/chat/completions``.
SGLang's ``--enable-custom-logit-processor`` (pickled code over the wire) is
neither needed nor used.

Hooks (all through :mod:`tts_plugins.patching`, registered with SGLang's
``HookRegistry``):

* ``SamplingParams.verify`` (after): parses the ``tts_*`` keys at admission in
  the tokenizer manager, so a bad request fails with ``ValueError`` (HTTP 400
  on the OpenAI endpoints and non-streaming ``/generate``) before it reaches a
  batch; with ``--speculative-algorithm`` any ``tts_*`` key is refused there
  (the techniques need one sampled row per request and step), and with a
  structured output the keys that force text while thinking are refused
  unless ``--reasoning-parser`` makes the grammar apply after thinking.
* ``Req.__init__`` (after; scheduler): counts the live requests that carry
  ``tts_*`` keys (:class:`OptedIn`; uncounted at release).
* ``ForwardBatch.init_new`` (around): SGLang's sampler sees no request
  identity, so when a request of the batch carries ``tts_*`` keys, the forward
  batch remembers its requests (one pass over the batch's request list, as
  SGLang's own ``rids`` list does). While no live request of the process
  opted in, it is one integer check.
* ``ModelRunner.sample`` (around): applies the techniques to
  ``next_token_logits`` before SGLang's penalties, grammar and sampler, then
  feeds the sampled ids back to the technique state. The state therefore
  follows the tokens actually sampled, whatever the overlap scheduler has
  appended to ``req.output_ids`` yet.
* ``release_kv_cache`` (after): frees a request's slot when it finishes or is
  aborted (a retracted request keeps its state and resumes).

The same hooks provide the services of :mod:`tts_plugins.services` to every
technique, naming none: rows whose sample is discarded (a prefill chunk that
is not the last) map to the neutral slot; the model patches that observe the
step (``on_batch``, ``before_sample``, ``after_sample``, ``on_finished``) are
called from ``init_new``, ``sample`` and ``release_kv_cache``. Two more hook
groups:

* ``TokenizerManager._send_one_request`` and ``_send_batch_request`` (around;
  tokenizer manager): the per-sample hook. The children of one request share
  one ``SamplingParams`` object and are sent in index order, so a child's
  index is the count of children of that object sent so far
  (:class:`SampleCounter`); each gets the merged
  :class:`~tts_plugins.services.SampleEdit` of the model patches
  (:func:`sglang_child`). SGLang's prefix warm-up request
  (``max_new_tokens == 0``) samples nothing and is skipped.
* ``Req.__init__`` (after; scheduler): the cache salt of the patches a
  request turns on, appended to its ``cache_salt``.
* ``ChatCompletionRequest.to_sampling_params`` (after; front end): a chat
  request's ``reasoning_effort`` becomes its thinking cap
  (:mod:`tts_plugins.effort`; a malformed ``TTS_PLUGINS_REASONING_EFFORT``
  stops the server at start-up).
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import weakref
from typing import Any

import numpy as np
import torch

from tts_plugins import debug, services
from tts_plugins.admission import refuse_structured
from tts_plugins.batch import SlotState
from tts_plugins.manager import default_registry
from tts_plugins.params import PREFIX, refuse_speculative, tts_keys
from tts_plugins.slots import SlotAllocator, Workspace
from tts_plugins.technique import GREEDY_TEMPERATURE, EngineInfo, SlotRequest

log = logging.getLogger("sglang.tts_plugins")

_LIVE: weakref.WeakSet[SglangTTS] = weakref.WeakSet()  # per process; hooks get no context argument

TARGETS = {
    "verify": "sglang.srt.sampling.sampling_params.SamplingParams.verify",
    "init_new": "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "sample": "sglang.srt.model_executor.model_runner.ModelRunner.sample",
    "release": "sglang.srt.mem_cache.common.release_kv_cache",
    "send_one": "sglang.srt.managers.tokenizer_manager.TokenizerManager._send_one_request",
    "send_batch": "sglang.srt.managers.tokenizer_manager.TokenizerManager._send_batch_request",
    "new_request": "sglang.srt.managers.schedule_batch.Req.__init__",
    "chat_params": "sglang.srt.entrypoints.openai.protocol.ChatCompletionRequest.to_sampling_params",
}


def _tts_params(req: Any) -> dict | None:
    cp = getattr(req.sampling_params, "custom_params", None)
    if not cp:
        return None
    return cp if any(isinstance(k, str) and k.startswith(PREFIX) for k in cp) else None


class SglangTTS:
    """Per-model-runner state: slots keyed by request id, the technique state, pending sampled ids."""

    def __init__(self, model_runner: Any, vocab_size: int, device: torch.device) -> None:
        from transformers import AutoTokenizer

        args = model_runner.server_args
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path,
                                                  trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
        registry = default_registry()
        start, end = registry.think_strings(tokenizer, args.model_path, None)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        hf_eos = getattr(model_runner.model_config, "hf_eos_token_id", None)
        if isinstance(hf_eos, int):
            eos.add(hf_eos)
        elif hf_eos:
            eos.update(int(i) for i in hf_eos)
        max_slots = int(getattr(model_runner.req_to_token_pool, "size", 0) or 0) + 1
        self.info = EngineInfo(
            vocab_size=vocab_size, max_slots=max_slots, device=device, tokenizer=tokenizer,
            eos_token_ids=tuple(sorted(eos)), think_start=start, think_end=end, pin_memory=device.type == "cuda",
        )
        self.registry = registry
        self.state = SlotState(registry, self.info)
        self.slot_of: dict[str, int] = {}
        self.failed: dict[str, int] = {}  # requests whose techniques failed: they run plain to the end
        self.plain: set[str] = set()  # requests with tts_* keys but no logits technique (or no free slot)
        self.slots = SlotAllocator(max_slots, what="opted-in requests")
        self._pending: tuple[torch.Tensor, list[tuple[int, int, str]], Any] | None = None
        self._ids_host: torch.Tensor | None = None  # reused pinned buffer for the sampled ids (GPU)
        self.ws = Workspace(device, self.info.pin_memory)
        _LIVE.add(self)
        debug.register("sglang", self)

    def debug_counts(self) -> dict[str, int]:
        """Live per-request state: all zero (failures aside) once every request has left."""
        return {**self.state.debug_counts(), "requests": len(self.slot_of), "failed_requests": len(self.failed), "plain_requests": len(self.plain)}

    # --- slots ------------------------------------------------------------

    def slot_for(self, req: Any) -> int:
        slot = self.slot_of.get(req.rid)
        if slot is not None:
            return slot
        flat = _tts_params(req)
        if flat is None or req.finished() or req.rid in self.failed or req.rid in self.plain:
            return self.info.neutral_slot
        try:
            parsed = self.registry.parse(flat)
        except ValueError as exc:  # admission validated it; a request that slipped through runs plain
            log.error("tts_plugins: ignoring invalid parameters of request %s: %s", req.rid, exc)
            parsed = {}
        if not parsed or not self.slots.available:
            if parsed:
                log.error("tts_plugins: no free slot for request %s; it runs plain", req.rid)
            self.plain.add(req.rid)  # not parsed again at every step (e.g. keys of a model patch only)
            return self.info.neutral_slot
        slot = self.slots.take()
        greedy = int(getattr(req.sampling_params, "top_k", -1)) == 1 or float(getattr(req.sampling_params, "temperature", 1.0)) < GREEDY_TEMPERATURE
        try:
            sp = req.sampling_params
            seed = getattr(sp, "sampling_seed", None)
            request = SlotRequest(list(req.origin_input_ids), greedy, float(getattr(sp, "temperature", 1.0)), None if seed is None else int(seed))
            self.state.admit(slot, parsed, request)
        except Exception:
            log.exception("tts_plugins: could not start techniques for request %s; it runs plain", req.rid)
            self.slots.free(slot)
            return self.info.neutral_slot
        self.slot_of[req.rid] = slot
        return slot

    def fail_safe(self) -> None:
        """A technique raised in the sampling step: log it, and let its requests go on without techniques
        (they are not re-admitted) rather than take the scheduler down."""
        log.exception("tts_plugins: a technique failed; its requests continue without tts techniques")
        self.state.release_all()
        self.failed.update(self.slot_of)
        self.slot_of.clear()
        self.slots.free_all()
        self._pending = None

    def release(self, rid: str) -> None:
        self.failed.pop(rid, None)
        self.plain.discard(rid)
        slot = self.slot_of.pop(rid, None)
        if slot is not None:
            self.state.release(slot)
            self.slots.free(slot)

    # --- sampled ids --------------------------------------------------------

    def record(self, next_ids: torch.Tensor, rows: list[tuple[int, int, str]]) -> None:
        if not rows:
            return
        if next_ids.device.type == "cpu":
            self._feed(next_ids, rows)
            return
        n = next_ids.shape[0]
        if self._ids_host is None or self._ids_host.shape[0] < n or self._ids_host.dtype != next_ids.dtype:
            self._ids_host = torch.empty(max(n, 256), dtype=next_ids.dtype, pin_memory=True)
        host = self._ids_host[:n]
        host.copy_(next_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (host, rows, event)

    def consume_pending(self) -> None:
        if self._pending is not None:
            host, rows, event = self._pending
            self._pending = None
            event.synchronize()
            self._feed(host, rows)

    def _feed(self, ids: torch.Tensor, rows: list[tuple[int, int, str]]) -> None:
        values = ids.numpy()
        for row, slot, rid in rows:
            if self.slot_of.get(rid) == slot:  # the request may have finished meanwhile
                self.state.feed(slot, (int(values[row]),))


# --- hooks --------------------------------------------------------------------


def _verify_after(result: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> None:
    custom = getattr(sampling_params, "custom_params", None)
    if custom and _speculative():
        refuse_speculative(custom, "--speculative-algorithm")
    if custom and any(getattr(sampling_params, f, None) is not None for f in ("json_schema", "regex", "ebnf", "structural_tag")):
        refuse_structured(custom, _reasoning_parser(), "--reasoning-parser")
    default_registry().parse(custom, engine="sglang", request=sampling_params)


def _reasoning_parser() -> bool:
    """Whether this server's grammars apply after the thinking block (``--reasoning-parser``)."""
    try:
        from sglang.srt.runtime_context import get_serving

        return bool(get_serving().reasoning_parser)
    except Exception:
        return False


def _speculative() -> bool:
    """Whether this server runs speculative decoding (SGLang publishes its spec settings to every process)."""
    try:
        from sglang.srt.runtime_context import get_spec

        return bool(get_spec().speculative_algorithm)
    except Exception:  # not published in this process (e.g. a test's bare SamplingParams): nothing to refuse
        return False


@functools.lru_cache(maxsize=1)
def _observers() -> tuple[Any, ...]:
    """The model patches that observe the sampling step (this process's registry does not change)."""
    return services.step_observers(default_registry(), "sglang")


def _observe(patch: Any, event: str, *args: Any) -> Any:
    try:
        return getattr(patch, event)(*args)
    except Exception:  # a patch must never take the scheduler down
        log.exception("tts_plugins: model patch %r failed in %s; its requests run without it this step", patch.name, event)
        return None


class OptedIn:
    """How many live requests of this scheduler process carry ``tts_*`` keys.

    Counted when SGLang builds the request (``Req.__init__``) and uncounted when it finishes
    (``release_kv_cache``) or, for a request dropped before it ran (aborted in the queue), when the object goes
    away; so a batch in a process where nobody opted in costs one integer check per step, not a pass over
    its requests.
    """

    def __init__(self) -> None:
        self.count = 0

    def admit(self, req: Any) -> None:
        if _tts_params(req) is None:
            return
        cell = [True]  # shared by the release hook and the finalizer: whichever comes first uncounts
        self.count += 1
        req.tts_plugins_counted = cell
        weakref.finalize(req, self._uncount, cell)

    def release(self, req: Any) -> None:
        cell = getattr(req, "tts_plugins_counted", None)
        if cell is not None:
            self._uncount(cell)

    def _uncount(self, cell: list[bool]) -> None:
        if cell[0]:
            cell[0] = False
            self.count -= 1


OPTED_IN = OptedIn()


def _admitted_after(result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    try:
        OPTED_IN.admit(req)
    except Exception:  # never fail a request here; an uncounted request would run plain, so count it loudly
        log.exception("tts_plugins: could not count an opted-in request")


def _init_new_around(orig: Any, cls: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    fb = orig(cls, batch, *args, **kwargs)
    if not OPTED_IN.count:  # nobody in this process opted in: O(1) per step
        return fb
    reqs = batch.reqs
    if any(_tts_params(r) is not None for r in reqs):
        decode = batch.forward_mode.is_decode()
        # rows whose sampled token is kept: decode rows, and the last chunk of a prefill
        last = [decode or getattr(r, "extend_end", 0) == len(getattr(r, "full_untruncated_fill_ids", ()) or ()) or not hasattr(r, "extend_end")
                for r in reqs]
        model_runner = args[0] if args else kwargs.get("model_runner")
        for patch in _observers():
            _observe(patch, "on_batch", batch, fb, model_runner, last)
        fb.tts_plugins_rows = (list(reqs), last)
        if debug.PATH:
            debug.publish()
    return fb


def _state(model_runner: Any, logits: torch.Tensor) -> SglangTTS:
    st = getattr(model_runner, "tts_plugins_state", None)
    if st is None:
        st = SglangTTS(model_runner, logits.shape[-1], logits.device)
        model_runner.tts_plugins_state = st
    return st


def _sample_around(orig: Any, model_runner: Any, logits_output: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    rows = getattr(forward_batch, "tts_plugins_rows", None)
    st = getattr(model_runner, "tts_plugins_state", None)
    if rows is None:
        if st is not None:
            st.consume_pending()
        return orig(model_runner, logits_output, forward_batch, *args, **kwargs)
    logits = logits_output.next_token_logits
    st = _state(model_runner, logits)
    reqs, keep = rows
    if logits.shape[0] != len(reqs):  # rows are not requests (speculative decoding): not supported, run plain
        return orig(model_runner, logits_output, forward_batch, *args, **kwargs)
    host_slots = None
    observed = [(patch, _observe(patch, "before_sample", model_runner, forward_batch, logits)) for patch in _observers()]
    try:
        st.consume_pending()
        host_slots = np.fromiter((st.slot_for(r) for r in reqs), dtype=np.int64, count=len(reqs))
        if st.state.active:
            # rows whose sampled token is thrown away (a prefill chunk that is not the last) see no technique
            # this step: a technique that reads the other rows (a RoE roster) must not count them
            seen = host_slots if all(keep) else np.where(np.asarray(keep, dtype=bool), host_slots, st.info.neutral_slot)
            row_slots = st.ws.upload("row_slots", seen)  # pinned staging: no pageable host-to-device copy
            out = st.state.apply(logits, row_slots, seen)
            if out is not logits:
                logits_output.next_token_logits = out
    except Exception:
        st.fail_safe()
        host_slots = None
    next_ids = orig(model_runner, logits_output, forward_batch, *args, **kwargs)
    for patch, token in observed:
        if token is not None:
            _observe(patch, "after_sample", model_runner, token, next_ids)
    if host_slots is not None:
        neutral = st.info.neutral_slot
        mine = [(i, int(s), reqs[i].rid) for i, s in enumerate(host_slots) if s != neutral and keep[i]]
        try:
            st.record(next_ids, mine)
        except Exception:
            st.fail_safe()
    return next_ids


_REPORTED: dict[type, type] = {}


def with_report(reason: Any, text: str) -> Any:
    """``reason`` (an SGLang finish reason) reporting ``text`` as its ``matched`` (the OpenAI response's
    ``matched_stop``), as a subclass of its own class (so SGLang's checks of its kind still hold)."""
    cls = type(reason)
    sub = _REPORTED.get(cls)
    if sub is None:
        def to_json(self: Any) -> Any:
            return {**cls.to_json(self), "matched": self.tts_report}

        sub = _REPORTED[cls] = type(f"Reported{cls.__name__}", (cls,), {"to_json": to_json})
    out = copy.copy(reason)
    out.__class__ = sub
    out.tts_report = text
    return out


def _attach_report(st: SglangTTS, req: Any) -> None:
    slot = st.slot_of.get(req.rid)
    reason = getattr(req, "finished_reason", None)
    if slot is None or reason is None or type(reason).__name__ == "FINISH_ABORT":
        return
    # with the overlap scheduler the next step may already have judged this request: report as of its last token
    reports = st.state.report(slot, len(req.output_ids))
    if reports:
        engine = getattr(reason, "matched", None)
        req.finished_reason = with_report(reason, services.report_json(reports, engine if isinstance(engine, int) else None))


def _release_after(result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    if req.finished():
        OPTED_IN.release(req)
        for st in list(_LIVE):
            try:  # before the slot is cleared: the scheduler streams the finish reason after this
                _attach_report(st, req)
            except Exception:  # a report is never worth a request
                log.exception("tts_plugins: could not attach a finished request's report")
            st.release(req.rid)
        for patch in _observers():
            _observe(patch, "on_finished", req.rid)
        debug.publish()


# --- the per-sample front-end hook ------------------------------------------------


class SampleCounter:
    """Which child of its request a tokenized SGLang request is, and a name its siblings share.

    SGLang sends the children of a request with ``n`` samples in index order, all with one ``SamplingParams``
    object (which has no ``__dict__`` to mark), so the index is the count of children of that object sent so far.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.sent: dict[int, list[Any]] = {}  # id(params) -> [params, name, children sent]; holding params keeps the id unique
        self.limit = limit
        self._names = itertools.count()

    def index(self, params: Any) -> tuple[int, str | None]:
        """``(index, parent name)`` of the next child of ``params``' request; ``(0, None)`` when it has one sample."""
        n = int(getattr(params, "n", 1) or 1)
        if n <= 1:
            return 0, None
        entry = self.sent.get(id(params))
        if entry is None or entry[0] is not params:
            if len(self.sent) >= self.limit:  # requests whose children failed to send: drop the oldest
                self.sent.pop(next(iter(self.sent)))
            entry = self.sent[id(params)] = [params, f"{next(self._names)}-{id(params):x}", 0]
        i = entry[2]
        entry[2] += 1
        if entry[2] >= n:
            del self.sent[id(params)]
        return i, entry[1]


_COUNTER = SampleCounter()


def sglang_child(tokenized: Any, counter: SampleCounter = _COUNTER, registry: Any = None, num_ranks: int = 1) -> None:
    """Give a tokenized request (one child of its request) the merged per-sample edit of the model patches and,
    with ``num_ranks`` > 1 data-parallel ranks, the rank its techniques' placement asks for (unless the client
    routed it: ``routed_dp_rank``)."""
    params = getattr(tokenized, "sampling_params", None)
    custom = getattr(params, "custom_params", None)
    if not tts_keys(custom) or getattr(params, "max_new_tokens", None) == 0:  # the prefix warm-up samples nothing
        return
    index, parent = counter.index(params)
    registry = registry or default_registry()
    if num_ranks > 1 and getattr(tokenized, "routed_dp_rank", None) is None:
        where = services.placement(registry, custom)
        if where or (where == "" and parent is not None):  # "": the request's own samples, named by the counter
            tokenized.routed_dp_rank = services.rank_for(where or f"request:{parent}", num_ranks)
    edit = services.sample_edit(registry, "sglang", custom, index, parent)
    if edit is None:
        return
    child = copy.copy(params)
    if edit.extra:
        child.custom_params = {**custom, **edit.extra}
    if edit.own_seed and getattr(child, "sampling_seed", None) is not None:
        child.sampling_seed = int(child.sampling_seed) + index
    if edit.temperature is not None:
        if edit.temperature < GREEDY_TEMPERATURE:  # what SamplingParams does for temperature 0
            child.temperature, child.top_k = 1.0, 1
        else:
            child.temperature = edit.temperature
    tokenized.sampling_params = child


def _children_quietly(manager: Any, objs: Any) -> None:
    num_ranks = int(getattr(manager, "elastic_worker_count", 1) or 1)  # SGLang's own count of data-parallel ranks
    for obj in objs:
        try:
            sglang_child(obj, num_ranks=num_ranks)
        except Exception:  # admission validated the parameters; never fail a request here
            log.exception("tts_plugins: could not apply the per-sample parameters; the sample runs with the request's")


def _send_one_around(orig: Any, manager: Any, tokenized: Any, *args: Any, **kwargs: Any) -> Any:
    _children_quietly(manager, (tokenized,))
    return orig(manager, tokenized, *args, **kwargs)


def _send_batch_around(orig: Any, manager: Any, tokenized: Any, *args: Any, **kwargs: Any) -> Any:
    _children_quietly(manager, tokenized)
    return orig(manager, tokenized, *args, **kwargs)


# --- the cache salt -----------------------------------------------------------------


def _new_request_after(result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    try:
        sp = req.sampling_params
        mine = services.cache_salt(default_registry(), "sglang", getattr(sp, "custom_params", None), req.rid, getattr(sp, "sampling_seed", None))
        if mine:
            req.cache_salt = f"{req.cache_salt}|{mine}" if getattr(req, "cache_salt", None) else mine
    except Exception:
        log.exception("tts_plugins: could not salt a request's cache key")


def register() -> None:
    """Entry point of ``sglang.srt.plugins``: register our hooks (idempotent per process)."""
    from tts_plugins.manager import disabled
    from tts_plugins.patching import SGLANG_MAX_VERSION, SGLANG_MIN_VERSION, install_patches, sglang_hooks

    if disabled():
        return
    from tts_plugins.effort import startup_checks

    startup_checks(log)  # a malformed TTS_PLUGINS_REASONING_EFFORT is the operator's error: it stops the server on purpose
    try:
        _register(install_patches, sglang_hooks, SGLANG_MIN_VERSION, SGLANG_MAX_VERSION)
    except Exception:  # never take the engine down: what failed is logged, and its keys are refused where possible
        log.exception("tts_plugins: could not install the SGLang hooks")
        try:
            if not sglang_hooked("core"):
                _refuse_everything(sglang_hooks)
        except Exception:
            log.exception("tts_plugins: could not install the refusal either; tts_* keys may do nothing on this server")


def _refuse_everything(sglang_hooks: Any) -> None:
    """The core's hooks are not installed on this SGLang (an untested version, or targets that moved): no tts_* key
    can act, so every request carrying one is refused at admission (``SamplingParams.verify`` raises ValueError, a
    400), when that one target still exists; else the one log line says the keys cannot even be refused."""
    from tts_plugins.patching import engine_version

    ver = engine_version("sglang")

    def verify_refuse(result: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> None:
        custom = getattr(sampling_params, "custom_params", None) or {}
        keys = sorted(k for k in custom if str(k).startswith("tts_"))
        if keys:
            raise ValueError(f"{keys[0]}={custom[keys[0]]!r} is refused: tts-plugins could not install its hooks on SGLang {ver} "
                             "(outside the versions it was built against, or its internals moved); see the server log")

    if not sglang_hooks([(TARGETS["verify"], verify_refuse, "after")], tag="core.refuse", min_version="0", max_version="999"):
        log.error("tts_plugins: SGLang %s: no hook could be installed, not even the refusal; tts_* keys in custom_params do nothing "
                  "on this server (uninstall tts-plugins or use a tested SGLang)", ver)
    else:
        log.warning("tts_plugins: SGLang %s: the core's hooks are left out; every request with a tts_* key gets a 400", ver)


def _register(install_patches: Any, sglang_hooks: Any, SGLANG_MIN_VERSION: str, SGLANG_MAX_VERSION: str) -> None:  # noqa: N803
    install_patches(default_registry(), engine="sglang")
    core = sglang_hooks(
        [
            (TARGETS["verify"], _verify_after, "after"),
            (TARGETS["init_new"], _init_new_around, "around"),
            (TARGETS["sample"], _sample_around, "around"),
            (TARGETS["release"], _release_after, "after"),
            (TARGETS["new_request"], _admitted_after, "after"),
        ],
        tag="core", min_version=SGLANG_MIN_VERSION, max_version=SGLANG_MAX_VERSION,
    )
    # separate groups: a front end or request class that moved must not cost the sampling hooks
    sglang_hooks([(TARGETS["send_one"], _send_one_around, "around"), (TARGETS["send_batch"], _send_batch_around, "around")],
                 tag="core.samples", min_version=SGLANG_MIN_VERSION, max_version=SGLANG_MAX_VERSION)
    sglang_hooks([(TARGETS["new_request"], _new_request_after, "after")], tag="core.cache_salt",
                 min_version=SGLANG_MIN_VERSION, max_version=SGLANG_MAX_VERSION)
    sglang_hooks([(TARGETS["chat_params"], _chat_params_after, "after")], tag="core.reasoning_effort",
                 min_version=SGLANG_MIN_VERSION, max_version=SGLANG_MAX_VERSION)
    if not core and not sglang_hooked("core"):  # not installed (and not because an earlier run in this process did)
        _refuse_everything(sglang_hooks)


def sglang_hooked(tag: str, registry: Any = None) -> bool:
    """Whether ``tag``'s hooks were registered in this process (by this or an earlier run of ``register``)."""
    from tts_plugins.patching import _HOOKED, _own_dict

    if registry is None:
        try:
            from sglang.srt.plugins.hook_registry import HookRegistry as registry
        except Exception:
            return False
    done = _own_dict(registry).get(_HOOKED)
    return isinstance(done, set) and tag in done


def _chat_params_after(result: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
    """A chat request's ``reasoning_effort`` becomes its thinking cap (:mod:`tts_plugins.effort`); a group stop at
    EOS with tools is refused (:func:`tts_plugins.admission.refuse_tools`)."""
    if getattr(request, "tools", None) and isinstance(result, dict):
        from tts_plugins.admission import refuse_tools

        refuse_tools(result.get("custom_params"), request.tools, getattr(request, "tool_choice", None))
    effort = getattr(request, "reasoning_effort", None)
    if effort is None or not isinstance(result, dict):
        return None
    from tts_plugins.effort import budget_request

    extra = budget_request(effort, result.get("custom_params"))
    return None if extra is None else {**result, "custom_params": extra}
