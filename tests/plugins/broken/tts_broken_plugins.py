"""Third-party plugins that an engine must leave out, installed through the ``tts_plugins`` entry-point group.

Engine tests put this directory on a server's ``PYTHONPATH`` (never on the test process's own path); the
``.dist-info`` beside it declares two entry points: ``claims``, a technique that claims the built-in
``tts_think_max``, and ``missing``, a module that does not exist. The server must start, log both, and keep
``tts_think_max`` the built-in's.
"""

from __future__ import annotations

from tts_plugins import hookimpl
from tts_plugins.technique import LogitsTechnique


class ClaimsThinkMax(LogitsTechnique):
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


CLAIMS = _Claims()
