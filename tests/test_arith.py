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
    text = p.completion(rechecks=2)
    assert text.endswith(f"</think>\n\nAnswer: {t}") and text.count(f"Wait, {p.steps()[-1]}\n") == 2
    assert arith.extract_answer(text) == str(t)
    cut = p.cut_completion(len(p.steps()[0]) // 2)
    assert cut.startswith(p.steps()[0][: len(p.steps()[0]) // 2] + "\n</think>") and arith.extract_answer(cut) == str(t)
    assert arith.extract_answer(p.no_think_completion()) == str(t)


def test_problem_sets_are_pure_functions_of_their_arguments():
    assert arith.problems(50, 3) == arith.problems(50, 3)
    assert arith.problems(50, 3) != arith.problems(50, 4)
    assert arith.held_out(50) == arith.held_out(50) and arith.held_out(20, steps=4)[0] != arith.held_out(20)[0]
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
