"""Per-request parameters: flat ``tts_*`` keys in, frozen dataclasses out.

vLLM's ``vllm_xargs`` carries only a flat dict of str/int/float (or lists), and
SGLang's ``custom_params`` must survive msgpack, so every technique reads its
options from one flat key space. Parsing runs once, at admission, in the
engine's API process; it imports no torch. Every error is a ``ValueError``
naming the key, the value received and what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREFIX = "tts_"
MAX_INT = 2**31 - 1
MAX_TEXT = 1024


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def get_int(flat: Mapping[str, Any], key: str, default: int | None = None, *, minimum: int = 0, maximum: int = MAX_INT) -> int | None:
    """An int in [minimum, maximum]; bools and non-integral floats are refused."""
    if key not in flat:
        return default
    value = flat[key]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an int >= {minimum}, got {_show(flat[key])}")
    if value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{key} must be an int <= {maximum}, got {value}")
    return value


def get_float(flat: Mapping[str, Any], key: str, default: float | None = None, *, minimum: float, maximum: float, open_min: bool = False) -> float | None:
    """A finite float in [minimum, maximum] (``(minimum, maximum]`` with ``open_min``); bools are refused."""
    if key not in flat:
        return default
    value = flat[key]
    low = "> " if open_min else ">= "
    want = f"a finite number {low}{minimum:g} and <= {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be {want}, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (open_min and value == minimum) or value > maximum:
        raise ValueError(f"{key} must be {want}, got {_show(flat[key])}")
    return value


def get_number_list(flat: Mapping[str, Any], key: str, noun: str, *, max_items: int, maximum: float, note: str = "") -> tuple[float, ...]:
    """A list of 1 to ``max_items`` finite numbers in [0, maximum] (``key`` must be present)."""
    value = flat[key]
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items:
        raise ValueError(f"{key} must be a list of 1 to {max_items} {noun}{note}, got {_show(value)}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= maximum:
            raise ValueError(f"{key} must hold {noun} in [0, {maximum:g}], got {_show(t)} in {_show(value)}")
    return tuple(float(t) for t in value)


def get_bool(flat: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A bool; 0/1 and "true"/"false" are accepted because some transports stringify."""
    if key not in flat:
        return default
    value = flat[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{key} must be a bool (true/false), got {_show(value)}")


def get_text(flat: Mapping[str, Any], key: str, default: str, *, allow_empty: bool = True) -> str:
    """A string of at most MAX_TEXT characters."""
    if key not in flat:
        return default
    value = flat[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {_show(value)}")
    if not allow_empty and not value:
        raise ValueError(f"{key} must be a non-empty string, got ''")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{key} must be a string of at most {MAX_TEXT} characters, got {len(value)} characters")
    if "\x00" in value:
        raise ValueError(f"{key} must not contain NUL characters, got {_show(value)}")
    return value


def tts_keys(flat: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``tts_*`` subset of a request's extra arguments (others belong to someone else)."""
    if not flat:
        return {}
    if not isinstance(flat, Mapping):
        raise ValueError(f"request extra arguments must be a JSON object, got {_show(flat)}")
    return {k: v for k, v in flat.items() if isinstance(k, str) and k.startswith(PREFIX)}


# --- think-token steering -------------------------------------------------

THINK_KEYS = frozenset(
    {
        "tts_think_max",
        "tts_think_min",
        "tts_think_extend",
        "tts_think_wait",
        "tts_think_conclusion",
        "tts_no_think",
        "tts_no_think_text",
    }
)

DEFAULT_WAIT = "Wait"
DEFAULT_CONCLUSION = "\n"
DEFAULT_NO_THINK_TEXT = "Okay, I think I have finished thinking."


@dataclass(frozen=True)
class ThinkParams:
    """Think-token steering options of one request.

    ``max_tokens`` caps model tokens inside a thinking block (None: no cap);
    ``min_tokens`` and ``extend`` keep it open (s1 budget forcing);
    ``no_think`` skips thinking (NoThinking).
    """

    max_tokens: int | None = None
    min_tokens: int = 0
    extend: int = 0
    wait: str = DEFAULT_WAIT
    conclusion: str = DEFAULT_CONCLUSION
    no_think: bool = False
    no_think_text: str = DEFAULT_NO_THINK_TEXT

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> ThinkParams | None:
        """Parse the think keys of ``flat``; ``None`` when the request does not opt in."""
        if not any(k in flat for k in ("tts_think_max", "tts_think_min", "tts_think_extend", "tts_no_think")):
            for key in ("tts_think_wait", "tts_think_conclusion", "tts_no_think_text"):
                if key in flat:
                    raise ValueError(
                        f"{key} only takes effect with tts_think_max, tts_think_min, tts_think_extend "
                        f"or tts_no_think, got {key}={_show(flat[key])} alone"
                    )
            return None
        params = cls(
            max_tokens=get_int(flat, "tts_think_max"),
            min_tokens=get_int(flat, "tts_think_min", 0),
            extend=get_int(flat, "tts_think_extend", 0, maximum=10_000),
            wait=get_text(flat, "tts_think_wait", DEFAULT_WAIT, allow_empty=False),
            conclusion=get_text(flat, "tts_think_conclusion", DEFAULT_CONCLUSION),
            no_think=get_bool(flat, "tts_no_think"),
            no_think_text=get_text(flat, "tts_no_think_text", DEFAULT_NO_THINK_TEXT),
        )
        end = os.environ.get("TTS_PLUGINS_THINK_END") or "</think>"
        if end in params.wait:
            raise ValueError(f"tts_think_wait must not contain the end-of-thinking string {end!r}, got {params.wait!r}")
        if params.max_tokens is not None and params.min_tokens > params.max_tokens:
            raise ValueError(
                f"tts_think_min must be <= tts_think_max, got tts_think_min={params.min_tokens} "
                f"and tts_think_max={params.max_tokens}"
            )
        if params.no_think and (params.min_tokens or params.extend):
            raise ValueError(
                "tts_no_think cannot be combined with tts_think_min or tts_think_extend, got "
                f"tts_think_min={params.min_tokens}, tts_think_extend={params.extend}"
            )
        if not params.no_think and "tts_no_think_text" in flat:
            raise ValueError(f"tts_no_think_text only takes effect with tts_no_think=true, got {_show(flat['tts_no_think_text'])}")
        if params.max_tokens is None and params.min_tokens == 0 and params.extend == 0 and not params.no_think:
            return None  # e.g. tts_no_think=false alone: valid, and opts out
        return params


def get_choice(flat: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    if key not in flat:
        return default
    value = flat[key]
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
    return value


def get_text_list(flat: Mapping[str, Any], key: str, default: tuple[str, ...], *, max_items: int = 16) -> tuple[str, ...]:
    if key not in flat:
        return default
    value = flat[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or len(value) > max_items:
        raise ValueError(f"{key} must be a list of 1 to {max_items} non-empty strings, got {_show(value)}")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > 64:
            raise ValueError(f"{key} must be a list of non-empty strings of at most 64 characters, got item {_show(item)}")
    return tuple(value)


# --- group early stop -------------------------------------------------------

GROUP_KEYS = frozenset({"tts_group", "tts_group_stop_after", "tts_group_finish", "tts_group_stop_text"})


@dataclass(frozen=True)
class GroupParams:
    """Group early stop (First Finish Search, short-m@k) options of one request."""

    group: str
    stop_after: int = 1
    finish: str = "think"  # what counts as a member finishing: "think" (end of thinking) or "eos"
    stop_text: str = ""

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> GroupParams | None:
        if "tts_group" not in flat:
            for key in sorted(GROUP_KEYS - {"tts_group"}):
                if key in flat:
                    raise ValueError(f"{key} needs tts_group (the group's id), got {key}={_show(flat[key])} alone")
            return None
        group = flat["tts_group"]
        if not isinstance(group, str) or not group or len(group) > 128 or "\x00" in group:
            raise ValueError(f"tts_group must be a non-empty string of at most 128 characters without NUL, got {_show(group)}")
        return cls(
            group=group,
            stop_after=get_int(flat, "tts_group_stop_after", 1, minimum=1, maximum=100_000),
            finish=get_choice(flat, "tts_group_finish", "think", ("think", "eos")),
            stop_text=get_text(flat, "tts_group_stop_text", ""),
        )


# --- thought trimming ---------------------------------------------------------

TRIM_KEYS = frozenset(
    {
        "tts_trim",
        "tts_trim_converge",
        "tts_trim_max_thoughts",
        "tts_trim_min_tokens",
        "tts_trim_ngram",
        "tts_trim_repeats",
        "tts_trim_markers",
        "tts_trim_conclusion",
        "tts_trim_verifier",
    }
)

DEFAULT_MARKERS = ("Wait", "Alternatively", "But", "\n\n")
DEFAULT_TRIM_CONCLUSION = "\n\nI have checked this enough; time to answer.\n"


@dataclass(frozen=True)
class TrimParams:
    """TrimR-style thought trimming of one request (0 switches a trigger off).

    ``converge``: overthinking, the same extracted answer in this many
    consecutive thoughts. ``max_thoughts`` / ``min_tokens``: underthinking,
    more thoughts than this past this many thinking tokens without
    convergence. ``ngram`` / ``repeats``: a repetition loop, one n-gram of
    tokens seen this many times. ``verifier``: a registered verifier decides
    convergence instead of the built-in rule.
    """

    converge: int = 3
    max_thoughts: int = 12
    min_tokens: int = 1024
    ngram: int = 12
    repeats: int = 3
    markers: tuple[str, ...] = DEFAULT_MARKERS
    conclusion: str = DEFAULT_TRIM_CONCLUSION
    verifier: str | None = None

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> TrimParams | None:
        present = sorted(k for k in TRIM_KEYS if k in flat)
        if not present:
            return None
        if "tts_trim" in flat and not get_bool(flat, "tts_trim") :
            others = sorted(set(present) - {"tts_trim"})
            if others:
                raise ValueError(f"tts_trim is false but {others[0]} is set, got {others[0]}={_show(flat[others[0]])}")
            return None
        verifier = flat.get("tts_trim_verifier")
        if verifier is not None and (not isinstance(verifier, str) or not verifier or len(verifier) > 64):
            raise ValueError(f"tts_trim_verifier must be the name of a registered verifier, got {_show(verifier)}")
        params = cls(
            converge=get_int(flat, "tts_trim_converge", 3, maximum=1000),
            max_thoughts=get_int(flat, "tts_trim_max_thoughts", 12, maximum=100_000),
            min_tokens=get_int(flat, "tts_trim_min_tokens", 1024),
            ngram=get_int(flat, "tts_trim_ngram", 12, maximum=1024),
            repeats=get_int(flat, "tts_trim_repeats", 3, minimum=2, maximum=1000),
            markers=get_text_list(flat, "tts_trim_markers", DEFAULT_MARKERS),
            conclusion=get_text(flat, "tts_trim_conclusion", DEFAULT_TRIM_CONCLUSION),
            verifier=verifier,
        )
        if params.converge == 1:
            raise ValueError("tts_trim_converge must be 0 (off) or an int >= 2, got 1")
        if params.ngram == 1:
            raise ValueError("tts_trim_ngram must be 0 (off) or an int >= 2, got 1")
        return params


# --- Mixture of Inputs ----------------------------------------------------------

MOI_KEYS = frozenset({"tts_moi_beta", "tts_moi_topk"})
MOI_MAX_TOPK = 256


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
                raise ValueError(f"tts_moi_topk needs tts_moi_beta (which switches Mixture of Inputs on), got tts_moi_topk={_show(flat['tts_moi_topk'])} alone")
            return None
        return cls(
            beta=get_float(flat, "tts_moi_beta", minimum=0.0, maximum=1e6, open_min=True),
            topk=get_int(flat, "tts_moi_topk", 20, minimum=1, maximum=MOI_MAX_TOPK),
        )


# --- CarBoN calibration ---------------------------------------------------------

CARBON_KEYS = frozenset({"tts_carbon_temperature", "tts_carbon_bias_ids", "tts_carbon_bias_values"})
CARBON_MAX_BIAS = 256
MAX_TOKEN_ID = 2**24  # ids are checked against the real vocabulary in the engine (see CarbonCalibration)


@dataclass(frozen=True)
class CarbonParams:
    """CarBoN's calibrated sampling for one request: logits ``(z + b) / T``.

    ``temperature`` is T (> 0; 1 = none), ``bias`` the sparse vocabulary shift
    ``b`` as ``(token id, value)`` pairs (at most ``CARBON_MAX_BIAS``).
    """

    temperature: float = 1.0
    bias: tuple[tuple[int, float], ...] = ()

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> CarbonParams | None:
        if not any(k in flat for k in CARBON_KEYS):
            return None
        t = get_float(flat, "tts_carbon_temperature", 1.0, minimum=1e-3, maximum=1e3)
        ids, values = flat.get("tts_carbon_bias_ids", []), flat.get("tts_carbon_bias_values", [])
        if not isinstance(ids, (list, tuple)) or len(ids) > CARBON_MAX_BIAS:
            raise ValueError(f"tts_carbon_bias_ids must be a list of at most {CARBON_MAX_BIAS} token ids, got {_show(ids)}")
        if not isinstance(values, (list, tuple)) or len(values) != len(ids):
            raise ValueError(f"tts_carbon_bias_values must be a list as long as tts_carbon_bias_ids ({len(ids)}), got {_show(values)}")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_TOKEN_ID:
                raise ValueError(f"tts_carbon_bias_ids must hold token ids (ints >= 0), got {_show(i)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"tts_carbon_bias_ids must not repeat an id, got {_show(ids)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e4:
                raise ValueError(f"tts_carbon_bias_values must hold finite numbers in [-1e4, 1e4], got {_show(v)}")
        return cls(temperature=t, bias=tuple(zip((int(i) for i in ids), (float(v) for v in values))))


LADDER_KEYS = frozenset({"tts_temperature_ladder"})
LADDER_MAX_RUNGS = 256
LADDER_MAX_TEMPERATURE = 2.0  # vLLM's own limit (its engine core refuses more); the same bound for every engine


@dataclass(frozen=True)
class LadderParams:
    """A temperature ladder for the ``n`` samples of one request: sample ``i`` runs at ``ladder[i % len(ladder)]``.

    Rungs are temperatures in [0, 2] (vLLM's range; it raises rungs in (0, 0.01)
    to 0.01); 0 is greedy. The rung replaces the request's own temperature for
    that sample.
    """

    ladder: tuple[float, ...]

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> LadderParams | None:
        if "tts_temperature_ladder" not in flat:
            return None
        return cls(get_number_list(flat, "tts_temperature_ladder", "temperatures", max_items=LADDER_MAX_RUNGS, maximum=LADDER_MAX_TEMPERATURE))

    def temperature(self, index: int) -> float:
        return self.ladder[index % len(self.ladder)]


ROE_KEYS = frozenset({"tts_roe_tau", "tts_roe_tau_layers"})
ROE_MAX_TAU = 100.0
ROE_MAX_LAYERS = 1024


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
                                 f"got tts_roe_tau={_show(flat['tts_roe_tau'])} and tts_roe_tau_layers={_show(flat['tts_roe_tau_layers'])}")
            layers = get_number_list(flat, "tts_roe_tau_layers", "taus", max_items=ROE_MAX_LAYERS, maximum=ROE_MAX_TAU, note=" (one per MoE layer)")
            return cls(max(layers), layers) if any(layers) else None
        if "tts_roe_tau" not in flat:
            return None
        tau = get_float(flat, "tts_roe_tau", minimum=0.0, maximum=ROE_MAX_TAU)
        return cls(tau) if tau else None

    def taus(self, num_layers: int) -> list[float] | None:
        """One tau per MoE layer of a model with ``num_layers`` of them; None when the list does not fit."""
        if self.layers is None:
            return [self.tau] * num_layers
        return list(self.layers) if len(self.layers) == num_layers else None

    def salt(self) -> str:
        return f"tau={self.tau!r}" if self.layers is None else "taus=" + ",".join(repr(t) for t in self.layers)


ROSTER_KEYS = frozenset({"tts_roe_roster", "tts_roe_roster_size"})
ROSTER_MAX_SIZE = 64
ROSTER_MAX_NAME = 200
ROSTER_CHILD_PREFIX = "n:"  # names the engines' front ends give the samples of one request (n = K)


@dataclass(frozen=True)
class RosterParams:
    """A RoE roster: ``size`` requests (or the ``n = size`` samples of one request) decode one sequence together.

    ``tts_roe_roster``: the roster's name (any string the members share; omit it with ``n = size`` and the
    request's samples form the roster). ``tts_roe_roster_size``: K in [2, 64], required.
    """

    name: str | None
    size: int

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> RosterParams | None:
        if "tts_roe_roster" not in flat and "tts_roe_roster_size" not in flat:
            return None
        if "tts_roe_roster_size" not in flat:
            raise ValueError(f"tts_roe_roster={_show(flat['tts_roe_roster'])} needs tts_roe_roster_size (the number of members, 2 to {ROSTER_MAX_SIZE})")
        size = get_int(flat, "tts_roe_roster_size", minimum=2, maximum=ROSTER_MAX_SIZE)
        name = None
        if "tts_roe_roster" in flat:
            name = get_text(flat, "tts_roe_roster", "", allow_empty=False)
            if len(name) > ROSTER_MAX_NAME:
                raise ValueError(f"tts_roe_roster must be at most {ROSTER_MAX_NAME} characters, got {len(name)} characters")
        return cls(name, int(size))

    def check_request(self, request: Any) -> None:
        """Admission checks against the engine's sampling parameters (vLLM's or SGLang's)."""
        n = int(getattr(request, "n", 1) or 1)
        if self.name is None and n != self.size:
            raise ValueError(f"tts_roe_roster_size={self.size} without tts_roe_roster makes the request's own samples the roster, "
                             f"so n must be {self.size}, got n={n}")
        temperature = getattr(request, "temperature", None)
        if temperature is not None and temperature >= 1e-5 and getattr(request, "top_k", None) != 1:
            top_p = getattr(request, "top_p", 1.0)
            min_p = getattr(request, "min_p", 0.0)
            top_k = getattr(request, "top_k", 0)
            if (top_p is not None and top_p < 1.0) or (min_p is not None and min_p > 0.0) or (top_k is not None and 1 < top_k < (1 << 30)):
                raise ValueError(f"tts_roe_roster_size={self.size}: a roster samples from the mean of its members' distributions at the "
                                 f"request temperature; top_p, top_k and min_p are not applied to that draw, so send them unset "
                                 f"(got top_p={top_p!r}, top_k={top_k!r}, min_p={min_p!r})")
