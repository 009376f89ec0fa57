"""Temperature ladder: sample ``i`` of a request with ``n`` samples runs at ``tts_temperature_ladder[i % len]``.

Paper: "On the Role of Temperature Sampling in Test-Time Scaling" (arXiv
2510.02611): spreading the samples of a question over a ladder of
temperatures beats the same number of samples at one temperature.

Where the sample index comes from: neither engine tells its sampler which of
a request's ``n`` samples a row is (vLLM only derives the children's seeds,
``seed + i``, and only when a seed is given; SGLang gives the children random
ids). Both engines fan a request with ``n`` samples out into ``n`` child
requests in their front end, in index order, and that is where the index is
known. So the ladder is applied there: each child gets its rung as its own
temperature, and the engine's sampler does the rest exactly as for a request
sent with that temperature (a rung of 0 is the engine's greedy path). This
differs from the technique card's suggestion of a logits processor; it is
exact (no second temperature stacked on the request's) and costs nothing per
decode step.

* vLLM: ``OutputProcessor.add_request`` (front end; called for every child,
  with its index, before the child is sent to the engine core, for ``LLM``
  and the OpenAI server alike). Choice ``i`` of the response is sample ``i``.
* SGLang: ``TokenizerManager._send_one_request`` and ``_send_batch_request``
  (tokenizer manager). The children of one request share one
  ``SamplingParams`` object and are sent in index order, so the index is the
  count of children of that object sent so far. SGLang's prefix warm-up
  request (``max_new_tokens == 0``) samples nothing and is skipped. Choice
  ``i`` of the response is sample ``i``.

The request's own temperature must be > 0 (and ``top_k`` not 1): vLLM refuses
``n > 1`` with temperature 0, and SGLang turns temperature 0 into ``top_k = 1``,
which would silently keep every rung greedy, so admission refuses greedy
requests that carry a ladder. Other sampling settings (``top_p``, ``top_k``,
``min_p``, seeds) apply to every sample as sent.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping
from typing import Any

from tts_plugins.params import LADDER_KEYS, LadderParams

log = logging.getLogger("tts_plugins.ladder")

GREEDY_EPS = 1e-5  # both engines treat a temperature below this as greedy (vLLM 1e-5, SGLang 1e-6)


def _ladder(extra: Any) -> LadderParams | None:
    if not isinstance(extra, Mapping) or "tts_temperature_ladder" not in extra:
        return None
    return LadderParams.parse({"tts_temperature_ladder": extra["tts_temperature_ladder"]})


class LadderPatchBase:
    name = "temperature_ladder"
    keys = LADDER_KEYS
    engine: str
    label: str
    min_version: str
    max_version: str

    @staticmethod
    def parse_params(flat: Mapping[str, Any]) -> LadderParams | None:
        return LadderParams.parse(flat)

    @classmethod
    def supported(cls) -> str | None:
        from tts_plugins import patching

        return patching.version_refusal(cls.engine, cls.label, "the temperature ladder", cls.min_version, cls.max_version,
                                        " (send one request per temperature instead)")

    @staticmethod
    def check_request(params: LadderParams, request: Any) -> None:
        """Refuse a greedy request: the ladder replaces its temperature, and a greedy request cannot carry that."""
        temperature = getattr(request, "temperature", None)
        top_k = getattr(request, "top_k", None)
        if (temperature is not None and temperature < GREEDY_EPS) or top_k == 1:
            raise ValueError(
                f"tts_temperature_ladder={list(params.ladder)!r} sets each sample's temperature, so the request must sample: "
                f"send temperature > 0 and top_k != 1 (got temperature={temperature!r}, top_k={top_k!r}); a rung of 0 gives a greedy sample"
            )


class VllmLadderPatch(LadderPatchBase):
    engine, label, min_version, max_version = "vllm", "vLLM", "0.32", "0.33"
    target = "vllm.v1.engine.output_processor:OutputProcessor.add_request"

    def install(self, patcher: Any) -> None:
        patcher.replace(self.target, _vllm_add_request, min_version=self.min_version, max_version=self.max_version)


def vllm_child_params(params: Any, index: int) -> Any:
    """The sampling params of sample ``index``: a copy with the rung's temperature (the parent's may be shared)."""
    ladder = _ladder(getattr(params, "extra_args", None))
    if ladder is None:
        return params
    child = copy.copy(params)
    child.temperature = ladder.temperature(index)
    if child.temperature < GREEDY_EPS:  # what SamplingParams does for temperature 0
        child.top_p, child.top_k, child.min_p = 1.0, 0, 0.0
    # the engine core checks the params again when it decodes the request, and an error there is fatal to it
    child._verify_args()
    return child


def _vllm_add_request(orig: Any) -> Any:
    @functools.wraps(orig)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        index = kwargs.get("request_index", args[2] if len(args) > 2 else 0)
        try:
            params = getattr(request, "sampling_params", None)
            if params is not None:
                request.sampling_params = vllm_child_params(params, int(index))
        except Exception:  # admission validated the ladder; never fail a request here
            log.exception("tts_plugins: could not apply the temperature ladder; the sample keeps the request's temperature")
        try:  # a request whose samples form a RoE roster (this patch is the front end's one per-sample hook)
            from tts_plugins.adapters import roster

            parent = kwargs.get("parent_req", args[1] if len(args) > 1 else None)
            if parent is not None and getattr(request, "sampling_params", None) is not None:
                request.sampling_params = roster.vllm_child_params(request.sampling_params, int(index), parent.request_id)
        except Exception:
            log.exception("tts_plugins: could not name the roster of a request's samples; they run as separate requests")
        return orig(self, request, *args, **kwargs)

    return add_request


class SglangLadderPatch(LadderPatchBase):
    engine, label, min_version, max_version = "sglang", "SGLang", "0.5.20", "0.6"
    targets = (
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._send_one_request",
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._send_batch_request",
    )

    def install(self, patcher: Any) -> None:
        from tts_plugins import patching

        if self.supported() is not None:
            log.error("tts_plugins: not installing the temperature ladder: %s", self.supported())
            return
        patching.sglang_hooks([(self.targets[0], _sglang_send_one, "around"), (self.targets[1], _sglang_send_batch, "around")], tag="ladder")


class SglangChildCounter:
    """Which child of its request a tokenized SGLang request is: children share one ``SamplingParams`` object."""

    def __init__(self, limit: int = 4096) -> None:
        self.sent: dict[int, list[Any]] = {}  # id(params) -> [params, children sent]; holding params keeps the id unique
        self.limit = limit

    def index(self, params: Any) -> int:
        n = int(getattr(params, "n", 1) or 1)
        if n <= 1:
            return 0
        entry = self.sent.get(id(params))
        if entry is None or entry[0] is not params:
            if len(self.sent) >= self.limit:  # requests whose children failed to send: drop the oldest
                self.sent.pop(next(iter(self.sent)))
            entry = self.sent[id(params)] = [params, 0]
        i = entry[1]
        entry[1] += 1
        if entry[1] >= n:
            del self.sent[id(params)]
        return i


_COUNTER = SglangChildCounter()


def sglang_child(tokenized: Any, counter: SglangChildCounter = _COUNTER) -> None:
    params = getattr(tokenized, "sampling_params", None)
    custom = getattr(params, "custom_params", None)
    ladder = _ladder(custom)
    roster = isinstance(custom, Mapping) and "tts_roe_roster_size" in custom and "tts_roe_roster" not in custom
    if (ladder is None and not roster) or getattr(params, "max_new_tokens", None) == 0:  # the prefix warm-up samples nothing
        return
    index = counter.index(params)
    if roster:  # the request's samples form a RoE roster (this is the tokenizer manager's one per-sample hook)
        from tts_plugins.adapters import roster as roster_module

        roster_module.sglang_child(tokenized, index)
    if ladder is None:
        return
    t = ladder.temperature(index)
    child = copy.copy(tokenized.sampling_params)
    if t < GREEDY_EPS:  # what SamplingParams does for temperature 0
        child.temperature, child.top_k = 1.0, 1
    else:
        child.temperature = t
    tokenized.sampling_params = child


def _apply_quietly(objs: Any) -> None:
    try:
        for obj in objs:
            sglang_child(obj)
    except Exception:
        log.exception("tts_plugins: could not apply the temperature ladder; the sample keeps the request's temperature")


def _sglang_send_one(orig: Any, manager: Any, tokenized: Any, *args: Any, **kwargs: Any) -> Any:
    _apply_quietly((tokenized,))
    return orig(manager, tokenized, *args, **kwargs)


def _sglang_send_batch(orig: Any, manager: Any, tokenized: Any, *args: Any, **kwargs: Any) -> Any:
    _apply_quietly(tokenized)
    return orig(manager, tokenized, *args, **kwargs)
