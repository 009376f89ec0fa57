"""Temperature ladder: sample ``i`` of a request with ``n`` samples runs at ``tts_temperature_ladder[i % len]``.

Paper: "On the Role of Temperature Sampling in Test-Time Scaling" (arXiv
2510.02611): spreading the samples of a question over a ladder of
temperatures beats the same number of samples at one temperature.

Where the sample index comes from: neither engine tells its sampler which of
a request's ``n`` samples a row is (vLLM only derives the children's seeds,
``seed + i``, and only when a seed is given; SGLang gives the children random
ids). Both engines fan a request with ``n`` samples out into ``n`` child
requests in their front end, in index order, and that is where the index is
known. So the ladder is applied there, through the core's per-sample hook
(:mod:`tts_plugins.services`): each child gets its rung as its own
temperature (:meth:`LadderPatchBase.sample_edit`), and the engine's sampler
does the rest exactly as for a request sent with that temperature (a rung of
0 is the engine's greedy path). This differs from the technique card's
suggestion of a logits processor; it is exact (no second temperature stacked
on the request's) and costs nothing per decode step. Choice ``i`` of the
response is sample ``i``, in both engines.

The request's own temperature must be > 0 (and ``top_k`` not 1): vLLM refuses
``n > 1`` with temperature 0, and SGLang turns temperature 0 into ``top_k = 1``,
which would silently keep every rung greedy, so admission refuses greedy
requests that carry a ladder. Other sampling settings (``top_p``, ``top_k``,
``min_p``, seeds) apply to every sample as sent.

This module is the whole technique: its parameters and the patch both engines
register (``tts_plugins.adapters.ladder`` only names the engines' versions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tts_plugins.params import Key, get_number_list
from tts_plugins.services import SampleEdit
from tts_plugins.technique import GREEDY_TEMPERATURE, ModelPatch

LADDER_MAX_RUNGS = 256
LADDER_MAX_TEMPERATURE = 2.0  # vLLM's own limit (its engine core refuses more); the same bound for every engine

LADDER_KEY_SPECS = (
    Key("tts_temperature_ladder", f"list of 1 to {LADDER_MAX_RUNGS} numbers in [0, {LADDER_MAX_TEMPERATURE:g}]", None,
        "Sample i of a request with n samples runs at temperature ladder[i % len] (0: greedy), replacing the request's "
        "own temperature; the request itself must sample."),
)
LADDER_KEYS = frozenset(k.name for k in LADDER_KEY_SPECS)


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


class LadderPatchBase(ModelPatch):
    """The temperature ladder's patch: a per-sample edit, nothing to hook (the core's front-end hook calls it).

    Subclasses set ``engine``, ``label`` (for messages) and the versions whose front end the core hooks.
    """

    name = "temperature_ladder"
    keys = LADDER_KEYS
    key_specs = LADDER_KEY_SPECS
    params = LadderParams
    feature, hint = "the temperature ladder", " (send one request per temperature instead)"

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [{"tts_temperature_ladder": [0.0, 0.7, 1.2]}]

    @classmethod
    def neutral_params(cls) -> list[dict[str, Any]]:
        # every rung greedy: a greedy request's samples (the suite compares with greedy plain requests)
        return [{"tts_temperature_ladder": [0.0]}]

    @staticmethod
    def check_request(params: LadderParams, request: Any) -> None:
        """Refuse a greedy request: the ladder replaces its temperature, and a greedy request cannot carry that."""
        temperature = getattr(request, "temperature", None)
        top_k = getattr(request, "top_k", None)
        if (temperature is not None and temperature < GREEDY_TEMPERATURE) or top_k == 1:
            raise ValueError(
                f"tts_temperature_ladder={list(params.ladder)!r} sets each sample's temperature, so the request must sample: "
                f"send temperature > 0 and top_k != 1 (got temperature={temperature!r}, top_k={top_k!r}); a rung of 0 gives a greedy sample"
            )

    def install(self, patcher: Any) -> None:
        """Nothing to patch: the core's per-sample hook calls :meth:`sample_edit`."""

    def sample_edit(self, parsed: Mapping[str, Any], index: int, parent_id: str | None) -> SampleEdit | None:
        params = parsed.get(self.name)
        return None if params is None else SampleEdit(temperature=params.temperature(index))
