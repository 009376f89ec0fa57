"""The conformance suite's engine half for model patches: every built-in patch of this engine that requests turn on
(Mixture of Inputs, RoE, the temperature ladder) leaves plain requests in its batch bit-identical, and decodes a
request at its neutral parameters exactly as a plain one (greedy, the real engine)."""

from __future__ import annotations

import pytest

from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.testing.conformance import check_patch_in_engine

pytestmark = pytest.mark.engine

MODEL = {"moi": "dense", "roe": "moe", "temperature_ladder": "dense"}  # RoE needs an MoE model


def keyed_patches(engine: str) -> dict[str, type]:
    return {p.name: type(p) for p in build_registry(plugin_manager(load_entry_points=False)).model_patches() if p.engine == engine and p.keys}


@pytest.mark.parametrize("name", sorted(MODEL))
def test_a_built_in_patch_leaves_plain_rows_alone_and_is_plain_at_neutral(engines, engine_name, name):
    patches = keyed_patches(engine_name)
    assert set(patches) == set(MODEL), f"a new keyed patch needs a model here: {sorted(set(patches) - set(MODEL))}"
    eng = engines.offline(MODEL[name])
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in ("What is 2 + 3?", "What is 17 * 4 - 9?", "Is 91 prime?")]

    def generate(ps, params, max_new):
        # the ladder sets each sample's temperature, so its requests must sample (a rung of 0 is a greedy sample)
        params = [{**p, "_temperature": 1.0, "_seed": 7} if "tts_temperature_ladder" in p else p for p in params]
        return [o.token_ids for o in eng.generate(ps, params, max_tokens=max_new)]

    check_patch_in_engine(patches[name], generate, prompts, engine=engine_name)
