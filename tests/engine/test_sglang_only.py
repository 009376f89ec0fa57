"""SGLang-specific checks: the test stand-ins stayed unused, the plugin whitelist is honoured."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.sglang_only]


def test_sgl_kernel_stand_in_was_imported_but_never_called(engines):
    from sglang_harness import CALLS

    engines.offline("dense")  # at least one engine ran in this session
    imports = CALLS.with_name(CALLS.name + ".imports")
    assert imports.exists() and imports.read_text().strip(), "the engine processes never imported the stand-in"
    assert not CALLS.exists() or not CALLS.read_text().strip(), f"sgl_kernel functions were called: {CALLS.read_text()}"


def test_sglang_plugins_whitelist_can_switch_the_plugin_off(engines):
    import requests

    srv = engines.server("dense", env={"SGLANG_PLUGINS": "some_other_plugin"})
    body = {"model": srv.model, "prompt": "What is 1 + 1?", "max_tokens": 4, "temperature": 0, "custom_params": {"tts_think_max": -5}}
    r = requests.post(srv.base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, "with the plugin not whitelisted, tts_* keys are SGLang's ordinary custom_params"
