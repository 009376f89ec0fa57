"""RoE routing noise in vLLM's V1 model runner, per request (``tts_roe_tau``).

Patches (through :mod:`tts_plugins.patching`, version-checked, logged, never twice):

* ``GPUModelRunner.execute_model`` (around): admits requests whose
  ``extra_args`` carry ``tts_roe_tau`` and forgets finished ones, then marks
  the step (a context variable) so the MoE layers of this forward can find
  the runner. Dummy and profiling runs call the model outside it and stay
  plain.
* ``MoERunner._apply_quant_method`` (around): the one place every MoE path
  of this vLLM sees the router logits (``[tokens, experts]``). Rows of
  opted-in requests get the mask of :func:`~tts_plugins.logits_processors.roe.mask_router_logits`
  (drawn for every MoE layer at once, :class:`~tts_plugins.logits_processors.roe.StepNoise`):
  only their noisy top-k experts stay selectable, so vLLM's own router
  computes the selection and the weights. Other rows are passed through
  untouched (bit-identical). Token rows map to requests with the runner's
  ``req_indices`` and ``positions`` buffers (the noise of a token is a
  function of the request's seed, its position and the layer: reproducible
  whatever the batch, chunking or preemption).
* The cache salt (:meth:`~tts_plugins.logits_processors.roe.RoEPatchBase.cache_salt`,
  by tau and seed), applied by the core when the engine core creates the
  request: noisy KV is never reused by another request (and they do not reuse
  plain prefixes).

The engine-neutral half (parameters, seed, per-layer taus and their errors)
is :mod:`tts_plugins.logits_processors.roe`.

Limits, enforced: the model must run eagerly (``--enforce-eager``); under
``torch.compile`` the MoE code is traced once and per-request noise cannot be
applied, so the first RoE request logs an error and RoE rows run plain.
Monolithic MoE kernels (some GPU quantized paths) take the same masked logits
and select by their own code: covered as long as they select by top-k of the
logits. The seed is the request's ``seed``; without one, a hash of the
request id (not reproducible).
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import numpy as np
import torch

from tts_plugins.adapters.vllm_support import uses_v2_runner
from tts_plugins.logits_processors.roe import DENSE_ERROR, RoEModel, RoEParams, RoEPatchBase, StepNoise, roe_seed
from tts_plugins.slots import Workspace

log = logging.getLogger("vllm.tts_plugins")

MIN_VERSION, MAX_VERSION = "0.32.0", "0.33.0"
_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_MOE = "vllm.model_executor.layers.fused_moe.runner.moe_runner:MoERunner._apply_quant_method"

_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("tts_plugins_roe_step", default=None)


class _RunnerRoE:
    """The RoE requests of one model runner: ``req_id -> (tau, seed)``, and per-row buffers."""

    def __init__(self, runner: Any) -> None:
        device = runner.positions.device
        self.reqs: dict[str, tuple[list[float], int]] = {}  # req_id -> (one tau per MoE layer, seed)
        self.model = RoEModel(_moe_ordinals(runner), log)
        self.ws = Workspace(device, pin_memory=device.type == "cuda")  # pinned staging of the step's tau and seed
        self.compiled = _compiled(runner)

    def admit(self, scheduler_output: Any) -> None:
        for rid in scheduler_output.finished_req_ids:
            self.reqs.pop(rid, None)
        for new in scheduler_output.scheduled_new_reqs:
            sp = getattr(new, "sampling_params", None)
            try:
                p = RoEParams.of_request(getattr(sp, "extra_args", None))
            except ValueError as exc:  # admission validated it; never fail the step
                log.error("tts_plugins: ignoring invalid RoE parameters of an admitted request: %s", exc)
                continue
            if p is None:
                continue
            if not self.model.has_moe:
                self.model.error_once("dense", DENSE_ERROR)
                continue
            if self.compiled:
                self.model.error_once("compiled", "RoE needs an eager model (start vLLM with --enforce-eager); "
                                      "RoE requests run with the model's own routing")
                continue
            taus = self.model.taus(p)
            if taus is not None:
                self.reqs[new.req_id] = (taus, roe_seed(getattr(sp, "seed", None), new.req_id))


def _moe_ordinals(runner: Any) -> dict[int, int] | None:
    """``{layer id: index among the MoE layers}`` of the runner's model ({} without MoE; None if it cannot tell)."""
    try:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        ids = sorted({int(m.layer_id) for m in runner.get_model().modules() if isinstance(m, MoERunner)})
        return {layer: i for i, layer in enumerate(ids)}
    except Exception:
        return None


def _compiled(runner: Any) -> bool:
    try:
        from vllm.config import CompilationMode

        return runner.vllm_config.compilation_config.mode != CompilationMode.NONE
    except Exception:
        return False


class _Step:
    """One ``execute_model`` call: builds the per-row tau and seed once, at the first MoE layer."""

    def __init__(self, runner: Any, state: _RunnerRoE, num_tokens: int) -> None:
        self.runner, self.state, self.num_tokens = runner, state, num_tokens
        self.built = False
        self.noise: StepNoise | None = None

    def build(self) -> None:
        """The step's noise (drawn at the first MoE layer that routes): per token row, its request's taus and seed."""
        self.built = True
        batch, state = self.runner.input_batch, self.state
        num_reqs = batch.num_reqs
        tau = np.zeros((num_reqs, state.model.width), dtype=np.float32)
        seed = np.zeros(num_reqs, dtype=np.int64)
        index = batch.req_id_to_index
        for rid, (t, s) in state.reqs.items():  # the opted-in requests only
            i = index.get(rid)
            if i is not None and i < num_reqs:
                tau[i], seed[i] = t, s
        if not tau.any():
            return
        rows = self.runner.req_indices.gpu[: self.num_tokens]
        self.noise = StepNoise(state.model, state.ws.upload("seed", seed)[rows], self.runner.positions[: self.num_tokens],
                               state.ws.upload("tau", tau)[rows])

    def mask(self, layer: Any, router_logits: torch.Tensor) -> torch.Tensor | None:
        if not self.built:
            self.build()
        if self.noise is None:
            return None
        t = router_logits.shape[0]
        if t != self.num_tokens:  # padded or split rows (data/sequence parallel): not mapped, refuse loudly
            self.state.model.error_once("rows", f"RoE cannot map {t} router rows to the step's {self.num_tokens} tokens "
                                        "(data or sequence parallel?); RoE rows run plain")
            return None
        return self.noise.mask(router_logits, int(layer.router.top_k), int(layer.layer_id))


def _state(runner: Any) -> _RunnerRoE:
    st = runner.__dict__.get("_tts_roe")
    if st is None:
        st = runner.__dict__["_tts_roe"] = _RunnerRoE(runner)
    return st


def _wrap_execute_model(original: Any) -> Any:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        st = self.__dict__.get("_tts_roe")
        try:
            if st is not None or any(
                getattr(getattr(n, "sampling_params", None), "extra_args", None)
                and ("tts_roe_tau" in n.sampling_params.extra_args or "tts_roe_tau_layers" in n.sampling_params.extra_args)
                for n in scheduler_output.scheduled_new_reqs
            ):
                st = st or _state(self)
                st.admit(scheduler_output)
        except Exception:
            log.exception("tts_plugins: RoE failed to admit this step's requests; they run with the model's own routing")
            st = None
        if st is None or not st.reqs:
            return original(self, scheduler_output, *args, **kwargs)
        token = _STEP.set(_Step(self, st, int(scheduler_output.total_num_scheduled_tokens)))
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            _STEP.reset(token)

    return execute_model


def _wrap_apply_quant_method(original: Any) -> Any:
    def _apply_quant_method(self: Any, *args: Any, **kwargs: Any) -> Any:
        step = _STEP.get()
        if step is None or "router_logits" not in kwargs:
            return original(self, *args, **kwargs)
        try:
            masked = step.mask(self, kwargs["router_logits"])
        except Exception:
            step.state.model.error_once("mask", "RoE failed to route a step; its rows run with the model's own routing")
            log.exception("tts_plugins: RoE routing")
            masked = None
        if masked is not None:
            kwargs["router_logits"] = masked
        return original(self, *args, **kwargs)

    return _apply_quant_method


class VllmRoEPatch(RoEPatchBase):
    """RoE routing noise for vLLM, switched on per request by ``tts_roe_tau``."""

    engine, label, min_version, max_version = "vllm", "vLLM", MIN_VERSION, MAX_VERSION

    @classmethod
    def refuse(cls) -> str | None:
        if uses_v2_runner():
            return "RoE needs vLLM's V1 model runner; start the server with VLLM_USE_V2_MODEL_RUNNER=0"
        return None

    def install(self, patcher: Any) -> None:
        reason = self.supported()
        if reason is not None:
            log.error("tts_plugins: not installing RoE: %s (requests with tts_roe_tau are refused)", reason)
            return
        patcher.replace(f"{_RUNNER}.execute_model", _wrap_execute_model, min_version=MIN_VERSION, max_version=MAX_VERSION)
        patcher.replace(_MOE, _wrap_apply_quant_method, min_version=MIN_VERSION, max_version=MAX_VERSION)
