"""Thought trimming (TrimR-style): stop redundant thinking inside the engine.

Keys (see :class:`TrimParams`): ``tts_trim`` (on with the
defaults), ``tts_trim_converge``, ``tts_trim_max_thoughts``,
``tts_trim_min_tokens``, ``tts_trim_ngram``, ``tts_trim_repeats``,
``tts_trim_markers``, ``tts_trim_conclusion``, ``tts_trim_verifier``.

Thinking is split into thoughts at reflection markers ("Wait",
"Alternatively", "But", blank lines by default), found in the decoded text.
Three triggers, each switched off with 0:

* **overthinking**: the same extracted answer in ``converge`` consecutive
  thoughts (default 3). Thoughts without an extractable answer neither count
  nor break the run. The answer is the last ``\\boxed{...}``, else what follows
  "answer is" / "Answer:". TrimR judges equivalence with a 7B verifier; this
  cheap rule is our default, and ``tts_trim_verifier`` names a registered
  verifier (``tts_register_verifiers`` hook) that decides instead.
* **underthinking**: more than ``max_thoughts`` thoughts (default 12) once
  past ``min_tokens`` thinking tokens (default 1024) without convergence.
* **repetition loop**: one n-gram of ``ngram`` tokens (default 12) seen
  ``repeats`` times (default 3) in the thinking.

What comes from TrimR (arXiv 2505.17155; reported, not verified in its code):
the three triggers (overthinking: the answer already reached and re-verified;
underthinking: many thoughts without convergence past a token threshold;
repetition loops), the split into thoughts at reflection markers, and the
response (a short conclusion, then the end of thinking). Our choices: every
number (``converge`` 3, ``max_thoughts`` 12, ``min_tokens`` 1024, ``ngram``
12, ``repeats`` 3), the marker list, the conclusion phrase, and the cheap
equal-answer rule in place of TrimR's 7B verifier; so every one is a key. On a
trigger the conclusion phrase and the end-of-thinking string are forced token
by token (the forced-token primitive think steering uses too); the answer
then follows normally.

Cost: host work only for opted-in rows, per new token a short string scan
near the end of the current thought and one n-gram dictionary update;
answer extraction runs only when a thought ends. ``apply`` forces rows only
while a conclusion is being delivered. A verifier is asked asynchronously (a
thread pool); a decode step never waits for it, and its verdict applies at
the first step after it arrives.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tts_plugins.forcing import ForcedTokens
from tts_plugins.params import Key, get_bool, get_int, get_text, get_text_list, show
from tts_plugins.technique import EngineInfo, LogitsTechnique, SlotRequest
from tts_plugins.text import StreamMatcher, cached_token_texts, encode, thinking_state

# --- parameters (parsed at admission, torch-free) --------------------------------

DEFAULT_MARKERS = ("Wait", "Alternatively", "But", "\n\n")
DEFAULT_TRIM_CONCLUSION = "\n\nI have checked this enough; time to answer.\n"

# A trim forces its conclusion and the end-of-thinking string inside the thinking block only (Key.forces).
TRIM_KEY_SPECS = (
    Key("tts_trim", "bool", False,
        "true: trim thoughts with every trigger at its default; any other tts_trim_* key also switches trimming on "
        "(false with another tts_trim_* key is refused).", forces="thinking"),
    Key("tts_trim_converge", "int 0 or in [2, 1000]", 3,
        "Overthinking: trim once this many consecutive answered thoughts give the same answer (\\boxed{..}, else "
        "\"answer is X\"); 0: off.", forces="thinking"),
    Key("tts_trim_max_thoughts", "int in [0, 100000]", 12,
        "Underthinking: trim after more thoughts than this, past tts_trim_min_tokens thinking tokens, without "
        "convergence; 0: off.", forces="thinking"),
    Key("tts_trim_min_tokens", "int >= 0", 1024,
        "The thinking tokens the underthinking trigger waits for.", forces="thinking"),
    Key("tts_trim_ngram", "int 0 or in [2, 1024]", 12,
        "Repetition loop: the n-gram length (in tokens) whose repeats trigger a trim; 0: off.", forces="thinking"),
    Key("tts_trim_repeats", "int in [2, 1000]", 3,
        "Repetition loop: trim once one n-gram of tts_trim_ngram tokens has been seen this many times.",
        forces="thinking"),
    Key("tts_trim_markers", "list of 1 to 16 non-empty strings (at most 64 characters each)", DEFAULT_MARKERS,
        "Reflection markers: where a new thought starts.", forces="thinking"),
    Key("tts_trim_conclusion", "string", DEFAULT_TRIM_CONCLUSION,
        "What a trim forces before the end-of-thinking string.", forces="thinking"),
    Key("tts_trim_verifier", "name of a registered verifier", None,
        "A registered verifier judges convergence instead of the equal-answer rule (e.g. \"openai\" with "
        "TTS_PLUGINS_VERIFIER_URL set on the server); it answers asynchronously and never blocks decoding.",
        forces="thinking"),
)
TRIM_KEYS = frozenset(k.name for k in TRIM_KEY_SPECS)


@dataclass(frozen=True)
class TrimParams:
    """TrimR-style thought trimming of one request (0 switches a trigger off).

    ``converge``: overthinking, the same extracted answer in this many
    consecutive thoughts. ``max_thoughts`` / ``min_tokens``: underthinking,
    more thoughts than this past this many thinking tokens without
    convergence. ``ngram`` / ``repeats``: a repetition loop, one n-gram of
    tokens seen this many times. ``verifier``: a registered verifier decides
    convergence instead of the built-in rule.
    """

    converge: int = 3
    max_thoughts: int = 12
    min_tokens: int = 1024
    ngram: int = 12
    repeats: int = 3
    markers: tuple[str, ...] = DEFAULT_MARKERS
    conclusion: str = DEFAULT_TRIM_CONCLUSION
    verifier: str | None = None

    @classmethod
    def parse(cls, flat: Mapping[str, Any]) -> TrimParams | None:
        present = sorted(k for k in TRIM_KEYS if k in flat)
        if not present:
            return None
        if "tts_trim" in flat and not get_bool(flat, "tts_trim"):
            others = sorted(set(present) - {"tts_trim"})
            if others:
                raise ValueError(f"tts_trim is false but {others[0]} is set, got {others[0]}={show(flat[others[0]])}")
            return None
        verifier = flat.get("tts_trim_verifier")
        if verifier is not None and (not isinstance(verifier, str) or not verifier or len(verifier) > 64):
            raise ValueError(f"tts_trim_verifier must be the name of a registered verifier, got {show(verifier)}")
        params = cls(
            converge=get_int(flat, "tts_trim_converge", 3, maximum=1000),
            max_thoughts=get_int(flat, "tts_trim_max_thoughts", 12, maximum=100_000),
            min_tokens=get_int(flat, "tts_trim_min_tokens", 1024),
            ngram=get_int(flat, "tts_trim_ngram", 12, maximum=1024),
            repeats=get_int(flat, "tts_trim_repeats", 3, minimum=2, maximum=1000),
            markers=get_text_list(flat, "tts_trim_markers", DEFAULT_MARKERS),
            conclusion=get_text(flat, "tts_trim_conclusion", DEFAULT_TRIM_CONCLUSION),
            verifier=verifier,
        )
        if params.converge == 1:
            raise ValueError("tts_trim_converge must be 0 (off) or an int >= 2, got 1")
        if params.ngram == 1:
            raise ValueError("tts_trim_ngram must be 0 (off) or an int >= 2, got 1")
        return params


# --- thoughts and answers ----------------------------------------------------------

_ANSWER = re.compile(r"(?:answer is|Answer:)\s*\$?\s*([^\s$.,;]+(?:\.\d+)?)", re.IGNORECASE)


def extract_answer(thought: str) -> str | None:
    """The last ``\\boxed{..}`` content (balanced braces), else the last "answer is X"; normalized."""
    start = thought.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        begin = i
        while i < len(thought) and depth:
            depth += {"{": 1, "}": -1}.get(thought[i], 0)
            i += 1
        if depth == 0:
            return _norm(thought[begin : i - 1])
    found = _ANSWER.findall(thought)
    return _norm(found[-1]) if found else None


def _norm(answer: str) -> str | None:
    answer = answer.strip().rstrip(".").replace(" ", "")
    return answer or None


def split_points(text: str, markers: Sequence[str], start: int) -> list[int]:
    """Positions >= ``start`` (and > 0) in ``text`` where a new thought begins, in order."""
    points = set()
    for m in markers:
        pos = text.find(m, max(start, 1))
        while pos >= 0:
            points.add(pos)
            pos = text.find(m, pos + 1)
    return sorted(points)


@dataclass
class _Row:
    params: TrimParams
    matcher: StreamMatcher
    thinking: bool
    thought: str = ""
    thoughts: int = 0
    answers: list[str] = field(default_factory=list)  # answers of the answered thoughts, in order
    tokens: int = 0
    window: deque[int] = field(default_factory=deque)
    seen: dict[tuple[int, ...], int] = field(default_factory=dict)
    queue: deque[int] = field(default_factory=deque)
    fired: str | None = None  # which trigger ended the thinking (for tests and logs)
    pending: Any = None  # a verifier's future


class ThoughtTrim(LogitsTechnique):
    name = "trim"
    keys = TRIM_KEYS
    key_specs = TRIM_KEY_SPECS
    argmax_invariant = False

    @classmethod
    def conformance_params(cls) -> list[dict[str, Any]]:
        """Valid parameter sets covering this technique's modes, for the conformance suite."""
        return [
            {"tts_trim": True}, {"tts_trim_ngram": 2, "tts_trim_repeats": 2}, {"tts_trim_converge": 2, "tts_trim_markers": ["Wait", "\n"]},
        ]

    @classmethod
    def parse_params(cls, flat: Mapping[str, Any]) -> TrimParams | None:
        return TrimParams.parse(flat)

    @classmethod
    def check_params(cls, params: TrimParams, registry: Any) -> None:
        if params.verifier is not None and params.verifier not in registry.verifier_names:
            known = sorted(registry.verifier_names) or "none registered"
            raise ValueError(f"tts_trim_verifier must name a registered verifier ({known}), got {params.verifier!r}")

    def __init__(self, info: EngineInfo) -> None:
        super().__init__(info)
        self.texts = cached_token_texts(info)
        self.forced = ForcedTokens(info.max_slots, info.device, info.pin_memory)
        self.rows: dict[int, _Row] = {}
        self.verifiers: dict[str, Any] = info.extra.get("verifiers") or {}

    @property
    def num_active(self) -> int:
        return len(self.rows)

    def set_slot(self, slot: int, params: TrimParams | None, request: SlotRequest) -> None:
        old = self.rows.pop(slot, None)
        if old is not None and old.pending is not None:
            old.pending.cancel()
        if params is not None:
            if params.verifier is not None and params.verifier not in self.verifiers:
                raise ValueError(f"tts_trim_verifier names no registered verifier, got {params.verifier!r}; known: {sorted(self.verifiers)}")
            prompt = self.info.tokenizer.decode(list(request.prompt_ids), skip_special_tokens=False)
            inside, tail = thinking_state(prompt, self.info.think_start, self.info.think_end)
            self.rows[slot] = _Row(params=params, matcher=StreamMatcher(self.info.think_start, self.info.think_end, tail), thinking=inside)
        self._publish(slot)

    def on_tokens(self, slot: int, token_ids: Sequence[int]) -> None:
        row = self.rows.get(slot)
        if row is None:
            return
        for t in token_ids:
            if row.queue:
                if row.queue[0] == t:
                    row.queue.popleft()
                else:  # someone else decided this token; our conclusion is stale
                    row.queue.clear()
            piece = self.texts[t] if 0 <= t < len(self.texts) else ""
            for event in row.matcher.feed(piece):
                if event == "start" and not row.thinking:
                    self._restart(row)
                elif event == "end" and row.thinking:
                    row.thinking = False
                    row.queue.clear()
            if row.thinking and not row.queue and row.fired is None:
                self._observe(row, t, piece)
        self._check_verdict(row)
        self._publish(slot)

    def _restart(self, row: _Row) -> None:
        row.thinking, row.thought, row.thoughts, row.tokens, row.fired = True, "", 0, 0, None
        row.answers.clear()
        row.window.clear()
        row.seen.clear()

    def _observe(self, row: _Row, t: int, piece: str) -> None:
        p = row.params
        row.tokens += 1
        if p.ngram:
            row.window.append(t)
            if len(row.window) > p.ngram:
                row.window.popleft()
            if len(row.window) == p.ngram:
                key = tuple(row.window)
                row.seen[key] = row.seen.get(key, 0) + 1
                if row.seen[key] >= p.repeats:
                    self._fire(row, "repetition")
                    return
        before = len(row.thought)
        row.thought += piece
        # only a marker completed by this piece can start a new thought: scan just the tail
        start = max(1, before - max(len(m) for m in p.markers) + 1)
        while points := split_points(row.thought, p.markers, start):
            done, row.thought = row.thought[: points[0]], row.thought[points[0] :]
            start = 1
            if done.strip():
                self._close_thought(row, done)
                if row.fired:
                    return
        if p.max_thoughts and row.thoughts > p.max_thoughts and row.tokens >= p.min_tokens:
            self._fire(row, "underthinking")

    def _close_thought(self, row: _Row, thought: str) -> None:
        p = row.params
        row.thoughts += 1
        answer = extract_answer(thought)
        if answer is None:
            return
        row.answers.append(answer)
        if p.verifier is not None:
            if len(row.answers) >= 2 and row.pending is None:
                row.pending = self.verifiers[p.verifier].submit(row.answers[-2], row.answers[-1], thought)
            return
        if p.converge and len(row.answers) >= p.converge and len(set(row.answers[-p.converge :])) == 1:
            self._fire(row, "overthinking")

    def _check_verdict(self, row: _Row) -> None:
        fut = row.pending
        if fut is None or not fut.done():
            return
        row.pending = None
        try:
            agreed = bool(fut.result())
        except Exception:  # a verifier that fails leaves the request to the other triggers
            agreed = False
        if agreed and row.thinking and row.fired is None:
            self._fire(row, "verifier")

    def _fire(self, row: _Row, why: str) -> None:
        row.fired = why
        row.queue.extend(encode(self.info.tokenizer, row.params.conclusion + self.info.think_end))

    def _publish(self, slot: int) -> None:
        row = self.rows.get(slot)
        tok = row.queue[0] if row is not None and row.queue else -1
        self.forced.set(slot, tok)

    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor, host_slots: np.ndarray | None = None) -> torch.Tensor:
        return self.forced.apply(logits, row_slots, host_slots)
