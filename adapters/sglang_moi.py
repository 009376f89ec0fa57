"""Mixture of Inputs in SGLang, per request (``tts_moi_beta`` in ``custom_params``).

Hooks, registered with SGLang's ``HookRegistry`` through
:func:`tts_plugins.patching.sglang_hooks` (version-checked, once per process):

* ``ForwardBatch.init_new`` (the adapter's existing around hook calls
  :func:`on_init_new`): admits opted-in requests into an O(k) stash keyed by
  ``rid``, marks them ``skip_radix_cache_insert`` (their KV was computed from
  mixtures, which the token ids alone do not determine, so a later plain
  request must never reuse it; SGLang does the same for its own embedding
  overrides), and plans which rows to mix: a request whose step feeds one
  token at exactly the stashed position.
* ``ModelRunner.sample`` (the adapter's around hook calls :func:`before_sample`
  and :func:`after_sample`): takes the top-k of the raw logits before SGLang's
  penalties, temperature and softmax edit them in place, then stashes it with
  the sampled id.
* ``ModelRunner.forward`` (around) computes the planned mixtures and
  ``VocabParallelEmbedding.forward`` (around) writes them into the rows of
  the input embeddings, once, for that forward only. A forward that planned
  mixtures but never embedded through ``VocabParallelEmbedding`` is logged as
  an error and its requests run plain; it is never mixed wrongly.

Limits: a retracted request re-prefills its history with plain embeddings and
resumes mixing from its next sampled token (the stale stash is dropped by the
position check). Speculative decoding is not supported (the adapter runs such
batches plain). CUDA graphs (and torch.compile's CPU decode graphs) replay
fixed inputs: with a decode graph runner present, opted-in requests run plain
and the scheduler logs an error (admission cannot see the scheduler's graph
settings); start such servers with ``--cuda-graph-backend-decode=disabled``.
Tested on CPU, eager.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import numpy as np
import torch

from tts_plugins import debug
from tts_plugins.params import MOI_KEYS, MoIParams
from tts_plugins.logits_processors.moi import MoIPatchBase

log = logging.getLogger("sglang.tts_plugins")

MIN_VERSION, MAX_VERSION = "0.5.20", "0.6.0"
TARGETS = {
    "forward": "sglang.srt.model_executor.model_runner.ModelRunner.forward",
    "embed": "sglang.srt.layers.vocab_parallel_embedding.VocabParallelEmbedding.forward",
}

_INSTALLED = False
_LIVE: weakref.WeakSet[SglangMoI] = weakref.WeakSet()
_PENDING: list[Any] = []  # (number of input rows, row index tensor, mixtures) for the forward in flight


def installed() -> bool:
    return _INSTALLED


class SglangMoI:
    """Mixture-of-Inputs state of one model runner."""

    def __init__(self, model_runner: Any) -> None:
        from tts_plugins.logits_processors.moi import MoIStash

        size = int(getattr(model_runner.req_to_token_pool, "size", 0) or 0) + 1
        self.stash = MoIStash(size, model_runner.device)
        self.refused: set[str] = set()  # requests that run without mixing (until they finish)
        self.warned: set[str] = set()
        self.failures = 0
        debug.register("sglang.moi", self)
        # A captured decode graph (CUDA graphs, or torch.compile's CPU graphs) replays fixed inputs and would
        # ignore the mixture: refuse rather than pretend.
        graphs = getattr(model_runner, "decode_cuda_graph_runner", None) is not None
        self.refuse = "decode graphs are on (CUDA graphs or torch.compile); start the server with them disabled" if graphs else None
        _LIVE.add(self)

    def fail_safe(self, what: str) -> None:
        """Our code raised in the scheduler: log it, drop every request's mixing (they run plain), go on."""
        log.exception("tts_plugins: Mixture of Inputs failed %s; its requests continue without it", what)
        self.failures += 1
        for rid in list(self.stash.slot_of):
            self.stash.release(rid)
            self.refused.add(rid)

    def debug_counts(self) -> dict[str, int]:
        return {"moi.requests": len(self.stash), "moi.dropped": len(self.refused), "moi.failures": self.failures}

    def warn_once(self, what: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            log.error("tts_plugins: Mixture of Inputs: %s", what)

    def slot(self, req: Any) -> int | None:
        slot = self.stash.slot_of.get(req.rid)
        if slot is not None or req.rid in self.refused:
            return slot
        cp = getattr(req.sampling_params, "custom_params", None)
        if not cp or "tts_moi_beta" not in cp or req.finished():
            return None
        if self.refuse:
            self.warn_once(f"{self.refuse}; request {req.rid} and later ones run without it")
            self.refused.add(req.rid)
            return None
        try:
            params = MoIParams.parse({k: v for k, v in cp.items() if k in MOI_KEYS})
            slot = self.stash.admit(req.rid, params) if params is not None else None
        except Exception:  # admission validated it; never take the scheduler down
            log.exception("tts_plugins: Mixture of Inputs could not start for request %s; it runs plain", req.rid)
            self.refused.add(req.rid)
            return None
        req.skip_radix_cache_insert = True
        return slot

    def release(self, rid: str) -> None:
        self.stash.release(rid)
        self.refused.discard(rid)


def _state(model_runner: Any) -> SglangMoI:
    st = getattr(model_runner, "tts_plugins_moi", None)
    if st is None:
        st = model_runner.tts_plugins_moi = SglangMoI(model_runner)
    return st


def on_init_new(batch: Any, fb: Any, model_runner: Any) -> None:
    """Admit opted-in requests of ``batch`` and plan the rows of ``fb`` to mix."""
    reqs = batch.reqs
    wanted = [i for i, r in enumerate(reqs) if "tts_moi_beta" in (getattr(r.sampling_params, "custom_params", None) or {})]
    if not wanted:
        return
    st = _state(model_runner)
    decode = fb.forward_mode.is_decode()
    seq_cpu = fb.seq_lens_cpu
    if seq_cpu is None:
        return
    seq = seq_cpu.numpy() if isinstance(seq_cpu, torch.Tensor) else np.asarray(seq_cpu)
    if decode:
        starts, lens = np.arange(len(reqs)), np.ones(len(reqs), np.int64)
    else:
        lens = np.asarray(fb.extend_seq_lens_cpu, np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rows, slots, stash_rows, stash_slots, stash_pos = [], [], [], [], []
    for i in wanted:
        slot = st.slot(reqs[i])
        if slot is None:
            continue
        pos = int(seq[i]) - 1  # position of the last token this step feeds
        if lens[i] == 1 and st.stash.pos[slot] == pos:
            rows.append(int(starts[i])), slots.append(slot)
        st.stash.pos[slot] = -1  # consumed, or stale (re-prefill)
        if decode or getattr(reqs[i], "extend_end", None) == len(getattr(reqs[i], "full_untruncated_fill_ids", None) or ()):
            stash_rows.append(i), stash_slots.append(slot), stash_pos.append(int(seq[i]))
    fb.tts_plugins_moi = (
        (np.asarray(rows, np.int64), np.asarray(slots, np.int64)),
        (np.asarray(stash_rows, np.int64), np.asarray(stash_slots, np.int64), np.asarray(stash_pos, np.int64)),
    )


def before_sample(model_runner: Any, fb: Any, logits: torch.Tensor) -> Any:
    plan = getattr(fb, "tts_plugins_moi", None)
    if plan is None or not len(plan[1][0]):
        return None
    rows, slots, pos = plan[1]
    index = torch.from_numpy(rows).to(logits.device, non_blocking=True)
    return index, slots, pos, logits.index_select(0, index)  # a copy: the sampler edits logits in place


def after_sample(model_runner: Any, ctx: Any, next_ids: torch.Tensor) -> None:
    index, slots, pos, raw = ctx
    st = _state(model_runner)
    try:
        st.stash.stash(slots, raw, next_ids.index_select(0, index), pos)
    except Exception:
        st.fail_safe("stashing the distribution")


def _embed_module(model_runner: Any) -> Any:
    model = model_runner.model
    get = getattr(model, "get_input_embeddings", None)
    return get() if get is not None else model.model.embed_tokens


def _forward_around(orig: Any, model_runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    plan = getattr(forward_batch, "tts_plugins_moi", None)
    if plan is None or not len(plan[0][0]):
        return orig(model_runner, forward_batch, *args, **kwargs)
    rows, slots = plan[0]
    st = _state(model_runner)
    try:
        mixed = st.stash.mix(slots, _embed_module(model_runner))
        index = torch.from_numpy(rows).to(mixed.device, non_blocking=True)
    except Exception:
        st.fail_safe("mixing the input embeddings")
        return orig(model_runner, forward_batch, *args, **kwargs)
    _PENDING[:] = [(int(forward_batch.input_ids.shape[0]), index, mixed)]
    try:
        return orig(model_runner, forward_batch, *args, **kwargs)
    finally:
        if _PENDING:
            _PENDING.clear()
            st.warn_once("this model does not embed its inputs through VocabParallelEmbedding; requests ran without mixing")


def _embed_around(orig: Any, module: Any, input_: Any, *args: Any, **kwargs: Any) -> Any:
    out = orig(module, input_, *args, **kwargs)
    if _PENDING and input_.shape[0] == _PENDING[0][0]:
        _, index, mixed = _PENDING.pop()
        out.index_copy_(0, index, mixed.to(out.dtype))
    return out


def release(rid: str) -> None:
    for st in list(_LIVE):
        st.release(rid)


class SglangMoIPatch(MoIPatchBase):
    """Mixture of Inputs for SGLang, switched on per request by ``tts_moi_beta``."""

    engine, label, min_version, max_version = "sglang", "SGLang", MIN_VERSION, MAX_VERSION

    def install(self, patcher: Any) -> None:
        global _INSTALLED
        reason = self.supported()
        if reason is not None:
            log.error("tts_plugins: not installing Mixture of Inputs: %s (requests with tts_moi_beta are refused)", reason)
            return
        from tts_plugins.patching import sglang_hooks

        if sglang_hooks([(TARGETS["forward"], _forward_around, "around"), (TARGETS["embed"], _embed_around, "around")], tag="moi"):
            _INSTALLED = True
