"""CarBoN calibration: sample from ``(z + b) / T`` for the requests that carry a calibration.

Paper: "CarBoN: Calibrated Best-of-N Sampling Improves Test-time Reasoning"
(arXiv 2510.15674). Its exploit phase samples with an input-specific
temperature T and a shift of the final hidden state, ``z' = (z + W delta) / T``.
Our choice (see ``../shared`` technique card 4): a shift in vocabulary space,
``b``, restricted to the tokens seen in the kept samples, sent per request as
two flat lists (``vllm_xargs`` takes no nested objects). This is not the
paper's parameterization: ``W delta`` can be any vector in the column space of
the unembedding, ours is any sparse vector over a few hundred tokens, so the
two fit different families; both act on the logits additively, and ours
needs no access to hidden states. The
client fits T and b (``tts_plugins.client.calibration``) and sends
``tts_carbon_temperature``, ``tts_carbon_bias_ids``, ``tts_carbon_bias_values``.

Where it sits: vLLM applies non-argmax-invariant processors before the
request's own temperature, so the effective scale is ``1 / (T * T_request)``;
SGLang's adapter runs the techniques before its penalties and temperature too.
Send the calibrated T here and the base temperature as the request's
temperature (the client does). Identity at T = 1 with no bias.

Hot path: one ``scatter_add_`` of a ``[rows, K]`` bias table and one division by
a ``[rows, 1]`` temperature column, whole batch; rows not opted in add 0.0 at
token 0 and divide by 1.0 (bit-identical). Token ids at or beyond the
engine's vocabulary are refused when the request starts (the technique is then
off for that request and the error is logged: admission cannot see the
vocabulary in vLLM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tts_plugins.params import Key, get_float, show
from tts_plugins.slots import HostMirror, Workspace
from tts_plugins.technique import EngineInfo, LogitsTechnique

# --- parameters (parsed at admission, torch-free) --------------------------------

CARBON_MAX_BIAS = 256
MAX_TOKEN_ID = 2**24  # ids are checked against the real vocabulary in the engine (see CarbonCalibration)

CARBON_KEY_SPECS = (
    Key("tts_carbon_temperature", "number in [0.001, 1000]", 1.0,
        "CarBoN's calibration temperature T: the request samples from (z + b) / T, before the engine's own "
        "temperature (the effective scale is 1 / (T * temperature))."),
    Key("tts_carbon_bias_ids", f"list of at most {CARBON_MAX_BIAS} distinct token ids (ints >= 0)", (),
        "The token ids of CarBoN's sparse logit shift b (ids outside the model's vocabulary switch it off for the "
        "request)."),
    Key("tts_carbon_bias_values", "list of numbers in [-10000, 10000], as long as tts_carbon_bias_ids", (),
        "The shift b added to each id of tts_carbon_bias_ids."),
)
CARBON_KEYS = frozenset(k.name for k in CARBON_KEY_SPECS)


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
            raise ValueError(f"tts_carbon_bias_ids must be a list of at most {CARBON_MAX_BIAS} token ids, got {show(ids)}")
        if not isinstance(values, (list, tuple)) or len(values) != len(ids):
            raise ValueError(f"tts_carbon_bias_values must be a list as long as tts_carbon_bias_ids ({len(ids)}), got {show(values)}")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_TOKEN_ID:
                raise ValueError(f"tts_carbon_bias_ids must hold token ids (ints >= 0), got {show(i)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"tts_carbon_bias_ids must not repeat an id, got {show(ids)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e4:
                raise ValueError(f"tts_carbon_bias_values must hold finite numbers in [-1e4, 1e4], got {show(v)}")
        return cls(temperature=t, bias=tuple(zip((int(i) for i in ids), (float(v) for v in values))))


# --- the technique ---------------------------------------------------------------


class CarbonCalibration(LogitsTechnique):
    name = "carbon"
    keys = CARBON_KEYS
    key_specs = CARBON_KEY_SPECS

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        return [
            {"tts_carbon_temperature": 0.7},
            {"tts_carbon_temperature": 1.5, "tts_carbon_bias_ids": [1, 5, 9], "tts_carbon_bias_values": [2.0, -1.0, 0.5]},
            {"tts_carbon_bias_ids": [3], "tts_carbon_bias_values": [40.0]},
        ]

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> CarbonParams | None:
        return CarbonParams.parse(flat)

    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        n = info.max_slots + 1
        mirror = {"device": info.device, "pin_memory": info.pin_memory}
        self._t = HostMirror((n, 1), torch.float32, fill=1.0, **mirror)  # T per slot (1: none)
        self._ids = HostMirror((n, CARBON_MAX_BIAS), torch.int64, **mirror)  # bias token ids, the first k[slot] valid
        self._vals = HostMirror((n, CARBON_MAX_BIAS), torch.float32, **mirror)  # bias values (0 past k[slot])
        self._k = np.zeros(n, dtype=np.int64)  # bias entries per slot
        self.active: set[int] = set()
        self.ws = Workspace(info.device, info.pin_memory)  # the tempered rows of a step (pinned staging, a reused buffer)

    def set_slot(self, slot: int, params: CarbonParams | None, request: Any) -> None:
        if params is not None:
            bad = [i for i, _ in params.bias if i >= self.info.vocab_size]
            if bad:
                raise ValueError(f"tts_carbon_bias_ids holds {bad[0]}, outside the vocabulary (size {self.info.vocab_size})")
        self.active.discard(slot)
        t, ids, vals = self._t.np, self._ids.np, self._vals.np
        t[slot] = 1.0
        ids[slot] = 0
        vals[slot] = 0.0
        self._k[slot] = 0
        if params is not None:
            self.active.add(slot)
            t[slot] = params.temperature
            for j, (i, v) in enumerate(params.bias):
                ids[slot, j], vals[slot, j] = i, v
            self._k[slot] = len(params.bias)
        for mirror in (self._t, self._ids, self._vals):
            mirror.mark_dirty()

    @property
    def num_active(self) -> int:
        return len(self.active)

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        if not self.active:
            return logits
        t, ids, vals = self._t.device_view(), self._ids.device_view(), self._vals.device_view()
        k = int(self._k.max()) if host_slots is None else int(self._k[host_slots].max())
        if k:
            add = vals[row_slots, :k].to(logits.dtype)
            if logits.is_contiguous():
                # a flat accumulating index_put_ touches only the n*k entries (scatter_add_ on a CPU bf16 tensor rewrites
                # the whole tensor: ~13x a copy); the padding (id 0, value 0) adds nothing
                cols = ids[row_slots, :k] + (torch.arange(logits.shape[0], device=logits.device) * logits.shape[1]).unsqueeze(1)
                logits.view(-1).index_put_((cols.reshape(-1),), add.reshape(-1), accumulate=True)
            else:
                logits.scatter_add_(1, ids[row_slots, :k], add)
        if host_slots is None:
            return logits.div_(t[row_slots].to(logits.dtype))
        tempered = np.flatnonzero(self._t.np[host_slots, 0] != 1.0)  # dividing by 1 changes nothing: skip those rows
        if tempered.size == logits.shape[0]:
            return logits.div_(t[row_slots].to(logits.dtype))
        if tempered.size:
            rows = self.ws.upload("tempered", tempered)
            part = torch.index_select(logits, 0, rows, out=self.ws.get("part", tempered.size, logits.shape[1], logits.dtype))
            logits.index_copy_(0, rows, part.div_(t[row_slots[rows]].to(logits.dtype)))
        return logits

    def reference_row(self, z: torch.Tensor, slot: int) -> torch.Tensor:
        z = z.clone()
        for j in range(int(self._k[slot])):
            z[int(self._ids.np[slot, j])] += float(self._vals.np[slot, j])
        return z / float(self._t.np[slot, 0])
