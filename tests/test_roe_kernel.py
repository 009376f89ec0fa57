"""RoE's Gumbel-top-k routing kernel (engine wiring still to come): invariants and a fixed-seed statistical test."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_plugins.logits_processors.roe import gumbel, mask_router_logits, noisy_topk, splitmix64, uniform

M64 = (1 << 64) - 1


def splitmix64_py(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=16))
def test_vectorized_hash_matches_the_reference(xs):
    got = splitmix64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [signed(splitmix64_py(x & M64)) for x in xs]


@given(st.integers(0, 2**31), st.integers(0, 10_000), st.integers(0, 60), st.integers(1, 64))
def test_noise_is_a_function_of_seed_position_layer_alone(seed, pos, layer, n):
    """The same (seed, position, layer) gives the same draws whatever the batch around it."""
    alone = uniform(torch.tensor([seed]), torch.tensor([pos]), layer, n)
    batch = uniform(torch.tensor([seed + 1, seed, 7]), torch.tensor([pos, pos, pos + 1]), layer, n)
    assert torch.equal(alone[0], batch[1])
    assert bool(((alone > 0) & (alone < 1)).all())
    assert not torch.equal(batch[0], batch[1])


routers = st.integers(1, 6).flatmap(lambda t: st.integers(2, 12).flatmap(lambda e: st.tuples(
    st.lists(st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=e, max_size=e), min_size=t, max_size=t),
    st.integers(1, e), st.lists(st.floats(0, 5, allow_nan=False), min_size=t, max_size=t), st.integers(0, 2**31))))


@given(routers)
def test_tau_zero_is_the_plain_router_and_experts_are_distinct(case):
    rows, k, taus, seed = case
    r = torch.tensor(rows)
    tau = torch.tensor(taus)
    g = gumbel(torch.full((r.shape[0],), seed), torch.arange(r.shape[0]), 3, r.shape[1])
    w, ids = noisy_topk(r, k, tau, g)
    plain_w, plain_ids = noisy_topk(r, k, torch.zeros_like(tau), g)
    want = torch.topk(r, k, dim=-1).indices
    assert torch.equal(plain_ids, want), "tau = 0 is the model's own top-k"
    zero = tau == 0
    assert torch.equal(ids[zero], want[zero]) and torch.equal(w[zero], plain_w[zero]), "rows with tau 0 are bit-identical"
    for row in ids.tolist():
        assert len(set(row)) == k
    assert torch.allclose(w.sum(-1), torch.ones(r.shape[0]), atol=1e-5)


@settings(max_examples=1, deadline=None, derandomize=True)
@given(st.just(0))
def test_selection_frequencies_are_sampling_without_replacement_from_softmax_r_over_tau(_):
    """Fixed seeds, 200,000 draws: each ordered top-2 pair's frequency is within 0.005 of its Plackett-Luce
    probability under softmax(R / tau) (the standard error is at most 0.0011)."""
    r = torch.tensor([1.0, 0.2, -0.5, 0.7])
    tau = 0.8
    n = 200_000
    g = gumbel(torch.full((n,), 12345), torch.arange(n), 0, 4)
    _, ids = noisy_topk(r.expand(n, 4), 2, torch.full((n,), tau), g)
    p = torch.softmax(r / tau, -1).tolist()
    counts: dict[tuple[int, int], int] = {}
    for a, b in ids.tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    worst = 0.0
    for a, b in itertools.permutations(range(4), 2):
        want = p[a] * p[b] / (1 - p[a])
        worst = max(worst, abs(counts.get((a, b), 0) / n - want))
    assert worst < 0.005, worst
    assert math.isclose(sum(counts.values()), n)


@given(routers)
def test_masked_logits_make_the_engines_own_router_choose_the_noisy_experts_with_clean_weights(case):
    """What an engine does with the masked logits (softmax, top-k, renormalize) selects the noisy experts and weighs
    them as the clean router would; rows with tau 0 are the input itself."""
    rows, k, taus, seed = case
    r = torch.tensor(rows)
    tau = torch.tensor(taus)
    g = gumbel(torch.full((r.shape[0],), seed), torch.arange(r.shape[0]), 1, r.shape[1])
    masked = mask_router_logits(r, k, tau, g)
    zero = tau == 0
    assert torch.equal(masked[zero], r[zero])
    want_w, want_ids = noisy_topk(r, k, tau, g)
    # a router as vLLM's CPU one: top-k of the logits, then softmax over the chosen (renormalized)
    top, got_ids = torch.topk(masked, k, -1)
    got_w = torch.softmax(top, -1)
    assert torch.equal(got_ids.sort(-1).values, want_ids.sort(-1).values)
    order = want_ids.argsort(-1)
    assert torch.allclose(got_w.gather(1, got_ids.argsort(-1)), want_w.gather(1, order), atol=1e-5)


@settings(deadline=None)
@given(st.integers(1, 8), st.sampled_from([4, 16, 128]), st.integers(0, 2**31), st.data())
def test_one_draw_for_every_layer_masks_as_the_per_layer_reference(t, experts, seed, data):
    """:class:`StepNoise` (every MoE layer's noise in one pass, pre-scaled; or per layer past its budget) masks
    exactly as :func:`mask_router_logits` with each layer's own draws: rows whose tau is 0 (in that layer) are
    returned as they are, the others keep their noisy top-k."""
    import logging

    from tts_plugins.logits_processors import roe
    from tts_plugins.logits_processors.roe import RoEModel, StepNoise

    layers = data.draw(st.lists(st.integers(0, 60), min_size=1, max_size=4, unique=True))
    k = data.draw(st.integers(1, min(8, experts)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    gen = torch.Generator().manual_seed(seed)
    ordinal = data.draw(st.sampled_from([{layer: i for i, layer in enumerate(layers)}, None]))
    model = RoEModel(ordinal, logging.getLogger("test"))
    tau = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0.0, 0.05, 0.5, 3.0]), min_size=model.width, max_size=model.width),
                                          min_size=t, max_size=t)))
    seeds = torch.randint(0, 2**40, (t,), generator=gen)
    pos = torch.randint(0, 5000, (t,), generator=gen)
    budget = data.draw(st.sampled_from([0, roe.STEP_NOISE_BUDGET]))
    old, roe.STEP_NOISE_BUDGET = roe.STEP_NOISE_BUDGET, budget
    try:
        step = StepNoise(model, seeds, pos, tau)
        for layer in layers:
            r = torch.randn(t, experts, generator=gen).to(dtype)
            col = model.column(layer)
            want = mask_router_logits(r, k, tau[:, col], gumbel(seeds, pos, layer, experts))
            got = step.mask(r, k, layer)
            assert torch.equal(got, want)
            assert torch.equal(got[tau[:, col] == 0], r[tau[:, col] == 0])
    finally:
        roe.STEP_NOISE_BUDGET = old


@given(st.lists(st.integers(0, 100), min_size=1, max_size=5), st.integers(0, 2**31), st.integers(1, 40))
def test_noise_for_many_layers_is_each_layers_noise(layers, seed, n):
    seeds, pos = torch.tensor([seed, seed + 1]), torch.tensor([3, 9])
    many = uniform(seeds, pos, torch.tensor(layers), n)
    for i, layer in enumerate(layers):
        assert torch.equal(many[i], uniform(seeds, pos, layer, n))
