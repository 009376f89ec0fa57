"""Mixture of Inputs in vLLM's V1 model runner (the CPU runner subclasses it), per request.

Three patches on ``GPUModelRunner``, installed by the general plugin through :mod:`tts_plugins.patching`
(version-checked, logged, never twice); the engine-neutral half (parameters, stash, runner state, the
mix-position rule) is :mod:`tts_plugins.logits_processors.moi`:

* ``_update_states`` (after): admits requests that carry ``tts_moi_beta`` in
  ``SamplingParams.extra_args`` and releases finished ones. Keeps the step's
  scheduler output for the two hooks below.
* ``_sample`` (around): for opted-in rows whose sampled token is real (not a
  discarded partial-prefill sample), takes the top-k of the raw logits before
  the sampler's processors and temperature touch them, then stashes it with
  the sampled id: O(k) per request.
* ``_model_forward`` (around): when a step feeds an opted-in request exactly
  the token that was stashed (one scheduled token at that position), that
  row's input embedding becomes the mixture. Only then does the forward take
  ``inputs_embeds``; steps without such a row run untouched, so requests
  without the key are bit-identical to an engine without the package.

Limits, enforced rather than silently wrong:

* Preemption: a resumed request re-prefills its history with plain token
  embeddings (a per-request buffer of past mixtures would cost O(length x
  hidden)); the stash's position check then skips the stale mixture and
  mixing resumes from the next sampled token. Chunked prefill: the discarded
  sample of a partial prefill is never stashed.
* Compiled models and CUDA graphs: a step that mixes runs the model's eager
  forward (vLLM's own ``skip_compiled`` switch, cudagraph mode NONE), because a
  captured graph would replay fixed input buffers and ignore the mixture.
  Other steps keep the compiled path. Only eager CPU runs are tested here.
* Tensor parallelism: the mixture embeds the top-k ids through the model's
  vocab-parallel ``embed_input_ids``, which all-reduces, so each rank builds
  the same mixture. Pipeline parallelism and speculative decoding are refused
  (logged once; the rows run plain).
* Prefix caching: KV computed from mixtures is not determined by the token
  ids, so the patch declares a cache salt (:meth:`VllmMoIPatch.cache_salt`,
  with beta and k), which the core's request-creation hook applies to the
  block hashes of opted-in requests. No plain request, and no request mixing
  with other settings, reuses their blocks; the price is that they do not
  share prompt blocks with those requests either (requests with equal
  settings share them).
* Model Runner V2 (the GPU default) is not patched: MoI needs
  ``VLLM_USE_V2_MODEL_RUNNER=0`` there, and admission refuses the key when
  the V1 runner is not in use.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tts_plugins import debug
from tts_plugins.adapters.vllm_support import uses_v2_runner
from tts_plugins.logits_processors.moi import MoIParams, MoIPatchBase, MoIRunnerState
from tts_plugins.patching import Patcher

log = logging.getLogger("vllm.tts_plugins")

# The runner internals these patches rely on were read in this range; anything else is refused.
MIN_VERSION, MAX_VERSION = "0.32.0", "0.33.0"
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


class _RunnerMoI(MoIRunnerState):
    """Mixture-of-Inputs state of one V1 model runner: the engine-neutral state and this step's rows."""

    def __init__(self, runner: Any) -> None:
        pc = runner.vllm_config.parallel_config
        refuse = "pipeline parallelism is not supported; those requests run without it" if pc.pipeline_parallel_size > 1 else None
        super().__init__(runner.max_num_reqs, runner.device, log, refuse)
        self.sched: Any = None
        self._rows_for: Any = None
        self._rows: tuple[np.ndarray, np.ndarray, np.ndarray] = ()  # type: ignore[assignment]
        debug.register("vllm.moi", self)

    def admit(self, new_reqs: Any) -> None:
        for new in new_reqs:
            sp = new.sampling_params
            extra = getattr(sp, "extra_args", None) if sp is not None else None
            if extra and "tts_moi_beta" in extra:
                self.start(new.req_id, extra)

    def step_rows(self, runner: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, slots and scheduled token counts of this step's opted-in requests (computed once a step)."""
        if self._rows_for is self.sched:
            return self._rows
        index, scheduled = runner.input_batch.req_id_to_index, self.sched.num_scheduled_tokens
        # one pass over the opted-in requests only (never the whole batch); the rest is numpy
        found = [(index.get(rid), scheduled.get(rid, 0), slot) for rid, slot in self.stash.slot_of.items()]
        found = [f for f in found if f[0] is not None and f[1]]
        arr = np.asarray(found, np.int64).reshape(-1, 3)
        self._rows, self._rows_for = (arr[:, 0], arr[:, 2], arr[:, 1]), self.sched
        return self._rows

    def rows_to_stash(self, runner: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows (of the logits), slots and positions of opted-in requests whose sample this step is real."""
        rows, slots, n = self.step_rows(runner)
        batch = runner.input_batch
        seq_len = batch.num_computed_tokens_cpu[rows] + n
        real = seq_len >= batch.num_tokens_no_spec[rows]  # else a partial prefill: vLLM discards this sample
        return rows[real], slots[real], seq_len[real]

    def rows_to_mix(self, runner: Any) -> tuple[np.ndarray, np.ndarray]:
        """Token indices and slots whose input this step is exactly the stashed sampled token."""
        rows, slots, n = self.step_rows(runner)
        ok = self.stash.take_mix(slots, runner.input_batch.num_computed_tokens_cpu[rows] + n - 1, n)
        return runner.query_start_loc.np[rows[ok]].astype(np.int64), slots[ok]


def _state(runner: Any) -> _RunnerMoI:
    st = runner.__dict__.get("_tts_moi")
    if st is None:
        st = runner.__dict__["_tts_moi"] = _RunnerMoI(runner)
    return st


def _wrap_update_states(original: Any) -> Any:
    def _update_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, scheduler_output, *args, **kwargs)
        st = self.__dict__.get("_tts_moi")
        if st is None and not any(
            getattr(getattr(n, "sampling_params", None), "extra_args", None) and "tts_moi_beta" in n.sampling_params.extra_args
            for n in scheduler_output.scheduled_new_reqs
        ):
            return out  # no request ever opted in: nothing to keep
        st = st or _state(self)
        for rid in scheduler_output.finished_req_ids:
            st.release(rid)
        if scheduler_output.scheduled_new_reqs:
            st.admit(scheduler_output.scheduled_new_reqs)
        st.sched = scheduler_output if len(st.stash) else None
        if scheduler_output.finished_req_ids or scheduler_output.scheduled_new_reqs:
            debug.publish()
        return out

    return _update_states


def _wrap_sample(original: Any) -> Any:
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.__dict__.get("_tts_moi")
        if st is None or st.sched is None or logits is None:
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        if spec_decode_metadata is not None:
            st.warn_once("speculative decoding is not supported; those requests run without it")
            st.stash.pos[:] = -1
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        try:
            rows, slots, pos = st.rows_to_stash(self)
            if not len(rows):
                return original(self, logits, spec_decode_metadata, *args, **kwargs)
            # the raw distribution before the sampler (which may edit logits in place): top-k only, no copy of the rows
            index = st.stash.stash_distribution(slots, logits, rows)
        except Exception:
            st.fail_safe("reading the logits")
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        out = original(self, logits, spec_decode_metadata, *args, **kwargs)
        try:
            st.stash.stash_sampled(slots, out.sampled_token_ids.index_select(0, index)[:, 0], pos)
        except Exception:
            st.fail_safe("stashing the distribution")
        return out

    return _sample


def _wrap_model_forward(original: Any) -> Any:
    def _model_forward(self: Any, input_ids: Any = None, positions: Any = None, intermediate_tensors: Any = None, inputs_embeds: Any = None,
                       **kwargs: Any) -> Any:
        st = self.__dict__.get("_tts_moi")
        if st is None or st.sched is None:
            return original(self, input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds,
                            **kwargs)
        plain = {"input_ids": input_ids, "positions": positions, "intermediate_tensors": intermediate_tensors, "inputs_embeds": inputs_embeds}
        try:
            tokens, slots = st.rows_to_mix(self)
            if not len(tokens) or (input_ids is None and inputs_embeds is None):
                return original(self, **plain, **kwargs)
            from vllm.config import CUDAGraphMode
            from vllm.forward_context import get_forward_context

            model = self.get_model()
            mixed = st.stash.mix(slots, model.embed_input_ids)
            embeds = model.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds.clone()
            index = st.stash.ws.upload("mix_rows", tokens)
            embeds.index_copy_(0, index, mixed.to(embeds.dtype))
        except Exception:
            st.fail_safe("mixing the input embeddings")
            return original(self, **plain, **kwargs)
        inputs_embeds = embeds
        ctx = get_forward_context()
        saved = (ctx.skip_compiled, ctx.cudagraph_runtime_mode)
        ctx.skip_compiled, ctx.cudagraph_runtime_mode = True, CUDAGraphMode.NONE  # a graph would ignore the mixture
        try:
            return original(self, input_ids=None, positions=positions, intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds,
                            **kwargs)
        finally:
            ctx.skip_compiled, ctx.cudagraph_runtime_mode = saved

    return _model_forward


class VllmMoIPatch(MoIPatchBase):
    """Mixture of Inputs for vLLM, switched on per request by ``tts_moi_beta``."""

    engine, label, min_version, max_version = "vllm", "vLLM", MIN_VERSION, MAX_VERSION

    @classmethod
    def refuse(cls) -> str | None:
        if uses_v2_runner():
            return "Mixture of Inputs needs vLLM's V1 model runner; start the server with VLLM_USE_V2_MODEL_RUNNER=0"
        return None

    def install(self, patcher: Patcher) -> None:
        reason = self.supported()
        if reason is not None:
            log.error("tts_plugins: not installing Mixture of Inputs: %s (requests with tts_moi_beta are refused)", reason)
            return
        patcher.replace(f"{_RUNNER}._update_states", _wrap_update_states, min_version=MIN_VERSION, max_version=MAX_VERSION)
        patcher.replace(f"{_RUNNER}._sample", _wrap_sample, min_version=MIN_VERSION, max_version=MAX_VERSION)
        patcher.replace(f"{_RUNNER}._model_forward", _wrap_model_forward, min_version=MIN_VERSION, max_version=MAX_VERSION)

    def cache_salt(self, params: MoIParams, request_id: str, seed: int | None) -> str:
        return self.salt_of(params)
