"""Where the tests keep the tiny models they build (rebuilt when the recipe changes).

``dense``, ``multi``, ``moe``, ``eager``, ``wobbly``: random weights, built in a second (:mod:`tts_plugins.models.tiny`).
``reasoning``, ``reasoning-moe``: trained on multi-step arithmetic, a few minutes each on first use
(:mod:`tts_plugins.models.trained`).
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(os.environ.get("TTS_TINY_MODELS", Path(__file__).resolve().parent.parent / ".cache" / "tiny"))
TRAINED = {"reasoning": "dense", "reasoning-moe": "moe"}


def tiny_model(variant: str) -> Path:
    if variant in TRAINED:
        from tts_plugins.models.trained import build_reasoning_model

        return build_reasoning_model(MODELS_DIR / variant, TRAINED[variant])
    from tts_plugins.models.tiny import build_tiny_model

    return build_tiny_model(MODELS_DIR / variant, variant)
