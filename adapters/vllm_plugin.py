"""vLLM general plugin (entry-point group ``vllm.general_plugins``): the model patches and the core's services.

vLLM runs ``register()`` in every process it starts (API server, engine core,
workers). It installs the model patches that registered techniques ask for
through ``tts_register_model_patches``, and the core's own patches, which
provide the services of :mod:`tts_plugins.services` to every technique
(owner ``"core"``, vLLM 0.32 and 0.33):

* ``GPUModelRunner.sample_tokens`` (around): marks the runner that is sampling
  (a context variable), so the logits processor reads which rows' samples are
  discarded this step (:func:`discarded_rows`: a prefill chunk that is not the
  last).
* ``OutputProcessor.add_request`` (around; front end): the per-sample hook.
  It is called for every child of a request with ``n`` samples, with its
  index, before the child is sent to the engine core (``LLM`` and the OpenAI
  server alike); the child gets the merged :class:`~tts_plugins.services.SampleEdit`
  of the model patches (:func:`child_params`).
* ``Request.from_engine_core_request`` (engine core): the cache salt of the
  patches a request turns on, appended to its own ``cache_salt``.
* ``SamplingParams._validate_spec_decode`` (front end, at admission): a
  request with ``tts_*`` keys on a server with ``--speculative-config`` is
  refused with a 400 naming the keys (vLLM refuses ``logit_bias`` there the
  same way); without it the keys would be dropped silently.
* ``SamplingParams._validate_structured_outputs`` (front end, at admission):
  a request with a structured output and keys that force text while thinking
  is refused unless ``--reasoning-parser`` makes the grammar apply after the
  thinking block (else the grammar rejects the forced text and vLLM ends the
  request with a 500).
* ``InputProcessor.process_inputs`` (front end, at admission): with
  ``--data-parallel-size`` > 1, a request whose techniques must share an
  engine with other requests or with its own samples (a ``tts_group``, a
  roster: :func:`tts_plugins.services.placement`) gets the data-parallel
  rank derived from the group's name (or its own id), unless the client
  pinned one (header ``X-data-parallel-rank``). vLLM's n children copy the
  parent's rank, and its load balancer honours a set rank. With Model Runner
  V2's batch-sharded sampling (vLLM 0.33, ``--enable-batch-sharded-sampling``
  with tensor parallelism) each rank samples only its own slots, so such a
  request is refused with a 400 there (:func:`refuse_sharded`).
* ``ChatCompletionRequest.to_sampling_params`` (front end): a chat request's
  ``reasoning_effort`` becomes its thinking cap (:mod:`tts_plugins.effort`;
  a malformed ``TTS_PLUGINS_REASONING_EFFORT`` stops the server at start-up),
  and a group stop at EOS with tools is refused (:func:`tts_plugins.admission.refuse_tools`).

It is idempotent: running twice in one process changes nothing. This module
imports no vLLM until ``register()`` runs.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import logging
from typing import Any

import numpy as np

from tts_plugins import services
from tts_plugins.adapters import vllm_support
from tts_plugins.adapters.vllm_support import (  # noqa: F401 (what this module offered before vllm_support existed)
    _SAMPLING,
    MAX_VERSION,
    MIN_VERSION,
    SERVICES,
    V1_RUNNER_MAX,
    V2_RUNNER_MIN,
    discarded_rows,
    left_out,
    refuse_unsupported,
    report_left_out,
    runner_refusal,
    uses_v2_runner,
)
from tts_plugins.technique import GREEDY_TEMPERATURE

log = logging.getLogger("vllm.tts_plugins")  # under vLLM's logger, so its handlers print it

CORE_TARGETS = {
    "sample_tokens": "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
    "v2_sample_tokens": "vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample_tokens",
    "v2_remove_request": "vllm.v1.worker.gpu.model_runner:GPUModelRunner._remove_request",
    "add_request": "vllm.v1.engine.output_processor:OutputProcessor.add_request",
    "new_request": "vllm.v1.request:Request.from_engine_core_request",
    "chat_params": "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.to_sampling_params",
    "spec_decode": "vllm.sampling_params:SamplingParams._validate_spec_decode",
    "structured": "vllm.sampling_params:SamplingParams._validate_structured_outputs",
    "placement": "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
    "finish": "vllm.v1.core.sched.scheduler:Scheduler._update_request_with_output",
    "step_output": "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
}

def register() -> None:
    """vLLM's general-plugin entry point. It never raises: a plugin that stops the engine from starting is the worst
    defect there is. What it cannot install is logged (one line each) and the keys that need it are refused."""
    from tts_plugins.manager import default_registry, disabled
    from tts_plugins.patching import Patcher, install_patches

    if disabled():
        return
    from tts_plugins.effort import startup_checks

    startup_checks(log)  # a malformed TTS_PLUGINS_REASONING_EFFORT is the operator's error: it stops the server on purpose
    try:
        install_patches(default_registry(), engine="vllm")
        install_core(Patcher("vllm", owner="core"))
        report_left_out()
    except Exception:
        log.exception("tts_plugins: could not install every patch; requests whose keys need them are refused")


def _runner_module_present(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except Exception:  # a parent package that fails to import
        return False


# The core's patches by the service they provide, front end and scheduler first (pure-Python modules that import the
# same in every process, so a failure there is known to the front end that admits requests), the runner's last.
def _services() -> tuple[tuple[str, str, Any], ...]:
    wraps = {"add_request": _wrap_add_request, "new_request": _wrap_from_engine_core_request, "chat_params": _wrap_chat_params,
             "spec_decode": _wrap_validate_spec_decode, "structured": _wrap_validate_structured, "placement": _wrap_process_inputs,
             "finish": _wrap_update_with_output, "step_output": _wrap_update_from_output}
    return tuple((key, service, wraps[key]) for key, service in SERVICES.items())


def install_core(patcher: Any) -> None:
    """Install the core's patches (the services every technique may use) through ``patcher``. Each is installed on its
    own: one that fails is logged and its service recorded as left out (:func:`left_out`), the others go on."""
    from tts_plugins.patching import engine_version, version_in_range

    ver = engine_version("vllm") or "0"
    for key, service, wrap in _services():
        _install_one(patcher, key, service, wrap, MIN_VERSION, MAX_VERSION, record=True)
    # the runner's: installed where the runner is (a front end that cannot import it records nothing: the worker may)
    if version_in_range(ver, MIN_VERSION, V1_RUNNER_MAX):
        _install_one(patcher, "sample_tokens", "reports", _wrap_sample_tokens, MIN_VERSION, V1_RUNNER_MAX)
    if version_in_range(ver, V2_RUNNER_MIN, MAX_VERSION) and _runner_module_present("vllm.v1.worker.gpu.model_runner"):
        _install_one(patcher, "v2_sample_tokens", "reports", _wrap_sample_tokens, V2_RUNNER_MIN, MAX_VERSION)
        _install_one(patcher, "v2_remove_request", "slot release", _wrap_remove_request, V2_RUNNER_MIN, MAX_VERSION)
    left_out.cache_clear()


def _install_one(patcher: Any, key: str, service: str, wrap: Any, lo: str, hi: str, record: bool = False) -> None:
    from tts_plugins.patching import engine_version, patch_owner, version_in_range

    target = CORE_TARGETS[key]
    try:
        done = patcher.replace(target, wrap, min_version=lo, max_version=hi)
    except Exception as exc:  # an import that fails otherwise than ImportError, a target of another shape
        log.error("tts_plugins: could not patch %s (%s: %s); %s left out", target, type(exc).__name__, exc, service)
        done = False
    if done or patch_owner(target.replace(":", ".")) == "core":
        return
    ver = engine_version("vllm") or "unknown"
    if record and version_in_range(ver, lo, hi):  # outside the range, left_out() says so already
        vllm_support._FAILED.setdefault(service, f"vLLM {ver}: {target} could not be patched (see the server log)")


def _wrap_sample_tokens(original: Any) -> Any:
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _SAMPLING.set(self)
        try:
            out = original(self, *args, **kwargs)
        finally:
            _SAMPLING.reset(token)
        try:
            return attach_reports(out, getattr(self, "req_states", None))
        except Exception:  # a report is never worth a step
            log.exception("tts_plugins: could not read the step's reports")
            return out

    return sample_tokens


def _wrap_remove_request(original: Any) -> Any:
    """Model Runner V2 frees a slot without telling the logits processors (a later ``add_request`` overwrites it):
    tell ours, so a finished, aborted or preempted request leaves its techniques' state (a group it belonged to, a
    DeepConf window) at once, and not when its slot is next reused."""

    def _remove_request(self: Any, req_id: str, *args: Any, **kwargs: Any) -> Any:
        slot = getattr(getattr(self, "req_states", None), "req_id_to_index", {}).get(req_id)
        out = original(self, req_id, *args, **kwargs)
        if slot is not None:
            slot_freed(int(slot), getattr(getattr(self, "sampler", None), "logits_processors", None))
        return out

    return _remove_request


def slot_freed(slot: int, processors: Any = None) -> None:
    """Model Runner V2 freed ``slot``: the runner's processors (``processors``: its sampler's list; every processor of
    this process when unknown) drop its state (O(1) when the slot held no opted-in request). Another engine in the same
    process keeps its own slot of that number."""
    from tts_plugins.adapters.vllm import TTSLogitsProcessor

    procs = [p for p in processors if isinstance(p, TTSLogitsProcessor)] if processors is not None else list(TTSLogitsProcessor._instances)
    for proc in procs:
        if not proc.inert and proc.v2:
            try:
                proc.free_slot(slot)
            except Exception:
                log.exception("tts_plugins: could not release a finished request's state")


# --- the per-sample front-end hook --------------------------------------------------


def child_params(params: Any, index: int, parent_id: str | None = None, registry: Any = None) -> Any:
    """The sampling params of sample ``index`` of the request ``parent_id``: ``params`` itself when no patch edits
    it, else a copy (the parent's may be shared) with the merged edit applied."""
    if registry is None:
        from tts_plugins.manager import default_registry

        registry = default_registry()
    edit = services.sample_edit(registry, "vllm", getattr(params, "extra_args", None), index, parent_id)
    if edit is None:
        return params
    child = copy.copy(params)
    if edit.extra:
        child.extra_args = {**params.extra_args, **edit.extra}
    # edit.own_seed needs nothing: vLLM gives sample i the seed seed + i already
    if edit.temperature is not None:
        child.temperature = edit.temperature
        if child.temperature < GREEDY_TEMPERATURE:  # what SamplingParams does for temperature 0
            child.top_p, child.top_k, child.min_p = 1.0, 0, 0.0
        # the engine core checks the params again when it decodes the request, and an error there is fatal to it
        child._verify_args()
    return child


def _wrap_add_request(original: Any) -> Any:
    @functools.wraps(original)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        params = getattr(request, "sampling_params", None)
        if params is not None and getattr(params, "extra_args", None):
            try:
                index = kwargs.get("request_index", args[2] if len(args) > 2 else 0)
                parent = kwargs.get("parent_req", args[1] if len(args) > 1 else None)
                request.sampling_params = child_params(params, int(index), None if parent is None else parent.request_id)
            except Exception:  # admission validated the parameters; never fail a request here
                log.exception("tts_plugins: could not apply the per-sample parameters; the sample runs with the request's")
        return original(self, request, *args, **kwargs)

    return add_request


# --- the cache salt -------------------------------------------------------------------


def _wrap_from_engine_core_request(original: Any) -> Any:
    def from_engine_core_request(cls: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if extra:
            from tts_plugins.manager import default_registry

            try:
                mine = services.cache_salt(default_registry(), "vllm", extra, request.request_id, getattr(sp, "seed", None))
            except Exception:  # admission validated the parameters
                log.exception("tts_plugins: could not salt a request's cache key")
                mine = None
            if mine:
                salt = getattr(request, "cache_salt", None)
                request.cache_salt = f"{salt}|{mine}" if salt else mine
                if getattr(request, "block_hashes", None):  # vLLM 0.34: a front end's precomputed hashes miss our salt
                    request.block_hashes = None
                # 0.34: from_engine_core_request(request, block_hasher, block_hashes), a front end's hashes made without our
                # salt: dropped, so the engine hashes the prompt itself, with it
                if len(args) > 1:
                    args = (args[0], None, *args[2:])
                if kwargs.get("block_hashes"):
                    kwargs["block_hashes"] = None
        return original(request, *args, **kwargs)

    return classmethod(from_engine_core_request)


# --- reasoning_effort -------------------------------------------------------------------


def _wrap_chat_params(original: Any) -> Any:
    @functools.wraps(original)
    def to_sampling_params(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = original(self, *args, **kwargs)
        if getattr(self, "tools", None) and getattr(params, "extra_args", None):
            from vllm.exceptions import VLLMValidationError

            from tts_plugins.admission import refuse_tools

            try:
                refuse_tools(params.extra_args, self.tools, getattr(self, "tool_choice", None))
            except ValueError as exc:
                raise VLLMValidationError(str(exc)) from None
        effort = getattr(self, "reasoning_effort", None)
        if effort is not None:
            from tts_plugins.effort import budget_request

            extra = budget_request(effort, getattr(params, "extra_args", None))
            if extra is not None:  # a new dict: extra_args is the request's own vllm_xargs
                params.extra_args = extra
        return params

    return to_sampling_params


# --- speculative decoding ---------------------------------------------------------------


def _wrap_validate_spec_decode(original: Any) -> Any:
    @functools.wraps(original)
    def _validate_spec_decode(self: Any, speculative_config: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, speculative_config, *args, **kwargs)
        if speculative_config is not None:
            from vllm.exceptions import VLLMValidationError

            from tts_plugins.params import refuse_speculative

            try:
                refuse_speculative(getattr(self, "extra_args", None), "--speculative-config")
            except ValueError as exc:
                raise VLLMValidationError(str(exc)) from None
        return out

    return _validate_spec_decode


# --- structured output ------------------------------------------------------------------


def _wrap_validate_structured(original: Any) -> Any:
    @functools.wraps(original)
    def _validate_structured_outputs(self: Any, model_config: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, model_config, config, *args, **kwargs)
        if getattr(self, "structured_outputs", None) is not None and getattr(self, "extra_args", None):
            from vllm.exceptions import VLLMValidationError

            from tts_plugins.admission import refuse_structured

            after = bool(getattr(config, "reasoning_parser", "")) and not getattr(config, "enable_in_reasoning", False)
            try:
                refuse_structured(self.extra_args, after, "--reasoning-parser")
            except ValueError as exc:
                raise VLLMValidationError(str(exc)) from None
        return out

    return _validate_structured_outputs


# --- data-parallel placement ------------------------------------------------------------


def data_parallel_ranks(parallel_config: Any) -> int:
    """How many ranks this front end balances over (vLLM's own count in ``process_inputs``)."""
    if getattr(parallel_config, "local_engines_only", False):
        return int(getattr(parallel_config, "data_parallel_size_local", 1) or 1)
    return int(getattr(parallel_config, "data_parallel_size", 1) or 1)


def place(request: Any, num_ranks: int, registry: Any = None) -> int | None:
    """Give ``request`` (an ``EngineCoreRequest``) the rank its placement asks for; the rank set, or None."""
    if num_ranks <= 1 or getattr(request, "data_parallel_rank", None) is not None:
        return None
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if not extra:
        return None
    if registry is None:
        from tts_plugins.manager import default_registry

        registry = default_registry()
    where = services.placement(registry, extra)
    if where is None:
        return None
    request.data_parallel_rank = services.rank_for(where or f"request:{request.request_id}", num_ranks)
    return request.data_parallel_rank


def sharded_sampling(parallel_config: Any) -> int:
    """The tensor-parallel ranks over which Model Runner V2 splits the sampling rows (by slot: each rank samples
    and runs the logits processors on its own slots only, vLLM >= 0.33 with ``--enable-batch-sharded-sampling``),
    or 1 when every rank samples every row."""
    tp = int(getattr(parallel_config, "tensor_parallel_size", 1) or 1)
    if tp > 1 and getattr(parallel_config, "enable_batch_sharded_sampling", False) and uses_v2_runner():
        return tp
    return 1


def refuse_sharded(extra: Any, shards: int, registry: Any = None) -> None:
    """A request whose techniques must see other rows (a group, a roster) cannot run when each tensor-parallel rank
    samples only its own slots: its members would be split across ranks and never see each other. ValueError."""
    if shards <= 1 or not extra:
        return
    if registry is None:
        from tts_plugins.manager import default_registry

        registry = default_registry()
    keys = services.placement_keys(registry, extra)
    if keys:
        raise ValueError(f"{', '.join(keys)} cannot run with --enable-batch-sharded-sampling: Model Runner V2 splits the sampling "
                         f"rows over the {shards} tensor-parallel ranks by slot, so the members of a group or roster "
                         "would not see each other; serve such requests without batch-sharded sampling")


def _wrap_process_inputs(original: Any) -> Any:
    @functools.wraps(original)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        parallel = self.vllm_config.parallel_config
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
        if extra:
            try:
                refuse_sharded(extra, sharded_sampling(parallel))
            except ValueError as exc:
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(exc)) from None
        num_ranks = data_parallel_ranks(parallel)
        if num_ranks > 1:  # no try: a group that cannot be placed must not run split (the request fails instead)
            place(request, num_ranks)
        return request

    return process_inputs


# --- reports: the worker's numbers ride on the model runner's output to the scheduler ------------------------------
#
# A technique's report (LogitsTechnique.report_fields) is read on the host of the worker that runs the logits
# processors; vLLM's scheduler, which decides that a request has finished, runs in another process (the CPU
# engine and multi-GPU engines use a multiprocess executor). While a reporting technique is on, the worker puts
# the report numbers of the step's rows on its ModelRunnerOutput (a numpy array per technique, in the output's
# row order); the scheduler picks the finishing request's row and sets its stop_reason.

_STEP_OUTPUT: contextvars.ContextVar[Any] = contextvars.ContextVar("tts_plugins_vllm_step_output", default=None)


def attach_reports(output: Any, req_states: Any = None) -> Any:
    """Put the report numbers of this process's processor on ``output`` (a ModelRunnerOutput, or an async one
    whose ``get_output`` makes it); O(1) when no reporting technique is on. ``req_states``: Model Runner V2's request
    state, whose ``req_id_to_index`` gives the slot of each of the output's rows (its ``req_ids``, in batch order)."""
    from tts_plugins.adapters.vllm import TTSLogitsProcessor

    procs = [p for p in list(TTSLogitsProcessor._instances) if not p.inert]
    req_ids = getattr(output, "req_ids", None)
    if not procs:
        return output
    proc = procs[0]
    if proc.v2:
        if req_states is None or not proc.state.active or not proc.state.reporting():
            return output
        inner = getattr(output, "model_runner_output", output)
        # the slots now (the next step may free them), read from the runner's own map; only while a report is on
        index = req_states.req_id_to_index
        slots = np.array([index.get(rid, proc.info.neutral_slot) for rid in (inner.req_ids or ())], dtype=np.int64)
    elif req_ids is None and hasattr(output, "get_output"):
        slots = proc.report_slots(proc.rows.max_slots)  # the V1 persistent batch's rows, in the output's order
    else:
        slots = proc.report_slots(len(req_ids)) if req_ids else None
    if slots is None:
        return output
    if hasattr(output, "get_output") and getattr(output, "req_ids", None) is None:
        # async scheduling: the rows' slots now, their numbers when the output is made (after its device copy, so
        # the statistics of this step have reached the host too)
        make = output.get_output

        def get_output() -> Any:
            out = make()
            _put_reports(proc, out, slots[: len(out.req_ids)])
            return out

        output.get_output = get_output
    else:
        _put_reports(proc, output, slots)
    return output


def _put_reports(proc: Any, output: Any, slots: np.ndarray) -> None:
    tables = proc.state.report_tables(slots)
    if tables:
        output.tts_reports = tables


def _wrap_update_from_output(original: Any) -> Any:
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(model_runner_output, "tts_reports", None) is None:
            return original(self, scheduler_output, model_runner_output, *args, **kwargs)
        token = _STEP_OUTPUT.set(model_runner_output)
        try:
            return original(self, scheduler_output, model_runner_output, *args, **kwargs)
        finally:
            _STEP_OUTPUT.reset(token)

    return update_from_output


def _wrap_update_with_output(original: Any) -> Any:
    """A request that finishes in a step whose output carries reports gets its techniques' reports as its
    ``stop_reason`` (:func:`tts_plugins.services.report_json`; the engine's own, a stop token id, is kept inside)."""

    def _update_request_with_output(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, request, *args, **kwargs)
        if out[1]:
            step = _STEP_OUTPUT.get()
            if step is not None:
                try:
                    _report(step, request)
                except Exception:  # a report is never worth a request
                    log.exception("tts_plugins: could not attach a finished request's report")
        return out

    return _update_request_with_output


def _report(step: Any, request: Any) -> None:
    from tts_plugins.batch import decode_reports
    from tts_plugins.manager import default_registry
    from tts_plugins.services import report_json

    index = getattr(step, "req_id_to_index", None)  # vLLM <= 0.33; from 0.34 the rows are req_ids' order
    if index is None:
        ids = list(getattr(step, "req_ids", None) or ())
        index = step.req_id_to_index = {rid: i for i, rid in enumerate(ids)}  # once per step with a finished report
    row = index.get(request.request_id)
    if row is None:
        return
    reports = decode_reports(default_registry(), step.tts_reports, row)
    if reports:
        request.stop_reason = report_json(reports, request.stop_reason)
