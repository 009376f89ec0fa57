"""What a user installs: the wheel (built from the sdist by ./dev) holds every module of the three source folders
under their package names, no top-level ``adapters`` or ``logits_processors``, and its entry points load."""

from __future__ import annotations

import importlib
import json
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"tts_plugins": "tts_plugins", "adapters": "tts_plugins/adapters", "logits_processors": "tts_plugins/logits_processors"}


def installed() -> metadata.Distribution:
    dist = metadata.distribution("tts-plugins")
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install: the packaging check needs the built wheel (./dev test installs it)")
    return dist


def test_the_wheel_holds_every_module_under_its_package_name():
    files = {str(f) for f in installed().files or ()}
    want = set()
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                want.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    missing = sorted(want - files)
    assert not missing, f"the installed wheel lacks {missing}"
    assert not [f for f in files if f.split("/")[0] in ("adapters", "logits_processors")], "a top-level adapters/logits_processors was installed"


def test_every_entry_point_of_the_wheel_loads():
    eps = [ep for ep in installed().entry_points if ep.group in ("vllm.logits_processors", "vllm.general_plugins", "sglang.srt.plugins",
                                                                  "console_scripts")]
    assert {ep.group for ep in eps} == {"vllm.logits_processors", "vllm.general_plugins", "sglang.srt.plugins", "console_scripts"}
    for ep in eps:
        module, _, attr = ep.value.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), ep
