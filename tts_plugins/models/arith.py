"""Synthetic multi-step arithmetic with checkable answers: the task the trained tiny models learn.

A problem is a chain of additions and subtractions over small integers::

    Compute 7 + 5 - 3 + 8.

and a worked solution is a thinking block with one line per step, then the answer::

    <think>
    7 + 5 = 12
    12 - 3 = 9
    9 + 8 = 17
    </think>

    Answer: 17

Some solutions re-check their last step after a "Wait" (``Wait, 9 + 8 = 17``), so a
model trained on them knows what to do when budget forcing splices "Wait" in; some
are cut short (:meth:`Problem.cut_completion`) or skip the thinking
(:meth:`Problem.no_think_completion`), so that a thinking cap or NoThinking is
followed by an answer rather than by more thinking.
Difficulty is two numbers: ``steps`` (operations per chain) and ``max_operand``
(operands are drawn from 1..max_operand). The running total never goes below 0.
Everything is a pure function of its seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

DEFAULT_STEPS = 8
DEFAULT_MAX_OPERAND = 9
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One chain: ``start`` then ``ops`` as (sign, operand) pairs."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def question(self) -> str:
        return "Compute " + " ".join([str(self.start)] + [f"{s} {x}" for s, x in self.ops]) + "."

    def totals(self) -> list[int]:
        out, t = [], self.start
        for s, x in self.ops:
            t = t + x if s == "+" else t - x
            out.append(t)
        return out

    @property
    def answer(self) -> int:
        return self.totals()[-1]

    def steps(self) -> list[str]:
        lines, t = [], self.start
        for (s, x), nxt in zip(self.ops, self.totals()):
            lines.append(f"{t} {s} {x} = {nxt}")
            t = nxt
        return lines

    def thinking(self, rechecks: int = 0) -> str:
        lines = self.steps()
        lines += [f"Wait, {lines[-1]}"] * rechecks
        return "\n".join(lines)

    def completion(self, rechecks: int = 0) -> str:
        """The assistant's text after the prompt (which already opened ``<think>\\n``).

        ``rechecks``: how many times the last step is re-checked after "Wait" before the thinking ends."""
        return f"{self.thinking(rechecks)}\n</think>\n\nAnswer: {self.answer}"

    def cut_completion(self, chars: int) -> str:
        """The thinking cut after ``chars`` characters, closed as a thinking cap closes it (``"\\n</think>"``),
        then the answer: what a model should still do when its thinking is cut short."""
        return f"{self.thinking()[:chars]}\n</think>\n\nAnswer: {self.answer}"

    def no_think_completion(self, text: str = "Okay, I think I have finished thinking.") -> str:
        """NoThinking's prefill, then the answer."""
        return f"{text}\n</think>\n\nAnswer: {self.answer}"

    def to_json(self, pid: str) -> dict:
        """A line of the ``tts run`` input format."""
        return {"id": pid, "prompt": self.question, "answer": str(self.answer)}


def make_problem(rng: random.Random, steps: int = DEFAULT_STEPS, max_operand: int = DEFAULT_MAX_OPERAND) -> Problem:
    if steps < 1 or max_operand < 1:
        raise ValueError(f"steps and max_operand must be >= 1, got steps={steps}, max_operand={max_operand}")
    t = rng.randint(1, max_operand)
    start, ops = t, []
    for _ in range(steps):
        x = rng.randint(1, max_operand)
        s = "-" if x <= t and rng.random() < 0.5 else "+"
        t = t + x if s == "+" else t - x
        ops.append((s, x))
    return Problem(start, tuple(ops))


def problems(n: int, seed: int, steps: int = DEFAULT_STEPS, max_operand: int = DEFAULT_MAX_OPERAND) -> list[Problem]:
    """``n`` problems, a pure function of the arguments."""
    rng = random.Random(f"arith:{seed}:{steps}:{max_operand}")
    return [make_problem(rng, steps, max_operand) for _ in range(n)]


def held_out(n: int, steps: int = DEFAULT_STEPS, max_operand: int = DEFAULT_MAX_OPERAND) -> list[Problem]:
    """Evaluation problems; training never draws from this seed, and duplicates of training chains are rare."""
    return problems(n, seed=-1, steps=steps, max_operand=max_operand)


def extract_answer(text: str) -> str | None:
    """The number after the last ``Answer:``, or ``None``."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None
