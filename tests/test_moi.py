"""Mixture of Inputs: parameters, the vectorized stash/mixture against the per-row formula, and its laws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tts_plugins.logits_processors.moi import MOI_MAX_TOPK, MoIParams, MoIStash, mixture_weights, moi_reference, topk_distribution
from tts_plugins.manager import build_registry, plugin_manager
from tts_plugins.patching import Patcher, version_in_range

V, D = 40, 8


def _table(seed: int) -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed))


# distinct values: with ties the top-k set itself is ambiguous
logit_rows = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=V, max_size=V, unique=True).map(lambda xs: torch.tensor(xs))


# --- parameters ----------------------------------------------------------------


def test_defaults_follow_the_authors():
    assert MoIParams.parse({"tts_moi_beta": 1.0}) == MoIParams(beta=1.0, topk=20)
    assert MoIParams.parse({}) is None


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"tts_moi_beta": 0}, "tts_moi_beta must be a finite number > 0"),
        ({"tts_moi_beta": -1.0}, "got -1.0"),
        ({"tts_moi_beta": float("nan")}, "tts_moi_beta"),
        ({"tts_moi_beta": float("inf")}, "tts_moi_beta"),
        ({"tts_moi_beta": True}, "got True"),
        ({"tts_moi_beta": "1"}, "got '1'"),
        ({"tts_moi_beta": 1.0, "tts_moi_topk": 0}, "tts_moi_topk must be an int >= 1"),
        ({"tts_moi_beta": 1.0, "tts_moi_topk": MOI_MAX_TOPK + 1}, f"tts_moi_topk must be an int <= {MOI_MAX_TOPK}"),
        ({"tts_moi_beta": 1.0, "tts_moi_topk": 2.5}, "tts_moi_topk"),
        ({"tts_moi_topk": 5}, "tts_moi_topk needs tts_moi_beta"),
    ],
)
def test_bad_parameters_name_key_and_value(flat, needle):
    with pytest.raises(ValueError, match=None) as err:
        MoIParams.parse(flat)
    assert needle in str(err.value)


def test_registry_owns_the_keys_and_checks_the_engine():
    reg = build_registry(plugin_manager(load_entry_points=False))
    assert reg.key_owner["tts_moi_beta"] == "moi"
    assert reg.parse({"tts_moi_beta": 1.0}) == {}  # not a logits technique: the processor ignores it
    with pytest.raises(ValueError, match="tts_moi_topk"):
        reg.parse({"tts_moi_beta": 1.0, "tts_moi_topk": -3})


def test_an_unsupported_engine_version_is_refused_with_the_reason(monkeypatch):
    import tts_plugins.patching as patching
    from tts_plugins.adapters import vllm_moi

    monkeypatch.setattr(patching, "engine_version", lambda engine: "0.99.1")
    reason = vllm_moi.VllmMoIPatch.supported()
    assert reason is not None and "0.99.1" in reason and vllm_moi.MIN_VERSION in reason
    reg = build_registry(plugin_manager(load_entry_points=False))
    with pytest.raises(ValueError, match=r"tts_moi_beta=1\.0 is refused: .*vLLM 0\.99\.1"):
        reg.parse({"tts_moi_beta": 1.0}, engine="vllm")
    # installing under that version patches nothing and says so
    patcher = Patcher("vllm")
    vllm_moi.VllmMoIPatch().install(patcher)
    assert patcher.applied == []


def test_patcher_refuses_versions_outside_the_range(monkeypatch, caplog):
    import tts_plugins.patching as patching

    monkeypatch.setattr(patching, "engine_version", lambda engine: "9.0.0")
    patcher = Patcher("vllm")
    assert not patcher.replace("math:floor", lambda orig: orig, min_version="1.0", max_version="2.0")
    assert "9.0.0 is outside the versions [1.0, 2.0)" in caplog.text
    assert version_in_range("0.32.0", "0.32.0", "0.33.0") and not version_in_range("0.33.0", "0.32.0", "0.33.0")
    assert version_in_range("0.32.1+cpu", "0.32.0", "0.33.0")


# --- the laws of the mixture -----------------------------------------------------


@given(logit_rows, st.integers(0, V - 1), st.floats(0.01, 100), st.integers(1, 30))
def test_weights_sum_to_one_and_entropy_is_normalized(z, y, beta, k):
    ids, probs, ent = topk_distribution(z.unsqueeze(0), torch.tensor([k]), k)
    assert 0.0 <= float(ent) <= 1.0
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    w_top, w_y = mixture_weights(probs, ent, torch.tensor([beta]))
    assert math.isclose(float(w_top.sum() + w_y), 1.0, rel_tol=1e-5)


@given(logit_rows, st.integers(0, V - 1), st.integers(1, 30))
def test_large_beta_is_plain_decoding(z, y, k):
    table = _table(0)
    mixed = moi_reference(table, z, y, beta=1e9, topk=k)
    torch.testing.assert_close(mixed, table[y].double(), atol=1e-6, rtol=0)


@given(st.integers(0, V - 1), st.floats(0.01, 10))
def test_a_certain_distribution_mixes_nothing(y, beta):
    z = torch.full((V,), -1e4)
    z[y] = 10.0
    table = _table(1)
    torch.testing.assert_close(moi_reference(table, z, y, beta, topk=1), table[y].double())


@settings(deadline=None)
@given(
    st.lists(st.tuples(logit_rows, st.integers(0, V - 1), st.floats(0.05, 20), st.integers(1, 25)), min_size=1, max_size=6),
    st.randoms(use_true_random=False),
)
def test_vectorized_stash_and_mix_equal_the_per_row_formula(rows, rnd):
    """Stash then mix, for requests in shuffled slots, equals ``w @ E`` computed row by row in float64."""
    table = _table(2)
    stash = MoIStash(max_requests=8, kmax=32)
    keys = list(range(len(rows)))
    rnd.shuffle(keys)
    slots = np.array([stash.admit(f"r{k}", MoIParams(beta=b, topk=kk)) for k, (_, _, b, kk) in zip(keys, rows)], np.int64)
    logits = torch.stack([r[0] for r in rows])
    sampled = torch.tensor([r[1] for r in rows])
    stash.stash(slots, logits, sampled, np.arange(len(rows)))
    got = stash.mix(slots, lambda ids: table[ids])
    for i, (z, y, b, k) in enumerate(rows):
        torch.testing.assert_close(got[i].double(), moi_reference(table, z, y, b, k), atol=1e-4, rtol=1e-4)


@settings(deadline=None)
@given(st.lists(st.tuples(logit_rows, st.integers(0, V - 1)), min_size=2, max_size=5), st.permutations(range(5)))
def test_mixing_is_batch_order_equivariant(rows, perm):
    perm = [p for p in perm if p < len(rows)]
    table = _table(3)
    stash = MoIStash(max_requests=8, kmax=32)
    slots = np.array([stash.admit(i, MoIParams(beta=1.0, topk=4 + i)) for i in range(len(rows))], np.int64)
    stash.stash(slots, torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), np.zeros(len(rows), np.int64))
    straight = stash.mix(slots, lambda ids: table[ids])
    permuted = stash.mix(slots[perm], lambda ids: table[ids])
    torch.testing.assert_close(permuted, straight[perm])


def test_a_reused_slot_forgets_the_previous_request():
    """A slot reused by a request with a smaller k must not mix the old request's columns."""
    table = _table(4)
    stash = MoIStash(max_requests=1, kmax=32)
    z = torch.randn(V, generator=torch.Generator().manual_seed(5))
    slot = stash.admit("a", MoIParams(beta=1.0, topk=30))
    stash.stash(np.array([slot]), z.unsqueeze(0), torch.tensor([3]), np.array([7]))
    stash.release("a")
    slot = stash.admit("b", MoIParams(beta=1.0, topk=3))
    assert stash.pos[slot] == -1
    stash.stash(np.array([slot]), z.unsqueeze(0), torch.tensor([3]), np.array([7]))
    torch.testing.assert_close(stash.mix(np.array([slot]), lambda ids: table[ids])[0].double(), moi_reference(table, z, 3, 1.0, 3),
                               atol=1e-5, rtol=1e-5)


def test_memory_is_o_k_per_request_and_nothing_is_allocated_until_used():
    stash = MoIStash(max_requests=64)
    assert not hasattr(stash, "ids")  # an engine where nobody opts in holds no buffers
    assert stash.bytes_per_request() < 4096
    stash.admit("x", MoIParams())
    assert stash.ids.numel() == 64 * MOI_MAX_TOPK
    with pytest.raises(RuntimeError, match="more than 1 requests"):
        one = MoIStash(max_requests=1)
        one.admit("a", MoIParams())
        one.admit("b", MoIParams())


@given(logit_rows, st.integers(0, V - 1), st.floats(0.05, 20))
def test_greedy_authors_form_agrees_when_the_sample_is_in_the_top_k(z, y, beta):
    """The authors' code: ``H * sum((p + beta*y) / (1+beta)) E + (1 - H) E_y`` over the top-k; same as ours when y is in it."""
    k = 20
    vals, ids = z.double().topk(k)
    assume(y in ids.tolist())
    p = torch.softmax(vals, -1)
    h = float(-(p * p.log()).sum() / math.log(k))
    table = _table(6).double()
    mask = (ids == y).double()
    authors = h * (((p + beta * mask) / (1 + beta)).unsqueeze(1) * table[ids]).sum(0) + (1 - h) * table[y]
    torch.testing.assert_close(moi_reference(table, z, y, beta, k), authors, atol=1e-9, rtol=1e-9)


def test_stash_before_sampling_reads_the_rows_without_copying_them():
    """The engines stash the distribution of the rows they sample from (before the sampler edits them), and the
    sampled ids after: the same mixture as stashing copied rows."""
    table = _table(6)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, V, generator=gen)
    a, b = MoIStash(max_requests=4, kmax=32), MoIStash(max_requests=4, kmax=32)
    rows = np.array([4, 1], np.int64)
    sa = np.array([a.admit(i, MoIParams(beta=0.7, topk=5 + i)) for i in range(2)], np.int64)
    sb = np.array([b.admit(i, MoIParams(beta=0.7, topk=5 + i)) for i in range(2)], np.int64)
    sampled = torch.tensor([3, 9])
    index = a.stash_distribution(sa, logits, rows)
    assert torch.equal(index, torch.from_numpy(rows))
    assert (a.pos[sa] == -1).all()  # nothing is mixed before the sample is known
    a.stash_sampled(sa, sampled, np.array([5, 6]))
    b.stash(sb, logits[rows], sampled, np.array([5, 6]))
    torch.testing.assert_close(a.mix(sa, lambda ids: table[ids]), b.mix(sb, lambda ids: table[ids]))
