"""What a logits technique implements, and what the engine tells it.

A technique owns per-slot state in buffers sized ``max_slots + 1`` allocated
once; the extra last slot (``info.neutral_slot``) is always neutral, and rows of
the batch that belong to no request slot are mapped there, so ``apply`` can
index buffers with the row-to-slot tensor without branching.

Life of a request: ``parse_params`` (then ``check_params`` and
``check_request``) at admission, in the engine's API process; then, driven by
:class:`tts_plugins.batch.SlotState` in the engine process,
``set_slot(slot, params, request)`` when it starts (params ``None`` clears it),
``on_tokens(slot, ids)`` on the host after the engine sampled tokens for an
active slot, and ``apply(logits, row_slots)`` once per decode step for the
whole batch. :mod:`tts_plugins.slots` has the building blocks for per-slot
state (a slot allocator, a host buffer mirrored on the device).

A plugin author needs this module and :mod:`tts_plugins.hookspecs`:
:class:`LogitsTechnique` for techniques on logits, :class:`ModelPatch` for
changes to an engine's model or front end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from tts_plugins.params import Key

GREEDY_TEMPERATURE = 1e-5
"""A request whose temperature is below this is decoded greedily (vLLM's own threshold; SGLang's is 1e-6).

One threshold for every engine, so "greedy" means the same request in vLLM and SGLang."""


@dataclass
class EngineInfo:
    """Engine facts a technique may use; built once per engine process by an adapter."""

    vocab_size: int  # width of the logits rows
    max_slots: int
    device: torch.device
    tokenizer: Any = None
    eos_token_ids: tuple[int, ...] = ()
    think_start: str = "<think>"
    think_end: str = "</think>"
    pin_memory: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def neutral_slot(self) -> int:
        return self.max_slots


@dataclass(frozen=True)
class SlotRequest:
    """What a technique may know about the request entering a slot."""

    prompt_ids: Sequence[int] = ()
    greedy: bool = False  # the engine picks the argmax for this request (temperature 0)
    temperature: float = 1.0  # the request's sampling temperature (as sent; meaningless when greedy)
    seed: int | None = None  # the request's sampling seed, when it has one
    # Output the request had already committed when it (re-)entered this slot: non-empty when it resumes after a
    # preemption (the engine re-adds it with its output so far). The adapter also feeds these tokens through
    # ``on_tokens`` right after ``set_slot``, as if the technique had watched them; a technique with state across
    # requests may need to know they are history, not new tokens (a group must not see its member finish twice).
    output_ids: Sequence[int] = ()


class LogitsTechnique(ABC):
    """One test-time-scaling technique acting on logits.

    Required: set ``name`` (unique), ``keys`` (the ``tts_*`` request keys it
    owns) and implement ``parse_params``, ``set_slot``, ``num_active`` and
    ``apply``. Declared for the core and the references (each with a default):
    ``key_specs``, ``forcing``, ``effort_key``, ``effort_yields_to``,
    ``runs_before``, ``runs_after``. Optional, each with a default that is correct for a technique
    that needs nothing more: ``argmax_invariant``, ``cross_request_state``,
    ``placement``, ``on_tokens``, ``report_fields`` (with ``report_values`` and ``report``), ``check_params``, ``check_request``, ``debug_counts``,
    ``conformance_params`` and ``reference_row``. Nothing else is ever looked
    up on a technique: this class is the whole contract.

    Where each part runs: ``parse_params``, ``check_params`` and
    ``check_request`` at admission, in the engine's API process (torch may not
    be initialised there: use no device); ``__init__``, ``set_slot``,
    ``on_tokens`` and ``debug_counts`` on the host of the engine process;
    ``apply`` on the hot path; ``conformance_params`` and ``reference_row``
    only in the conformance suite (:mod:`tts_plugins.testing.conformance`).
    """

    name: ClassVar[str]
    keys: ClassVar[frozenset[str]]
    argmax_invariant: ClassVar[bool] = False
    """True only if ``apply`` can never change a row's argmax. The conformance suite checks the claim; vLLM may
    skip an argmax-invariant processor for greedy requests, so the vLLM adapter claims it only when every
    registered technique does."""
    cross_request_state: ClassVar[bool] = False
    """True when one slot's output depends on other slots' state (a group's members see each other's finish).
    The conformance suite's ``slot_lifecycle`` then checks the live count and that released slots are neutral
    again, instead of comparing each live slot with a fresh state built from its own history alone."""

    # --- declarations the core reads (it names no technique) ---

    key_specs: ClassVar[tuple[Key, ...]] = ()
    """Each key of ``keys`` described (:class:`tts_plugins.params.Key`: type, default, meaning, and where setting it
    forces or forbids tokens). The request-key reference and ``tts plugins`` are generated from it, and the core's
    refusals under a structured output or with tools read ``forces``. A key left undeclared forces nothing and is
    listed without a description."""
    effort_key: ClassVar[str | None] = None
    """The key a chat request's ``reasoning_effort`` sets, to the level's budget from the server's map
    (:mod:`tts_plugins.effort`), or ``None``. One technique's holds: when several declare one, the first in apply
    order, and the registry logs the others (it never fails to build over a declaration)."""
    effort_yields_to: ClassVar[frozenset[str]] = frozenset()
    """Keys that, when a request sends any of them, make its effort level add nothing (the request chose for itself;
    ``effort_key`` always counts)."""
    runs_before: ClassVar[tuple[str, ...]] = ()
    """Techniques (by name) whose ``apply`` must run after this one's in a step; ``"*"``: every technique that does not
    itself declare ``"*"`` (one that reads the raw logits before anything forces a token). Names not registered are
    ignored. The registry orders techniques by these declarations, else by registration; a cycle is logged and the
    techniques run in registration order."""
    runs_after: ClassVar[tuple[str, ...]] = ()
    """Techniques (by name) whose ``apply`` must run before this one's in a step (see ``runs_before``)."""

    # --- admission: the API process, torch-free, no side effects ---

    @classmethod
    @abstractmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> Any | None:
        """Parse this technique's keys from a flat request dict; ``None`` when not opted in.

        ``flat`` holds only the request keys in ``keys`` that the request sent.
        Torch-free and side-effect free; the result is frozen (it crosses
        processes); raises ``ValueError`` naming the key, the value and what
        was expected, and nothing else.
        """

    @classmethod
    def check_params(cls, params: Any, registry: Any) -> None:
        """Admission check of parsed ``params`` against the :class:`tts_plugins.manager.Registry`; raise ``ValueError`` to refuse.

        Called by ``Registry.parse`` right after ``parse_params`` returned
        non-``None``, on every engine, for checks that need to know what else
        is registered (e.g. ``tts_trim_verifier`` must name a registered
        verifier). Torch-free, no side effects. The default accepts.
        """
        return None

    @classmethod
    def forcing(cls, params: Any, flat: Mapping[str, Any]) -> dict[str, str]:
        """``{key: "thinking" | "answer"}``: the keys of this request (``flat``, this technique's keys as sent) that
        make the technique force or forbid tokens, and where. The core refuses a request whose ``"answer"`` keys meet
        a structured output or tools, and whose ``"thinking"`` keys meet a grammar applied from the first token.
        Torch-free, no side effects. The default reads ``key_specs``; override when it depends on the value."""
        declared = {spec.name: spec.forces for spec in cls.key_specs if spec.forces}
        return {k: declared[k] for k in flat if k in declared}

    @classmethod
    def placement(cls, params: Any) -> str | None:
        """Which requests must run in one engine instance (one data-parallel rank) with this one, for cross-row
        techniques whose members must see each other.

        ``None`` (the default): none; the request and its samples may run anywhere. ``""``: the request's own
        samples (a request with ``n`` samples is a group by itself). A non-empty name: every request whose
        placement is that name, and their samples (a named group). The adapters turn it into the engine's
        data-parallel rank at admission (:func:`tts_plugins.services.placement`), unless the client pinned one.
        Torch-free, no side effects.
        """
        return None

    @classmethod
    def check_request(cls, params: Any, request: Any) -> None:
        """Admission check of parsed ``params`` against the engine's own request; raise ``ValueError`` to refuse.

        ``request`` is the engine's sampling parameters (vLLM's or SGLang's
        ``SamplingParams``): read only the attributes both have (``n``,
        ``temperature``, ``top_p``, ``top_k``, ``min_p``), with defaults, as
        the two engines differ. Called after ``check_params``, and only where
        the adapter sees the request at admission (the error then reaches the
        client as a bad request). Torch-free, no side effects. The default
        accepts.
        """
        return None

    # --- the engine process ---

    def __init__(self, info: EngineInfo) -> None:
        """Allocate every per-slot buffer here, once, sized ``info.max_slots + 1`` (see the module docstring)."""
        self.info = info

    @abstractmethod
    def set_slot(self, slot: int, params: Any | None, request: SlotRequest) -> None:
        """Start (params not None) or clear (None) the state of ``slot``.

        Starting a slot that is already on replaces its state. A clear must
        leave the slot neutral, exactly as if it had never been used. Raising
        switches this technique off for that request only (the request goes on
        without it and the error is logged).
        """

    def on_tokens(self, slot: int, token_ids: Sequence[int]) -> None:  # noqa: B027
        """Tokens the engine sampled for an active ``slot`` since the last call, oldest first.

        Host side, between steps; only the technique's own active slots are
        fed. The default ignores them.
        """

    @property
    @abstractmethod
    def num_active(self) -> int:
        """How many slots currently have this technique switched on (a host counter; ``apply`` is skipped at 0)."""

    @abstractmethod
    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        """Transform ``logits[R, V]`` in place (or return a new tensor).

        ``row_slots[R]`` (int64, on the logits' device) maps each row to its slot,
        or to ``info.neutral_slot``. ``host_slots`` is the same map as a numpy
        array when the adapter knows it on the host without a sync (vLLM V1,
        SGLang), else ``None``; use it to skip work, never require it. Must not
        sync with the host, loop over rows in Python, allocate state per step
        (buffers belong in ``__init__``), or touch rows whose slot is not
        active; returns its input at once when no slot is active.
        """

    report_fields: ClassVar[tuple[str, ...]] = ()
    """The numbers this technique reports on each request when it ends (empty: no report). See ``report_values``."""

    def report_values(self, slots: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
        """The report numbers of ``slots`` (host ``int64`` array): a float64 ``[len(slots), len(report_fields)]``
        array, NaN in the rows of slots this technique is not on for. Host only, vectorized, no sync with the
        device (a copy lagging the device by a step is acceptable). Called by the adapters while requests that
        use a reporting technique are in the batch, at most once a step (vLLM sends the numbers of the step's
        rows to its scheduler, which runs in another process), and when a request ends (SGLang).

        ``tokens``: when given, how many tokens each request had produced when it ended. An overlapping
        scheduler (SGLang's) runs one more step for a request before it knows that the request has ended; a
        technique that counts its steps reports as of ``tokens`` (it keeps the numbers of the step before)."""
        raise NotImplementedError(f"{type(self).__name__} declares report_fields but no report_values")

    @classmethod
    def report(cls, values: Mapping[str, float]) -> dict[str, Any] | None:
        """What the client sees of one request's report (JSON-able), from its numbers by ``report_fields`` name;
        ``None``: nothing. Runs wherever the engine finishes requests (vLLM: the scheduler's process, without an
        instance). The adapters put the reports of a request's techniques, by technique name, into its response:
        ``{"tts": {name: report}, ...}`` as JSON in vLLM's ``stop_reason`` and SGLang's ``matched_stop``
        (:func:`tts_plugins.services.report_json`). The default: the numbers as they are."""
        return dict(values)

    def debug_counts(self) -> dict[str, int]:
        """Sizes of live host-side state (``{"members": 2, ...}``); every value is 0 once every request has left.

        Reported by :meth:`tts_plugins.batch.SlotState.debug_counts` as
        ``"<name>.<key>"`` (leak tests and the engines' debug logs read it).
        Host only, cheap, never called on the hot path. The default reports
        nothing (``num_active`` is always reported).
        """
        return {}

    # --- the conformance suite (tts_plugins.testing.conformance); never called by an engine ---

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        """Valid flat parameter dicts that switch this technique on, covering its modes.

        The conformance suite runs every invariant with each of them (and the
        engine check sends each through a real engine), so a technique must
        return at least one; the default returns none, which the suite reports
        as a failure. Plain data: no engine, no tokenizer.
        """
        return []

    def reference_row(self, logits_row: torch.Tensor, slot: int) -> torch.Tensor | None:
        """The plain per-row specification of ``apply``: ``logits_row[V]`` as ``apply`` must leave it for ``slot``.

        The conformance suite's ``matches_reference`` compares the vectorized
        ``apply`` with it on every active row. It may loop, sync and allocate
        (test tooling only), but must not change the technique's state.
        The default, ``None``, means "no reference": the suite skips the check.
        """
        return None


class ModelPatch:
    """A change to an engine's model or front end that techniques switch on per request.

    Register an instance per engine with the ``tts_register_model_patches`` hook.
    Instances for different engines of the same patch share ``name`` and ``keys``.
    ``install`` runs in every engine process, before the model is built, and
    goes through the project's :class:`tts_plugins.patching.Patcher` (version
    bound, target check, conflict refusal, undo).

    Subclasses set ``name``, ``engine`` and, when requests turn the patch on,
    ``keys`` and ``parse_params``. Engine-neutral logic (parameter parsing, the
    math, per-request state) belongs in the technique's module under
    ``tts_plugins.logits_processors``; the subclass for one engine only hooks
    that engine.
    """

    name: ClassVar[str]
    engine: ClassVar[str]  # "vllm" or "sglang"
    keys: ClassVar[frozenset[str]] = frozenset()  # the tts_* request keys this patch owns (empty: always on)
    key_specs: ClassVar[tuple[Key, ...]] = ()  # each key described (see LogitsTechnique.key_specs)
    min_version: ClassVar[str | None] = None  # inclusive: the engine versions this patch was written against
    max_version: ClassVar[str | None] = None  # exclusive
    params: ClassVar[Any] = None  # the technique's parameter class (``params.parse(flat)``), when requests turn it on
    feature: ClassVar[str | None] = None  # what the patch is called in refusals ("Mixture of Inputs")
    label: ClassVar[str | None] = None  # the engine's name in refusals ("vLLM")
    hint: ClassVar[str] = ""  # ends a version refusal, e.g. " (send one request per temperature instead)"

    def install(self, patcher: Any) -> None:
        """Patch the engine through ``patcher`` (a :class:`tts_plugins.patching.Patcher` for ``engine``)."""
        raise NotImplementedError(f"model patch {type(self).__name__} must implement install(patcher)")

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> Any | None:
        """This patch's parameters from a request's ``tts_*`` keys (only ``keys`` are passed); ``None``: not opted in.

        Torch-free, no side effects; raises ``ValueError`` naming the key, the value and what was expected.
        The default: ``params.parse(flat)``, or never opted in when the patch has no ``params``.
        """
        return cls.params.parse(flat) if cls.params is not None else None

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        """Valid flat parameter sets that turn the patch on, covering its modes, for the conformance suite
        (:mod:`tts_plugins.testing.conformance`, ``check_patch_*``). A patch with ``keys`` provides at least one."""
        return []

    @classmethod
    def neutral_params(cls) -> list[dict[str, Any]]:
        """Parameter sets at which the patch changes nothing: the suite checks that a request sending them
        decodes exactly as a plain request does (in the engine), and that they parse (or parse to ``None``)."""
        return []

    @classmethod
    def supported(cls) -> str | None:
        """``None`` when the installed engine can run this patch, else the reason (returned to the client at admission).

        The default checks the installed engine's version against ``[min_version, max_version)``, then asks
        :meth:`refuse`.
        """
        if cls.min_version is not None or cls.max_version is not None:
            from tts_plugins import patching

            reason = patching.version_refusal(cls.engine, cls.label or cls.engine, cls.feature or f"model patch {cls.name!r}",
                                              cls.min_version or "0", cls.max_version or "999", cls.hint)
            if reason is not None:
                return reason
        return cls.refuse()

    @classmethod
    def refuse(cls) -> str | None:
        """A reason beyond the version why this engine, as configured, cannot run the patch (e.g. a model runner it
        does not support), or ``None`` (the default)."""
        return None

    def check_request(self, params: Any, request: Any) -> None:
        """Admission check against the engine's own request (its sampling parameters); raise ``ValueError`` to refuse.

        Called after ``parse_params`` when the engine exposes the request (e.g. a ladder refuses a greedy request).
        The default accepts every request.
        """

    # --- core services (tts_plugins.services): optional; the adapters call only what a subclass overrides -----

    def sample_edit(self, parsed: Mapping[str, Any], index: int, parent_id: str | None) -> Any | None:
        """How sample ``index`` of a request with ``n`` samples differs from the request: a
        :class:`tts_plugins.services.SampleEdit`, or ``None`` (the default) for no change.

        Called by the engine's front end once per child of every request with ``tts_*`` keys, before the
        child reaches the engine (the per-sample hook is the core's; no patch hooks the fan-out itself).
        ``parsed`` is the request's parameters by technique or patch name (``Registry.parse`` and
        ``parse_patches``), ``parent_id`` a name shared by the children of one request (``None`` when the
        engine did not fan the request out). Host only, no side effects.
        """
        return None

    def cache_salt(self, params: Any, request_id: str, seed: int | None) -> str | None:
        """The prefix-cache salt of a request this patch is on for (``params`` from ``parse_params``), or ``None``
        (the default: its KV may be shared, as for a patch that does not change the model's output).

        Called once per request when the engine creates it; requests share cached KV only when their salts
        are equal, so the salt must tell apart every setting that changes the KV (``seed`` is the request's
        sampling seed or ``None``). The adapters combine it with the request's own salt and other patches'.
        """
        return None

    # Step observer (the SGLang adapter calls these for every SGLang patch that overrides one; vLLM patches hook
    # the model runner's own methods). Each runs in the scheduler process, host side, and must not raise into
    # the engine: catch, log, and let the requests run plain.

    def on_batch(self, batch: Any, forward_batch: Any, model_runner: Any, kept: Any) -> None:
        """A forward batch with ``tts_*`` requests was built: ``batch`` (SGLang's ``ScheduleBatch``), its
        ``forward_batch``, the ``model_runner``, and ``kept[i]``, whether request ``i``'s sample this step is
        kept (False: a prefill chunk that is not the last). The default does nothing."""

    def before_sample(self, model_runner: Any, forward_batch: Any, logits: Any) -> Any | None:
        """Before the engine samples from ``logits[R, V]`` (raw: before penalties, temperature and the
        sampler's in-place edits); the result (``None``: nothing to do) is passed to ``after_sample``."""
        return None

    def after_sample(self, model_runner: Any, token: Any, sampled_ids: Any) -> None:
        """After the engine sampled ``sampled_ids[R]`` in the step ``before_sample`` returned ``token`` for
        (called only for a non-``None`` token)."""

    def on_finished(self, request_id: str) -> None:
        """A request left the engine (finished or aborted): drop its state. The default does nothing."""
