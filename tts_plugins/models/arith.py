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
the module's constants, and :func:`premises` measures them on any model's output).
Every number a trace writes is computed by :func:`compute`, one noisy step at a
time; the generator never reads the problem's answer:

* **Mixed difficulty**: 2 to 12 steps (``difficulty``: easy 2-4, medium 5-8,
  hard 9-12); longer chains carry larger running totals.
* **Slips, re-checked after "Wait" or not**: any computation is off by 1 or 2
  with probability ``SLIP``. A slip is re-checked at once (``NOTICE``), one to
  three steps later or after the answer was first stated (``NOTICE_LATE``), or
  never, when it is doubted without being fixed (``Hmm, ...`` repeats the wrong
  line, once or twice; now and then a loop of several) and carries on. A
  re-check (``Wait, a - b = c``) is a fresh computation with its own slips; when
  it disagrees, the step is computed a third time and that value stands; when
  the value changed, the steps after it are computed again. A right step is
  re-checked now and then too (``CONFIRM``). So a chain that went wrong hesitates
  and runs longer, and "Wait" often, not always, repairs it.
* **Intermediate results**: ``So far N.`` every third step, and ``So the answer is
  N.`` when the chain ends.
* **Re-verification after the answer** (the overthinking thought trimming
  targets, and where s1's "Wait" lands): 0 to 2 rounds of ``Wait, let me check:
  t1, t2, ...``, the whole chain computed again with its own slips. Where it
  disagrees with the chain, the first disputed step is computed again and the
  chain follows that value; then ``So the answer is N.``. Verification is
  independent of whether the chain went wrong: most checks only confirm, and a
  check can spoil a right answer.

What training shows after a technique's forced text comes from the text alone:
after a cut (a cap's ``"\\n</think>"``), the total the partial chain last wrote
(:func:`supported_answer`); after NoThinking's prefill, an answer worked out
without writing a step (:func:`mental_answer`, ``MENTAL_SLIP`` per step).

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
CHECK = "Wait, let me check: "
TOTAL_RE = re.compile(r"^(?:So far|So the answer is|Wait, let me check:) (?:-?\d+, )*(-?\d+)\.$")

# Trace phenomena (rates in the training traces)
SLIP = 0.07  # any computation in a trace is off by 1 or 2
NOTICE = 0.35  # a slip is re-checked at once ("Wait, a - b = c", a fresh computation)
NOTICE_LATE = 0.15  # a slip is re-checked one to three steps later, or after the answer was first stated
CONFIRM = 0.03  # a right step is re-checked anyway
LOOP = 0.15  # an unnoticed slip's doubt becomes a loop (3 to 5 "Hmm" lines)
MENTAL_SLIP = 0.2  # per step, for the answer worked out without thinking (after NoThinking's prefill)
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

    def cut_completion(self, chars: int, thinking: str | None = None) -> str:
        """The thinking (default: the clean chain) cut after ``chars`` characters, closed as a thinking cap closes
        it (``"\\n</think>"``), then the answer that text supports (:func:`supported_answer`): the last total it
        wrote, right or wrong, never the problem's answer."""
        cut = (self.thinking() if thinking is None else thinking)[:chars]
        return f"{cut}\n</think>\n\nAnswer: {supported_answer(self, cut)}"

    def no_think_completion(self, rng: random.Random, text: str = "Okay, I think I have finished thinking.") -> str:
        """NoThinking's prefill, then an answer worked out without writing a step (:func:`mental_answer`)."""
        return f"{text}\n</think>\n\nAnswer: {mental_answer(self, rng)}"

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
    slips: int = 0  # step lines written wrong (first pass, rewritten steps)
    noticed: int = 0  # slips re-checked after "Wait" (at once or late; the re-check may itself slip)
    checks: int = 0  # re-verification rounds
    first_answer: int = 0  # the answer the first pass stated
    final: int = 0  # the last stated answer
    kinds: list[str] = field(default_factory=list)  # per line: step, slip, fix, doubt, so_far, stated, check, redo
    values: list[int] = field(default_factory=list)  # per line: the total it states (for a check: its last total)

    @property
    def thinking(self) -> str:
        return "\n".join(self.lines)

    def completion(self) -> str:
        return f"{self.thinking}\n</think>\n\nAnswer: {self.final}"


def _slipped(r: int, rng: random.Random) -> int:
    w = r + rng.choice((-2, -1, 1, 2))
    return w if w >= 0 else r + 1


def compute(a: int, sign: str, x: int, rng: random.Random, slip: float = SLIP) -> int:
    """One step, as the traces' writer computes it: right, or with probability ``slip`` off by 1 or 2. Every
    computation in a trace (first pass, re-checks, recomputations of a disputed step) is an independent call."""
    r = a + x if sign == "+" else a - x
    return _slipped(r, rng) if rng.random() < slip else r


def mental_answer(p: Problem, rng: random.Random, slip: float = MENTAL_SLIP) -> int:
    """The answer worked out without writing a step (what follows NoThinking's prefill in training): every step
    computed in the head, at a higher slip rate. A function of the question and the draw, never of the answer."""
    t = p.start
    for s, x in p.ops:
        t = compute(t, s, x, rng, slip)
    return t


def supported_answer(p: Problem, thinking: str) -> int:
    """The answer a (possibly cut) thinking text supports: the total on its last whole line (a step's result as
    written, "So far N.", "So the answer is N.", the last total of a check), or the question's first number when
    there is none. Read from the text alone, as a model reads it after a cap closes the thinking."""
    value = p.start
    for line in thinking.split("\n"):
        m = STEP_RE.match(line.strip()) or TOTAL_RE.match(line.strip())
        if m:
            value = int(m.group(m.lastindex))
    return value


def trace(p: Problem, rng: random.Random, *, slip: float = SLIP, notice: float = NOTICE, late: float = NOTICE_LATE, confirm: float = CONFIRM,
          loop: float = LOOP, verify: Sequence[float] = VERIFY) -> Trace:
    """A worked solution of ``p`` with the planted phenomena (see the module docstring).

    Every number in it comes from :func:`compute`: a re-check ("Wait, a - b = c"), a check after the answer
    ("Wait, let me check: t1, t2, ...") and the recomputation that settles a disagreement each slip on their own.
    The trace never reads ``p.answer``."""
    lines: list[str] = []
    kinds: list[str] = []
    values: list[int] = []
    state = {"slips": 0, "noticed": 0}

    def add(line: str, kind: str, value: int) -> None:
        lines.append(line)
        kinds.append(kind)
        values.append(value)

    def step(a: int, s: str, x: int, kind: str = "step") -> int:
        v = compute(a, s, x, rng, slip)
        wrong = v != (a + x if s == "+" else a - x)
        state["slips"] += wrong
        add(f"{a} {s} {x} = {v}", "slip" if wrong else kind, v)
        return v

    def recheck(a: int, s: str, x: int, v: int) -> int:
        """"Wait, a op b = r": a fresh computation; when it disagrees with ``v``, the step is computed once more and
        that third computation stands (it sides with one of the two, or with neither)."""
        r = compute(a, s, x, rng, slip)
        add(f"Wait, {a} {s} {x} = {r}", "fix", r)
        if r == v:
            return v
        r3 = compute(a, s, x, rng, slip)
        add(f"Wait, {a} {s} {x} = {r3}", "fix", r3)
        return r3

    totals: list[int] = []  # the chain's running totals as it stands (after corrections)

    def redo(i: int, value: int) -> int:
        """The steps done so far after step ``i`` computed again, after step ``i``'s value changed to ``value``."""
        done = len(totals)
        del totals[i:]
        totals.append(value)
        t = value
        for s, x in p.ops[i + 1:done]:
            t = step(t, s, x, "redo")
            totals.append(t)
        return t

    pending: list[int] | None = None  # a slip to be noticed late: [step index, lines to go]
    t = p.start
    for i, (s, x) in enumerate(p.ops):
        a = t
        v = step(a, s, x)
        wrong = kinds[-1] == "slip"
        if wrong:
            u = rng.random()
            if u < notice:
                state["noticed"] += 1
                v = recheck(a, s, x, v)
            elif u < notice + late and pending is None:
                pending = [i, rng.randint(1, 3)]
            else:
                for _ in range(rng.randint(3, 5) if rng.random() < loop else rng.randint(1, 2)):
                    add(f"Hmm, {a} {s} {x} = {v}", "doubt", v)
        elif rng.random() < confirm:
            v = recheck(a, s, x, v)
        totals.append(v)
        t = v
        if pending is not None and i > pending[0]:
            pending[1] -= 1
            if pending[1] == 0:
                t = _late_notice(p, pending[0], totals, recheck, redo, state)
                pending = None
        if (i + 1) % SO_FAR_EVERY == 0 and i + 1 < len(p.ops):
            add(f"So far {t}.", "so_far", t)
    add(f"So the answer is {t}.", "stated", t)
    first = t
    if pending is not None:  # noticed only after the answer was stated
        t = _late_notice(p, pending[0], totals, recheck, redo, state)
        add(f"So the answer is {t}.", "stated", t)
    u, rounds = rng.random(), 0
    for k, w in enumerate(verify):
        if u < w:
            rounds = k
            break
        u -= w
    else:
        rounds = len(verify) - 1
    for _ in range(rounds):
        c, a = [], p.start
        for s, x in p.ops:
            a = compute(a, s, x, rng, slip)
            c.append(a)
        add("Wait, let me check: " + ", ".join(map(str, c)) + ".", "check", c[-1])
        j = next((k for k in range(len(c)) if c[k] != totals[k]), None)
        if j is not None:  # the check disagrees at step j: compute that step once more, and go with what it says
            prev = p.start if j == 0 else totals[j - 1]
            s, x = p.ops[j]
            r3 = compute(prev, s, x, rng, slip)
            add(f"Wait, {prev} {s} {x} = {r3}", "fix", r3)
            if r3 == c[j]:  # the check was right here: its chain stands, written out from the disputed step
                del totals[j:]
                totals.append(r3)
                for k in range(j + 1, len(c)):
                    s2, x2 = p.ops[k]
                    wrong = c[k] != (c[k - 1] + x2 if s2 == "+" else c[k - 1] - x2)
                    state["slips"] += wrong
                    add(f"{c[k - 1]} {s2} {x2} = {c[k]}", "slip" if wrong else "redo", c[k])
                    totals.append(c[k])
                t = c[-1]
            elif r3 != totals[j]:  # a third value: the chain goes on from it
                t = redo(j, r3)
        add(f"So the answer is {t}.", "stated", t)
    return Trace(p, lines, slips=state["slips"], noticed=state["noticed"], checks=rounds, first_answer=first, final=t, kinds=kinds,
                 values=values)


def _late_notice(p: Problem, i: int, totals: list[int], recheck, redo, state: dict) -> int:
    """A slip at step ``i`` noticed some lines later: the step is re-checked and, when its value changes, the chain
    is rewritten from there. Returns the chain's new total."""
    state["noticed"] += 1
    a = p.start if i == 0 else totals[i - 1]
    s, x = p.ops[i]
    v = recheck(a, s, x, totals[i])
    if v == totals[i]:
        return totals[-1]
    return redo(i, v)


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
        chain = Chain()
        for line in completion.split("</think>")[0].split("\n"):
            mm = STEP_RE.match(line.strip())
            totals = None if mm else check_totals(line.strip())
            if totals is not None:
                chain.check(totals)
            if not mm or mm.group(1) == "Hmm":
                continue
            step = (int(mm.group(2)), mm.group(3), int(mm.group(4)), int(mm.group(5)))
            if mm.group(1) == "Wait":
                chain.correct(step)
            else:
                chain.add(step)
        steps = chain.steps
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


def check_totals(line: str) -> list[int] | None:
    """The totals of a check line (``Wait, let me check: 12, 9, 17.``), or None for any other line."""
    if not line.startswith(CHECK) or not TOTAL_RE.match(line):
        return None
    return [int(x) for x in re.findall(r"-?\d+", line[len(CHECK):])]


class Chain:
    """The chain a thinking text writes, as corrected: a step line ``a op b = c`` appends; ``Wait, a op b = c``
    replaces a step with the same ``a op b`` (else the last step); a step line that then goes on from the
    corrected value, with the operation after it, rewrites the steps after it (a redo). Of several steps with the same
    ``a op b``, the correction replaces the step the line before corrected (a step re-checked twice), else the one a
    check line just disputed, else the latest whose value it changes.
    Steps are tuples that start ``(a, op, b, c)``."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self._corrected: int | None = None
        self._disputed: int | None = None
        self._fixed: int | None = None  # the step the last line corrected, while corrections follow one another

    def check(self, totals: list[int]) -> None:
        """A check line (``Wait, let me check: t1, t2, ...``): the first step whose total it disputes is the one the
        next correction of that ``a op b`` means (a chain may hold the same ``a op b`` twice)."""
        self._fixed = None
        self._disputed = next((k for k, (t, step) in enumerate(zip(totals, self.steps)) if t != step[3]), None)

    def correct(self, step: tuple) -> tuple | None:
        """Apply a "Wait" line; returns the step it replaced (None when there was none: it is appended)."""
        if not self.steps:
            self.steps.append(step)
            return None
        same = [k for k in range(len(self.steps) - 1, -1, -1) if self.steps[k][:3] == step[:3]]
        disputed, self._disputed = self._disputed, None
        if self._fixed in same:  # "Wait" after "Wait" on the same a op b: the same step, computed once more
            j = self._fixed
        elif disputed in same:  # the step a check just disputed
            j = disputed
        else:  # a correction replaces a value it disagrees with: the latest such step, else the latest with the same a op b
            j = next((k for k in same if self.steps[k][3] != step[3]), same[0] if same else len(self.steps) - 1)
        old, self.steps[j] = self.steps[j], step
        self._corrected = j if j + 1 < len(self.steps) else None
        self._fixed = j
        return old

    def add(self, step: tuple) -> None:
        j, self._corrected, self._disputed, self._fixed = self._corrected, None, None, None
        if j is not None and step[0] == self.steps[j][3] and step[1:3] == self.steps[j + 1][1:3]:
            del self.steps[j + 1:]
        self.steps.append(step)


# --- premises, measured on a model's own output ---------------------------------------------------------


def analyze(question: str, text: str) -> dict:
    """What a completion did: its wrong step lines (slips), how many of them a "Wait" re-check corrected, its
    doubts, the answers it stated (in order), whether a later check changed the stated answer, and the final
    answer."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    signs = re.findall(r"[+-]", question)
    ops = list(zip(signs, nums[1:]))
    thinking = text.split("</think>")[0]
    out = {"slips": 0, "fixed": 0, "doubts": 0, "stated": [], "check_changed": 0, "check_fixed": 0}
    chain = Chain()
    for line in thinking.split("\n"):
        m = STEP_RE.match(line.strip())
        if m:
            tag, a, s, b, r = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            right = (a + b if s == "+" else a - b) == r
            if tag == "Hmm":
                out["doubts"] += 1
            elif tag == "Wait":
                old = chain.correct((a, s, b, r, right))
                out["fixed"] += right and old is not None and not old[4]
            else:
                out["slips"] += not right
                chain.add((a, s, b, r, right))
            continue
        totals = check_totals(line.strip())
        if totals is not None:
            chain.check(totals)
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
