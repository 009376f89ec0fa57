"""Shared fixtures: hypothesis profiles and the tiny local models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("full", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

MODELS_DIR = Path(os.environ.get("TTS_TINY_MODELS", Path(__file__).resolve().parent.parent / ".cache" / "tiny"))


def tiny_model(variant: str) -> Path:
    from tts_plugins.tiny import build_tiny_model

    return build_tiny_model(MODELS_DIR / variant, variant)


@pytest.fixture(scope="session")
def dense_model() -> Path:
    return tiny_model("dense")


@pytest.fixture(scope="session")
def multi_model() -> Path:
    return tiny_model("multi")


@pytest.fixture(scope="session")
def eager_model() -> Path:
    return tiny_model("eager")


@pytest.fixture(scope="session")
def moe_model() -> Path:
    return tiny_model("moe")


@pytest.fixture(scope="session")
def dense_tokenizer(dense_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dense_model))


@pytest.fixture(scope="session")
def multi_tokenizer(multi_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(multi_model))
