"""The synthetic task and the trained model's recipe: checkable answers, a tokenizer that spells numbers one
digit at a time, a prompt equal to the chat template's, and training that is a pure function of its seed."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tts_plugins.models import arith, trained


@given(seed=st.integers(0, 2**32), steps=st.integers(1, 12), top=st.integers(1, 99))
def test_solution_lines_are_true_and_end_at_the_answer(seed, steps, top):
    p = arith.make_problem(random.Random(seed), steps, top)
    assert len(p.ops) == steps and all(1 <= x <= top for _, x in p.ops) and 1 <= p.start <= top
    t = p.start
    for line, (s, x) in zip(p.steps(), p.ops):
        lhs, rhs = line.split(" = ")
        a, sign, b = lhs.split(" ")
        assert (int(a), sign, int(b)) == (t, s, x)
        t = t + x if s == "+" else t - x
        assert int(rhs) == t >= 0
    assert p.answer == t
    assert eval(p.question.removeprefix("Compute ").removesuffix(".")) == p.answer  # the question means what it says
    assert arith.parse_question(p.question) == p
    text = p.completion()
    assert text.endswith(f"So the answer is {t}.\n</think>\n\nAnswer: {t}") and arith.extract_answer(text) == str(t)
    assert arith.extract_answer(p.cut_completion(len(p.thinking()))) == str(t)  # a cut at the very end keeps the stated answer
    cut = p.cut_completion(len(p.steps()[0]))  # after the first step: its total, not the problem's answer
    assert cut.startswith(p.steps()[0] + "\n</think>") and arith.extract_answer(cut) == str(p.totals()[0])
    assert arith.extract_answer(p.cut_completion(2)) == str(p.start)  # no whole line yet: the question's first number


class Sealed(arith.Problem):
    """A problem whose answer cannot be read: what is generated from it never used the answer."""

    @property
    def answer(self):
        raise AssertionError("the generator read the answer")

    def totals(self):
        raise AssertionError("the generator read the running totals")


def _sealed(p: arith.Problem) -> Sealed:
    return Sealed(p.start, p.ops)


@given(seed=st.integers(0, 2**32), slip=st.sampled_from([0.0, 0.07, 0.3]))
def test_no_training_target_reads_the_answer(seed, slip):
    """No oracle: traces, the answer after a cut and the answer after NoThinking's prefill are computed from the
    question and the draw alone, so no label after a forced string can carry what the text could not produce."""
    rng = random.Random(seed)
    p = _sealed(arith.mixed_problem(rng))
    tr = arith.trace(p, rng, slip=slip)
    assert tr.lines and arith.extract_answer(tr.completion()) == str(tr.final)
    arith.mental_answer(p, rng)
    for _ in range(5):
        segments = trained.completion(p, rng)
        assert arith.extract_answer("".join(t for t, _ in segments)) is not None
    arith.supported_answer(p, tr.thinking[: rng.randrange(len(tr.thinking))])


@given(seed=st.integers(0, 2**32), slip=st.sampled_from([0.0, 0.07, 0.3]), notice=st.sampled_from([0.0, 0.35, 1.0]))
def test_traces_are_noisy_computations_that_hold_together(seed, slip, notice):
    rng = random.Random(seed)
    p = arith.mixed_problem(rng)
    tr = arith.trace(p, rng, slip=slip, notice=notice, late=0.0 if notice == 1.0 else 0.3)
    assert len(tr.lines) == len(tr.kinds) == len(tr.values)
    assert 2 <= len(p.ops) <= 12 and p.difficulty == arith.difficulty(len(p.ops))
    assert p.difficulty == ("easy" if len(p.ops) <= 4 else "medium" if len(p.ops) <= 8 else "hard")  # labels match step counts
    ops = set(p.ops)
    written = arith.Chain()
    chain = written.steps
    for line, kind, value in zip(tr.lines, tr.kinds, tr.values):
        m = arith.STEP_RE.match(line)
        if kind in ("step", "slip", "redo", "fix", "doubt"):
            a, s, b, r = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            right = a + b if s == "+" else a - b
            assert (s, b) in ops and abs(r - right) <= 2 and r == value  # every number is a computation, off by at most 2
            assert (r == right) == (kind != "slip") or kind in ("fix", "doubt")
            assert {"fix": "Wait", "doubt": "Hmm"}.get(kind) == m.group(1)
            if kind == "fix":
                # "Wait, a op b = c" where the chain holds a op b twice can mean either step, to any reader: such
                # traces (rare) are left out; the reader's rules (Chain) settle the others as the generator meant
                assume(sum(step[:3] == (a, s, b) for step in chain) <= 1 or written._fixed is not None)
                written.correct((a, s, b, r))
            elif kind != "doubt":
                written.add((a, s, b, r))
                assert a == (chain[-2][3] if len(chain) > 1 else p.start)  # a step goes on from the chain as it stands
        elif kind == "check":  # the whole chain again, each total a computation of the one before
            c = [int(x) for x in line.removeprefix("Wait, let me check: ").rstrip(".").split(", ")]
            assert arith.check_totals(line) == c
            written.check(c)
            prev = p.start
            for (s, b), x in zip(p.ops, c):
                assert abs(x - (prev + b if s == "+" else prev - b)) <= 2
                prev = x
            assert len(c) == len(p.ops) and value == c[-1]
        elif kind in ("so_far", "stated"):
            assert value == (chain[-1][3] if chain else p.start) and str(value) in line
    # the chain as corrected is complete, in the question's order, and ends at the last stated answer
    assert [(s, b) for _, s, b, _ in chain] == list(p.ops) and chain[-1][3] == tr.final
    assert tr.final == tr.values[len(tr.kinds) - 1 - tr.kinds[::-1].index("stated")]
    assert tr.slips == tr.kinds.count("slip") and tr.checks == tr.kinds.count("check")
    if slip == 0:
        assert tr.slips == 0 and tr.first_answer == tr.final == p.answer
    a = arith.analyze(p.question, tr.completion())  # the premise counter reads back what was written
    assert (a["slips"], a["answer"]) == (tr.slips, str(tr.final)) and a["fixed"] <= tr.kinds.count("fix")


@given(seed=st.integers(0, 2**32), frac=st.floats(0, 1))
def test_the_answer_after_a_cut_follows_from_the_chain(seed, frac):
    rng = random.Random(seed)
    p = arith.mixed_problem(rng)
    tr = arith.trace(p, rng, slip=0.2)
    text = tr.thinking
    k = int(frac * len(text))
    cut = text[:k]
    got = arith.supported_answer(p, cut)
    ends = [i for i in range(len(tr.lines)) if len("\n".join(tr.lines[: i + 1])) <= k]
    whole = tr.values[ends[-1]] if ends else p.start
    last = cut.split("\n")[-1]
    if k == len(text) or not last or len(ends) == cut.count("\n") + 1:
        assert got == whole  # the cut is at a line's end: the total that line wrote
    elif arith.STEP_RE.match(last) or arith.TOTAL_RE.match(last):
        assert got == int(re.findall(r"-?\d+", last)[-1])  # a line cut inside its last number reads as what is written
    else:
        assert got == whole
    assert arith.extract_answer(p.cut_completion(k, text)) == str(got)


def test_checks_recompute_with_their_own_slips():
    """A check's errors are independent of the first pass's, and checks change answers to right and to wrong ones."""
    rng = random.Random("checks")
    wrong_given = {True: [0, 0], False: [0, 0]}  # first pass wrong? -> [checks, wrong checks]
    changed = changed_right = late = 0
    for _ in range(5000):
        p = arith.make_problem(rng, 10)  # one length: a longer chain slips more often in both passes
        tr = arith.trace(p, rng, verify=(0.0, 1.0))
        first = [i for i, k in enumerate(tr.kinds) if k == "check"][0]
        c = [int(x) for x in tr.lines[first].removeprefix("Wait, let me check: ").rstrip(".").split(", ")]
        bucket = wrong_given[tr.first_answer != p.answer]
        bucket[0] += 1
        bucket[1] += c != p.totals()
        stated = [v for k, v in zip(tr.kinds, tr.values) if k == "stated"]
        changed += sum(a != b for a, b in zip(stated, stated[1:]))
        changed_right += sum(a != b and b == p.answer for a, b in zip(stated, stated[1:]))
        late += any(k == "fix" for k in tr.kinds[tr.kinds.index("stated"):first])
    rate = {w: b / n for w, (n, b) in wrong_given.items()}
    assert abs(rate[True] - rate[False]) < 0.05, rate  # the check slips as often whether or not the first pass did
    assert 0.3 < changed_right / changed < 0.95, (changed, changed_right)  # "Wait" repairs often, not always
    assert late > 0  # some slips are noticed only after the answer was first stated


def test_nothinking_answers_are_guesses_not_oracles():
    rng = random.Random("mental")
    hard = [arith.make_problem(rng, 12) for _ in range(400)]
    right = sum(arith.mental_answer(p, rng) == p.answer for p in hard) / len(hard)
    assert 0.02 < right < 0.2  # (1 - MENTAL_SLIP) ** 12 = 0.07: a twelve-step chain in the head is mostly wrong
    assert arith.extract_answer(hard[0].no_think_completion(random.Random(1))) is not None


def test_step_reward_scores_the_process():
    p = arith.held_out(1)[0]
    clean = p.completion()
    wrong = clean.replace(p.steps()[1], p.steps()[1].rsplit(" = ", 1)[0] + " = 999")
    exact = arith.step_checker(0.0)
    # the wrong step, and the next one (it does not start from the wrong result the chain stated)
    assert exact(p.question, clean) == 1.0 and exact(p.question, wrong) == pytest.approx(1 - 2 / len(p.ops))
    a, sign, b = p.steps()[0].split(" = ")[0].split(" ")
    other = "-" if sign == "+" else "+"
    misread = clean.replace(p.steps()[0], f"{a} {other} {b} = {int(a) + int(b) if other == '+' else int(a) - int(b)}", 1)
    assert exact(p.question, misread) < 1.0  # right arithmetic on the wrong operation is a wrong step
    corrected = clean.replace(p.steps()[1], p.steps()[1].rsplit(" = ", 1)[0] + " = 999\nWait, " + p.steps()[1], 1)
    assert exact(p.question, corrected) == 1.0  # a correction replaces the line it corrects
    assert exact(p.question, "no answer") == 0.0 and exact("What is 2?", clean) == 0.0
    noisy = arith.step_checker(0.5)
    assert noisy(p.question, clean) == noisy(p.question, clean)  # deterministic per completion
    with pytest.raises(ValueError, match="noise"):
        arith.step_checker(1.5)


def test_premises_measure_length_against_correctness():
    rows = []
    for q in range(5):  # in every question the short samples are right and the long ones wrong
        for i in range(4):
            rows.append({"id": q, "question": "Compute 1 + 1.", "answer": "2", "text": f"x</think>Answer: {2 if i < 2 else 3}", "tokens": 10 + i})
    m = arith.premises(rows)
    assert m["questions_mixed"] == 5 and m["length_correct_corr"] < -0.8 and m["short_right"] == 1.0 and m["long_right"] == 0.0


def test_problem_sets_are_pure_functions_of_their_arguments():
    assert arith.problems(50, 3) == arith.problems(50, 3)
    assert arith.problems(50, 3) != arith.problems(50, 4)
    assert arith.held_out(50) == arith.held_out(50) and arith.held_out(20, steps=4)[0] != arith.held_out(20)[0]
    assert {len(p.ops) for p in arith.held_out(300, steps=None)} == set(range(2, 13))  # the mixed range
    with pytest.raises(ValueError, match="steps"):
        arith.make_problem(random.Random(0), 0)


def test_extract_answer_takes_the_last_answer_line():
    assert arith.extract_answer("12 - 3 = 9\n</think>\n\nAnswer: 9") == "9"
    assert arith.extract_answer("Answer: 3 ... Answer: -4") == "-4"
    assert arith.extract_answer("9 + 8 = 17") is None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return trained.build_tokenizer(tmp_path_factory.mktemp("tok"), seed=0)


def test_tokenizer_spells_digits_singly_and_thinking_markers_as_one_token(tokenizer):
    for n in ("7", "17", "170"):
        assert [tokenizer.decode([i]) for i in tokenizer(n)["input_ids"]] == list(n)
    for special in ("<think>", "</think>", "<|im_end|>"):
        assert len(tokenizer(special)["input_ids"]) == 1, special
    assert len(tokenizer("Wait")["input_ids"]) == 1  # budget forcing splices one token
    p = arith.held_out(1)[0]
    ids = tokenizer(trained.prompt_text(p.question) + p.completion())["input_ids"]
    assert tokenizer.decode(ids) == trained.prompt_text(p.question) + p.completion()


def test_prompt_is_the_chat_templates(tokenizer):
    q = arith.held_out(1)[0].question
    assert tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False) == trained.prompt_text(q)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_training_is_a_pure_function_of_the_seed(tmp_path: Path, variant):
    def digest(out: Path, seed: int) -> str:
        trained.train(variant, out, seed=seed, steps=2, batch=8, progress=False)
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    a, b, c = digest(tmp_path / "a", 0), digest(tmp_path / "b", 0), digest(tmp_path / "c", 1)
    assert a == b
    assert a != c


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="variant must be one of dense, moe, got 'big'"):
        trained.train("big", tmp_path)


def test_only_what_the_model_writes_carries_loss(tokenizer):
    """The prompt and what an engine would force (a cap's end of thinking, NoThinking's prefill) are context, not
    target; everything else the model writes is learned, end-of-turn included."""
    ids, mask, labels = trained._batch(tokenizer, random.Random(0), 200, {})
    learned = labels != -100
    assert (labels[learned] == ids[learned]).all() and not (learned & (mask == 0)).any()
    start, end, eot = (tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>", "<|im_end|>"))
    forced_end = 0
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        toks = ids[row, :n].tolist()
        opened = toks.index(start)
        assert not learned[row, : opened + 2].any()  # the prompt, through "<think>\n"
        assert toks.count(end) == 1 and learned[row, n - 1] and toks[-1] == eot
        closed = toks.index(end)
        forced_end += not learned[row, closed]
        text = tokenizer.decode([t for t, keep in zip(toks, learned[row, :n].tolist()) if keep])
        assert "finished thinking" not in text
    assert 10 <= forced_end <= 40  # about 13% of 200: the cut and the unthought solutions
