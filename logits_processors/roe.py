"""RoE (Roster of Experts) routing noise: the engine-neutral kernel.

Paper: "MoEs Are Stronger than You Think: Hyper-Parallel Inference Scaling
with RoE" (arXiv 2509.17238; no public code; reported). A token's experts are
``TopK(R + tau * G, k)`` with ``R`` the router logits and ``G`` i.i.d.
Gumbel(0, 1); ``tau = 0`` is the model's own routing. Since
``R + tau * G = tau * (R / tau + G)``, this is the Gumbel-top-k trick: the
chosen set is a sample without replacement from ``softmax(R / tau)``.

Our choices, where the paper is not specific:

* Gating weights: the noise only *selects* the experts; their weights are the
  model's own (softmax of the clean router logits at the selected experts,
  renormalized when the model renormalizes its top-k), so a selected expert
  is weighted as the model would weigh it.
* Noise from the request's seed, without a per-request generator: each draw is
  a counter-based hash (splitmix64) of (seed, position, layer, expert), so it
  is vectorized over the batch's rows, reproducible whatever the batch, and
  the same in every engine. The rows whose ``tau`` is 0 keep ``R`` exactly
  (``torch.where``), so they route bit-identically to the unpatched model.

This module is RoE's engine-neutral half: the parameters (:class:`RoEParams`),
the kernel, the noise seed of a request (:func:`roe_seed`), what RoE knows of
one model runner (:class:`RoEModel`: its MoE layers, one tau per layer, the
errors it logs once) and what both engine patches declare
(:class:`RoEPatchBase`: keys, version check, cache salt). The engine patches
(``tts_plugins.adapters.vllm_roe``: vLLM's MoE runner;
``tts_plugins.adapters.sglang_roe``: SGLang's ``select_experts``) only find the
router logits of each request's tokens. Rosters aggregate the members'
distributions in :mod:`tts_plugins.logits_processors.roster`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tts_plugins.noise import gumbel, splitmix64, uniform  # noqa: F401  (the routing noise; re-exported for tests)
from tts_plugins.params import Key, get_float, get_number_list, show
from tts_plugins.technique import ModelPatch

ROE_MAX_TAU = 100.0
ROE_MAX_LAYERS = 1024

ROE_KEY_SPECS = (
    Key("tts_roe_tau", f"number in [0, {ROE_MAX_TAU:g}]", None,
        "RoE routing noise for every token of the request, in every MoE layer: experts TopK(R + tau * G, k), G Gumbel "
        "draws keyed by the request's seed, token position and layer; 0: the model's own routing."),
    Key("tts_roe_tau_layers", f"list of 1 to {ROE_MAX_LAYERS} numbers in [0, {ROE_MAX_TAU:g}]", None,
        "Instead of tts_roe_tau: one tau per MoE layer, in model order (the engine checks the length against the "
        "model; a mismatch runs the request with the model's own routing and logs an error)."),
)
ROE_KEYS = frozenset(k.name for k in ROE_KEY_SPECS)


@dataclass(frozen=True)
class RoEParams:
    """RoE routing noise for one request: experts ``TopK(R + tau * G, k)`` in the MoE layers, on all its tokens.

    ``tts_roe_tau``: one tau in [0, 100] for every MoE layer; 0 is the model's own routing. Or
    ``tts_roe_tau_layers``: a list of taus in [0, 100], one per MoE layer in model order (the engine checks the
    length against the model; a mismatch runs the request plain with an error in the log). All zero: no params,
    the request runs plain.
    """

    tau: float
    layers: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> RoEParams | None:
        if "tts_roe_tau_layers" in flat:
            if "tts_roe_tau" in flat:
                raise ValueError(f"give tts_roe_tau (one tau for every MoE layer) or tts_roe_tau_layers (one per MoE layer), not both; "
                                 f"got tts_roe_tau={show(flat['tts_roe_tau'])} and tts_roe_tau_layers={show(flat['tts_roe_tau_layers'])}")
            layers = get_number_list(flat, "tts_roe_tau_layers", "taus", max_items=ROE_MAX_LAYERS, maximum=ROE_MAX_TAU, note=" (one per MoE layer)")
            return cls(max(layers), layers) if any(layers) else None
        if "tts_roe_tau" not in flat:
            return None
        tau = get_float(flat, "tts_roe_tau", minimum=0.0, maximum=ROE_MAX_TAU)
        return cls(tau) if tau else None

    @classmethod
    def of_request(cls, extra: Mapping[str, Any] | None) -> RoEParams | None:
        """The params of a request's flat extra arguments (any keys), or None when it does not opt in."""
        if not isinstance(extra, Mapping) or ("tts_roe_tau" not in extra and "tts_roe_tau_layers" not in extra):
            return None
        return cls.parse({k: v for k, v in extra.items() if k in ROE_KEYS})

    def taus(self, num_layers: int) -> list[float] | None:
        """One tau per MoE layer of a model with ``num_layers`` of them; None when the list does not fit."""
        if self.layers is None:
            return [self.tau] * num_layers
        return list(self.layers) if len(self.layers) == num_layers else None

    def salt(self) -> str:
        return f"tau={self.tau!r}" if self.layers is None else "taus=" + ",".join(repr(t) for t in self.layers)


def roe_seed(seed: int | None, request_id: str) -> int:
    """The noise seed of a request: its sampling seed, else a hash of its id (then not reproducible)."""
    return int(seed) % (2**62) if seed is not None else zlib.crc32(str(request_id).encode())


DENSE_ERROR = "tts_roe_tau on a model without MoE layers: nothing to route; those requests run plain"


class RoEModel:
    """What RoE knows of one model runner, whatever the engine: its MoE layers, and the errors it logged.

    ``ordinal``: ``{layer id: index among the model's MoE layers}`` ({} for a dense model; None when the
    engine cannot tell, which refuses nothing). Errors are logged once per runner under a key.
    """

    def __init__(self, ordinal: dict[int, int] | None, logger: logging.Logger) -> None:
        self.ordinal = ordinal
        self.has_moe = bool(ordinal) or ordinal is None
        self.width = max(1, len(ordinal or ()))  # columns of a per-row tau buffer
        self.errors: set[str] = set()
        self.log = logger
        self._ids: dict[torch.device, torch.Tensor] = {}

    def error_once(self, key: str, message: str) -> None:
        if key not in self.errors:
            self.errors.add(key)
            self.log.error("tts_plugins: %s", message)

    def layer_ids(self, device: torch.device) -> torch.Tensor:
        """The MoE layers' ids in column order, on ``device`` (made once)."""
        ids = self._ids.get(device)
        if ids is None:
            ids = self._ids[device] = torch.tensor(sorted(self.ordinal or (), key=(self.ordinal or {}).get), dtype=torch.int64, device=device)
        return ids

    def column(self, layer_id: int) -> int:
        """The tau column of MoE layer ``layer_id``."""
        return (self.ordinal or {}).get(int(layer_id), 0)

    def taus(self, params: RoEParams) -> list[float] | None:
        """One tau per MoE layer for ``params``; None (logged once) when its per-layer list does not fit the model."""
        ordinal = self.ordinal
        taus = params.taus(len(ordinal)) if ordinal else ([params.tau] if params.layers is None else None)
        if taus is None:
            n = len(params.layers or ())
            self.error_once(f"layers{n}", f"tts_roe_tau_layers has {n} taus but this model has {len(ordinal or ())} MoE layers; "
                            "those requests run with the model's own routing")
        return taus


class RoEPatchBase(ModelPatch):
    """What the engines' RoE patches share: the keys, parsing, the version check and the cache salt.

    Subclasses set ``engine``, ``label`` (for messages) and the version range, and may refuse more in
    ``refuse()``.
    """

    name = "roe"
    keys = ROE_KEYS
    key_specs = ROE_KEY_SPECS
    params = RoEParams
    feature = "RoE"

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [{"tts_roe_tau": 0.5}, {"tts_roe_tau_layers": [0.0, 1.0]}]

    @classmethod
    def neutral_params(cls) -> list[dict[str, Any]]:
        return [{"tts_roe_tau": 0.0}, {"tts_roe_tau_layers": [0.0, 0.0]}]  # the model's own routing

    def cache_salt(self, params: RoEParams, request_id: str, seed: int | None) -> str:
        """KV of noisily routed tokens depends on the taus and the noise seed: no other request may reuse it
        (and an RoE request does not reuse plain prefixes). A request whose taus are all 0 (e.g. a roster's clean
        member) parses to no params, gets no salt and shares KV like a plain request."""
        return f"tts_plugins:roe:{params.salt()}:seed={roe_seed(seed, request_id)}"


def noisy_topk(router_logits: torch.Tensor, k: int, tau: torch.Tensor, noise: torch.Tensor,
               renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``TopK(R + tau * G, k)`` per row and their gating weights from the clean router softmax.

    ``router_logits``: ``[T, E]``; ``tau``: ``[T]`` (0 = the model's routing, bit-identical); ``noise``: ``[T, E]``
    Gumbel draws (:func:`gumbel`, or injected by tests). Returns ``(weights [T, k] float32, ids [T, k] int64)``.
    """
    noisy = router_logits + tau.unsqueeze(1).to(router_logits.dtype) * noise.to(router_logits.dtype)
    scores = torch.where((tau > 0).unsqueeze(1), noisy, router_logits)
    ids = torch.topk(scores, k, dim=-1).indices
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def mask_router_logits(router_logits: torch.Tensor, k: int, tau: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The router logits an engine's own routing should see: rows with ``tau > 0`` keep only their noisy top-k experts.

    The unselected experts get a large negative logit, so the model's routing function (softmax, top-k,
    renormalization) picks exactly the noisy choice and weighs it from the clean logits; rows with ``tau == 0`` are
    returned unchanged (bit-identical). With a softmax router that does not renormalize its top-k, the weights come
    out renormalized among the chosen experts (the masked ones leave the normalizer); our choice, documented.
    The noisy scores are float32 whatever the router's dtype (``R + tau * G``: bf16 would tie experts). This is the
    reference of the engines' fast path, :class:`StepNoise`.
    """
    noisy = (tau > 0).unsqueeze(1)
    scores = torch.where(noisy, router_logits.float() + tau.unsqueeze(1).float() * noise.float(), router_logits.float())
    ids = torch.topk(scores, k, dim=-1).indices  # the experts noisy_topk picks (the weights come from the engine's routing)
    keep = torch.zeros_like(router_logits, dtype=torch.bool).scatter_(1, ids, True) | ~noisy
    return torch.where(keep, router_logits, torch.finfo(router_logits.dtype).min / 2)


STEP_NOISE_BUDGET = 1 << 22  # noise draws of one forward computed at once (every MoE layer): 16 MiB of float32


class StepNoise:
    """The routing noise of one forward pass, drawn once for every MoE layer (the per-layer cost is then four
    kernels: add, top-k, compare, fill), and the mask of :func:`mask_router_logits` from it.

    ``seed[T]``, ``position[T]``: each token row's noise seed and position; ``tau[T, width]``: its tau per MoE
    layer column (:meth:`RoEModel.column`). The noise is kept pre-scaled, ``tau * G`` in float32, and ``+inf`` where
    tau is 0, so those rows' scores are ``+inf`` everywhere and nothing of theirs is masked: the mask is
    ``R.masked_fill(scores < kth score, min)``. It equals :func:`mask_router_logits` but where float32 scores
    tie at the k-th place (then both keep a valid top-k). A step whose draws for every layer exceed
    ``STEP_NOISE_BUDGET`` (a long prefill) draws each layer's noise when that layer routes.
    """

    def __init__(self, model: RoEModel, seed: torch.Tensor, position: torch.Tensor, tau: torch.Tensor) -> None:
        self.model, self.seed, self.position, self.tau = model, seed, position, tau
        self.noise: torch.Tensor | None = None  # [L, T, E], layers in column order
        self.layers = sorted(model.ordinal, key=model.ordinal.get) if model.ordinal else None

    @staticmethod
    def _scaled(g: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``tau * g``, ``+inf`` where tau is 0, in place in the fresh float32 draws ``g``."""
        return g.mul_(tau).masked_fill_(tau <= 0, torch.inf)

    def layer_noise(self, layer_id: int, experts: int) -> torch.Tensor:
        """``[T, E]`` float32: ``tau * G`` of MoE layer ``layer_id``, ``+inf`` where its tau is 0."""
        col = self.model.column(layer_id)
        t = self.seed.shape[0]
        if self.noise is None and self.layers is not None and len(self.layers) * t * experts <= STEP_NOISE_BUDGET:
            ids = self.model.layer_ids(self.seed.device)
            g = gumbel(self.seed, self.position, ids, experts)  # [L, T, E]
            self.noise = self._scaled(g, self.tau.t()[: len(self.layers)].unsqueeze(-1))
        if self.noise is not None and self.noise.shape[-1] == experts:
            return self.noise[col]
        return self._scaled(gumbel(self.seed, self.position, int(layer_id), experts), self.tau[:, col].unsqueeze(-1))

    def mask(self, router_logits: torch.Tensor, k: int, layer_id: int) -> torch.Tensor:
        """``router_logits [T, E]`` with every expert outside a noisy row's noisy top-k at a large negative logit."""
        scores = router_logits.float() + self.layer_noise(layer_id, router_logits.shape[1])
        kth = scores.topk(k, dim=-1).values[:, -1:]
        return router_logits.masked_fill(scores < kth, torch.finfo(router_logits.dtype).min / 2)
