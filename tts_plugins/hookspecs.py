"""The tts-plugins contract: every hook a technique may implement.

A technique is a pluggy plugin (a module or an object) that implements some of
these hooks with ``@tts_plugins.hookimpl``. Third-party plugins are discovered
through the ``tts_plugins`` entry-point group; the built-in techniques live in
``tts_plugins.logits_processors``. Engine adapters (vLLM, SGLang) call the hooks;
techniques never see an engine type.

Implementations may accept any subset of a spec's arguments, and the adapters
always call hooks with keyword arguments, so specs can grow new arguments
without breaking existing plugins.

What a registered class or object itself may implement is declared, with
defaults and docstrings, in :mod:`tts_plugins.technique`:
:class:`~tts_plugins.technique.LogitsTechnique` and
:class:`~tts_plugins.technique.ModelPatch`. This module and that one are the
whole contract.

This module imports nothing heavy (no torch): the API server process of an
engine loads it to validate request parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from collections.abc import Mapping

    from tts_plugins.client.methods import BenchMethod

PROJECT = "tts_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tts_register_techniques(register: Callable[[type], None]) -> None:
    """Register logits techniques.

    Called once each time a registry is built (:func:`tts_plugins.manager.build_registry`):
    in the engine's API process, to validate request parameters, and in each
    engine process. Must be idempotent and cheap: import the technique's
    module, allocate nothing.

    :param register: callback taking one technique class, a subclass of
        :class:`tts_plugins.technique.LogitsTechnique`. That class declares
        everything a technique may implement (required and optional parts,
        each with its default and when it is called). Registering something
        that is not such a subclass, two different techniques with the same
        name, or two techniques (or a technique and a model patch) that claim
        the same request key raises ``ValueError``; registering the same class
        twice is harmless.
    """


@hookspec
def tts_register_model_patches(register: Callable[[Any], None]) -> None:
    """Register engine model patches (input embeddings, router logits, the front end's sample fan-out, ...).

    Called each time a registry is built; the engines' general-plugin entry
    points then install the patches of their engine in every engine process,
    before the model is built, through the project's single patcher
    (:mod:`tts_plugins.patching`: version bound, target check, conflict
    refusal, undo).

    :param register: callback taking one patch object, an instance of a
        :class:`tts_plugins.technique.ModelPatch` subclass, which declares the
        whole protocol (``name``, ``engine``, ``keys``, ``parse_params``,
        ``supported``, ``check_request``, ``install``, and the optional uses of
        the core's services, :mod:`tts_plugins.services`: ``sample_edit``,
        ``cache_salt`` and the step observer's events). Register one instance
        per engine; instances for different engines of one patch share a
        ``name`` and the same ``keys``.
    """


@hookspec
def tts_register_verifiers(register: Callable[[str, Callable[[], Any]], None]) -> None:
    """Register answer verifiers that thought trimming may consult (``tts_trim_verifier``).

    Called once each time a registry is built. ``factory()`` is called lazily,
    once per engine process, and returns an object with
    ``submit(previous_answer: str, answer: str, thought: str) ->
    concurrent.futures.Future[bool]`` (True: the answers agree, the thinking
    has converged). ``submit`` must not block: the engine polls the future and
    never waits for it. A factory may return ``None`` when it is not
    configured; requests naming it are then refused at admission.

    :param register: callback taking a name (a new non-empty string; a name
        already registered raises ``ValueError``) and a zero-argument factory.
    """


@hookspec
def tts_register_aggregators(
    register_aggregator: Callable[[str, Callable[..., Any]], None], register_reward: Callable[[str, Callable[..., float]], None]
) -> None:
    """Register client-side aggregators and reward functions.

    Called on the client, never in an engine, each time
    :func:`tts_plugins.client.aggregate.registered` collects them (the client's
    strategies do, once per run). Registered names are then valid wherever
    the client takes an aggregator or a reward name (``--vote``,
    ``--reward``).

    :param register_aggregator: callback taking a name and ``fn``;
        ``fn(answers: Sequence[str | None]) -> tts_plugins.client.aggregate.Vote``
        is a pure function of the chains' extracted answers (``None``: the
        chain gave no answer and must not vote), invariant under reordering
        the chains. The client calls it with the answers only, nothing else
        (the built-in votes that need lengths, log-probs, rewards or
        confidences are routed by the client itself). The name must be new
        (built-in aggregators included), else ``ValueError``.
    :param register_reward: callback taking a name and ``fn``;
        ``fn(prompt: str, completion: str) -> float`` scores one chain (higher
        is better; finite, else the strategy fails), used by Best-of-N style
        selection. ``completion`` is the chain's reasoning, the end-of-thinking
        string and its answer. The name must be new, else ``ValueError``.
    """


@hookspec
def tts_register_bench_methods(register: Callable[[BenchMethod], None]) -> None:
    """Register methods for ``tts bench`` (and anything that names a method by SPEC, ``name[:value][,key=value...]``).

    Called on the client, never in an engine, each time
    :func:`tts_plugins.client.methods.registered` collects them: once per
    ``tts bench`` run, and once per process for
    :func:`~tts_plugins.client.methods.parse_method` without an explicit
    registry. The built-in methods register through this hook too, ahead of
    every plugin. Must be idempotent and cheap: build the method objects,
    send nothing.

    :param register: callback taking one method, an instance of
        :class:`tts_plugins.client.methods.BenchMethod` (a subclass that
        implements ``run``, or a
        :class:`~tts_plugins.client.methods.StrategyMethod`), which declares
        its name, its settings with their defaults and the source of each,
        its positional setting, its checks, label, control, ``run`` for one
        problem and the fields of its summary row. Registering something that
        is not a ``BenchMethod``, or a different method under a name already
        registered (the built-ins' included), raises ``ValueError``;
        registering the same object twice is harmless.
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
