"""Shared fixtures: hypothesis profiles and the tiny local models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from models import tiny_model

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("full", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Modules that import an engine are collected only in that engine's environment (./dev test runs both).
collect_ignore = [] if importlib.util.find_spec("vllm") else ["test_vllm_interfaces.py", "test_mrv2.py", "engine/test_mrv2_parity_engine.py"]


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


def pytest_addoption(parser):
    parser.addoption(
        "--engine",
        default=os.environ.get("TTS_ENGINE"),
        choices=["vllm", "sglang"],
        help="the engine the engine suite runs against (default: $TTS_ENGINE, else whichever is installed)",
    )


def _installed_engine() -> str:
    import importlib.util

    for name in ("vllm", "sglang"):
        if importlib.util.find_spec(name) is not None:
            return name
    raise pytest.UsageError("the engine suite needs vllm or sglang installed (see README: ./dev setup)")


@pytest.fixture(scope="session")
def engine_name(request) -> str:
    return request.config.getoption("--engine") or _installed_engine()
