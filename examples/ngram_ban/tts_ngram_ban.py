"""No repeated n-grams, per request: a complete third-party tts-plugins technique.

A request sends ``tts_ngram_ban: n`` (2 to 16); from then on the engine never
samples a token that would complete an n-gram already present in the request's
prompt and output, as Hugging Face's ``no_repeat_ngram_size`` does for one
generation. Installed by the ``tts_plugins`` entry point in ``pyproject.toml``;
it uses only the public contract (``tts_plugins.hookimpl``,
``tts_plugins.technique``, ``tts_plugins.params`` validators and the
``tts_plugins.slots`` building blocks), so it runs unchanged in vLLM and SGLang.

A ban forbids tokens anywhere in the output, the answer included: under a
structured output the grammar could be left with no allowed token, and a tool
call could be broken. The key says so (``forces="answer"`` in ``key_specs``),
and the core refuses the key with a structured output or with tools; the plugin
has no code of its own for it.

Host side: per slot, a map from each (n-1)-gram to the tokens that followed it,
updated as tokens arrive. Device side: a ``[slots + 1, MAX_BANS]`` table of the
ids banned at the next step, a host mirror uploaded only when it changed;
``apply`` is one gather and one scatter for the whole batch (nothing of
vocabulary size is allocated per step).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from tts_plugins import hookimpl
from tts_plugins.params import Key, get_int
from tts_plugins.slots import HostMirror
from tts_plugins.technique import LogitsTechnique

MAX_BANS = 64  # next tokens banned after one (n-1)-gram; more is truncated (documented limit)


class NgramBan(LogitsTechnique):
    name = "ngram_ban"
    key_specs = (
        Key("tts_ngram_ban", "int in [2, 16]", None,
            "n: never sample a token that would complete an n-gram already in the prompt or the output "
            "(Hugging Face's no_repeat_ngram_size).", forces="answer"),
    )
    keys = frozenset(k.name for k in key_specs)

    @classmethod
    def parse_params(cls, flat):
        return get_int(flat, "tts_ngram_ban", None, minimum=2, maximum=16)

    @classmethod
    def conformance_params(cls):
        return [{"tts_ngram_ban": 2}, {"tts_ngram_ban": 3}]

    def __init__(self, info):
        super().__init__(info)
        n = info.max_slots + 1
        # banned ids per slot, padded by repeating the first one (duplicate writes agree); a slot with
        # nothing banned holds zeros with valid False, and "writes back" token 0's own value
        self._ids = HostMirror((n, MAX_BANS), torch.int64, device=info.device, pin_memory=info.pin_memory)
        self._valid = HostMirror((n, MAX_BANS), torch.bool, fill=False, device=info.device, pin_memory=info.pin_memory)
        self._np, self._valid_np = self._ids.np, self._valid.np
        self.rows: dict[int, tuple[int, list[int], dict[tuple[int, ...], set[int]]]] = {}

    def set_slot(self, slot, params, request):
        self.rows.pop(slot, None)
        if params is not None:
            self.rows[slot] = (params, [], defaultdict(set))
            self.on_tokens(slot, list(request.prompt_ids))
        self._publish(slot)

    def on_tokens(self, slot, token_ids):
        n, seq, seen = self.rows[slot]
        for t in token_ids:
            seq.append(int(t))
            if len(seq) >= n:
                seen[tuple(seq[-n:-1])].add(seq[-1])
        self._publish(slot)

    def _publish(self, slot):
        row = self.rows.get(slot)
        bans: list[int] = []
        if row is not None:
            n, seq, seen = row
            if len(seq) >= n - 1:
                bans = sorted(t for t in seen.get(tuple(seq[len(seq) - n + 1 :]), ()) if 0 <= t < self.info.vocab_size)[:MAX_BANS]
        new = np.full(MAX_BANS, bans[0] if bans else 0, np.int64)
        new[: len(bans)] = bans
        valid = np.full(MAX_BANS, bool(bans))
        if not np.array_equal(self._np[slot], new) or self._valid_np[slot, 0] != bool(bans):
            self._np[slot], self._valid_np[slot] = new, valid
            self._ids.mark_dirty()
            self._valid.mark_dirty()

    @property
    def num_active(self):
        return len(self.rows)

    def apply(self, logits, row_slots, host_slots=None):
        if not self.rows:
            return logits
        ids = self._ids.device_view()[row_slots]  # [R, MAX_BANS]: small, never [R, V]
        valid = self._valid.device_view()[row_slots]
        src = logits.gather(1, ids).masked_fill_(valid, float("-inf"))
        return logits.scatter_(1, ids, src)

    def reference_row(self, z, slot):
        z = z.clone()
        for t, ok in zip(self._np[slot], self._valid_np[slot]):
            if ok:
                z[int(t)] = float("-inf")
        return z


@hookimpl
def tts_register_techniques(register):
    register(NgramBan)
