"""Mixture of Inputs in SGLang, per request (``tts_moi_beta`` in ``custom_params``).

The patch observes the sampling step through the core SGLang adapter (the
step-observer service of :mod:`tts_plugins.services`), and hooks the forward
itself with SGLang's ``HookRegistry`` through
:func:`tts_plugins.patching.sglang_hooks` (version-checked, once per process).
The engine-neutral half (parameters, stash, runner state, the mix-position
rule) is :mod:`tts_plugins.logits_processors.moi`.

* A batch is built (:meth:`SglangMoIPatch.on_batch`, from the adapter's
  ``ForwardBatch.init_new`` hook): admits opted-in requests into an O(k) stash keyed by
  ``rid``, marks them ``skip_radix_cache_insert`` (their KV was computed from
  mixtures, which the token ids alone do not determine, so a later plain
  request must never reuse it; SGLang does the same for its own embedding
  overrides), and plans which rows to mix: a request whose step feeds one
  token at exactly the stashed position.
* The step samples (:meth:`SglangMoIPatch.before_sample` and
  :meth:`SglangMoIPatch.after_sample`, from the adapter's ``ModelRunner.sample``
  hook): takes the top-k of the raw logits before SGLang's
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
from typing import Any, NamedTuple

import numpy as np
import torch

from tts_plugins import debug
from tts_plugins.logits_processors.moi import MoIPatchBase, MoIRunnerState

log = logging.getLogger("sglang.tts_plugins")

MIN_VERSION, MAX_VERSION = "0.5.20", "0.6.0"
TARGETS = {
    "forward": "sglang.srt.model_executor.model_runner.ModelRunner.forward",
    "embed": "sglang.srt.layers.vocab_parallel_embedding.VocabParallelEmbedding.forward",
}

_PENDING: list[Any] = []  # (number of input rows, row index tensor, mixtures) for the forward in flight


class MoIPlan(NamedTuple):
    """What one forward batch does for Mixture of Inputs (``ForwardBatch.tts_plugins_moi``)."""

    mix_rows: np.ndarray  # input rows whose embedding becomes its request's mixture
    mix_slots: np.ndarray  # their stash slots
    stash_rows: np.ndarray  # logits rows whose distribution and sample are stashed after sampling
    stash_slots: np.ndarray
    stash_pos: np.ndarray  # the position of each stashed sample


class SglangMoI(MoIRunnerState):
    """Mixture-of-Inputs state of one model runner: the engine-neutral state, admission once per request."""

    def __init__(self, model_runner: Any) -> None:
        # A captured decode graph (CUDA graphs, or torch.compile's CPU graphs) replays fixed inputs and would
        # ignore the mixture: refuse rather than pretend.
        graphs = getattr(model_runner, "decode_cuda_graph_runner", None) is not None
        refuse = "decode graphs are on (CUDA graphs or torch.compile); start the server with them disabled" if graphs else None
        size = int(getattr(model_runner.req_to_token_pool, "size", 0) or 0) + 1
        super().__init__(size, model_runner.device, log, refuse)
        debug.register("sglang.moi", self)

    def slot(self, req: Any) -> int | None:
        """The stash slot of an opted-in request, admitted at its first batch; None: it runs plain."""
        slot = self.stash.slot_of.get(req.rid)
        if slot is not None or req.rid in self.dropped:
            return slot
        cp = getattr(req.sampling_params, "custom_params", None)
        if not cp or "tts_moi_beta" not in cp or req.finished():
            return None
        slot = self.start(req.rid, cp)
        if slot is None:
            self.dropped.add(req.rid)  # not asked again at its later batches
            return None
        req.skip_radix_cache_insert = True
        return slot


def _state(model_runner: Any) -> SglangMoI:
    st = getattr(model_runner, "tts_plugins_moi", None)
    if st is None:
        st = model_runner.tts_plugins_moi = SglangMoI(model_runner)
    return st


def plan(batch: Any, fb: Any, st: SglangMoI, kept: Any) -> None:
    """Admit opted-in requests of ``batch`` and plan the rows of ``fb`` to mix and to stash."""
    reqs = batch.reqs
    wanted = [i for i, r in enumerate(reqs) if "tts_moi_beta" in (getattr(r.sampling_params, "custom_params", None) or {})]
    if not wanted:
        return
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
    found = [(i, st.slot(reqs[i])) for i in wanted]
    found = np.asarray([f for f in found if f[1] is not None], np.int64).reshape(-1, 2)
    index, slots = found[:, 0], found[:, 1]
    seq_of = seq[index].astype(np.int64)
    mix = st.stash.take_mix(slots, seq_of - 1, lens[index])  # seq - 1: the position of the last token fed
    stash = np.asarray(kept, dtype=bool)[index]  # rows whose sample the engine keeps (not a prefill chunk)
    fb.tts_plugins_moi = MoIPlan(starts[index[mix]].astype(np.int64), slots[mix], index[stash], slots[stash], seq_of[stash])


def _embed_module(model_runner: Any) -> Any:
    model = model_runner.model
    get = getattr(model, "get_input_embeddings", None)
    return get() if get is not None else model.model.embed_tokens


def _forward_around(orig: Any, model_runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    planned: MoIPlan | None = getattr(forward_batch, "tts_plugins_moi", None)
    if planned is None or not len(planned.mix_rows):
        return orig(model_runner, forward_batch, *args, **kwargs)
    rows, slots = planned.mix_rows, planned.mix_slots
    st = _state(model_runner)
    try:
        mixed = st.stash.mix(slots, _embed_module(model_runner))
        index = st.stash.ws.upload("mix_rows", rows)
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


class SglangMoIPatch(MoIPatchBase):
    """Mixture of Inputs for SGLang, switched on per request by ``tts_moi_beta``; a step observer."""

    engine, label, min_version, max_version = "sglang", "SGLang", MIN_VERSION, MAX_VERSION

    def __init__(self) -> None:
        self.installed = False  # set where the forward hooks are registered (this process)
        self.runners: weakref.WeakSet[SglangMoI] = weakref.WeakSet()

    def install(self, patcher: Any) -> None:
        reason = self.supported()
        if reason is not None:
            log.error("tts_plugins: not installing Mixture of Inputs: %s (requests with tts_moi_beta are refused)", reason)
            return
        from tts_plugins.patching import sglang_hooks

        if sglang_hooks([(TARGETS["forward"], _forward_around, "around"), (TARGETS["embed"], _embed_around, "around")], tag="moi",
                        min_version=MIN_VERSION, max_version=MAX_VERSION):
            self.installed = True

    def on_batch(self, batch: Any, forward_batch: Any, model_runner: Any, kept: Any) -> None:
        if not self.installed:
            return
        st = _state(model_runner)
        self.runners.add(st)
        plan(batch, forward_batch, st, kept)  # an error: the adapter logs it and the step runs without mixing

    def before_sample(self, model_runner: Any, forward_batch: Any, logits: torch.Tensor) -> Any:
        planned: MoIPlan | None = getattr(forward_batch, "tts_plugins_moi", None)
        if planned is None or not len(planned.stash_rows):
            return None
        # the raw distribution before the sampler (which edits logits in place): top-k only, no copy of the rows
        st = _state(model_runner)
        try:
            index = st.stash.stash_distribution(planned.stash_slots, logits, planned.stash_rows)
        except Exception:
            st.fail_safe("reading the logits")
            return None
        return index, planned.stash_slots, planned.stash_pos

    def after_sample(self, model_runner: Any, token: Any, sampled_ids: torch.Tensor) -> None:
        index, slots, pos = token
        st = _state(model_runner)
        try:
            st.stash.stash_sampled(slots, sampled_ids.index_select(0, index), pos)
        except Exception:
            st.fail_safe("stashing the distribution")

    def on_finished(self, request_id: str) -> None:
        for st in list(self.runners):
            st.release(request_id)
