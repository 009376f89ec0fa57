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

The engine patches (``tts_plugins.adapters.vllm_roe``: vLLM's MoE runner;
``tts_plugins.adapters.sglang_roe``: SGLang's ``select_experts``) apply it per
request (``tts_roe_tau``); rosters aggregate the members' distributions in
:mod:`tts_plugins.logits_processors.roster`.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer over int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniform(seed: torch.Tensor, position: torch.Tensor, layer: int, n: int) -> torch.Tensor:
    """``[T, n]`` float64 uniforms in (0, 1), a pure function of (seed, position, layer, column)."""
    key = splitmix64(splitmix64(splitmix64(seed.to(torch.int64)) ^ position.to(torch.int64)) ^ int(layer))
    cols = torch.arange(n, dtype=torch.int64, device=seed.device)
    bits = splitmix64(key.unsqueeze(1) ^ splitmix64(cols).unsqueeze(0))
    return (_shr(bits, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))


def gumbel(seed: torch.Tensor, position: torch.Tensor, layer: int, n: int) -> torch.Tensor:
    """``[T, n]`` Gumbel(0, 1) draws, reproducible from (seed, position, layer)."""
    return -torch.log(-torch.log(uniform(seed, position, layer, n)))


def noisy_topk(router_logits: torch.Tensor, k: int, tau: torch.Tensor, noise: torch.Tensor, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``TopK(R + tau * G, k)`` per row and their gating weights from the clean router softmax.

    ``router_logits``: ``[T, E]``; ``tau``: ``[T]`` (0 = the model's routing, bit-identical); ``noise``: ``[T, E]``
    Gumbel draws (:func:`gumbel`, or injected by tests). Returns ``(weights [T, k] float32, ids [T, k] int64)``.
    """
    scores = torch.where((tau > 0).unsqueeze(1), router_logits + tau.unsqueeze(1).to(router_logits.dtype) * noise.to(router_logits.dtype), router_logits)
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
    """
    _, ids = noisy_topk(router_logits, k, tau, noise)
    low = torch.finfo(router_logits.dtype).min / 2
    masked = torch.full_like(router_logits, low).scatter(1, ids, router_logits.gather(1, ids))
    return torch.where((tau > 0).unsqueeze(1), masked, router_logits)
