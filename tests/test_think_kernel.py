"""The think kernel: vectorized == per-row reference, and the invariants around it."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tts_plugins.logits_processors.think import think_kernel, think_reference_row

V = 17
G = 3
K = 4


@st.composite
def batches(draw):
    rows = draw(st.integers(1, 6))
    slots = rows + 2
    logits = draw(hnp.arrays(np.float32, (rows, V), elements=st.floats(-30, 30, width=32)))
    row_slots = draw(st.permutations(range(slots)))[:rows]
    force = draw(st.lists(st.one_of(st.just(-1), st.integers(0, V - 1)), min_size=slots + 1, max_size=slots + 1))
    gate = draw(st.lists(st.integers(-1, G - 1), min_size=slots + 1, max_size=slots + 1))
    wait = draw(st.lists(st.integers(-1, V - 1), min_size=slots + 1, max_size=slots + 1))
    greedy = draw(st.lists(st.integers(0, 1), min_size=slots + 1, max_size=slots + 1))
    members = [draw(st.lists(st.integers(0, V - 1), min_size=0, max_size=K, unique=True)) for _ in range(G)]
    force[-1] = gate[-1] = wait[-1] = -1  # the neutral slot
    return logits, row_slots, force, gate, wait, greedy, members


def tables(members):
    ids = np.zeros((G, K), dtype=np.int64)
    mass = np.zeros((G, K), dtype=bool)
    for r, s in enumerate(members):
        if s:
            ids[r, : len(s)] = s
            ids[r, len(s) :] = s[0]
            mass[r, : len(s)] = True
    return torch.from_numpy(ids), torch.from_numpy(mass)


def run_kernel(logits, row_slots, force, gate, wait, greedy, members):
    ids, mass = tables(members)
    return think_kernel(
        torch.from_numpy(logits.copy()),
        torch.tensor(row_slots, dtype=torch.int64),
        torch.tensor(force),
        torch.tensor(gate),
        torch.tensor(wait),
        torch.tensor(greedy),
        ids,
        mass,
        do_force=True,
        do_gate=True,
    )


@given(batches())
def test_vectorized_matches_per_row_reference(batch):
    logits, row_slots, force, gate, wait, greedy, members = batch
    out = run_kernel(*batch)
    for r, s in enumerate(row_slots):
        gated = gate[s] >= 0 and bool(members[gate[s]])
        ref = think_reference_row(torch.from_numpy(logits[r]), force[s], members[gate[s]] if gate[s] >= 0 else [], gated, wait[s], bool(greedy[s]))
        torch.testing.assert_close(out[r], ref,
                                   msg=lambda m: f"row {r} slot {s} force={force[s]} gate={gate[s]} wait={wait[s]} greedy={greedy[s]}: {m}")


@given(batches())
def test_rows_without_params_are_bit_identical(batch):
    logits, row_slots, force, gate, wait, greedy, members = batch
    out = run_kernel(*batch)
    for r, s in enumerate(row_slots):
        if force[s] < 0 and (gate[s] < 0 or not members[gate[s]]):
            assert torch.equal(out[r], torch.from_numpy(logits[r])), f"row {r} (slot {s}) is neutral but changed"


@given(batches(), st.data())
def test_batch_permutation_equivariance(batch, data):
    logits, row_slots, force, gate, wait, greedy, members = batch
    perm = data.draw(st.permutations(range(len(row_slots))))
    out = run_kernel(*batch)
    out_p = run_kernel(logits[perm], [row_slots[i] for i in perm], force, gate, wait, greedy, members)
    assert torch.equal(out_p, out[perm])


@given(batches())
def test_claimed_argmax_holds(batch):
    """Forced rows pick the forced token; gated rows never pick a blocked token."""
    logits, row_slots, force, gate, wait, greedy, members = batch
    out = run_kernel(*batch)
    for r, s in enumerate(row_slots):
        if force[s] >= 0:
            assert int(out[r].argmax()) == force[s]
            assert torch.isinf(out[r]).sum() == V - 1
        elif gate[s] >= 0 and members[gate[s]]:
            blocked = set(members[gate[s]]) - ({wait[s]} if wait[s] >= 0 else set())
            assert all(out[r, b] == float("-inf") for b in blocked)
            if greedy[s] and wait[s] >= 0:
                would_end = max(logits[r, b] for b in members[gate[s]]) >= logits[r].max()
                top = int(out[r].argmax())
                if would_end:
                    assert top == wait[s], f"row {r}: the model's argmax ended thinking, so greedy must splice"
                else:
                    assert top == int(np.argmax(np.where(np.isin(np.arange(V), members[gate[s]]), -np.inf, logits[r]))), (
                        "no splice when the model would not end")


@given(batches())
def test_shape_dtype_device_preserved(batch):
    out = run_kernel(*batch)
    assert out.shape == batch[0].shape and out.dtype == torch.float32 and out.device.type == "cpu"


def test_bf16_rows_work():
    logits = torch.randn(3, V).to(torch.bfloat16)
    ids, mass = tables([[1, 2], [], [5]])
    out = think_kernel(
        logits.clone(), torch.tensor([0, 1, 2]), torch.tensor([4, -1, -1, -1]), torch.tensor([-1, 0, -1, -1]),
        torch.tensor([-1, 7, -1, -1]), torch.tensor([0, 0, 0, 0]), ids, mass, do_force=True, do_gate=True,
    )
    assert out.dtype == torch.bfloat16
    assert int(out[0].argmax()) == 4 and out[1, 1] == float("-inf") and torch.equal(out[2], logits[2])


@given(batches(), st.booleans())
def test_host_known_rows_path_equals_device_path(batch, contiguous):
    """With the forced (and gated) rows known on the host only those rows are written (and read); the result is the same."""
    logits, row_slots, force, gate, wait, greedy, members = batch
    want = run_kernel(*batch)
    ids, mass = tables(members)
    def fresh():
        z = torch.from_numpy(logits.copy())
        if not contiguous:  # a column-sliced view: the scatter fallback
            z = torch.cat([z, torch.zeros_like(z)], dim=1)[:, :V]
        return z

    rows = torch.tensor([r for r, s in enumerate(row_slots) if force[s] >= 0], dtype=torch.int64)
    others = torch.tensor([r for r, s in enumerate(row_slots) if force[s] < 0], dtype=torch.int64)
    gates = torch.tensor([r for r, s in enumerate(row_slots) if gate[s] >= 0], dtype=torch.int64)
    for keep in (None, others if 0 < others.numel() < len(row_slots) else None):  # both ways of writing the rows
        for gate_rows in (None, gates):  # the gated rows known on the host: only those are read
            # and whether one of them is greedy: without one, the row maxima are not read
            greedy_gated = gate_rows is None or any(greedy[row_slots[r]] for r in gates.tolist())
            got = think_kernel(
                fresh(), torch.tensor(row_slots, dtype=torch.int64), torch.tensor(force), torch.tensor(gate), torch.tensor(wait),
                torch.tensor(greedy), ids, mass, do_force=rows.numel() > 0, do_gate=gates.numel() > 0 or gate_rows is None,
                force_rows=rows, keep_rows=keep, gate_rows=gate_rows, greedy_gated=greedy_gated,
            )
            assert torch.equal(got, want)
