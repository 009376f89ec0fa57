"""Speculative decoding: a request with tts_* keys is refused at admission in both engines, with a message naming
the keys, instead of running plain (the techniques need one sampled row per request and step)."""

from __future__ import annotations

import pytest

from tts_plugins.params import refuse_speculative


def test_the_message_names_the_keys_and_the_flag():
    with pytest.raises(ValueError) as err:
        refuse_speculative({"tts_think_max": 4, "tts_group": "g", "other": 1}, "--speculative-config")
    assert "tts_group, tts_think_max" in str(err.value) and "--speculative-config" in str(err.value)
    refuse_speculative({"other": 1}, "--speculative-config")  # not ours: nothing to refuse
    refuse_speculative(None, "--speculative-config")


def test_vllm_admission_refuses_under_speculative_decoding():
    """vLLM's own front-end validator (``SamplingParams.verify`` calls ``_validate_spec_decode`` with the server's
    speculative config) refuses tts_* keys as it refuses logit_bias there; without a speculative config, or without
    tts_* keys, it passes."""
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.patching import Patcher

    patcher = Patcher("vllm", owner="test-speculative")
    assert patcher.replace(vllm_plugin.CORE_TARGETS["spec_decode"], vllm_plugin._wrap_validate_spec_decode,
                           min_version=vllm_plugin.MIN_VERSION, max_version=vllm_plugin.MAX_VERSION)
    try:
        spec = object()  # any speculative config
        with pytest.raises(VLLMValidationError, match=r"tts_think_max: tts_\* parameters cannot be used .* \(--speculative-config\)"):
            SamplingParams(extra_args={"tts_think_max": 4})._validate_spec_decode(spec)
        SamplingParams(extra_args={"tts_think_max": 4})._validate_spec_decode(None)
        SamplingParams(extra_args={"someone_else": 1})._validate_spec_decode(spec)
        SamplingParams()._validate_spec_decode(spec)
    finally:
        patcher.undo()


@pytest.mark.sglang_only
def test_sglang_admission_refuses_under_speculative_decoding(monkeypatch):
    """SGLang's admission hook reads the server's published speculative algorithm."""
    pytest.importorskip("sglang")
    from sglang.srt.sampling.sampling_params import SamplingParams

    from tts_plugins.adapters import sglang as adapter

    monkeypatch.setattr(adapter, "_speculative", lambda: True)
    with pytest.raises(ValueError, match=r"tts_think_max: .*\(--speculative-algorithm\)"):
        adapter._verify_after(None, SamplingParams(custom_params={"tts_think_max": 4}))
    adapter._verify_after(None, SamplingParams(custom_params={"someone_else": 1}))
    monkeypatch.setattr(adapter, "_speculative", lambda: False)
    adapter._verify_after(None, SamplingParams(custom_params={"tts_think_max": 4}))
