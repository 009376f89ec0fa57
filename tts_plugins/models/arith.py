"""Synthetic multi-step arithmetic with checkable answers and the phenomena reasoning traces are reported to have.

A problem is a chain of additions and subtractions over small integers::

    Compute 7 + 5 - 3 + 8.

A worked solution (:func:`trace`) is a thinking block, then the answer::

    <think>
    7 + 5 = 12
    12 - 3 = 8          <- a slip
    Wait, 12 - 3 = 9    <- noticed and corrected
    So far 9.           <- an intermediate result, every third step
    9 + 8 = 17
    So the answer is 17.
    Wait, let me check: 12, 9, 17.   <- re-verification after the answer is reached
    So the answer is 17.
    </think>

    Answer: 17

What the traces plant (the phenomena, never a technique's effect; the rates are
the module's constants, and :func:`premises` measures them on any model's output):

* **Mixed difficulty**: 2 to 12 steps (``difficulty``: easy 2-4, medium 5-8,
  hard 9-12); longer chains carry larger running totals.
* **Slips, corrected after "Wait" or not**: a first-pass step is wrong with
  probability ``SLIP`` (off by 1 or 2). Half the slips are noticed at once
  (``Wait, a - b = c`` with the right value, and the chain goes on from it);
  the rest are doubted without being fixed (``Hmm, ...`` repeats the wrong
  line, once or twice; now and then a loop of several) and the error carries
  on. So a chain that went wrong hesitates, and runs longer.
* **Intermediate results**: ``So far N.`` every third step, and ``So the answer is
  N.`` when the chain ends.
* **Re-verification after the answer** (the overthinking thought trimming
  targets): 0 to 2 rounds of ``Wait, let me check: t1, t2, ...`` (every running
  total, recomputed carefully, so a check finds an earlier uncorrected slip)
  followed by ``So the answer is N.`` (the checked total). Verification is
  independent of whether the chain went wrong: most checks only confirm.

The final answer is the last stated one. Everything is a pure function of its seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_STEPS = 8
DEFAULT_MAX_OPERAND = 9
MIX_STEPS = (2, 12)  # the mixed-difficulty range: training, held-out sets
DIFFICULTY = (("easy", 2, 4), ("medium", 5, 8), ("hard", 9, 12))
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
STEP_RE = re.compile(r"^(?:(Wait|Hmm), )?(-?\d+) ([+-]) (\d+) = (-?\d+)$")
STATED_RE = re.compile(r"So the answer is (-?\d+)\.")

# Trace phenomena (rates in the training traces)
SLIP = 0.07  # a first-pass step is off by 1 or 2
NOTICE = 0.5  # a slip is corrected at once after "Wait"
LOOP = 0.15  # an unnoticed slip's doubt becomes a loop (3 to 5 "Hmm" lines)
VERIFY = (0.45, 0.33, 0.22)  # probability of 0, 1, 2 re-verification rounds after the answer
SO_FAR_EVERY = 3


def difficulty(steps: int) -> str:
    for name, lo, hi in DIFFICULTY:
        if lo <= steps <= hi:
            return name
    return "easy" if steps < DIFFICULTY[0][1] else "hard"


@dataclass(frozen=True)
class Problem:
    """One chain: ``start`` then ``ops`` as (sign, operand) pairs."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def question(self) -> str:
        return "Compute " + " ".join([str(self.start)] + [f"{s} {x}" for s, x in self.ops]) + "."

    @property
    def difficulty(self) -> str:
        return difficulty(len(self.ops))

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

    def thinking(self) -> str:
        """The clean worked chain: every step right, the intermediate results, the answer stated, no check."""
        return "\n".join(_clean_lines(self))

    def completion(self) -> str:
        """The assistant's text after the prompt (which already opened ``<think>\\n``) for the clean chain."""
        return f"{self.thinking()}\n</think>\n\nAnswer: {self.answer}"

    def cut_completion(self, chars: int) -> str:
        """The thinking cut after ``chars`` characters, closed as a thinking cap closes it (``"\\n</think>"``),
        then the answer: what a model should still do when its thinking is cut short."""
        return f"{self.thinking()[:chars]}\n</think>\n\nAnswer: {self.answer}"

    def no_think_completion(self, text: str = "Okay, I think I have finished thinking.") -> str:
        """NoThinking's prefill, then the answer."""
        return f"{text}\n</think>\n\nAnswer: {self.answer}"

    def to_json(self, pid: str) -> dict:
        """A line of the ``tts bench`` / ``tts run`` input format."""
        return {"id": pid, "question": self.question, "prompt": self.question, "answer": str(self.answer), "difficulty": self.difficulty,
                "steps": len(self.ops)}


def _clean_lines(p: Problem) -> list[str]:
    lines = []
    for i, line in enumerate(p.steps()):
        lines.append(line)
        if (i + 1) % SO_FAR_EVERY == 0 and i + 1 < len(p.ops):
            lines.append(f"So far {p.totals()[i]}.")
    lines.append(f"So the answer is {p.answer}.")
    return lines


@dataclass
class Trace:
    """A worked solution with what was planted in it (for the property tests and the premise counts)."""

    problem: Problem
    lines: list[str]
    slips: int = 0  # first-pass steps that were wrong
    noticed: int = 0  # slips corrected at once after "Wait"
    checks: int = 0  # re-verification rounds
    first_answer: int = 0  # the answer the first pass stated
    final: int = 0  # the last stated answer
    kinds: list[str] = field(default_factory=list)  # per line: step, slip, fix, doubt, so_far, stated, check

    @property
    def thinking(self) -> str:
        return "\n".join(self.lines)

    def completion(self) -> str:
        return f"{self.thinking}\n</think>\n\nAnswer: {self.final}"


def _slipped(r: int, rng: random.Random) -> int:
    w = r + rng.choice((-2, -1, 1, 2))
    return w if w >= 0 else r + 1


def trace(p: Problem, rng: random.Random, *, slip: float = SLIP, notice: float = NOTICE, loop: float = LOOP,
          verify: Sequence[float] = VERIFY) -> Trace:
    """A worked solution of ``p`` with the planted phenomena (see the module docstring)."""
    lines: list[str] = []
    kinds: list[str] = []
    t, slips, noticed = p.start, 0, 0

    def add(line: str, kind: str) -> None:
        lines.append(line)
        kinds.append(kind)

    for i, (s, x) in enumerate(p.ops):
        r = t + x if s == "+" else t - x
        if rng.random() < slip:
            slips += 1
            w = _slipped(r, rng)
            add(f"{t} {s} {x} = {w}", "slip")
            if rng.random() < notice:
                noticed += 1
                add(f"Wait, {t} {s} {x} = {r}", "fix")
                t = r
            else:
                for _ in range(rng.randint(3, 5) if rng.random() < loop else rng.randint(1, 2)):
                    add(f"Hmm, {t} {s} {x} = {w}", "doubt")
                t = w
        else:
            add(f"{t} {s} {x} = {r}", "step")
            t = r
        if (i + 1) % SO_FAR_EVERY == 0 and i + 1 < len(p.ops):
            add(f"So far {t}.", "so_far")
    add(f"So the answer is {t}.", "stated")
    first = t
    u, rounds = rng.random(), 0
    for k, w in enumerate(verify):
        if u < w:
            rounds = k
            break
        u -= w
    else:
        rounds = len(verify) - 1
    for _ in range(rounds):
        add("Wait, let me check: " + ", ".join(map(str, p.totals())) + ".", "check")
        t = p.answer
        add(f"So the answer is {t}.", "stated")
    return Trace(p, lines, slips=slips, noticed=noticed, checks=rounds, first_answer=first, final=t, kinds=kinds)


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


def mixed_problem(rng: random.Random, steps: tuple[int, int] = MIX_STEPS, max_operand: int = DEFAULT_MAX_OPERAND) -> Problem:
    """A problem of a uniformly drawn length in ``steps`` (inclusive)."""
    return make_problem(rng, rng.randint(*steps), max_operand)


def problems(n: int, seed: int, steps: int | None = DEFAULT_STEPS, max_operand: int = DEFAULT_MAX_OPERAND) -> list[Problem]:
    """``n`` problems, a pure function of the arguments; ``steps=None``: the mixed-difficulty range."""
    rng = random.Random(f"arith:{seed}:{steps}:{max_operand}")
    if steps is None:
        return [mixed_problem(rng, MIX_STEPS, max_operand) for _ in range(n)]
    return [make_problem(rng, steps, max_operand) for _ in range(n)]


def held_out(n: int, steps: int | None = DEFAULT_STEPS, max_operand: int = DEFAULT_MAX_OPERAND) -> list[Problem]:
    """Evaluation problems; training never draws from this seed, and duplicates of training chains are rare."""
    return problems(n, seed=-1, steps=steps, max_operand=max_operand)


def extract_answer(text: str) -> str | None:
    """The number after the last ``Answer:``, or ``None``."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


# --- a process reward for the testbed (a stand-in for a PRM) --------------------------------------------------


def parse_question(question: str) -> Problem | None:
    """The problem a ``Compute a + b - c.`` question states, or None."""
    m = re.search(r"Compute (\d+((?: [+-] \d+)+))\.", question)
    if not m:
        return None
    parts = m.group(1).split(" ")
    return Problem(int(parts[0]), tuple((parts[i], int(parts[i + 1])) for i in range(1, len(parts), 2)))


def step_checker(noise: float = 0.1, seed: int = 0):
    """A process reward: the share of the thinking's steps a checker judges right, where the checker is right
    about each step with probability ``1 - noise`` (deterministic per completion and step).

    A step (a line ``a op b = c``; a "Wait, ..." correction replaces the line before it, "Hmm" doubts are not
    steps) is right when it is the question's next operation (the right operator and operand), starts from the
    previous step's result (the question's first number for the first step), and its arithmetic is right: what a
    step-level verifier of this task checks. Steps after the last one the question has, and missing steps, count
    as wrong. A completion without a stated or final answer scores 0.

    Use as CarBoN's or Best-of-N's reward: ``reward=tts_plugins.models.arith:step_reward`` (noise 0.1), or
    build your own noise level: ``step_checker(0.3)``. Called as ``fn(prompt, completion) -> float``."""
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise!r}")

    def reward(prompt: str, completion: str) -> float:
        import zlib

        problem = parse_question(prompt)
        if problem is None or extract_answer(completion) is None and not STATED_RE.search(completion):
            return 0.0
        steps: list[tuple[int, str, int, int]] = []
        for line in completion.split("</think>")[0].split("\n"):
            mm = STEP_RE.match(line.strip())
            if not mm or mm.group(1) == "Hmm":
                continue
            step = (int(mm.group(2)), mm.group(3), int(mm.group(4)), int(mm.group(5)))
            if mm.group(1) == "Wait" and steps:
                steps[-1] = step  # a correction replaces the line it corrects
            else:
                steps.append(step)
        judged, prev = [], problem.start
        for i in range(max(len(steps), len(problem.ops))):
            if i < len(steps) and i < len(problem.ops):
                a, s, b, r = steps[i]
                right = (s, b) == problem.ops[i] and a == prev and r == (a + b if s == "+" else a - b)
                prev = r
            else:
                right = False
            flip = random.Random(zlib.crc32(f"{seed}:{i}:{completion}".encode())).random() < noise
            judged.append(right != flip)
        return sum(judged) / len(judged)

    return reward


step_reward = step_checker(0.1)


# --- premises, measured on a model's own output ---------------------------------------------------------


def analyze(question: str, text: str) -> dict:
    """What a completion did: its first-pass slips, how many were corrected after "Wait", the answers it stated
    (in order), whether a later check changed the stated answer, and the final answer."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    signs = re.findall(r"[+-]", question)
    ops = list(zip(signs, nums[1:]))
    thinking = text.split("</think>")[0]
    out = {"slips": 0, "fixed": 0, "doubts": 0, "stated": [], "check_changed": 0, "check_fixed": 0}
    prev_wrong = False
    for line in thinking.split("\n"):
        m = STEP_RE.match(line.strip())
        if m:
            tag, a, s, b, r = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            right = (a + b if s == "+" else a - b) == r
            if tag == "Wait":
                out["fixed"] += prev_wrong and right
            elif tag == "Hmm":
                out["doubts"] += 1
            elif not right:
                out["slips"] += 1
            prev_wrong = not right if tag is None else prev_wrong and not right
            continue
        st = STATED_RE.search(line)
        if st:
            out["stated"].append(st.group(1))
    out["answer"] = extract_answer(text)
    try:
        correct = str(Problem(nums[0], tuple(ops)).answer) if ops else None
    except (IndexError, ValueError):
        correct = None
    stated = out["stated"]
    out["check_changed"] = sum(a != b for a, b in zip(stated, stated[1:]))
    out["check_fixed"] = sum(a != b and b == correct for a, b in zip(stated, stated[1:]))
    out["converged_early"] = any(a == b for a, b in zip(stated, stated[1:]))  # the answer reached, then re-verified
    return out


def premises(rows: Iterable[dict]) -> dict:
    """Premise measurements over a model's samples. ``rows``: ``{"id", "question", "answer", "text", "tokens",
    "difficulty"?}``, several samples per id.

    * ``length_correct_corr``: the mean, over questions with both right and wrong samples, of the point-biserial
      correlation between a sample's length and its correctness (negative: shorter chains are more often right);
      ``short_right``/``long_right``: accuracy of each question's shorter/longer half of samples.
    * ``wait_fix_rate``: of the first-pass slips, the share corrected at once after "Wait".
    * ``check_fix_rate``: of the stated answers a later check changed, the share changed to the right answer.
    * ``converged_before_end``: share of samples that state the same answer at least twice (re-verification
      after the answer is reached, the overthinking trimming targets).
    """
    from tts_plugins.client.stats import point_biserial

    by_q: dict[str, list[dict]] = {}
    for r in rows:
        by_q.setdefault(str(r["id"]), []).append(r)
    corrs, short, long_ = [], [], []
    slips = fixed = changed = changed_right = converged = total = 0
    for samples in by_q.values():
        ok = [extract_answer(s["text"]) == str(s["answer"]) for s in samples]
        lens = [s["tokens"] for s in samples]
        for s in samples:
            a = analyze(s["question"], s["text"])
            slips += a["slips"]
            fixed += a["fixed"]
            changed += a["check_changed"]
            changed_right += a["check_fixed"]
            converged += a["converged_early"]
            total += 1
        order = sorted(range(len(samples)), key=lambda i: (lens[i], i))
        half = len(order) // 2
        if half:
            short += [ok[i] for i in order[:half]]
            long_ += [ok[i] for i in order[-half:]]
        r = point_biserial(lens, ok)
        if r is not None:
            corrs.append(r)
    div = lambda a, b: a / b if b else float("nan")
    return {"questions": len(by_q), "samples": total, "questions_mixed": len(corrs),
            "length_correct_corr": div(sum(corrs), len(corrs)), "short_right": div(sum(short), len(short)),
            "long_right": div(sum(long_), len(long_)), "slips_per_sample": div(slips, total), "wait_fix_rate": div(fixed, slips),
            "check_changes": changed, "check_fix_rate": div(changed_right, changed), "converged_before_end": div(converged, total)}


__all__ = ["DIFFICULTY", "Problem", "Trace", "analyze", "difficulty", "extract_answer", "held_out", "make_problem", "mixed_problem",
           "premises", "problems", "trace"]
