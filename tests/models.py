"""Where the tests keep the tiny models they build (rebuilt when the recipe changes)."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(os.environ.get("TTS_TINY_MODELS", Path(__file__).resolve().parent.parent / ".cache" / "tiny"))


def tiny_model(variant: str) -> Path:
    from tts_plugins.tiny import build_tiny_model

    return build_tiny_model(MODELS_DIR / variant, variant)
