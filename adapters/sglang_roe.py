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
* ``Req.__init__`` (after): an opted-in request gets a ``cache_salt`` with its
  tau and seed, so the radix cache never shares its noisy KV, nor hands it a
  plain prefix.

The seed is the request's ``sampling_seed``; without one, a hash of its id.
Decode graphs (CUDA graphs, torch.compile) would replay the routing of the
capture: with a decode graph runner present, RoE rows run plain and an error is
logged. GPU fused paths that do not call ``select_experts`` (e.g. some
monolithic quantized kernels) are not covered; they route plainly.
"""

from __future__ import annotations

import contextvars
import logging
import zlib
from typing import Any

import numpy as np
import torch

from tts_plugins.logits_processors.roe import gumbel, mask_router_logits
from tts_plugins.params import ROE_KEYS, RoEParams

log = logging.getLogger("sglang.tts_plugins")

TARGETS = {
    "forward": "sglang.srt.model_executor.model_runner.ModelRunner._forward_raw",
    "select": "sglang.srt.layers.moe.topk.select_experts",
    "req": "sglang.srt.managers.schedule_batch.Req.__init__",
}
MIN_VERSION, MAX_VERSION = "0.5.20", "0.6"

_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("tts_plugins_sglang_roe", default=None)
_ERRORS: set[str] = set()


def _error_once(key: str, message: str) -> None:
    if key not in _ERRORS:
        _ERRORS.add(key)
        log.error("tts_plugins: %s", message)


def req_roe(req: Any) -> tuple[RoEParams | None, int]:
    """``(params, seed)`` of a request (params None: none), parsed once and kept on the request."""
    cached = req.__dict__.get("_tts_roe")
    if cached is None:
        cp = getattr(req.sampling_params, "custom_params", None) or {}
        params = None
        if isinstance(cp, dict) and ("tts_roe_tau" in cp or "tts_roe_tau_layers" in cp):
            try:
                params = RoEParams.parse({k: v for k, v in cp.items() if k in ROE_KEYS})
            except ValueError as exc:  # admission validated it
                log.error("tts_plugins: ignoring invalid RoE parameters of an admitted request: %s", exc)
        seed = getattr(req.sampling_params, "sampling_seed", None)
        cached = (params, int(seed) % (2**62) if seed is not None else zlib.crc32(str(req.rid).encode()))
        req.__dict__["_tts_roe"] = cached
    return cached


def _moe_ordinals(model_runner: Any) -> dict[int, int] | None:
    """``{layer id: index among the MoE layers}`` ({} without MoE; None when it cannot tell), found once."""
    found = model_runner.__dict__.get("_tts_moe_ordinals", False)
    if found is False:
        try:
            from sglang.srt.layers.moe.topk import TopK

            ids = sorted({int(m.layer_id) for m in model_runner.model.modules() if isinstance(m, TopK) and m.layer_id is not None})
            n_topk = sum(isinstance(m, TopK) for m in model_runner.model.modules())
            found = {layer: i for i, layer in enumerate(ids)} if len(ids) == n_topk else (None if n_topk else {})
        except Exception:
            found = None
        model_runner.__dict__["_tts_moe_ordinals"] = found
    return found


def _has_moe(model_runner: Any) -> bool:
    found = model_runner.__dict__.get("_tts_has_moe")
    if found is None:
        try:
            from sglang.srt.layers.moe.topk import TopK

            found = any(isinstance(m, TopK) for m in model_runner.model.modules())
        except Exception:
            found = True  # cannot tell: do not refuse
        model_runner.__dict__["_tts_has_moe"] = found
    return found


class _Step:
    def __init__(self, model_runner: Any, forward_batch: Any) -> None:
        self.model_runner, self.fb = model_runner, forward_batch
        self.built = False
        self.tau: torch.Tensor | None = None
        self.seed: torch.Tensor | None = None

    def build(self) -> None:
        self.built = True
        rows = getattr(self.fb, "tts_plugins_rows", None)
        if rows is None:
            return
        reqs = rows[0]
        pairs = [req_roe(r) for r in reqs]
        if not any(p[0] is not None for p in pairs):
            return
        ordinal = _moe_ordinals(self.model_runner)
        width = max(1, len(ordinal or ()))
        tau = np.zeros((len(pairs), width), dtype=np.float32)
        for i, (params, _) in enumerate(pairs):  # the batch's requests, once per forward, only when one opted in
            if params is None:
                continue
            taus = params.taus(len(ordinal)) if ordinal else ([params.tau] if params.layers is None else None)
            if taus is None:
                _error_once(f"layers{len(params.layers or ())}", f"tts_roe_tau_layers has {len(params.layers or ())} taus but this model has "
                            f"{len(ordinal or ())} MoE layers; those requests run with the model's own routing")
                continue
            tau[i] = taus
        if not tau.any():
            return
        self.ordinal = ordinal or {}
        if not _has_moe(self.model_runner):
            _error_once("dense", "tts_roe_tau on a model without MoE layers: nothing to route; those requests run plain")
            return
        if getattr(self.model_runner, "decode_cuda_graph_runner", None) is not None:
            _error_once("graphs", "RoE needs decode graphs off (CUDA graphs or torch.compile replay the captured routing); RoE requests run plain")
            return
        seed = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
        mode = self.fb.forward_mode
        device = self.fb.positions.device
        if mode.is_decode():
            per_row = torch.arange(len(reqs), device=device)
        elif mode.is_extend() and not mode.is_target_verify():
            lens = torch.as_tensor(self.fb.extend_seq_lens_cpu, dtype=torch.int64)
            per_row = torch.repeat_interleave(torch.arange(len(reqs)), lens).to(device)
        else:
            _error_once("mode", f"RoE cannot map the rows of a {mode} batch (speculative decoding?); its RoE requests run plain")
            return
        if per_row.shape[0] != self.fb.positions.shape[0]:
            _error_once("rows", "RoE cannot map this batch's token rows to its requests; RoE requests run plain")
            return
        self.tau = torch.from_numpy(tau).to(device)[per_row]
        self.seed = torch.from_numpy(seed).to(device)[per_row]

    def mask(self, router_logits: torch.Tensor, top_k: int, layer_id: int | None) -> torch.Tensor | None:
        if not self.built:
            self.build()
        if self.tau is None:
            return None
        if layer_id is None or router_logits.shape[0] != self.tau.shape[0]:
            _error_once("layer", "RoE saw router logits it cannot map (no layer id, or padded rows); those rows run plain")
            return None
        noise = gumbel(self.seed, self.fb.positions[: self.tau.shape[0]], int(layer_id), router_logits.shape[1])
        return mask_router_logits(router_logits, int(top_k), self.tau[:, self.ordinal.get(int(layer_id), 0)], noise)


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


def _req_after(result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
    try:
        params, seed = req_roe(req)
        if params is not None:
            mine = f"tts_plugins:roe:{params.salt()}:seed={seed}"
            req.cache_salt = f"{req.cache_salt}|{mine}" if getattr(req, "cache_salt", None) else mine
    except Exception:
        log.exception("tts_plugins: RoE could not salt a request's cache key")


class SglangRoEPatch:
    """RoE routing noise for SGLang, switched on per request by ``tts_roe_tau``."""

    name = "roe"
    engine = "sglang"
    keys = ROE_KEYS

    @staticmethod
    def parse_params(flat: Any) -> RoEParams | None:
        return RoEParams.parse(flat)

    @classmethod
    def supported(cls) -> str | None:
        from tts_plugins import patching

        return patching.version_refusal("sglang", "SGLang", "RoE", MIN_VERSION, MAX_VERSION)

    def install(self, patcher: Any) -> None:
        from tts_plugins import patching

        reason = self.supported()
        if reason is not None:
            log.error("tts_plugins: not installing RoE: %s (requests with tts_roe_tau are refused)", reason)
            return
        patching.sglang_hooks([(TARGETS["forward"], _forward_around, "around"), (TARGETS["select"], _select_around, "around"),
                               (TARGETS["req"], _req_after, "after")], tag="roe")
