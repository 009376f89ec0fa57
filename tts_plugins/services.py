"""Services the core offers every technique, so that no adapter names a technique and no technique imports another.

The engine adapters (``tts_plugins.adapters``) provide four things once, for
whoever needs them; techniques and their model patches use them through the
registry (:class:`tts_plugins.manager.Registry`) and the optional methods of
:class:`tts_plugins.technique.ModelPatch`:

* **Discarded rows.** A prefill chunked over several steps samples a token at
  every chunk but the engine keeps only the last chunk's. The adapters find
  those rows themselves (vLLM: the model runner's ``discard_request_mask``,
  read while it samples; SGLang: a request whose extend does not reach the end
  of its fill ids) and map them to the neutral slot for that step, so no
  ``LogitsTechnique.apply`` ever sees them as its request's row (a roster must
  not count such a member). Model patches that sample on their own (Mixture
  of Inputs) get the same mask from the SGLang adapter (``on_batch``'s
  ``kept``).
* **Per-sample front-end hook.** The engines fan a request with ``n`` samples
  out into ``n`` child requests in their front ends, the one place that knows
  which sample a child is. The adapters hook that place once and ask every
  model patch of their engine for a :class:`SampleEdit` of child ``index``
  (``ModelPatch.sample_edit``); they merge the edits with
  :func:`sample_edit` and apply them in the engine's own terms.
* **Step observer.** The SGLang adapter calls ``on_batch``, ``before_sample``,
  ``after_sample`` and ``on_finished`` of each model patch of its engine
  that overrides them (:func:`step_observers`), in the order the patches were
  registered, instead of naming any patch. (vLLM's model runner has a method
  per event, which patches hook directly.)
* **Placement.** With data parallelism each rank is its own engine, so the
  members of a group (or of a roster) that land on different ranks never see
  each other. A technique names what must run together
  (``LogitsTechnique.placement``); the adapters hook admission once and give
  such a request a data-parallel rank derived from that name
  (:func:`placement`, :func:`rank_for`), which the engine's front end then
  honours for the request and every one of its samples.
* **Cache salt.** KV computed under a patch that changes the model's output
  for one request must never be reused by another. A patch declares how to
  salt the prefix cache for its parameters (``ModelPatch.cache_salt``); the
  adapters hook request creation once and combine the salts with
  :func:`cache_salt`.
* **Reports.** A technique may tell the client something about a request when it ends
  (``LogitsTechnique.report``: DeepConf's trace confidence). The adapters hook the engine's finish once and
  put the reports into the response's stop-reason field (:func:`report_json`); the client reads them back with
  :func:`parse_report`.

Nothing here imports torch or an engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tts_plugins.params import tts_keys

log = logging.getLogger("tts_plugins")

__all__ = ["SampleEdit", "cache_salt", "parsed_request", "placement", "placement_keys", "rank_for", "sample_edit", "step_observers"]


@dataclass(frozen=True)
class SampleEdit:
    """How one sample (one child of a request with ``n`` samples) differs from the request, engine-neutral.

    ``temperature``: the sample's own temperature instead of the request's (below
    :data:`tts_plugins.technique.GREEDY_TEMPERATURE` the adapter uses its engine's
    greedy form). ``extra``: ``tts_*`` keys set on the sample's flat parameters.
    ``own_seed``: the sample's seed is the request's seed plus its index, when the
    request has one (vLLM does this for every sample anyway; SGLang's children
    share the request's seed otherwise).
    """

    temperature: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    own_seed: bool = False

    def merge(self, other: SampleEdit) -> SampleEdit:
        """Both edits at once; ``other``'s temperature wins when both set one (the later registration)."""
        return SampleEdit(
            temperature=other.temperature if other.temperature is not None else self.temperature,
            extra={**self.extra, **other.extra},
            own_seed=self.own_seed or other.own_seed,
        )


def parsed_request(registry: Any, flat: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{technique or patch name: parsed params}`` of a request's ``tts_*`` keys, through the registry's parsers."""
    keys = tts_keys(flat)
    if not keys:
        return {}
    return {**registry.parse_patches(keys), **registry.parse(keys)}


def _own(patch: Any, method: str) -> bool:
    from tts_plugins.technique import ModelPatch

    return getattr(type(patch), method, None) is not getattr(ModelPatch, method)


def sample_edit(registry: Any, engine: str, flat: Mapping[str, Any] | None, index: int, parent_id: str | None) -> SampleEdit | None:
    """The merged edits of sample ``index`` (of the request ``parent_id``; None when the engine did not fan it out)
    from every ``engine`` patch, or None when no patch edits it. Raises what the parsers raise."""
    patches = [p for p in registry.model_patches() if p.engine == engine and _own(p, "sample_edit")]
    if not patches or not tts_keys(flat):
        return None
    parsed = parsed_request(registry, flat)
    out = None
    for patch in patches:
        edit = patch.sample_edit(parsed, index, parent_id)
        if edit is not None:
            out = edit if out is None else out.merge(edit)
    return out


def cache_salt(registry: Any, engine: str, flat: Mapping[str, Any] | None, request_id: str, seed: int | None) -> str | None:
    """The prefix-cache salt of a request from every ``engine`` patch it turns on (``|``-joined), or None."""
    keys = tts_keys(flat)
    if not keys:
        return None
    salts = []
    for patch in registry.model_patches():
        if patch.engine != engine or not patch.keys or not _own(patch, "cache_salt"):
            continue
        mine = {k: v for k, v in keys.items() if k in patch.keys}
        params = patch.parse_params(mine) if mine else None
        if params is not None:
            salt = patch.cache_salt(params, request_id, seed)
            if salt:
                salts.append(salt)
    return "|".join(salts) or None


def step_observers(registry: Any, engine: str) -> tuple[Any, ...]:
    """The ``engine`` patches that observe the sampling step (override any of its events), in registration order."""
    events = ("on_batch", "before_sample", "after_sample", "on_finished")
    return tuple(p for p in registry.model_patches() if p.engine == engine and any(_own(p, e) for e in events))


def _placements(registry: Any, flat: Mapping[str, Any] | None) -> list[tuple[type, str]]:
    """``(technique, its placement)`` for each technique of the request that names one."""
    keys = tts_keys(flat)
    if not keys:
        return []
    parsed = registry.parse(keys)
    out = []
    for cls in registry.techniques:
        if cls.name in parsed:
            where = cls.placement(parsed[cls.name])
            if where is not None:
                out.append((cls, where))
    return out


def placement(registry: Any, flat: Mapping[str, Any] | None) -> str | None:
    """What a request must share an engine instance with, from its techniques' ``placement``: a name (requests
    with the same name run together), ``""`` (its own samples together), or None (no constraint). When two
    techniques name different things, the first name in sorted order wins (documented: a request that is both a
    group member and a roster member is placed by the group). Raises what the parsers raise."""
    names = [where for _, where in _placements(registry, flat)]
    if not names:
        return None
    named = sorted(n for n in names if n)
    return named[0] if named else ""


def placement_keys(registry: Any, flat: Mapping[str, Any] | None) -> list[str]:
    """The request's keys that belong to techniques naming a placement (for refusals where it cannot be met)."""
    owners = {cls for cls, _ in _placements(registry, flat)}
    return sorted(k for k in tts_keys(flat) if any(k in cls.keys for cls in owners))


def rank_for(name: str, num_ranks: int) -> int:
    """The data-parallel rank of the requests placed by ``name``: a stable hash (the same in every process and
    every run, unlike ``hash``), so every front-end process sends a group to one rank."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % max(1, int(num_ranks))


REPORT_PREFIX = '{"tts":'


def report_json(reports: Mapping[str, Any], engine_reason: Any = None) -> str:
    """A finished request's technique reports (:meth:`LogitsTechnique.report`, by technique name) as the JSON the
    adapters put into the response's stop-reason field (vLLM ``stop_reason``, SGLang ``matched_stop``): ``{"tts":
    {name: report}, "engine": <the engine's own stop reason, a stop token id or None>}``."""
    return json.dumps({"tts": dict(reports), "engine": engine_reason}, separators=(",", ":"))


def parse_report(reason: Any) -> dict[str, Any] | None:
    """The technique reports in a response's stop-reason field (see :func:`report_json`), or ``None``."""
    if not isinstance(reason, str) or not reason.startswith(REPORT_PREFIX):
        return None
    try:
        data = json.loads(reason)
    except ValueError:
        return None
    return data.get("tts") if isinstance(data, dict) and isinstance(data.get("tts"), dict) else None
