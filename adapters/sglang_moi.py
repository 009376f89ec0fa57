"""Mixture of Inputs in SGLang (placeholder replaced below)."""
from __future__ import annotations

from typing import Any

from tts_plugins.params import MOI_KEYS, MoIParams


class SglangMoIPatch:
    name = "moi"
    engine = "sglang"
    keys = MOI_KEYS

    @staticmethod
    def parse_params(flat: Any) -> MoIParams | None:
        return MoIParams.parse(flat)

    @staticmethod
    def supported() -> str | None:
        return "not yet"

    def install(self, patcher: Any) -> None:
        return None
