"""The tts-plugins contract: every hook a technique may implement.

A technique is a pluggy plugin (a module or an object) that implements some of
these hooks with ``@tts_plugins.hookimpl``. Third-party plugins are discovered
through the ``tts_plugins`` entry-point group; the built-in techniques live in
``tts_plugins.logits_processors``. Engine adapters (vLLM, SGLang) call the hooks;
techniques never see an engine type.

Implementations may accept any subset of a spec's arguments, and the adapters
always call hooks with keyword arguments, so specs can grow new arguments
without breaking existing plugins.

This module imports nothing heavy (no torch): the API server process of an
engine loads it to validate request parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping

PROJECT = "tts_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tts_register_techniques(register: Callable[[type], None]) -> None:
    """Register logits techniques.

    Called once when a registry is built. Call ``register(cls)`` for each
    technique class; ``cls`` subclasses
    :class:`tts_plugins.technique.LogitsTechnique`, which declares its name,
    the ``tts_*`` request keys it owns, a torch-free ``parse_params`` that turns
    those keys into a frozen parameter object (raising ``ValueError`` naming
    key, value and expectation), and the vectorized ``apply`` kernel.

    :param register: callback taking one technique class. Registering two
        techniques with the same name, or two techniques that claim the same
        request key, raises ``ValueError``.
    """


@hookspec
def tts_register_model_patches(register: Callable[[Any], None]) -> None:
    """Register engine model patches (input embeddings, router logits, ...).

    Called in every engine process by the engine's general-plugin entry point,
    before the model is built. Call ``register(patch)`` with an object that has
    a ``name`` (str), an ``engine`` (``"vllm"`` or ``"sglang"``) and an
    ``install(patcher)`` method; the adapter passes it the project's single
    patcher (:mod:`tts_plugins.patching`), which checks the engine version and
    the target, refuses to patch twice, logs, and can undo.

    A patch that techniques turn on per request also declares the request
    keys it owns: ``keys`` (a frozenset of ``tts_*`` names), ``parse_params(flat)``
    (torch-free; the parsed parameters or ``None`` when not opted in, raising
    ``ValueError`` naming key, value and expectation, like a technique's) and
    ``supported()`` (``None`` when this engine's installed version can run it,
    else the reason, which admission returns to the client). One patch object
    per engine shares a ``name`` and the same ``keys``.

    :param register: callback taking one patch object.
    """


@hookspec
def tts_register_verifiers(register: Callable[[str, Callable[[], Any]], None]) -> None:
    """Register answer verifiers that thought trimming may consult (``tts_trim_verifier``).

    Called once when a registry is built. Call ``register(name, factory)``;
    ``factory()`` is called lazily, once per engine process, and returns an
    object with ``submit(previous_answer: str, answer: str, thought: str) ->
    concurrent.futures.Future[bool]`` (True: the answers agree, the thinking
    has converged). ``submit`` must not block: the engine polls the future and
    never waits for it. A factory may return ``None`` when it is not
    configured; requests naming it are then refused at admission.

    :param register: callback taking a name and a zero-argument factory.
    """


@hookspec
def tts_register_aggregators(register_aggregator: Callable[[str, Callable[..., Any]], None], register_reward: Callable[[str, Callable[..., float]], None]) -> None:
    """Register client-side aggregators and reward functions (``tts_plugins.client.aggregate.registered``).

    ``register_aggregator(name, fn)``: ``fn(answers, ...) -> tts_plugins.client.aggregate.Vote``, a pure
    function of the answers and per-chain data. ``register_reward(name, fn)``: ``fn(prompt, completion)
    -> float`` (higher is better), used by Best-of-N style selection. Names must be new.
    """


@hookspec(firstresult=True)
def tts_think_strings(tokenizer: Any, model_name: str | None, engine_hint: Mapping[str, str] | None) -> tuple[str, str] | None:
    """Resolve the start and end strings of a model's thinking block.

    Called once per engine process when a technique that needs them is built.
    Stops at the first non-None result.

    :param tokenizer: the engine's Hugging Face tokenizer (or a compatible
        object with ``encode``/``decode``/``convert_ids_to_tokens``).
    :param model_name: the model path or name the engine serves, or ``None``.
    :param engine_hint: strings the engine itself knows, e.g. vLLM's
        reasoning config (``{"start": ..., "end": ...}``), or ``None``.
    :return: ``(start, end)`` strings, which may be several tokens long, or
        ``None`` to defer to the next implementation. The built-in fallback
        honours the server-level environment overrides
        ``TTS_PLUGINS_THINK_START`` / ``TTS_PLUGINS_THINK_END``, then the
        engine hint, then ``("<think>", "</think>")``.
    """
