"""The shared building blocks: the slot allocator against a set model, the host mirror against its host side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tts_plugins.slots import HostMirror, SlotAllocator, SlotsExhausted

SIZE = 5


class AllocatorMachine(RuleBasedStateMachine):
    """take / free / free_all in any order, against a plain set of taken slots."""

    def __init__(self) -> None:
        super().__init__()
        self.slots = SlotAllocator(SIZE, what="things", owner="test")
        self.taken: set[int] = set()

    @precondition(lambda self: len(self.taken) < SIZE)
    @rule()
    def take(self) -> None:
        slot = self.slots.take()
        assert slot not in self.taken, f"slot {slot} handed out twice"
        assert 0 <= slot < SIZE
        self.taken.add(slot)

    @precondition(lambda self: len(self.taken) == SIZE)
    @rule()
    def take_when_full(self) -> None:
        with pytest.raises(SlotsExhausted, match="test: more than 5 things at once"):
            self.slots.take()

    @precondition(lambda self: self.taken)
    @rule(data=st.data())
    def free(self, data) -> None:
        slot = data.draw(st.sampled_from(sorted(self.taken)))
        self.slots.free(slot)
        self.taken.discard(slot)

    @rule(slot=st.integers(-2, SIZE + 2))
    def free_a_slot_not_taken(self, slot: int) -> None:
        if slot in self.taken:
            return
        with pytest.raises(ValueError, match="not taken"):
            self.slots.free(slot)

    @rule()
    def free_all(self) -> None:
        self.slots.free_all()
        self.taken.clear()

    @invariant()
    def counts_match_the_model(self) -> None:
        assert self.slots.in_use == len(self.taken)
        assert self.slots.available + self.slots.in_use == SIZE
        assert all((s in self.slots) == (s in self.taken) for s in range(SIZE))


TestAllocatorMachine = AllocatorMachine.TestCase


def test_allocator_never_hands_out_a_slot_twice_and_reuses_freed_ones():
    slots = SlotAllocator(3)
    got = [slots.take() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and got[0] == 0
    with pytest.raises(SlotsExhausted, match="tts_plugins: more than 3 requests at once"):
        slots.take()
    slots.free(1)
    with pytest.raises(ValueError, match="slot 1 is not taken"):
        slots.free(1)  # a double free would hand slot 1 out twice
    assert slots.take() == 1
    assert isinstance(SlotsExhausted("x"), RuntimeError), "callers that caught RuntimeError still do"


def test_empty_allocator_is_always_exhausted():
    with pytest.raises(SlotsExhausted):
        SlotAllocator(0).take()


class CountingCopies:
    """Wraps a mirror's device tensor to count ``copy_`` calls (a CPU mirror has none: host is device)."""

    def __init__(self, mirror: HostMirror) -> None:
        self.calls = 0
        dev = torch.empty_like(mirror.host)  # stands in for a device copy
        dev.copy_(mirror.host)
        real = dev.copy_

        def copy_(src, non_blocking=False):
            self.calls += 1
            assert non_blocking, "uploads never block"
            return real(src)

        dev.copy_ = copy_  # type: ignore[method-assign]
        mirror._dev = dev


def test_mirror_copies_only_when_dirty_and_device_equals_host_after_sync():
    m = HostMirror((3, 4), torch.int64, fill=-1)
    counter = CountingCopies(m)
    view = m.device_view()
    assert counter.calls == 0 and torch.equal(view, m.host), "clean: no copy, and the device starts equal"
    m.np[1, 2] = 7
    m.mark_dirty()
    assert torch.equal(m.device_view(), m.host) and counter.calls == 1
    for _ in range(5):
        assert m.device_view() is view, "clean: the same tensor, nothing copied or allocated"
    assert counter.calls == 1


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(-100, 100), st.booleans()), max_size=30))
def test_mirror_device_always_equals_host_after_device_view(writes):
    m = HostMirror(8, torch.float32, fill=1.0)
    counter = CountingCopies(m)
    dirty = False
    for i, value, mark in writes:
        m.np[i] = value
        if mark:
            m.mark_dirty()
            dirty = True
        before = counter.calls
        view = m.device_view()
        assert counter.calls == before + int(dirty), "a copy exactly when marked dirty"
        if dirty:
            assert torch.equal(view, m.host)
        dirty = False


def test_cpu_mirror_is_its_host_tensor():
    m = HostMirror(4, torch.bool, fill=False, device="cpu", pin_memory=True)  # pinning is for device copies only
    assert m.device_view() is m.host and not m.host.is_pinned()
    m.np[2] = True
    assert bool(m.device_view()[2]) and m.host.dtype == torch.bool
    assert isinstance(m.np, np.ndarray) and m.np.shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_mirror_is_pinned_and_uploads_when_dirty():
    m = HostMirror(16, torch.int64, fill=3, device="cuda", pin_memory=True)
    assert m.host.is_pinned() and m.device_view().is_cuda
    m.np[5] = 9
    m.mark_dirty()
    assert m.device_view().cpu().tolist() == m.np.tolist()


def test_workspace_reuses_its_buffers_once_a_size_was_seen():
    from tts_plugins.slots import Workspace

    ws = Workspace("cpu")
    a = ws.get("x", 5, 7, torch.float32)
    assert a.shape == (5, 7) and ws.grown == 1
    b = ws.get("x", 3, 7, torch.float32)
    assert b.data_ptr() == a.data_ptr() and ws.grown == 1  # smaller: a view of the same buffer
    ws.get("x", 10, 7, torch.float32)  # within the doubled capacity
    assert ws.grown == 1
    ws.get("x", 11, 7, torch.float32)
    ws.get("x", 4, 7, torch.bfloat16)  # another dtype or width is another buffer
    assert ws.grown == 3
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert torch.equal(ws.upload("i", arr), torch.from_numpy(arr))


def test_workspace_staging_alternates_two_host_buffers_per_name():
    """Off the CPU (the meta device stands in for a GPU here): each name's uploads take turns between two host
    buffers, so the next step's upload never rewrites the buffer the previous step's copy reads."""
    from tts_plugins.slots import Workspace

    ws = Workspace("meta")
    first = ws.upload("rows", np.arange(4, dtype=np.int64))
    host, _, turn = ws._staged["rows"]
    assert first.shape == (4,) and first.device.type == "meta" and turn == 1
    assert host[0, :4].tolist() == [0, 1, 2, 3]
    assert ws.upload("rows", np.array([[7, 8], [9, 10]], dtype=np.int64)).shape == (2, 2)
    assert host[0, :4].tolist() == [0, 1, 2, 3] and host[1, :4].tolist() == [7, 8, 9, 10]  # the first is intact
    assert ws._staged["rows"][2] == 0 and ws.grown == 1
