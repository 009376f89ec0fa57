"""Every environment variable the package and its tools read, declared once.

The reference (``docs/``, ``tts plugins``) is generated from :data:`VARIABLES`, and the package reads each
variable through :func:`get`, so a variable cannot be read without being documented: an undeclared name is a
``KeyError``. ``where`` says whose environment it belongs to: ``"server"`` (the engine's, read by the plugins
inside it), ``"client"`` (the ``tts`` command's) or ``"development"`` (the ``./dev`` script, the tests and the
benchmarks). Imports nothing from the package, and no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["VARIABLES", "WHERE", "EnvVar", "get"]

WHERE = ("server", "client", "development")


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: its ``name``, the value used when it is unset (``default``; ``None``: unset means
    what ``doc`` says), what it does (``doc``) and whose environment it belongs to (``where``, one of :data:`WHERE`)."""

    name: str
    default: str | None
    doc: str
    where: str

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"EnvVar {self.name}: where must be one of {WHERE}, got {self.where!r}")


VARIABLES: tuple[EnvVar, ...] = (
    # --- the server (the engine's environment) ---
    EnvVar("TTS_PLUGINS_DISABLE", None,
           "`1` (or `true`, `yes`) switches the installed plugins off in this engine, for A/B runs: `tts_*` keys are "
           "then ignored, not validated.", "server"),
    EnvVar("TTS_PLUGINS_REASONING_EFFORT", None,
           "The map from a chat request's `reasoning_effort` to a thinking budget, as comma-separated `level=tokens` "
           "entries (0: no cap), e.g. `low=1024,medium=4096,high=0`; entries replace the defaults of their levels. "
           "Read once at start-up; a malformed map stops the server.", "server"),
    EnvVar("TTS_PLUGINS_THINK_START", None,
           "Overrides the string that opens a thinking block (unset: the engine's reasoning config, the tokenizer's "
           "own thinking tokens, else `<think>`).", "server"),
    EnvVar("TTS_PLUGINS_THINK_END", None,
           "Overrides the string that closes a thinking block (unset: the engine's reasoning config, the tokenizer's "
           "own thinking tokens, else `</think>`).", "server"),
    EnvVar("TTS_PLUGINS_DEBUG", None,
           "Any non-empty value: vLLM's adapter logs every batch change with the live per-request state counts.",
           "server"),
    EnvVar("TTS_PLUGINS_DEBUG_FILE", None,
           "A path prefix: each engine process writes its live per-request state counts as JSON to `<prefix>.<pid>` "
           "whenever they change. Read when the package is imported.", "server"),
    EnvVar("TTS_PLUGINS_VERIFIER_URL", None,
           "An OpenAI-compatible server (`http://host:port/v1`) that judges thought convergence; when set, requests "
           "may send `tts_trim_verifier: \"openai\"`.", "server"),
    EnvVar("TTS_PLUGINS_VERIFIER_MODEL", None,
           "The model the verifier server is asked for (unset: the first it lists).", "server"),
    # --- the client ---
    EnvVar("TTS_SERVER_URL", "http://127.0.0.1:8000",
           "The server `tts run` and `tts bench` send requests to when no URL is given.", "client"),
    # --- development: the ./dev script, the tests, the benchmarks, the demo ---
    EnvVar("TTS_TINY_MODELS", None,
           "Where the tiny test models are built and cached (unset: `.cache/tiny` in the clone for `./dev` and the "
           "tests, a folder in the temp directory for the demo and the conformance suite's engine check).",
           "development"),
    EnvVar("TTS_DEMO_MODEL", None,
           "The reasoner directory `./dev demo` serves (unset: train the full recipe under `TTS_TINY_MODELS`).",
           "development"),
    EnvVar("TTS_DEMO_PROBLEMS", "40", "How many held-out problems `./dev demo` runs.", "development"),
    EnvVar("TTS_DEMO_KEEP_WHEELS", "0",
           "`1`: `./dev demo` reuses the wheels already built instead of building them again.", "development"),
    EnvVar("TTS_VENVS", None, "Where `./dev` keeps the engines' virtual environments (unset: `.venv` in the clone).",
           "development"),
    EnvVar("TTS_GPU_PYTHON", None,
           "The Python of a CUDA environment with the next vLLM that `./dev gpu` runs its checks with (unset: "
           "`.venv/vllm-gpu/bin/python`).", "development"),
    EnvVar("TTS_ENGINE", None,
           "The engine the engine test suite runs against (`vllm` or `sglang`; unset: whichever is installed).",
           "development"),
    EnvVar("TTS_FUZZ_EXAMPLES", "120", "Parameter sets the reliability tests' fuzzer sends to the server.", "development"),
    EnvVar("TTS_LOAD_COMPARE", "40",
           "How many of the reliability load test's greedy requests are sent again alone and compared.", "development"),
    EnvVar("TTS_SOAK_REQUESTS", "400", "Requests the reliability soak test sends.", "development"),
    EnvVar("TTS_SGL_KERNEL_CALLS", None,
           "A file where the tests' stand-in for `sgl_kernel` records every import and call (unset: nothing is "
           "recorded).", "development"),
    EnvVar("HYPOTHESIS_PROFILE", "dev",
           "The tests' hypothesis profile: `dev`, `ci` (what `./dev test` sets) or `full`.", "development"),
)

_BY_NAME = {v.name: v for v in VARIABLES}


def get(name: str) -> str | None:
    """The variable's value in this process's environment, else its declared default; ``KeyError`` for a name not
    declared in :data:`VARIABLES`."""
    try:
        var = _BY_NAME[name]
    except KeyError:
        raise KeyError(f"environment variable {name!r} is not declared in tts_plugins.envvars.VARIABLES") from None
    return os.environ.get(name, var.default)
