"""The synthetic task and the trained model's recipe: checkable answers, a tokenizer that spells numbers one
digit at a time, a prompt equal to the chat template's, and training that is a pure function of its seed."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from hypothesis import given
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
    cut = p.cut_completion(len(p.steps()[0]) // 2)
    assert cut.startswith(p.steps()[0][: len(p.steps()[0]) // 2] + "\n</think>") and arith.extract_answer(cut) == str(t)
    assert arith.extract_answer(p.no_think_completion()) == str(t)


@given(seed=st.integers(0, 2**32), slip=st.sampled_from([0.0, 0.3, 1.0]), notice=st.sampled_from([0.0, 0.5, 1.0]))
def test_traces_plant_slips_corrections_and_checks_as_documented(seed, slip, notice):
    rng = random.Random(seed)
    p = arith.mixed_problem(rng)
    tr = arith.trace(p, rng, slip=slip, notice=notice)
    assert 2 <= len(p.ops) <= 12 and p.difficulty == arith.difficulty(len(p.ops))
    assert p.difficulty == ("easy" if len(p.ops) <= 4 else "medium" if len(p.ops) <= 8 else "hard")  # labels match step counts
    assert len(tr.lines) == len(tr.kinds)
    t, step = p.start, 0
    for line, kind in zip(tr.lines, tr.kinds):
        m = arith.STEP_RE.match(line)
        if kind in ("step", "slip"):
            s, x = p.ops[step]
            a, sign, b, r = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            assert (a, sign, b) == (t, s, x)  # every line continues from the chain's current value
            right = t + x if s == "+" else t - x
            assert (r == right) == (kind == "step") and abs(r - right) <= 2
            t, step = r, step + 1
        elif kind == "fix":  # a correction really corrects: the same operation, the right value, and the chain goes on from it
            s, x = p.ops[step - 1]
            a, b, r = int(m.group(2)), int(m.group(4)), int(m.group(5))
            assert m.group(1) == "Wait" and b == x and r == (a + x if s == "+" else a - x)
            t = r
        elif kind == "doubt":
            assert m.group(1) == "Hmm" and int(m.group(5)) == t  # a doubt repeats the wrong value
        elif kind == "so_far":
            assert line == f"So far {t}."
        elif kind == "check":  # a check recomputes every running total correctly
            assert line == "Wait, let me check: " + ", ".join(map(str, p.totals())) + "."
            t = p.answer
        elif kind == "stated":
            assert line == f"So the answer is {t}."
    assert step == len(p.ops)
    assert tr.final == t and arith.extract_answer(tr.completion()) == str(tr.final)
    assert tr.slips == tr.kinds.count("slip") and tr.noticed == tr.kinds.count("fix") and tr.checks == tr.kinds.count("check")
    assert (tr.final == p.answer) or (tr.slips > tr.noticed and tr.checks == 0)  # only an unnoticed, unchecked slip is wrong
    if slip == 0:
        assert tr.slips == 0 and tr.first_answer == p.answer
    a = arith.analyze(p.question, tr.completion())  # the premise counter reads back what was planted
    assert (a["slips"], a["fixed"], a["answer"]) == (tr.slips, tr.noticed, str(tr.final))


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
