"""Token text: find strings in a token stream however the tokenizer split them.

End-of-thinking strings may be one special token or several ordinary ones, and
the same text tokenizes differently in context ("\\n</think>" is not "\\n" +
"</think>" in every vocabulary). So detection works on text: every token id
maps to the string it decodes to, and a small per-row matcher scans the
concatenation. Building the table decodes the vocabulary once per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """``texts[i]`` = what token ``i`` decodes to on its own ("" past the tokenizer's vocabulary)."""
    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return list(texts) + [""] * (vocab_size - n)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS, special tokens recognised."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def completion_sets(texts: Sequence[str], pattern: str) -> list[list[int]]:
    """``sets[j]``: the tokens that complete ``pattern`` when the text so far ends in ``pattern[:j]``.

    A token completes the pattern if ``pattern[:j] + text`` contains it. With
    ``j`` the longest partial match, no earlier alignment is possible, so
    blocking ``sets[j]`` is exactly what keeps the pattern from appearing.
    """
    last = pattern[-1]
    candidates = [i for i, t in enumerate(texts) if last in t]
    return [[i for i in candidates if pattern in pattern[:j] + texts[i]] for j in range(len(pattern))]


def partial_match(tail: str, pattern: str) -> int:
    """Length of the longest proper prefix of ``pattern`` that ``tail`` ends with."""
    if not tail or tail[-1] not in pattern[:-1]:  # the usual case, decided by one character
        return 0
    for j in range(min(len(pattern) - 1, len(tail)), 0, -1):
        if tail.endswith(pattern[:j]):
            return j
    return 0


@dataclass
class StreamMatcher:
    """Finds ``start``/``end`` occurrences in text fed piece by piece.

    ``feed`` returns the events ("start" or "end") completed by the new piece,
    in order. The retained tail is shorter than the longest pattern.
    """

    start: str
    end: str
    tail: str = ""
    _keep: int = field(init=False)

    def __post_init__(self) -> None:
        self._keep = max(len(self.start), len(self.end)) - 1

    def feed(self, piece: str) -> list[str]:
        text = self.tail + piece
        events: list[str] = []
        pos = 0
        while True:
            s = text.find(self.start, pos) if self.start else -1
            e = text.find(self.end, pos)
            if s < 0 and e < 0:
                break
            if e < 0 or (0 <= s < e):
                events.append("start")
                pos = s + len(self.start)
            else:
                events.append("end")
                pos = e + len(self.end)
        rest = text[pos:]
        self.tail = rest[-self._keep :] if self._keep else ""
        return events

    def end_partial(self) -> int:
        return partial_match(self.tail, self.end)

    def start_partial(self) -> int:
        return partial_match(self.tail, self.start)


def thinking_state(text: str, start: str, end: str) -> tuple[bool, str]:
    """Is a prompt that ends with ``text`` inside a thinking block, and the tail to resume matching from."""
    s = text.rfind(start) if start else -1
    e = text.rfind(end)
    inside = s >= 0 and s > e
    keep = max(len(start), len(end)) - 1
    cut = max(s + len(start) if s >= 0 else 0, e + len(end) if e >= 0 else 0)
    rest = text[cut:]
    return inside, rest[-keep:] if keep else ""


def cached_token_texts(info: Any) -> list[str]:
    """``token_texts`` for an engine's tokenizer, computed once per engine (techniques share it)."""
    texts = info.extra.get("token_texts")
    if texts is None:
        texts = info.extra["token_texts"] = token_texts(info.tokenizer, info.vocab_size)
    return texts
