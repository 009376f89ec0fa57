"""tts_register_techniques: a logits technique that adds a per-request bias to the end-of-sequence logits.

``tts_eos_bias: b`` (a float in [-100, 100]) adds ``b`` to every EOS logit of the request's rows: a negative bias keeps
the model writing, a positive one ends it sooner, and the client never needs the model's EOS ids (``logit_bias``
would). State: one float per slot, in a host mirror copied to the device only when it changed; ``apply`` touches
only the EOS columns, and only the rows whose slot opted in.
"""

from __future__ import annotations

import torch

from tts_plugins import hookimpl
from tts_plugins.params import Key, get_float
from tts_plugins.slots import HostMirror
from tts_plugins.technique import LogitsTechnique


class EosBias(LogitsTechnique):
    name = "eos_bias"
    key_specs = (Key("tts_eos_bias", "float in [-100, 100]", None,
                     "Added to the end-of-sequence logits: negative keeps the model writing, positive ends it sooner."),)
    keys = frozenset(k.name for k in key_specs)

    @classmethod
    def parse_params(cls, flat):
        bias = get_float(flat, "tts_eos_bias", None, minimum=-100.0, maximum=100.0)
        return None if bias is None else bias  # None: the request did not opt in

    @classmethod
    def conformance_params(cls):
        return [{"tts_eos_bias": -5.0}, {"tts_eos_bias": 3.0}]

    def __init__(self, info):
        super().__init__(info)
        slots = info.max_slots + 1  # the extra last slot is the neutral one, never switched on
        self._bias = HostMirror(slots, torch.float32, device=info.device, pin_memory=info.pin_memory)
        self._on = HostMirror(slots, torch.bool, fill=False, device=info.device, pin_memory=info.pin_memory)
        self._eos = torch.tensor(sorted(set(info.eos_token_ids)), dtype=torch.int64, device=info.device)
        self._active = 0

    def set_slot(self, slot, params, request):
        was_on = bool(self._on.np[slot])
        self._on.np[slot] = params is not None
        self._bias.np[slot] = 0.0 if params is None else params
        self._active += int(params is not None) - int(was_on)
        self._on.mark_dirty()
        self._bias.mark_dirty()

    @property
    def num_active(self):
        return self._active

    def apply(self, logits, row_slots, host_slots=None):
        if self._active == 0 or self._eos.numel() == 0:
            return logits
        on = self._on.device_view()[row_slots].unsqueeze(1)                 # [R, 1]
        bias = self._bias.device_view()[row_slots].unsqueeze(1)             # [R, 1]
        eos = logits.index_select(1, self._eos)                             # [R, E]: a few columns, never [R, V]
        biased = (eos.float() + bias).to(logits.dtype)
        logits.index_copy_(1, self._eos, torch.where(on, biased, eos))      # rows not opted in get their own values back
        return logits

    def reference_row(self, logits_row, slot):
        row = logits_row.clone()
        if self._on.np[slot]:
            for t in self._eos.tolist():
                row[t] = (row[t].float() + float(self._bias.np[slot])).to(row.dtype)
        return row


@hookimpl
def tts_register_techniques(register):
    register(EosBias)
