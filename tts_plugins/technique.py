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
