"""CarBoN calibration: sample from ``(z + b) / T`` for the requests that carry a calibration.

Paper: "CarBoN: Calibrated Best-of-N Sampling Improves Test-time Reasoning"
(arXiv 2510.15674). Its exploit phase samples with an input-specific
temperature T and a shift of the final hidden state, ``z' = (z + W delta) / T``.
Our choice (see ``../shared`` technique card 4): the equivalent vocabulary-space
shift ``b = W delta`` restricted to the tokens seen in the kept samples, sent
per request as two flat lists (``vllm_xargs`` takes no nested objects). The
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

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tts_plugins.params import CARBON_KEYS, CARBON_MAX_BIAS, CarbonParams
from tts_plugins.technique import EngineInfo, LogitsTechnique


class CarbonCalibration(LogitsTechnique):
    name = "carbon"
    keys = CARBON_KEYS

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
        self._t_host = torch.ones(n, 1, dtype=torch.float32)
        self._ids_host = torch.zeros(n, CARBON_MAX_BIAS, dtype=torch.int64)
        self._vals_host = torch.zeros(n, CARBON_MAX_BIAS, dtype=torch.float32)
        on_cpu = info.device.type == "cpu"
        self._t = self._t_host if on_cpu else self._t_host.to(info.device)
        self._ids = self._ids_host if on_cpu else self._ids_host.to(info.device)
        self._vals = self._vals_host if on_cpu else self._vals_host.to(info.device)
        self._k = np.zeros(n, dtype=np.int64)  # bias entries per slot
        self._dirty = False
        self.active: set[int] = set()

    def set_slot(self, slot: int, params: CarbonParams | None, request: Any) -> None:
        if params is not None:
            bad = [i for i, _ in params.bias if i >= self.info.vocab_size]
            if bad:
                raise ValueError(f"tts_carbon_bias_ids holds {bad[0]}, outside the vocabulary (size {self.info.vocab_size})")
        self.active.discard(slot)
        self._t_host[slot] = 1.0
        self._ids_host[slot].zero_()
        self._vals_host[slot].zero_()
        self._k[slot] = 0
        if params is not None:
            self.active.add(slot)
            self._t_host[slot] = params.temperature
            for j, (i, v) in enumerate(params.bias):
                self._ids_host[slot, j], self._vals_host[slot, j] = i, v
            self._k[slot] = len(params.bias)
        self._dirty = True

    @property
    def num_active(self) -> int:
        return len(self.active)

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        if not self.active:
            return logits
        if self._dirty:
            if self._t is not self._t_host:
                self._t.copy_(self._t_host, non_blocking=True)
                self._ids.copy_(self._ids_host, non_blocking=True)
                self._vals.copy_(self._vals_host, non_blocking=True)
            self._dirty = False
        k = int(self._k.max()) if host_slots is None else int(self._k[host_slots].max())
        if k:
            logits.scatter_add_(1, self._ids[row_slots, :k], self._vals[row_slots, :k].to(logits.dtype))
        return logits.div_(self._t[row_slots].to(logits.dtype))

    def reference_row(self, z: torch.Tensor, slot: int) -> torch.Tensor:
        z = z.clone()
        for j in range(int(self._k[slot])):
            z[int(self._ids_host[slot, j])] += float(self._vals_host[slot, j])
        return z / float(self._t_host[slot, 0])
