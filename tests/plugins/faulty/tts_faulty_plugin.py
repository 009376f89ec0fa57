"""A deliberately faulty third-party technique, installed through the ``tts_plugins`` entry-point group.

Tests put this directory on an engine's ``PYTHONPATH``; the ``.dist-info``
beside it declares the entry point, so the engine discovers the plugin the way
it discovers any installed package. A request opts in with
``tts_faulty: "apply" | "tokens" | "admit"`` and the technique raises there.
"""

from __future__ import annotations

import torch

from tts_plugins import hookimpl
from tts_plugins.technique import LogitsTechnique

WHERE = ("apply", "tokens", "admit")


class Faulty(LogitsTechnique):
    name = "faulty"
    keys = frozenset({"tts_faulty"})

    @classmethod
    def parse_params(cls, flat):
        where = flat.get("tts_faulty")
        if where is None:
            return None
        if where not in WHERE:
            raise ValueError(f"tts_faulty must be one of {', '.join(WHERE)}, got {where!r}")
        return where

    def __init__(self, info):
        super().__init__(info)
        self.where: dict[int, str] = {}

    def set_slot(self, slot, params, request):
        if params == "admit":
            raise RuntimeError("tts_faulty: deliberate failure at admission")
        if params is None:
            self.where.pop(slot, None)
        else:
            self.where[slot] = params

    def on_tokens(self, slot, token_ids):
        if self.where.get(slot) == "tokens":
            raise RuntimeError("tts_faulty: deliberate failure on tokens")

    @property
    def num_active(self):
        return len(self.where)

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots=None) -> torch.Tensor:
        if "apply" in self.where.values():
            raise RuntimeError("tts_faulty: deliberate failure in apply")
        return logits


@hookimpl
def tts_register_techniques(register):
    register(Faulty)
