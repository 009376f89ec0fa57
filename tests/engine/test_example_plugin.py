"""The example third-party plugin (examples/ngram_ban) in the real engine: installed by entry point only.

``./dev test`` installs it into each engine's environment. Its oracle is
independent of both this project and the engines: Hugging Face's own
``no_repeat_ngram_size`` in ``generate``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from test_moi_engine import staggered_prompts

pytestmark = pytest.mark.engine


def hf_no_repeat(model_dir, prompt, max_new, n, eos):
    import torch

    from reference import _model

    out = _model(str(model_dir)).generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, no_repeat_ngram_size=n,
                                          eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def test_the_example_is_installed_through_the_entry_point_group():
    names = {ep.name for ep in entry_points(group="tts_plugins")}
    assert "ngram_ban" in names, "pip install examples/ngram_ban (./dev test does) before running the engine suite"


def test_example_plugin_matches_transformers_no_repeat_ngram(engines, overlap):
    eng = engines.offline("dense", overlap)
    tok, model = eng.tokenizer, engines.tiny_model("dense")
    prompts = staggered_prompts(tok, 4)
    params = [{"tts_ngram_ban": 2}, {}, {"tts_ngram_ban": 3}, {"tts_ngram_ban": 2, "tts_think_max": 100}]
    outs = eng.generate(prompts, params, max_tokens=40)
    banned_something = 0
    for prompt, p, out in zip(prompts, params, outs):
        n = p.get("tts_ngram_ban")
        plain = hf_no_repeat(model, prompt, 40, None, tok.eos_token_id) if n is None else None
        want = hf_no_repeat(model, prompt, 40, n, tok.eos_token_id) if n else plain
        assert out.token_ids == want, p
        if n:
            seq = prompt + out.token_ids
            for end in range(len(prompt), len(seq)):  # every n-gram a generated token completed is new
                gram = tuple(seq[end - n + 1 : end + 1])
                earlier = {tuple(seq[i : i + n]) for i in range(0, end - n + 1)}
                assert gram not in earlier, f"generated token {end - len(prompt)} repeated the {n}-gram {gram}"
            banned_something += out.token_ids != hf_no_repeat(model, prompt, 40, None, tok.eos_token_id)
    assert banned_something, "the ban never changed an output: the test would prove nothing"

