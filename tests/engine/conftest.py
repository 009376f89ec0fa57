"""Engine fixtures: one real engine alive at a time, switched by model variant."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Server, VllmOffline  # noqa: E402

pytestmark = pytest.mark.engine


class EnginePool:
    """Starts the offline engine a test asks for, closing the one before (never two at once)."""

    def __init__(self, engine: str, tiny_model) -> None:
        self.engine, self.tiny_model = engine, tiny_model
        self.current = None
        self.key = None
        self.start_seconds: dict[str, float] = {}

    def offline(self, variant: str):
        if self.key != ("offline", variant):
            self.close()
            model = self.tiny_model(variant)
            if self.engine == "vllm":
                kwargs = {"reasoning_parser": "qwen3"} if variant == "dense" else {}
                self.current = VllmOffline(model, **kwargs)
            else:
                from sglang_harness import SglangOffline

                self.current = SglangOffline(model)
            self.key = ("offline", variant)
            self.start_seconds[f"offline-{variant}"] = self.current.start_seconds
        return self.current

    def server(self, variant: str, args=(), env=None):
        key = ("server", variant, tuple(args), tuple(sorted((env or {}).items())))
        if self.key != key:
            self.close()
            self.current = Server(self.engine, self.tiny_model(variant), args=args, env=env)
            self.key = key
            self.start_seconds[f"server-{variant}"] = self.current.start_seconds
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current, self.key = None, None
            time.sleep(1)


@pytest.fixture(scope="session")
def engines(engine_name):
    from models import tiny_model

    pool = EnginePool(engine_name, tiny_model)
    yield pool
    pool.close()
    print(f"\n[{engine_name}] engine start seconds: " + ", ".join(f"{k}={v:.1f}" for k, v in pool.start_seconds.items()))
