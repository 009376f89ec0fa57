"""RoE routing noise in SGLang, per request (``tts_roe_tau`` in ``custom_params``).

Hooks (SGLang's ``HookRegistry``, through :mod:`tts_plugins.patching`):

* ``ModelRunner._forward_raw`` (around): marks the forward (a context
  variable) with its ``ForwardBatch``. The requests come from the batch the
  core adapter remembers (``ForwardBatch.init_new``: only when some request
  carries ``tts_*`` keys); per token row, its request and its absolute
  position (``forward_batch.positions``; extend rows are grouped by request in
  ``extend_seq_lens`` order, decode rows are one per request).
* ``sglang.srt.layers.moe.topk.select_experts`` (around): both CPU TopK paths
  look it up by name on every call; rows of opted-in requests get the masked
  router logits (:func:`~tts_plugins.logits_processors.roe.mask_router_logits`),
  so SGLang's own top-k and renormalization select the noisy experts with the
  clean weights. Other rows are passed through untouched.
* The cache salt (:meth:`~tts_plugins.logits_processors.roe.RoEPatchBase.cache_salt`,
  by tau and seed), applied by the core when the scheduler creates the
  request (``Req.__init__``): the radix cache never shares its noisy KV, nor
  hands it a plain prefix.

The engine-neutral half (parameters, seed, per-layer taus and their errors)
is :mod:`tts_plugins.logits_processors.roe`. The seed is the request's
``sampling_seed``; without one, a hash of its id.
Decode graphs (CUDA graphs, torch.compile) would replay the routing of the
capture: with a decode graph runner present, RoE rows run plain and an error is
logged. GPU fused paths that do not call ``select_experts`` (e.g. some
monolithic quantized kernels) are not covered; they route plainly.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import numpy as np
import torch

from tts_plugins.logits_processors.roe import DENSE_ERROR, RoEModel, RoEParams, RoEPatchBase, StepNoise, roe_seed
from tts_plugins.slots import Workspace

log = logging.getLogger("sglang.tts_plugins")

TARGETS = {
    "forward": "sglang.srt.model_executor.model_runner.ModelRunner._forward_raw",
    "select": "sglang.srt.layers.moe.topk.select_experts",
}
MIN_VERSION, MAX_VERSION = "0.5.20", "0.6"

_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("tts_plugins_sglang_roe", default=None)


def req_roe(req: Any) -> tuple[RoEParams | None, int]:
    """``(params, seed)`` of a request (params None: none), parsed once and kept on the request."""
    cached = req.__dict__.get("_tts_roe")
    if cached is None:
        params = None
        try:
            params = RoEParams.of_request(getattr(req.sampling_params, "custom_params", None))
        except ValueError as exc:  # admission validated it
            log.error("tts_plugins: ignoring invalid RoE parameters of an admitted request: %s", exc)
        cached = (params, roe_seed(getattr(req.sampling_params, "sampling_seed", None), req.rid))
        req.__dict__["_tts_roe"] = cached
    return cached


def _model(model_runner: Any) -> RoEModel:
    """RoE's view of the runner's model (its MoE layers, found once, and the errors logged once)."""
    found = model_runner.__dict__.get("_tts_roe")
    if found is None:
        try:
            from sglang.srt.layers.moe.topk import TopK

            ids = sorted({int(m.layer_id) for m in model_runner.model.modules() if isinstance(m, TopK) and m.layer_id is not None})
            n_topk = sum(isinstance(m, TopK) for m in model_runner.model.modules())
            ordinal = {layer: i for i, layer in enumerate(ids)} if len(ids) == n_topk else (None if n_topk else {})
        except Exception:
            ordinal = None  # cannot tell: refuse nothing
        found = model_runner.__dict__["_tts_roe"] = RoEModel(ordinal, log)
    return found


class _Step:
    def __init__(self, model_runner: Any, forward_batch: Any) -> None:
        self.model_runner, self.fb = model_runner, forward_batch
        self.built = False
        self.noise: StepNoise | None = None
        self.tokens = 0

    def build(self) -> None:
        self.built = True
        rows = getattr(self.fb, "tts_plugins_rows", None)
        if rows is None:
            return
        reqs = rows[0]
        pairs = [req_roe(r) for r in reqs]
        if not any(p[0] is not None for p in pairs):
            return
        model = self.model = _model(self.model_runner)
        tau = np.zeros((len(pairs), model.width), dtype=np.float32)
        for i, (params, _) in enumerate(pairs):  # the batch's requests, once per forward, only when one opted in
            taus = model.taus(params) if params is not None else None
            if taus is not None:
                tau[i] = taus
        if not tau.any():
            return
        if not model.has_moe:
            model.error_once("dense", DENSE_ERROR)
            return
        if getattr(self.model_runner, "decode_cuda_graph_runner", None) is not None:
            model.error_once("graphs", "RoE needs decode graphs off (CUDA graphs or torch.compile replay the captured routing); "
                             "RoE requests run plain")
            return
        seed = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
        mode = self.fb.forward_mode
        if mode.is_decode():
            per_row = np.arange(len(reqs), dtype=np.int64)
        elif mode.is_extend() and not mode.is_target_verify():
            per_row = np.repeat(np.arange(len(reqs), dtype=np.int64), np.asarray(self.fb.extend_seq_lens_cpu, dtype=np.int64))
        else:
            model.error_once("mode", f"RoE cannot map the rows of a {mode} batch (speculative decoding?); its RoE requests run plain")
            return
        t = self.fb.positions.shape[0]
        if per_row.shape[0] != t:
            model.error_once("rows", "RoE cannot map this batch's token rows to its requests; RoE requests run plain")
            return
        ws = _workspace(self.model_runner, self.fb.positions.device)  # pinned staging: no pageable host-to-device copy
        self.tokens = t
        self.noise = StepNoise(model, ws.upload("seed", seed[per_row]), self.fb.positions[:t], ws.upload("tau", tau[per_row]))

    def mask(self, router_logits: torch.Tensor, top_k: int, layer_id: int | None) -> torch.Tensor | None:
        if not self.built:
            self.build()
        if self.noise is None:
            return None
        if layer_id is None or router_logits.shape[0] != self.tokens:
            self.model.error_once("layer", "RoE saw router logits it cannot map (no layer id, or padded rows); those rows run plain")
            return None
        return self.noise.mask(router_logits, int(top_k), int(layer_id))


def _workspace(model_runner: Any, device: torch.device) -> Workspace:
    ws = model_runner.__dict__.get("_tts_roe_ws")
    if ws is None:
        ws = model_runner.__dict__["_tts_roe_ws"] = Workspace(device, pin_memory=device.type == "cuda")
    return ws


def _forward_around(orig: Any, model_runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(forward_batch, "tts_plugins_rows", None) is None:
        return orig(model_runner, forward_batch, *args, **kwargs)
    token = _STEP.set(_Step(model_runner, forward_batch))
    try:
        return orig(model_runner, forward_batch, *args, **kwargs)
    finally:
        _STEP.reset(token)


def _select_around(orig: Any, hidden_states: Any, router_logits: Any, topk_config: Any, *args: Any, **kwargs: Any) -> Any:
    step = _STEP.get()
    if step is not None:
        try:
            masked = step.mask(router_logits, topk_config.top_k, kwargs.get("layer_id", getattr(topk_config, "layer_id", None)))
        except Exception:
            log.exception("tts_plugins: RoE failed to route a step; its rows run with the model's own routing")
            masked = None
        if masked is not None:
            router_logits = masked
    return orig(hidden_states, router_logits, topk_config, *args, **kwargs)


class SglangRoEPatch(RoEPatchBase):
    """RoE routing noise for SGLang, switched on per request by ``tts_roe_tau``."""

    engine, label, min_version, max_version = "sglang", "SGLang", MIN_VERSION, MAX_VERSION

    def install(self, patcher: Any) -> None:
        from tts_plugins import patching

        reason = self.supported()
        if reason is not None:
            log.error("tts_plugins: not installing RoE: %s (requests with tts_roe_tau are refused)", reason)
            return
        patching.sglang_hooks([(TARGETS["forward"], _forward_around, "around"), (TARGETS["select"], _select_around, "around")], tag="roe",
                              min_version=MIN_VERSION, max_version=MAX_VERSION)
