"""The conformance suite's engine check: each technique's parameter sets, greedy, in a mixed batch of the
real engine, equal one engine-neutral reference loop (so vLLM and SGLang give the same ids)."""

from __future__ import annotations

import pytest

from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.testing.conformance import check_engine_matches_reference

pytestmark = pytest.mark.engine


# Every built-in whose rows are independent (a group's or a roster's rows depend on each other, and their engine
# tests check them against their own references), and the example third-party plugin.
PER_ROW = sorted(t.name for t in build_registry(plugin_manager(load_entry_points=False)).techniques if not t.cross_request_state)


@pytest.mark.parametrize("name", [*PER_ROW, "ngram_ban"])
def test_engine_matches_the_reference_loop(engines, engine_name, overlap, name):
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    techs = {t.name: t for t in build_registry().techniques}
    assert name in techs, f"{name} is not installed (examples/ngram_ban: pip install examples/ngram_ban)"
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in ("What is 2 + 3?", "What is 17 * 4 - 9?", "Is 91 prime?")]

    def generate(ps, params, max_new):
        return [o.token_ids for o in eng.generate(ps, params, max_tokens=max_new)]

    check_engine_matches_reference(techs[name], generate, model, prompts, engine=engine_name)
