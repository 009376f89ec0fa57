"""What a logits technique implements, and what the engine tells it.

A technique owns per-slot state in buffers sized ``max_slots + 1`` allocated
once; the extra last slot (``info.neutral_slot``) is always neutral, and rows of
the batch that belong to no request slot are mapped there, so ``apply`` can
index buffers with the row-to-slot tensor without branching.

Life of a slot, driven by :class:`tts_plugins.batch.SlotState`:
``set_slot(slot, params, request)`` at admission (params ``None`` clears it),
``on_tokens(slot, ids)`` on the host after the engine sampled tokens for an
active slot, and ``apply(logits, row_slots)`` once per decode step for the
whole batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch


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


class LogitsTechnique(ABC):
    """One test-time-scaling technique acting on logits.

    Subclasses set ``name`` (unique), ``keys`` (the ``tts_*`` request keys they
    own) and ``argmax_invariant`` (True only if ``apply`` can never change a
    row's argmax), and implement the methods below.
    """

    name: ClassVar[str]
    keys: ClassVar[frozenset[str]]
    argmax_invariant: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> Any | None:
        """Parse this technique's keys from a flat request dict; ``None`` when not opted in.

        Torch-free and side-effect free; raises ``ValueError`` naming the key,
        the value and what was expected.
        """

    def __init__(self, info: EngineInfo) -> None:
        self.info = info

    @abstractmethod
    def set_slot(self, slot: int, params: Any | None, request: SlotRequest) -> None:
        """Start (params not None) or clear (None) the state of ``slot``."""

    def on_tokens(self, slot: int, token_ids: Sequence[int]) -> None:  # noqa: B027
        """Tokens the engine sampled for an active ``slot`` since the last call, oldest first."""

    @property
    @abstractmethod
    def num_active(self) -> int:
        """How many slots currently have this technique switched on."""

    @abstractmethod
    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        """Transform ``logits[R, V]`` in place (or return a new tensor).

        ``row_slots[R]`` (int64, on the logits' device) maps each row to its slot,
        or to ``info.neutral_slot``. ``host_slots`` is the same map as a numpy
        array when the adapter knows it on the host without a sync (vLLM V1,
        SGLang), else ``None``; use it to skip work, never require it. Must not
        sync with the host, loop over rows in Python, or touch rows whose slot
        is not active.
        """


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
    min_version: ClassVar[str | None] = None  # inclusive: the engine versions this patch was written against
    max_version: ClassVar[str | None] = None  # exclusive

    def install(self, patcher: Any) -> None:
        """Patch the engine through ``patcher`` (a :class:`tts_plugins.patching.Patcher` for ``engine``)."""
        raise NotImplementedError(f"model patch {type(self).__name__} must implement install(patcher)")

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> Any | None:
        """This patch's parameters from a request's ``tts_*`` keys (only ``keys`` are passed); ``None``: not opted in.

        Torch-free, no side effects; raises ``ValueError`` naming the key, the value and what was expected.
        The default: a patch without keys is never opted in.
        """
        return None

    def supported(self) -> str | None:
        """``None`` when the installed engine can run this patch, else the reason (returned to the client at admission).

        The default checks the installed engine's version against ``[min_version, max_version)``.
        """
        if self.min_version is None and self.max_version is None:
            return None
        from tts_plugins import patching

        return patching.version_refusal(self.engine, self.engine, f"model patch {self.name!r}", self.min_version or "0",
                                        self.max_version or "999")

    def check_request(self, params: Any, request: Any) -> None:
        """Admission check against the engine's own request (its sampling parameters); raise ``ValueError`` to refuse.

        Called after ``parse_params`` when the engine exposes the request (e.g. a ladder refuses a greedy request).
        The default accepts every request.
        """
