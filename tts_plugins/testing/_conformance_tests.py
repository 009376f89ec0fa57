"""The conformance tests that ``pytest -p tts_plugins.testing --tts-plugin NAME`` collects."""

from __future__ import annotations

import pytest

from tts_plugins.testing.conformance import CHECKS, INVARIANTS, tiny_info


@pytest.mark.parametrize("invariant", INVARIANTS)
def test_invariant(tts_technique, invariant, tts_examples):
    CHECKS[invariant](tts_technique, tiny_info(), tts_examples)


def test_engine_matches_reference(tts_technique, tts_engine):
    from tts_plugins.testing.conformance import check_engine_matches_reference

    check_engine_matches_reference(tts_technique, tts_engine.generate, tts_engine.model_dir, tts_engine.prompts(), engine=tts_engine.engine)
