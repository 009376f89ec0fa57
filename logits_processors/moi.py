"""Mixture of Inputs (MoI): the next step's input embedding mixes the sampled token with the distribution.

Paper: "Text Generation Beyond Discrete Token Sampling" (arXiv 2505.14827) and
the authors' vLLM patch (PyPI ``mixinputs``). After token ``y`` is sampled from
``p``, the next input embedding is ``h = sum_i w_i E_i`` with::

    w = (H * p + (beta + 1 - H) * y) / (beta + 1)

``H`` the entropy of ``p`` normalized by ``log k`` to [0, 1]. As in the
authors' code, ``p`` is the model's distribution restricted to its top-k
tokens (softmax over the top-k raw logits, before temperature and other
processors; k = 20 by default) and beta defaults to 1.0.

One deliberate difference from the authors' code, which writes the mixture as
``H * sum_i ((p_i + beta * [i == y]) / (1 + beta)) E_i + (1 - H) E_y`` over the
top-k ids only: when the sampled token lies outside the top-k (a tail sample
at high temperature) their ``beta * y`` term vanishes and the weights sum to
less than 1. We keep the paper's formula, whose weights always sum to 1; the
two agree whenever ``y`` is in the top-k (always for greedy rows).

Everything engine-neutral lives here: the parameters (:class:`MoIParams`),
the math, the per-request stash, the state of one model runner
(:class:`MoIRunnerState`: failures, refusals, the requests dropped) and the
mix-position rule (:meth:`MoIStash.take_mix`). The engine patches
(``tts_plugins.adapters.vllm_moi``, ``tts_plugins.adapters.sglang_moi``) only
find the hook points: they call :meth:`MoIStash.stash` right after the engine
sampled (with the raw logits of the opted-in rows and the sampled ids) and
:meth:`MoIStash.mix` when the next forward of those requests is built. State
is O(k) per request (ids and probabilities of the top-k, the entropy and the
sampled id), never the O(length x hidden) buffer of the authors' patch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tts_plugins.params import Key, get_float, get_int, show
from tts_plugins.reduce import topk_rows
from tts_plugins.slots import SlotAllocator, Workspace
from tts_plugins.technique import ModelPatch

__all__ = ["MOI_KEYS", "MOI_KEY_SPECS", "MOI_MAX_TOPK", "MoIParams", "MoIPatchBase", "MoIRunnerState", "MoIStash", "moi_reference",
           "topk_distribution"]

MOI_MAX_TOPK = 256

MOI_KEY_SPECS = (
    Key("tts_moi_beta", "number > 0 and <= 1e6", None,
        "Switches Mixture of Inputs on for the request: the weight of the sampled token against the model's top-k "
        "distribution in the next input embedding (larger keeps more of the sample; authors: 1.0, range 0.5 to 2)."),
    Key("tts_moi_topk", f"int in [1, {MOI_MAX_TOPK}]", 20,
        "The support of the mixed distribution (1: plain decoding). Needs tts_moi_beta."),
)
MOI_KEYS = frozenset(k.name for k in MOI_KEY_SPECS)


@dataclass(frozen=True)
class MoIParams:
    """Mixture of Inputs options of one request (authors' defaults: beta 1.0, top-20).

    ``beta`` > 0 is the weight of the sampled token against the distribution
    (larger keeps more of the sample; beta -> inf is plain decoding). ``topk``
    is the support of the distribution that is mixed, at most ``MOI_MAX_TOPK``
    so per-request memory stays O(k).
    """

    beta: float = 1.0
    topk: int = 20

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> MoIParams | None:
        if "tts_moi_beta" not in flat:
            if "tts_moi_topk" in flat:
                raise ValueError("tts_moi_topk needs tts_moi_beta (which switches Mixture of Inputs on), "
                                 f"got tts_moi_topk={show(flat['tts_moi_topk'])} alone")
            return None
        return cls(
            beta=get_float(flat, "tts_moi_beta", minimum=0.0, maximum=1e6, open_min=True),
            topk=get_int(flat, "tts_moi_topk", 20, minimum=1, maximum=MOI_MAX_TOPK),
        )

    @classmethod
    def of_request(cls, extra: Mapping[str, Any] | None) -> MoIParams | None:
        """The params of a request's flat extra arguments (any keys), or None when it does not opt in."""
        if not extra or "tts_moi_beta" not in extra:
            return None
        return cls.parse({k: v for k, v in extra.items() if k in MOI_KEYS})


def topk_distribution(logits: torch.Tensor, topk: torch.Tensor, kmax: int, rows: torch.Tensor | None = None,
                      scratch: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' top-k ids, renormalized probabilities (zero past each row's own k) and normalized entropy.

    ``logits[n, V]`` raw scores (or, with ``rows``, those rows of ``logits``), ``topk[n]`` each row's k
    (<= kmax). Returns ``ids[n, kmax]`` (int64), ``probs[n, kmax]`` (float32), ``entropy[n]`` in [0, 1]
    (0 for k = 1).
    """
    vals, ids = topk_rows(logits, kmax, rows, scratch)  # in the logits' own dtype: no float copy of [n, V]; the k values convert exactly
    vals = vals.float()
    keep = torch.arange(kmax, device=logits.device) < topk.unsqueeze(1)
    vals = vals.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(vals, dim=-1)
    probs = logp.exp()
    ent = -(probs * logp.masked_fill(~keep, 0.0)).sum(-1)
    norm = torch.log(topk.float()).clamp_min(1e-12)
    ent = torch.where(topk > 1, ent / norm, torch.zeros_like(ent)).clamp_(0.0, 1.0)
    return ids, probs, ent


def mixture_weights(probs: torch.Tensor, ent: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the top-k rows and of the sampled token: ``(H p / (1 + beta), (beta + 1 - H) / (beta + 1))``."""
    scale = ent / (1.0 + beta)
    return probs * scale.unsqueeze(1), (beta + 1.0 - ent) / (beta + 1.0)


class MoIStash:
    """Per-request top-k stash keyed by an engine's request key, in buffers allocated on first use.

    ``pos[slot]`` is the sequence position of the stashed sampled token; an
    adapter mixes a row only when the token it feeds sits at exactly that
    position (the first decode step after the sample), so chunked-prefill
    tokens that the engine discards, re-prefills after preemption and any
    other mismatch run with plain embeddings instead of a wrong mixture.
    """

    def __init__(self, max_requests: int, device: torch.device | str = "cpu", kmax: int = MOI_MAX_TOPK) -> None:
        self.max_requests, self.device, self.kmax = max_requests, torch.device(device), kmax
        self.slot_of: dict[Hashable, int] = {}
        self.slots = SlotAllocator(max_requests, owner="Mixture of Inputs")
        self._allocated = False
        self.pos = np.full(max_requests, -1, dtype=np.int64)
        self.topk = np.zeros(max_requests, dtype=np.int64)
        self.beta_host = np.ones(max_requests, dtype=np.float32)
        self.ws = Workspace(self.device, pin_memory=self.device.type == "cuda")  # pinned staging of the step's indices

    def _allocate(self) -> None:
        n, k, dev = self.max_requests, self.kmax, self.device
        self.ids = torch.zeros(n, k, dtype=torch.int64, device=dev)
        self.probs = torch.zeros(n, k, dtype=torch.float32, device=dev)
        self.ent = torch.zeros(n, dtype=torch.float32, device=dev)
        self.sampled = torch.zeros(n, dtype=torch.int64, device=dev)
        self.beta = torch.ones(n, dtype=torch.float32, device=dev)
        self._allocated = True

    def __len__(self) -> int:
        return len(self.slot_of)

    def bytes_per_request(self) -> int:
        """Device bytes held per request slot (ids, probabilities, entropy, sampled id, beta)."""
        return self.kmax * (8 + 4) + 4 + 8 + 4

    def admit(self, key: Hashable, params: MoIParams) -> int:
        if key in self.slot_of:
            self.release(key)
        if self.slots.available and not self._allocated:
            self._allocate()
        slot = self.slots.take()  # SlotsExhausted (a RuntimeError) when every slot is taken
        self.slot_of[key] = slot
        self.pos[slot] = -1
        self.topk[slot] = params.topk
        self.beta_host[slot] = params.beta
        self.beta[slot] = params.beta  # admission only, never on the per-step path
        self.probs[slot].zero_()  # columns past this request's k stay zero for its whole life
        return slot

    def release(self, key: Hashable) -> None:
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.pos[slot] = -1
            self.slots.free(slot)

    def clear(self) -> None:
        for key in list(self.slot_of):
            self.release(key)

    def stash(self, slots: np.ndarray, logits_rows: torch.Tensor, sampled: torch.Tensor, positions: np.ndarray) -> None:
        """After sampling: keep the top-k of ``logits_rows[n, V]`` and ``sampled[n]`` for ``slots[n]``."""
        self.stash_distribution(slots, logits_rows)
        self.stash_sampled(slots, sampled, positions)

    def stash_distribution(self, slots: np.ndarray, logits: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor | None:
        """Before sampling (the sampler may edit the logits in place): keep the top-k of rows ``rows`` of ``logits``
        (all rows when None) for ``slots``, without copying the rows. Returns the rows as a device index (None when
        ``rows`` is None), for the sampled ids. Nothing is mixed until :meth:`stash_sampled` sets the positions."""
        if len(slots) == 0:
            return None
        topk_np = np.minimum(self.topk[slots], logits.shape[-1])
        kmax = int(topk_np.max())
        index = self.ws.upload("stash_slots", slots)
        topk = self.ws.upload("stash_topk", topk_np)
        at = None if rows is None else self.ws.upload("stash_rows", rows)
        self.pos[slots] = -1  # a stash in progress is not mixed
        ids, probs, ent = topk_distribution(logits, topk, kmax, at, self.ws)
        self.ids[index, :kmax] = ids
        self.probs[index, :kmax] = probs
        self.ent[index] = ent
        return at

    def stash_sampled(self, slots: np.ndarray, sampled: torch.Tensor, positions: np.ndarray) -> None:
        """After sampling: the sampled ids ``sampled[n]`` of ``slots`` (whose distribution was stashed this step)."""
        if len(slots) == 0:
            return
        index = self.ws.upload("sampled_slots", slots)
        self.sampled[index] = sampled.to(torch.int64)
        self.pos[slots] = positions

    def take_mix(self, slots: np.ndarray, last_positions: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The mix-position rule, for the requests of ``slots`` in a forward that feeds each ``counts[i]`` tokens,
        the last at ``last_positions[i]``: a mask of those to mix (one token fed, at exactly the stashed position).

        Every stash of ``slots`` is consumed (a mixed one is used now; any other is stale: a re-prefill after
        preemption, a chunk of a prefill), so it is never applied later to the wrong row. Requests not in
        ``slots`` keep theirs.
        """
        pos = self.pos[slots]
        ok = (counts == 1) & (pos >= 0) & (pos == last_positions)
        self.pos[slots] = -1
        return ok

    def mix(self, slots: np.ndarray, embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The mixed input embeddings ``[n, d]`` of ``slots`` (float32); ``embed`` maps ids to embeddings."""
        kmax = int(np.minimum(self.topk[slots], self.kmax).max())
        index = self.ws.upload("mix_slots", slots)
        ids, probs = self.ids[index, :kmax], self.probs[index, :kmax]
        w_top, w_y = mixture_weights(probs, self.ent[index], self.beta[index])
        y = self.sampled[index]
        emb = embed(torch.cat([ids.reshape(-1), y])).float()
        n = len(slots)
        e_top, e_y = emb[: n * kmax].view(n, kmax, -1), emb[n * kmax :]
        return torch.einsum("nk,nkd->nd", w_top, e_top) + w_y.unsqueeze(1) * e_y


def moi_reference(embedding: torch.Tensor, logits: torch.Tensor, sampled: int, beta: float, topk: int = 20) -> torch.Tensor:
    """One row, the paper's formula over the whole vocabulary in float64: ``w @ E``.

    ``w = (H p + (beta + 1 - H) y) / (beta + 1)`` with ``p`` the softmax of the
    top-k logits (zero elsewhere) and ``H`` its entropy over ``log k``. The
    oracle for the engines' vectorized path.
    """
    z = logits.double()
    k = min(topk, z.shape[-1])
    vals, ids = z.topk(k)
    p = torch.zeros_like(z)
    p[ids] = torch.softmax(vals, -1)
    nz = p[ids]
    h = float(-(nz * nz.clamp_min(1e-300).log()).sum() / math.log(k)) if k > 1 else 0.0
    h = min(max(h, 0.0), 1.0)
    y = torch.zeros_like(z)
    y[sampled] = 1.0
    w = (h * p + (beta + 1.0 - h) * y) / (beta + 1.0)
    return w @ embedding.double()


class MoIRunnerState:
    """Mixture-of-Inputs state of one model runner, whatever the engine: the stash, failures and refusals.

    ``refuse``: why this runner cannot mix at all (e.g. pipeline parallelism), or None. Requests that cannot
    start, and every request after a failure, run plain; ``dropped`` holds the ones the engine has not
    finished yet (an engine that asks again every step reads it to not retry them).
    """

    def __init__(self, max_requests: int, device: torch.device | str, logger: logging.Logger, refuse: str | None = None) -> None:
        self.stash = MoIStash(max_requests, device)
        self.refuse = refuse
        self.log = logger
        self.dropped: set[Hashable] = set()
        self.warned: set[str] = set()
        self.failures = 0

    def start(self, key: Hashable, extra: Mapping[str, Any] | None) -> int | None:
        """Admit request ``key`` if its flat parameters turn mixing on: its stash slot, or None (it runs plain)."""
        if self.refuse:
            self.warn_once(self.refuse)
            return None
        try:
            params = MoIParams.of_request(extra)
            return self.stash.admit(key, params) if params is not None else None
        except Exception:  # admission validated it; never take the engine down
            self.log.exception("tts_plugins: Mixture of Inputs could not start for request %s; it runs plain", key)
            return None

    def release(self, key: Hashable) -> None:
        self.stash.release(key)
        self.dropped.discard(key)

    def fail_safe(self, what: str) -> None:
        """Our code raised inside the engine: log it, drop every request's mixing (they run plain), go on."""
        self.log.exception("tts_plugins: Mixture of Inputs failed %s; its requests continue without it", what)
        self.failures += 1
        for key in list(self.stash.slot_of):
            self.stash.release(key)
            self.dropped.add(key)

    def warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            self.log.error("tts_plugins: Mixture of Inputs: %s", message)

    def debug_counts(self) -> dict[str, int]:
        return {"moi.requests": len(self.stash), "moi.dropped": len(self.dropped), "moi.failures": self.failures}


class MoIPatchBase(ModelPatch):
    """What the engines' Mixture-of-Inputs patches share: the request keys, parsing and the version check.

    Subclasses set ``engine``, ``label`` (for messages) and the version range the patch was written for, and
    may refuse more in ``refuse()``.
    """

    name = "moi"
    keys = MOI_KEYS
    key_specs = MOI_KEY_SPECS
    params = MoIParams
    feature = "Mixture of Inputs"
    CACHE_SALT = "tts_plugins:moi"

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [{"tts_moi_beta": 1.0}, {"tts_moi_beta": 0.5, "tts_moi_topk": 5}]

    @classmethod
    def neutral_params(cls) -> list[dict[str, Any]]:
        # top-1: the mixture's entropy is 0, so the input is the sampled token's own embedding
        return [{"tts_moi_beta": 1.0, "tts_moi_topk": 1}]

    @classmethod
    def salt_of(cls, params: MoIParams) -> str:
        """A prefix-cache salt that tells Mixture-of-Inputs settings apart (KV computed from mixtures is not
        determined by the token ids); for an engine that salts rather than keeps such KV out of its cache."""
        return f"{cls.CACHE_SALT}:beta={params.beta!r}:topk={params.topk!r}"
