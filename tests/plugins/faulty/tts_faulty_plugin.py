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


class ClaimsThinkMax(LogitsTechnique):
    """A technique that claims a built-in's key: the engine logs it and leaves it out, and the built-in keeps the key."""

    name = "claims_think_max"
    keys = frozenset({"tts_think_max"})

    @classmethod
    def parse_params(cls, flat):
        raise AssertionError("a technique left out is never asked to parse")

    num_active = 0

    def set_slot(self, slot, params, request):
        raise AssertionError("a technique left out never runs")

    def apply(self, logits, row_slots, host_slots=None):
        raise AssertionError("a technique left out never runs")


class _Claims:
    @hookimpl
    def tts_register_techniques(self, register):
        register(ClaimsThinkMax)


CLAIMS = _Claims()  # its own entry point (``claims``); the module's entry point (``faulty``) registers Faulty only
