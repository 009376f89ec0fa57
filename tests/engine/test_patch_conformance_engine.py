"""The conformance suite's engine half for model patches: every built-in patch of this engine that requests turn on
(Mixture of Inputs, RoE, the temperature ladder) leaves plain requests in its batch bit-identical, and decodes a
request at its neutral parameters exactly as a plain one (greedy, the real engine)."""

from __future__ import annotations

import pytest

from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.testing.conformance import check_patch_in_engine

pytestmark = pytest.mark.engine

ON_DENSE, ON_MOE = ("moi", "temperature_ladder"), ("roe",)  # RoE needs an MoE model


def keyed_patches(engine: str) -> dict[str, type]:
    return {p.name: type(p) for p in build_registry(plugin_manager(load_entry_points=False)).model_patches() if p.engine == engine and p.keys}


def run(eng, engine_name: str, name: str) -> None:
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in ("What is 2 + 3?", "Is 91 prime?")]

    def generate(ps, params, max_new):
        # the ladder sets each sample's temperature, so its requests must sample (a rung of 0 is a greedy sample)
        params = [{**p, "_temperature": 1.0, "_seed": 7} if "tts_temperature_ladder" in p else p for p in params]
        return [o.token_ids for o in eng.generate(ps, params, max_tokens=max_new)]

    check_patch_in_engine(keyed_patches(engine_name)[name], generate, prompts, max_new=10, engine=engine_name)


def test_every_keyed_patch_is_covered(engine_name):
    assert set(keyed_patches(engine_name)) == {*ON_DENSE, *ON_MOE}, "a new keyed patch needs a model in this file"


@pytest.mark.parametrize("name", ON_DENSE)
def test_a_dense_model_patch_leaves_plain_rows_alone_and_is_plain_at_neutral(engines, engine_name, name):
    run(engines.offline("dense"), engine_name, name)


@pytest.mark.parametrize("name", ON_MOE)
def test_an_moe_patch_leaves_plain_rows_alone_and_is_plain_at_neutral(engines, engine_name, name):
    run(engines.offline("moe"), engine_name, name)
