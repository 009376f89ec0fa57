"""The hot path's two-pass row reductions (tts_plugins.reduce) against torch's own."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.reduce import GROUP, argmax_rows, row_max, topk_rows


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 200), st.integers(0, 2**31), st.data())
def test_two_pass_topk_is_torch_topk(n, k, extra, seed, data):
    """Exact: the same values as ``torch.topk`` over the rows asked for (any subset, repeats, order), with the ids
    of those values, for a vocabulary that is and is not a multiple of the group width (its last, shorter group)."""
    vocab = 8 * GROUP * k + extra  # large enough for the two passes
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen)
    if data.draw(st.booleans()):  # plant the maximum in the last columns (the shorter group)
        x[:, -1] = 100.0
    rows = data.draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n))
    index = None if rows is None else torch.tensor(rows)
    want_v, want_i = (x if index is None else x[index]).topk(k, -1)
    got_v, got_i = topk_rows(x, k, index)
    assert torch.equal(got_v, want_v)
    assert torch.equal(got_i, want_i)  # distinct values: the ids are determined


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31), st.sampled_from([torch.float32, torch.bfloat16]))
def test_two_pass_topk_with_ties_returns_the_top_values(n, k, seed, dtype):
    """Many equal values (small integers, bf16): the values are torch's, and each id holds its value."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-5, 6, (n, 8 * GROUP * k + 37), generator=gen).to(dtype)
    got_v, got_i = topk_rows(x, k)
    assert torch.equal(got_v, x.topk(k, -1).values)
    assert torch.equal(x.gather(1, got_i), got_v)
    assert all(len(set(r)) == k for r in got_i.tolist())  # k distinct columns




HALF = [torch.bfloat16, torch.float16]
SIGNS = ["both", "negative", "positive", "zeros", "inf"]


def half_rows(n: int, vocab: int, seed: int, dtype: torch.dtype, signs: str, scale: float) -> torch.Tensor:
    """Rows in half precision whose maxima the sign-and-magnitude reading must get right: mixed signs, every value
    negative (the integer minimum is the maximum), every value positive, signed zeros, infinities."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen) * scale
    if signs == "negative":
        x = -x.abs() - 1e-3
    elif signs == "positive":
        x = x.abs()
    elif signs == "zeros":  # -0.0 beside +0.0 and negatives: the maximum is a zero
        x = torch.where(torch.rand(n, vocab, generator=gen) < 0.5, -0.0, -x.abs())
        x[:, ::7] = 0.0
    elif signs == "inf":
        x[:, ::5] = float("-inf")
        x[0] = float("-inf")
        x[-1, 3] = float("inf")
    return x.to(dtype)


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 7), st.integers(1, 8), st.integers(0, 150), st.integers(0, 2**31), st.sampled_from(HALF),
       st.sampled_from(SIGNS), st.sampled_from([1e-3, 1.0, 50.0]), st.data())
def test_half_precision_topk_and_row_max_are_torch_s(n, k, extra, seed, dtype, signs, scale, data):
    """bf16 and fp16 on a CPU reduce their bits as integers: the top-k values (any rows, any signs, signed zeros,
    infinities, all-negative rows and groups) are torch's, each id holds its value, and the row maxima are
    ``amax``'s bit for bit."""
    vocab = 8 * GROUP * k + extra
    x = half_rows(n, vocab, seed, dtype, signs, scale)
    rows = data.draw(st.none() | st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n))
    index = None if rows is None else torch.tensor(rows)
    src = x if index is None else x[index]
    got_v, got_i = topk_rows(x, k, index)
    assert torch.equal(got_v, src.topk(k, -1).values)
    assert torch.equal(src.gather(1, got_i), got_v)
    got_m, want_m = row_max(x), x.amax(-1, keepdim=True)
    assert torch.equal(got_m, want_m)
    assert torch.equal(got_m.view(torch.int16), want_m.view(torch.int16)) or signs == "zeros"  # zeros: +0 == -0


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 9), st.integers(0, 300), st.integers(0, 2**31), st.sampled_from(["random", "ties", "tail", "inf"]))
def test_two_pass_argmax_is_torch_argmax(n, extra, seed, kind):
    """The first index of the maximum, as torch's, with ties across and inside groups and in the shorter last group."""
    vocab = 4 * GROUP + extra
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen) if kind == "random" else torch.randint(-3, 3, (n, vocab), generator=gen).float()
    if kind == "tail":
        x[:, -1] = x.max() + 1
    if kind == "inf":
        x[0] = float("-inf")
    out = torch.empty(n, dtype=torch.int64)
    assert torch.equal(argmax_rows(x, out), torch.argmax(x, -1))
    assert torch.equal(out, torch.argmax(x, -1))
